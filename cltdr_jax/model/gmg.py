"""The GMG block (Global-local-instant Multi-Granularity; the reference's `SGPBlock`, REFERENCE.md 4.4).

What the reference code computes (and its checkpoints were trained with), which differs from the paper:
no ReLU in the gates, a depth-wise instant branch, and a data-dependent complex filter on the rFFT.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cltdr_jax.model.layers import (
    ChannelLayerNorm,
    Dtype,
    GroupNorm,
    Precision,
    cast,
    constant,
    dense,
    downsample_mask,
    gelu,
    max_pool_k3s2,
    torch_uniform,
)

Array = jax.Array
SOFTSHRINK_LAMBDA = 1e-3


def softshrink(v: Array, lam: float = SOFTSHRINK_LAMBDA) -> Array:
    return jnp.where(v > lam, v - lam, jnp.where(v < -lam, v + lam, jnp.zeros_like(v)))


def complex_affine(re: Array, im: Array, w: Array, b: Array) -> tuple[Array, Array]:
    """(w_r + i w_i)(re + i im) + (b_r + i b_i), per channel; w, b are [2, ...] (real row, imaginary row),
    each row broadcast against re and im."""
    return re * w[0] - im * w[1] + b[0], im * w[0] + re * w[1] + b[1]


def global_branch(o: Array, w1: Array, b1: Array, w2: Array, b2: Array) -> Array:
    """FFT global branch over the whole (padded) length. o [B, T, D] float32 -> [B, T, D].

    The filter is a per-channel two-layer complex MLP applied to the spectrum itself (ReLU on the real and
    imaginary parts separately, softshrink at the end), so it adapts to the input rather than being a
    learned per-frequency table.

    With the batch split over devices (`cltdr train` on several), each device transforms its own videos:
    XLA's partitioner does not split an FFT along its batch axis, it gathers the whole batch onto every
    device and transforms all of it there (on XLA's CPU backend the gathered operand could also reach
    the FFT in a layout the FFT rejects, a crash under `trainer.remat`).
    """
    sharding = jax.typeof(o).sharding
    batch_axes = sharding.spec[0] if isinstance(sharding, NamedSharding) and len(sharding.spec) else None
    if batch_axes is None:
        return _global_branch(o, w1, b1, w2, b2)
    per_video, shared = P(batch_axes), P()
    return jax.shard_map(
        _global_branch, mesh=sharding.mesh, in_specs=(per_video, shared, shared, shared, shared), out_specs=per_video
    )(o, w1, b1, w2, b2)


def _global_branch(o: Array, w1: Array, b1: Array, w2: Array, b2: Array) -> Array:
    """`global_branch` on one device. Computed as [B, D, T], the layout XLA's FFT works in: in [B, T, D]
    every elementwise step on the spectrum re-reads it through a transpose (measured 2.5x slower, forward +
    backward, on the CPU)."""
    t = o.shape[1]
    spec = jnp.fft.rfft(jnp.swapaxes(o, 1, 2), axis=-1, norm="ortho")
    re, im = jnp.real(spec), jnp.imag(spec)
    w1, b1, w2, b2 = (w[..., None] for w in (w1, b1, w2, b2))  # [2, D, 1]: per channel, along frequencies
    h_re, h_im = complex_affine(re, im, w1, b1)
    h_re, h_im = complex_affine(jax.nn.relu(h_re), jax.nn.relu(h_im), w2, b2)
    filt = jax.lax.complex(softshrink(h_re), softshrink(h_im))
    return jnp.swapaxes(jnp.fft.irfft(filt * spec, n=t, axis=-1, norm="ortho"), 1, 2)


def depthwise_conv(x: Array, kernel: Array, bias: Array) -> Array:
    """Depth-wise conv with zero padding K//2. x [B, T, D], kernel [K, D], bias [D]."""
    k = kernel.shape[0]
    if k == 1:
        return x * kernel[0] + bias
    pad = k // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
    t = x.shape[1]
    out = sum(xp[:, j : j + t] * kernel[j] for j in range(k))
    return out + bias


