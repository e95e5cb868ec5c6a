"""Predicting and scoring whole splits or given feature files: what `cltdr predict`, `cltdr eval` and
training's evaluation share. The predictor and the loop over videos are in `inference.py`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax import evaluation
from cltdr_jax.config import Config
from cltdr_jax.data.annotations import DATASET_TIOU, label_vocabulary, read_json
from cltdr_jax.data.datasets import VideoDataset, rgb_columns, video_item
from cltdr_jax.data.features import read_features
from cltdr_jax.errors import DataError
from cltdr_jax.inference import Predictor, predict_items
from cltdr_jax.postprocess import Detections, detections_to_json, fuse_external_scores, load_external_scores

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    detections: dict[str, Detections]  # seconds
    results_json: dict[str, Any]  # ActivityNet results format
    stats: dict[str, Any]


def class_names(json_file: str | None, count: int | None = None) -> list[str]:
    """Names of label ids 0 .. count - 1 from the annotation file (str(id) where it names none); count None:
    up to the largest id the file names."""
    names: dict[int, str] = {}
    if json_file and Path(json_file).is_file():
        names, _ = label_vocabulary(read_json(json_file, "annotation")[0], json_file)
    count = max(names, default=-1) + 1 if count is None else count
    return [names.get(i, str(i)) for i in range(count)]


def predict_split(cfg: Config, params: Any, split: str | None = None, predictor: Predictor | None = None) -> Prediction:
    """Detections of every video of `split` (default: the config's first val_split), as the reference.

    `predictor`: reuse one (its compiled programs) across calls, e.g. training's periodic evaluations;
    its parameters are replaced by `params` when given."""
    split = split or cfg.val_split[0]
    dataset = VideoDataset(cfg, (split,), training=False)
    predictor = _predictor(cfg, params, predictor)
    detections, stats = predict_items(predictor, (dataset[i] for i in range(len(dataset))))
    stats["skipped_videos"] = list(dataset.info.get("skipped", []))
    names = list(dataset.class_names)
    external = {"used": False}
    if cfg.test_cfg.ext_score_file:
        scores = load_external_scores(cfg.test_cfg.ext_score_file)
        detections = fuse_external_scores(detections, scores, cfg.test_cfg.ext_score_file)
        # Fused labels are the external classifier's: name them from the whole file, not the class-agnostic set.
        names = class_names(cfg.dataset.json_file)
        external = {"used": True, "details": f"video-level class scores from {cfg.test_cfg.ext_score_file}"}
    return Prediction(detections, detections_to_json(detections, names, external), stats)


def predict_files(
    cfg: Config,
    params: Any,
    paths: list[str],
    fps: float | None = None,
    predictor: Predictor | None = None,
    durations: dict[str, float] | None = None,
) -> Prediction:
    """Detections of feature files given directly (video id = file name without extension), read and
    gridded exactly as a split's videos are (`datasets.video_item`). `durations` (seconds, by video id), where
    known, clip the detections at the videos' ends as a split's are; otherwise they are not clipped."""
    fps = fps or cfg.dataset.default_fps
    if not fps:
        raise DataError("--features needs the video fps: pass --fps or set dataset.default_fps in the config")
    columns = rgb_columns(cfg)

    def items():
        for path in paths:
            vid = Path(path).name.split(".")[0]
            feats = read_features(Path(path), cfg.dataset, vid, columns=columns)
            yield video_item(cfg, vid, feats, fps, duration=(durations or {}).get(vid, 1e8))

    detections, stats = predict_items(_predictor(cfg, params, predictor), items())
    names = class_names(cfg.dataset.json_file, cfg.dataset.num_classes)
    return Prediction(detections, detections_to_json(detections, names), stats)


def _predictor(cfg: Config, params: Any, predictor: Predictor | None) -> Predictor:
    if predictor is None:
        return Predictor(cfg, params)
    if params is not None:
        predictor.params = params
    return predictor


def ground_truth(json_file: str | Path, split: str, protocol: str) -> evaluation.GroundTruth:
    """The one ground-truth builder for a config's split: every video of the annotation file in it (also
    those without features: the evaluators count them too).

    The config names splits in any case, as the loaders compare them lower-cased. The official protocol
    compares subsets exactly, so the split is first spelt as the file spells it (`cltdr map --subset` on
    the same file then gives the same numbers); the reference protocol lower-cases them itself."""
    if protocol == "reference":
        return evaluation.load_ground_truth(json_file, subset=split.lower(), protocol=protocol)
    data, src = read_json(json_file, "annotation")
    database = data.get("database")
    spellings = sorted(
        {str(e.get("subset")) for e in (database.values() if isinstance(database, dict) else ()) if isinstance(e, dict)}
    )
    matching = [s for s in spellings if s.lower() == split.lower()]
    if len(matching) > 1 and split not in matching:
        raise DataError(f"{src}: split {split!r} is spelt {matching} in the file; name one exactly in the config")
    subset = split if split in matching or not matching else matching[0]
    return evaluation.load_ground_truth(data, subset=subset, protocol=protocol)


def tiou_thresholds(cfg: Config) -> np.ndarray:
    return DATASET_TIOU[cfg.dataset_name].copy()


def evaluate_prediction(cfg: Config, prediction: Prediction, protocol: str = "official") -> dict[str, Any]:
    """mAP of a split's prediction at the dataset's tIoU thresholds."""
    gt = ground_truth(cfg.dataset.json_file, cfg.val_split[0], protocol)
    preds = evaluation.load_predictions(prediction.results_json)
    return evaluation.evaluate(gt, preds, tiou_thresholds(cfg))
