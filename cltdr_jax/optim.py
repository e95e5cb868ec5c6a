"""Optimisation as the reference does it (REFERENCE.md 7.3-7.6): AdamW with two parameter groups, a linear
warm-up + cosine schedule stepped per iteration, global-norm clipping, and an EMA of the weights."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from cltdr_jax.config import Config

# Parameter leaves that take weight decay: every convolution kernel and the GMG complex weights w1, w2.
# Biases, norm scales, the Trident scales and the layer-scale vectors do not (make_optimizer's split).
_DECAY_LEAVES = ("kernel", "w1", "w2", "convw_kernel", "fc_kernel", "mlp0_kernel", "mlp2_kernel")


def decay_mask(params: Any) -> Any:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] in _DECAY_LEAVES for path in flat})


def warmup_cosine(cfg: Config, steps_per_epoch: int) -> optax.Schedule:
    """lr of optimizer step s (0-based): eta * s / (W - 1) during warm-up (so step 0 uses lr 0, 12.21),
    eta at W, then eta_min + (eta - eta_min) (1 + cos(pi (s - W) / (S - W))) / 2 up to S."""
    o = cfg.opt
    eta, eta_min = o.learning_rate, o.eta_min
    warm = o.warmup_epochs * steps_per_epoch if o.warmup else 0
    total = (o.warmup_epochs + o.epochs) * steps_per_epoch if o.warmup else o.epochs * steps_per_epoch

    def schedule(step: jax.Array) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        warm_lr = eta * s / max(warm - 1, 1)
        span = max(total - warm, 1)
        progress = jnp.clip((s - warm) / span, 0.0, 1.0)
        cos_lr = eta_min + 0.5 * (eta - eta_min) * (1 + jnp.cos(math.pi * progress))
        return jnp.where(s < warm, warm_lr, cos_lr)

    return schedule


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6)) (optax's clip omits the eps)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: Config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = warmup_cosine(cfg, steps_per_epoch)
    parts = []
    if cfg.train_cfg.clip_grad_l2norm > 0:
        parts.append(clip_by_global_norm_like_torch(cfg.train_cfg.clip_grad_l2norm))
    # PyTorch AdamW: p <- p - lr * wd * p, then the Adam step (betas 0.9/0.999, eps 1e-8); optax's adamw
    # applies the same decoupled decay to the old parameters.
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.opt.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * params, every step from the start (no warm-up, no bias correction)."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
