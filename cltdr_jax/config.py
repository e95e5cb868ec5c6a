"""Configuration: the reference's YAML schema as typed, frozen dataclasses.

A config file in the reference's format (``configs/*.yaml`` of the authors' repository) loads unchanged.
Missing keys take the reference defaults (REFERENCE.md section 2.2). Unlike the reference, unknown keys and
values of the wrong type are errors that name the key and the file. Fields marked "ours" are additions of
this project (ablation switches, trainer settings); their defaults give the reference behaviour.

    cfg = load_config("thumos_i3d_focalloss", overrides=["model.embd_dim=256"])  # a bundled config, or a path
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cltdr_jax.errors import CltdrError


class ConfigError(CltdrError, ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class DatasetConfig:
    json_file: str | None = None
    feat_folder: str | None = None
    file_prefix: str | None = None
    file_ext: str | None = None
    feat_stride: int = 16
    num_frames: int = 32
    default_fps: float | None = None
    input_dim: int = 2304
    num_classes: int = 97
    downsample_rate: int = 1
    max_seq_len: int = 2304
    trunc_thresh: float = 0.5
    crop_ratio: tuple[float, float] | None = None
    force_upsampling: bool = False
    # hacs only: feature layout, one of i3d | slowfast | tsp.
    backbone_type: str | None = None
    # thumos_new only: suffix inserted before the extension.
    feature_type: str = ""
    # multithumos only. None (ours): slice to the RGB half only when input_dim is 1024 (REFERENCE.md 12.10).
    rgb_only: bool | None = None
    # ours: HACS SlowFast `.pkl` features are pickles; reading them needs this explicit opt-in.
    allow_pickle_features: bool = False


@dataclass(frozen=True)
class ModelConfig:
    backbone_type: str = "SGP"
    fpn_type: str = "identity"
    backbone_arch: tuple[int, int, int] = (2, 2, 5)
    scale_factor: int = 2
    regression_range: tuple[tuple[float, float], ...] = (
        (0, 4),
        (4, 8),
        (8, 16),
        (16, 32),
        (32, 64),
        (64, 10000),
    )
    n_sgp_win_size: int = -1
    embd_kernel_size: int = 3
    embd_dim: int = 512
    embd_with_ln: bool = True
    fpn_dim: int = 512
    fpn_with_ln: bool = True
    head_dim: int = 512
    head_kernel_size: int = 3
    boudary_kernel_size: int = 3  # (sic) the reference's spelling
    head_num_layers: int = 3
    head_with_ln: bool = True
    max_buffer_len_factor: float = 6.0
    use_abs_pe: bool = False
    use_trident_head: bool = True
    downsample_type: str = "max"
    k: float = 1.5  # no effect in the reference (REFERENCE.md 1.2); kept so its configs load
    init_conv_vars: float = 0.0
    num_bins: int = 16
    iou_weight_power: float = 1.0
    input_noise: float = 0.0
    sgp_mlp_dim: int | None = None
    # Derived from the dataset section (REFERENCE.md 2.1); a value given here is overwritten.
    input_dim: int | None = None
    num_classes: int | None = None
    max_seq_len: int | None = None
    # ours: ablation switches of the paper's Tables 6-11. Defaults build the reference model.
    gmg_branches: tuple[str, ...] = ("instant", "local", "global")  # Table 6
    gmg_gate: bool = True  # Table 7: False adds the branches instead of multiplying them
    cls_fusion_levels: tuple[str, ...] = ("above",)  # Table 9: neighbours fused into cls features
    reg_fusion_levels: tuple[str, ...] = ("below",)  # Table 9: neighbours fused into reg features
    fusion: str = "attention"  # Table 11: attention | add | concat
    refine_cls: bool = True  # Table 10
    refine_reg: bool = True  # Table 10
    extend_point_buffer: bool = False  # ours: lift the reference's "max buffer length" abort (12.9)


@dataclass(frozen=True)
class TrainConfig:
    center_sample: str = "radius"
    center_sample_radius: float = 1.5
    loss_weight: float = 1.0
    cls_prior_prob: float = 0.01
    init_loss_norm: float = 2000.0
    clip_grad_l2norm: float = -1.0
    head_empty_cls: tuple[int, ...] = ()
    dropout: float = 0.0
    droppath: float = 0.1
    label_smoothing: float = 0.0
    # ours: the classification losses the reference selects by editing code (REFERENCE.md 2.4, 12.6).
    refined_cls_loss: str = "varifocal"  # varifocal | focal
    coarse_cls_loss: str = "focal"  # focal | varifocal
    refined_loss_weight: float = 0.7  # the coarse term gets 1 - this


@dataclass(frozen=True)
class TestConfig:
    pre_nms_thresh: float = 0.001
    pre_nms_topk: int = 5000
    iou_threshold: float = 0.1
    min_score: float = 0.01
    max_seg_num: int = 1000
    nms_method: str = "soft"
    nms_sigma: float = 0.5
    duration_thresh: float = 0.05
    multiclass_nms: bool = True
    ext_score_file: str | None = None
    voting_thresh: float = 0.75


@dataclass(frozen=True)
class OptConfig:
    type: str = "AdamW"
    momentum: float = 0.9
    weight_decay: float = 0.0
    learning_rate: float = 1e-3
    epochs: int = 30
    warmup: bool = True
    warmup_epochs: int = 5
    schedule_type: str = "cosine"
    eta_min: float = 1e-8
    schedule_steps: tuple[int, ...] = ()
    schedule_gamma: float = 0.1


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 8
    # Data-loading worker processes (grain). The reference's default is 4 PyTorch workers; ours is 0 (load in
    # the main process), which on a CPU trainer leaves the cores to XLA. Batches do not depend on it.
    num_workers: int = 0


@dataclass(frozen=True)
class TrainerConfig:
    """ours: how `cltdr train` runs (not part of the reference schema)."""

    compute_dtype: str = "float32"  # float32 | bfloat16 (parameters and optimizer state stay float32)
    # Matmul / convolution precision of training. "default" is what the reference's own GPU training runs
    # (TF32 convolutions on A100 / H100 / H200); on a CPU it is the same arithmetic as "highest".
    precision: str = "default"
    # Recompute these parts' activations in the backward pass instead of keeping them (less memory, more
    # compute): gmg (each GMG block), heads (classification, Trident and refine heads), fusion (the decoupled
    # and cross-level fusions feeding the heads); remat_policy says what they keep: nothing, or dots (the
    # matmul outputs).
    remat: tuple[str, ...] = ()
    remat_policy: str = "nothing"
    ema_decay: float = 0.999
    eval_every_epochs: int = 0  # 0: evaluate only after the last epoch
    checkpoint_every_steps: int = 0  # 0: once per epoch
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    max_steps: int = 0  # 0: the full schedule; >0 stops early (smoke runs)
    tensorboard: bool = False  # also write every logged scalar as TensorBoard event files (needs tensorboardX)
    # Deprecated alias of loader.num_workers (configs written before it drove the workers); where given, wins.
    grain_workers: int | None = None


@dataclass(frozen=True)
class InferenceConfig:
    """ours: how `cltdr predict`, `cltdr eval` and training's evaluations run the network."""

    dtype: str = "float32"  # float32 | bfloat16 (`--dtype`)
    # "highest" reproduces the reference's float32 detections exactly on every backend.
    precision: str = "highest"
    batch_size: int = 0  # videos of one padded length per call (`--batch-size`); 0: 1 on a CPU, 4 on accelerators


