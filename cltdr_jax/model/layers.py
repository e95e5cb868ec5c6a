"""Primitive layers shared by the encoder and decoder (REFERENCE.md 4.1 and 5.1).

Channels-last: activations are `[B, T, C]`, masks `[B, T]` bool. Kernels are stored as `[K, C_in, C_out]`
(a torch Conv1d weight `[C_out, C_in, K]` transposed). Every convolution pads with zeros.

Compute dtype and matmul precision are module attributes (the Flax convention), passed down from the
detector (`CLTDRGMG(dtype=..., precision=...)`, set from the config): `dtype` None computes in the input's
dtype, parameters stay float32 and are cast; `precision` is any `jax.lax.Precision` (or its name).
`highest` reproduces the reference's float32 results on every backend (the parity tests pin it); `default`
lets a GPU use TF32, as the reference's own GPU training does, and is the same arithmetic on a CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.core.lift
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.errors import CltdrError

Array = jax.Array
Init = Callable[..., Array]
Dtype = Any  # a jnp dtype, or None: the input's
Precision = Any  # a jax.lax.Precision, its name ("highest", "default", ...), or None (JAX's default)

LN_EPS = 1e-5  # the reference's LayerNorm and GroupNorm eps (Flax defaults to 1e-6)


def torch_uniform(fan_in: int) -> Init:
    """PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def constant(value: float) -> Init:
    return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


