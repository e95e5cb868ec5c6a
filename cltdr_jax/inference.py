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
from cltdr_jax.decoding import check_point_buffer, refine_offsets, trident_distributions, trident_offsets
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


def decode_levels(
    outputs: dict[str, list[jax.Array]], strides: tuple[int, ...], num_bins: int
) -> list[tuple]:
    """Per level (scores, left, right), each [B, T_l, C]: sigmoid(Z) * mask and segment ends in grid units."""
    decoded = []
    for l, s in enumerate(strides):
        p_start, p_end = trident_distributions(
            outputs["start_logits"][l], outputs["end_logits"][l], outputs["reg_offsets"][l], num_bins
        )
        d_start, d_end = trident_offsets(p_start, p_end)
        delta_start, delta_end = refine_offsets(
            d_start, d_end, outputs["refine_start"][l], outputs["refine_end"][l], s
        )
        mask = outputs["masks"][l][..., None]
        scores = jax.nn.sigmoid(outputs["cls_logits"][l]) * mask
        tau = (jnp.arange(scores.shape[1], dtype=jnp.float32) * s)[None, :, None]
        decoded.append((scores, tau - delta_start * s, tau + delta_end * s))
    return decoded


class Predictor:
    """Runs the detector on single videos (batch size 1, as the reference does at test time)."""

    def __init__(self, cfg: Config, params: Any):
        self.cfg = cfg
        self.params = params
        model = CLTDRGMG(cfg.model, cfg.train_cfg)

        def forward(params, feats, mask):
            outputs = model.apply({"params": params}, feats, mask)
            return decode_levels(outputs, cfg.strides, cfg.model.num_bins)

        self._forward = jax.jit(forward)
        self.padded_lengths: set[int] = set()

    def network(
        self, feats: np.ndarray, video_id: str = "?"
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per-level (scores, left, right) [T_l, C] numpy arrays for one video's features [T, D_in]."""
        cfg = self.cfg
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
        levels = jax.device_get(self._forward(self.params, x, mask))
        out = [(s[0], l[0], r[0]) for s, l, r in levels]
        if not all(np.isfinite(s).all() for s, _, _ in out):
            raise DataError(f"video {video_id!r}: the network produced NaN/Inf scores")
        return out

    def predict(self, feats: np.ndarray, video_id: str = "?") -> Detections:
        """Detections of one video in feature-grid units."""
        return video_detections(self.network(feats, video_id), self.cfg.test_cfg)


def predict_items(
    predictor: Predictor, items: Iterable[dict[str, Any]]
) -> tuple[dict[str, Detections], dict]:
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
        results[vid] = to_seconds(
            dets, item["fps"], item["feat_stride"], item["feat_num_frames"], item["duration"]
        )
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
