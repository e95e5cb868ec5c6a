"""Conversion between the reference's PyTorch checkpoints and Flax parameters (REFERENCE.md section 11).

Files are read by `torch_files.read_state_dict` (no torch needed).

The mapping is derived from the Flax parameter tree the config builds, so every key the model needs is
looked for, and every key of the file is accounted for. One table serves both directions: `torch_name`
gives each Flax path its reference key and a `Layout`, whose `to_flax` reads a checkpoint
(`params_from_state_dict`) and whose exact inverse `to_torch` writes one (`state_dict_from_params`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cltdr_jax.config import Config
from cltdr_jax.errors import CheckpointError
from cltdr_jax.model.detector import CLTDRGMG
from cltdr_jax.torch_files import read_state_dict

# ---------------------------------------------------------------------------------------------------
# Naming and layout: Flax path -> (torch key, Layout)

_INDEXED = re.compile(r"^(embd|embd_norm|stem|branch|head|norm)_(\d+)$")
# Our ChannelLayerNorm modules: the reference's LayerNorm keeps its affine parameters as [1, C, 1].
_CHANNEL_NORM = re.compile(r"^(ln|norm_\d+|embd_norm_\d+|fpn_norm_\d+)$")


@dataclass(frozen=True)
class Layout:
    """How one reference tensor is laid out in Flax, in both directions.

    `to_flax(torch array)` and `to_torch(flax array)` are exact inverses built from transposes and indexing
    only, so values move bit for bit either way. Calling a layout converts torch -> Flax.
    """

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return self.to_flax(w)

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The reference's shape of a Flax parameter of `flax_shape`."""
        # Applied to a zero-strided stand-in: every layout is a view, so nothing is allocated.
        return tuple(self.to_torch(np.broadcast_to(np.float32(0), flax_shape)).shape)


SAME = Layout("same", lambda w: w, lambda w: w)  # biases, GroupNorm, GMG b [2, D], scalar scales
CONV = Layout("conv", lambda w: w.transpose(2, 1, 0), lambda w: w.transpose(2, 1, 0))  # [O, I, K] <-> [K, I, O]
CONV_TRANSPOSE = Layout(  # ConvTranspose1d [I, O, K] <-> [K, I, O]
    "conv_transpose", lambda w: w.transpose(2, 0, 1), lambda w: w.transpose(1, 2, 0)
)
POINTWISE = Layout("pointwise", lambda w: w[:, :, 0].T, lambda w: w.T[:, :, None])  # 1x1 conv [O, I, 1] <-> [I, O]
CHANNEL = Layout("channel", lambda w: w[0, :, 0], lambda w: w[None, :, None])  # LayerNorm, layer scale [1, C, 1]
DEPTHWISE_1 = Layout("depthwise_1", lambda w: w[:, 0, 0], lambda w: w[:, None, None])  # GMG fc [C, 1, 1] <-> [C]
DEPTHWISE = Layout("depthwise", lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :])  # GMG convw [C, 1, K] <-> [K, C]
COMPLEX = Layout("complex", lambda w: w[:, :, 0], lambda w: w[:, :, None])  # GMG w (re, im) [2, D, 1] <-> [2, D]

_GMG_LEAVES: dict[str, tuple[str, Layout]] = {
    "w1": ("w1", COMPLEX),
    "w2": ("w2", COMPLEX),
    "b1": ("b1", SAME),
    "b2": ("b2", SAME),
    "convw_kernel": ("convw.weight", DEPTHWISE),
    "convw_bias": ("convw.bias", SAME),
    "fc_kernel": ("fc.weight", DEPTHWISE_1),
    "fc_bias": ("fc.bias", SAME),
    "mlp0_kernel": ("mlp.0.weight", POINTWISE),
    "mlp0_bias": ("mlp.0.bias", SAME),
    "mlp2_kernel": ("mlp.2.weight", POINTWISE),
    "mlp2_bias": ("mlp.2.bias", SAME),
    "gamma1": ("drop_path_out.scale", CHANNEL),
    "gamma2": ("drop_path_mlp.scale", CHANNEL),
}


def torch_name(path: tuple[str, ...]) -> tuple[str, Layout]:
    """The reference state_dict key (without `module.`) of a Flax parameter path, and its layout."""
    *modules, leaf = path
    if modules[:1] == ["backbone"] and len(modules) > 1 and modules[1].startswith("fpn_norm_"):
        level = modules[1].rsplit("_", 1)[1]
        return f"neck.fpn_norms.{level}.{'weight' if leaf == 'scale' else 'bias'}", CHANNEL
    names = []
    for m in modules:
        if m in ("trunk", "trident"):  # our grouping modules; the reference has none
            continue
        if m == "refine_head":
            m = "refineHead"
        elif m == "attn":
            m = "attn.1"
        else:
            match = _INDEXED.match(m)
            if match:
                m = f"{match.group(1)}.{match.group(2)}"
        names.append(m)
    prefix = ".".join(names)
    if leaf in _GMG_LEAVES:
        name, layout = _GMG_LEAVES[leaf]
        return f"{prefix}.{name}", layout
    if leaf.startswith("scale_"):
        return f"{prefix}.scale.{leaf.split('_')[1]}.scale", SAME
    if leaf in ("scale", "bias"):  # LayerNorm / GroupNorm affine parameters, convolution biases
        layout = CHANNEL if _CHANNEL_NORM.match(modules[-1]) else SAME
        return f"{prefix}.{'weight' if leaf == 'scale' else 'bias'}", layout
    if leaf == "kernel":
        # Every convolution (1x1 ones included) is a Conv1d [O, I, K], except the transposed up-convolutions.
        return f"{prefix}.weight", CONV_TRANSPOSE if modules[-1] in ("contrans", "convtrans") else CONV
    raise KeyError(f"no reference name for parameter {'/'.join(path)}")


