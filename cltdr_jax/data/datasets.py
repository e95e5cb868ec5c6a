"""Annotation loading and the per-video dataset (REFERENCE.md section 9).

Annotation files are ActivityNet-style JSON: `{"database": {video_id: {"subset", "duration", "fps",
"annotations": [{"label", "label_id", "segment": [start_s, end_s]}]}}}`. `dataset_name` picks the loader's
rules: `thumos`, `thumos_new`, `multithumos`, `epic`, `anet`, `hacs`, and `custom` (any ActivityNet-format
JSON: duration required, fps from the JSON unless `default_fps` is set, missing feature files skipped).

Validation. These are errors (`DataError` naming the file and the video): malformed JSON, no `database`,
a video id listed twice, a video without `subset` or `annotations`, a missing duration where the loader
requires one (anet, hacs, custom; the others use 1e8 as the reference does), a missing fps when
`default_fps` is null, an annotation without `label` / integer `label_id` / a two-number `segment`, a
`label_id` outside [0, num_classes) (unless num_classes is 1, class-agnostic), one label name with two
ids or one id with two names, the wrong number of classes (thumos family and hacs: exactly num_classes).

Segment policy (the reference keeps every segment as published; we clean them and say so):

* **dropped with a warning** and counted in `info`: reversed segments (end < start: `dropped_reversed`),
  zero-length ones (end == start: `dropped_zero_length`) and segments entirely outside the video
  (end <= 0 or start >= duration: `dropped_outside`). With `strict=True` each of these is an error.
* **kept with a warning** and counted: segments that overlap the video but start before 0 or end after the
  duration (`partly_outside`); they are not clipped (the training filters and the crop handle them).
* anet and hacs also drop duplicates (same label_id, both boundaries within 1e-3 s; the reference does
  this too) and count them in `duplicates`.

What this does to the real files in ../shared/data: THUMOS14 keeps 3,003 of 3,007 Validation and 3,332
of 3,358 Test instances (4 and 26 segments lie wholly after the stated duration); MultiTHUMOS keeps
18,471 of 18,482 and 20,130 of 20,186 (reversed, zero-length and wholly-after-the-end segments). Nothing
fails. Dropped segments stay on the record (`dropped_segments_sec`, `dropped_labels`) so that
`ground_truth_dict` can hand the evaluator the ground truth as published, which is what the reference's
mAP counts.

Missing feature files: thumos, multithumos and custom skip the video (a warning lists every skipped id;
`info["skipped"]`), as the reference does silently; the other loaders raise a `DataError` at load time
naming the missing file (the reference would crash later, on first access).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax.config import Config
from cltdr_jax.data.features import read_features
from cltdr_jax.data.transforms import truncate_feats
from cltdr_jax.errors import DataError

logger = logging.getLogger(__name__)

DATASET_NAMES = ("thumos", "thumos_new", "multithumos", "epic", "anet", "hacs", "custom")
_EXACT_CLASS_COUNT = ("thumos", "thumos_new", "multithumos", "hacs")
_SKIP_MISSING_FEATURES = ("thumos", "multithumos", "custom")
_DURATION_REQUIRED = ("anet", "hacs", "custom")
_DEDUPLICATE = ("anet", "hacs")
_MISSING_DURATION = 1e8  # the reference's stand-in for an unknown duration
_DUPLICATE_TOL = 1e-3  # seconds
_MAX_EXAMPLES = 5


@dataclass
class VideoRecord:
    """One video of the annotation file, after validation.

    `segments_sec` is float64 (the JSON values unchanged, so ground truth reaches the evaluator exactly);
    the dataset rounds it to float32 before mapping to the feature grid, as the reference does.
    `labels` are the JSON `label_id`s (for class-agnostic configs the dataset turns them into 0).
    """

    video_id: str
    subset: str
    duration: float
    fps: float
    segments_sec: np.ndarray  # [N, 2] float64, seconds
    labels: np.ndarray  # [N] int32
    feature_path: Path
    dropped_segments_sec: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [K, 2]
    dropped_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))  # [K]


# ---------------------------------------------------------------------------------------------------
# Reading the JSON


def _read_database(path: Path) -> dict[str, Any]:
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                duplicates.append(key)
            out[key] = value
        return out

    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=pairs_hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
        raise DataError(f"{path}: expected an object with a 'database' mapping video ids to records")
    database = data["database"]
    for key in duplicates:
        if key in database:
            raise DataError(f"{path}: video {key!r} is listed twice in 'database'")
    if duplicates:
        raise DataError(f"{path}: key {duplicates[0]!r} appears twice in one JSON object")
    return database


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _annotations(path: Path, video_id: str, entry: Any) -> list[dict[str, Any]]:
    if not isinstance(entry, dict):
        raise DataError(f"{path}: video {video_id!r}: expected a record object, got {type(entry).__name__}")
    if "annotations" not in entry:
        raise DataError(f"{path}: video {video_id!r} has no 'annotations' list (use [] for none)")
    annotations = entry["annotations"]
    if not isinstance(annotations, list):
        raise DataError(f"{path}: video {video_id!r}: 'annotations' must be a list")
    for i, act in enumerate(annotations):
        where = f"{path}: video {video_id!r}, annotation {i}"
        if not isinstance(act, dict):
            raise DataError(f"{where}: expected an object")
        if not isinstance(act.get("label"), str):
            raise DataError(f"{where}: missing or non-string 'label'")
        label_id = act.get("label_id")
        if isinstance(label_id, bool) or not isinstance(label_id, int):
            raise DataError(f"{where} ({act['label']!r}): missing or non-integer 'label_id' ({label_id!r})")
        seg = act.get("segment")
        if not (isinstance(seg, (list, tuple)) and len(seg) == 2 and all(_number(v) for v in seg)):
            raise DataError(f"{where} ({act['label']!r}): 'segment' must be [start_s, end_s], got {seg!r}")
    return annotations


def _label_map(path: Path, database: dict[str, Any], num_classes: int) -> dict[str, int]:
    """name -> label_id over every video of the file, whatever its subset (as the reference)."""
    label_map: dict[str, int] = {}
    names_of: dict[int, str] = {}
    for video_id, entry in database.items():
        for act in _annotations(path, video_id, entry):
            name, label_id = act["label"], act["label_id"]
            if label_id < 0 or (num_classes > 1 and label_id >= num_classes):
                raise DataError(
                    f"{path}: video {video_id!r}: label {name!r} has label_id {label_id}, outside "
                    f"[0, {num_classes}) (dataset.num_classes is {num_classes})"
                )
            if label_map.setdefault(name, label_id) != label_id:
                raise DataError(
                    f"{path}: video {video_id!r}: label {name!r} has label_id {label_id} here but "
                    f"{label_map[name]} elsewhere"
                )
            if names_of.setdefault(label_id, name) != name:
                raise DataError(
                    f"{path}: video {video_id!r}: label_id {label_id} is {name!r} here but "
                    f"{names_of[label_id]!r} elsewhere"
                )
    return label_map


def _deduplicate(acts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drops an annotation when an earlier kept one has its label_id and both boundaries within 1e-3 s."""
    kept: list[dict[str, Any]] = []
    for act in acts:
        s, e = act["segment"]
        if not any(
            k["label_id"] == act["label_id"]
            and abs(k["segment"][0] - s) <= _DUPLICATE_TOL
            and abs(k["segment"][1] - e) <= _DUPLICATE_TOL
            for k in kept
        ):
            kept.append(act)
    return kept


