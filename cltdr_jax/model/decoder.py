"""The CLTDR decoder: decoupled features (DCM, DRM), cross-layer fusion (CLFF), classification and refine heads.

The Trident head and its decoding live in `trident.py`.

REFERENCE.md 5.1-5.6. DCM, DRM and CLFF use plain convolutions with biases and no masking, and one
parameter set shared by all levels; the heads use masked convolutions, so their outputs are exactly 0 at
padded positions. Every head runs once on all levels packed along time (`PackedLevels`), not once per
level: the same arithmetic in a sixth of the operations, which is what small models are made of.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.model.layers import ChannelLayerNorm, Conv1D, Dtype, MaskedConv1D, Precision, UpConv, constant

Array = jax.Array


class DecoupledFusion(nn.Module):
    """DCM (`neighbours=("above",)`) or DRM (`("below",)`): enrich each level with a neighbouring level.

    attention (the reference): F_l = P_l + a * h with h = Up(P_{l+1}) or Down(P_{l-1}),
    a = sigmoid(W GAP(ReLU(h + Pw(P_l))) + b); the average pool runs over the full padded length.
    `add` and `concat` are the fusion ablations of the paper's Table 11; several neighbours are the
    pyramid-layer ablations of Table 9. Levels without the neighbour keep P_l.
    """

    neighbours: tuple[str, ...]
    fusion: str = "attention"
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, feats: list[Array]) -> list[Array]:
        d = feats[0].shape[-1]
        c = {"dtype": self.dtype, "precision": self.precision}
        up = UpConv(d, **c, name="contrans") if "above" in self.neighbours else None
        down = Conv1D(d, 3, stride=2, **c, name="down") if "below" in self.neighbours else None
        pointwise = Conv1D(d, 1, **c, name="conv_l") if self.fusion == "attention" else None
        attn = Conv1D(d, 1, **c, name="attn") if self.fusion == "attention" else None
        concat = Conv1D(d, 1, **c, name="concat_proj") if self.fusion == "concat" else None

        out = []
        for l, p in enumerate(feats):
            neighbours = []
            if up is not None and l + 1 < len(feats):
                neighbours.append(up(feats[l + 1]))
            if down is not None and l > 0:
                neighbours.append(down(feats[l - 1]))
            if not neighbours:
                out.append(p)
                continue
            if self.fusion == "attention":
                q = pointwise(p)
                fused = p
                for h in neighbours:
                    a = jax.nn.sigmoid(attn(jnp.mean(jax.nn.relu(h + q), axis=1, keepdims=True)))
                    fused = fused + a * h
            elif self.fusion == "add":
                fused = p
                for h in neighbours:
                    fused = fused + h
            else:
                fused = concat(jnp.concatenate([p, *neighbours], axis=-1))
            out.append(fused)
        return out


class CrossLevelFusion(nn.Module):
    """CLFF: F_l = (Up(P_{l+1}) + P_l) + Down(P_{l-1}), two-input versions at both ends (REFERENCE.md 5.4)."""

    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, feats: list[Array]) -> list[Array]:
        d = feats[0].shape[-1]
        up = UpConv(d, dtype=self.dtype, precision=self.precision, name="convtrans")
        down = Conv1D(d, 3, stride=2, dtype=self.dtype, precision=self.precision, name="conv")
        last = len(feats) - 1
        out = []
        for l, p in enumerate(feats):
            if l == 0:
                out.append(up(feats[1]) + p)
            elif l == last:
                out.append(p + down(feats[l - 1]))
            else:
                out.append((up(feats[l + 1]) + p) + down(feats[l - 1]))
        return out


class PackedLevels(NamedTuple):
    """Per-level maps laid end to end along time, `gap` zero rows between levels: a convolution with a
    kernel of up to 2 gap + 1 taps then reads zeros past each level's ends, exactly as on the level alone.

    `x` [B, N, C], `mask` [B, N] (False in the gaps), `level` [N] (numpy: each row's level, -1 in the gaps).
    """

    x: Array
    mask: Array
    level: np.ndarray
    gap: int

    @classmethod
    def pack(cls, feats: list[Array], masks: list[Array], gap: int) -> PackedLevels:
        xs, ms, levels = [], [], []
        for l, (f, m) in enumerate(zip(feats, masks, strict=True)):
            xs.append(f)
            ms.append(m)
            levels.append(np.full(f.shape[1], l))
            if l + 1 < len(feats) and gap:
                xs.append(jnp.zeros((f.shape[0], gap, f.shape[2]), f.dtype))
                ms.append(jnp.zeros((m.shape[0], gap), m.dtype))
                levels.append(np.full(gap, -1))
        return cls(jnp.concatenate(xs, axis=1), jnp.concatenate(ms, axis=1), np.concatenate(levels), gap)

    @property
    def in_level(self) -> np.ndarray:
        return self.level >= 0

    def per_row(self, values: list[Array]) -> Array:
        """One scalar per level -> `[N]`, each level's rows holding its value (the gaps: level 0's)."""
        return jnp.stack(values)[np.maximum(self.level, 0)]

    def unpack(self, y: Array) -> list[Array]:
        """`[B, N, ...]` -> the per-level list `[B, T_l, ...]`."""
        out, start = [], 0
        for t in np.bincount(self.level[self.in_level]):
            out.append(y[:, start : start + t])
            start += t + self.gap
        return out


class HeadTrunk(nn.Module):
    """`num_layers` x (masked conv without bias -> channel LayerNorm -> ReLU), on `PackedLevels`."""

    features: int
    kernel_size: int
    num_layers: int
    with_ln: bool = True
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, packed: PackedLevels) -> Array:
        x, mask = packed.x, packed.mask
        # LayerNorm turns the masked conv's zero rows into its bias: inside a level the next conv reads
        # that (as in the reference), in the gaps between levels it must read zeros.
        in_level = jnp.asarray(packed.in_level)[None, :, None]
        for j in range(self.num_layers):
            x = MaskedConv1D(
                self.features,
                self.kernel_size,
                use_bias=not self.with_ln,
                dtype=self.dtype,
                precision=self.precision,
                name=f"head_{j}",
            )(x, mask)
            if self.with_ln:
                x = ChannelLayerNorm(name=f"norm_{j}")(x)
            x = jnp.where(in_level, jax.nn.relu(x), 0)
        return x


def prior_bias(num_classes: int, prior: float, empty_classes: tuple[int, ...]) -> nn.initializers.Initializer:
    """Classifier bias init -log((1 - pi) / pi); empty classes get pi = 1e-6 (REFERENCE.md 5.5, 7.9)."""
    value = np.full(num_classes, -np.log((1 - prior) / prior), np.float32)
    for c in empty_classes:
        value[c] = -np.log((1 - 1e-6) / 1e-6)
    return lambda key, shape, dtype=jnp.float32: jnp.asarray(value, dtype)


class ClassifierHead(nn.Module):
    """Trunk + one masked conv to `num_classes` logits: the classification head (and, in `trident.py`, the
    Trident boundary heads, which the reference builds from the same class)."""

    head_dim: int
    num_classes: int
    kernel_size: int
    num_layers: int
    with_ln: bool
    prior_prob: float
    empty_classes: tuple[int, ...] = ()
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, feats: list[Array], masks: list[Array]) -> list[Array]:
        c = {"dtype": self.dtype, "precision": self.precision}
        trunk = HeadTrunk(self.head_dim, self.kernel_size, self.num_layers, self.with_ln, **c, name="trunk")
        final = MaskedConv1D(
            self.num_classes,
            self.kernel_size,
            bias_init=prior_bias(self.num_classes, self.prior_prob, self.empty_classes),
            **c,
            name="cls_head",
        )
        packed = PackedLevels.pack(feats, masks, self.kernel_size // 2)
        return packed.unpack(final(trunk(packed), packed.mask))


class RefineHead(nn.Module):
    """RefineHead on the CLFF features: per-class start / end shifts (kernel 7) and refine class logits.

    The reference also owns per-level `scale` scalars that its forward never uses; they are kept as
    parameters so that checkpoints round-trip.
    """

    head_dim: int
    num_classes: int
    kernel_size: int
    num_layers: int
    with_ln: bool
    num_levels: int
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, feats: list[Array], masks: list[Array]) -> tuple[list[Array], list[Array], list[Array]]:
        for l in range(self.num_levels):
            self.param(f"scale_{l}", constant(1.0), ())
        c = {"dtype": self.dtype, "precision": self.precision}
        trunk = HeadTrunk(self.head_dim, self.kernel_size, self.num_layers, self.with_ln, **c, name="trunk")
        offset_kernel = 7
        start = MaskedConv1D(self.num_classes, offset_kernel, **c, name="s_offset_head")
        end = MaskedConv1D(self.num_classes, offset_kernel, **c, name="e_offset_head")
        prob = MaskedConv1D(self.num_classes, self.kernel_size, **c, name="prob_head")
        packed = PackedLevels.pack(feats, masks, max(offset_kernel, self.kernel_size) // 2)
        h, m = trunk(packed), packed.mask
        return packed.unpack(start(h, m)), packed.unpack(end(h, m)), packed.unpack(prob(h, m))
