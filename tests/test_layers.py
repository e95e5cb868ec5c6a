"""Primitive layers against explicit float64 numpy formulas, and the ablation switches of the model."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cltdr_jax.config import config_from_dict
from cltdr_jax.errors import CltdrError
from cltdr_jax.model import layers
from cltdr_jax.model.detector import CLTDRGMG
from cltdr_jax.model.gmg import GMGBlock, softshrink
from cltdr_jax.model.layers import ChannelLayerNorm, GroupNorm, UpConv, max_pool_k3s2

RNG = np.random.default_rng(0)


def test_transposed_conv_matches_the_explicit_formula():
    """REFERENCE.md 5.1: y[2j] = b + U[:,:,1]^T x[j]; y[2j+1] = b + U[:,:,2]^T x[j] + U[:,:,0]^T x[j+1]."""
    x = RNG.standard_normal((2, 5, 3)).astype(np.float32)
    layer = UpConv(4)
    params = layer.init(jax.random.key(0), x)["params"]
    y = np.asarray(layer.apply({"params": params}, x), np.float64)
    u = np.asarray(params["kernel"], np.float64).transpose(1, 2, 0)  # back to torch [in, out, 3]
    b = np.asarray(params["bias"], np.float64)
    xp = np.concatenate([x, np.zeros_like(x[:, :1])], axis=1).astype(np.float64)
    for j in range(5):
        np.testing.assert_allclose(y[:, 2 * j], b + xp[:, j] @ u[:, :, 1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            y[:, 2 * j + 1], b + xp[:, j] @ u[:, :, 2] + xp[:, j + 1] @ u[:, :, 0], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transposed_conv_gradients_match_a_float64_adjoint(dtype):
    """The gradients of sum(y * cot) for y of the formula above; in bfloat16 of the rounded inputs, input
    gradient to bfloat16 rounding, parameters' to float32 rounding."""
    x = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    cot = RNG.standard_normal((2, 12, 5)).astype(np.float32)
    layer = UpConv(5, dtype=jnp.dtype(dtype))
    params = layer.init(jax.random.key(1), x)["params"]

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x).astype(jnp.float32) * cot)

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x, dtype))
    low = dtype == "bfloat16"
    k = np.asarray(params["kernel"], np.float32)
    x64, k64, cot64 = ((_bf16(a) if low else a).astype(np.float64) for a in (x, k, cot))
    even, odd = cot64[:, 0::2], cot64[:, 1::2]
    odd_before = np.concatenate([np.zeros_like(odd[:, :1]), odd[:, :-1]], axis=1)  # cot[2j - 1]
    gx64 = even @ k64[1].T + odd @ k64[2].T + odd_before @ k64[0].T
    x_next = np.concatenate([x64[:, 1:], np.zeros_like(x64[:, :1])], axis=1)
    gk64 = np.stack(
        [np.einsum("bti,bto->io", x_next, odd), np.einsum("bti,bto->io", x64, even), np.einsum("bti,bto->io", x64, odd)]
    )
    tol = 2e-2 if low else 1e-5
    np.testing.assert_allclose(np.asarray(gx, np.float32), gx64, rtol=tol, atol=tol * np.abs(gx64).max())
    np.testing.assert_allclose(gp["kernel"], gk64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gp["bias"], cot64.sum((0, 1)), rtol=1e-5, atol=1e-5)