def _segment_problem(start: float, end: float, duration: float) -> str | None:
    if end < start:
        return "reversed"
    if end == start:
        return "zero_length"
    if end <= 0 or start >= duration:
        return "outside"
    return None


def _feature_path(cfg: Config, video_id: str, splits: tuple[str, ...]) -> Path:
    d, name = cfg.dataset, cfg.dataset_name
    folder, ext, prefix = Path(d.feat_folder or "."), d.file_ext or "", d.file_prefix or ""
    if name == "hacs":
        if d.backbone_type == "tsp":
            return folder / f"v_{video_id}{ext}"
        return folder / splits[0] / f"{video_id}{ext}"
    if name == "thumos_new":
        return folder / f"{prefix}{video_id}{d.feature_type}{ext}"
    return folder / f"{prefix}{video_id}{ext}"


def _check_config(cfg: Config) -> None:
    d, name = cfg.dataset, cfg.dataset_name
    where = cfg.source or "config"
    if name not in DATASET_NAMES:
        raise DataError(f"{where}: dataset_name {name!r} is unknown; choose one of {', '.join(DATASET_NAMES)}")
    if not d.json_file:
        raise DataError(f"{where}: dataset.json_file is not set")
    if name == "hacs":
        if d.file_prefix:
            raise DataError(f"{where}: the hacs loader takes no dataset.file_prefix (got {d.file_prefix!r})")
        if d.backbone_type not in ("i3d", "slowfast", "tsp"):
            raise DataError(f"{where}: hacs needs dataset.backbone_type i3d, slowfast or tsp")
    if d.force_upsampling:
        raise DataError(f"{where}: dataset.force_upsampling is not supported (no shipped config enables it)")


