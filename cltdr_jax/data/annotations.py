"""The one reader of ActivityNet-format annotation files: training, prediction and evaluation (REFERENCE.md 9, 10).

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
fails. The evaluator reads the ground truth from the file as published (`evaluation.load_ground_truth`, through
`read_json` and `label_vocabulary` here), which is what the reference's mAP counts.

Shared by every reader: `read_json` (the file), `parse_segment`, `label_vocabulary` (the one label map),
`without_duplicates` (the one duplicate rule) and `DATASET_TIOU` (each dataset's tIoU thresholds).

Missing feature files: thumos, multithumos and custom skip the video (a warning lists every skipped id;
`info["skipped"]`), as the reference does silently; the other loaders raise a `DataError` at load time
naming the missing file (the reference would crash later, on first access).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax.config import Config
from cltdr_jax.errors import DataError

logger = logging.getLogger(__name__)

DATASET_NAMES = ("thumos", "thumos_new", "multithumos", "epic", "anet", "hacs", "custom")
_EXACT_CLASS_COUNT = ("thumos", "thumos_new", "multithumos", "hacs")
_SKIP_MISSING_FEATURES = ("thumos", "multithumos", "custom")
_DURATION_REQUIRED = ("anet", "hacs", "custom")
_DEDUPLICATE = ("anet", "hacs")
_MISSING_DURATION = 1e8  # the reference's stand-in for an unknown duration
_MAX_EXAMPLES = 5
# Two instances of one label_id are duplicates when both boundaries are this close (seconds): the rule of
# the reference's anet / hacs loaders and of its metrics.py.
DUPLICATE_TOL_S = 1e-3


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# Written exactly as the reference configs produce them: the float64 values decide threshold equality.
DATASET_TIOU: dict[str, np.ndarray] = {
    "thumos": _frozen(np.linspace(0.3, 0.7, 5)),
    "thumos_new": _frozen(np.linspace(0.3, 0.7, 5)),
    "multithumos": _frozen(np.linspace(0.1, 0.9, 9)),
    "epic": _frozen(np.linspace(0.1, 0.5, 5)),
    "anet": _frozen(np.linspace(0.5, 0.95, 10)),
    "hacs": _frozen(np.linspace(0.5, 0.95, 10)),
    "custom": _frozen(np.linspace(0.3, 0.7, 5)),
}


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


# ---------------------------------------------------------------------------------------------------
# Reading and validating


def read_json(
    path_or_dict: str | Path | Mapping[str, Any], what: str, *, unique_keys: bool = False
) -> tuple[Mapping[str, Any], str]:
    """Returns the parsed JSON object and a name for messages (the path, or ``<what dict>``).

    ``unique_keys``: a key given twice in one object is an error (training's loader: a video listed twice)
    instead of the last one winning (what ``json.load`` and the official evaluator do).
    """
    if isinstance(path_or_dict, Mapping):
        return path_or_dict, f"<{what} dict>"
    path = Path(path_or_dict)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the {what} file: {e}") from None
    repeated: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                repeated.append(key)
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs_hook if unique_keys else None)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, found {type(data).__name__}")
    if repeated:
        database = data.get("database")
        for key in repeated:
            if isinstance(database, dict) and key in database:
                raise DataError(f"{path}: video {key!r} is listed twice in 'database'")
        raise DataError(f"{path}: key {repeated[0]!r} appears twice in one JSON object")
    return data, str(path)


def parse_segment(seg: Any, where: str) -> tuple[float, float]:
    """``[start_s, end_s]`` -> two floats, or a DataError that starts with ``where`` (file, video, item)."""
    if not isinstance(seg, (list, tuple)) or len(seg) != 2:
        raise DataError(f"{where}: 'segment' must be [start_s, end_s], got {seg!r}")
    try:
        s, e = float(seg[0]), float(seg[1])
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'segment' must hold two numbers, got {seg!r}") from None
    if not (math.isfinite(s) and math.isfinite(e)):
        raise DataError(f"{where}: non-finite segment {seg!r}")
    return s, e


def parse_label_id(value: Any, where: str) -> int:
    """An integer label_id, or a DataError that starts with ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DataError(f"{where}: 'label_id' must be an integer, got {value!r}")
    return int(value)


def label_vocabulary(
    data: Mapping[str, Any], source: str | Path = "annotations", *, num_classes: int | None = None
) -> tuple[dict[int, str], dict[str, int]]:
    """The one label map: every label_id <-> name pair of an annotation file, over all its subsets.

    Lenient (default, for reading predictions and naming classes): pairs from the annotations first, then
    the taxonomy; malformed entries are left to the reader that uses them. Strict (``num_classes`` given,
    training): every annotation is validated, and a label_id outside [0, num_classes) (unless num_classes
    is 1, class-agnostic), one name with two ids or one id with two names is a ``DataError`` naming the video.
    """
    names_by_id: dict[int, str] = {}
    ids_by_name: dict[str, int] = {}
    db = data.get("database")
    for video_id, entry in (db if isinstance(db, Mapping) else {}).items():
        if num_classes is None:
            anns = entry.get("annotations") if isinstance(entry, Mapping) else None
            acts = [a for a in (anns if isinstance(anns, list) else ()) if isinstance(a, Mapping)]
        else:
            acts = _annotations(Path(source), video_id, entry)
        for act in acts:
            name, label_id = act.get("label"), act.get("label_id")
            if num_classes is None:
                if isinstance(label_id, int) and not isinstance(label_id, bool) and isinstance(name, str):
                    names_by_id.setdefault(label_id, name)
                    ids_by_name.setdefault(name, label_id)
                continue
            if label_id < 0 or (num_classes > 1 and label_id >= num_classes):
                raise DataError(
                    f"{source}: video {video_id!r}: label {name!r} has label_id {label_id}, outside "
                    f"[0, {num_classes}) (dataset.num_classes is {num_classes})"
                )
            if ids_by_name.setdefault(name, label_id) != label_id:
                raise DataError(
                    f"{source}: video {video_id!r}: label {name!r} has label_id {label_id} here but "
                    f"{ids_by_name[name]} elsewhere"
                )
            if names_by_id.setdefault(label_id, name) != name:
                raise DataError(
                    f"{source}: video {video_id!r}: label_id {label_id} is {name!r} here but "
                    f"{names_by_id[label_id]!r} elsewhere"
                )
    taxonomy = data.get("taxonomy") if num_classes is None else None
    for node in taxonomy if isinstance(taxonomy, list) else ():
        if isinstance(node, Mapping):
            i, n = node.get("nodeId"), node.get("nodeName")
            if isinstance(i, int) and not isinstance(i, bool) and isinstance(n, str):
                names_by_id.setdefault(i, n)
                ids_by_name.setdefault(n, i)
    return names_by_id, ids_by_name


def without_duplicates(rows: Sequence[tuple[float, float, Any]]) -> list[int]:
    """Indices of the `(start_s, end_s, label)` rows kept by the duplicate rule, in order.

    A row is dropped when a row kept before it has its label and both boundaries within DUPLICATE_TOL_S; each
    row is compared with the rows kept so far (not with dropped ones), as in the reference.
    """
    kept: list[int] = []
    for i, (s, e, lab) in enumerate(rows):
        if not any(
            abs(s - rows[k][0]) <= DUPLICATE_TOL_S and abs(e - rows[k][1]) <= DUPLICATE_TOL_S and lab == rows[k][2]
            for k in kept
        ):
            kept.append(i)
    return kept


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
) -> list[dict[str, Any]]:
    """The annotations the segment policy keeps (module docstring), counting kept and dropped ones in `info`."""
    kept = []
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
        info[f"dropped_{problem}"] += 1
        examples[f"dropped_{problem}"].append(f"{video_id} {where}")
    return kept


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
    data, _ = read_json(path, "annotation", unique_keys=True)
    if not isinstance(data.get("database"), dict):
        raise DataError(f"{path}: expected an object with a 'database' mapping video ids to records")
    database = data["database"]
    _, label_map = label_vocabulary(data, path, num_classes=d.num_classes)
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
            deduped = [acts[i] for i in without_duplicates([(*a["segment"], a["label_id"]) for a in acts])]
            if len(deduped) < len(acts):
                info["duplicates"] += len(acts) - len(deduped)
                examples["duplicates"].append(video_id)
            acts = deduped
        kept = _apply_segment_policy(path, video_id, acts, duration, strict, info, examples)
        segments, labels = _arrays(kept)
        records.append(
            VideoRecord(
                video_id=video_id,
                subset=subset,
                duration=duration,
                fps=fps,
                segments_sec=segments,
                labels=labels,
                feature_path=feature_path,
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
