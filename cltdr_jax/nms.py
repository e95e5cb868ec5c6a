"""Gaussian Soft-NMS in vectorised numpy, reproducing the reference's C++ extension (REFERENCE.md 8.2).

The reference runs a sequential loop: pick the highest remaining score (ties keep the earliest position),
swap it into place, decay every later entry by exp(-IoU^2 / sigma), and drop an entry whose score falls
below `min_score` by moving the LAST remaining entry into its position. Positions only matter for tie
breaking, but we keep them exactly so that outputs match including ties.

Here every class is one row of a padded 2-D array and all rows advance together, so each step of the
loop is a handful of numpy operations over all classes at once. The entries are stored physically in
position order (no index gathers: the later entries are contiguous slices), finished classes leave the
working set, and a removal is a few vectorised moves within its row. `batched_nms` keeps only the overall
top max_num, so a class stops as soon as nothing it could still emit would make that cut.
"""

from __future__ import annotations

import numpy as np

AREA_EPS = np.float32(1e-6)
# The planes of soft_nms_rows' working array [5, R, M]: one field of every entry, by position.
_X1, _X2, _AREA, _SCORE, _INDEX = range(5)
_TOP_K_EVERY = 8  # soft_nms_rows' steps between two top_k tests


def _drop_entries(fields: np.ndarray, row: int, start: int, end: int, dropped: np.ndarray) -> int:
    """The reference's removal rule on one row of `fields` [5, R, M], in place. Returns the new count.

    Positions start..end-1 were decayed; `dropped` [end - start] marks those that fell below min_score.
    The reference scans the holes in ascending order and moves the last surviving entry into each, so the
    holes below the new count take the survivors at or above it, in descending position order; the
    dropped entries are swapped (not copied) to the tail.
    """
    new_end = end - int(np.count_nonzero(dropped))
    cut = new_end - start
    holes = start + np.flatnonzero(dropped[:cut])
    if len(holes):
        movers = (new_end + np.flatnonzero(~dropped[cut:]))[::-1]
        moved = fields[:, row, movers]
        fields[:, row, movers] = fields[:, row, holes]
        fields[:, row, holes] = moved
    return new_end


