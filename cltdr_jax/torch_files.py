"""Torch checkpoint files without torch: the one reader (and writer) of torch's serialisation formats.

Readers:
  * `.npz` keyed by the torch names (np.load with allow_pickle=False), no torch needed;
  * `.pth.tar` / `.pth` / `.pt`: with torch installed through `torch.load(..., weights_only=True)`;
    without torch through `_SafeUnpickler`, which reads the zip archive torch writes and unpickles
    `data.pkl` with an allow-list of exactly the constructors a state_dict needs (the same guarantee as
    `weights_only=True`): anything else in the pickle is refused, never executed.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax.errors import CheckpointError

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
