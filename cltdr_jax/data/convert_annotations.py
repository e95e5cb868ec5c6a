"""Annotation converters (`cltdr convert-annotations`): official annotation layouts to the JSON our loaders read.

Output (ActionFormer format): `{"version": ..., "database": {video_id: {"subset", "duration", "fps",
"annotations": [{"label", "label_id", "segment": [start_s, end_s]}]}}}`.

* `epic`: `EPIC_100_train.csv` and/or `EPIC_100_validation.csv` (subset `training` / `validation`, from the
  file name), `EPIC_100_video_info.csv` (duration, fps) and `EPIC_100_verb_classes.csv` or
  `EPIC_100_noun_classes.csv` (label = the class `key`, label_id = `verb_class` / `noun_class`).
  Timestamps `hh:mm:ss.ss` become seconds.
* `anet-bsn`: the BSN layout of ActivityNet-1.3, `anet_anno_action.json` + `video_info_new.csv` (subset,
  fps) + `action_name.csv` (label_id = row order). Ids lose their `v_` prefix (CLTDR-GMG configs add
  `file_prefix: v_` for the feature files); duration = `duration_second`.

Inputs are recognised by their header (and, where headers are alike, their file name), in any order.
"""

from __future__ import annotations

import csv
import json
import logging
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from cltdr_jax.errors import DataError

logger = logging.getLogger(__name__)

_EPIC_ANNOTATION_COLUMNS = {"video_id", "start_timestamp", "stop_timestamp", "verb_class", "noun_class"}


def identify_input(path: str | Path) -> str:
    """Which input a file is: `epic_annotations`, `epic_video_info`, `epic_verb_classes`,
    `epic_noun_classes`, `anet_annotations`, `anet_video_info` or `anet_action_names`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline().strip()
    if path.suffix.lower() == ".json" or first.startswith("{"):
        return "anet_annotations"
    header = {c.strip() for c in next(csv.reader([first]), [])}
    name = path.name.lower()
    if _EPIC_ANNOTATION_COLUMNS <= header:
        return "epic_annotations"
    if {"video_id", "duration", "fps"} <= header:
        return "epic_video_info"
    if {"id", "key"} <= header:
        for kind in ("verb", "noun"):
            if kind in name:
                return f"epic_{kind}_classes"
        raise DataError(f"{path}: an EPIC class list, but its name says neither 'verb' nor 'noun'")
    if {"video", "subset", "fps"} <= header:
        return "anet_video_info"
    if header == {"action"}:
        return "anet_action_names"
    raise DataError(f"{path}: not a recognised annotation input (header: {first[:120]!r})")


def _read_csv(path: Path, required: set[str]) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = required - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        return list(reader)


def _float(path: Path, row: int, what: str, text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DataError(f"{path}: row {row}: {what} is not a number ({text!r})") from None


def parse_timestamp(text: str) -> float:
    """`hh:mm:ss.ss` -> seconds, rounded once from the exact decimal value."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise ValueError(f"expected hh:mm:ss.ss, got {text!r}")
    try:
        h, m, s = (Decimal(p) for p in parts)
    except InvalidOperation:
        raise ValueError(f"expected hh:mm:ss.ss, got {text!r}") from None
    return float(h * 3600 + m * 60 + s)


# ---------------------------------------------------------------------------------------------------
# EPIC-KITCHENS-100


def _epic_subset(path: Path) -> str:
    name = path.name.lower()
    if "validation" in name:
        return "validation"
    if "train" in name:
        return "training"
    raise DataError(f"{path}: cannot tell the subset; the file name must contain 'train' or 'validation'")


def convert_epic(
    annotation_csvs: list[str | Path], video_info_csv: str | Path, classes_csv: str | Path, classes: str
) -> dict[str, Any]:
    """EPIC-KITCHENS-100 action segments with `classes` ("verb" or "noun") as labels."""
    if classes not in ("verb", "noun"):
        raise DataError(f"classes must be 'verb' or 'noun', got {classes!r}")
    video_info_csv, classes_csv = Path(video_info_csv), Path(classes_csv)
    info = {}
    for i, row in enumerate(_read_csv(video_info_csv, {"video_id", "duration", "fps"}), start=2):
        info[row["video_id"]] = (
            _float(video_info_csv, i, "duration", row["duration"]),
            _float(video_info_csv, i, "fps", row["fps"]),
        )
    names = {}
    for i, row in enumerate(_read_csv(classes_csv, {"id", "key"}), start=2):
        try:
            names[int(row["id"])] = row["key"]
        except ValueError:
            raise DataError(f"{classes_csv}: row {i}: class id {row['id']!r} is not an integer") from None

    database: dict[str, Any] = {}
    subset_of: dict[str, tuple[str, Path]] = {}
    column = f"{classes}_class"
    for csv_path in map(Path, annotation_csvs):
        subset = _epic_subset(csv_path)
        for i, row in enumerate(_read_csv(csv_path, _EPIC_ANNOTATION_COLUMNS), start=2):
            vid = row["video_id"]
            where = f"{csv_path}: row {i} (video {vid!r})"
            if vid in subset_of and subset_of[vid][1] != csv_path:
                raise DataError(f"{where}: video also annotated in {subset_of[vid][1]}")
            if vid not in info:
                raise DataError(f"{where}: video not listed in {video_info_csv}")
            try:
                start = parse_timestamp(row["start_timestamp"])
                end = parse_timestamp(row["stop_timestamp"])
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            try:
                label_id = int(row[column])
            except ValueError:
                raise DataError(f"{where}: {column} {row[column]!r} is not an integer") from None
            if label_id not in names:
                raise DataError(f"{where}: {column} {label_id} is not in {classes_csv}")
            if vid not in database:
                duration, fps = info[vid]
                subset_of[vid] = (subset, csv_path)
                database[vid] = {"subset": subset, "duration": duration, "fps": fps, "annotations": []}
            database[vid]["annotations"].append(
                {"label": names[label_id], "label_id": label_id, "segment": [start, end]}
            )
    return {"version": f"EPIC-KITCHENS-100-{classes}", "database": database}