@dataclass(frozen=True)
class Config:
    init_rand_seed: int = 1234567891
    dataset_name: str = "epic"
    devices: tuple[str, ...] = ("cuda:0",)
    train_split: tuple[str, ...] = ("training",)
    val_split: tuple[str, ...] = ("validation",)
    model_name: str = "TriDet"
    output_folder: str | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train_cfg: TrainConfig = field(default_factory=TrainConfig)
    test_cfg: TestConfig = field(default_factory=TestConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # Directory of the YAML file (ours): not used to resolve paths, which are relative to the working
    # directory as in the reference, but kept for messages.
    source: str | None = None

    @property
    def data_workers(self) -> int:
        """Grain worker processes for training batches: loader.num_workers (trainer.grain_workers, the old
        name, where a config still gives it)."""
        if self.trainer.grain_workers is not None:
            return self.trainer.grain_workers
        return self.loader.num_workers

    # ----- quantities the reference derives from the config -----
    @property
    def num_levels(self) -> int:
        return self.model.backbone_arch[2] + 1

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.model.scale_factor**l for l in range(self.num_levels))

    @property
    def max_div_factor(self) -> int:
        """F of REFERENCE.md section 3: inference lengths above max_seq_len pad to a multiple of it."""
        w = self.model.n_sgp_win_size
        return max(s * w if w > 1 else s for s in self.strides)

    def padded_length(self, length: int) -> int:
        """T_pad of REFERENCE.md section 3 for a video of `length` feature steps."""
        max_len = self.dataset.max_seq_len
        if length <= max_len:
            return max_len
        f = self.max_div_factor
        return -(-length // f) * f

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return _plain(out)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------------
# Loading


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Checks `value` against a type annotation and converts lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: null is not allowed")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # PyYAML reads "1e-4" (no dot) as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of a YAML-like config dict with `key.path=value` overrides applied (values parsed as YAML)."""
    data = _plain(dict(data or {}))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] = ()) -> Config:
    """Builds a Config from a YAML-like dict, applying `key.path=value` overrides (values parsed as YAML)."""
    data = apply_overrides(data, overrides)
    try:
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return _derive(cfg, source)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Reads a config in the reference's YAML format; `overrides` are `section.key=value` strings.

    `path` is a file, or the name of a bundled config (`thumos_i3d_focalloss`, see `bundled_configs`).
    """
    path = resolve_config(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return config_from_dict(data or {}, source=str(path), overrides=overrides)


# ---------------------------------------------------------------------------------------------------
# The bundled configs: the reference's 11 configs of `configs/`, shipped inside the package


@dataclass(frozen=True)
class BundledConfig:
    name: str  # file name without .yaml: what `load_config` and every CONFIG argument accept
    path: Path
    description: str  # the header's first line: dataset, classes, features
    reference: bool  # one of the authors' 11 configs (else an extra, whose header says why it exists)
    result: str | None  # the paper's result it corresponds to, e.g. "THUMOS14 I3D"
    average_map: float | None  # that result's average mAP (%)
    tiou: str | None  # its tIoU thresholds, e.g. "0.3:0.1:0.7"


_PAPER_RESULT = re.compile(r"Paper result: (?P<what>[^,]+), average mAP (?P<map>[\d.]+) \(tIoU (?P<tiou>[\d.:]+)\)")


def bundled_config_dir() -> Path:
    """The bundled configs: `configs/` of the checkout (a source tree or an editable install), or its copy in
    an installed wheel (pyproject.toml maps `configs/` to `cltdr_jax/configs`)."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