def gelu(x: Array) -> Array:
    """The exact erf GELU of torch.nn.GELU (Flax's nn.gelu defaults to the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


# How conv1d computes a stride-1 convolution (odd kernel K, C_in -> C_out) on the CPU, chosen by shape;
# measured forward + backward on XLA's CPU backend (2 cores), against its own convolution:
IM2COL_MAX_DEPTH = 256  # K * C_in up to this: one matmul over the K shifted copies side by side (the demo's
#                         64-channel heads: XLA's convolution and its gradient are ~2x slower there)
NARROW_CONV_MAX_OUT = 64  # C_out up to this with C_in >= NARROW_CONV_MIN_IN: one matmul against the taps side
NARROW_CONV_MIN_IN = 256  # by side, then K shifted adds (the THUMOS heads' 512 -> 20 layers)
# Where those forms (and `_tap_conv1d` for low precision) apply: "auto" on the CPU only, where they were
# measured; a GPU or TPU gets XLA's own convolution (cuDNN on a GPU, as the reference's torch uses).
# "rewritten" or "xla" forces either anywhere (to measure one against the other on a device).
CONV_FORMS_ENV = "CLTDR_CONV_FORMS"


def rewritten_conv_forms() -> bool:
    """Whether conv1d takes the forms measured on the CPU (`CLTDR_CONV_FORMS`: auto, rewritten or xla). Read
    when a program is traced, for the backend it compiles for (JAX's default: the one it runs on)."""
    choice = os.environ.get(CONV_FORMS_ENV, "auto")
    if choice not in ("auto", "rewritten", "xla"):
        raise CltdrError(f"environment variable {CONV_FORMS_ENV}={choice!r}: expected auto, rewritten or xla")
    return choice == "rewritten" or (choice == "auto" and jax.default_backend() == "cpu")


def conv1d(x: Array, kernel: Array, stride: int = 1, precision: Precision = None) -> Array:
    """Zero-padded 1-D correlation, padding K//2 on both sides. x [B, T, I], kernel [K, I, O] -> [B, T/stride, O].

    On the CPU some shapes and low-precision dtypes are computed in a rewritten form (the same products,
    another summation order; `rewritten_conv_forms`), elsewhere by XLA's convolution."""
    k, i, out = kernel.shape
    if rewritten_conv_forms():
        if stride == 1 and k > 1 and k % 2 == 1:
            if k * i <= IM2COL_MAX_DEPTH:
                return _im2col_conv1d(x, kernel, precision)
            if out <= NARROW_CONV_MAX_OUT and i >= NARROW_CONV_MIN_IN:
                return _narrow_conv1d(x, kernel, precision)
        if is_low_precision(x.dtype):
            return _tap_conv1d(x, kernel, stride, precision)
    return jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride,),
        padding=((k // 2, k // 2),),
        dimension_numbers=("NWC", "WIO", "NWC"),
        precision=precision,
    )


def _im2col_conv1d(x: Array, kernel: Array, precision: Precision = None) -> Array:
    """conv1d (stride 1) for few input channels: [x[t - K//2], ..., x[t + K//2]] @ kernel.reshape(K * I, O).

    One matmul with a K * I deep contraction, accumulated in float32; only the summation order differs
    from a convolution.
    """
    k, i, o = kernel.shape
    t, pad = x.shape[1], k // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
    columns = jnp.concatenate([xp[:, j : j + t] for j in range(k)], axis=-1)
    return matmul_f32(columns, kernel.reshape(k * i, o), precision).astype(x.dtype)


def _narrow_conv1d(x: Array, kernel: Array, precision: Precision = None) -> Array:
    """conv1d (stride 1) for few output channels: y[t] = sum_j (x @ kernel[j])[t + j - K//2].

    XLA's CPU convolution is slow for thin outputs (512 -> 20, kernel 3 or 7, the heads' last layers: about
    a quarter of the float32 matmul rate); one matmul against the taps side by side, [I, K * O], then K
    shifted adds is 2-4x faster. Only the summation order differs; partial sums stay float32.
    """
    k, i, o = kernel.shape
    z = matmul_f32(x, jnp.transpose(kernel, (1, 0, 2)).reshape(i, k * o), precision)
    products = [z[..., j * o : (j + 1) * o] for j in range(k)]
    return _shifted_sum(products, [j - k // 2 for j in range(k)]).astype(x.dtype)


def _shifted_sum(parts: list[Array], offsets: list[int]) -> Array:
    """out[:, t] = sum_j parts[j][:, t + offsets[j]], zero where t + offsets[j] falls outside the time axis."""
    reach = max(abs(o) for o in offsets)
    t = parts[0].shape[1]
    padded = [jnp.pad(z, ((0, 0), (reach, reach), (0, 0))) for z in parts]
    return sum(z[:, reach + o : reach + o + t] for z, o in zip(padded, offsets, strict=True))


def _tap_conv1d(x: Array, kernel: Array, stride: int, precision: Precision = None) -> Array:
    """conv1d in a low-precision dtype: one matmul per kernel tap, y[t] = sum_j xp[stride * t + j] @ kernel[j].

    XLA's CPU convolution gains nothing from bfloat16 (it runs at the float32 rate, forward and backward);
    bfloat16 matmuls with float32 accumulation run at 1.5-2x it (see `matmul_f32`). Partial sums float32.
    """
    if stride == 1 and kernel.shape[0] % 2 == 1:
        return _same_tap_conv1d(x, kernel, precision)
    return _tap_sum(x, kernel, stride, precision).astype(x.dtype)


def _tap_sum(x: Array, kernel: Array, stride: int, precision: Precision) -> Array:
    """sum_j xp[stride * t + j] @ kernel[j] (xp: x zero-padded by K//2 on both sides), in float32."""
    k, pad = kernel.shape[0], kernel.shape[0] // 2
    t_out = (x.shape[1] + 2 * pad - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
    return sum(matmul_f32(xp[:, j : j + stride * t_out : stride], kernel[j], precision) for j in range(k))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _same_tap_conv1d(x: Array, kernel: Array, precision: Precision) -> Array:
    """`_tap_conv1d` at stride 1, odd K, with its own gradient. Each tap multiplies x itself and its product
    is shifted into place, y[t] = sum_j (x @ W_j)[t + j - K//2]: the shifts ride on the float32 sum (one
    rounding), so no shifted copy of x is made per tap, and the weight gradients share x's one transposed
    copy (two head layers forward + backward, [2, 4541, 512], bfloat16: 581-593 -> 547-577 ms on one thread,
    307-316 -> 292-305 ms on two, against products of shifted inputs). Differentiated by JAX, the input's
    gradient was the K products each padded into place and summed in bfloat16, a loop of pads and
    conversions that XLA's CPU backend does not vectorise (~30 ms per such layer on one thread)."""
    k, pad = kernel.shape[0], kernel.shape[0] // 2
    products = [matmul_f32(x, kernel[j], precision) for j in range(k)]
    return _shifted_sum(products, [j - pad for j in range(k)]).astype(x.dtype)


def _same_tap_conv1d_fwd(x: Array, kernel: Array, precision: Precision) -> tuple[Array, tuple[Array, Array]]:
    return _same_tap_conv1d(x, kernel, precision), (x, kernel)


def _same_tap_conv1d_bwd(precision: Precision, saved: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = saved
    k, pad, t = kernel.shape[0], kernel.shape[0] // 2, x.shape[1]
    g = g.astype(x.dtype)
    # y[t] = sum_j x[t + j - pad] @ W_j, so dx[s] = sum_j (g @ W_j^T)[s + pad - j]
    # and dW_j = sum_s x[s]^T g[s + pad - j] = sum_s x[s]^T gp[s + 2 pad - j].
    dx = _shifted_sum([matmul_f32(g, kernel[j].T, precision) for j in range(k)], [pad - j for j in range(k)])
    gp = jnp.pad(g, ((0, 0), (pad, pad), (0, 0)))
    shifted = [gp[:, 2 * pad - j : 2 * pad - j + t] for j in range(k)]
    dkernel = jnp.stack([_weight_gradient(x, shifted[j], kernel[j], precision) for j in range(k)])
    return dx.astype(x.dtype), dkernel


_same_tap_conv1d.defvjp(_same_tap_conv1d_fwd, _same_tap_conv1d_bwd)


def dense(x: Array, kernel: Array, precision: Precision = None) -> Array:
    """A 1x1 convolution as a matmul: x [..., I], kernel [I, O] -> [..., O]."""
    return matmul_f32(x, kernel, precision).astype(x.dtype)


def is_low_precision(dtype: Dtype) -> bool:
    """bfloat16 or float16: computed through `matmul_f32`'s low-precision gradient (and, on the CPU, compiled
    with YNNPACK's dots: xla_options)."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def matmul_f32(x: Array, w: Array, precision: Precision = None) -> Array:
    """x [..., I] @ w [I, O] in x's dtype, accumulated and returned in float32.

    In float32 this is jnp.matmul. In a low-precision dtype the backward pass is low-precision too: the
    incoming float32 gradient is rounded to x's dtype before the two gradient matmuls (as mixed-precision
    training does), since JAX's own gradient of a float32-output matmul multiplies in float32 (a bfloat16
    operand against a float32 cotangent), at about half the rate of a bfloat16 matmul on a CPU with
    bfloat16 units. The weight's gradient is accumulated and returned in w's dtype (the float32 parameter).
    """
    if not is_low_precision(x.dtype):
        return jnp.matmul(x, w.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32)
    return _low_precision_matmul(x, w, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(x: Array, w: Array, precision: Precision) -> Array:
    return jnp.matmul(x, w.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(x: Array, w: Array, precision: Precision) -> tuple[Array, tuple[Array, Array]]:
    return _low_precision_matmul(x, w, precision), (x, w)


def _low_precision_matmul_bwd(precision: Precision, saved: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = saved
    g = g.astype(x.dtype)
    dx = jnp.matmul(g, w.astype(x.dtype).T, precision=precision, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), _weight_gradient(x, g, w, precision)


def _weight_gradient(x: Array, g: Array, w: Array, precision: Precision) -> Array:
    """sum over every leading (batch, time) axis of x^T g, accumulated in float32, in w's dtype and placement."""
    batch = tuple(range(x.ndim - 1))
    w_sharding = jax.typeof(w).sharding  # the batch axis may be sharded: say the sum lands where w lives
    dw = jax.lax.dot_general(
        x,
        g,
        ((batch, batch), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
        out_sharding=None if w_sharding.mesh.empty else w_sharding,
    )
    return dw.astype(w.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


REMAT_POLICIES = {
    "nothing": None,  # keep only the block's inputs: recompute all of it in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep the matmul outputs, recompute the rest
}


def checkpoint_after_cotangent(fun: Callable, policy: Callable | None = None, static_argnums: tuple[int, ...] = ()):
    """`jax.checkpoint(fun, policy=policy)` whose backward pass recomputes only once the cotangent of its output
    has arrived.

    jax.checkpoint alone saves nothing on XLA's CPU backend: the optimization barrier it puts on the saved
    inputs is expanded away before scheduling, so the recomputation is merged with the forward pass or run
    early, next to it, and every activation is alive at the peak as without it (a chain of 8 blocks:
    656 MiB of temporaries either way). Here the saved values pass through `x + anchor` in the backward pass,
    anchor = -|0 * min(part of the cotangent)| (-0.0 for a finite cotangent: the sum equals x bit for bit,
    -0.0 and NaN included; a non-finite cotangent makes the gradient non-finite, a step the train step
    skips anyway), a data dependence no compiler pass removes: the chain's temporaries 656 -> 224 MiB.
    """

    @partial(jax.custom_vjp, nondiff_argnums=static_argnums)
    def wrapped(*args):
        return fun(*args)

    def forward(*args):
        static = {i: args[i] for i in static_argnums}
        dynamic = [a for i, a in enumerate(args) if i not in static]

        def of_dynamic(*dyn):
            it = iter(dyn)
            return fun(*(static[i] if i in static else next(it) for i in range(len(args))))

        # The residual is the VJP closure: its leaves are what the policy saves (the inputs at least).
        return jax.vjp(jax.checkpoint(of_dynamic, policy=policy), *dynamic)

    def backward(*static_residual_cotangent):
        vjp_fn, cotangent = static_residual_cotangent[-2:]
        return tuple(_tied(vjp_fn, cotangent)(cotangent))

    wrapped.defvjp(forward, backward)
    return wrapped


def _tied(tree: Any, to: Any) -> Any:
    """`tree` with -|0 * min(the smallest float part of `to`)| added to its float leaves: each value stays bit
    for bit what it was while `to` is finite, but cannot be computed before `to` exists. A reduction, not an
    element: `to` may be sharded (batch over devices); of its smallest part, as it only has to exist."""
    floats = [c for c in jax.tree.leaves(to) if jnp.issubdtype(c.dtype, jnp.inexact) and c.size]
    if not floats:
        return tree
    anchor = -jnp.abs(0.0 * jnp.min(min(floats, key=lambda c: c.size)))

    def tie(r):
        return r + anchor.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.inexact) else r

    return jax.tree.map(tie, tree)


@jax.custom_vjp
def backward_after(first: Any, then: Any) -> tuple[Any, Any]:
    """`(first, then)` unchanged. In the backward pass the cotangent of `first` waits for that of `then`: a
    `checkpoint_after_cotangent` part whose output is `first` recomputes only once the backward pass has
    reached `then`. Used to recompute the heads one after another, not all at the same time."""
    return first, then


def _backward_after_fwd(first: Any, then: Any) -> tuple[tuple[Any, Any], None]:
    return (first, then), None


def _backward_after_bwd(_: None, cotangents: tuple[Any, Any]) -> tuple[Any, Any]:
    first, then = cotangents
    return _tied(first, then), then


backward_after.defvjp(_backward_after_fwd, _backward_after_bwd)


def one_after_another(enabled: bool, first: Any, then: Any) -> tuple[Any, Any]:
    """`backward_after(first, then)` where recomputed parts are to be chained (`enabled`), else unchanged."""
    return backward_after(first, then) if enabled else (first, then)


def _lifted_checkpoint_after_cotangent(fn, variables=True, rngs=True, static_argnums=(), policy=None):
    """`flax.core.lift.checkpoint` with `checkpoint_after_cotangent` in place of `jax.checkpoint`."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
        def rematted(variable_groups, rng_groups, *args):
            scope = scope_fn(variable_groups, rng_groups)
            return fn(scope, *args), repack_fn(scope)

        static = tuple(i + 2 for i in static_argnums)  # after variable_groups and rng_groups
        return checkpoint_after_cotangent(rematted, policy, static)(variable_groups, rng_groups, *args)

    return flax.core.lift.pack(inner, (variables,), (variables,), (rngs,), name="remat")


def rematerialized(module: type[nn.Module], enabled: bool, policy: str, static_argnums: tuple[int, ...] = ()):
    """`module`, or a version of it whose activations the backward pass recomputes (same parameters, same
    gradients), keeping only what `policy` saves; `static_argnums` count `self` as 0, as for `nn.remat`."""
    if not enabled:
        return module
    return nn.transforms.lift_transform(
        _lifted_checkpoint_after_cotangent,
        module,
        static_argnums=tuple(i - 1 for i in static_argnums),
        policy=REMAT_POLICIES[policy],
    )


def cast(x: Array, dtype: Dtype) -> Array:
    """x in the compute dtype (unchanged when dtype is None)."""
    return x if dtype is None else x.astype(dtype)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at each time step: biased variance, eps 1e-5, affine (torch names weight/bias)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        # Statistics in float32 even when the activations are bfloat16.
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        out = (x32 - mu) / jnp.sqrt(var + LN_EPS) * scale + bias
        return out.astype(x.dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(groups, C): statistics over the group's channels and ALL time steps (padding too)."""

    groups: int = 16

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, c = x.shape
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xg = x.astype(jnp.float32).reshape(b, t, self.groups, c // self.groups)
        mu = jnp.mean(xg, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mu), axis=(1, 3), keepdims=True)
        out = ((xg - mu) / jnp.sqrt(var + LN_EPS)).reshape(b, t, c) * scale + bias
        return out.astype(x.dtype)


class Conv1D(nn.Module):
    """A plain (unmasked) 1-D convolution with bias, torch Conv1d semantics and default init."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    use_bias: bool = True
    bias_init: Init | None = None  # None: PyTorch's default uniform bias init
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = cast(x, self.dtype)
        fan_in = x.shape[-1] * self.kernel_size
        kernel = self.param("kernel", torch_uniform(fan_in), (self.kernel_size, x.shape[-1], self.features))
        if self.kernel_size == 1 and self.stride == 1:
            y = dense(x, kernel[0], self.precision)
        else:
            y = conv1d(x, kernel, self.stride, self.precision)
        if self.use_bias:
            bias = self.param("bias", self.bias_init or torch_uniform(fan_in), (self.features,))
            y = y + bias.astype(y.dtype)
        return y


class MaskedConv1D(nn.Module):
    """The reference's MaskedConv1D: convolve (input NOT masked), then multiply the output by the mask."""

    features: int
    kernel_size: int
    use_bias: bool = True
    bias_init: Init = nn.initializers.zeros
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        y = Conv1D(
            self.features,
            self.kernel_size,
            use_bias=self.use_bias,
            bias_init=self.bias_init,
            dtype=self.dtype,
            precision=self.precision,
            name="conv",
        )(x)
        return y * mask[..., None].astype(y.dtype)


class UpConv(nn.Module):
    """ConvTranspose1d(D, D, kernel 3, stride 2, padding 1, output_padding 1): length T -> 2T (REFERENCE.md 5.1).

    With the torch weight U [in, out, 3] stored as kernel[k] = U[:, :, k]:
        y[2j]   = b + x[j] @ kernel[1]
        y[2j+1] = b + x[j] @ kernel[2] + x[j+1] @ kernel[0]   (x[T] = 0)
    Written as three matmuls of x instead of a dilated convolution: half the multiply-adds, and exact
    (x[j+1] @ kernel[0] is row j+1 of x @ kernel[0]). Summed in float32 and rounded once: in bfloat16, shifting
    x rather than the product made the backward pass add the input's gradients in bfloat16 through a pad, a
    loop XLA's CPU backend does not vectorise (forward + backward at [2, 1152, 512]: 53 -> 44 ms).
    """

    features: int
    dtype: Dtype = None
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = cast(x, self.dtype)
        b, t, c = x.shape
        # PyTorch takes a transposed conv's fan_in from weight dim 1 (out channels) times the kernel.
        init = torch_uniform(self.features * 3)
        kernel = self.param("kernel", init, (3, c, self.features))
        bias = self.param("bias", init, (self.features,))
        tap = [matmul_f32(x, kernel[k], self.precision) for k in range(3)]
        even = tap[1]
        odd = tap[2] + jnp.pad(tap[0][:, 1:], ((0, 0), (0, 1), (0, 0)))
        y = jnp.stack([even, odd], axis=2).reshape(b, 2 * t, self.features) + bias
        return y.astype(x.dtype)


@jax.custom_vjp
def max_pool_k3s2(x: Array) -> Array:
    """MaxPool1d(kernel 3, stride 2, padding 1) whose padding never wins: y[t] = max(x[2t-1], x[2t], x[2t+1]).

    Its gradient goes to the first element of the window holding the maximum, as torch's (the reference's)
    does. JAX's own gradient of `maximum` splits ties evenly, a select-and-divide per element and operand,
    slow in bfloat16 (forward + backward at [2, 2304, 512], one thread: 41 ms, 17 ms written out here)."""
    prev_odd, even, odd = _pool_windows(x)
    return jnp.maximum(jnp.maximum(prev_odd, even), odd)


def _pool_windows(x: Array) -> tuple[Array, Array, Array]:
    """x[2t-1] (-inf at t = 0), x[2t], x[2t+1]."""
    even, odd = x[:, 0::2], x[:, 1::2]
    prev_odd = jnp.concatenate([jnp.full_like(odd[:, :1], -jnp.inf), odd[:, :-1]], axis=1)
    return prev_odd, even, odd


def _max_pool_k3s2_fwd(x: Array) -> tuple[Array, Array]:
    return max_pool_k3s2(x), x


def _max_pool_k3s2_bwd(x: Array, g: Array) -> tuple[Array]:
    prev_odd, even, odd = _pool_windows(x)
    y = jnp.maximum(jnp.maximum(prev_odd, even), odd)
    zero = jnp.zeros_like(g)
    to_prev = prev_odd == y  # scanned in index order, the first maximum wins (torch: val > max)
    to_even = (even == y) & ~to_prev
    to_odd = ~(to_prev | to_even)
    d_prev = jnp.where(to_prev, g, zero)  # x[2t-1]: the odd element of window t - 1
    d_odd = jnp.where(to_odd, g, zero) + jnp.concatenate([d_prev[:, 1:], zero[:, :1]], axis=1)
    dx = jnp.stack([jnp.where(to_even, g, zero), d_odd], axis=2).reshape(x.shape)
    return (dx,)


max_pool_k3s2.defvjp(_max_pool_k3s2_fwd, _max_pool_k3s2_bwd)


def downsample_mask(mask: Array) -> Array:
    """Nearest-neighbour mask downsampling by 2: m_d[t] = m[2t]."""
    return mask[:, ::2]