# ---------------------------------------------------------------------------------------------------
# ActivityNet-1.3, BSN layout


def convert_anet_bsn(
    annotation_json: str | Path, video_info_csv: str | Path, action_names_csv: str | Path
) -> dict[str, Any]:
    """ActivityNet-1.3 from BSN's `anet_anno_action.json`, `video_info_new.csv`, `action_name.csv`."""
    annotation_json, video_info_csv = Path(annotation_json), Path(video_info_csv)
    action_names_csv = Path(action_names_csv)
    rows = _read_csv(action_names_csv, {"action"})
    label_ids = {row["action"]: i for i, row in enumerate(rows)}
    if len(label_ids) != len(rows):
        raise DataError(f"{action_names_csv}: class names are not unique")
    videos = {}
    for i, row in enumerate(_read_csv(video_info_csv, {"video", "subset", "fps"}), start=2):
        videos[row["video"]] = (row["subset"], _float(video_info_csv, i, "fps", row["fps"]))
    try:
        with open(annotation_json, encoding="utf-8") as f:
            source = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{annotation_json}: not valid JSON ({e})") from None
    if not isinstance(source, dict):
        raise DataError(f"{annotation_json}: expected an object mapping video ids to records")

    database: dict[str, Any] = {}
    for key, entry in source.items():
        where = f"{annotation_json}: video {key!r}"
        if key not in videos:
            raise DataError(f"{where}: not listed in {video_info_csv}")
        if not isinstance(entry, dict) or "duration_second" not in entry or "annotations" not in entry:
            raise DataError(f"{where}: expected 'duration_second' and 'annotations'")
        annotations = []
        for act in entry["annotations"]:
            seg = act.get("segment") if isinstance(act, dict) else None
            if not (isinstance(seg, list) and len(seg) == 2):
                raise DataError(f"{where}: annotation {act!r} has no [start, end] 'segment'")
            if act.get("label") not in label_ids:
                raise DataError(f"{where}: label {act.get('label')!r} is not in {action_names_csv}")
            start, end = seg
            annotations.append({"label": act["label"], "label_id": label_ids[act["label"]], "segment": [start, end]})
        subset, fps = videos[key]
        vid = key[2:] if key.startswith("v_") else key
        database[vid] = {
            "subset": subset,
            "duration": float(entry["duration_second"]),
            "fps": fps,
            "annotations": annotations,
        }
    not_annotated = len(set(videos) - set(source))
    if not_annotated:
        logger.warning("%s: %d videos are not in %s; left out", video_info_csv, not_annotated, annotation_json)
    return {"version": "ActivityNet-1.3 (BSN annotations)", "database": database}


# ---------------------------------------------------------------------------------------------------
# Command


def _one(found: dict[str, list[Path]], kind: str, hint: str) -> Path:
    paths = found.get(kind, [])
    if len(paths) != 1:
        got = ", ".join(map(str, paths)) if paths else "none"
        raise DataError(f"convert-annotations needs exactly one {hint} (got {got})")
    return paths[0]


def convert_annotations(kind: str, inputs: list[str | Path], classes: str = "verb") -> dict[str, Any]:
    """The converted annotation JSON (a dict) of `inputs` (paths in any order).

    `kind`: "epic" or "anet-bsn"; `classes`: "verb" or "noun" (epic).
    """
    found: dict[str, list[Path]] = {}
    for p in map(Path, inputs):
        found.setdefault(identify_input(p), []).append(p)
    if kind == "epic":
        annotation_csvs = found.get("epic_annotations", [])
        if not annotation_csvs:
            raise DataError("convert-annotations epic needs EPIC_100_train.csv and/or EPIC_100_validation.csv")
        return convert_epic(
            annotation_csvs,
            _one(found, "epic_video_info", "EPIC_100_video_info.csv"),
            _one(found, f"epic_{classes}_classes", f"EPIC_100_{classes}_classes.csv"),
            classes,
        )
    if kind == "anet-bsn":
        return convert_anet_bsn(
            _one(found, "anet_annotations", "anet_anno_action.json"),
            _one(found, "anet_video_info", "video_info_new.csv"),
            _one(found, "anet_action_names", "action_name.csv"),
        )
    raise DataError(f"unknown annotation kind {kind!r} (epic, anet-bsn)")