class DropPath(nn.Module):
    """Stochastic depth per sample, scaled by 1/keep (inactive when deterministic or rate is 0)."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        u = jax.random.uniform(self.make_rng("droppath"), (x.shape[0],) + (1,) * (x.ndim - 1))
        return x / keep * jnp.floor(keep + u).astype(x.dtype)


class GMGBlock(nn.Module):
    """One GMG block. x [B, T, D], mask [B, T] -> ([B, T/stride, D], [B, T/stride]).

    Attributes:
      stride: 1 (stem) or 2 (pyramid branch: max-pool downsampling first).
      local_kernel: kernel of the depth-wise local branch (1 in the stem, `n_sgp_win_size` in branches).
      layer_scale: branch blocks own per-channel scales gamma1/gamma2 (init 1e-4) and use drop path.
      branches / gate: ablation switches (Tables 6 and 7); the defaults are the reference model.
    """

    hidden_dim: int
    stride: int = 1
    local_kernel: int = 1
    layer_scale: bool = False
    drop_path: float = 0.0
    init_conv_std: float = 0.0
    branches: tuple[str, ...] = ("instant", "local", "global")
    gate: bool = True
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool = True) -> tuple[Array, Array]:
        x = cast(x, self.dtype)
        d = x.shape[-1]
        if self.stride == 2:
            x, mask = max_pool_k3s2(x), downsample_mask(mask)
        o = ChannelLayerNorm(name="ln")(x)

        normal = nn.initializers.normal(0.02)
        conv_init = nn.initializers.normal(self.init_conv_std) if self.init_conv_std > 0 else nn.initializers.zeros
        # Branch outputs in the reference's order; with the gate each one multiplies the previous one,
        # so u = o + G + V*G + U*V*G. Without the gate (ablation) they are summed.
        features = []
        if "global" in self.branches:
            w1 = self.param("w1", normal, (2, d))
            b1 = self.param("b1", normal, (2, d))
            w2 = self.param("w2", normal, (2, d))
            b2 = self.param("b2", normal, (2, d))
            # The FFT always runs in float32 (the reference disables autocast on this block).
            features.append(global_branch(o.astype(jnp.float32), w1, b1, w2, b2).astype(o.dtype))
        if "local" in self.branches:
            convw = self.param("convw_kernel", conv_init, (self.local_kernel, d))
            convw_b = self.param("convw_bias", nn.initializers.zeros, (d,))
            features.append(depthwise_conv(o, convw.astype(o.dtype), convw_b.astype(o.dtype)))
        if "instant" in self.branches:
            fc = self.param("fc_kernel", conv_init, (d,))
            fc_b = self.param("fc_bias", nn.initializers.zeros, (d,))
            features.append(o * fc.astype(o.dtype) + fc_b.astype(o.dtype))

        u = o
        gated = None
        for feature in features:
            gated = feature if (gated is None or not self.gate) else feature * gated
            u = u + gated

        residual = x * mask[..., None].astype(x.dtype)
        if self.layer_scale:
            gamma1 = self.param("gamma1", constant(1e-4), (d,))
            y = residual + DropPath(self.drop_path)(gamma1.astype(u.dtype) * u, deterministic)
        else:
            y = residual + u

        h = GroupNorm(16, name="gn")(y)
        mlp0 = self.param("mlp0_kernel", torch_uniform(d), (d, self.hidden_dim))
        mlp0_b = self.param("mlp0_bias", nn.initializers.zeros, (self.hidden_dim,))
        mlp2 = self.param("mlp2_kernel", torch_uniform(self.hidden_dim), (self.hidden_dim, d))
        mlp2_b = self.param("mlp2_bias", nn.initializers.zeros, (d,))
        p = self.precision
        h = dense(gelu(dense(h, mlp0, p) + mlp0_b.astype(h.dtype)), mlp2, p) + mlp2_b.astype(h.dtype)
        if self.layer_scale:
            gamma2 = self.param("gamma2", constant(1e-4), (d,))
            z = y + DropPath(self.drop_path)(gamma2.astype(h.dtype) * h, deterministic)
        else:
            z = y + h
        return z, mask