def _fps_and_duration(cfg: Config, path: Path, video_id: str, entry: dict[str, Any]) -> tuple[float, float]:
    d = cfg.dataset
    if d.default_fps is not None:
        fps = float(d.default_fps)
    elif _number(entry.get("fps")) and entry["fps"] > 0:
        fps = float(entry["fps"])
    else:
        raise DataError(
            f"{path}: video {video_id!r} has no valid 'fps' ({entry.get('fps')!r}) and dataset.default_fps is not set"
        )
    raw = entry.get("duration")
    if raw is None and cfg.dataset_name not in _DURATION_REQUIRED:
        return fps, _MISSING_DURATION
    try:
        duration = float(raw)  # hacs stores it as a string
    except (TypeError, ValueError):
        duration = float("nan")
    if not (np.isfinite(duration) and duration > 0):
        raise DataError(f"{path}: video {video_id!r}: missing or invalid 'duration' ({raw!r})")
    return fps, duration


_POLICY_MESSAGES = {
    "dropped_reversed": "reversed segments (end < start) dropped",
    "dropped_zero_length": "zero-length segments dropped",
    "dropped_outside": "segments entirely outside [0, duration] dropped",
    "partly_outside": "segments starting before 0 or ending after the duration kept",
    "duplicates": "duplicate annotations (same label_id, boundaries within 1e-3 s) dropped",
}


