"""The GMG encoder: input embedding, optional position embedding, GMG pyramid and the identity neck.

REFERENCE.md 4.2-4.6. Padded positions are deliberately NOT re-masked: after the embedding they hold
ReLU(LayerNorm shift), and the FFT, GroupNorm and max-pool of later blocks see them, as in the reference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.config import ModelConfig
from cltdr_jax.model.gmg import GMGBlock
from cltdr_jax.model.layers import ChannelLayerNorm, Dtype, MaskedConv1D, Precision, rematerialized

Array = jax.Array


def sinusoid_table(length: int, dim: int) -> np.ndarray:
    """Absolute position embedding [length, dim]: float64 angles, cast to float32, divided by sqrt(dim)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    rate = np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)
    table = pos / rate
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return (table.astype(np.float32) / np.float32(np.sqrt(dim))).astype(np.float32)


def resample_linear(table: np.ndarray, length: int) -> np.ndarray:
    """torch F.interpolate(mode='linear', align_corners=False) along axis 0."""
    src_len = table.shape[0]
    if src_len == length:
        return table
    src = (np.arange(length, dtype=np.float64) + 0.5) * (src_len / length) - 0.5
    src = np.clip(src, 0, None)
    lo = np.minimum(np.floor(src).astype(int), src_len - 1)
    hi = np.minimum(lo + 1, src_len - 1)
    w = (src - lo)[:, None]
    return ((1 - w) * table[lo] + w * table[hi]).astype(np.float32)


class Encoder(nn.Module):
    """Features [B, T, D_in] and mask [B, T] -> pyramid of L (feature [B, T_l, D], mask [B, T_l]), after the neck.

    Returns (neck_features, backbone_features, masks), each a list over levels (0 = finest).
    """

    cfg: ModelConfig
    drop_path: float = 0.1
    dtype: Dtype = None
    precision: Precision = None
    remat: bool = False  # recompute each GMG block's activations in the backward pass (less memory)
    remat_policy: str = "nothing"

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool = True):
        compute = {"dtype": self.dtype, "precision": self.precision}
        # deterministic (argument 3, counting self) is a Python bool: static for the rematerialised block.
        block = rematerialized(GMGBlock, self.remat, self.remat_policy, static_argnums=(3,))
        m = self.cfg
        num_embd, num_stem, num_branch = m.backbone_arch
        d = m.embd_dim
        for j in range(num_embd):
            x = MaskedConv1D(d, m.embd_kernel_size, use_bias=not m.embd_with_ln, **compute, name=f"embd_{j}")(x, mask)
            if m.embd_with_ln:
                x = ChannelLayerNorm(name=f"embd_norm_{j}")(x)
            x = jax.nn.relu(x)

        if m.use_abs_pe:
            t = x.shape[1]
            table = sinusoid_table(m.max_seq_len, d)
            if t >= m.max_seq_len:
                table = resample_linear(table, t)
            x = x + jnp.asarray(table[:t], x.dtype) * mask[..., None].astype(x.dtype)

        for j in range(num_stem):
            x, mask = block(
                m.sgp_mlp_dim,
                stride=1,
                local_kernel=1,
                branches=m.gmg_branches,
                gate=m.gmg_gate,
                init_conv_std=m.init_conv_vars,
                **compute,
                name=f"stem_{j}",
            )(x, mask, deterministic)
        feats, masks = [x], [mask]
        for j in range(num_branch):
            x, mask = block(
                m.sgp_mlp_dim,
                stride=2,
                local_kernel=max(m.n_sgp_win_size, 1),
                layer_scale=self.drop_path > 0,
                drop_path=self.drop_path,
                branches=m.gmg_branches,
                gate=m.gmg_gate,
                init_conv_std=m.init_conv_vars,
                **compute,
                name=f"branch_{j}",
            )(x, mask, deterministic)
            feats.append(x)
            masks.append(mask)

        if m.fpn_with_ln:
            neck = [ChannelLayerNorm(name=f"fpn_norm_{l}")(f) for l, f in enumerate(feats)]
        else:
            neck = list(feats)
        return neck, feats, masks
