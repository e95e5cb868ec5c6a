"""Inference over videos: padding exactly as the reference, one compiled function per padded length.

    predictor = Predictor(cfg, params)
    dets = predictor.predict(feats)                     # feats [T, D_in] -> Detections in grid units
    results, stats = predict_items(predictor, items)   # many videos -> {video_id: Detections in seconds}

The network and the Trident decoding (`model.trident.scored_segments`) run under one `jax.jit`; candidate
selection and Soft-NMS (`postprocess`, `nms`) run on the host in numpy. The padded length (REFERENCE.md 3)
is the only shape that varies, so a split compiles once per distinct padded length, and with the persistent
compilation cache (`xla_cache`) a second run compiles nothing. The parameters are placed on the device once
(`Predictor.params` can be replaced, e.g. by training's evaluations, without recompiling). `predict_items`
keeps the device busy: it dispatches the next batch's network before the host post-processes the current
one, and batches videos of equal padded length (`batch_size`; each video keeps its own padding and mask, so
a batch gives the detections of batch size 1 up to float32 rounding).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.config import Config
from cltdr_jax.errors import DataError
from cltdr_jax.model.detector import CLTDRGMG
from cltdr_jax.model.trident import scored_segments
from cltdr_jax.points import check_point_buffer
from cltdr_jax.postprocess import Detections, to_seconds, video_detections
from cltdr_jax.xla_options import compiler_options

log = logging.getLogger(__name__)


def pad_batch(
    feats: Sequence[np.ndarray], padded_len: int, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads videos [T_i, D] on the right into [batch_size, padded_len, D] (default: one row per video);
    mask [batch_size, padded_len] is True on each video's T_i valid steps. Rows past the videos stay empty."""
    rows = len(feats) if batch_size is None else batch_size
    x = np.zeros((rows, padded_len, feats[0].shape[1]), np.float32)
    mask = np.zeros((rows, padded_len), bool)
    for i, f in enumerate(feats):
        x[i, : len(f)] = f
        mask[i, : len(f)] = True
    return x, mask


