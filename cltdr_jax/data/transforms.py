"""Training-time random truncation and cropping of a video (REFERENCE.md section 7.2).

The reference draws with Python's `random`; we draw from an explicit `np.random.Generator`, so a crop is a
pure function of the inputs and the generator state. Window arithmetic is float32, as in the reference.
"""

from __future__ import annotations

import numpy as np

MAX_TRIALS = 200


def truncate_feats(
    feats: np.ndarray,
    segments: np.ndarray,
    labels: np.ndarray,
    max_seq_len: int,
    trunc_thresh: float,
    crop_ratio: tuple[float, float] | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Cuts a random window of at most `max_seq_len` steps that keeps at least one action.

    Args:
      feats: `[T, D]` features.
      segments: `[N, 2]` float32 actions in feature-grid units.
      labels: `[N]` class ids.
      max_seq_len: M; videos longer than M are always cut to exactly M steps.
      trunc_thresh: minimum fraction of an action inside the window for it to be kept.
      crop_ratio: `(lo, hi)`: videos with T <= M are cropped to a random length in
        `[max(round(lo T), 1), min(round(hi T), T)]`; None leaves them unchanged.
      rng: the only source of randomness.

    Returns:
      `(feats [T', D], segments [N', 2], labels [N'], window_start)`: the window's features, the kept actions
      clipped to the window and shifted by `-window_start`, their labels. Unchanged inputs give start 0.
    """
    feat_len = feats.shape[0]
    if feat_len <= max_seq_len:
        if crop_ratio is None:
            return feats, segments, labels, 0
        # Python's round (halves to even), as the reference.
        lo = max(round(crop_ratio[0] * feat_len), 1)
        hi = min(round(crop_ratio[1] * feat_len), feat_len)
        max_seq_len = int(rng.integers(lo, hi, endpoint=True))
        if max_seq_len == feat_len:
            return feats, segments, labels, 0

    segments = np.asarray(segments, dtype=np.float32).reshape(-1, 2)
    seg_start, seg_end = segments[:, 0], segments[:, 1]
    length = np.abs(seg_end - seg_start)
    thresh = np.float32(trunc_thresh)  # torch compares a float32 tensor with the threshold in float32
    for _ in range(MAX_TRIALS):
        start = int(rng.integers(0, feat_len - max_seq_len, endpoint=True))
        win_start, win_end = np.float32(start), np.float32(start + max_seq_len)
        left = np.maximum(win_start, seg_start)
        right = np.minimum(win_end, seg_end)
        inter = np.maximum(right - left, np.float32(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = inter / length  # zero-length actions give NaN and are never kept
        keep = ratio >= thresh
        if keep.any():
            break
    # When no trial keeps an action, the last window is used (with no actions).
    out_segments = np.stack([left[keep], right[keep]], axis=1) - win_start
    return feats[start : start + max_seq_len], out_segments, np.asarray(labels)[keep], start