def _correlate64(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """Zero-padded (K//2) 1-D correlation in float64: y[t] = sum_j x[stride t + j - K//2] @ kernel[j]."""
    k, pad = kernel.shape[0], kernel.shape[0] // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (0, 0)))
    t_out = (x.shape[1] + stride - 1) // stride
    return np.stack(
        [sum(xp[:, stride * t + j] @ kernel[j].astype(np.float64) for j in range(k)) for t in range(t_out)], axis=1
    )


CONV_CASES = [
    (3, 64, 64, 1, "im2col"),  # the demo's heads
    (7, 32, 20, 1, "im2col"),
    (3, 256, 20, 1, "narrow"),  # the THUMOS heads' last layers (512 -> 20)
    (7, 256, 20, 1, "narrow"),
    (3, 128, 128, 1, "xla"),  # bfloat16: one matmul per tap (_tap_conv1d), its own gradient
    (5, 96, 80, 1, "xla"),
    (3, 64, 64, 2, "xla"),  # stride 2: the decoder's down-sampling
]


def _bf16(a: np.ndarray) -> np.ndarray:
    """a rounded to bfloat16 (back in float32)."""
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("forms", ["auto", "xla"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("k", "c_in", "c_out", "stride", "path"), CONV_CASES)
def test_conv1d_paths_match_a_float64_correlation(k, c_in, c_out, stride, path, dtype, forms, monkeypatch):
    """Each way conv1d computes a convolution (chosen by shape and dtype on the CPU; `forms="xla"`: XLA's
    convolution throughout, as on a GPU) gives the correlation and its gradients. In bfloat16: of the
    bfloat16-rounded inputs and incoming gradient, accumulated in float32 (the rewritten forms give the
    kernel's gradient to float32 rounding; XLA's bfloat16 convolution rounds it to bfloat16; the output and
    the input's gradient to bfloat16 rounding)."""
    monkeypatch.setenv(layers.CONV_FORMS_ENV, forms)
    called = []
    for name in ("_im2col_conv1d", "_narrow_conv1d", "_tap_conv1d"):
        original = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, _f=original, _n=name: called.append(_n) or _f(*a))
    x = RNG.standard_normal((2, 11, c_in)).astype(np.float32)
    kernel = (RNG.standard_normal((k, c_in, c_out)) / np.sqrt(k * c_in)).astype(np.float32)
    cot = RNG.standard_normal((2, (11 + stride - 1) // stride, c_out)).astype(np.float32)
    low = dtype == "bfloat16"
    x_in = jnp.asarray(x, dtype)

    def loss(x, kernel):
        return jnp.sum(layers.conv1d(x, kernel, stride, "highest").astype(jnp.float32) * cot)

    y = layers.conv1d(x_in, jnp.asarray(kernel), stride, "highest")
    taps = ["_tap_conv1d"] if low else []
    expected = {"im2col": ["_im2col_conv1d"], "narrow": ["_narrow_conv1d"], "xla": taps}[path]
    assert called == (expected if forms == "auto" else [])
    assert y.dtype == jnp.dtype(dtype)
    if low:  # the float64 re-derivation of what bfloat16 compute multiplies
        x, kernel, cot = _bf16(x), _bf16(kernel), _bf16(cot)
    y_rtol, gx_tol = (8e-3, 2e-2) if low else (1e-5, 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), _correlate64(x, kernel, stride), rtol=y_rtol, atol=1e-5)
    # Gradients: d/dx and d/dkernel of sum(y * cot), from the float64 correlation's adjoint.
    gx, gk = jax.grad(loss, argnums=(0, 1))(x_in, jnp.asarray(kernel))
    assert gx.dtype == jnp.dtype(dtype) and gk.dtype == jnp.float32
    pad = k // 2
    gx64 = np.zeros((2, 11 + 2 * pad, c_in))
    gk64 = np.zeros((k, c_in, c_out))
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (0, 0)))
    for t in range(cot.shape[1]):
        for j in range(k):
            gx64[:, stride * t + j] += cot[:, t].astype(np.float64) @ kernel[j].astype(np.float64).T
            gk64[j] += xp[:, stride * t + j].T @ cot[:, t].astype(np.float64)
    gx64 = gx64[:, pad : pad + 11]
    np.testing.assert_allclose(np.asarray(gx, np.float32), gx64, rtol=gx_tol, atol=gx_tol * np.abs(gx64).max())
    gk_rtol, gk_atol = (8e-3, 8e-3 * np.abs(gk64).max()) if low and forms == "xla" else (1e-5, 1e-5)
    np.testing.assert_allclose(gk, gk64, rtol=gk_rtol, atol=gk_atol)


def test_conv_forms_setting_is_checked(monkeypatch):
    monkeypatch.setenv(layers.CONV_FORMS_ENV, "fast")
    with pytest.raises(CltdrError, match="CLTDR_CONV_FORMS='fast': expected auto, rewritten or xla"):
        layers.conv1d(jnp.ones((1, 4, 8)), jnp.ones((3, 8, 8)))


