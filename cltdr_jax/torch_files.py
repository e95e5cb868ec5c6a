"""Torch checkpoint files without torch: the one reader (and writer) of torch's serialisation formats.

Readers:
  * `.npz` keyed by the torch names (np.load with allow_pickle=False), no torch needed;
  * `.pth.tar` / `.pth` / `.pt`: with torch installed through `torch.load(..., weights_only=True)`;
    without torch through `_SafeUnpickler`, which unpickles with an allow-list of exactly the constructors a
    state_dict needs (the same guarantee as `weights_only=True`): anything else in the pickle is refused,
    never executed. Two layouts are read:
      - the zip archive torch writes since 1.6 (`data.pkl` plus one `data/<key>` entry per storage);
      - the legacy stream (`torch.save(..., _use_new_zipfile_serialization=False)`, and every file written
        before 1.6, e.g. the public I3D weights): five things back to back, the magic-number pickle, the
        protocol-version pickle (1001), the sys-info pickle (byte order, type sizes), the data pickle whose
        storages are persistent ids `("storage", type, key, location, numel, view)`, the pickle of the
        sorted storage keys, then per key an int64 element count and the storage's raw bytes.

Writer: `write_torch_checkpoint` saves in torch's zip format, through torch when installed, else with
`_TorchPickler`, which writes exactly the opcodes torch's pickler writes for a checkpoint dict, so that
`torch.load(..., weights_only=True)` reads the file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
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


class _PendingTensor:
    """A legacy-format tensor whose storage bytes follow the pickle: rebuilt once they are read."""

    def __init__(self, storage, offset, size, stride, *_unused):
        self.args = (storage, offset, size, stride)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch state_dict pickle, refusing every global outside the allow-list.

    This base class refuses persistent ids too, so it also reads the legacy format's metadata pickles
    (magic number, version, sys info, storage keys); subclasses say where storages come from.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,  # torch < 0.4 pickled tensors through this one
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, source: Path):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self._source}: refusing to unpickle {module}.{name}: only tensors and plain containers are "
            "read from checkpoints (install torch to load other formats with weights_only=True)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self._source}: unexpected persistent id {str(pid)[:80]} in a metadata pickle")


class _ZipUnpickler(_SafeUnpickler):
    """Storages are archive entries `<prefix>data/<key>`, read as the pickle names them."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(file, source)
        self._archive, self._prefix = archive, prefix

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
            return _ZipUnpickler(f, archive, prefix, path).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _LegacyUnpickler(_SafeUnpickler):
    """The legacy data pickle: storages are only named here (their bytes follow the pickle), so tensors
    come out as `_PendingTensor`s over empty root buffers that `_read_torch_legacy` fills afterwards."""

    _ALLOWED = {
        **_SafeUnpickler._ALLOWED,
        ("torch._utils", "_rebuild_tensor_v2"): _PendingTensor,
        ("torch._utils", "_rebuild_tensor"): _PendingTensor,
    }

    def __init__(self, file, source: Path):
        super().__init__(file, source)
        self.roots: dict[str, np.ndarray] = {}  # storage key -> its buffer, filled after unpickling

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        kind = kind.decode("ascii") if isinstance(kind, bytes) else kind  # files written by Python 2
        if kind == "module":
            raise CheckpointError(f"{self._source}: holds a pickled nn.Module, not a state_dict (save its state_dict)")
        if kind != "storage" or len(pid) != 6:
            raise CheckpointError(f"{self._source}: unsupported persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel, view = pid
        root = self.roots.setdefault(str(key), np.empty(int(numel), dtype=storage_type.dtype))
        if view is None:
            return root
        _view_key, offset, view_numel = view  # in elements of the root storage
        return root[int(offset) : int(offset) + int(view_numel)]


def _materialize(obj: Any) -> Any:
    """Rebuilds every `_PendingTensor` inside dicts, lists and tuples."""
    if isinstance(obj, _PendingTensor):
        return _rebuild_tensor(*obj.args)
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _read_torch_legacy(path: Path) -> Any:
    import tarfile

    with open(path, "rb") as f:
        try:
            magic = _SafeUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception:
            magic = None
        if magic != _LEGACY_MAGIC:
            if tarfile.is_tarfile(path):
                raise CheckpointError(f"{path}: torch's pre-0.4 tar format is read only with torch installed")
            raise CheckpointError(f"{path}: not a torch file (neither a zip archive nor torch's legacy format)")
        version = _SafeUnpickler(f, path).load()
        if version != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: legacy torch format of protocol {version!r}, expected {_LEGACY_PROTOCOL}")
        sys_info = _SafeUnpickler(f, path).load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise CheckpointError(f"{path}: written on a big-endian machine (or no sys info); not supported")
        unpickler = _LegacyUnpickler(f, path)
        obj = unpickler.load()
        keys = _SafeUnpickler(f, path).load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.roots):
            raise CheckpointError(f"{path}: the storage key list does not match the storages the pickle names")
        for key in keys:
            root = unpickler.roots[str(key)]
            header = f.read(8)
            numel = int.from_bytes(header, "little", signed=True) if len(header) == 8 else -1
            if numel != root.size:
                raise CheckpointError(f"{path}: storage {key}: {numel} elements stored, the pickle says {root.size}")
            if f.readinto(root.view(np.uint8)) != root.nbytes:
                raise CheckpointError(f"{path}: truncated file (storage {key} is incomplete)")
    return _materialize(obj)


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        return _read_torch_zip(path) if zipfile.is_zipfile(path) else _read_torch_legacy(path)
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
# Writing checkpoint files

