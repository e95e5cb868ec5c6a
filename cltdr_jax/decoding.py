"""Points and offset decoding: Trident distributions and refined offsets (REFERENCE.md 5.7, 5.8, 6.1).

All functions are pure and parameter-free. Per-level arrays are channels-last: boundary logits `[B, T, C]`,
centre-offset logits `[B, T, 2 (nb + 1)]` (start side first). Decoded distances are in units of the level's
stride ("level-grid units"). Decode each pyramid level on its own: the boundary windows must not cross levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.errors import CltdrError

Array = jax.Array


class PointBufferError(CltdrError, ValueError):
    """A video too long for the reference's point buffer (REFERENCE.md 12.9)."""


# ---------------------------------------------------------------------------------------------------
# Trident head (5.7)


def trident_distributions(
    start_logits: Array, end_logits: Array, reg_offsets: Array, num_bins: int
) -> tuple[Array, Array]:
    """Softmax distributions over the nb + 1 boundary bins of one pyramid level.

    Args:
      start_logits, end_logits: `[B, T, C]` boundary logits (zero at padded positions).
      reg_offsets: `[B, T, 2 (nb + 1)]` centre-offset logits, channels 0..nb the start side.
      num_bins: nb.

    Returns:
      `(p_start, p_end)`, each `[B, T, C, nb + 1]`. Bin k of `p_start` looks at time t - nb + k and weighs the
      distance nb - k; bin k of `p_end` looks at t + k and weighs the distance k.
    """
    nb = num_bins
    t = start_logits.shape[1]
    # Windows past either end of the *padded* level see a zero logit, not -inf (parity quirk).
    start = jnp.pad(start_logits, ((0, 0), (nb, 0), (0, 0)))
    end = jnp.pad(end_logits, ((0, 0), (0, nb), (0, 0)))
    start_win = jnp.stack([start[:, k : k + t] for k in range(nb + 1)], axis=-1)
    end_win = jnp.stack([end[:, k : k + t] for k in range(nb + 1)], axis=-1)
    # Centre-offset logits are class-agnostic: broadcast over C.
    centre_start = reg_offsets[:, :, None, : nb + 1]
    centre_end = reg_offsets[:, :, None, nb + 1 :]
    return jax.nn.softmax(start_win + centre_start, axis=-1), jax.nn.softmax(end_win + centre_end, axis=-1)


def trident_offsets(p_start: Array, p_end: Array) -> tuple[Array, Array]:
    """Expected boundary distances `(d_start, d_end)`, each `[B, T, C]`, in level-grid units, in [0, nb].

    `p_start`, `p_end`: `[B, T, C, nb + 1]` from `trident_distributions`.
    """
    nb = p_start.shape[-1] - 1
    # The reference's NaN guard uses the end distribution's mask for both sides (12.13); inert when finite.
    nan = jnp.isnan(p_end)
    p_start = jnp.where(nan, 0.0, p_start)
    p_end = jnp.where(nan, 0.0, p_end)
    # The reference takes a matrix product with the bin-distance vectors; its summation order is the BLAS
    # library's. A plain float32 reduction matched the fixture at least as closely and never runs at TF32.
    start_weights = jnp.arange(nb, -1, -1, dtype=p_start.dtype)
    end_weights = jnp.arange(nb + 1, dtype=p_end.dtype)
    return jnp.sum(p_start * start_weights, axis=-1), jnp.sum(p_end * end_weights, axis=-1)


# ---------------------------------------------------------------------------------------------------
# Refinement (5.8)


def refine_offsets(
    d_start: Array, d_end: Array, refine_start: Array, refine_end: Array, stride: int
) -> tuple[Array, Array]:
    """Refined distances `(delta_start, delta_end)`, each `[B, T, C]`, in level-grid units, clamped at 0.

    Args:
      d_start, d_end: `[B, T, C]` Trident distances of one level (level-grid units).
      refine_start, refine_end: `[B, T, C]` boundary shifts in *input*-grid units (not scaled by the stride).
      stride: the level's stride s.
    """
    t = d_start.shape[1]
    tau = (jnp.arange(t, dtype=jnp.float32) * stride)[None, :, None]
    # Same operation order as the reference: at large tau float32 rounding is about ulp(tau).
    left = tau - d_start * stride
    right = tau + d_end * stride
    left = left + refine_start
    right = right + refine_end
    delta_start = jnp.maximum(0.0, (tau - left) / stride)
    delta_end = jnp.maximum(0.0, (right - tau) / stride)
    return delta_start, delta_end


# ---------------------------------------------------------------------------------------------------
# Points (6.1)


def points_for_level(length: int, level: int, stride: int, regression_range: tuple[float, float]) -> np.ndarray:
    """Point table of one level: `[length, 4]` float32 rows (tau = i * stride, range_lo, range_hi, stride).

    `regression_range` is this level's (lo, hi) in input-grid units; `level` only names the level in errors.
    """
    lo, hi = regression_range
    if lo > hi:
        raise ValueError(f"level {level}: regression range ({lo}, {hi}) has lo > hi")
    points = np.zeros((length, 4), np.float32)
    points[:, 0] = np.arange(length) * stride  # left-aligned: no half-stride offset
    points[:, 1] = lo
    points[:, 2] = hi
    points[:, 3] = stride
    return points


def make_points(
    padded_len: int, strides: Sequence[int], regression_ranges: Sequence[tuple[float, float]]
) -> list[np.ndarray]:
    """Point tables of every level, `[T_l, 4]` with T_l = padded_len / s_l, finest level first."""
    return [points_for_level(padded_len // s, level, s, regression_ranges[level]) for level, s in enumerate(strides)]


def point_buffer_len(max_seq_len: int, max_buffer_len_factor: float, stride: int) -> int:
    """Rows of the reference's point buffer at a level: len(arange(0, max_seq_len * factor, stride))."""
    return max(0, math.ceil(max_seq_len * max_buffer_len_factor / stride))


def check_point_buffer(
    padded_len: int,
    strides: Sequence[int],
    max_seq_len: int,
    max_buffer_len_factor: float,
    *,
    video_id: str | None = None,
    input_len: int | None = None,
    extend: bool = False,
) -> None:
    """Raises `PointBufferError` where the reference would abort with "Reached max buffer length" (12.9).

    `extend=True` (config `model.extend_point_buffer`) skips the check: points are just arange(T_l) * s_l,
    so longer videos work, as a documented deviation from the reference.
    """
    if extend:
        return
    for level, s in enumerate(strides):
        need = padded_len // s
        have = point_buffer_len(max_seq_len, max_buffer_len_factor, s)
        if need > have:
            video = f"video {video_id!r}" if video_id is not None else "a video"
            length = f"length {input_len}, " if input_len is not None else ""
            raise PointBufferError(
                f"{video} ({length}padded to {padded_len} steps) needs {need} points at pyramid level "
                f"{level} (stride {s}) but the reference's point buffer holds {have} there (max_seq_len "
                f"{max_seq_len} x max_buffer_len_factor {max_buffer_len_factor}, enough for padded lengths "
                f"up to {have * s}). The reference aborts on such videos. Shorten the video, raise "
                "model.max_buffer_len_factor, or set model.extend_point_buffer: true (a deviation from the "
                "reference)."
            )
