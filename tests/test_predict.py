"""Whole splits and feature files: one per-video path, batching, and the split's ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cltdr_jax import evaluation
from cltdr_jax.config import load_config
from cltdr_jax.convert import convert_checkpoint
from cltdr_jax.inference import Predictor
from cltdr_jax.predict import evaluate_prediction, ground_truth, predict_files, predict_split


@pytest.fixture(scope="module")
def fixture_model(thumos_small):
    cfg = load_config(thumos_small / "config.yaml")
    return cfg, convert_checkpoint(cfg, thumos_small / "state_dict.npz")


def _rows(results: dict) -> dict[str, np.ndarray]:
    """{video: [K, 4] (start, end, label_id, score)} of a results JSON, in its order."""
    return {
        vid: np.array([[*d["segment"], d["label_id"], d["score"]] for d in dets]).reshape(-1, 4)
        for vid, dets in results["results"].items()
    }


def test_features_route_equals_split_route(fixture_model, thumos_small, monkeypatch):
    """The same file through `--features` and through the split gives the same detections (the split also
    clips at the video's duration, which a bare feature file does not know: clipped here the same way)."""
    cfg, params = fixture_model
    monkeypatch.chdir(thumos_small)
    predictor = Predictor(cfg, params)
    split = _rows(predict_split(cfg, None, predictor=predictor).results_json)
    database = json.loads((thumos_small / "annotations.json").read_text())["database"]
    vids = sorted(split)[:3]
    for vid in vids:
        files = _rows(
            predict_files(
                cfg, None, [f"features/{vid}.npy"], fps=database[vid]["fps"], predictor=predictor
            ).results_json
        )[vid]
        duration = np.float32(database[vid]["duration"])
        files[:, :2] = np.where(files[:, :2] >= duration, duration, files[:, :2])
        np.testing.assert_array_equal(files, split[vid])


def test_features_route_honours_downsample_rate_and_rgb_only(tmp_path):
    """Both routes build items with `datasets.video_item`: strided features on the strided grid."""
    from cltdr_jax.config import config_from_dict
    from cltdr_jax.data.datasets import rgb_columns, video_item

    cfg = config_from_dict(
        {
            "dataset_name": "multithumos",
            "dataset": {"input_dim": 1024, "feat_stride": 4, "num_frames": 16, "downsample_rate": 2},
            "model": {"sgp_mlp_dim": 8},
        }
    )
    assert rgb_columns(cfg) == 1024
    item = video_item(cfg, "v", np.zeros((5, 1024), np.float32), 30.0, 10.0, np.array([[1.0, 2.0]]), np.array([3]))
    assert item["feat_stride"] == 8
    np.testing.assert_allclose(item["segments"], [[(30 - 8) / 8, (60 - 8) / 8]])


def test_batched_videos_give_the_detections_of_batch_size_one(fixture_model, thumos_small, monkeypatch):
    cfg, params = fixture_model
    monkeypatch.chdir(thumos_small)
    one = predict_split(cfg, None, predictor=Predictor(cfg, params, batch_size=1))
    three = predict_split(cfg, None, predictor=Predictor(cfg, params, batch_size=3))
    assert three.stats["batch_size"] == 3 and list(three.detections) == list(one.detections)
    for vid, a in one.detections.items():
        b = three.detections[vid]
        assert len(a) == len(b), vid
        # Padding is per video, so only float32 rounding of the batched matmuls may differ: detections match
        # one to one (same label, segment within 1e-3 s, score within 1e-5), in the same order except where
        # two scores tie to within that rounding (then either may come first).
        unmatched = set(range(len(b)))
        for i in range(len(a)):
            near = [j for j in sorted(unmatched) if abs(j - i) <= 3]
            match = [
                j
                for j in near
                if b.labels[j] == a.labels[i]
                and np.abs(b.segments[j] - a.segments[i]).max() <= 1e-3
                and abs(b.scores[j] - a.scores[i]) <= 1e-5
            ]
            assert match, (vid, i, a.labels[i], a.segments[i], a.scores[i])
            unmatched.remove(match[0])


def test_eval_official_equals_map_on_the_same_detections(fixture_model, thumos_small, monkeypatch, tmp_path):
    """`cltdr eval --protocol official` scores exactly what `cltdr map --subset Test` scores, where the file
    spells the subset `Test` and the config `test` (the loaders compare lower-cased, the official evaluator
    exactly)."""
    _, params = fixture_model
    data = json.loads((thumos_small / "annotations.json").read_text())
    for entry in data["database"].values():
        entry["subset"] = entry["subset"].capitalize()
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(data))
    cfg = load_config(thumos_small / "config.yaml", [f"dataset.json_file={annotations}"])
    monkeypatch.chdir(thumos_small)
    prediction = predict_split(cfg, params)
    ours = evaluate_prediction(cfg, prediction, "official")
    gt = evaluation.load_ground_truth(annotations, subset="Test", protocol="official")
    preds = evaluation.load_predictions(prediction.results_json)
    assert ours == evaluation.evaluate(gt, preds, evaluation.DATASET_TIOU["thumos"])
    assert ground_truth(annotations, "test", "official").subset == "Test"
    assert ours["average_mAP"] > 0