def _apply_segment_policy(
    path: Path,
    video_id: str,
    acts: list[dict[str, Any]],
    duration: float,
    strict: bool,
    info: dict[str, Any],
    examples: dict[str, list[str]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Splits annotations into kept and dropped ones (module docstring), counting both in `info`."""
    kept, dropped = [], []
    for act in acts:
        start, end = act["segment"]
        problem = _segment_problem(start, end, duration)
        where = f"[{start}, {end}] (duration {duration})"
        if problem is None:
            kept.append(act)
            if start < 0 or end > duration:
                info["partly_outside"] += 1
                examples["partly_outside"].append(f"{video_id} {where}")
            continue
        if strict:
            raise DataError(f"{path}: video {video_id!r}: {problem.replace('_', '-')} segment {where}")
        dropped.append(act)
        info[f"dropped_{problem}"] += 1
        examples[f"dropped_{problem}"].append(f"{video_id} {where}")
    return kept, dropped


def _arrays(acts: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """`([N, 2] float64 seconds, [N] int32 label_ids)` of validated annotations."""
    segments = np.array([a["segment"] for a in acts], dtype=np.float64).reshape(-1, 2)
    return segments, np.array([a["label_id"] for a in acts], dtype=np.int32)


def load_annotations(
    cfg: Config, splits: tuple[str, ...] | list[str], *, require_features: bool = True, strict: bool = False
) -> tuple[list[VideoRecord], list[str], dict[str, Any]]:
    """Reads `cfg.dataset.json_file` and returns the videos of `splits` (compared lower-cased).

    Returns `(records, class_names, info)`: `class_names[label_id]` is the class name (classes absent from
    the file are named `class_<id>`); `info` counts what the segment policy in the module docstring did and
    lists skipped videos. `require_features=False` checks no feature files (annotation-only use).
    """
    _check_config(cfg)
    d, name = cfg.dataset, cfg.dataset_name
    splits = tuple(splits)
    wanted = {s.lower() for s in splits}
    path = Path(d.json_file)
    database = _read_database(path)
    label_map = _label_map(path, database, d.num_classes)
    if name in _EXACT_CLASS_COUNT and d.num_classes != 1 and len(label_map) != d.num_classes:
        raise DataError(f"{path}: {len(label_map)} classes are annotated but dataset.num_classes is {d.num_classes}")
    size = max(d.num_classes, max(label_map.values(), default=-1) + 1)
    class_names = [f"class_{i}" for i in range(size)]
    for label, label_id in label_map.items():
        class_names[label_id] = label

    info: dict[str, Any] = {key: 0 for key in _POLICY_MESSAGES}
    info["skipped"] = []
    info["empty_label_ids"] = []
    if d.num_classes > 1:
        used = set(label_map.values())
        info["empty_label_ids"] = [i for i in range(d.num_classes) if i not in used]
    examples: dict[str, list[str]] = {key: [] for key in _POLICY_MESSAGES}
    records: list[VideoRecord] = []
    subsets_seen: set[str] = set()
    for video_id, entry in database.items():
        subset = entry.get("subset")
        if not isinstance(subset, str):
            raise DataError(f"{path}: video {video_id!r} has no string 'subset'")
        subsets_seen.add(subset.lower())
        if subset.lower() not in wanted:
            continue
        fps, duration = _fps_and_duration(cfg, path, video_id, entry)
        feature_path = _feature_path(cfg, video_id, splits)
        if require_features and not feature_path.is_file():
            if name in _SKIP_MISSING_FEATURES:
                info["skipped"].append(video_id)
                continue
            raise DataError(f"{feature_path}: feature file of video {video_id!r} not found ({path})")
        acts = entry["annotations"]  # validated by _label_map
        if name in _DEDUPLICATE:
            deduped = _deduplicate(acts)
            if len(deduped) < len(acts):
                info["duplicates"] += len(acts) - len(deduped)
                examples["duplicates"].append(video_id)
            acts = deduped
        kept, dropped = _apply_segment_policy(path, video_id, acts, duration, strict, info, examples)
        segments, labels = _arrays(kept)
        dropped_segments, dropped_labels = _arrays(dropped)
        records.append(
            VideoRecord(
                video_id=video_id,
                subset=subset,
                duration=duration,
                fps=fps,
                segments_sec=segments,
                labels=labels,
                feature_path=feature_path,
                dropped_segments_sec=dropped_segments,
                dropped_labels=dropped_labels,
            )
        )

    _log_summary(path, info, examples)
    if not records:
        skipped = f"; all {len(info['skipped'])} have no feature file in {d.feat_folder}" if info["skipped"] else ""
        raise DataError(
            f"{path}: no videos of subset(s) {', '.join(splits)}{skipped} (subsets in the file: "
            f"{', '.join(sorted(subsets_seen)) or 'none'})"
        )
    info["num_videos"] = len(records)
    info["num_segments"] = int(sum(len(r.labels) for r in records))
    return records, class_names, info


def _log_summary(path: Path, info: dict[str, Any], examples: dict[str, list[str]]) -> None:
    for key, text in _POLICY_MESSAGES.items():
        if info[key]:
            shown = "; ".join(examples[key][:_MAX_EXAMPLES])
            more = ", ..." if len(examples[key]) > _MAX_EXAMPLES else ""
            logger.warning("%s: %d %s, e.g. %s%s", path, info[key], text, shown, more)
    if info["skipped"]:
        logger.warning(
            "%s: skipped %d videos without a feature file: %s",
            path,
            len(info["skipped"]),
            ", ".join(info["skipped"]),
        )


# ---------------------------------------------------------------------------------------------------
# Ground truth for the evaluator


def ground_truth_dict(
    records: list[VideoRecord], class_names: list[str], subset: str, *, include_dropped: bool = True
) -> dict[str, Any]:
    """ActivityNet-format ground truth of the records whose subset is `subset` (compared lower-cased).

    With `include_dropped` (default) the segments the loader dropped are listed too, so the evaluator sees
    the annotations as published, as the reference's evaluator does (it removes zero-length ones itself).
    """
    database = {}
    for r in records:
        if r.subset.lower() != subset.lower():
            continue
        parts = [(r.segments_sec, r.labels)]
        if include_dropped:
            parts.append((r.dropped_segments_sec, r.dropped_labels))
        annotations = [
            {"segment": [float(s), float(e)], "label": class_names[int(c)], "label_id": int(c)}
            for segs, labels in parts
            for (s, e), c in zip(segs, labels, strict=True)
        ]
        database[r.video_id] = {"subset": r.subset, "duration": r.duration, "annotations": annotations}
    return {"database": database}


# ---------------------------------------------------------------------------------------------------
# The dataset


_TIOU_THRESHOLDS = {
    "thumos": np.linspace(0.3, 0.7, 5),
    "thumos_new": np.linspace(0.3, 0.7, 5),
    "custom": np.linspace(0.3, 0.7, 5),
    "multithumos": np.linspace(0.1, 0.9, 9),
    "epic": np.linspace(0.1, 0.5, 5),
    "anet": np.linspace(0.5, 0.95, 10),
    "hacs": np.linspace(0.5, 0.95, 10),
}


def seconds_to_grid(segments_sec: np.ndarray, fps: float, num_frames: int, feat_stride: int) -> np.ndarray:
    """`(sec * fps - 0.5 * num_frames) / feat_stride` in float32 (REFERENCE.md 9.1): `[N, 2]` -> `[N, 2]`."""
    segs = np.asarray(segments_sec, dtype=np.float32).reshape(-1, 2)
    return (segs * np.float32(fps) - np.float32(0.5 * num_frames)) / np.float32(feat_stride)


def _anet_training_filter(
    segments: np.ndarray, labels: np.ndarray, vid_len: float, trunc_thresh: float, video_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """REFERENCE.md 9.6: drops actions past the features or mostly outside them, clamps ends to vid_len."""
    keep = np.zeros(len(segments), dtype=bool)
    for i, (s, e) in enumerate(segments):
        if s >= np.float32(vid_len) or e == s:  # zero-length ones are dropped at load time anyway
            continue
        # Python-float arithmetic on the float32 values, as the reference (`.item()`).
        keep[i] = (min(float(e), vid_len) - float(s)) / (float(e) - float(s)) >= trunc_thresh
    if not keep.any():
        raise DataError(
            f"video {video_id!r}: every action lies (mostly) beyond the {vid_len:g} feature steps, so the "
            "training item has no actions left (the reference crashes here); check its features and duration"
        )
    segments = segments[keep].copy()
    segments[:, 1] = np.minimum(segments[:, 1], np.float32(vid_len))
    return segments, labels[keep]


def _hacs_training_filter(segments: np.ndarray, labels: np.ndarray, feat_len: int) -> tuple[np.ndarray, np.ndarray]:
    """REFERENCE.md 9.7: drops actions starting at or after T, clamps ends to T; keeps all if none survive."""
    keep = segments[:, 0] < feat_len
    if not keep.any():
        return segments, labels  # reference quirk (12.18)
    segments = segments[keep].copy()
    segments[:, 1] = np.minimum(segments[:, 1], np.float32(feat_len))
    return segments, labels[keep]


class VideoDataset:
    """The videos of `splits` as items for training (`training=True`: cropped) or inference.

    `dataset[i]` draws crops from the dataset's own generator (seeded with `seed`, default
    `cfg.init_rand_seed`); `dataset.get(i, rng)` takes an explicit one, for reproducible pipelines.
    Each item: `video_id` str, `feats` float32 `[T, D_in]`, `segments` float32 `[N, 2]` (feature-grid
    units), `labels` int32 `[N]`, `fps`, `duration` (s), `feat_stride`, `feat_num_frames`.
    """

    def __init__(
        self,
        cfg: Config,
        splits: tuple[str, ...] | list[str],
        training: bool,
        preload: bool = False,
        seed: int | None = None,
    ):
        self.cfg = cfg
        self.splits = tuple(splits)
        self.training = training
        records, self._class_names, self.info = load_annotations(cfg, self.splits)
        if training:
            without = [r.video_id for r in records if len(r.labels) == 0]
            if without:
                logger.info("training leaves out %d videos without annotations", len(without))
            records = [r for r in records if len(r.labels) > 0]
            if not records:
                raise DataError(f"{cfg.dataset.json_file}: no annotated videos in {', '.join(self.splits)}")
        self._records = records
        self._columns = self._rgb_columns()
        self._rng = np.random.default_rng(cfg.init_rand_seed if seed is None else seed)
        self._feats = [self._read(r) for r in records] if preload else None

    def _rgb_columns(self) -> int | None:
        d = self.cfg.dataset
        if self.cfg.dataset_name != "multithumos":
            return None
        rgb_only = d.rgb_only if d.rgb_only is not None else d.input_dim == 1024
        how = "set in the config" if d.rgb_only is not None else f"from input_dim {d.input_dim} (REFERENCE 12.10)"
        logger.info("multithumos: rgb_only=%s (%s)", rgb_only, how)
        return 1024 if rgb_only else None

    def _read(self, record: VideoRecord) -> np.ndarray:
        return read_features(record.feature_path, self.cfg.dataset, record.video_id, columns=self._columns)

    @property
    def records(self) -> list[VideoRecord]:
        return self._records

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    @property
    def empty_label_ids(self) -> list[int]:
        """Ids in [0, num_classes) that no annotation uses (only EPIC and custom can have any; the exact class
        count check excludes them elsewhere). Training sets their classifier bias near -13.8."""
        return list(self.info["empty_label_ids"])

    @property
    def tiou_thresholds(self) -> np.ndarray:
        return _TIOU_THRESHOLDS[self.cfg.dataset_name].copy()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index, self._rng)

    def get(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Item `index`; `rng` drives the training crop (required when training)."""
        d, name = self.cfg.dataset, self.cfg.dataset_name
        record = self._records[index]
        feats = self._feats[index] if self._feats is not None else self._read(record)
        feat_stride = d.feat_stride * d.downsample_rate
        segments = seconds_to_grid(record.segments_sec, record.fps, d.num_frames, feat_stride)
        labels = record.labels if d.num_classes > 1 else np.zeros_like(record.labels)
        if self.training:
            if rng is None:
                raise ValueError("a training item needs an rng for its random crop")
            if name == "anet":
                vid_len = feats.shape[0] + 0.5 * d.num_frames / feat_stride
                segments, labels = _anet_training_filter(segments, labels, vid_len, d.trunc_thresh, record.video_id)
            elif name == "hacs":
                segments, labels = _hacs_training_filter(segments, labels, feats.shape[0])
            feats, segments, labels, _ = truncate_feats(
                feats, segments, labels, d.max_seq_len, d.trunc_thresh, d.crop_ratio, rng
            )
        return {
            "video_id": record.video_id,
            "feats": feats,
            "segments": segments.astype(np.float32),
            "labels": labels.astype(np.int32),
            "fps": record.fps,
            "duration": record.duration,
            "feat_stride": feat_stride,
            "feat_num_frames": d.num_frames,
        }
