"""Tests of cltdr_jax.losses: values by hand, a float64 numpy re-derivation, gradients, golden losses."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cltdr_jax import losses as losses_module
from cltdr_jax.assignment import assign_targets_batch
from cltdr_jax.config import ModelConfig, TrainConfig, load_config
from cltdr_jax.losses import (
    detection_losses,
    diou_loss_1d,
    iou_1d,
    iou_weight,
    sigmoid_focal_loss,
    varifocal_loss,
)
from cltdr_jax.points import make_points

LOG2 = math.log(2.0)
_losses = jax.jit(detection_losses, static_argnums=(5, 6))


# ---------------------------------------------------------------------------------------------------
# Element-wise losses by hand


def test_sigmoid_focal_loss_by_hand():
    x = jnp.array([0.0, 0.0, 2.0, 100.0, -100.0])
    y = jnp.array([1.0, 0.0, 0.5, 0.0, 1.0])
    p2 = 1 / (1 + math.exp(-2))
    ce2 = (1 - 0.5) * 2 + math.log1p(math.exp(-2))  # (1 - y) x - log sigmoid(x)
    pt2 = p2 * 0.5 + (1 - p2) * 0.5
    expected = [
        0.25 * LOG2 * 0.5**2,  # alpha_t 0.25, p_t 0.5
        0.75 * LOG2 * 0.5**2,
        (0.25 * 0.5 + 0.75 * 0.5) * ce2 * (1 - pt2) ** 2,
        0.75 * 100.0,  # confidently wrong: p_t = 0, BCE = 100, no overflow
        0.25 * 100.0,
    ]
    np.testing.assert_allclose(sigmoid_focal_loss(x, y), expected, rtol=1e-6)


def test_varifocal_loss_by_hand():
    x = jnp.array([0.0, 0.0, 2.0, -1.0])
    y = jnp.array([1.0, 0.0, 0.5, 0.0])
    pm1 = 1 / (1 + math.exp(1))
    expected = [
        1.0 * LOG2,  # positive: weight = target
        0.25 * 0.5**2 * LOG2,  # negative: weight = 0.25 |p - y|^2
        0.5 * (1.0 + math.log1p(math.exp(-2))),
        0.25 * pm1**2 * math.log1p(math.exp(-1)),
    ]
    np.testing.assert_allclose(varifocal_loss(x, y), expected, rtol=1e-6)


def test_iou_and_diou_by_hand():
    pred = jnp.array([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0], [2.0, 3.0]])
    target = jnp.array([[1.0, 3.0], [2.0, 0.0], [0.0, 0.0], [2.0, 3.0]])
    # Row 0: inter 1 + 1 = 2, union 2 + 4 - 2 = 4; enclosing 1 + 3 = 4, rho = 0.5 (1 - 1 - 3 + 1) = -1.
    # Row 1: disjoint sides: inter 0, union 4; enclosing 4, rho = 0.5 (2 - 0 - 0 + 2) = 2.
    # Row 2: empty segments: union clamped to 1e-8, IoU 0, rho 0. Row 3: identical.
    np.testing.assert_allclose(iou_1d(pred, target), [0.5, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(diou_loss_1d(pred, target), [0.5 + 0.0625, 1.25, 1.0, 0.0])
    assert iou_1d(pred[None], target[None]).shape == (1, 4)


# ---------------------------------------------------------------------------------------------------
# A small synthetic batch and a float64 re-derivation in the reference's style (boolean indexing)

NB = 4
STRIDES = (1, 2, 4)
RANGES = ((0, 4), (4, 8), (8, 10000))
C = 3


def _synthetic_batch(seed: int = 0, three_labels: bool = False):
    """Two videos, three levels. The segment [2, 7] of video 0 carries labels 0 and 2 (two positive classes
    at its points); with `three_labels`, a third copy carries label 1: more classes than the loss's slots."""
    rng = np.random.default_rng(seed)
    b, t0 = 2, 16
    lengths = [16, 11]
    masks = []
    for s in STRIDES:
        t = np.arange(t0 // s) * s
        masks.append(np.stack([t < n for n in lengths]))

    def level_arrays(ch, positive=False):
        arrays = []
        for m in masks:
            x = rng.normal(size=(b, m.shape[1], ch)).astype(np.float32)
            arrays.append((np.abs(x) if positive else x) * m[..., None])  # heads are zero at padding
        return arrays

    coarse = level_arrays(C)
    prob = level_arrays(C)
    outputs = {
        "coarse_cls_logits": coarse,
        "cls_logits": [a * p for a, p in zip(coarse, prob, strict=True)],
        "start_logits": level_arrays(C),
        "end_logits": level_arrays(C),
        "reg_offsets": level_arrays(2 * (NB + 1), positive=True),
        "refine_start": [0.5 * x for x in level_arrays(C)],
        "refine_end": [0.5 * x for x in level_arrays(C)],
    }
    points = np.concatenate(make_points(t0, STRIDES, RANGES))
    segments = np.array([[[2, 7], [2, 7], [9, 15]], [[1, 4.5], [3, 10], [0, 0]]], np.float32)
    labels = np.array([[0, 2, 1], [1, 0, 0]], np.int32)
    if three_labels:
        segments[0, 2] = segments[0, 0]
    valid = np.array([[True, True, True], [True, True, False]])
    cls_targets, reg_targets = assign_targets_batch(points, segments, labels, valid, C, 1.5)
    return outputs, np.asarray(cls_targets), np.asarray(reg_targets), masks


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _decode64(outputs, level, stride):
    start, end = (
        outputs["start_logits"][level].astype(np.float64),
        outputs["end_logits"][level].astype(np.float64),
    )
    reg = outputs["reg_offsets"][level].astype(np.float64)
    b, t, c = start.shape
    start_win, end_win = np.zeros((b, t, c, NB + 1)), np.zeros((b, t, c, NB + 1))
    for i in range(t):
        for k in range(NB + 1):
            if i - NB + k >= 0:
                start_win[:, i, :, k] = start[:, i - NB + k]
            if i + k < t:
                end_win[:, i, :, k] = end[:, i + k]
    d_start = _softmax(start_win + reg[:, :, None, : NB + 1]) @ np.arange(NB, -1, -1)
    d_end = _softmax(end_win + reg[:, :, None, NB + 1 :]) @ np.arange(NB + 1)
    tau = (np.arange(t) * stride)[None, :, None]
    delta_start = np.maximum(0, (tau - (tau - d_start * stride + outputs["refine_start"][level])) / stride)
    delta_end = np.maximum(0, ((tau + d_end * stride + outputs["refine_end"][level]) - tau) / stride)
    return np.stack([d_start, d_end], -1), np.stack([delta_start, delta_end], -1)


def _np_cls_loss(kind, x, y):
    p = 1 / (1 + np.exp(-x))
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    if kind == "varifocal":
        return bce * np.where(y > 0, y, 0.25 * np.abs(p - y) ** 2)
    p_t = p * y + (1 - p) * (1 - y)
    return (0.25 * y + 0.75 * (1 - y)) * bce * (1 - p_t) ** 2


def _np_iou_diou(pred, target):
    lp, rp, lg, rg = pred[:, 0], pred[:, 1], target[:, 0], target[:, 1]
    inter = np.minimum(lp, lg) + np.minimum(rp, rg)
    iou = inter / np.maximum(lp + rp + lg + rg - inter, 1e-8)
    rho = 0.5 * (rp - lp - rg + lg)
    return iou, 1 - iou + (rho / np.maximum(np.maximum(lp, lg) + np.maximum(rp, rg), 1e-8)) ** 2


def _np_detection_losses(outputs, cls_targets, reg_targets, masks, norm, train: TrainConfig, power: float):
    decoded = [_decode64(outputs, level, s) for level, s in enumerate(STRIDES)]
    coarse_off = np.concatenate([d[0] for d in decoded], axis=1)
    refined_off = np.concatenate([d[1] for d in decoded], axis=1)
    valid = np.concatenate(masks, axis=1)
    pos = valid & (cls_targets.sum(-1) > 0)
    num_pos = int(pos.sum())
    # Pairs in row-major (b, n) order, then ascending class, as the reference enumerates them.
    pair_rows = np.nonzero(cls_targets[pos])
    gt = reg_targets[pos][pair_rows[0]].astype(np.float64)
    eps = train.label_smoothing
    target = cls_targets[valid] * (1 - eps) + eps / (C + 1)
    result = {}
    for name, logits, offsets, kind in (
        ("refined", "cls_logits", refined_off, train.refined_cls_loss),
        ("coarse", "coarse_cls_logits", coarse_off, train.coarse_cls_loss),
    ):
        norm = 0.9 * norm + 0.1 * max(num_pos, 1)
        x = np.concatenate(outputs[logits], axis=1)[valid].astype(np.float64)
        cls = _np_cls_loss(kind, x, target)
        iou, diou = _np_iou_diou(offsets[pos][pair_rows], gt)
        if name == "refined":
            cls[target > eps / (C + 1)] *= (1 - (1 - iou)) ** power
        result[f"{name}_cls_loss"] = cls.sum() / norm
        result[f"{name}_reg_loss"] = diou.sum() / norm if num_pos else 0.0
        result[f"loss_norm_{name}"] = norm
    w = train.refined_loss_weight
    for key in ("cls", "reg"):
        result[f"{key}_loss"] = w * result[f"refined_{key}_loss"] + (1 - w) * result[f"coarse_{key}_loss"]
    result["final_loss"] = result["cls_loss"] + train.loss_weight * result["reg_loss"]
    result["num_pos"] = num_pos
    return result


# The default losses without smoothing, and both switches flipped with smoothing (every target > 0); a batch
# whose points have at most two positive classes (decoded in slots), and one with three (every class decoded).
@pytest.mark.parametrize("three_labels", [False, True])
@pytest.mark.parametrize("smoothing, refined, coarse", [(0.0, "varifocal", "focal"), (0.1, "focal", "varifocal")])
def test_matches_float64_rederivation(smoothing, refined, coarse, three_labels):
    outputs, cls_targets, reg_targets, masks = _synthetic_batch(three_labels=three_labels)
    assert cls_targets.sum(-1).max() == (3 if three_labels else 2)
    train = TrainConfig(label_smoothing=smoothing, refined_cls_loss=refined, coarse_cls_loss=coarse)
    model = ModelConfig(num_bins=NB, iou_weight_power=0.2)
    losses, new_norm = _losses(outputs, cls_targets, reg_targets, masks, 50.0, train, model)
    expected = _np_detection_losses(outputs, cls_targets, reg_targets, masks, 50.0, train, 0.2)
    assert expected["num_pos"] > 5
    for key, value in expected.items():
        np.testing.assert_allclose(float(losses[key]), value, rtol=2e-6, err_msg=key)
    assert float(new_norm) == float(losses["loss_norm_coarse"])


def test_no_positives_gives_zero_regression_loss():
    outputs, cls_targets, reg_targets, masks = _synthetic_batch()
    losses, new_norm = _losses(
        outputs,
        np.zeros_like(cls_targets),
        reg_targets,
        masks,
        100.0,
        TrainConfig(),
        ModelConfig(num_bins=NB),
    )
    assert float(losses["reg_loss"]) == 0.0 and float(losses["num_pos"]) == 0
    np.testing.assert_allclose(float(new_norm), 0.9 * (0.9 * 100 + 0.1) + 0.1, rtol=1e-6)
    assert float(losses["cls_loss"]) > 0


def test_gradients_are_finite_and_the_iou_weight_reaches_the_regression_outputs():
    outputs, cls_targets, reg_targets, masks = _synthetic_batch()
    # Negative points carry negative regression targets: they must not poison the gradient.
    assert (reg_targets < 0).any()

    @functools.partial(jax.jit, static_argnums=1)
    def grads(out, power):
        """Gradients of (final_loss, refined_cls_loss) with respect to every head output."""
        model = ModelConfig(num_bins=NB, iou_weight_power=power)

        def f(out):
            losses = detection_losses(out, cls_targets, reg_targets, masks, 100.0, TrainConfig(), model)[0]
            return jnp.stack([losses["final_loss"], losses["refined_cls_loss"]])

        return jax.jacrev(f)(out)

    final = jax.tree.map(lambda g: g[0], grads(outputs, 0.2))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(final))
    # The refined classification loss alone reaches the regression outputs only through the IoU weight.
    coupled = jax.tree.map(lambda g: g[1], grads(outputs, 0.2))
    uncoupled = jax.tree.map(lambda g: g[1], grads(outputs, 0.0))  # weight IoU^0 = 1: no path
    for name in ("refine_start", "refine_end", "reg_offsets", "start_logits", "end_logits"):
        assert any(bool((g != 0).any()) for g in coupled[name]), name
        assert all(not bool((g != 0).any()) for g in uncoupled[name]), name


