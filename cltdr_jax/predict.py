"""Predicting and scoring whole splits: what `cltdr predict`, `cltdr eval` and training's evaluation share."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax import evaluation
from cltdr_jax.config import Config
from cltdr_jax.data.datasets import VideoDataset
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


def _annotation_label_names(json_file: str) -> dict[int, str]:
    """label_id -> class name over the whole annotation file (fused ActivityNet labels need the real names)."""
    data, _ = evaluation.read_json(json_file, "annotation")
    names = {}
    for entry in data.get("database", {}).values():
        for ann in entry.get("annotations", []):
            names.setdefault(int(ann["label_id"]), ann["label"])
    return names


def predict_split(cfg: Config, params: Any, split: str | None = None) -> Prediction:
    """Detections of every video of `split` (default: the config's first val_split), as the reference."""
    split = split or cfg.val_split[0]
    dataset = VideoDataset(cfg, (split,), training=False)
    predictor = Predictor(cfg, params)
    detections, stats = predict_items(predictor, (dataset[i] for i in range(len(dataset))))
    stats["skipped_videos"] = list(dataset.info.get("skipped", []))
    class_names = list(dataset.class_names)
    external = {"used": False}
    if cfg.test_cfg.ext_score_file:
        scores = load_external_scores(cfg.test_cfg.ext_score_file)
        detections = fuse_external_scores(detections, scores, cfg.test_cfg.ext_score_file)
        names = _annotation_label_names(cfg.dataset.json_file)
        class_names = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]
        external = {"used": True, "details": f"video-level class scores from {cfg.test_cfg.ext_score_file}"}
    return Prediction(detections, detections_to_json(detections, class_names, external), stats)


def predict_files(cfg: Config, params: Any, paths: list[str], fps: float | None = None) -> Prediction:
    """Detections of feature files given directly (video id = file name without extension)."""
    fps = fps or cfg.dataset.default_fps
    if not fps:
        raise DataError("--features needs the video fps: pass --fps or set dataset.default_fps in the config")
    items = []
    for path in paths:
        vid = Path(path).name.split(".")[0]
        feats = read_features(Path(path), cfg.dataset, vid)
        items.append(
            {
                "video_id": vid,
                "feats": feats,
                "fps": fps,
                "duration": 1e8,
                "feat_stride": cfg.dataset.feat_stride,
                "feat_num_frames": cfg.dataset.num_frames,
            }
        )
    detections, stats = predict_items(Predictor(cfg, params), items)
    names = [str(i) for i in range(cfg.dataset.num_classes)]
    if cfg.dataset.json_file and Path(cfg.dataset.json_file).is_file():
        label_names = _annotation_label_names(cfg.dataset.json_file)
        names = [label_names.get(i, str(i)) for i in range(cfg.dataset.num_classes)]
    return Prediction(detections, detections_to_json(detections, names), stats)


def ground_truth(cfg: Config, split: str, protocol: str) -> evaluation.GroundTruth:
    """The split's GT straight from the annotation file, every video of it (also those without features:
    the reference's evaluator counts them too). Subsets match case-insensitively, as the loaders do."""
    data, _ = evaluation.read_json(cfg.dataset.json_file, "annotation")
    database = {
        vid: {**entry, "subset": str(entry.get("subset", "")).lower()}
        for vid, entry in data.get("database", {}).items()
    }
    return evaluation.load_ground_truth({**data, "database": database}, subset=split.lower(), protocol=protocol)


def tiou_thresholds(cfg: Config) -> np.ndarray:
    return evaluation.DATASET_TIOU[cfg.dataset_name].copy()


def evaluate_prediction(cfg: Config, prediction: Prediction, protocol: str = "official") -> dict[str, Any]:
    """mAP of a split's prediction at the dataset's tIoU thresholds."""
    split = cfg.val_split[0]
    gt = ground_truth(cfg, split, protocol)
    preds = evaluation.load_predictions(prediction.results_json)
    return evaluation.evaluate(gt, preds, tiou_thresholds(cfg))