def test_dense_in_bfloat16_multiplies_bfloat16_and_accumulates_float32():
    """dense (the 1x1 convolutions, the GMG MLP, UpConv): output and input gradient in bfloat16, the float32
    kernel's gradient from the bfloat16-rounded input and incoming gradient, accumulated in float32."""
    x = RNG.standard_normal((2, 9, 96)).astype(np.float32)
    kernel = (RNG.standard_normal((96, 40)) / np.sqrt(96)).astype(np.float32)
    cot = RNG.standard_normal((2, 9, 40)).astype(np.float32)

    def loss(x, kernel):
        return jnp.sum(layers.dense(x, kernel).astype(jnp.float32) * cot)

    x_in = jnp.asarray(x, jnp.bfloat16)
    y = layers.dense(x_in, jnp.asarray(kernel))
    gx, gk = jax.grad(loss, argnums=(0, 1))(x_in, jnp.asarray(kernel))
    assert y.dtype == gx.dtype == jnp.bfloat16 and gk.dtype == jnp.float32
    x64, k64, cot64 = (_bf16(a).astype(np.float64) for a in (x, kernel, cot))
    np.testing.assert_allclose(np.asarray(y, np.float32), x64 @ k64, rtol=8e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx, np.float32), cot64 @ k64.T, rtol=8e-3, atol=1e-5)
    np.testing.assert_allclose(gk, np.einsum("bti,bto->io", x64, cot64), rtol=1e-5, atol=1e-5)


def test_max_pool_padding_never_wins():
    x = -np.arange(1, 9, dtype=np.float32).reshape(1, 8, 1)  # all negative: zero padding would win
    y = np.asarray(max_pool_k3s2(jnp.asarray(x)))[0, :, 0]
    np.testing.assert_array_equal(y, [-1, -2, -4, -6])  # max(x[2t-1], x[2t], x[2t+1]) over existing indices


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window():
    """As torch's MaxPool1d (the reference), not JAX's even split of ties."""
    x = np.array([1, 1, 1, 0, 2, 2, 5, 5], np.float32).reshape(1, 8, 1)
    g = np.array([1, 10, 100, 1000], np.float32).reshape(1, 4, 1)
    _, vjp = jax.vjp(max_pool_k3s2, jnp.asarray(x))
    # windows {x0, x1}, {x1, x2, x3}, {x3, x4, x5}, {x5, x6, x7}: ties each time, the first index takes it
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0])[0, :, 0], [1, 10, 0, 0, 100, 0, 1000, 0])


def test_max_pool_matches_torch_with_ties():
    torch = pytest.importorskip("torch", reason="the torch extra is not installed (CI installs it)")
    x = RNG.integers(-2, 3, (2, 16, 5)).astype(np.float32)  # few values: many ties
    g = RNG.standard_normal((2, 8, 5)).astype(np.float32)
    xt = torch.tensor(x.transpose(0, 2, 1), requires_grad=True)
    # padding 1 with -inf, as torch pads max pooling
    yt = torch.nn.functional.max_pool1d(xt, kernel_size=3, stride=2, padding=1)
    yt.backward(torch.tensor(g.transpose(0, 2, 1)))
    y, vjp = jax.vjp(max_pool_k3s2, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 1))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy().transpose(0, 2, 1))


def test_norms_use_eps_1e5_and_biased_variance():
    x = RNG.standard_normal((2, 7, 32)).astype(np.float32) * 0.01  # small variance: eps matters
    ln = ChannelLayerNorm()
    out = ln.apply(ln.init(jax.random.key(0), x), x)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)

    gn = GroupNorm(16)
    out = gn.apply(gn.init(jax.random.key(0), x), x)
    g = x64.reshape(2, 7, 16, 2)
    ref = ((g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-5)).reshape(2, 7, 32)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_softshrink():
    np.testing.assert_allclose(
        softshrink(jnp.array([-0.01, -0.0005, 0.0, 0.0005, 0.01])), [-0.009, 0.0, 0.0, 0.0, 0.009], atol=1e-8
    )


