"""Training losses: refined and coarse classification plus DIoU regression (REFERENCE.md 6.3).

The reference keeps its loss normaliser as hidden module state; here it is an explicit argument and return
value, `loss_norm` (a float32 scalar, start it at `train_cfg.init_loss_norm`). Positive point-class pairs are
selected with masks, not boolean indexing, so every function jits with static shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from cltdr_jax.config import ModelConfig, TrainConfig
from cltdr_jax.model.trident import decode

Array = jax.Array

NORM_MOMENTUM = 0.9
IOU_EPS = 1e-8


# ---------------------------------------------------------------------------------------------------
# Element-wise losses


def _pow(x: Array, exponent: float) -> Array:
    # An integral exponent as repeated products (as torch does for 2.0), not exp(log(x) * 2).
    if float(exponent).is_integer():
        return x ** int(exponent)
    return x**exponent


def bce_with_logits(logits: Array, targets: Array) -> Array:
    """Element-wise binary cross-entropy on logits, in torch's stable form (1 - y) x - log sigmoid(x)."""
    return (1 - targets) * logits - jax.nn.log_sigmoid(logits)


def sigmoid_focal_loss(logits: Array, targets: Array, alpha: float = 0.25, gamma: float = 2.0) -> Array:
    """Element-wise sigmoid focal loss; `logits` and (soft) `targets` of any equal shape."""
    p = jax.nn.sigmoid(logits)
    ce = bce_with_logits(logits, targets)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * _pow(1 - p_t, gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def varifocal_loss(logits: Array, targets: Array, alpha: float = 0.25, gamma: float = 2.0) -> Array:
    """Element-wise varifocal loss: BCE weighted by the target where it is > 0, else by alpha |p - y|^gamma.

    The target is the (smoothed) label, not an IoU. No stop-gradient on p inside the weight (parity).
    """
    p = jax.nn.sigmoid(logits)
    weight = jnp.where(targets > 0, targets, alpha * _pow(jnp.abs(p - targets), gamma))
    return bce_with_logits(logits, targets) * weight


def iou_1d(pred: Array, target: Array) -> Array:
    """IoU of segments given as (left, right) distances from a shared anchor: `[..., 2]` -> `[...]`."""
    lp, rp = pred[..., 0], pred[..., 1]
    lg, rg = target[..., 0], target[..., 1]
    inter = jnp.minimum(lp, lg) + jnp.minimum(rp, rg)
    union = (lp + rp) + (lg + rg) - inter
    return inter / jnp.maximum(union, IOU_EPS)


def diou_loss_1d(pred: Array, target: Array) -> Array:
    """Distance-IoU loss 1 - IoU + (centre distance / enclosing length)^2: `[..., 2]` -> `[...]`."""
    lp, rp = pred[..., 0], pred[..., 1]
    lg, rg = target[..., 0], target[..., 1]
    enclosing = jnp.maximum(lp, lg) + jnp.maximum(rp, rg)
    rho = 0.5 * (rp - lp - rg + lg)
    return 1.0 - iou_1d(pred, target) + jnp.square(rho / jnp.maximum(enclosing, IOU_EPS))


def iou_weight(iou: Array, power: float) -> Array:
    """(1 - (1 - IoU))^power, as the reference forms it, with a finite gradient where it is 0.

    With a power between 0 and 1 (THUMOS: 0.2) the derivative at 0 is infinite: a positive pair whose
    prediction has collapsed (both refined offsets clamped to 0: IoU exactly 0) makes the reference's gradient
    NaN, and stopped a demo run at step 387 on one machine. Here the gradient there is 0; every value, and
    every other gradient, is the reference's.
    """
    w = 1 - (1 - iou)
    if not 0 < power < 1:
        return _pow(w, power)
    positive = w > 0
    return jnp.where(positive, _pow(jnp.where(positive, w, 1.0), power), jax.lax.stop_gradient(_pow(w, power)))


_CLS_LOSSES = {"focal": sigmoid_focal_loss, "varifocal": varifocal_loss}

# The regression outputs matter at the positive point-class pairs only (elsewhere they are replaced by a unit
# segment), so the losses decode just those: PAIR_SLOTS positive classes of every point per page, as many
# pages as the point with the most needs. One page almost always (a point has several positive classes only
# where ground truths of equal length overlap, like THUMOS14's CliffDiving and Diving, which coincide):
# [B, nb + 1, N, 2] windows instead of [B, nb + 1, N, C].
PAIR_SLOTS = 2

_DECODER_INPUTS = ("start_logits", "end_logits", "reg_offsets", "refine_start", "refine_end")


def _regression_page(
    heads: Mapping[str, Sequence[Array]], pairs: Array, reg_targets: Array, cfg_model: ModelConfig, page: Array
) -> tuple[Array, Array, Array]:
    """One page of the regression side of both terms: `(iou_weights [B, N, C], refined DIoU sum, coarse DIoU
    sum)` over the pairs whose class is the point's `page * PAIR_SLOTS + 1`-th to `(page + 1) * PAIR_SLOTS`-th
    positive one (in class order); the weights are 0 at every other point-class pair."""
    strides = [2**level for level in range(len(heads["start_logits"]))]
    rank = jnp.cumsum(pairs, axis=-1, dtype=jnp.int32)  # among the point's positive classes, from 1
    in_slot = pairs[..., None] & (rank[..., None] == page * PAIR_SLOTS + jnp.arange(1, PAIR_SLOTS + 1))
    kept = jnp.any(in_slot, axis=2)  # [B, N, S]; an empty slot decodes class 0, unused
    decoded = decode(heads, strides, cfg_model.num_bins, jnp.argmax(in_slot, axis=2))

    def pair_safe(offsets: Array) -> Array:
        # Empty slots get a unit segment on both sides (IoU 1, DIoU 0) so that neither their values nor their
        # gradients can be NaN (targets of negative points may be negative).
        return jnp.where(kept[..., None], offsets, 1.0)

    target = pair_safe(jnp.broadcast_to(reg_targets[:, :, None, :], (*kept.shape, 2)))
    refined = pair_safe(jnp.stack([decoded.delta_start, decoded.delta_end], axis=-1))
    coarse = pair_safe(jnp.stack([decoded.d_start, decoded.d_end], axis=-1))
    weights = iou_weight(iou_1d(refined, target), cfg_model.iou_weight_power)  # [B, N, S]
    refined_sum = jnp.sum(jnp.where(kept, diou_loss_1d(refined, target), 0.0))
    coarse_sum = jnp.sum(jnp.where(kept, diou_loss_1d(coarse, target), 0.0))
    return jnp.sum(jnp.where(in_slot, weights[:, :, None, :], 0.0), axis=-1), refined_sum, coarse_sum


def _pages(pairs: Array) -> Array:
    return (jnp.max(jnp.sum(pairs, axis=-1, dtype=jnp.int32)) + PAIR_SLOTS - 1) // PAIR_SLOTS


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _pair_regression(
    heads: dict[str, list[Array]], pairs: Array, reg_targets: Array, cfg_model: ModelConfig
) -> tuple[Array, Array, Array]:
    """`_regression_page` summed over the pages the batch needs: the IoU weights of every pair (0 where
    there is none) and both DIoU sums. The first page is plain differentiable code, which XLA schedules with
    the rest of the step (the refine heads' gradient, for one, is ready as soon as the IoU's is)."""
    first = _regression_page(heads, pairs, reg_targets, cfg_model, 0)
    return _add(first, _later_pages(heads, pairs, reg_targets, cfg_model))


# The later pages, in a loop whose trip count the batch decides (almost always none). Reverse-mode
# differentiation cannot go through such a loop (nor, cheaply, through a branch: the derivative of a
# `lax.cond` carries the residuals of both branches out of it), so its gradient is written here: the same
# loop, each page recomputing its forward inside its VJP.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _later_pages(
    heads: dict[str, list[Array]], pairs: Array, reg_targets: Array, cfg_model: ModelConfig
) -> tuple[Array, Array, Array]:
    def page_values(page):
        return _regression_page(heads, pairs, reg_targets, cfg_model, page)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(page_values, 1))
    return jax.lax.fori_loop(1, _pages(pairs), lambda page, total: _add(total, page_values(page)), zeros)