_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in _STORAGE_DTYPES.items()}
_ALIGNMENT = 64  # torch aligns every entry's data to 64 bytes (its `.storage_alignment`), so files can be mmap-ed


class _TorchPickler:
    """Writes the `data.pkl` of a torch zip archive without torch, opcode by opcode, as torch's own pickler
    does (protocol 2): numpy arrays become `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
    requires_grad=False, backward_hooks=OrderedDict())` with the storage a persistent id
    `("storage", torch.FloatStorage, key, "cpu", numel)`. Only what `torch.load(weights_only=True)` accepts
    is written: dicts, OrderedDicts, lists, tuples, str, int, float, bool, None and arrays (no memo: every
    object is written once, so nothing needs one).
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self.storages: list[np.ndarray] = []  # C-contiguous, in key order "0", "1", ...

    def dump(self, obj: Any) -> bytes:
        self._out.write(pickle.PROTO + b"\x02")
        self._save(obj)
        self._out.write(pickle.STOP)
        return self._out.getvalue()

    def _global(self, module: str, name: str) -> None:
        self._out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))

    def _tuple(self, items: tuple) -> None:
        if not items:
            self._out.write(pickle.EMPTY_TUPLE)
            return
        small = {1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(items))
        if small is None:
            self._out.write(pickle.MARK)
        for item in items:
            self._save(item)
        self._out.write(small or pickle.TUPLE)

    def _items(self, items: dict) -> None:
        if items:
            self._out.write(pickle.MARK)
            for key, value in items.items():
                self._save(key)
                self._save(value)
            self._out.write(pickle.SETITEMS)

    def _int(self, x: int) -> None:
        if 0 <= x < 256:
            self._out.write(pickle.BININT1 + x.to_bytes(1, "little"))
        elif 0 <= x < 65536:
            self._out.write(pickle.BININT2 + x.to_bytes(2, "little"))
        elif -(2**31) <= x < 2**31:
            self._out.write(pickle.BININT + x.to_bytes(4, "little", signed=True))
        else:
            raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)  # two's complement, with sign bit
            self._out.write(pickle.LONG1 + bytes([len(raw)]) + raw)

    def _tensor(self, a: np.ndarray) -> None:
        if a.dtype not in _STORAGE_NAMES:
            raise CheckpointError(f"cannot write arrays of dtype {a.dtype} as torch tensors")
        a = np.array(a, order="C")  # a copy: the file holds what the array was when saved
        key = str(len(self.storages))
        self.storages.append(a)
        stride = tuple(int(np.prod(a.shape[i + 1 :], dtype=np.int64)) for i in range(a.ndim))
        self._global("torch._utils", "_rebuild_tensor_v2")
        self._out.write(pickle.MARK)
        self._out.write(pickle.MARK)  # the storage's persistent id
        self._save("storage")
        self._global("torch", _STORAGE_NAMES[a.dtype])
        for item in (key, "cpu", int(a.size)):
            self._save(item)
        self._out.write(pickle.TUPLE + pickle.BINPERSID)
        for item in (0, tuple(int(s) for s in a.shape), stride, False):
            self._save(item)
        self._global("collections", "OrderedDict")  # backward_hooks
        self._out.write(pickle.EMPTY_TUPLE + pickle.REDUCE)
        self._out.write(pickle.TUPLE + pickle.REDUCE)

    def _save(self, obj: Any) -> None:
        out = self._out
        if obj is None:
            out.write(pickle.NONE)
        elif isinstance(obj, (bool, np.bool_)):
            out.write(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, (int, np.integer)):
            self._int(int(obj))
        elif isinstance(obj, (float, np.floating)):
            out.write(pickle.BINFLOAT + struct.pack(">d", float(obj)))
        elif isinstance(obj, str):
            raw = obj.encode("utf-8", "surrogatepass")
            out.write(pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw)
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif isinstance(obj, collections.OrderedDict):
            self._global("collections", "OrderedDict")
            out.write(pickle.EMPTY_TUPLE + pickle.REDUCE)
            self._items(obj)
        elif isinstance(obj, dict):
            out.write(pickle.EMPTY_DICT)
            self._items(obj)
        elif isinstance(obj, list):
            out.write(pickle.EMPTY_LIST)
            if obj:
                out.write(pickle.MARK)
                for item in obj:
                    self._save(item)
                out.write(pickle.APPENDS)
        elif isinstance(obj, tuple):
            self._tuple(obj)
        else:
            raise CheckpointError(f"cannot write a {type(obj).__name__} into a torch checkpoint")


def _aligned_entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    """Writes one stored (uncompressed) entry whose data starts on a 64-byte boundary, padded as torch pads:
    an extra field "FB" + length + "Z" * length in the local header."""
    offset = archive.fp.tell()  # where this entry's local header goes
    start = offset + 30 + len(name.encode("utf-8"))  # 30: the fixed part of a local file header
    pad = 0 if start % _ALIGNMENT == 0 else (-(start + 4)) % _ALIGNMENT
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed: the same weights give the same file
    info.compress_type = zipfile.ZIP_STORED
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad if start % _ALIGNMENT else b""
    archive.writestr(info, data)
    if (info.header_offset + 30 + len(info.filename.encode("utf-8")) + len(info.extra)) % _ALIGNMENT:
        raise CheckpointError(f"internal error: entry {name} of the torch archive is not {_ALIGNMENT}-byte aligned")


def _write_torch_zip(path: Path, obj: Any, name: str) -> None:
    """torch's zip format (what `torch.save` writes since 1.6): `<name>/data.pkl`, `.format_version`,
    `.storage_alignment`, `byteorder`, one `data/<key>` per storage (raw little-endian bytes), `version`,
    `.data/serialization_id`; torch's <name> is the file name without its last suffix."""
    pickler = _TorchPickler()
    data_pkl = pickler.dump(obj)
    prefix = name.rsplit(".", 1)[0] or "archive"
    # torch writes a random id; ours is a digest of the contents, so the same weights give the same bytes.
    digest = hashlib.sha256(data_pkl)
    for storage in pickler.storages:
        digest.update(storage.data if storage.size else b"")
    serialization_id = str(int.from_bytes(digest.digest()[:16], "little")).zfill(40)[:40]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        _aligned_entry(archive, f"{prefix}/data.pkl", data_pkl)
        _aligned_entry(archive, f"{prefix}/.format_version", b"1")
        _aligned_entry(archive, f"{prefix}/.storage_alignment", str(_ALIGNMENT).encode())
        _aligned_entry(archive, f"{prefix}/byteorder", b"little")
        for key, storage in enumerate(pickler.storages):
            _aligned_entry(archive, f"{prefix}/data/{key}", storage.astype(storage.dtype.newbyteorder("<")).tobytes())
        _aligned_entry(archive, f"{prefix}/version", b"3\n")
        _aligned_entry(archive, f"{prefix}/.data/serialization_id", serialization_id.encode())


def _to_torch_tensors(obj: Any, torch: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, order="C"))
    if isinstance(obj, dict):
        return type(obj)((k, _to_torch_tensors(v, torch)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch_tensors(v, torch) for v in obj)
    return obj


def write_torch_checkpoint(path: str | Path, obj: Any) -> str:
    """Saves `obj` (dicts / OrderedDicts / lists of numpy arrays and plain values) in torch's zip format, as
    `torch.save` would. Uses torch when installed, else `_write_torch_zip`; returns which ("torch" or
    "cltdr_jax"). The file appears complete or not at all (written beside it, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            with open(tmp, "wb") as f:
                torch.save(_to_torch_tensors(obj, torch), f)
            writer = "torch"
        else:
            _write_torch_zip(tmp, obj, path.name)  # the archive is named after the final file
            writer = "cltdr_jax"
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return writer
