"""Tests of cltdr_jax.points: hand-made cases and the thumos_small golden point tables."""

from __future__ import annotations

import numpy as np
import pytest

from cltdr_jax.points import PointBufferError, check_point_buffer, make_points, point_buffer_len, points_for_level

STRIDES = (1, 2, 4, 8, 16, 32)
RANGES = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000))


def test_points_for_level():
    points = points_for_level(5, 2, 4, (8, 16))
    assert points.dtype == np.float32
    np.testing.assert_array_equal(points[:, 0], [0, 4, 8, 12, 16])
    np.testing.assert_array_equal(points[:, 1:], np.tile([8, 16, 4], (5, 1)))
    with pytest.raises(ValueError, match="level 3"):
        points_for_level(5, 3, 8, (16, 8))
    assert [p.shape for p in make_points(64, (1, 2, 4), RANGES)] == [(64, 4), (32, 4), (16, 4)]


def test_point_buffer_limit():
    # thumos_small: 256 x 6.0 = 1536 positions at level 0, arange(0, 1536, s) at level l.
    assert [point_buffer_len(256, 6.0, s) for s in (1, 2, 32)] == [1536, 768, 48]
    assert point_buffer_len(100, 1.5, 32) == 5  # ceil(150 / 32): arange keeps the partial step
    check_point_buffer(1536, STRIDES, 256, 6.0)
    with pytest.raises(PointBufferError, match=r"'vid_7'.*length 1590.*1600.*1536") as err:
        check_point_buffer(1600, STRIDES, 256, 6.0, video_id="vid_7", input_len=1590)
    assert isinstance(err.value, ValueError)
    # The anet config's bug (12.9): max_seq_len 768, factor 1.0, a longer video padded to a multiple of 480.
    with pytest.raises(PointBufferError, match="extend_point_buffer"):
        check_point_buffer(960, (1, 2, 4, 8, 16, 32), 768, 1.0)
    check_point_buffer(960, (1, 2, 4, 8, 16, 32), 768, 1.0, extend=True)


def test_fixture_points(thumos_small):
    ref = np.load(thumos_small / "reference_outputs.npz")
    for v in ref["test/video_ids"]:
        padded = int(ref[f"test/{v}/padded_len"])
        check_point_buffer(padded, STRIDES, 256, 6.0, video_id=v)
        for level, points in enumerate(make_points(padded, STRIDES, RANGES)):
            np.testing.assert_array_equal(points, ref[f"test/{v}/points_L{level}"])
