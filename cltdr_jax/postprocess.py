"""From per-level network outputs to detections in seconds (REFERENCE.md 8.1, 8.3, 8.4). Host-side numpy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cltdr_jax.config import TestConfig
from cltdr_jax.errors import DataError
from cltdr_jax.nms import batched_nms


@dataclass
class Detections:
    """Detections of one video: segments [K, 2], scores [K], labels [K] (class indices)."""

    segments: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def level_candidates(scores: np.ndarray, left: np.ndarray, right: np.ndarray, test_cfg: TestConfig) -> Detections:
    """Candidates of one level. scores, left, right: [T_l, C] (sigmoid score * mask; segment ends in grid units).

    Threshold, top-k by descending score over the row-major (t, c) flattening, then the duration filter.
    """
    num_classes = scores.shape[1]
    flat = scores.reshape(-1)
    keep = np.nonzero(flat > test_cfg.pre_nms_thresh)[0]
    # The reference's sort is unstable; a stable sort makes our tie order deterministic.
    keep = keep[np.argsort(-flat[keep], kind="stable")][: test_cfg.pre_nms_topk]
    t, c = keep // num_classes, keep % num_classes
    segs = np.stack([left[t, c], right[t, c]], axis=-1)
    long_enough = (segs[:, 1] - segs[:, 0]) > test_cfg.duration_thresh
    return Detections(segs[long_enough], flat[keep][long_enough], c[long_enough])


def video_detections(
    level_outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], test_cfg: TestConfig
) -> Detections:
    """Candidates of every level (in level order), then Soft-NMS. Grid units."""
    cands = [level_candidates(s, l, r, test_cfg) for s, l, r in level_outputs]
    segs = np.concatenate([c.segments for c in cands]).astype(np.float32)
    scores = np.concatenate([c.scores for c in cands]).astype(np.float32)
    labels = np.concatenate([c.labels for c in cands])
    return soft_nms(Detections(segs, scores, labels), test_cfg)


def soft_nms(candidates: Detections, test_cfg: TestConfig) -> Detections:
    """Soft-NMS of a video's candidates with the config's settings (sigma, score floor, count, per class or
    not, box voting)."""
    segs, scores, labels = batched_nms(
        candidates.segments,
        candidates.scores,
        candidates.labels,
        sigma=test_cfg.nms_sigma,
        min_score=test_cfg.min_score,
        max_num=test_cfg.max_seg_num,
        multiclass=test_cfg.multiclass_nms,
        voting_thresh=test_cfg.voting_thresh,
    )
    return Detections(segs, scores, labels)


def to_seconds(dets: Detections, fps: float, feat_stride: int, num_frames: int, duration: float) -> Detections:
    """Grid units to seconds: (g * stride + 0.5 * num_frames) / fps, then clip to [0, duration].

    The reference clips with `segs[segs <= 0] *= 0`, which can leave -0.0; we keep that for parity.
    """
    segs = (dets.segments * np.float32(feat_stride) + np.float32(0.5 * num_frames)) / np.float32(fps)
    segs = np.where(segs <= 0, segs * np.float32(0), segs)
    segs = np.where(segs >= duration, np.float32(duration), segs).astype(np.float32)
    return Detections(segs, dets.scores, dets.labels)


# ---------------------------------------------------------------------------------------------------
# External score fusion (ActivityNet)

FUSION_NUM_PRED = 200  # detections kept per video before fusion (a constant in the reference)
FUSION_TOPK = 2  # external classes per video


def load_external_scores(path: str | Path) -> dict[str, np.ndarray]:
    """Video-level class scores `{video_id: [num_classes]}` from a JSON file (optionally under `results`).

    The reference also reads a pickle of the same mapping; we refuse pickles (convert them to JSON).
    """
    path = Path(path)
    if path.suffix == ".pkl":
        raise DataError(f"{path}: external scores must be JSON (pickles are not read); convert the file first")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: external score file not found (test_cfg.ext_score_file)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    data = data.get("results", data)
    return {vid: np.asarray(v, np.float64) for vid, v in data.items()}


def fuse_external_scores(
    detections: dict[str, Detections], external: dict[str, np.ndarray], source: str = "external scores"
) -> dict[str, Detections]:
    """Each video's top-200 detections duplicated for its top-2 external classes, score sqrt(ext * det)."""
    fused = {}
    for vid in sorted(detections):
        dets = detections[vid]
        if vid not in external:
            raise DataError(f"{source}: no external class scores for video {vid!r}")
        rank = np.argsort(-dets.scores, kind="stable")[:FUSION_NUM_PRED]
        segs, scores = dets.segments[rank], dets.scores[rank].astype(np.float64)
        top = np.argsort(-external[vid], kind="stable")[:FUSION_TOPK]
        fused[vid] = Detections(
            np.concatenate([segs] * len(top)),
            np.concatenate([np.sqrt(external[vid][k] * scores) for k in top]).astype(np.float32),
            np.concatenate([np.full(len(segs), k) for k in top]),
        )
    return fused


def detections_to_json(
    detections: dict[str, Detections], class_names: list[str], external_data: dict | None = None
) -> dict:
    """ActivityNet results format, each video's list sorted by descending score."""
    from cltdr_jax import __version__

    results = {}
    for vid, dets in detections.items():
        rank = np.argsort(-dets.scores, kind="stable")
        rows = []
        for i in rank:
            label = int(dets.labels[i])
            rows.append(
                {
                    "segment": [float(dets.segments[i, 0]), float(dets.segments[i, 1])],
                    "label": class_names[label] if label < len(class_names) else str(label),
                    "label_id": label,
                    "score": float(dets.scores[i]),
                }
            )
        results[vid] = rows
    return {
        "version": f"cltdr-jax {__version__}",
        "external_data": external_data or {"used": False},
        "results": results,
    }