def test_gmg_block_matches_a_float64_rederivation():
    """REFERENCE.md 4.4 written out in numpy for a stem block (stride 1, kernel 1, no layer scale)."""
    d, t, h = 16, 12, 8
    x = RNG.standard_normal((1, t, d)).astype(np.float32)
    mask = np.arange(t)[None] < 9
    block = GMGBlock(h, init_conv_std=0.5)
    params = block.init(jax.random.key(1), x, mask)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * RNG.standard_normal(p.shape).astype(np.float32), params)
    out, out_mask = block.apply({"params": params}, x, mask)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)

    x64 = x[0].astype(np.float64)
    o = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    o = o * p["ln"]["scale"] + p["ln"]["bias"]
    spec = np.fft.rfft(o, axis=0, norm="ortho")

    def affine(v, w, b):
        return (w[0] + 1j * w[1]) * v + (b[0] + 1j * b[1])

    h1 = affine(spec, p["w1"], p["b1"])
    h2 = affine(np.maximum(h1.real, 0) + 1j * np.maximum(h1.imag, 0), p["w2"], p["b2"])
    shrink = np.vectorize(lambda v: v - 1e-3 if v > 1e-3 else (v + 1e-3 if v < -1e-3 else 0.0))
    glob = np.fft.irfft((shrink(h2.real) + 1j * shrink(h2.imag)) * spec, n=t, axis=0, norm="ortho")
    local = o * p["convw_kernel"][0] + p["convw_bias"]
    instant = o * p["fc_kernel"] + p["fc_bias"]
    u = o + glob + local * glob + instant * local * glob  # no ReLU in the gates (12.1)
    y = x64 * mask[0, :, None] + u
    g = y.reshape(t, 16, 1)
    gn = ((g - g.mean((0, 2), keepdims=True)) / np.sqrt(g.var((0, 2), keepdims=True) + 1e-5)).reshape(t, d)
    gn = gn * p["gn"]["scale"] + p["gn"]["bias"]
    from math import erf

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))
    z = y + gelu(gn @ p["mlp0_kernel"] + p["mlp0_bias"]) @ p["mlp2_kernel"] + p["mlp2_bias"]
    np.testing.assert_allclose(np.asarray(out[0]), z, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out_mask, mask)


SMALL = {
    "dataset": {"input_dim": 8, "num_classes": 3, "max_seq_len": 64},
    "model": {
        "embd_dim": 16,
        "fpn_dim": 16,
        "head_dim": 16,
        "sgp_mlp_dim": 16,
        "num_bins": 4,
        "init_conv_vars": 0.5,
        "backbone_arch": [2, 1, 2],
        "regression_range": [[0, 4], [4, 8], [8, 10000]],
    },
}


def run_variant(**model):
    data = {**SMALL, "model": {**SMALL["model"], **model}}
    cfg = config_from_dict(data)
    m = CLTDRGMG(cfg.model, cfg.train_cfg)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 8)), jnp.float32)
    mask = jnp.arange(64)[None] < 50
    variables = m.init(jax.random.key(0), x, mask)
    return m.apply(variables, x, mask), variables["params"]


@pytest.mark.parametrize(
    "switch",
    [
        {"gmg_branches": ["instant", "local"]},
        {"gmg_branches": ["global"]},
        {"gmg_gate": False},
        {"cls_fusion_levels": ["above", "below"], "reg_fusion_levels": []},
        {"fusion": "add"},
        {"fusion": "concat"},
        {"refine_cls": False, "refine_reg": False},
    ],
)
def test_ablation_switches_build_and_change_the_model(switch):
    reference, _ = run_variant()
    variant, params = run_variant(**switch)
    shapes = [[a.shape for a in reference[k]] for k in ("cls_logits", "reg_offsets", "refine_start")]
    assert shapes == [[a.shape for a in variant[k]] for k in ("cls_logits", "reg_offsets", "refine_start")]
    assert all(np.isfinite(np.asarray(a)).all() for a in variant["cls_logits"])
    assert any(not np.allclose(a, b) for a, b in zip(reference["cls_logits"], variant["cls_logits"], strict=True))
    if switch.get("gmg_branches") == ["instant", "local"]:
        assert "w1" not in params["backbone"]["stem_0"]
    if switch.get("refine_cls") is False:
        np.testing.assert_array_equal(variant["cls_logits"][0], variant["coarse_cls_logits"][0])
        assert not np.asarray(variant["refine_start"][0]).any()


def test_reference_switch_defaults_are_the_reference_model():
    cfg = config_from_dict(SMALL)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.model)}
    assert defaults["gmg_branches"] == ("instant", "local", "global") and defaults["gmg_gate"] is True
    assert defaults["cls_fusion_levels"] == ("above",) and defaults["reg_fusion_levels"] == ("below",)
    assert defaults["fusion"] == "attention" and defaults["refine_cls"] and defaults["refine_reg"]


