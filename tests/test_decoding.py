"""Tests of cltdr_jax.decoding: hand-made cases and the thumos_small golden outputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cltdr_jax.decoding import (
    PointBufferError,
    check_point_buffer,
    make_points,
    point_buffer_len,
    points_for_level,
    refine_offsets,
    trident_distributions,
    trident_offsets,
)

NB = 16
STRIDES = (1, 2, 4, 8, 16, 32)
RANGES = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000))


def _rel_err(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


# ---------------------------------------------------------------------------------------------------
# Hand-made cases


def test_uniform_logits_give_mid_distance():
    z = jnp.zeros((1, 6, 2))
    p_start, p_end = trident_distributions(z, z, jnp.zeros((1, 6, 2 * (4 + 1))), 4)
    assert p_start.shape == p_end.shape == (1, 6, 2, 5)
    np.testing.assert_allclose(p_start, 0.2, rtol=1e-6)
    d_start, d_end = trident_offsets(p_start, p_end)
    np.testing.assert_allclose(d_start, 2.0, rtol=1e-6)
    np.testing.assert_allclose(d_end, 2.0, rtol=1e-6)


def test_windows_look_back_and_forward():
    nb, t = 4, 12
    start = np.zeros((1, t, 1), np.float32)
    end = np.zeros((1, t, 1), np.float32)
    start[0, 5, 0] = 50.0  # seen by point 7 in bin k = 5 - 7 + nb = 2, i.e. distance nb - k = 2
    end[0, 10, 0] = 50.0  # seen by point 7 in bin k = 10 - 7 = 3, i.e. distance 3
    p_start, p_end = trident_distributions(start, end, jnp.zeros((1, t, 2 * (nb + 1))), nb)
    d_start, d_end = trident_offsets(p_start, p_end)
    assert float(p_start[0, 7, 0, 2]) > 0.999
    assert float(p_end[0, 7, 0, 3]) > 0.999
    np.testing.assert_allclose(d_start[0, 7, 0], 2.0, atol=1e-4)
    np.testing.assert_allclose(d_end[0, 7, 0], 3.0, atol=1e-4)
    # Point 5 sees its own start logit in the last bin (distance 0); point 11 sees nothing (zero logits).
    np.testing.assert_allclose(d_start[0, 5, 0], 0.0, atol=1e-4)
    np.testing.assert_allclose(p_start[0, 11, 0], 0.2, rtol=1e-6)


def test_centre_offsets_are_side_major_and_shared_by_classes():
    nb, t = 2, 3
    reg = np.zeros((1, t, 2 * (nb + 1)), np.float32)
    reg[..., 0] = 30.0  # start side, bin 0: distance nb
    reg[..., nb + 1 + 1] = 30.0  # end side, bin 1: distance 1
    z = jnp.zeros((1, t, 3))
    d_start, d_end = trident_offsets(*trident_distributions(z, z, reg, nb))
    np.testing.assert_allclose(d_start, 2.0, atol=1e-5)
    np.testing.assert_allclose(d_end, 1.0, atol=1e-5)


def test_zero_logit_padding_outside_the_level():
    # Past both ends the window holds a zero logit (not -inf): with -5 inside, the outside bins win.
    nb, t = 3, 4
    x = jnp.full((1, t, 1), -5.0)
    p_start, p_end = trident_distributions(x, x, jnp.zeros((1, t, 2 * (nb + 1))), nb)
    e0, e5 = np.exp(0.0), np.exp(-5.0)
    # Point 0: bins 0..2 are before t = 0, bin 3 is the point itself.
    np.testing.assert_allclose(p_start[0, 0, 0], np.array([e0, e0, e0, e5]) / (3 * e0 + e5), rtol=1e-6)
    # Last point: bin 0 is the point itself, bins 1..3 are past T - 1.
    np.testing.assert_allclose(p_end[0, t - 1, 0], np.array([e5, e0, e0, e0]) / (3 * e0 + e5), rtol=1e-6)


def test_refine_offsets_shift_in_input_grid_units_and_clamp():
    stride = 4
    d = jnp.full((1, 3, 2), 1.5)
    shift = jnp.array([[[2.0, 10.0], [2.0, 10.0], [2.0, 10.0]]])
    delta_start, delta_end = refine_offsets(d, d, shift, -shift, stride)
    # left = tau - 1.5 * 4 + 2 = tau - 4 -> 1; left = tau - 6 + 10 = tau + 4 -> clamped to 0.
    np.testing.assert_allclose(delta_start[0, :, 0], 1.0)
    np.testing.assert_allclose(delta_start[0, :, 1], 0.0)
    np.testing.assert_allclose(delta_end[0, :, 0], 1.0)
    np.testing.assert_allclose(delta_end[0, :, 1], 0.0)


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


# ---------------------------------------------------------------------------------------------------
# Golden outputs


@functools.partial(jax.jit, static_argnames="stride")
def _decode(start, end, reg, refine_start, refine_end, stride):
    p_start, p_end = trident_distributions(start, end, reg, NB)
    d_start, d_end = trident_offsets(p_start, p_end)
    delta = refine_offsets(d_start, d_end, refine_start, refine_end, stride)
    return p_start, p_end, jnp.stack(delta, axis=-1)


def _stack_padded(arrays: list[np.ndarray], length: int) -> np.ndarray:
    """[T_i, ch] arrays -> [n, length, ch], zero-padded at the end.

    Past T_l - 1 the end window sees a zero logit either way, so zero-padding every video of a level to the
    longest one leaves the outputs at t < T_l unchanged and needs one compilation per level.
    """
    out = np.zeros((len(arrays), length, arrays[0].shape[1]), np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


# Relative to each array's largest magnitude. Refined offsets pass through tau = t * stride in float32: one
# ulp of tau (1.2e-4 for the longest video, tau < 1216) is 7.6e-6 of offsets near 16, so allow two ulps
# for a different fused-multiply-add choice of the compiler (measured: 7.7e-6 under jit, 3.8e-6 eagerly).
TOLERANCE = {"start_prob": 1e-5, "end_prob": 1e-5, "offsets": 2e-5}


def test_fixture_trident_and_decoded_offsets(shared_dir):
    ref = np.load(shared_dir / "fixtures/thumos_small/reference_outputs.npz")
    vids = list(ref["test/video_ids"])
    padded = {v: int(ref[f"test/{v}/padded_len"]) for v in vids}
    t_max = max(padded.values())
    worst = {"start_prob": 0.0, "end_prob": 0.0, "offsets": 0.0}
    for level, stride in enumerate(STRIDES):
        inputs = [
            _stack_padded([ref[f"test/{v}/{name}_L{level}"].T for v in vids], t_max // stride)
            for name in ("start_logits", "end_logits", "reg_offsets", "refine_start", "refine_end")
        ]
        p_start, p_end, delta = map(np.asarray, _decode(*inputs, stride=stride))
        for i, v in enumerate(vids):
            t_l = padded[v] // stride
            key = f"test/{v}/{{}}_L{level}"
            pairs = (
                ("start_prob", p_start[i, :t_l].transpose(1, 0, 2), ref[key.format("trident_start_prob")]),
                ("end_prob", p_end[i, :t_l].transpose(1, 0, 2), ref[key.format("trident_end_prob")]),
                ("offsets", delta[i, :t_l].transpose(1, 0, 2), ref[key.format("decoded_offsets")]),
            )
            for name, actual, expected in pairs:
                err = _rel_err(actual, expected)
                worst[name] = max(worst[name], err)
                assert err <= TOLERANCE[name], (name, v, level, err)
    print("max relative error", worst)


def test_fixture_points(thumos_small):
    ref = np.load(thumos_small / "reference_outputs.npz")
    for v in ref["test/video_ids"]:
        padded = int(ref[f"test/{v}/padded_len"])
        check_point_buffer(padded, STRIDES, 256, 6.0, video_id=v)
        for level, points in enumerate(make_points(padded, STRIDES, RANGES)):
            np.testing.assert_array_equal(points, ref[f"test/{v}/points_L{level}"])