# ---------------------------------------------------------------------------------------------------
# Building the parameter tree


def abstract_params(cfg: Config) -> dict:
    """Shapes and dtypes of the parameters the config builds (no computation)."""
    model = CLTDRGMG(cfg.model, cfg.train_cfg)
    t = cfg.dataset.max_seq_len
    feats = jax.ShapeDtypeStruct((1, t, cfg.dataset.input_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)
    variables = jax.eval_shape(lambda x, m: model.init(jax.random.key(0), x, m), feats, mask)
    return variables["params"]


def params_from_state_dict(cfg: Config, state_dict: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
    """Maps a reference state_dict onto the Flax tree of `cfg`; all mismatches are reported in one error."""
    shapes = traverse_util.flatten_dict(abstract_params(cfg))
    flat, missing, misshaped, used = {}, [], [], set()
    for path, spec in shapes.items():
        key, layout = torch_name(path)
        expected = layout.torch_shape(tuple(spec.shape))
        if key not in state_dict:
            missing.append(f"{key} (expected with shape {expected})")
            continue
        used.add(key)
        if tuple(state_dict[key].shape) != expected:
            misshaped.append(f"{key}: checkpoint {tuple(state_dict[key].shape)}, config needs {expected}")
            continue
        flat[path] = np.asarray(layout.to_flax(state_dict[key]), np.float32)
    unexpected = sorted(set(state_dict) - used)
    if missing or misshaped or unexpected:
        lines = [f"{source} does not fit the model of config {cfg.source}:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {len(items)} {title} key(s):")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


# The reference's module registration order, which its state_dict follows (REFERENCE.md 11.3); names not
# listed (our ablation variants, which the reference cannot load anyway) sort after, alphabetically.
_TOP_ORDER = ("backbone", "neck", "cls_head", "start_head", "end_head", "reg_head", "decls", "dereg")
_TOP_ORDER += ("cross_level", "refineHead")
_INNER_ORDER = ("embd", "embd_norm", "stem", "branch", "fpn_norms")  # encoder and neck
_INNER_ORDER += ("w1", "b1", "w2", "b2", "ln", "gn", "fc", "convw", "mlp", "drop_path_out", "drop_path_mlp")  # GMG
_INNER_ORDER += ("head", "norm", "scale", "cls_head", "offset_head", "s_offset_head", "e_offset_head", "prob_head")
_INNER_ORDER += ("contrans", "down", "conv_l", "attn", "conv", "convtrans", "weight", "bias")


def reference_order(key: str) -> tuple:
    """Sort key putting state_dict keys (without `module.`) in the order the reference's state_dict has."""
    parts = key.split(".")
    out = []
    for depth, part in enumerate(parts):
        order = _TOP_ORDER if depth == 0 else _INNER_ORDER
        if part.isdigit():
            out.append((0, int(part), ""))
        elif part in order:
            out.append((1, order.index(part), ""))
        else:
            out.append((2, 0, part))
    return tuple(out)


def state_dict_from_params(cfg: Config, params: dict, source: str = "parameters") -> dict[str, np.ndarray]:
    """The reference state_dict of a Flax `params` tree of `cfg`: {torch key without `module.`: float32
    C-contiguous array}, in the reference's order. The exact inverse of `params_from_state_dict`."""
    shapes = traverse_util.flatten_dict(abstract_params(cfg))
    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, params))
    problems = [f"missing {'/'.join(p)} (config needs {tuple(s.shape)})" for p, s in shapes.items() if p not in flat]
    problems += [f"unexpected {'/'.join(p)} {tuple(v.shape)}" for p, v in flat.items() if p not in shapes]
    problems += [
        f"{'/'.join(p)}: {tuple(v.shape)}, config needs {tuple(shapes[p].shape)}"
        for p, v in flat.items()
        if p in shapes and tuple(v.shape) != tuple(shapes[p].shape)
    ]
    if problems:
        raise CheckpointError(f"{source} do not fit the model of config {cfg.source}:\n  " + "\n  ".join(problems))
    out = {}
    for path, value in flat.items():
        key, layout = torch_name(path)
        # np.array, not np.ascontiguousarray: that one turns the () scales into (1,).
        out[key] = np.array(layout.to_torch(value.astype(np.float32, copy=False)), order="C")
    return dict(sorted(out.items(), key=lambda item: reference_order(item[0])))


def convert_checkpoint(cfg: Config, checkpoint: str | Path, weights: str = "ema") -> dict:
    """Reads a reference checkpoint and returns the Flax `params` tree for `cfg`."""
    state_dict = read_state_dict(checkpoint, weights)
    return params_from_state_dict(cfg, state_dict, source=str(checkpoint))


def count_params(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
