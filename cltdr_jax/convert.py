"""Conversion of the reference's PyTorch checkpoints into Flax parameters (REFERENCE.md section 11).

Readers:
  * `.npz` keyed by the torch names (np.load with allow_pickle=False), no torch needed;
  * `.pth.tar` / `.pth` / `.pt`: with torch installed through `torch.load(..., weights_only=True)`;
    without torch through `_SafeTorchZipReader`, which reads the zip archive torch writes and unpickles
    `data.pkl` with an allow-list of exactly the constructors a state_dict needs (the same guarantee as
    `weights_only=True`): anything else in the pickle is refused, never executed.

The mapping is derived from the Flax parameter tree the config builds, so every key the model needs is
looked for, and every key of the file is accounted for.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cltdr_jax.config import Config
from cltdr_jax.errors import CheckpointError
from cltdr_jax.model.detector import CLTDRGMG

# ---------------------------------------------------------------------------------------------------
# Reading checkpoint files

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[offset])
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *_unused):
    return data


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch state_dict pickle, refusing every global outside the allow-list."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(file)
        self._archive, self._prefix, self._source = archive, prefix, source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self._source}: refusing to unpickle {module}.{name}: only tensors and plain containers are "
            "read from checkpoints (install torch to load other formats with weights_only=True)"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise CheckpointError(f"{self._source}: unsupported persistent id {kind!r}")
        raw = self._archive.read(f"{self._prefix}data/{key}")
        return np.frombuffer(raw, dtype=storage_type.dtype)


def _read_torch_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: not a torch zip checkpoint (found {len(pickles)} data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as f:
            return _SafeUnpickler(f, archive, prefix, path).load()


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path}: a legacy (non-zip) torch file; install the torch extra (pip install cltdr-jax[torch])"
            ) from None
        return _read_torch_zip(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)

    def to_numpy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
        if isinstance(x, dict):
            return {k: to_numpy(v) for k, v in x.items()}
        return x

    return to_numpy(obj)


def read_state_dict(path: str | Path, weights: str = "ema") -> dict[str, np.ndarray]:
    """The reference state_dict in a checkpoint file as {torch key without `module.`: float32 array}.

    `weights`: "ema" takes `state_dict_ema` (what the reference evaluates), "model" takes `state_dict`.
    A bare state_dict (or an .npz of one) is used as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                obj = {k: data[k] for k in data.files}
        else:
            obj = _read_torch(path)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt archives, truncated files, wrong formats
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if "state_dict_ema" in obj or "state_dict" in obj:
        key = {"ema": "state_dict_ema", "model": "state_dict"}[weights]
        if key not in obj:
            raise CheckpointError(f"{path}: has no {key!r} (keys: {', '.join(sorted(obj))})")
        obj = obj[key]
    out = {}
    for k, v in obj.items():
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"{path}: entry {k!r} is not a tensor")
        out[k[len("module.") :] if k.startswith("module.") else k] = v.astype(np.float32)
    return out


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