def _later_pages_fwd(heads, pairs, reg_targets, cfg_model):
    return _later_pages(heads, pairs, reg_targets, cfg_model), (heads, pairs, reg_targets)


def _later_pages_bwd(cfg_model, saved, cotangents):
    heads, pairs, reg_targets = saved

    def page_gradient(page, total):
        _, vjp = jax.vjp(lambda h: _regression_page(h, pairs, reg_targets, cfg_model, page), heads)
        return _add(total, vjp(cotangents)[0])

    grads = jax.lax.fori_loop(1, _pages(pairs), page_gradient, jax.tree.map(jnp.zeros_like, heads))
    return grads, None, None


_later_pages.defvjp(_later_pages_fwd, _later_pages_bwd)


# ---------------------------------------------------------------------------------------------------
# Detection losses


def detection_losses(
    outputs: Mapping[str, Sequence[Array]],
    cls_targets: Array,
    reg_targets: Array,
    masks: Sequence[Array],
    loss_norm: Array | float,
    cfg_train: TrainConfig,
    cfg_model: ModelConfig,
) -> tuple[dict[str, Array], Array]:
    """The reference's training loss: `refined_loss_weight` x refined + (1 - it) x coarse (REFERENCE.md 6.3).

    Args:
      outputs: per-level lists (finest first), channels-last: `cls_logits` (refined Z) and `coarse_cls_logits`
        `[B, T_l, C]`, `start_logits`, `end_logits`, `refine_start`, `refine_end` `[B, T_l, C]`, `reg_offsets`
        `[B, T_l, 2 (nb + 1)]`.
      cls_targets: `[B, N, C]` multi-hot, N = sum of T_l in level order (`assign_targets`).
      reg_targets: `[B, N, 2]` (left, right) / stride.
      masks: per-level `[B, T_l]` bool validity.
      loss_norm: the EMA normaliser before this step.
      cfg_train, cfg_model: loss switches and weights; strides are 2^l, one per level of `masks` (the config
        requires scale_factor 2). The IoU weight belongs to the refined term whichever classification loss
        `cfg_train.refined_cls_loss` picks; the coarse term never has it.

    Returns:
      `(losses, new_loss_norm)`. `losses` holds `final_loss` (the one to differentiate), `cls_loss`,
      `reg_loss`, both parts (`refined_*`, `coarse_*`), `num_pos` and the two normalisers used.
    """
    valid = jnp.concatenate(masks, axis=1)  # [B, N]
    cls_targets = cls_targets.astype(jnp.float32)
    num_classes = cls_targets.shape[-1]
    pos = valid & (jnp.sum(cls_targets, axis=-1) > 0)  # [B, N]
    # Positive pairs (b, n, c): class c of a positive point. The refined term finds them as the smoothed
    # target above eps / (C + 1), which is the same set.
    pairs = pos[..., None] & (cls_targets > 0)  # [B, N, C]
    num_pos = jnp.sum(pos)

    with jax.named_scope("trident_decode"):
        heads = {key: list(outputs[key]) for key in _DECODER_INPUTS}
        iou_weights, refined_reg_sum, coarse_reg_sum = _pair_regression(heads, pairs, reg_targets, cfg_model)
    iou_weights = jnp.where(pairs, iou_weights, 1.0)  # non-pairs: IoU 1, weight 1

    # The reference updates its normaliser twice per step: each term divides by the value just updated.
    new_pos = jnp.maximum(num_pos, 1).astype(jnp.float32)
    norm_refined = NORM_MOMENTUM * jnp.asarray(loss_norm, jnp.float32) + (1 - NORM_MOMENTUM) * new_pos
    norm_coarse = NORM_MOMENTUM * norm_refined + (1 - NORM_MOMENTUM) * new_pos

    eps = cfg_train.label_smoothing
    smoothed = cls_targets * (1 - eps) + eps / (num_classes + 1)

    def cls_loss(logits: Array, loss_type: str, weights: Array | None, norm: Array) -> Array:
        cls = _CLS_LOSSES[loss_type](logits, smoothed)
        if weights is not None:
            cls = cls * weights
        return jnp.sum(jnp.where(valid[..., None], cls, 0.0)) / norm

    # The IoU weight belongs to the refined term: NOT detached, so the classification loss back-propagates
    # into the regression outputs.
    refined_cls = cls_loss(
        jnp.concatenate(outputs["cls_logits"], axis=1), cfg_train.refined_cls_loss, iou_weights, norm_refined
    )
    coarse_cls = cls_loss(
        jnp.concatenate(outputs["coarse_cls_logits"], axis=1), cfg_train.coarse_cls_loss, None, norm_coarse
    )
    refined_reg = refined_reg_sum / norm_refined
    coarse_reg = coarse_reg_sum / norm_coarse
    refined_final = refined_cls + cfg_train.loss_weight * refined_reg
    coarse_final = coarse_cls + cfg_train.loss_weight * coarse_reg
    w = cfg_train.refined_loss_weight
    losses = {
        "cls_loss": w * refined_cls + (1 - w) * coarse_cls,
        "reg_loss": w * refined_reg + (1 - w) * coarse_reg,
        "final_loss": w * refined_final + (1 - w) * coarse_final,
        "refined_cls_loss": refined_cls,
        "refined_reg_loss": refined_reg,
        "refined_final_loss": refined_final,
        "coarse_cls_loss": coarse_cls,
        "coarse_reg_loss": coarse_reg,
        "coarse_final_loss": coarse_final,
        "num_pos": num_pos,
        "loss_norm_refined": norm_refined,
        "loss_norm_coarse": norm_coarse,
    }
    return losses, norm_coarse