@pytest.mark.parametrize("three_labels", [False, True])
def test_gradients_equal_finite_differences_in_float64(three_labels):
    """The losses' custom VJP (the decoder on each point's positive classes, or on every class when a point
    has more than the slots): directional derivatives against central differences, in float64."""
    outputs, cls_targets, reg_targets, masks = _synthetic_batch(three_labels=three_labels)
    model = ModelConfig(num_bins=NB, iou_weight_power=0.2)

    def final_loss(out):
        return detection_losses(out, cls_targets, reg_targets, masks, 100.0, TrainConfig(), model)[0]["final_loss"]

    rng = np.random.default_rng(3)
    eps = 1e-6
    with jax.enable_x64(True):
        out64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), outputs)
        grads = jax.jit(jax.grad(final_loss))(out64)
        for key in ("start_logits", "end_logits", "reg_offsets", "refine_start", "cls_logits"):
            direction = jax.tree.map(lambda x: jnp.zeros_like(x), out64)
            direction[key] = [jnp.asarray(rng.normal(size=x.shape)) * (x != 0) for x in out64[key]]
            plus = jax.tree.map(lambda x, d: x + eps * d, out64, direction)
            minus = jax.tree.map(lambda x, d: x - eps * d, out64, direction)
            numeric = (float(final_loss(plus)) - float(final_loss(minus))) / (2 * eps)
            analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grads[key], direction[key], strict=True))
            assert analytic != 0.0, key
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("three_labels", [False, True])
def test_any_number_of_pages_gives_the_same_losses_and_gradients(monkeypatch, three_labels):
    """The positive pairs decoded 2 classes per page (1 or 2 pages here), 1 per page (2 or 3 pages) or all 3
    classes in one page: the same losses and gradients within float32 rounding."""
    outputs, cls_targets, reg_targets, masks = _synthetic_batch(three_labels=three_labels)
    model = ModelConfig(num_bins=NB, iou_weight_power=0.2)

    def losses_and_grads(slots):
        monkeypatch.setattr(losses_module, "PAIR_SLOTS", slots)

        def f(out):
            losses = detection_losses(out, cls_targets, reg_targets, masks, 100.0, TrainConfig(), model)[0]
            return losses["final_loss"], losses

        return jax.jit(jax.grad(f, has_aux=True))(outputs)

    default_grads, default_losses = losses_and_grads(2)
    for slots in (1, 3):
        grads, losses = losses_and_grads(slots)
        for key, value in default_losses.items():
            np.testing.assert_allclose(float(losses[key]), float(value), rtol=1e-6, err_msg=f"{slots}: {key}")
        for (path, expected), actual in zip(
            jax.tree_util.tree_leaves_with_path(default_grads), jax.tree.leaves(grads), strict=True
        ):
            scale = float(np.abs(expected).max()) or 1.0
            np.testing.assert_allclose(
                np.asarray(actual), np.asarray(expected), rtol=0, atol=1e-6 * scale, err_msg=f"{slots}: {path}"
            )


