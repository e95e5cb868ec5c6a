"""Inference over videos: padding exactly as the reference, one compiled function per padded length.

    predictor = Predictor(cfg, params)
    dets = predictor.predict(feats)          # feats [T, D_in] -> Detections in grid units

The network and the offset decoding run under one `jax.jit`; candidate selection and Soft-NMS run on the
host in numpy. `jax.jit` caches one executable per input shape, and the padded length (REFERENCE.md 3) is
the only shape that varies, so a split compiles once per distinct padded length; with the persistent
compilation cache (`xla_cache`) a second run compiles nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.config import Config
from cltdr_jax.decoding import check_point_buffer
from cltdr_jax.errors import DataError
from cltdr_jax.model.detector import CLTDRGMG
from cltdr_jax.postprocess import Detections, to_seconds, video_detections

log = logging.getLogger(__name__)


def pad_features(feats: np.ndarray, padded_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads [T, D] on the right to [1, padded_len, D]; mask [1, padded_len] is True on the T valid steps."""
    t, d = feats.shape
    x = np.zeros((1, padded_len, d), np.float32)
    x[0, :t] = feats
    mask = np.zeros((1, padded_len), bool)
    mask[0, :t] = True
    return x, mask


def decode_packed(
    outputs: dict[str, list[jax.Array]], strides: tuple[int, ...], num_bins: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scores, left, right), each [B, sum_l T_l, C]: all levels decoded at once, concatenated in time.

    scores = sigmoid(Z) * mask; left / right are segment ends in grid units. The same arithmetic as
    `decoding.trident_distributions`, `trident_offsets` and `refine_offsets` applied level by level (the
    sums over the nb + 1 bins may round in another order), written so that XLA fuses it into one loop over
    [B, T, C] arrays: the bins are nb + 1 separate arrays, not a minor axis of 17, and a window that would
    leave its level reads a zero logit, as in the per-level version. One fusion instead of one per level
    and bin also compiles seconds faster.
    """
    nb = num_bins
    lengths = [s.shape[1] for s in outputs["start_logits"]]
    total = sum(lengths)
    # Per time row: the level's stride, the index within the level, the steps left in the level.
    stride = np.concatenate([np.full(t, s, np.float32) for t, s in zip(lengths, strides, strict=True)])
    local = np.concatenate([np.arange(t) for t in lengths])
    left_in_level = np.concatenate([np.arange(t, 0, -1) for t in lengths])
    packed = {
        k: jnp.concatenate(outputs[k], axis=1)
        for k in ("start_logits", "end_logits", "reg_offsets", "refine_start", "refine_end", "cls_logits")
    }
    mask = jnp.concatenate(outputs["masks"], axis=1)[..., None]

    local_rows = jnp.asarray(local)[None, :, None]
    left_rows = jnp.asarray(left_in_level)[None, :, None]
    start_pad = jnp.pad(packed["start_logits"], ((0, 0), (nb, 0), (0, 0)))
    end_pad = jnp.pad(packed["end_logits"], ((0, 0), (0, nb), (0, 0)))
    centre = packed["reg_offsets"]
    b, _, c = packed["start_logits"].shape

    def logits_of_bin(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Bin k's logits [B, T, C] of both sides: boundary logit of the window cell plus the centre logit.

        Start bin k looks at t - nb + k, end bin k at t + k; a cell outside the level has a zero logit."""
        start = jax.lax.dynamic_slice(start_pad, (0, k, 0), (b, total, c))
        start = jnp.where(local_rows >= nb - k, start, 0.0)
        end = jax.lax.dynamic_slice(end_pad, (0, k, 0), (b, total, c))
        end = jnp.where(left_rows > k, end, 0.0)
        centre_start = jax.lax.dynamic_slice(centre, (0, 0, k), (b, total, 1))
        centre_end = jax.lax.dynamic_slice(centre, (0, 0, nb + 1 + k), (b, total, 1))
        return start + centre_start, end + centre_end

    # Two short loops over the bins (the softmax's max, then its normaliser and the weighted sum): each bin
    # is recomputed from the logits, so nothing of size [B, T, C, nb + 1] is ever stored, and the loop
    # bodies compile once. sum_k p_k w_k is taken as (sum_k u_k w_k) / sum_k u_k: a last-bit difference.
    def max_step(k, tops):
        return tuple(jnp.maximum(t, x) for t, x in zip(tops, logits_of_bin(k), strict=True))

    # A trip count XLA cannot see keeps the loops rolled: unrolled, the bins' fusions cost seconds of compile.
    num_bins_rt = jax.lax.optimization_barrier(jnp.int32(nb + 1))
    tops = jax.lax.fori_loop(1, num_bins_rt, max_step, logits_of_bin(jnp.int32(0)))

    def sum_step(k, sums):
        (u_start, u_end) = (jnp.exp(x - t) for x, t in zip(logits_of_bin(k), tops, strict=True))
        k_float = k.astype(jnp.float32)
        norm_start, norm_end, num_start, num_end = sums
        return (
            norm_start + u_start,
            norm_end + u_end,
            num_start + u_start * (nb - k_float),
            num_end + u_end * k_float,
        )

    zero = jnp.zeros((b, total, c), jnp.float32)
    norm_start, norm_end, num_start, num_end = jax.lax.fori_loop(0, num_bins_rt, sum_step, (zero,) * 4)
    # The reference's NaN guard uses the end distribution's mask for both sides (12.13): p_end is NaN in
    # some bin exactly when its normaliser is (a NaN or +inf logit in the window), and then in every bin.
    nan = jnp.isnan(norm_end)
    d_start = jnp.where(nan, 0.0, num_start / norm_start)
    d_end = jnp.where(nan, 0.0, num_end / norm_end)

    s = jnp.asarray(stride)[None, :, None]
    tau = jnp.asarray(local.astype(np.float32) * stride)[None, :, None]
    # refine_offsets, in the reference's operation order.
    left = tau - d_start * s + packed["refine_start"]
    right = tau + d_end * s + packed["refine_end"]
    delta_start = jnp.maximum(0.0, (tau - left) / s)
    delta_end = jnp.maximum(0.0, (right - tau) / s)
    scores = jax.nn.sigmoid(packed["cls_logits"]) * mask
    return scores, tau - delta_start * s, tau + delta_end * s