def test_drop_path_drops_whole_samples_and_rescales():
    from cltdr_jax.model.gmg import DropPath

    x = jnp.ones((400, 3, 2))
    layer = DropPath(0.25)
    y = np.asarray(layer.apply({}, x, False, rngs={"droppath": jax.random.key(0)}))
    per_sample = y.reshape(400, -1)
    assert all(np.isclose(v, 0.0) or np.isclose(v, 1 / 0.75) for v in np.unique(per_sample))
    assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
    assert 0.65 < (per_sample[:, 0] > 0).mean() < 0.85  # keep probability 0.75
    np.testing.assert_array_equal(layer.apply({}, x, True), x)  # identity at inference


@pytest.mark.parametrize("head", ["classifier", "refine", "centre_offset"])
def test_heads_on_packed_levels_equal_each_level_alone(head):
    """The heads run once on all levels packed along time; a level alone (nothing packed, no gap) is the
    reference's per-level computation. Padded rows inside each level make LayerNorm's bias reach the next
    conv there (kept) while the gaps between levels must stay zero; kernel 7 reaches 3 rows across."""
    from cltdr_jax.model.decoder import ClassifierHead, RefineHead
    from cltdr_jax.model.trident import CentreOffsetHead

    rng = np.random.default_rng(0)
    lengths, valid = (16, 8, 4, 2), (11, 6, 3, 2)
    feats = [jnp.asarray(rng.standard_normal((2, t, 8)), jnp.float32) for t in lengths]
    masks = [
        jnp.asarray(np.arange(t)[None, :] < np.array([[v], [t]]), bool) for t, v in zip(lengths, valid, strict=True)
    ]
    module = {
        "classifier": ClassifierHead(8, 5, 3, 2, True, 0.01, precision="highest"),
        "refine": RefineHead(8, 5, 3, 2, True, len(lengths), precision="highest"),
        "centre_offset": CentreOffsetHead(8, 4, 3, 2, True, precision="highest"),
    }[head]
    variables = module.init(jax.random.key(0), feats, masks)
    # Non-trivial norm biases and per-level scales, so that every packed quantity matters.
    variables = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), variables)
    packed = module.apply(variables, feats, masks)
    outputs = packed if head == "refine" else (packed,)
    for l in range(len(lengths)):
        alone_vars = variables
        if head == "centre_offset":  # level l alone is "level 0" of a one-level call: its own scale
            params = dict(variables["params"])
            params["scale_0"] = variables["params"][f"scale_{l}"]
            alone_vars = {"params": {k: v for k, v in params.items() if not k.startswith("scale_") or k == "scale_0"}}
        alone = module.apply(alone_vars, [feats[l]], [masks[l]])
        alone = alone if head == "refine" else (alone,)
        for got, want in zip(outputs, alone, strict=True):
            assert got[l].shape == want[0].shape
            np.testing.assert_allclose(got[l], want[0], rtol=1e-6, atol=1e-6)
            assert np.abs(want[0]).max() > 0.1


def test_checkpoint_after_cotangent_recomputes_late_and_keeps_the_gradients():
    """`checkpoint_after_cotangent`: the same values and gradients as without it (a static and an integer
    argument included), and the compiled gradient keeps fewer activations; jax.checkpoint alone does not
    lower them on XLA's CPU backend, which is why it exists."""
    n, d, depth = 2048, 128, 6

    def block(w, x, shift, double):  # shift: int array (no gradient), double: static Python bool
        h = jnp.tanh(x @ w) + shift.astype(x.dtype)
        h = jnp.sin(h) * jnp.exp(-h * h)
        return x + (2.0 if double else 1.0) * jnp.tanh(h @ w.T)

    late = layers.checkpoint_after_cotangent(block, static_argnums=(3,))
    keys = jax.random.split(jax.random.key(0), depth + 1)
    ws = [0.1 * jax.random.normal(k, (d, d)) for k in keys[:-1]]
    x = jax.random.normal(keys[-1], (n, d))
    shift = jnp.arange(d) % 3

    def loss(b):
        def f(ws, x):
            for w in ws:
                x = b(w, x, shift, True)
            return jnp.sum(jnp.square(x))

        return f

    # Without recomputation every block keeps several [n, d] activations for the backward pass; recomputed
    # after the cotangent, at most a few blocks' worth are alive at once.
    _assert_same_gradients_fewer_temporaries(loss(block), loss(late), ws, x, plain_at_least=3 * depth)


