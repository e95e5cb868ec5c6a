"""Training losses: refined and coarse classification plus DIoU regression (REFERENCE.md 6.3).

The reference keeps its loss normaliser as hidden module state; here it is an explicit argument and return
value, `loss_norm` (a float32 scalar, start it at `train_cfg.init_loss_norm`). Positive point-class pairs are
selected with masks, not boolean indexing, so every function jits with static shapes.
"""

from __future__ import annotations

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
    strides = [2**level for level in range(len(masks))]
    valid = jnp.concatenate(masks, axis=1)  # [B, N]
    cls_targets = cls_targets.astype(jnp.float32)
    num_classes = cls_targets.shape[-1]
    pos = valid & (jnp.sum(cls_targets, axis=-1) > 0)  # [B, N]
    # Positive pairs (b, n, c): class c of a positive point. The refined term finds them as the smoothed
    # target above eps / (C + 1), which is the same set.
    pairs = pos[..., None] & (cls_targets > 0)  # [B, N, C]
    num_pos = jnp.sum(pos)

    with jax.named_scope("trident_decode"):
        decoded = decode(outputs, strides, cfg_model.num_bins)
    coarse_offsets = jnp.stack([decoded.d_start, decoded.d_end], axis=-1)  # [B, N, C, 2]
    refined_offsets = jnp.stack([decoded.delta_start, decoded.delta_end], axis=-1)
    pair_target = jnp.broadcast_to(reg_targets[:, :, None, :], refined_offsets.shape)

    def pair_safe(offsets: Array) -> tuple[Array, Array]:
        # Non-pairs get a unit segment on both sides (IoU 1, DIoU 0) so that neither their values nor their
        # gradients can be NaN (targets of negative points may be negative).
        keep = pairs[..., None]
        return jnp.where(keep, offsets, 1.0), jnp.where(keep, pair_target, 1.0)

    # The reference updates its normaliser twice per step: each term divides by the value just updated.
    new_pos = jnp.maximum(num_pos, 1).astype(jnp.float32)
    norm_refined = NORM_MOMENTUM * jnp.asarray(loss_norm, jnp.float32) + (1 - NORM_MOMENTUM) * new_pos
    norm_coarse = NORM_MOMENTUM * norm_refined + (1 - NORM_MOMENTUM) * new_pos

    eps = cfg_train.label_smoothing
    smoothed = cls_targets * (1 - eps) + eps / (num_classes + 1)

    def term(logits: Array, offsets: Array, loss_type: str, iou_weighted: bool, norm: Array) -> tuple[Array, Array]:
        cls = _CLS_LOSSES[loss_type](logits, smoothed)
        pred, target = pair_safe(offsets)
        if iou_weighted:
            # NOT detached: the classification loss back-propagates into the regression outputs. Non-pairs
            # have IoU 1, i.e. weight 1.
            cls = cls * iou_weight(iou_1d(pred, target), cfg_model.iou_weight_power)
        cls_loss = jnp.sum(jnp.where(valid[..., None], cls, 0.0)) / norm
        reg_loss = jnp.sum(jnp.where(pairs, diou_loss_1d(pred, target), 0.0)) / norm
        return cls_loss, reg_loss

    refined_cls, refined_reg = term(
        jnp.concatenate(outputs["cls_logits"], axis=1),
        refined_offsets,
        cfg_train.refined_cls_loss,
        True,
        norm_refined,
    )
    coarse_cls, coarse_reg = term(
        jnp.concatenate(outputs["coarse_cls_logits"], axis=1),
        coarse_offsets,
        cfg_train.coarse_cls_loss,
        False,
        norm_coarse,
    )
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
