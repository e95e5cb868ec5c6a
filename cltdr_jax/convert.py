"""Conversion of the reference's PyTorch checkpoints into Flax parameters (REFERENCE.md section 11).

Files are read by `torch_files.read_state_dict` (no torch needed).

The mapping is derived from the Flax parameter tree the config builds, so every key the model needs is
looked for, and every key of the file is accounted for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
# Naming and layout: Flax path -> (torch key, torch array -> Flax array)

_INDEXED = re.compile(r"^(embd|embd_norm|stem|branch|head|norm)_(\d+)$")


def _conv(w: np.ndarray) -> np.ndarray:  # torch [O, I, K] -> [K, I, O]
    return w.transpose(2, 1, 0)


def _conv_transpose(w: np.ndarray) -> np.ndarray:  # torch [I, O, K] -> [K, I, O]
    return w.transpose(2, 0, 1)


def _flat(w: np.ndarray) -> np.ndarray:  # [1, C, 1], [C, 1, 1] -> [C]
    return w.reshape(-1)


def _pointwise(w: np.ndarray) -> np.ndarray:  # torch 1x1 conv [O, I, 1] -> dense [I, O]
    return w[:, :, 0].T


def _same(w: np.ndarray) -> np.ndarray:
    return w


_GMG_LEAVES: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "w1": ("w1", lambda w: w[:, :, 0]),
    "w2": ("w2", lambda w: w[:, :, 0]),
    "b1": ("b1", _same),
    "b2": ("b2", _same),
    "convw_kernel": ("convw.weight", lambda w: w[:, 0, :].T),
    "convw_bias": ("convw.bias", _same),
    "fc_kernel": ("fc.weight", _flat),
    "fc_bias": ("fc.bias", _same),
    "mlp0_kernel": ("mlp.0.weight", _pointwise),
    "mlp0_bias": ("mlp.0.bias", _same),
    "mlp2_kernel": ("mlp.2.weight", _pointwise),
    "mlp2_bias": ("mlp.2.bias", _same),
    "gamma1": ("drop_path_out.scale", _flat),
    "gamma2": ("drop_path_mlp.scale", _flat),
}


def torch_name(path: tuple[str, ...]) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The reference state_dict key of a Flax parameter path, and the layout transform to apply."""
    *modules, leaf = path
    if modules[:1] == ["backbone"] and len(modules) > 1 and modules[1].startswith("fpn_norm_"):
        level = modules[1].rsplit("_", 1)[1]
        return f"neck.fpn_norms.{level}.{'weight' if leaf == 'scale' else 'bias'}", _flat
    names = []
    for m in modules:
        if m == "trunk":
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
        name, fn = _GMG_LEAVES[leaf]
        return f"{prefix}.{name}", fn
    if leaf.startswith("scale_"):
        return f"{prefix}.scale.{leaf.split('_')[1]}.scale", _same
    if leaf == "scale":  # LayerNorm / GroupNorm weight
        return f"{prefix}.weight", _flat
    if leaf == "bias":
        return f"{prefix}.bias", _flat
    if leaf == "kernel":
        # Every convolution (1x1 ones included) is a Conv1d [O, I, K], except the transposed up-convolutions.
        return f"{prefix}.weight", _conv_transpose if modules[-1] in ("contrans", "convtrans") else _conv
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
        key, transform = torch_name(path)
        if key not in state_dict:
            missing.append(f"{key} (expected for shape {tuple(spec.shape)})")
            continue
        used.add(key)
        value = transform(state_dict[key])
        if value.shape != tuple(spec.shape):
            misshaped.append(
                f"{key}: checkpoint {tuple(state_dict[key].shape)}, config needs {tuple(spec.shape)} "
                "after layout conversion"
            )
            continue
        flat[path] = np.asarray(value, np.float32)
    unexpected = sorted(set(state_dict) - used)
    if missing or misshaped or unexpected:
        lines = [f"{source} does not fit the model of config {cfg.source}:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {len(items)} {title} key(s):")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


def convert_checkpoint(cfg: Config, checkpoint: str | Path, weights: str = "ema") -> dict:
    """Reads a reference checkpoint and returns the Flax `params` tree for `cfg`."""
    state_dict = read_state_dict(checkpoint, weights)
    return params_from_state_dict(cfg, state_dict, source=str(checkpoint))


def count_params(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