def _assert_same_gradients_fewer_temporaries(plain_loss, our_loss, ws, x, plain_at_least: int) -> None:
    """`our_loss` equals `plain_loss` bit for bit and has its gradients (w.r.t. `ws` and `x`, up to float
    rounding); the plain gradient's XLA temporaries exceed `plain_at_least` [n, d] activations, ours are
    under half of them."""
    plain, ours = (jax.jit(jax.grad(f, argnums=(0, 1))) for f in (plain_loss, our_loss))
    assert float(jax.jit(our_loss)(ws, x)) == float(jax.jit(plain_loss)(ws, x))
    for a, b in zip(jax.tree.leaves(plain(ws, x)), jax.tree.leaves(ours(ws, x)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))))

    def temporaries(fn):
        return fn.lower(ws, x).compile().memory_analysis().temp_size_in_bytes

    assert temporaries(plain) > plain_at_least * x.size * x.dtype.itemsize
    assert temporaries(ours) < 0.5 * temporaries(plain)


def test_backward_after_recomputes_parallel_parts_one_after_another():
    """Parts that read the same input and feed the loss side by side (the heads) get their output cotangents
    at once, so their recomputations are alive together; chained with `backward_after`, each waits for the
    input cotangent of the ones after it: the same values and gradients, a fraction of the temporaries."""
    n, d, parts = 2048, 128, 6

    def part(w, x):
        h = jnp.tanh(x @ w)
        h = jnp.sin(h) * jnp.exp(-h * h)
        return jnp.tanh(h @ w.T) * x

    late = layers.checkpoint_after_cotangent(part)
    keys = jax.random.split(jax.random.key(0), parts + 1)
    ws = [0.1 * jax.random.normal(k, (d, d)) for k in keys[:-1]]
    x = jax.random.normal(keys[-1], (n, d))

    def loss(chained):
        def f(ws, x):
            total = 0.0
            for w in ws:
                out = late(w, x)
                if chained:
                    out, x = layers.backward_after(out, x)
                total = total + jnp.sum(jnp.square(out))
            return total

        return f

    # Apart, every part's recomputation (a few [n, d] activations each) is alive at once (measured: 41
    # activations); chained, about two parts' worth (12).
    _assert_same_gradients_fewer_temporaries(loss(False), loss(True), ws, x, plain_at_least=3 * parts)


def test_the_anchor_of_the_late_recomputation_leaves_every_value_as_it_was():
    """x + (-|0 * c|) is x bit for bit (signed zeros, infinities, NaN) for any finite c. (Subnormal x are
    flushed to zero, as by every float operation XLA compiles for the CPU.)"""
    x = jnp.array([-0.0, 0.0, 1.5, -2.0, 3e38, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    for c in (3.0, -7.0, 0.0, -0.0):
        anchor = -jnp.abs(0.0 * jnp.float32(c))
        assert np.asarray(x + anchor).tobytes() == np.asarray(x).tobytes()


def test_the_global_branch_transforms_each_devices_videos_on_that_device():
    """With the batch split over 4 (forced CPU) devices the FFT branch gathers nothing (XLA's partitioner
    alone gathered the whole batch onto every device) and gives the values of one device, gradients too."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from cltdr_jax.model.gmg import global_branch
        rng = np.random.default_rng(0)
        o = rng.standard_normal((4, 64, 8)).astype(np.float32)
        w = [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(4)]
        def loss(o, *w):
            return jnp.sum(jnp.sin(global_branch(o, *w)))
        grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
        mesh = jax.make_mesh((4,), ("data",))
        split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        # As `cltdr train` places its batches: arrays whose type carries the split (an explicit mesh axis).
        args = [jax.device_put(o, split), *(jax.device_put(x, whole) for x in w)]
        text = jax.jit(grad).lower(*args).compile().as_text()
        assert "all-gather" not in text and "fft(" in text
        expected = jax.device_get(jax.jit(grad)(o, *w))
        for a, b in zip(jax.device_get(jax.jit(grad)(*args)), expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        print("ok")
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
