"""Reading one video's feature file into a time-first float32 array `[T, D_in]`.

Formats, chosen by the file extension:

| ext    | content                                                              | used by            |
|--------|----------------------------------------------------------------------|--------------------|
| `.npy` | array `[T, D]` (read with `allow_pickle=False`)                      | thumos, anet, hacs |
| `.npz` | key `feats`, array `[T, D]`                                          | epic               |
| `.pt`  | a torch tensor `[T, D]`, read with `torch.load(weights_only=True)`   | thumos_new         |
| `.pkl` | a pickled dict with `slow_feature` `[1, Cs, T]` and `fast_feature`   | hacs SlowFast      |
|        | `[1, Cf, T]`; concatenated slow first, then transposed to `[T, Cs+Cf]` |                  |

Unpickling runs arbitrary code from the file, so `.pkl` files are read only when the config sets
`dataset.allow_pickle_features: true`. Every problem is a `DataError` naming the file and the video.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax.config import DatasetConfig
from cltdr_jax.errors import DataError


def _fail(path: Path, video_id: str, msg: str) -> DataError:
    return DataError(f"{path}: features of video {video_id!r}: {msg}")


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _read_npy(path: Path, video_id: str) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":  # np.load would otherwise try to unpickle it
            raise _fail(path, video_id, "unreadable or corrupt .npy file (no NumPy header)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle
        raise _fail(path, video_id, f"not a plain numeric .npy array ({e})") from None
    except Exception as e:
        raise _fail(path, video_id, f"unreadable or corrupt .npy file ({type(e).__name__}: {e})") from None


def _read_npz(path: Path, video_id: str) -> np.ndarray:
    if not zipfile.is_zipfile(path):  # np.load would otherwise try to unpickle it
        raise _fail(path, video_id, "unreadable or corrupt .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "feats" not in archive.files:
                keys = ", ".join(archive.files) or "none"
                raise _fail(path, video_id, f"the .npz archive has no key 'feats' (keys: {keys})")
            return archive["feats"]
    except DataError:
        raise
    except ValueError as e:
        raise _fail(path, video_id, f"the 'feats' entry is not a plain numeric array ({e})") from None
    except Exception as e:
        raise _fail(path, video_id, f"unreadable or corrupt .npz file ({type(e).__name__}: {e})") from None


def _read_pt(path: Path, video_id: str) -> np.ndarray:
    torch = _torch()
    if torch is None:
        raise _fail(
            path,
            video_id,
            "reading .pt features needs torch: install the extra (pip install 'cltdr-jax[torch]') "
            "or convert the files to .npy",
        )
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _fail(path, video_id, f"unreadable or corrupt .pt file ({type(e).__name__}: {e})") from None
    if not isinstance(value, torch.Tensor):
        raise _fail(path, video_id, f"expected a tensor [T, D] in the .pt file, got {type(value).__name__}")
    return _to_numpy(value)


def _read_pkl(path: Path, video_id: str, allowed: bool) -> np.ndarray:
    if not allowed:
        raise _fail(
            path,
            video_id,
            "reading .pkl features unpickles the file, which can run arbitrary code from it; "
            "set dataset.allow_pickle_features: true only for files from a source you trust "
            "(or convert them to .npy)",
        )
    try:
        # The reference reads these with np.load(allow_pickle=True), i.e. a plain pickle.load.
        with open(path, "rb") as f:
            value = pickle.load(f)
    except ModuleNotFoundError as e:
        raise _fail(
            path, video_id, f"the pickle needs module {e.name!r}; install the torch extra or convert to .npy"
        ) from None
    except Exception as pickle_error:
        torch = _torch()  # files written by torch.save are not plain pickles
        if torch is None:
            raise _fail(path, video_id, f"unreadable or corrupt .pkl file ({pickle_error})") from None
        try:
            value = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise _fail(path, video_id, f"unreadable or corrupt .pkl file ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict) or not {"slow_feature", "fast_feature"} <= set(value):
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise _fail(path, video_id, f"expected a dict with 'slow_feature' and 'fast_feature', got {keys}")
    slow, fast = _to_numpy(value["slow_feature"]), _to_numpy(value["fast_feature"])
    for name, part in (("slow_feature", slow), ("fast_feature", fast)):
        if part.ndim != 3 or part.shape[0] != 1:
            raise _fail(path, video_id, f"{name} must have shape [1, C, T], got {list(part.shape)}")
    if slow.shape[2] != fast.shape[2]:
        raise _fail(path, video_id, f"slow_feature has {slow.shape[2]} time steps but fast_feature {fast.shape[2]}")
    return np.concatenate([slow, fast], axis=1)[0].T


def read_features(
    path: str | Path, cfg_dataset: DatasetConfig, video_id: str, *, columns: int | None = None
) -> np.ndarray:
    """Reads a feature file as float32 `[T, input_dim]` (time first, channels last).

    `columns`: keep only the first `columns` feature columns before the width check (MultiTHUMOS
    `rgb_only`, decided by the dataset). Then every `downsample_rate`-th row is kept.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, video_id, "file not found")
    ext = path.suffix.lower()
    if ext == ".npy":
        feats = _read_npy(path, video_id)
    elif ext == ".npz":
        feats = _read_npz(path, video_id)
    elif ext == ".pt":
        feats = _read_pt(path, video_id)
    elif ext == ".pkl":
        feats = _read_pkl(path, video_id, cfg_dataset.allow_pickle_features)
    else:
        raise _fail(path, video_id, f"unsupported extension {ext!r} (use .npy, .npz, .pt or .pkl)")

    # Real numbers only: a complex array would lose its imaginary part silently in the float32 cast.
    if not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype, np.integer)):
        raise _fail(path, video_id, f"expected a real numeric array, got dtype {feats.dtype}")
    if feats.ndim != 2:
        raise _fail(path, video_id, f"expected a 2-D array [T, D], got shape {list(feats.shape)}")
    if columns is not None:
        if feats.shape[1] < columns:
            raise _fail(path, video_id, f"has {feats.shape[1]} columns, cannot keep the first {columns}")
        feats = feats[:, :columns]
    if feats.shape[1] != cfg_dataset.input_dim:
        sliced = f" after keeping the first {columns} columns" if columns is not None else ""
        raise _fail(
            path,
            video_id,
            f"feature width is {feats.shape[1]}{sliced} but dataset.input_dim is {cfg_dataset.input_dim} "
            f"(shape {list(feats.shape)}; files must be time-first [T, D])",
        )
    if feats.shape[0] == 0:
        raise _fail(path, video_id, "has no time steps (T = 0)")
    if cfg_dataset.downsample_rate > 1:
        feats = feats[:: cfg_dataset.downsample_rate]
    with np.errstate(over="ignore"):  # values beyond float32 become Inf, reported just below
        feats = np.ascontiguousarray(feats, dtype=np.float32)
    bad = ~np.isfinite(feats)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise _fail(path, video_id, f"contains {int(bad.sum())} NaN/Inf values (first at time step {row})")
    return feats
