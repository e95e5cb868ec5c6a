"""Gaussian Soft-NMS in vectorised numpy, reproducing the reference's C++ extension (REFERENCE.md 8.2).

The reference runs a sequential loop: pick the highest remaining score (ties keep the earliest position),
swap it into place, decay every later entry by exp(-IoU^2 / sigma), and drop an entry whose score falls
below `min_score` by moving the LAST remaining entry into its position. Positions only matter for tie
breaking, but we keep them exactly so that outputs match including ties.

Here every class is one row of a padded 2-D array and all rows advance together, so each step of the
loop is a handful of numpy operations over all classes at once; only the (rare) removals touch rows one
at a time, and each entry is removed at most once.
"""

from __future__ import annotations

import numpy as np

AREA_EPS = np.float32(1e-6)


def _compact_row(order: np.ndarray, keep: np.ndarray, start: int, end: int) -> int:
    """The reference's removal rule on one row, in place. Positions start..end-1 were decayed;
    `keep[p]` says whether entry at p survives. Returns the new number of entries."""
    p, last = start, end - 1
    while p <= last:
        if keep[p]:
            p += 1
            continue
        # Move the last entry into the hole; a moved entry that is itself dropped frees the next one.
        while last > p and not keep[last]:
            last -= 1
        if last == p:
            last -= 1
            break
        # Swap (not copy) so that positions >= the new count still hold exactly the dropped entries.
        order[p], order[last] = order[last], order[p]
        keep[p] = True
        last -= 1
        p += 1
    return last + 1


def soft_nms_rows(
    segments: np.ndarray, scores: np.ndarray, counts: np.ndarray, sigma: float, min_score: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft-NMS on R independent sets at once.

    Args:
      segments: [R, M, 2] float32 (x1, x2); row r holds `counts[r]` valid entries, the rest is padding.
      scores: [R, M] float32.
    Returns:
      (order [R, M] int: the entry index emitted at each step, out_scores [R, M] float32: its decayed
      score at emission, emitted [R] int: how many entries each row emitted).
    """
    r_count, m = scores.shape
    rows = np.arange(r_count)
    order = np.tile(np.arange(m), (r_count, 1))
    x1 = segments[..., 0].astype(np.float32)
    x2 = segments[..., 1].astype(np.float32)
    s = scores.astype(np.float32).copy()
    n = counts.astype(np.int64).copy()
    s[np.arange(m)[None, :] >= n[:, None]] = -np.inf
    out_scores = np.zeros((r_count, m), np.float32)
    inv_sigma = np.float32(1.0 / sigma)
    for i in range(m):
        active = n > i
        if not active.any():
            break
        ra = rows[active]
        # Highest current score among positions i..n-1 (np.argmax keeps the first of ties).
        cur = order[ra, i:]
        best = i + np.argmax(s[ra[:, None], cur], axis=1)
        chosen = order[ra, best]
        order[ra, best] = order[ra, i]
        order[ra, i] = chosen
        out_scores[ra, i] = s[ra, chosen]
        if i + 1 >= m:
            break
        # Decay every later entry of the active rows.
        later = order[ra, i + 1 :]
        lx1, lx2 = x1[ra[:, None], later], x2[ra[:, None], later]
        cx1, cx2 = x1[ra, chosen][:, None], x2[ra, chosen][:, None]
        inter = np.maximum(np.minimum(cx2, lx2) - np.maximum(cx1, lx1), np.float32(0))
        area_i = cx2 - cx1 + AREA_EPS
        area_p = lx2 - lx1 + AREA_EPS
        ovr = inter / (area_i + area_p - inter)
        decayed = s[ra[:, None], later] * np.exp(-(ovr * ovr) * inv_sigma)
        valid = (np.arange(i + 1, m)[None, :]) < n[ra][:, None]
        s[ra[:, None], later] = np.where(valid, decayed, -np.inf)
        drop = valid & (decayed < min_score)
        for k in np.nonzero(drop.any(axis=1))[0]:
            r = ra[k]
            keep = np.ones(m, bool)
            keep[i + 1 : n[r]] = ~drop[k, : n[r] - i - 1]
            new_n = _compact_row(order[r], keep, i + 1, n[r])
            s[r, order[r, new_n:]] = -np.inf
            n[r] = new_n
    return order, out_scores, n


def soft_nms(
    segments: np.ndarray, scores: np.ndarray, sigma: float, min_score: float, max_num: int
) -> tuple[np.ndarray, np.ndarray]:
    """One set: returns (indices into the input in emission order, their decayed scores), at most max_num."""
    order, out_scores, n = soft_nms_rows(
        segments[None], scores[None], np.array([len(scores)]), sigma, min_score
    )
    k = min(int(n[0]), max_num)
    return order[0, :k], out_scores[0, :k]


def box_voting(
    kept: np.ndarray, candidates: np.ndarray, candidate_scores: np.ndarray, threshold: float
) -> np.ndarray:
    """Replace each kept segment by the score-weighted mean of all candidates with IoU >= threshold with it."""
    inter = np.maximum(
        np.minimum(kept[:, None, 1], candidates[None, :, 1])
        - np.maximum(kept[:, None, 0], candidates[None, :, 0]),
        0,
    )
    len_k = kept[:, 1] - kept[:, 0]
    len_c = candidates[:, 1] - candidates[:, 0]
    iou = inter / (len_k[:, None] + len_c[None, :] - inter)
    weights = (iou >= threshold) * candidate_scores[None, :]
    return ((weights @ candidates) / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def batched_nms(
    segments: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    sigma: float,
    min_score: float,
    max_num: int,
    multiclass: bool = True,
    voting_thresh: float = 0.75,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's `batched_nms` with Gaussian Soft-NMS. segments [N, 2], scores [N], labels [N].

    Multiclass: Soft-NMS per class (ascending class order, each capped at max_num), then all results sorted
    by descending score and capped at max_num. Class-agnostic: one Soft-NMS over everything, then box voting
    against the undecayed candidates. Returns (segments [K, 2], scores [K], labels [K]).
    """
    segments = np.asarray(segments, np.float32).reshape(-1, 2)
    scores = np.asarray(scores, np.float32).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if len(scores) == 0:
        return segments, scores, labels
    if multiclass:
        classes = np.unique(labels)
        members = [np.nonzero(labels == c)[0] for c in classes]
        counts = np.array([len(m) for m in members])
        width = counts.max()
        padded_segs = np.zeros((len(classes), width, 2), np.float32)
        padded_scores = np.zeros((len(classes), width), np.float32)
        for r, idx in enumerate(members):
            padded_segs[r, : len(idx)] = segments[idx]
            padded_scores[r, : len(idx)] = scores[idx]
        order, out_scores, emitted = soft_nms_rows(padded_segs, padded_scores, counts, sigma, min_score)
        picked, picked_scores = [], []
        for r, idx in enumerate(members):
            k = min(int(emitted[r]), max_num)
            picked.append(idx[order[r, :k]])
            picked_scores.append(out_scores[r, :k])
        index = np.concatenate(picked)
        out_segs, out_scores_flat, out_labels = segments[index], np.concatenate(picked_scores), labels[index]
    else:
        index, out_scores_flat = soft_nms(segments, scores, sigma, min_score, max_num)
        out_segs = box_voting(segments[index], segments, scores, voting_thresh)
        out_labels = labels[index]
    # Stable descending sort: the reference's sort is unstable, so ties may come out in another order.
    rank = np.argsort(-out_scores_flat, kind="stable")[:max_num]
    return out_segs[rank], out_scores_flat[rank], out_labels[rank]
