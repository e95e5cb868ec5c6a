"""The network and decoding as serialized XLA programs (`jax.export`), and a predictor that runs them.

    cltdr export CONFIG CHECKPOINT OUT_DIR [--lengths 2304,4608 | split] [--platforms cpu,cuda]
    cltdr predict CONFIG --exported OUT_DIR --out dets.json [--split S | --features F ...]

OUT_DIR holds one program per padded length and a manifest:

    network_T{T}.bin   `jax.export` serialization: StableHLO bytecode of `Predictor`'s jitted function
                       (network + Trident decoding, in `cfg.inference`'s dtype and precision) with the
                       weights inside as constants, for inputs feats float32 [B, T, D_in] and mask bool
                       [B, T]; outputs (scores, left, right), each float32 [B, sum_l T / s_l, C], the
                       levels concatenated in time (grid units)
    network_T{T}.mlirbc  with --stablehlo: the bare StableHLO module of the same program, for runtimes
                       outside JAX (with several platforms its first argument is the platform index)
    manifest.json      format and version, the config, class names, strides, lengths, platforms, dtype,
                       batch size, input dim, the model's digest and each file's sha256

Candidate selection and Soft-NMS stay on the host (`postprocess`), exactly as for the in-process model, so
`cltdr predict --exported` gives the same detections; nothing of the Flax model is built or run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cltdr_jax.config import Config, config_from_dict
from cltdr_jax.errors import CheckpointError, DataError
from cltdr_jax.inference import Predictor
from cltdr_jax.points import check_point_buffer
from cltdr_jax.xla_options import compiler_options

log = logging.getLogger(__name__)

FORMAT = "cltdr-jax exported network"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def program_name(padded_len: int) -> str:
    return f"network_T{padded_len}.bin"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_identity(cfg: Config) -> dict[str, Any]:
    """The config values the programs depend on: the model section, which holds the input width, the
    classes, the maximum length and the pyramid (paths, training and post-processing settings do not)."""
    return {"model": cfg.to_dict()["model"], "max_seq_len": cfg.dataset.max_seq_len}


def model_digest(cfg: Config) -> str:
    return _sha256(json.dumps(model_identity(cfg), sort_keys=True).encode())


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {json.dumps(a)} in the export, {json.dumps(b)} in the config"]


# ---------------------------------------------------------------------------------------------------
# Which padded lengths


def _feature_length(path: Path, cfg: Config, video_id: str) -> int:
    """Time steps the model sees for one video; .npy files are only opened for their header."""
    from cltdr_jax.data.datasets import rgb_columns
    from cltdr_jax.data.features import read_features

    if path.suffix.lower() == ".npy" and path.is_file():
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
                if len(shape) == 2:
                    return math.ceil(shape[0] / cfg.dataset.downsample_rate)
    # Other formats are read whole (and bad files get read_features' messages).
    return read_features(path, cfg.dataset, video_id, columns=rgb_columns(cfg)).shape[0]


def split_padded_lengths(cfg: Config, split: str | None = None) -> list[int]:
    """Every distinct padded length (REFERENCE.md 3) of the videos of `split` (default: the evaluation split)."""
    from cltdr_jax.data.datasets import VideoDataset

    split = split or cfg.val_split[0]
    dataset = VideoDataset(cfg, (split,), training=False)
    if not len(dataset):
        raise DataError(f"{cfg.dataset.json_file}: split {split!r} has no videos with features")
    lengths = {cfg.padded_length(_feature_length(r.feature_path, cfg, r.video_id)) for r in dataset.records}
    return sorted(lengths)


def check_padded_length(cfg: Config, padded_len: int) -> None:
    """Refuses a length no video can be padded to, or one the point buffer does not cover."""
    t, f = cfg.dataset.max_seq_len, cfg.max_div_factor
    if padded_len != t and not (padded_len > t and padded_len % f == 0):
        raise DataError(
            f"{padded_len} is not a padded length of this config: videos are padded to {t}, or above it to a "
            f"multiple of {f} (REFERENCE.md 3)"
        )
    check_point_buffer(
        padded_len, cfg.strides, t, cfg.model.max_buffer_len_factor, extend=cfg.model.extend_point_buffer
    )


# ---------------------------------------------------------------------------------------------------
# Writing


def export_programs(
    cfg: Config,
    params: Any,
    out_dir: str | Path,
    lengths: Sequence[int],
    platforms: Sequence[str] = ("cpu", "cuda"),
    class_names: Sequence[str] | None = None,
    stablehlo: bool = False,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Serializes the network + decoding once per padded length into `out_dir`; returns the manifest.

    The function exported is the very one `Predictor` compiles, with `params` closed over: the weights
    become constants of each program. `cfg.inference` sets the compute dtype and precision, and the batch
    size (0 there means 1 here). The manifest is written last, so a directory with one is complete.
    """
    from jax import export as jax_export

    out_dir = Path(out_dir)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise DataError(f"unknown platform(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(PLATFORMS)}")
    for t in lengths:
        check_padded_length(cfg, t)
    if out_dir.exists():
        others = [p.name for p in out_dir.iterdir() if p.name != MANIFEST and not p.name.startswith("network_T")]
        if others:
            raise DataError(f"{out_dir}: not empty and not an earlier export ({', '.join(sorted(others)[:5])})")
        for p in out_dir.glob("network_T*"):  # an earlier export's programs: replaced as a whole
            p.unlink()
        (out_dir / MANIFEST).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    batch_size = cfg.inference.batch_size or 1
    predictor = Predictor(cfg, params, batch_size=batch_size)
    weights = predictor.params

    def network(feats: jax.Array, mask: jax.Array):
        return predictor.forward(weights, feats, mask)

    d = cfg.dataset.input_dim
    programs = {}
    for t in sorted(set(lengths)):
        inputs = predictor.abstract_inputs(t, d)
        exported = jax_export.export(jax.jit(network), platforms=tuple(platforms))(*inputs)
        data = bytes(exported.serialize())
        name = program_name(t)
        _write(out_dir / name, data)
        entry = {"file": name, "sha256": _sha256(data), "bytes": len(data), "levels": [t // s for s in cfg.strides]}
        if stablehlo:
            module = bytes(exported.mlir_module_serialized)
            _write(out_dir / f"network_T{t}.mlirbc", module)
            entry["stablehlo"] = {"file": f"network_T{t}.mlirbc", "sha256": _sha256(module)}
        programs[str(t)] = entry
        log.info("exported padded length %d: %s (%.1f MB)", t, name, len(data) / 1e6)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_with": {"cltdr_jax": _version(), "jax": jax.__version__},
        "model_digest": model_digest(cfg),
        "config": cfg.to_dict(),
        "class_names": list(class_names or [str(i) for i in range(cfg.dataset.num_classes)]),
        "num_classes": cfg.dataset.num_classes,
        "input_dim": d,
        "strides": list(cfg.strides),
        "max_seq_len": cfg.dataset.max_seq_len,
        "max_div_factor": cfg.max_div_factor,
        "lengths": sorted(int(t) for t in programs),
        "platforms": list(platforms),
        "dtype": cfg.inference.dtype,
        "precision": cfg.inference.precision,
        "batch_size": batch_size,
        "inputs": {"feats": f"float32 [{batch_size}, T, {d}]", "mask": f"bool [{batch_size}, T]"},
        "outputs": {
            "scores": "float32 [B, sum_l T_l, C]: sigmoid of the refined class logits, 0 on padding",
            "left": "float32 [B, sum_l T_l, C]: segment starts in feature-grid units",
            "right": "float32 [B, sum_l T_l, C]: segment ends in feature-grid units",
            "levels": "T_l = T / strides[l], levels concatenated in time in pyramid order",
        },
        "programs": programs,
        "source": source or {},
    }
    _write(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cltdr-jax")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# Reading and running


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export directory, checked for its format."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        what = "directory not found" if not directory.is_dir() else f"no {MANIFEST}"
        raise CheckpointError(f"{directory}: {what}; expected a directory written by `cltdr export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not the manifest of a `cltdr export` directory")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r}; this cltdr-jax reads version {FORMAT_VERSION} "
            "(export again, or upgrade cltdr-jax)"
        )
    return manifest


