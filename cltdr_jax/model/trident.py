"""The Trident head: boundary heads, centre-offset head and the one decoder (REFERENCE.md 5.7, 5.8).

    start, end, offsets = TridentHead(...)(fpn_feats, reg_feats, masks)     # per-level lists
    decoded = decode(outputs, strides, num_bins)                             # all levels at once

A boundary is predicted as a distribution over nb + 1 bins: bin k of the start side looks at the start
logit of time t - nb + k (distance nb - k), bin k of the end side at the end logit of t + k (distance k),
each plus a class-agnostic centre-offset logit. The expected distances are then shifted by the RefineHead.

The decoder works on all levels packed along time (`[B, N, C]`, N = sum_l T_l, finest level first), so
training and inference run the same few fusions, whatever the number of levels; a window that would leave
its level reads a zero logit, exactly as when each level is decoded on its own. It is plain jnp code
without loops, so reverse-mode differentiation goes through it (the losses train the heads through it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.model.decoder import ClassifierHead, HeadTrunk, PackedLevels
from cltdr_jax.model.layers import Dtype, MaskedConv1D, Precision, constant, one_after_another, rematerialized

Array = jax.Array


# ---------------------------------------------------------------------------------------------------
# The heads (5.7)


class CentreOffsetHead(nn.Module):
    """Centre-offset head: ReLU(kappa_l * conv(trunk(F^reg_l))), `[B, T_l, 2 (nb + 1)]` per level."""

    head_dim: int
    num_bins: int
    kernel_size: int
    num_layers: int
    with_ln: bool
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, feats: list[Array], masks: list[Array]) -> list[Array]:
        c = {"dtype": self.dtype, "precision": self.precision}
        trunk = HeadTrunk(self.head_dim, self.kernel_size, self.num_layers, self.with_ln, **c, name="trunk")
        final = MaskedConv1D(2 * (self.num_bins + 1), self.kernel_size, **c, name="offset_head")
        scales = [self.param(f"scale_{l}", constant(1.0), ()) for l in range(len(feats))]
        packed = PackedLevels.pack(feats, masks, self.kernel_size // 2)
        y = final(trunk(packed), packed.mask)
        return packed.unpack(jax.nn.relu(packed.per_row(scales)[None, :, None] * y))


class TridentHead(nn.Module):
    """Start and end boundary heads (per-class logits, like the classifier) and the centre-offset head.

    Returns per-level lists `(start_logits, end_logits [B, T_l, C], reg_offsets [B, T_l, 2 (nb + 1)])`.
    """

    head_dim: int
    num_classes: int
    num_bins: int
    kernel_size: int
    boundary_kernel_size: int
    num_layers: int
    with_ln: bool
    prior_prob: float
    empty_classes: tuple[int, ...] = ()
    dtype: Dtype = None
    precision: Precision = None
    # trainer.remat's `heads`: each of the three heads recomputed in the backward pass, one after another.
    remat: bool = False
    remat_policy: str = "nothing"

    @nn.compact
    def __call__(
        self, fpn_feats: list[Array], reg_feats: list[Array], masks: list[Array]
    ) -> tuple[list[Array], list[Array], list[Array]]:
        def boundary(name: str) -> ClassifierHead:
            return rematerialized(ClassifierHead, self.remat, self.remat_policy)(
                self.head_dim,
                self.num_classes,
                self.boundary_kernel_size,
                self.num_layers,
                self.with_ln,
                self.prior_prob,
                self.empty_classes,
                dtype=self.dtype,
                precision=self.precision,
                name=name,
            )

        # The boundary heads read the neck features with the gradient stopped (REFERENCE.md 12.14).
        detached = [jax.lax.stop_gradient(f) for f in fpn_feats]
        offsets = rematerialized(CentreOffsetHead, self.remat, self.remat_policy)(
            self.head_dim,
            self.num_bins,
            self.kernel_size,
            self.num_layers,
            self.with_ln,
            dtype=self.dtype,
            precision=self.precision,
            name="reg_head",
        )(reg_feats, masks)
        # Recomputed, the backward pass runs the end head, the start head, then the centre-offset head, each
        # once the input cotangent of the one before it exists (the cotangents of the boundary heads' inputs
        # are computed for this alone, then dropped by the stop_gradient: one convolution each).
        offsets, start_input = one_after_another(self.remat, offsets, detached)
        start = boundary("start_head")(start_input, masks)
        start, end_input = one_after_another(self.remat, start, detached)
        end = boundary("end_head")(end_input, masks)
        return start, end, offsets


# ---------------------------------------------------------------------------------------------------
# The decoder (5.7, 5.8)


class Decoded(NamedTuple):
    """Decoded boundaries of every point and class, packed over levels (`[B, N, C]` each; `[B, N, S]` for the
    classes `decode` was given).

    `d_start`, `d_end`: Trident distances (level-grid units, in [0, nb]); `delta_start`, `delta_end`: the
    refined ones (level-grid units, >= 0); `left`, `right`: the refined segment ends in input-grid units.
    """

    d_start: Array
    d_end: Array
    delta_start: Array
    delta_end: Array
    left: Array
    right: Array


class PackedRows(NamedTuple):
    """Per packed time row (`[N]` numpy): the level's stride, the index in the level, the steps left in it."""

    stride: np.ndarray
    local: np.ndarray
    left_in_level: np.ndarray


