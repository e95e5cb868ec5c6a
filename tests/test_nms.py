"""Soft-NMS: a hand-computed case, a float64 brute-force re-derivation, and the reference's outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cltdr_jax.nms import batched_nms, box_voting, soft_nms


def brute_force_soft_nms(segs, scores, sigma, min_score):
    """The reference's sequential algorithm, written out directly in float64."""
    x1, x2, s = segs[:, 0].astype(float).copy(), segs[:, 1].astype(float).copy(), scores.astype(float).copy()
    idx = list(range(len(s)))
    n, out = len(s), []
    i = 0
    while i < n:
        best = i
        for p in range(i + 1, n):
            if s[p] > s[best]:
                best = p
        for arr in (x1, x2, s):
            arr[i], arr[best] = arr[best], arr[i]
        idx[i], idx[best] = idx[best], idx[i]
        out.append((idx[i], s[i]))
        p = i + 1
        while p < n:
            inter = max(0.0, min(x2[i], x2[p]) - max(x1[i], x1[p]))
            ovr = inter / ((x2[i] - x1[i] + 1e-6) + (x2[p] - x1[p] + 1e-6) - inter)
            s[p] *= math.exp(-(ovr**2) / sigma)
            if s[p] < min_score:
                x1[p], x2[p], s[p], idx[p] = x1[n - 1], x2[n - 1], s[n - 1], idx[n - 1]
                n -= 1
            else:
                p += 1
        i += 1
    return out


def test_hand_computed_case():
    segs = np.array([[0, 10], [5, 15], [20, 30]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    order, out = soft_nms(segs, scores, sigma=0.5, min_score=0.001, max_num=10)
    # [5, 15] overlaps [0, 10] with IoU 5 / 15 = 1/3: its score decays to 0.8 * exp(-(1/9) / 0.5) = 0.64059.
    assert list(order) == [0, 2, 1]
    np.testing.assert_allclose(out, [0.9, 0.7, 0.8 * math.exp(-(1 / 9) / 0.5)], rtol=1e-5)


def test_low_scores_are_dropped_and_the_last_entry_takes_their_place():
    # Entry 1 is identical to entry 0 and decays below min_score; entry 3 (last) moves into position 1,
    # so on a tie between entries 2 and 3 the moved entry 3 now comes first.
    segs = np.array([[0, 10], [0, 10], [20, 30], [40, 50]], np.float32)
    scores = np.array([0.9, 0.5, 0.4, 0.4], np.float32)
    order, out = soft_nms(segs, scores, sigma=0.01, min_score=0.1, max_num=10)
    assert list(order) == [0, 3, 2]
    assert [i for i, _ in brute_force_soft_nms(segs, scores, 0.01, 0.1)] == [0, 3, 2]


@pytest.mark.parametrize("seed", range(5))
def test_matches_float64_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 300
    start = rng.uniform(0, 200, n)
    segs = np.stack([start, start + rng.uniform(0.5, 30, n)], axis=1).astype(np.float32)
    scores = rng.uniform(0.01, 1, n).astype(np.float32)
    scores[:20] = scores[20:40]  # exact ties exercise the earliest-position rule
    expected = brute_force_soft_nms(segs, scores, 0.5, 0.05)
    order, out = soft_nms(segs, scores, sigma=0.5, min_score=0.05, max_num=10_000)
    assert list(order) == [i for i, _ in expected]
    np.testing.assert_allclose(out, [s for _, s in expected], rtol=1e-5)


def test_multiclass_equals_per_class_runs_merged():
    rng = np.random.default_rng(7)
    n = 400
    start = rng.uniform(0, 100, n)
    segs = np.stack([start, start + rng.uniform(1, 20, n)], axis=1).astype(np.float32)
    scores = rng.uniform(0.01, 1, n).astype(np.float32)
    labels = rng.integers(0, 6, n)
    out_segs, out_scores, out_labels = batched_nms(segs, scores, labels, sigma=0.5, min_score=0.01, max_num=50)
    rows = []
    for c in range(6):
        members = np.nonzero(labels == c)[0]
        for i, s in brute_force_soft_nms(segs[members], scores[members], 0.5, 0.01)[:50]:
            rows.append((s, c, members[i]))
    rows.sort(key=lambda r: -r[0])
    rows = rows[:50]
    np.testing.assert_allclose(out_scores, [r[0] for r in rows], rtol=1e-5)
    np.testing.assert_array_equal(out_labels, [r[1] for r in rows])
    np.testing.assert_array_equal(out_segs, segs[[r[2] for r in rows]])


def test_box_voting_hand_computed():
    kept = np.array([[0.0, 10.0]])
    cands = np.array([[0.0, 10.0], [0.0, 10.5], [30.0, 40.0]])
    scores = np.array([0.6, 0.4, 0.9])
    # IoU([0,10],[0,10.5]) = 10/10.5 >= 0.9; [30,40] does not overlap: mean weighted by 0.6 and 0.4.
    np.testing.assert_allclose(box_voting(kept, cands, scores, 0.9), [[0.0, 0.6 * 10 + 0.4 * 10.5]], rtol=1e-6)


def test_reference_soft_nms_outputs(thumos_small):
    ref = np.load(thumos_small / "reference_outputs.npz")
    for vid in map(str, ref["test/video_ids"]):
        segs, scores, labels = batched_nms(
            ref[f"test/{vid}/cand_segments"],
            ref[f"test/{vid}/cand_scores"],
            ref[f"test/{vid}/cand_labels"],
            sigma=0.5,
            min_score=0.001,
            max_num=2000,
        )
        ref_segs, ref_scores = ref[f"test/{vid}/nms_segments"], ref[f"test/{vid}/nms_scores"]
        assert len(scores) == len(ref_scores), vid
        ours = np.lexsort((segs[:, 1], segs[:, 0], labels))
        theirs = np.lexsort((ref_segs[:, 1], ref_segs[:, 0], ref[f"test/{vid}/nms_labels"]))
        np.testing.assert_array_equal(segs[ours], ref_segs[theirs])
        np.testing.assert_allclose(scores[ours], ref_scores[theirs], atol=1e-6)


def test_top_k_early_stop_on_random_sets():
    """Fuzz: the early stop for the overall top-k never changes the result (and never fails: a set that
    ended exactly on a check step once made it reduce an empty slice)."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        classes = int(rng.integers(1, 6))
        counts = rng.integers(1, 40, classes)
        n = int(counts.sum())
        start = rng.uniform(0, 30, n)
        segs = np.stack([start, start + rng.uniform(0.5, 8, n)], 1).astype(np.float32)
        scores = rng.uniform(0.01, 1, n).astype(np.float32)
        labels = np.repeat(np.arange(classes), counts)
        min_score, max_num = float(rng.uniform(0.02, 0.4)), int(rng.integers(1, 30))
        _, out_scores, out_labels = batched_nms(segs, scores, labels, sigma=0.5, min_score=min_score, max_num=max_num)
        rows = []
        for c in range(classes):
            members = np.nonzero(labels == c)[0]
            rows += [(s, c) for _, s in brute_force_soft_nms(segs[members], scores[members], 0.5, min_score)[:max_num]]
        rows.sort(key=lambda r: -r[0])
        np.testing.assert_allclose(out_scores, [r[0] for r in rows[:max_num]], rtol=1e-5)
