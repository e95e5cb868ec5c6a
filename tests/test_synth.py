"""`cltdr synth`: synthetic datasets that keep the structure of the real benchmarks (cltdr_jax/synth.py)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cltdr_jax import synth
from cltdr_jax.config import load_config


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _database(out: Path) -> dict:
    return json.loads((out / "annotations.json").read_text())["database"]


def _features(cfg, video_id: str) -> np.ndarray:
    d = cfg.dataset
    path = Path(d.feat_folder) / f"{d.file_prefix or ''}{video_id}{d.file_ext}"
    return np.load(path)["feats"] if d.file_ext == ".npz" else np.load(path)


def _ranks(x) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable")


# ---------------------------------------------------------------------------------------------------
# Determinism and the files on disk


@pytest.mark.parametrize("like", ["thumos14", "epic"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, like):
    n = 12 if like == "thumos14" else 3
    a = synth.synthesize(like, tmp_path / "a", feature_dim=32, num_videos=n, seed=0).parent
    b = synth.synthesize(like, tmp_path / "b", feature_dim=32, num_videos=n, seed=0).parent
    c = synth.synthesize(like, tmp_path / "c", feature_dim=32, num_videos=n, seed=1).parent
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len([k for k in fa if k.startswith("features")]) == n
    del fa["config.yaml"], fb["config.yaml"], fc["config.yaml"]  # they hold their own (absolute) paths
    assert fa == fb
    assert fa["annotations.json"] != fc["annotations.json"]
    shared = set(fa) & set(fc) - {"annotations.json"}  # thumos ids repeat across seeds
    assert all(fa[k] != fc[k] for k in shared)


@pytest.mark.parametrize(
    "like, dim, videos", [("thumos14", 16, 4), ("multithumos", 16, 3), ("activitynet", 8, 6), ("epic", 8, 2)]
)
def test_feature_length_width_and_config(tmp_path, like, dim, videos):
    cfg = load_config(synth.synthesize(like, tmp_path, feature_dim=dim, num_videos=videos, seed=3))
    conv = synth.profile_config(synth.load_profile(like))
    assert cfg.dataset_name == conv["dataset_name"]
    assert cfg.train_split == tuple(conv["train_split"]) and cfg.val_split == tuple(conv["val_split"])
    assert cfg.dataset.input_dim == cfg.model.input_dim == dim
    assert Path(cfg.dataset.json_file).is_absolute() and Path(cfg.dataset.feat_folder).is_dir()
    d = cfg.dataset
    database = _database(tmp_path)
    assert len(database) == videos
    for vid, rec in database.items():
        fps = d.default_fps or rec["fps"]
        x = _features(cfg, vid)
        expected = max(1, math.floor((rec["duration"] * fps - d.num_frames) / d.feat_stride) + 1)
        assert x.dtype == np.float32 and x.shape == (expected, dim)
        assert np.isfinite(x).all()
        for a in rec["annotations"]:
            assert 0 <= a["segment"][0] < a["segment"][1] <= rec["duration"]


def test_split_proportions_kept():
    assert synth.split_sizes({"validation": 200, "test": 212}, 12) == {"validation": 6, "test": 6}
    assert synth.split_sizes({"training": 9649, "validation": 4728}, 30) == {"training": 20, "validation": 10}
    assert synth.split_sizes({"training": 495, "validation": 138}, 2) == {"training": 1, "validation": 1}
    assert synth.split_sizes({"a": 3, "b": 1}, None) == {"a": 3, "b": 1}


# ---------------------------------------------------------------------------------------------------
# The sampled annotations reproduce the profile


@pytest.mark.parametrize(
    "like, videos, min_rank_corr",
    [("thumos14", 400, 0.6), ("multithumos", 300, 0.75), ("epic", 900, 0.7), ("activitynet", 2000, None)],
)
def test_annotation_statistics_match_profile(like, videos, min_rank_corr):
    """Medians within 20 % (durations) / 25 % (actions per video); class frequencies ranked alike."""
    profile = synth.load_profile(like)
    database = synth.sample_annotations(profile, videos, seed=0)
    median = profile["quantile_levels"].index(0.5)
    for figures in profile["splits"].values():
        recs = [r for r in database.values() if r["subset"] == figures["subset"]]
        assert len(recs) == round(videos * figures["num_videos"] / sum(
            f["num_videos"] for f in profile["splits"].values()))  # fmt: skip
        duration = np.median([r["duration"] for r in recs])
        assert duration == pytest.approx(figures["duration_quantiles"][median], rel=0.2)
        actions = np.median([len(r["annotations"]) for r in recs])
        assert actions == pytest.approx(figures["actions_quantiles"][median], rel=0.25)
        counts = np.zeros(len(profile["classes"]))
        for r in recs:
            for a in r["annotations"]:
                counts[a["label_id"]] += 1
                assert profile["classes"][a["label_id"]] == a["label"]
        if min_rank_corr is not None:
            rho = np.corrcoef(_ranks(counts), _ranks(figures["class_instances"]))[0, 1]
            assert rho >= min_rank_corr, (figures["subset"], rho)


def test_also_labelled_pairs_are_kept():
    """THUMOS: every CliffDiving instance is also a Diving instance with the same segment."""
    database = synth.sample_annotations("thumos14", 200, seed=1)
    cliff = diving_twins = 0
    for rec in database.values():
        diving = {tuple(a["segment"]) for a in rec["annotations"] if a["label"] == "Diving"}
        for a in rec["annotations"]:
            if a["label"] == "CliffDiving":
                cliff += 1
                diving_twins += tuple(a["segment"]) in diving
    assert cliff > 0 and diving_twins == cliff


def test_profiles_are_small():
    for like in synth.PROFILES:
        assert (synth.PROFILE_DIR / f"{like}.json").stat().st_size < 50_000


# ---------------------------------------------------------------------------------------------------
# Real annotation files


def test_real_annotations_are_reproduced_exactly(tmp_path, shared_dir):
    real_path = shared_dir / "data" / "thumos14" / "thumos14.json"
    real = json.loads(real_path.read_text())["database"]
    synth.synthesize("thumos14", tmp_path / "all", annotations=real_path, features=False)
    assert _database(tmp_path / "all") == real  # every class present: label ids unchanged

    out = tmp_path / "few"
    cfg = load_config(synth.synthesize("thumos14", out, feature_dim=8, num_videos=6, annotations=real_path))
    database = _database(out)
    assert len(database) == 6
    assert sorted({r["subset"] for r in database.values()}) == ["Test", "Validation"]
    names = set()
    for vid, rec in database.items():
        src = real[vid]
        assert (rec["subset"], rec["duration"], rec["fps"]) == (src["subset"], src["duration"], src["fps"])
        assert [(a["segment"], a["label"]) for a in rec["annotations"]] == [
            (a["segment"], a["label"]) for a in src["annotations"]
        ]
        names |= {a["label"] for a in rec["annotations"]}
        assert _features(cfg, vid).shape[1] == 8
    # A subsample misses classes: the present ones are renumbered 0..k-1 for the thumos loader.
    assert cfg.dataset.num_classes == len(names)


# ---------------------------------------------------------------------------------------------------
# The real loader reads it; the actions are detectable but not trivially


@pytest.mark.parametrize("like", ["thumos14", "activitynet", "epic"])
def test_loader_reads_the_synthetic_dataset(tmp_path, like):
    from cltdr_jax import data

    cfg = load_config(synth.synthesize(like, tmp_path, feature_dim=16, num_videos=4, seed=2))
    database = _database(tmp_path)
    for split, training in ((cfg.train_split, True), (cfg.val_split, False)):
        ds = data.VideoDataset(cfg, split, training=training, seed=0)
        want = [v for v, r in database.items() if r["subset"].lower() in split]
        assert [r.video_id for r in ds.records] == want
        item = ds.get(0, np.random.default_rng(0))
        assert item["feats"].shape[1] == 16 and len(item["segments"]) == len(item["labels"]) > 0
        if like == "activitynet":
            assert (item["labels"] == 0).all()


def test_nearest_signature_probe(tmp_path, capsys):
    """Per-step accuracy of the nearest class signature (cosine) on action steps: well above chance
    (1 / 20), far from perfect: a detector has to aggregate over time."""
    like, dim = "thumos14", 256
    out = synth.synthesize(like, tmp_path, feature_dim=dim, num_videos=6, seed=0).parent
    profile = synth.load_profile(like)
    index = {c: i for i, c in enumerate(profile["classes"])}
    model = synth.feature_model(len(index), dim, 0, [(index[a], index[b]) for a, b in profile["confusable"]])
    signatures = model.bodies / np.linalg.norm(model.bodies, axis=1, keepdims=True)
    d = synth.profile_config(profile)["dataset"]
    hits = total = 0
    for vid, rec in _database(out).items():
        x = np.load(out / "features" / f"{vid}.npy")
        centres = (np.arange(len(x)) * d["feat_stride"] + 0.5 * d["num_frames"]) / rec["fps"]
        truth = np.zeros((len(x), len(index)), bool)
        for a in rec["annotations"]:
            truth[(centres >= a["segment"][0]) & (centres <= a["segment"][1]), index[a["label"]]] = True
        pred = np.argmax(x @ signatures.T, axis=1)
        inside = truth.any(axis=1)
        hits += truth[inside, pred[inside]].sum()
        total += inside.sum()
    accuracy = hits / total
    with capsys.disabled():
        print(f"\n  nearest-signature probe, {like} D={dim}: per-step accuracy {accuracy:.2f} (chance 0.05)")
    assert 0.15 < accuracy < 0.95


def test_cmd_synth_prints_what_it_wrote(tmp_path, capsys):
    from cltdr_jax import commands

    args = argparse.Namespace(
        like="thumos14", out=str(tmp_path), feature_dim=8, videos=4, seed=0, annotations=None, difficulty=1.0
    )
    assert commands.synth(args) == 0
    text = capsys.readouterr().out
    assert "Validation: 2 videos" in text and "Test: 2 videos" in text
    assert "[T, 8]" in text and str(tmp_path / "config.yaml") in text


def test_activitynet_gets_external_class_scores(tmp_path):
    import yaml

    from cltdr_jax.synth import synthesize

    config = synthesize("activitynet", tmp_path, feature_dim=8, num_videos=60, seed=0, features=False)
    cfg = yaml.safe_load(config.read_text())
    scores = json.loads(Path(cfg["test_cfg"]["ext_score_file"]).read_text())["results"]
    database = json.loads((tmp_path / "annotations.json").read_text())["database"]
    assert set(scores) == set(database)
    hits = 0
    for vid, rec in database.items():
        ids = [a["label_id"] for a in rec["annotations"]]
        assert abs(sum(scores[vid]) - 1) < 1e-3
        hits += int(np.argmax(scores[vid]) == max(set(ids), key=ids.count))
    assert 0.7 <= hits / len(database) <= 0.97  # like a good but imperfect video classifier (85 %)