def packed_rows(lengths: Sequence[int], strides: Sequence[int]) -> PackedRows:
    return PackedRows(
        np.concatenate([np.full(t, s, np.float32) for t, s in zip(lengths, strides, strict=True)]),
        np.concatenate([np.arange(t) for t in lengths]),
        np.concatenate([np.arange(t, 0, -1) for t in lengths]),
    )


def _window_distributions(
    start_logits: Array,
    end_logits: Array,
    reg_offsets: Array,
    rows: PackedRows,
    num_bins: int,
    classes: Array | None = None,
) -> tuple[Array, Array]:
    """`boundary_distributions` with the bins on axis 1, `[B, nb + 1, N, C]`, as the decoder computes it:
    each bin's window is then a contiguous slab, which XLA's CPU backend stacks, reduces and differentiates
    faster than bins interleaved along the last axis (forward + backward at the demo's size: 9 -> 6 ms).
    With `classes` (`[B, N, S]`) only those classes of each point: `[B, nb + 1, N, S]`."""
    nb = num_bins
    n = start_logits.shape[1]
    # Bin k of row n reads padded row n + k of both sides.
    start = jnp.pad(start_logits, ((0, 0), (nb, 0), (0, 0)))
    end = jnp.pad(end_logits, ((0, 0), (0, nb), (0, 0)))
    local = jnp.asarray(rows.local)[None, :, None]
    left_in_level = jnp.asarray(rows.left_in_level)[None, :, None]
    # A window cell outside its level (or past the padded video) sees a zero logit, not -inf (parity quirk).
    if classes is None:
        start_win = jnp.stack([jnp.where(local >= nb - k, start[:, k : k + n], 0.0) for k in range(nb + 1)], 1)
        end_win = jnp.stack([jnp.where(left_in_level > k, end[:, k : k + n], 0.0) for k in range(nb + 1)], 1)
    else:
        # A gather of B (nb + 1) N S logits (and a scatter-add of as many in the backward pass) instead of
        # the C / S times larger windows of every class; along one axis per video, so that a batch sharded
        # over devices stays so.
        b, _, c = start.shape
        k = np.arange(nb + 1)[None, :, None, None]
        cell = (np.arange(n)[None, None, :, None] + k) * c + classes[:, None]  # [B, nb + 1, N, S]

        def windows(padded: Array) -> Array:
            flat = jnp.take_along_axis(padded.reshape(b, -1), cell.reshape(b, -1), axis=1)
            return flat.reshape(cell.shape)

        start_win = jnp.where(local[:, None] >= nb - k, windows(start), 0.0)
        end_win = jnp.where(left_in_level[:, None] > k, windows(end), 0.0)
    # Centre-offset logits are class-agnostic: broadcast over C.
    centre_start = jnp.swapaxes(reg_offsets[:, :, : nb + 1], 1, 2)[..., None]
    centre_end = jnp.swapaxes(reg_offsets[:, :, nb + 1 :], 1, 2)[..., None]
    return jax.nn.softmax(start_win + centre_start, axis=1), jax.nn.softmax(end_win + centre_end, axis=1)