def bundled_configs() -> list[BundledConfig]:
    """Every bundled config with the facts its header comment states (reference configs first)."""
    out = []
    for path in sorted(bundled_config_dir().glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip())
        text = " ".join(header)
        m = _PAPER_RESULT.search(text)
        out.append(
            BundledConfig(
                name=path.stem,
                path=path,
                description=header[0] if header else "",
                reference="The reference's configs/" in text,
                result=m["what"] if m else None,
                average_map=float(m["map"]) if m else None,
                tiou=m["tiou"] if m else None,
            )
        )
    return sorted(out, key=lambda c: not c.reference)


def resolve_config(path: str | Path) -> Path:
    """A config file; a bundled config's name (or `configs/<name>.yaml` where no such file exists here, as
    the README's examples write it) gives the bundled file."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    bundled = bundled_config_dir() / f"{name}.yaml"
    if str(path.parent) in (".", "configs") and bundled.is_file():
        return bundled
    names = ", ".join(c.name for c in bundled_configs() if c.reference)
    raise ConfigError(
        f"{path}: config file not found, nor a bundled config of that name ({names}; `cltdr configs` lists them)"
    )


# trainer.remat: the model parts whose activations can be recomputed (model/detector.py).
REMAT_PARTS = ("gmg", "heads", "fusion")

_CHOICES = {
    "model.backbone_type": ("SGP",),
    "model.fpn_type": ("identity",),
    "model.downsample_type": ("max",),
    "model.fusion": ("attention", "add", "concat"),
    "train_cfg.refined_cls_loss": ("varifocal", "focal"),
    "train_cfg.coarse_cls_loss": ("focal", "varifocal"),
    "train_cfg.center_sample": ("radius",),
    "test_cfg.nms_method": ("soft",),
    "opt.type": ("AdamW",),
    "opt.schedule_type": ("cosine",),
    "trainer.compute_dtype": ("float32", "bfloat16"),
    "trainer.precision": ("default", "high", "highest"),
    "trainer.remat_policy": ("nothing", "dots"),
    "inference.dtype": ("float32", "bfloat16"),
    "inference.precision": ("default", "high", "highest"),
}


def _derive(cfg: Config, source: str) -> Config:
    """Copies the dataset-derived model fields (REFERENCE.md 2.1) and checks cross-field constraints."""
    m, d = cfg.model, cfg.dataset

    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    for dotted, allowed in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            fail(f"{dotted}: {value!r} is not supported; choose one of {', '.join(allowed)}")
    if m.sgp_mlp_dim is None:
        fail("model.sgp_mlp_dim is required (the reference has no default for it)")
    if m.embd_dim != m.fpn_dim:
        fail(f"model.fpn_dim ({m.fpn_dim}) must equal model.embd_dim ({m.embd_dim}) for the identity neck")
    if m.embd_dim % 16:
        fail(f"model.embd_dim ({m.embd_dim}) must be a multiple of 16 (GroupNorm with 16 groups)")
    if m.scale_factor != 2:
        fail("model.scale_factor must be 2 (the reference assumes it)")
    if len(m.regression_range) != m.backbone_arch[2] + 1:
        fail(
            f"model.regression_range has {len(m.regression_range)} entries but backbone_arch "
            f"{list(m.backbone_arch)} builds {m.backbone_arch[2] + 1} levels"
        )
    for part in cfg.trainer.remat:
        if part not in REMAT_PARTS:
            fail(f"trainer.remat: unknown part {part!r} ({', '.join(REMAT_PARTS)})")
    for branch in m.gmg_branches:
        if branch not in ("instant", "local", "global"):
            fail(f"model.gmg_branches: unknown branch {branch!r} (instant, local, global)")
    for name in ("cls_fusion_levels", "reg_fusion_levels"):
        for level in getattr(m, name):
            if level not in ("above", "below"):
                fail(f"model.{name}: unknown level {level!r} (above, below)")
    for key in ("head_kernel_size", "boudary_kernel_size", "embd_kernel_size"):
        if getattr(m, key) % 2 == 0:
            fail(f"model.{key} must be odd")
    if d.crop_ratio is not None and not (0 < d.crop_ratio[0] <= d.crop_ratio[1]):
        fail(f"dataset.crop_ratio must be [lo, hi] with 0 < lo <= hi, got {list(d.crop_ratio)}")
    if d.max_seq_len % (2 ** m.backbone_arch[2]):
        fail(f"dataset.max_seq_len ({d.max_seq_len}) must be divisible by 2**{m.backbone_arch[2]}")
    model = dataclasses.replace(m, input_dim=d.input_dim, num_classes=d.num_classes, max_seq_len=d.max_seq_len)
    return dataclasses.replace(cfg, model=model, source=source)
