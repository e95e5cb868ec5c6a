"""Candidates, seconds, class-agnostic NMS with voting, and external score fusion on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
from test_nms import brute_force_soft_nms

from cltdr_jax.config import TestConfig as InferenceConfig
from cltdr_jax.nms import batched_nms
from cltdr_jax.postprocess import Detections, fuse_external_scores, level_candidates, to_seconds


def test_level_candidates_threshold_topk_and_duration():
    scores = np.array([[0.5, 0.001], [0.9, 0.2], [0.3, 0.8]], np.float32)  # [T=3, C=2]
    left = np.array([[0, 0], [1, 0.99], [1, 2]], np.float32)
    right = np.array([[2, 2], [3, 1.0], [4, 5]], np.float32)
    cfg = InferenceConfig(pre_nms_thresh=0.001, pre_nms_topk=4, duration_thresh=0.05)
    c = level_candidates(scores, left, right, cfg)
    # 0.001 is not > thresh; top 4 of the rest by score: 0.9 (t1,c0), 0.8 (t2,c1), 0.5 (t0,c0), 0.3 (t2,c0);
    # none is shorter than 0.05, while (t1, c1) would be (length 0.01) but is not in the top 4 anyway.
    np.testing.assert_allclose(c.scores, [0.9, 0.8, 0.5, 0.3])
    np.testing.assert_array_equal(c.labels, [0, 1, 0, 0])
    np.testing.assert_allclose(c.segments, [[1, 3], [2, 5], [0, 2], [1, 4]])
    cfg = InferenceConfig(pre_nms_thresh=0.001, pre_nms_topk=10, duration_thresh=0.05)
    c = level_candidates(scores, left, right, cfg)
    assert 0.2 not in c.scores.tolist() and len(c) == 4  # the 0.01-long segment is dropped


def test_seconds_conversion_and_clipping():
    dets = Detections(np.array([[10.0, 20.0], [-5.0, 1000.0]], np.float32), np.ones(2, np.float32), np.zeros(2))
    out = to_seconds(dets, fps=30.0, feat_stride=4, num_frames=16, duration=50.0)
    np.testing.assert_allclose(out.segments[0], [(40 + 8) / 30, (80 + 8) / 30], rtol=1e-6)
    assert out.segments[1, 0] == 0.0 and math.copysign(1, out.segments[1, 0]) == -1  # -0.0, as the reference
    assert out.segments[1, 1] == 50.0


def test_class_agnostic_nms_with_box_voting():
    rng = np.random.default_rng(3)
    start = rng.uniform(0, 50, 60)
    segs = np.stack([start, start + rng.uniform(2, 10, 60)], 1).astype(np.float32)
    scores = rng.uniform(0.05, 1, 60).astype(np.float32)
    labels = np.zeros(60, int)
    out_segs, out_scores, _ = batched_nms(
        segs, scores, labels, sigma=0.7, min_score=0.01, max_num=20, multiclass=False, voting_thresh=0.75
    )
    kept = brute_force_soft_nms(segs, scores, 0.7, 0.01)[:20]
    np.testing.assert_allclose(out_scores, [s for _, s in kept], rtol=1e-5)
    for row, (i, _) in zip(out_segs, kept, strict=True):
        s, e = segs[i]
        inter = np.maximum(0, np.minimum(e, segs[:, 1]) - np.maximum(s, segs[:, 0]))
        iou = inter / ((e - s) + (segs[:, 1] - segs[:, 0]) - inter)
        w = (iou >= 0.75) * scores
        np.testing.assert_allclose(row, (w[:, None] * segs).sum(0) / w.sum(), rtol=1e-5)


def test_external_score_fusion():
    segs = np.arange(500, dtype=np.float32).reshape(250, 2)
    scores = np.linspace(1.0, 0.01, 250).astype(np.float32)
    dets = {"b": Detections(segs, scores, np.zeros(250, int)), "a": Detections(segs[:3], scores[:3], np.zeros(3))}
    ext = {"a": np.array([0.1, 0.7, 0.2]), "b": np.array([0.5, 0.1, 0.9])}
    fused = fuse_external_scores(dets, ext)
    assert list(fused) == ["a", "b"]  # videos in sorted order
    a = fused["a"]
    np.testing.assert_array_equal(a.labels, [1, 1, 1, 2, 2, 2])  # top-2 external classes, best first
    np.testing.assert_allclose(a.scores[:3], np.sqrt(0.7 * scores[:3]), rtol=1e-6)
    np.testing.assert_allclose(a.scores[3:], np.sqrt(0.2 * scores[:3]), rtol=1e-6)
    assert len(fused["b"]) == 400  # the top 200 detections, for each of the two classes
    np.testing.assert_array_equal(fused["b"].labels[:200], 2)
