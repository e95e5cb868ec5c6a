"""Points: the anchor of every pyramid position, and the reference's point-buffer limit (REFERENCE.md 6.1, 12.9).

Point `i` of level `l` sits at tau = i * s_l in input-grid units (left-aligned, no half-stride offset) and
regresses segments whose size lies in the level's regression range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cltdr_jax.errors import CltdrError


class PointBufferError(CltdrError, ValueError):
    """A video too long for the reference's point buffer (REFERENCE.md 12.9)."""


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
