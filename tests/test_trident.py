"""Tests of cltdr_jax.model.trident's decoder: hand-made cases, a float64 numpy re-derivation, gradients and
the thumos_small golden distributions and decoded offsets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.model.trident import boundary_distributions, decode, expected_distances, packed_rows

NB = 16
STRIDES = (1, 2, 4, 8, 16, 32)


def _rel_err(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def _one_level(start, end, reg, nb):
    """Distributions and distances of a single level of stride 1."""
    rows = packed_rows([start.shape[1]], [1])
    p_start, p_end = boundary_distributions(jnp.asarray(start), jnp.asarray(end), jnp.asarray(reg), rows, nb)
    return p_start, p_end, *expected_distances(p_start, p_end)


def _outputs(start, end, reg, refine_start, refine_end, lengths):
    """Per-level output lists from packed arrays [B, N, ...]."""
    bounds = np.cumsum([0, *lengths])

    def split(x):
        return [jnp.asarray(x[:, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    return {
        "start_logits": split(start),
        "end_logits": split(end),
        "reg_offsets": split(reg),
        "refine_start": split(refine_start),
        "refine_end": split(refine_end),
    }


# ---------------------------------------------------------------------------------------------------
# Hand-made cases


def test_uniform_logits_give_mid_distance():
    z = np.zeros((1, 6, 2), np.float32)
    p_start, p_end, d_start, d_end = _one_level(z, z, np.zeros((1, 6, 2 * (4 + 1)), np.float32), 4)
    assert p_start.shape == p_end.shape == (1, 6, 2, 5)
    np.testing.assert_allclose(p_start, 0.2, rtol=1e-6)
    np.testing.assert_allclose(d_start, 2.0, rtol=1e-6)
    np.testing.assert_allclose(d_end, 2.0, rtol=1e-6)


def test_windows_look_back_and_forward():
    nb, t = 4, 12
    start = np.zeros((1, t, 1), np.float32)
    end = np.zeros((1, t, 1), np.float32)
    start[0, 5, 0] = 50.0  # seen by point 7 in bin k = 5 - 7 + nb = 2, i.e. distance nb - k = 2
    end[0, 10, 0] = 50.0  # seen by point 7 in bin k = 10 - 7 = 3, i.e. distance 3
    p_start, p_end, d_start, d_end = _one_level(start, end, np.zeros((1, t, 2 * (nb + 1)), np.float32), nb)
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
    z = np.zeros((1, t, 3), np.float32)
    _, _, d_start, d_end = _one_level(z, z, reg, nb)
    np.testing.assert_allclose(d_start, 2.0, atol=1e-5)
    np.testing.assert_allclose(d_end, 1.0, atol=1e-5)


def test_zero_logit_padding_outside_the_level():
    # Past both ends the window holds a zero logit (not -inf): with -5 inside, the outside bins win.
    nb, t = 3, 4
    x = np.full((1, t, 1), -5.0, np.float32)
    p_start, p_end, _, _ = _one_level(x, x, np.zeros((1, t, 2 * (nb + 1)), np.float32), nb)
    e0, e5 = np.exp(0.0), np.exp(-5.0)
    # Point 0: bins 0..2 are before t = 0, bin 3 is the point itself.
    np.testing.assert_allclose(p_start[0, 0, 0], np.array([e0, e0, e0, e5]) / (3 * e0 + e5), rtol=1e-6)
    # Last point: bin 0 is the point itself, bins 1..3 are past T - 1.
    np.testing.assert_allclose(p_end[0, t - 1, 0], np.array([e5, e0, e0, e0]) / (3 * e0 + e5), rtol=1e-6)


def test_windows_do_not_cross_levels():
    # Level 0 (4 steps) then level 1 (3 steps), packed: the last point of level 0 must not see level 1's
    # first start/end logits, and level 1's first point must not see level 0's last ones.
    nb = 2
    start = np.zeros((1, 7, 1), np.float32)
    end = np.zeros((1, 7, 1), np.float32)
    end[0, 4, 0] = 50.0  # level 1, t = 0: inside level 0's last window if windows leaked
    start[0, 3, 0] = 50.0  # level 0, t = 3: inside level 1's first window if windows leaked
    p_start, p_end = boundary_distributions(
        jnp.asarray(start), jnp.asarray(end), jnp.zeros((1, 7, 2 * (nb + 1))), packed_rows([4, 3], [1, 2]), nb
    )
    np.testing.assert_allclose(p_end[0, 3, 0], 1 / 3, rtol=1e-6)  # bins 1, 2 outside: zero logits
    np.testing.assert_allclose(p_start[0, 4, 0], 1 / 3, rtol=1e-6)


def test_refinement_shifts_in_input_grid_units_and_clamps():
    # One level of stride 4, uniform bins (d = nb / 2 = 1), shifts in input-grid units.
    stride, nb, t = 4, 2, 3
    z = np.zeros((1, t, 2), np.float32)
    shift = np.tile(np.array([2.0, 10.0], np.float32), (1, t, 1))
    out = _outputs(z, z, np.zeros((1, t, 2 * (nb + 1)), np.float32), shift, -shift, [t])
    decoded = decode(out, [stride], nb)
    # left = tau - 1 * 4 + 2 = tau - 2 -> 0.5; left = tau - 4 + 10 = tau + 6 -> clamped to 0.
    np.testing.assert_allclose(decoded.delta_start[0, :, 0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(decoded.delta_start[0, :, 1], 0.0)
    np.testing.assert_allclose(decoded.delta_end[0, :, 0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(decoded.delta_end[0, :, 1], 0.0)
    tau = np.arange(t) * stride
    np.testing.assert_allclose(decoded.left[0, :, 0], tau - 2.0, rtol=1e-6)
    np.testing.assert_allclose(decoded.right[0, :, 0], tau + 2.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# A float64 numpy re-derivation (REFERENCE.md 5.7, 5.8, 12.13), level by level and point by point


def _reference_decode(start, end, reg, refine_start, refine_end, lengths, strides, nb):
    """[B, N, C] inputs (levels packed) -> (d_start, d_end, delta_start, delta_end) [B, N, C], float64."""
    b, _, c = start.shape
    out = np.zeros((4, b, sum(lengths), c))
    offset = 0
    for t_l, s in zip(lengths, strides, strict=True):
        for i in range(b):
            for t in range(t_l):
                n = offset + t
                for k in range(c):
                    win_s = np.array(
                        [start[i, offset + t - nb + j, k] if t - nb + j >= 0 else 0.0 for j in range(nb + 1)]
                    )
                    win_e = np.array([end[i, offset + t + j, k] if t + j < t_l else 0.0 for j in range(nb + 1)])
                    with np.errstate(invalid="ignore", over="ignore"):
                        ls = win_s.astype(np.float64) + reg[i, n, : nb + 1]
                        le = win_e.astype(np.float64) + reg[i, n, nb + 1 :]
                        ps = np.exp(ls - ls.max()) / np.exp(ls - ls.max()).sum()
                        pe = np.exp(le - le.max()) / np.exp(le - le.max()).sum()
                    nan = np.isnan(pe)  # the end side's NaN mask guards both sides
                    ps, pe = np.where(nan, 0.0, ps), np.where(nan, 0.0, pe)
                    d_s = float(ps @ np.arange(nb, -1, -1))
                    d_e = float(pe @ np.arange(nb + 1))
                    tau = t * s
                    left = tau - d_s * s + refine_start[i, n, k]
                    right = tau + d_e * s + refine_end[i, n, k]
                    # np.maximum, like torch's clamp, keeps a NaN (Python's max would not)
                    out[:, i, n, k] = d_s, d_e, np.maximum(0.0, (tau - left) / s), np.maximum(0.0, (right - tau) / s)
        offset += t_l
    return out


def test_decode_matches_a_float64_rederivation_with_nan_and_inf():
    nb, c, lengths, strides = 3, 2, [9, 5, 3], [1, 2, 4]
    n = sum(lengths)
    rng = np.random.default_rng(0)
    start = rng.normal(0, 3, (2, n, c)).astype(np.float32)
    end = rng.normal(0, 3, (2, n, c)).astype(np.float32)
    reg = rng.normal(0, 2, (2, n, 2 * (nb + 1))).astype(np.float32)
    refine_start = rng.normal(0, 2, (2, n, c)).astype(np.float32)
    refine_end = rng.normal(0, 2, (2, n, c)).astype(np.float32)
    start[0, 2, 0] = np.nan  # poisons start windows of points 2..5 of level 0, class 0
    end[1, 10, 1] = np.inf  # level 1: an infinite end logit makes its windows' softmax NaN
    end[0, 15, 0] = -np.inf  # level 2: a -inf logit is just a zero-probability bin
    decoded = decode(_outputs(start, end, reg, refine_start, refine_end, lengths), strides, nb)
    ours = np.stack([np.asarray(x) for x in decoded[:4]])
    expected = _reference_decode(start, end, reg, refine_start, refine_end, lengths, strides, nb)
    # NaN where (and only where) the re-derivation has NaN: start-side NaNs the end mask does not cover.
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))
    assert np.isnan(expected).any()
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-5, atol=1e-5)
    # The +inf logit: its end distribution is NaN, so the guard zeroes both distances (12.13).
    assert ours[0, 1, 9, 1] == 0.0 and ours[1, 1, 9, 1] == 0.0


def test_decode_is_differentiable():
    """Reverse-mode gradients through the decoder equal central differences in float64."""
    nb, c, lengths, strides = 2, 2, [6, 3], [1, 2]
    n = sum(lengths)
    rng = np.random.default_rng(1)
    arrays = [rng.normal(0, 1, (1, n, c)) for _ in range(2)] + [rng.normal(0, 1, (1, n, 2 * (nb + 1)))]
    arrays += [rng.normal(0, 1, (1, n, c)) for _ in range(2)]
    weights = rng.normal(0, 1, (4, 1, n, c))

    def objective(start, end, reg, refine_start, refine_end):
        decoded = decode(_outputs(start, end, reg, refine_start, refine_end, lengths), strides, nb)
        return sum(jnp.sum(w * x) for w, x in zip(weights, decoded[:4], strict=True))

    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in arrays]
        grads = jax.grad(objective, argnums=(0, 1, 2, 3, 4))(*args)
        eps = 1e-6
        for which, grad in enumerate(grads):
            for idx in [(0, 0, 0), (0, 4, 1), (0, 7, 0)]:
                if which == 2:
                    idx = idx[:2] + (idx[2] + 3,)
                plus = [a for a in args]
                minus = [a for a in args]
                plus[which] = plus[which].at[idx].add(eps)
                minus[which] = minus[which].at[idx].add(-eps)
                numeric = (objective(*plus) - objective(*minus)) / (2 * eps)
                np.testing.assert_allclose(float(grad[idx]), float(numeric), rtol=1e-5, atol=1e-8)
        assert all(np.abs(np.asarray(g)).sum() > 0 for g in grads)


def test_decoding_chosen_classes_gives_those_classes_of_the_full_decode():
    """`decode(..., classes)` (what the losses use) equals the full decode at those classes, bit for bit,
    windows at level borders and points choosing one class twice included."""
    nb, c, lengths, strides = 3, 5, [9, 5, 3], [1, 2, 4]
    n = sum(lengths)
    rng = np.random.default_rng(2)
    start, end, refine_start, refine_end = (rng.normal(0, 3, (2, n, c)).astype(np.float32) for _ in range(4))
    reg = rng.normal(0, 2, (2, n, 2 * (nb + 1))).astype(np.float32)
    out = _outputs(start, end, reg, refine_start, refine_end, lengths)
    classes = rng.integers(0, c, (2, n, 2))
    classes[0, :4, 1] = classes[0, :4, 0]
    full = jax.jit(lambda o: decode(o, strides, nb))(out)
    chosen = jax.jit(lambda o, k: decode(o, strides, nb, k))(out, jnp.asarray(classes, jnp.int32))
    for name, all_classes, some in zip(full._fields, full, chosen, strict=True):
        assert some.shape == (2, n, 2), name
        np.testing.assert_array_equal(np.asarray(some), np.take_along_axis(np.asarray(all_classes), classes, -1))


# ---------------------------------------------------------------------------------------------------
# Golden outputs


# Relative to each array's largest magnitude. Refined offsets pass through tau = t * stride in float32: one
# ulp of tau (1.2e-4 for the longest video, tau < 1216) is 7.6e-6 of offsets near 16, so allow two ulps
# for a different fused-multiply-add choice of the compiler (measured: 7.7e-6 under jit, 3.8e-6 eagerly).
TOLERANCE = {"start_prob": 1e-5, "end_prob": 1e-5, "offsets": 2e-5}


@jax.jit
def _decode_fixture(outputs):
    rows = packed_rows([x.shape[1] for x in outputs["start_logits"]], STRIDES)
    packed = {k: jnp.concatenate(v, axis=1) for k, v in outputs.items()}
    p_start, p_end = boundary_distributions(
        packed["start_logits"], packed["end_logits"], packed["reg_offsets"], rows, NB
    )
    decoded = decode(outputs, STRIDES, NB)
    return p_start, p_end, jnp.stack([decoded.delta_start, decoded.delta_end], axis=-1)


def test_fixture_distributions_and_decoded_offsets(shared_dir):
    ref = np.load(shared_dir / "fixtures/thumos_small/reference_outputs.npz")
    worst = dict.fromkeys(TOLERANCE, 0.0)
    for v in ref["test/video_ids"]:
        padded = int(ref[f"test/{v}/padded_len"])
        names = ("start_logits", "end_logits", "reg_offsets", "refine_start", "refine_end")
        outputs = {
            name: [jnp.asarray(ref[f"test/{v}/{name}_L{l}"].T[None]) for l in range(len(STRIDES))] for name in names
        }
        p_start, p_end, delta = map(np.asarray, _decode_fixture(outputs))
        offset = 0
        for level, stride in enumerate(STRIDES):
            t_l = padded // stride
            rows = slice(offset, offset + t_l)
            offset += t_l
            key = f"test/{v}/{{}}_L{level}"
            pairs = (
                ("start_prob", p_start[0, rows].transpose(1, 0, 2), ref[key.format("trident_start_prob")]),
                ("end_prob", p_end[0, rows].transpose(1, 0, 2), ref[key.format("trident_end_prob")]),
                ("offsets", delta[0, rows].transpose(1, 0, 2), ref[key.format("decoded_offsets")]),
            )
            for name, actual, expected in pairs:
                err = _rel_err(actual, expected)
                worst[name] = max(worst[name], err)
                assert err <= TOLERANCE[name], (name, v, level, err)
    print("max relative error", worst)