def test_iou_weight_has_the_reference_values_and_a_finite_gradient_at_zero_iou():
    """(1 - (1 - IoU))^p: at IoU 0 with 0 < p < 1 the derivative is infinite (the reference's gradient NaN);
    ours is 0 there, and the reference's value and derivative p IoU^(p - 1) everywhere else."""
    iou = jnp.array([0.0, 0.25, 1.0])
    for power in (0.2, 0.25):
        np.testing.assert_allclose(iou_weight(iou, power), [0.0, 0.25**power, 1.0], rtol=1e-6)
        grad = jax.vmap(jax.grad(lambda x, p=power: iou_weight(x, p)))(iou)
        np.testing.assert_allclose(grad, [0.0, power * 0.25 ** (power - 1), power], rtol=1e-5)
        assert not np.isfinite(jax.grad(lambda x, p=power: x**p)(0.0))  # the unguarded power
    # Powers without the singularity keep the plain power and its gradient (power 1 at IoU 0: slope 1).
    np.testing.assert_allclose(jax.vmap(jax.grad(lambda x: iou_weight(x, 1.0)))(iou), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(iou_weight(iou, 0.0), [1.0, 1.0, 1.0])


def test_a_collapsed_positive_prediction_keeps_the_gradient_finite():
    """A positive pair whose refined offsets are both clamped to 0 (IoU exactly 0) at iou_weight_power 0.2."""
    outputs, cls_targets, reg_targets, masks = _synthetic_batch()
    pos = np.argwhere(np.asarray(cls_targets[0, : outputs["refine_start"][0].shape[1]]) > 0)[0]
    t, c = int(pos[0]), int(pos[1])
    # refine shifts far beyond the expected distances: left > tau and right < tau, both deltas clamp to 0
    outputs = dict(outputs)
    for key, shift in (("refine_start", 1e3), ("refine_end", -1e3)):
        level0 = np.array(outputs[key][0])
        level0[0, t, c] = shift
        outputs[key] = [level0, *outputs[key][1:]]
    model = ModelConfig(num_bins=NB, iou_weight_power=0.2)

    def final_loss(out):
        return detection_losses(out, cls_targets, reg_targets, masks, 100.0, TrainConfig(), model)[0]["final_loss"]

    grads = jax.jit(jax.grad(final_loss))(outputs)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------------------------
# Golden losses

_FIXTURE_KEYS = {
    "cls_loss": "cls_loss",
    "reg_loss": "reg_loss",
    "final_loss": "final_loss",
    "refined_cls_loss": "refined/cls_loss",
    "refined_reg_loss": "refined/reg_loss",
    "refined_final_loss": "refined/final_loss",
    "coarse_cls_loss": "coarse/cls_loss",
    "coarse_reg_loss": "coarse/reg_loss",
    "coarse_final_loss": "coarse/final_loss",
    "loss_norm_refined": "loss_normalizer_after_refined",
    "loss_norm_coarse": "loss_normalizer_after_coarse",
    "num_pos": "num_pos",
}


@pytest.mark.parametrize("targets", ["fixture", "assign_targets"])
def test_fixture_losses(thumos_small, targets):
    root = thumos_small
    cfg = load_config(root / "config.yaml")
    ref = np.load(root / "reference_outputs.npz")
    levels = range(len(cfg.strides))
    points = np.concatenate(make_points(cfg.dataset.max_seq_len, cfg.strides, cfg.model.regression_range))
    worst = 0.0
    for b in range(2):
        key = f"train/batch{b}/"

        def level_list(name, key=key):
            return [ref[f"{key}{name}_L{level}"].transpose(0, 2, 1) for level in levels]

        coarse, prob = level_list("cls_head_logits"), level_list("refine_prob_logits")
        outputs = {
            "cls_logits": [a * p for a, p in zip(coarse, prob, strict=True)],
            "coarse_cls_logits": coarse,
            **{n: level_list(n) for n in ("start_logits", "end_logits", "reg_offsets", "refine_start", "refine_end")},
        }
        masks = [ref[f"{key}mask_L{level}"] for level in levels]
        if targets == "fixture":
            cls_targets, reg_targets = ref[key + "gt_cls_labels"], ref[key + "gt_offsets"]
        else:
            g = 8
            segs, labels = np.zeros((2, g, 2), np.float32), np.zeros((2, g), np.int32)
            valid = np.zeros((2, g), bool)
            for i in range(2):
                n = len(ref[f"{key}v{i}/labels"])
                segs[i, :n], labels[i, :n], valid[i, :n] = (
                    ref[f"{key}v{i}/segments"],
                    ref[f"{key}v{i}/labels"],
                    True,
                )
            cls_targets, reg_targets = assign_targets_batch(
                points, segs, labels, valid, cfg.dataset.num_classes, cfg.train_cfg.center_sample_radius
            )
        norm = float(ref[key + "loss_normalizer_init"])
        assert norm == cfg.train_cfg.init_loss_norm
        losses, new_norm = _losses(outputs, cls_targets, reg_targets, masks, norm, cfg.train_cfg, cfg.model)
        for ours, theirs in _FIXTURE_KEYS.items():
            expected = float(ref[key + theirs])
            err = abs(float(losses[ours]) - expected) / abs(expected)
            worst = max(worst, err)
            assert err <= 1e-5, (b, ours, float(losses[ours]), expected)
        assert float(new_norm) == float(losses["loss_norm_coarse"])
    print("max relative error", worst)