def _expected_distances(p_start: Array, p_end: Array) -> tuple[Array, Array]:
    """`expected_distances` of `_window_distributions` (bins on axis 1)."""
    nb = p_start.shape[1] - 1
    # The reference's NaN guard uses the end distribution's mask for both sides (12.13); inert when finite.
    nan = jnp.isnan(p_end)
    p_start = jnp.where(nan, 0.0, p_start)
    p_end = jnp.where(nan, 0.0, p_end)
    # The reference takes a matrix product with the bin-distance vectors; its summation order is the BLAS
    # library's. A plain float32 reduction matched the fixture at least as closely and never runs at TF32.
    start_weights = jnp.arange(nb, -1, -1, dtype=p_start.dtype)[:, None, None]
    end_weights = jnp.arange(nb + 1, dtype=p_end.dtype)[:, None, None]
    return jnp.sum(p_start * start_weights, axis=1), jnp.sum(p_end * end_weights, axis=1)


def boundary_distributions(
    start_logits: Array, end_logits: Array, reg_offsets: Array, rows: PackedRows, num_bins: int
) -> tuple[Array, Array]:
    """Softmax distributions over the nb + 1 bins, `(p_start, p_end)`, each `[B, N, C, nb + 1]`.

    Args:
      start_logits, end_logits: `[B, N, C]` boundary logits, levels packed along time.
      reg_offsets: `[B, N, 2 (nb + 1)]` centre-offset logits, channels 0..nb the start side.
      rows: `packed_rows` of the level lengths.
    """
    p_start, p_end = _window_distributions(start_logits, end_logits, reg_offsets, rows, num_bins)
    return jnp.moveaxis(p_start, 1, -1), jnp.moveaxis(p_end, 1, -1)


def expected_distances(p_start: Array, p_end: Array) -> tuple[Array, Array]:
    """Expected boundary distances `(d_start, d_end)`, each `[B, N, C]`, from `boundary_distributions`."""
    return _expected_distances(jnp.moveaxis(p_start, -1, 1), jnp.moveaxis(p_end, -1, 1))


def decode(
    outputs: Mapping[str, Sequence[Array]], strides: Sequence[int], num_bins: int, classes: Array | None = None
) -> Decoded:
    """Trident distances and their refinement for every level, packed along time.

    `outputs`: the detector's per-level lists `start_logits`, `end_logits`, `refine_start`, `refine_end`
    `[B, T_l, C]` (the refine shifts in input-grid units) and `reg_offsets` `[B, T_l, 2 (nb + 1)]`.
    `classes`: optional `[B, N, S]` class indices; then only class `classes[b, n, s]` of point `n` is decoded,
    into slot `s` of `[B, N, S]` outputs (the losses need only the positive pairs), with the same values.
    """
    lengths = [x.shape[1] for x in outputs["start_logits"]]
    rows = packed_rows(lengths, strides)

    def packed(key: str) -> Array:
        return jnp.concatenate(list(outputs[key]), axis=1)

    def of_classes(x: Array) -> Array:
        return x if classes is None else jnp.take_along_axis(x, classes, axis=-1)

    p_start, p_end = _window_distributions(
        packed("start_logits"), packed("end_logits"), packed("reg_offsets"), rows, num_bins, classes
    )
    d_start, d_end = _expected_distances(p_start, p_end)
    s = jnp.asarray(rows.stride)[None, :, None]
    tau = jnp.asarray(rows.local.astype(np.float32) * rows.stride)[None, :, None]  # left-aligned points
    # Refinement in the reference's operation order: at large tau float32 rounding is about ulp(tau).
    left = tau - d_start * s
    right = tau + d_end * s
    left = left + of_classes(packed("refine_start"))
    right = right + of_classes(packed("refine_end"))
    delta_start = jnp.maximum(0.0, (tau - left) / s)
    delta_end = jnp.maximum(0.0, (right - tau) / s)
    return Decoded(d_start, d_end, delta_start, delta_end, tau - delta_start * s, tau + delta_end * s)


def scored_segments(
    outputs: Mapping[str, Sequence[Array]], strides: Sequence[int], num_bins: int
) -> tuple[Array, Array, Array]:
    """What inference keeps, packed over levels: `(scores, left, right)`, each `[B, N, C]`.

    scores = sigmoid(Z) * mask (0 at padded positions); left / right in input-grid units.
    """
    decoded = decode(outputs, strides, num_bins)
    mask = jnp.concatenate(list(outputs["masks"]), axis=1)[..., None]
    scores = jax.nn.sigmoid(jnp.concatenate(list(outputs["cls_logits"]), axis=1)) * mask
    return scores, decoded.left, decoded.right