def pad_features(feats: np.ndarray, padded_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One video [T, D] -> [1, padded_len, D] and its mask [1, padded_len]."""
    return pad_batch([feats], padded_len)


def split_levels(packed: tuple, lengths: list[int]) -> list[tuple]:
    """Packed (scores, left, right) [B, sum T_l, C] -> per level (scores, left, right) [B, T_l, C]."""
    bounds = np.cumsum([0, *lengths])
    return [tuple(a[:, lo:hi] for a in packed) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def default_batch_size() -> int:
    """Videos per network call: 1 on a CPU (no gain from batching, more memory), 4 on accelerators."""
    return 1 if jax.default_backend() == "cpu" else 4


def inference_model(cfg: Config) -> CLTDRGMG:
    """The detector as `cfg.inference` computes it (dtype, precision)."""
    dtype = jnp.bfloat16 if cfg.inference.dtype == "bfloat16" else jnp.float32
    return CLTDRGMG(cfg.model, cfg.train_cfg, dtype=dtype, precision=cfg.inference.precision)


LevelOutputs = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per level (scores, left, right) [T_l, C]


@dataclass
class _Pending:
    """A dispatched network call: device arrays not yet read back."""

    video_ids: list[str]
    padded_len: int
    packed: tuple[jax.Array, jax.Array, jax.Array]


class Predictor:
    """Runs the detector on videos, `batch_size` videos of one padded length per call (default:
    `cfg.inference.batch_size`, or `default_batch_size()` where that is 0), as `cfg.inference` says."""

    def __init__(self, cfg: Config, params: Any, batch_size: int | None = None):
        if batch_size is None:
            batch_size = cfg.inference.batch_size or default_batch_size()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.params = params
        model = inference_model(cfg)

        def forward(params, feats, mask):
            outputs = model.apply({"params": params}, feats, mask)
            # Packed over levels: three transfers instead of three per level; split on the host (views).
            return scored_segments(outputs, cfg.strides, cfg.model.num_bins)

        # The network + decoding, forward(params, feats, mask) -> (scores, left, right): traceable, what
        # `cltdr export` serializes; `_jitted` compiles it here (compiler options only go on a top-level jit).
        self.forward = forward
        self._jitted = jax.jit(forward, compiler_options=compiler_options(compute_dtype=cfg.inference.dtype))
        self._executables: dict[tuple[int, int], Any] = {}
        self.padded_lengths: set[int] = set()
        self.compile_seconds: dict[int, float] = {}  # padded length -> seconds spent lowering and compiling

    @property
    def params(self) -> Any:
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        # Once per run (or per evaluation during training), not once per video. Through the host: training's
        # parameters live on its mesh (sharded types), which a single-device program cannot take.
        self._params = None if params is None else jax.device_put(jax.device_get(params))

    def executable(self, padded_len: int, input_dim: int | None = None) -> Any:
        """The network + decoding compiled for inputs [batch_size, padded_len, input_dim] (compiled once).

        Called as `executable(params, feats, mask)`. Its `cost_analysis()` gives the FLOPs of one call
        (scripts/benchmark_inference.py)."""
        d = self.cfg.dataset.input_dim if input_dim is None else input_dim
        exe = self._executables.get((padded_len, d))
        if exe is None:
            start = time.perf_counter()
            exe = self._compile(padded_len, d)
            self.compile_seconds[padded_len] = time.perf_counter() - start
            self._executables[(padded_len, d)] = exe
            log.debug(
                "compiled the network for padded length %d in %.1f s", padded_len, self.compile_seconds[padded_len]
            )
        return exe

    def abstract_inputs(self, padded_len: int, input_dim: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """The (feats, mask) shapes and dtypes of one call: what a program is compiled or exported for."""
        return (
            jax.ShapeDtypeStruct((self.batch_size, padded_len, input_dim), jnp.float32),
            jax.ShapeDtypeStruct((self.batch_size, padded_len), jnp.bool_),
        )

    def _compile(self, padded_len: int, input_dim: int) -> Any:
        return self._jitted.lower(self.params, *self.abstract_inputs(padded_len, input_dim)).compile()

    def padded_length(self, feats: np.ndarray, video_id: str = "?") -> int:
        """Checks one video's features [T, D_in] and returns its padded length (REFERENCE.md 3)."""
        cfg = self.cfg
        if feats.ndim != 2 or feats.shape[1] != cfg.dataset.input_dim or feats.shape[0] == 0:
            raise DataError(
                f"video {video_id!r}: features of shape {feats.shape}, expected [T > 0, {cfg.dataset.input_dim}]"
            )
        t = feats.shape[0]
        padded = cfg.padded_length(t)
        check_point_buffer(
            padded,
            cfg.strides,
            cfg.dataset.max_seq_len,
            cfg.model.max_buffer_len_factor,
            video_id=video_id,
            input_len=t,
            extend=cfg.model.extend_point_buffer,
        )
        return padded

    def dispatch(self, videos: Sequence[tuple[str, np.ndarray]]) -> _Pending:
        """Starts the network on up to `batch_size` videos `(video_id, feats [T, D_in])` of one padded length.

        Returns at once (JAX dispatches asynchronously); `collect` waits for the result. A batch that is not
        full is completed with empty videos (all-False masks), so that one program serves every call."""
        if not 0 < len(videos) <= self.batch_size:
            raise ValueError(f"dispatch takes 1 to {self.batch_size} videos, got {len(videos)}")
        lengths = {self.padded_length(feats, vid) for vid, feats in videos}
        if len(lengths) != 1:
            raise ValueError(f"one batch needs one padded length, got {sorted(lengths)}")
        padded = lengths.pop()
        self.padded_lengths.add(padded)
        x, mask = pad_batch([feats for _, feats in videos], padded, self.batch_size)
        packed = self.executable(padded, x.shape[2])(self.params, x, mask)
        return _Pending([vid for vid, _ in videos], padded, packed)

    def collect(self, pending: _Pending) -> list[LevelOutputs]:
        """Waits for a dispatched call; per video, per level (scores, left, right) numpy [T_l, C]."""
        packed = jax.device_get(pending.packed)
        levels = split_levels(packed, [pending.padded_len // s for s in self.cfg.strides])
        out = []
        for i, vid in enumerate(pending.video_ids):
            video = [(s[i], l[i], r[i]) for s, l, r in levels]
            if not all(np.isfinite(s).all() for s, _, _ in video):
                raise DataError(f"video {vid!r}: the network produced NaN/Inf scores")
            out.append(video)
        return out

    def network(self, feats: np.ndarray, video_id: str = "?") -> LevelOutputs:
        """Per-level (scores, left, right) [T_l, C] numpy arrays for one video's features [T, D_in]."""
        return self.collect(self.dispatch([(video_id, feats)]))[0]

    def predict(self, feats: np.ndarray, video_id: str = "?") -> Detections:
        """Detections of one video in feature-grid units."""
        return video_detections(self.network(feats, video_id), self.cfg.test_cfg)


def predict_items(predictor: Predictor, items: Iterable[dict[str, Any]]) -> tuple[dict[str, Detections], dict]:
    """Predicts dataset items (dicts with video_id, feats, fps, duration, feat_stride, feat_num_frames).

    Returns ({video_id: Detections in seconds}, timing statistics), videos in input order. Videos wait
    until `predictor.batch_size` of their padded length are there (the rest go at the end); one call is
    always in flight while the host post-processes the one before.
    """
    from cltdr_jax.xla_cache import compile_counts

    before = compile_counts()
    order: list[str] = []
    meta: dict[str, dict[str, Any]] = {}
    results: dict[str, Detections] = {}
    waiting: dict[int, list[tuple[str, np.ndarray]]] = {}
    in_flight: deque[_Pending] = deque()
    timing = {"network": 0.0, "postprocess": 0.0}
    start = time.perf_counter()

    def finish(pending: _Pending) -> None:
        t0 = time.perf_counter()
        outputs = predictor.collect(pending)
        t1 = time.perf_counter()
        for vid, levels in zip(pending.video_ids, outputs, strict=True):
            item = meta.pop(vid)
            dets = video_detections(levels, predictor.cfg.test_cfg)
            results[vid] = to_seconds(dets, item["fps"], item["feat_stride"], item["feat_num_frames"], item["duration"])
        timing["network"] += t1 - t0
        timing["postprocess"] += time.perf_counter() - t1
        if len(results) // 50 > (len(results) - len(pending.video_ids)) // 50:
            log.info("predicted %d videos (%.1f videos/s)", len(results), len(results) / (time.perf_counter() - start))

    def launch(batch: list[tuple[str, np.ndarray]]) -> None:
        t0 = time.perf_counter()
        in_flight.append(predictor.dispatch(batch))
        timing["network"] += time.perf_counter() - t0
        while len(in_flight) > 1:
            finish(in_flight.popleft())

    for item in items:
        vid = item["video_id"]
        if vid in meta or vid in results:
            raise DataError(f"video {vid!r} is given twice")
        order.append(vid)
        meta[vid] = {k: v for k, v in item.items() if k != "feats"}
        group = waiting.setdefault(predictor.padded_length(item["feats"], vid), [])
        group.append((vid, item["feats"]))
        if len(group) == predictor.batch_size:
            launch(waiting.pop(predictor.padded_length(item["feats"], vid)))
    for group in waiting.values():
        launch(group)
    while in_flight:
        finish(in_flight.popleft())

    after = compile_counts()
    stats = {
        "videos": len(order),
        "batch_size": predictor.batch_size,
        "padded_lengths": sorted(predictor.padded_lengths),
        "compilations": after["compiled"] - before["compiled"],
        "compilation_cache_hits": after["cache_hits"] - before["cache_hits"],
        "network_seconds": timing["network"],
        "postprocess_seconds": timing["postprocess"],
        "seconds": time.perf_counter() - start,
    }
    log.info(
        "%d videos, %d distinct padded lengths: %d XLA compilations, %d loaded from the compilation cache",
        len(order),
        len(predictor.padded_lengths),
        stats["compilations"],
        stats["compilation_cache_hits"],
    )
    return {vid: results[vid] for vid in order}, stats
