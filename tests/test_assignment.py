"""Tests of cltdr_jax.assignment: hand-computed cases and the thumos_small `label_points` targets."""

from __future__ import annotations

import functools

import jax
import numpy as np

from cltdr_jax.assignment import assign_targets, assign_targets_batch
from cltdr_jax.config import load_config
from cltdr_jax.points import make_points

C = 5


@functools.partial(jax.jit, static_argnums=(4, 5))
def _assign(points, segments, labels, valid, num_classes=C, radius=1.5):
    return assign_targets(points, segments, labels, valid, num_classes, radius)


def _points(length: int, stride: int = 1, lo: float = 0.0, hi: float = 100.0) -> np.ndarray:
    tau = np.arange(length, dtype=np.float32) * stride
    return np.stack([tau, np.full_like(tau, lo), np.full_like(tau, hi), np.full_like(tau, stride)], axis=1)


def _gt(segments, labels, pad_to: int | None = None):
    g = len(segments)
    pad_to = pad_to or g
    segs = np.zeros((pad_to, 2), np.float32)
    segs[:g] = segments
    labs = np.zeros(pad_to, np.int32)
    labs[:g] = labels
    return segs, labs, np.arange(pad_to) < g


def _positives(cls_targets) -> dict[int, list[int]]:
    cls_targets = np.asarray(cls_targets)
    return {int(n): list(np.flatnonzero(cls_targets[n])) for n in np.flatnonzero(cls_targets.sum(-1))}


# ---------------------------------------------------------------------------------------------------
# Hand-computed cases


def test_identical_segments_give_multi_hot_targets():
    # Centre 4, radius 1.5 * stride 1: inside iff 2.5 < tau < 5.5, so points 3, 4, 5.
    cls, reg = _assign(_points(10), *_gt([[2, 6], [2, 6]], [1, 3]))
    assert _positives(cls) == {3: [1, 3], 4: [1, 3], 5: [1, 3]}
    np.testing.assert_array_equal(np.asarray(reg)[3], [1, 3])


def test_near_ties_within_1e3_are_multi_hot():
    cls, _ = _assign(_points(10), *_gt([[2, 6.002], [2, 6.0005], [2, 6]], [0, 2, 4]))
    assert _positives(cls)[4] == [2, 4]  # 4.0005 <= 4 + 1e-3 joins, 4.002 does not


def test_shortest_segment_wins():
    # [3.5, 5] (length 1.5) holds only point 4 (strictly inside 3.5 < tau < 5); elsewhere [2, 6] wins.
    cls, reg = _assign(_points(10), *_gt([[2, 6], [3.5, 5]], [1, 2]))
    assert _positives(cls) == {3: [1], 4: [2], 5: [1]}
    np.testing.assert_array_equal(np.asarray(reg)[4], [0.5, 1.0])


def test_first_index_wins_equal_lengths_for_regression():
    # Both length 4 and both hold points 2 and 3: multi-hot there, regression from the first segment.
    cls, reg = _assign(_points(10), *_gt([[0, 4], [1, 5]], [0, 1]))
    assert _positives(cls) == {1: [0], 2: [0, 1], 3: [0, 1], 4: [1]}
    np.testing.assert_array_equal(np.asarray(reg)[2:4], [[2, 2], [3, 1]])
    _, reg = _assign(_points(10), *_gt([[1, 5], [0, 4]], [1, 0]))
    np.testing.assert_array_equal(np.asarray(reg)[2:4], [[1, 3], [2, 2]])


def test_centre_sampling_is_strict():
    # radius 1: centre region [3, 5] -> only tau = 4 (3 and 5 lie on the boundary).
    cls, _ = _assign(_points(10), *_gt([[0, 8]], [2]), C, 1.0)
    assert list(_positives(cls)) == [4]
    # A huge radius: the segment itself bounds the region; its ends (0 and 8) are excluded.
    cls, _ = _assign(_points(10), *_gt([[0, 8]], [2]), C, 100.0)
    assert list(_positives(cls)) == [1, 2, 3, 4, 5, 6, 7]


def test_regression_range_is_inclusive():
    segs = _gt([[0, 8]], [2])
    # max(left, right) at tau = 0..8 is 8 7 6 5 4 5 6 7 8.
    cls, _ = _assign(_points(10, lo=2, hi=4), *segs, C, 100.0)
    assert list(_positives(cls)) == [4]
    cls, _ = _assign(_points(10, lo=4, hi=6), *segs, C, 100.0)
    assert list(_positives(cls)) == [2, 3, 4, 5, 6]


def test_targets_are_divided_by_stride():
    # Stride 2, radius 1.5: centre 10, region 7 < tau < 13 -> tau 8, 10, 12.
    cls, reg = _assign(_points(10, stride=2), *_gt([[4, 16]], [0]))
    assert list(_positives(cls)) == [4, 5, 6]
    np.testing.assert_allclose(np.asarray(reg)[4:7], [[2, 4], [3, 3], [4, 2]])


def test_padded_rows_are_never_assigned():
    points = _points(10)
    segs, labels, valid = _gt([[2, 6]], [1], pad_to=3)
    segs[1:] = [[3.5, 5], [0, 9]]  # junk that would win (shorter) or tie if it counted
    labels[1:] = [4, 4]
    cls, reg = _assign(points, segs, labels, valid)
    ref_cls, ref_reg = _assign(points, *_gt([[2, 6]], [1]))
    np.testing.assert_array_equal(cls, ref_cls)
    np.testing.assert_array_equal(reg, ref_reg)


def test_no_ground_truth_gives_zeros():
    points = _points(10)
    empty = _gt(np.zeros((0, 2)), [])
    all_padding = (np.array([[2, 6], [3, 5]], np.float32), np.array([1, 2]), np.zeros(2, bool))
    for segs, labels, valid in (empty, all_padding):
        cls, reg = assign_targets(points, segs, labels, valid, C, 1.5)
        assert cls.shape == (10, C) and reg.shape == (10, 2)
        assert not np.asarray(cls).any() and not np.asarray(reg).any()


# ---------------------------------------------------------------------------------------------------
# Golden targets


def test_fixture_targets(thumos_small):
    root = thumos_small
    cfg = load_config(root / "config.yaml")
    ref = np.load(root / "reference_outputs.npz")
    points = np.concatenate(make_points(cfg.dataset.max_seq_len, cfg.strides, cfg.model.regression_range))
    batched = jax.jit(assign_targets_batch, static_argnums=(4, 5))
    g_max = 8  # pad every video's ground truth to a fixed count, as the trainer does
    for b in range(2):
        key = f"train/batch{b}/"
        batch = [
            _gt(ref[f"{key}v{i}/segments"], ref[f"{key}v{i}/labels"], pad_to=g_max)
            for i in range(len(ref[key + "video_ids"]))
        ]
        segs, labels, valid = (np.stack(x) for x in zip(*batch, strict=True))
        cls, reg = batched(points, segs, labels, valid, cfg.dataset.num_classes, cfg.train_cfg.center_sample_radius)
        cls, reg = np.asarray(cls), np.asarray(reg)
        np.testing.assert_array_equal(cls, ref[key + "gt_cls_labels"])
        pos = cls.sum(-1) > 0
        np.testing.assert_array_equal(reg[pos], ref[key + "gt_offsets"][pos])
        valid_points = np.concatenate([ref[f"{key}mask_L{level}"] for level in range(len(cfg.strides))], axis=1)
        assert (pos & valid_points).sum() == ref[key + "num_pos"]
    assert (ref["train/batch0/gt_cls_labels"].sum(-1) > 1).any()  # the multi-hot corner case is exercised