def _backend_platform() -> str:
    platform = jax.default_backend()
    if platform == "gpu":  # jax names CUDA and ROCm devices "gpu"
        platform = "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
    return platform


class ExportedPredictor(Predictor):
    """`Predictor` whose programs come from an export directory instead of the Flax model.

    Everything but the program is `Predictor`'s: padding, the point-buffer check, batching, splitting the
    levels and the NaN check. The programs hold their weights, so `params` is None.
    """

    def __init__(self, directory: str | Path, cfg: Config | None = None):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        if cfg is None:
            cfg = config_from_dict(m["config"], source=str(self.directory / MANIFEST))
        elif m.get("model_digest") != model_digest(cfg):
            diffs = _differences(m.get("config", {}).get("model", {}), model_identity(cfg)["model"], "model.")
            if m.get("config", {}).get("dataset", {}).get("max_seq_len") != cfg.dataset.max_seq_len:
                diffs.append(f"dataset.max_seq_len: {m['config']['dataset'].get('max_seq_len')} in the export")
            listed = "\n  ".join(diffs[:10] or ["(the model digests differ)"])
            raise CheckpointError(
                f"{self.directory} was exported from a model of another config than {cfg.source}:\n  {listed}"
            )
        platform = _backend_platform()
        if platform not in m.get("platforms", []):
            raise CheckpointError(
                f"{self.directory}: exported for {', '.join(m.get('platforms', []))}; this process runs on "
                f"{platform} (export again with --platforms including {platform})"
            )
        super().__init__(cfg, None, batch_size=int(m.get("batch_size", 1)))
        self._programs = {int(t): self._load(int(t), entry) for t, entry in m.get("programs", {}).items()}
        log.info("%s: %d exported programs (padded lengths %s)", self.directory, len(self._programs), self.lengths)

    @property
    def lengths(self) -> list[int]:
        return sorted(self._programs)

    def _load(self, padded_len: int, entry: dict[str, Any]) -> Any:
        from jax import export as jax_export

        path = self.directory / str(entry.get("file", ""))
        if not path.is_file():
            raise CheckpointError(f"{path}: missing program for padded length {padded_len} (listed in {MANIFEST})")
        data = path.read_bytes()
        if _sha256(data) != entry.get("sha256"):
            raise CheckpointError(f"{path}: corrupt program (its sha256 differs from the manifest's); export again")
        try:
            exported = jax_export.deserialize(bytearray(data))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot deserialize the program: {e}") from None
        want = ((self.batch_size, padded_len, self.cfg.dataset.input_dim), (self.batch_size, padded_len))
        got = tuple(tuple(a.shape) for a in exported.in_avals)
        if got != want:
            raise CheckpointError(f"{path}: a program for inputs {got}, the manifest says {want}")
        return exported

    @property
    def params(self) -> Any:
        return None

    @params.setter
    def params(self, params: Any) -> None:
        if params is not None:
            raise AttributeError("an exported predictor's weights are inside its programs")

    def padded_length(self, feats: np.ndarray, video_id: str = "?") -> int:
        padded = super().padded_length(feats, video_id)
        if padded not in self._programs:
            raise DataError(
                f"video {video_id!r}: padded length {padded} has no exported program in {self.directory} "
                f"(exported: {', '.join(map(str, self.lengths)) or 'none'}); export again with "
                f"--lengths {','.join(map(str, sorted({*self.lengths, padded})))}"
            )
        return padded

    def _compile(self, padded_len: int, input_dim: int) -> Any:
        """The deserialized program, called as `Predictor` calls its executables: (params, feats, mask)."""
        # Compiled with the options `Predictor` uses: the same detections to the last bit.
        program = jax.jit(
            self._programs[padded_len].call, compiler_options=compiler_options(compute_dtype=self.manifest.get("dtype"))
        )
        compiled = program.lower(*self.abstract_inputs(padded_len, input_dim)).compile()
        return lambda _params, feats, mask: compiled(feats, mask)