def split_levels(packed: tuple, lengths: list[int]) -> list[tuple]:
    """Packed (scores, left, right) [B, sum T_l, C] -> per level (scores, left, right) [B, T_l, C]."""
    bounds = np.cumsum([0, *lengths])
    return [tuple(a[:, lo:hi] for a in packed) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def decode_levels(outputs: dict[str, list[jax.Array]], strides: tuple[int, ...], num_bins: int) -> list[tuple]:
    """Per level (scores, left, right), each [B, T_l, C]: sigmoid(Z) * mask and segment ends in grid units."""
    lengths = [s.shape[1] for s in outputs["start_logits"]]
    return split_levels(decode_packed(outputs, strides, num_bins), lengths)


class Predictor:
    """Runs the detector on single videos (batch size 1, as the reference does at test time)."""

    def __init__(self, cfg: Config, params: Any):
        self.cfg = cfg
        self.params = params
        model = CLTDRGMG(cfg.model, cfg.train_cfg)

        def forward(params, feats, mask):
            outputs = model.apply({"params": params}, feats, mask)
            # Packed over levels: three transfers instead of three per level; split on the host (views).
            return decode_packed(outputs, cfg.strides, cfg.model.num_bins)

        self._forward = jax.jit(forward)
        self._executables: dict[tuple[int, int], jax.stages.Compiled] = {}
        self.padded_lengths: set[int] = set()
        self.compile_seconds: dict[int, float] = {}  # padded length -> seconds spent lowering and compiling

    def executable(self, padded_len: int, input_dim: int | None = None) -> jax.stages.Compiled:
        """The network + decoding compiled for inputs [1, padded_len, input_dim] (compiled once, then reused).

        Its `cost_analysis()` gives the FLOPs of one video (scripts/benchmark_inference.py)."""
        d = self.cfg.dataset.input_dim if input_dim is None else input_dim
        exe = self._executables.get((padded_len, d))
        if exe is None:
            start = time.perf_counter()
            x = jax.ShapeDtypeStruct((1, padded_len, d), jnp.float32)
            mask = jax.ShapeDtypeStruct((1, padded_len), jnp.bool_)
            exe = self._forward.lower(self.params, x, mask).compile()
            self.compile_seconds[padded_len] = time.perf_counter() - start
            self._executables[(padded_len, d)] = exe
            seconds = self.compile_seconds[padded_len]
            log.debug("compiled the network for padded length %d in %.1f s", padded_len, seconds)
        return exe

    def network(self, feats: np.ndarray, video_id: str = "?") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per-level (scores, left, right) [T_l, C] numpy arrays for one video's features [T, D_in]."""
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
        self.padded_lengths.add(padded)
        x, mask = pad_features(feats, padded)
        packed = jax.device_get(self.executable(padded, feats.shape[1])(self.params, x, mask))
        lengths = [padded // s for s in cfg.strides]
        out = [(s[0], l[0], r[0]) for s, l, r in split_levels(packed, lengths)]
        if not all(np.isfinite(s).all() for s, _, _ in out):
            raise DataError(f"video {video_id!r}: the network produced NaN/Inf scores")
        return out

    def predict(self, feats: np.ndarray, video_id: str = "?") -> Detections:
        """Detections of one video in feature-grid units."""
        return video_detections(self.network(feats, video_id), self.cfg.test_cfg)


def predict_items(predictor: Predictor, items: Iterable[dict[str, Any]]) -> tuple[dict[str, Detections], dict]:
    """Predicts dataset items (dicts with video_id, feats, fps, duration, feat_stride, feat_num_frames).

    Returns ({video_id: Detections in seconds}, timing statistics).
    """
    from cltdr_jax.xla_cache import compile_counts

    before = compile_counts()
    results, net_time, post_time, count = {}, 0.0, 0.0, 0
    start = time.perf_counter()
    for item in items:
        vid = item["video_id"]
        t0 = time.perf_counter()
        levels = predictor.network(item["feats"], vid)
        t1 = time.perf_counter()
        dets = video_detections(levels, predictor.cfg.test_cfg)
        results[vid] = to_seconds(dets, item["fps"], item["feat_stride"], item["feat_num_frames"], item["duration"])
        t2 = time.perf_counter()
        net_time += t1 - t0
        post_time += t2 - t1
        count += 1
        if count % 50 == 0:
            log.info("predicted %d videos (%.1f videos/s)", count, count / (time.perf_counter() - start))
    after = compile_counts()
    stats = {
        "videos": count,
        "padded_lengths": sorted(predictor.padded_lengths),
        "compilations": after["compiled"] - before["compiled"],
        "compilation_cache_hits": after["cache_hits"] - before["cache_hits"],
        "network_seconds": net_time,
        "postprocess_seconds": post_time,
    }
    log.info(
        "%d videos, %d distinct padded lengths: %d XLA compilations, %d loaded from the compilation cache",
        count,
        len(predictor.padded_lengths),
        stats["compilations"],
        stats["compilation_cache_hits"],
    )
    return results, stats