def soft_nms_rows(
    segments: np.ndarray,
    scores: np.ndarray,
    counts: np.ndarray,
    sigma: float,
    min_score: float,
    *,
    max_emit: int | None = None,
    top_k: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft-NMS on R independent sets at once.

    Args:
      segments: [R, M, 2] float32 (x1, x2); row r holds `counts[r]` valid entries, the rest is padding.
      scores: [R, M] float32.
      max_emit: stop each row after this many emissions (its first emissions are unchanged).
      top_k: stop a row as soon as none of its further emissions can rank among the `top_k` highest
        emitted scores of all rows. A row emits non-increasing scores (decay factors are <= 1), so once
        its current maximum is below the k-th highest score emitted so far, everything it would still
        emit ends up below k others. For callers that keep only the overall top k.
    Returns:
      (order [R, M] int: the entry index emitted at each step, out_scores [R, M] float32: its decayed
      score at emission, emitted [R] int: how many entries each row emitted).
    """
    r_count, m = scores.shape
    if m >= 2**24:
        raise ValueError(f"soft_nms_rows: {m} entries in one set; at most 2**24 - 1 are supported")
    # Positions < i never change again, so at the end the index and score planes ARE the outputs. The
    # entry index rides along as float32 (exact below 2**24).
    fields = np.empty((5, r_count, m), np.float32)
    fields[_X1] = segments[..., 0]
    fields[_X2] = segments[..., 1]
    # The reference's `x2 - x1 + 1e-6` of the later entry, once per entry: the same float32 value.
    fields[_AREA] = fields[_X2] - fields[_X1] + AREA_EPS
    fields[_SCORE] = scores
    fields[_INDEX] = np.arange(m, dtype=np.float32)
    n = np.minimum(counts.astype(np.int64), m)
    fields[_SCORE][np.arange(m)[None, :] >= n[:, None]] = -np.inf
    # -(ovr^2) * (1 / sigma) == ovr^2 * -(1 / sigma) bit for bit (IEEE products are sign-symmetric).
    neg_inv_sigma = -np.float32(1.0 / sigma)
    min_score = np.float32(min_score)

    order = np.zeros((r_count, m), np.int64)
    out_scores = np.zeros((r_count, m), np.float32)
    live = np.arange(r_count)  # the original row of each row of `work`
    work, n_live = fields, n.copy()
    rows = np.arange(r_count)
    first_end = end = 0  # the smallest and largest count among the live rows (plain ints: cheap tests)
    finished_scores: list[np.ndarray] = []  # emissions of the rows that left the working set
    steps = m if max_emit is None else min(m, max_emit)
    for i in range(steps):
        # (i < end: when the longest live row ends exactly here, every live row finishes below instead.)
        if top_k and 0 < i < end and i % _TOP_K_EVERY == 0 and i * len(live) + sum(map(len, finished_scores)) >= top_k:
            pool = np.concatenate([work[_SCORE, :, :i].ravel(), *finished_scores])
            kth = np.partition(pool, len(pool) - top_k)[len(pool) - top_k]
            hopeless = work[_SCORE, :, i:end].max(axis=1) < kth
            if hopeless.any():
                n_live[hopeless] = i
                n[live[hopeless]] = i
                first_end = 0
        if i >= first_end:
            # Rows whose count is reached are finished: their planes are final, they leave the working set.
            running = n_live > i
            if not running.all():
                order[live[~running]] = work[_INDEX, ~running]
                out_scores[live[~running]] = work[_SCORE, ~running]
                if top_k:
                    finished_scores += [work[_SCORE, k, : n_live[k]] for k in np.flatnonzero(~running)]
                live, work, n_live = live[running], work[:, running], n_live[running]
                rows = rows[: len(live)]
                if len(live) == 0:
                    break
            first_end, end = int(n_live.min()), int(n_live.max())
            tail = end - n_live  # positions past each row's count inside the decayed slice: all -inf
        # Highest current score among positions i..n-1 (np.argmax keeps the first of ties); swap it to i.
        best = np.argmax(work[_SCORE, :, i:end], axis=1)
        best += i
        chosen = work[:, rows, best]
        work[:, rows, best] = work[:, :, i]
        work[:, :, i] = chosen
        if i + 1 >= end:
            continue
        # Decay every later entry: the reference's float32 operations in the reference's order.
        later = slice(i + 1, end)
        inter = np.minimum(chosen[_X2, :, None], work[_X2, :, later])
        inter -= np.maximum(chosen[_X1, :, None], work[_X1, :, later])
        np.maximum(inter, np.float32(0), out=inter)
        union = np.add(chosen[_AREA, :, None], work[_AREA, :, later])
        union -= inter
        decay = np.divide(inter, union, out=inter)
        np.multiply(decay, decay, out=decay)
        decay *= neg_inv_sigma
        np.exp(decay, out=decay)
        later_scores = work[_SCORE, :, later]
        later_scores *= decay  # -inf (removed entries, padding) stays -inf
        low = later_scores < min_score
        # Besides the -inf tail, low entries are new removals.
        for k in np.flatnonzero(np.count_nonzero(low, axis=1) != tail):
            count = n_live[k] - i - 1
            dropped = low[k, :count]
            later_scores[k, :count][dropped] = -np.inf
            n_live[k] = _drop_entries(work, k, i + 1, n_live[k], dropped)
            n[live[k]] = n_live[k]
            first_end = 0  # recompute the bounds
    if len(live):
        order[live] = work[_INDEX]
        out_scores[live] = work[_SCORE]
    if max_emit is not None:
        n = np.minimum(n, max_emit)
    return order, out_scores, n


def soft_nms(
    segments: np.ndarray, scores: np.ndarray, sigma: float, min_score: float, max_num: int
) -> tuple[np.ndarray, np.ndarray]:
    """One set: returns (indices into the input in emission order, their decayed scores), at most max_num."""
    order, out_scores, n = soft_nms_rows(
        segments[None], scores[None], np.array([len(scores)]), sigma, min_score, max_emit=max_num
    )
    k = min(int(n[0]), max_num)
    return order[0, :k], out_scores[0, :k]


def box_voting(kept: np.ndarray, candidates: np.ndarray, candidate_scores: np.ndarray, threshold: float) -> np.ndarray:
    """Replace each kept segment by the score-weighted mean of all candidates with IoU >= threshold with it."""
    inter = np.maximum(
        np.minimum(kept[:, None, 1], candidates[None, :, 1]) - np.maximum(kept[:, None, 0], candidates[None, :, 0]),
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
        # Only the max_num best of all classes' emissions are returned: classes stop early past that.
        order, out_scores, emitted = soft_nms_rows(
            padded_segs, padded_scores, counts, sigma, min_score, max_emit=max_num, top_k=max_num
        )
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
