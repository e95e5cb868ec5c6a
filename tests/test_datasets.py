"""Annotation loading, feature files and dataset items (REFERENCE.md section 9).

Real annotation files are read in place from ../shared/data; feature files are generated in tmp_path.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cltdr_jax.config import config_from_dict, load_config
from cltdr_jax.data import VideoDataset, load_annotations, read_features
from cltdr_jax.errors import DataError
from cltdr_jax.predict import ground_truth

try:
    import torch
except ImportError:
    torch = None

# ---------------------------------------------------------------------------------------------------
# Helpers


def _cfg(json_file, name="thumos", **dataset):
    values = {
        "json_file": str(json_file),
        "feat_folder": str(Path(json_file).parent / "feats"),
        "file_ext": ".npy",
        "num_classes": 2,
        "input_dim": 4,
        "feat_stride": 4,
        "num_frames": 16,
        "max_seq_len": 32,
    }
    values.update(dataset)
    return config_from_dict({"dataset_name": name, "dataset": values, "model": {"sgp_mlp_dim": 8}})


def _video(subset="Validation", duration=10.0, fps=30.0, acts=(("A", 0, [1.0, 2.0]),)):
    entry = {"subset": subset, "duration": duration, "fps": fps}
    entry["annotations"] = [{"label": n, "label_id": i, "segment": list(s)} for n, i, s in acts]
    return {k: v for k, v in entry.items() if v is not None}


def _two_classes(**extra):
    """A database with classes A=0 and B=1 and the given extra videos."""
    db = {"v_a": _video(acts=[("A", 0, [1.0, 2.0]), ("B", 1, [3.0, 4.0])])}
    db.update(extra)
    return db


def _write_json(tmp_path, database):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"version": "test", "database": database}))
    return path


def _write_feats(folder, name, rows, width=4, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    feats = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    np.save(folder / name, feats)
    return feats


# ---------------------------------------------------------------------------------------------------
# Real annotation files


def _published(path, subset):
    db = json.loads(Path(path).read_text())["database"]
    return {k: v for k, v in db.items() if v["subset"] == subset}


def _policy_counts(videos):
    """Independent re-derivation of the drop policy: counts of rev, zero, out (wholly outside), partly."""
    counts = Counter()
    for v in videos.values():
        for a in v["annotations"]:
            s, e = a["segment"]
            d = v["duration"]
            kind = "rev" if e < s else "zero" if e == s else "out" if (e <= 0 or s >= d) else None
            kind = kind or ("partly" if s < 0 or e > d else "ok")
            counts[kind] += 1
    return counts


def test_thumos14_counts(shared_dir):
    path = shared_dir / "data" / "thumos14" / "thumos14.json"
    cfg = _cfg(path, "thumos", num_classes=20)
    # Published: Validation 200 videos / 3,007 instances, Test 212 / 3,358. Our policy drops the segments that
    # lie wholly after the stated duration: 4 in Validation (video_validation_0000364, _0000856) and 26 in
    # Test (video_test_0000270, _0000814, _0001081). Nothing is reversed or zero-length.
    for subset, videos, published, kept, outside in (
        ("Validation", 200, 3007, 3003, 4),
        ("Test", 212, 3358, 3332, 26),
    ):
        records, names, info = load_annotations(cfg, [subset.lower()], require_features=False)
        assert len(records) == videos and info["num_segments"] == kept
        assert info["dropped_outside"] == outside and info["partly_outside"] == 0
        assert info["dropped_reversed"] == info["dropped_zero_length"] == 0
        counts = _policy_counts(_published(path, subset))
        assert sum(counts.values()) == published and counts["out"] == outside
        # The evaluator's ground truth is the file as published, whatever the training loader drops.
        assert len(ground_truth(path, subset.lower(), "official").t_start) == published
    assert len(names) == 20 and names[0] == "BaseballPitch" and names[19] == "VolleyballSpiking"
    assert {r.fps for r in records} == {30.0, 29.97, 25.0, 24.0}


def test_multithumos_counts(shared_dir):
    path = shared_dir / "data" / "multithumos" / "multithumos.json"
    cfg = _cfg(path, "multithumos", num_classes=65)
    # Published: Validation 200 / 18,482, Test 212 / 20,186. Dropped: Validation 4 reversed + 3 zero-length +
    # 4 wholly after the end = 11 -> 18,471; Test 26 + 4 + 26 = 56 -> 20,130. Segments that only run past
    # the end (2 and 3, e.g. 96 s .. 817 s in a 135 s video) are kept.
    for subset, published, kept, rev, zero, out, partly in (
        ("Validation", 18482, 18471, 4, 3, 4, 2),
        ("Test", 20186, 20130, 26, 4, 26, 3),
    ):
        records, names, info = load_annotations(cfg, [subset.lower()], require_features=False)
        assert info["num_segments"] == kept
        assert (info["dropped_reversed"], info["dropped_zero_length"]) == (rev, zero)
        assert (info["dropped_outside"], info["partly_outside"]) == (out, partly)
        counts = _policy_counts(_published(path, subset))
        assert sum(counts.values()) == published
        assert (counts["rev"], counts["zero"], counts["out"], counts["partly"]) == (rev, zero, out, partly)
    assert len(records) == 212 and len(names) == 65 and names[0] == "BaseballPitch"


def test_strict_mode_rejects_the_real_thumos_file(shared_dir):
    path = shared_dir / "data" / "thumos14" / "thumos14.json"
    with pytest.raises(DataError, match="video_validation_0000364") as e:
        load_annotations(_cfg(path, num_classes=20), ["validation"], require_features=False, strict=True)
    assert str(path) in str(e.value) and "outside" in str(e.value)


def test_fixture_videos_load_with_their_lengths(shared_dir, monkeypatch):
    fixture = shared_dir / "fixtures" / "thumos_small"
    monkeypatch.chdir(fixture)
    cfg = load_config("config.yaml")
    ds = VideoDataset(cfg, cfg.val_split, training=False)
    ref = np.load(fixture / "reference_outputs.npz")
    assert [r.video_id for r in ds.records] == list(ref["test/video_ids"])
    for i, r in enumerate(ds.records):
        assert ds[i]["feats"].shape == (int(ref[f"test/{r.video_id}/input_len"]), 32)
    train = VideoDataset(cfg, cfg.train_split, training=True)
    assert [r.video_id for r in train.records] == [f"video_validation_{n:07d}" for n in range(1299, 1448, 37)]


# ---------------------------------------------------------------------------------------------------
# Feature files


def test_feature_formats(tmp_path):
    cfg = _cfg(tmp_path / "x.json", input_dim=4).dataset
    data = np.arange(24, dtype=np.float64).reshape(6, 4)
    np.save(tmp_path / "a.npy", data)
    np.savez(tmp_path / "a.npz", feats=data)
    for name in ("a.npy", "a.npz"):
        out = read_features(tmp_path / name, cfg, "a")
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, data)
    # downsample_rate keeps every r-th row; `columns` keeps the first columns before the width check.
    half = _cfg(tmp_path / "x.json", downsample_rate=2).dataset
    np.testing.assert_array_equal(read_features(tmp_path / "a.npy", half, "a"), data[::2])
    narrow = _cfg(tmp_path / "x.json", input_dim=2).dataset
    np.testing.assert_array_equal(read_features(tmp_path / "a.npy", narrow, "a", columns=2), data[:, :2])


def test_pickle_features_need_the_opt_in(tmp_path):
    slow = np.arange(2 * 5, dtype=np.float32).reshape(1, 2, 5)
    fast = -np.arange(3 * 5, dtype=np.float32).reshape(1, 3, 5)
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps({"slow_feature": slow, "fast_feature": fast}))
    cfg = _cfg(tmp_path / "x.json", input_dim=5, allow_pickle_features=True).dataset
    out = read_features(path, cfg, "v")
    np.testing.assert_array_equal(out, np.concatenate([slow, fast], axis=1)[0].T)  # slow first, [T, Cs+Cf]
    closed = _cfg(tmp_path / "x.json", input_dim=5).dataset
    with pytest.raises(DataError, match="allow_pickle_features") as e:
        read_features(path, closed, "v")
    assert str(path) in str(e.value) and "'v'" in str(e.value)


@pytest.mark.skipif(torch is None, reason="the torch extra is not installed (CI installs it)")
def test_torch_features(tmp_path):
    data = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save(data, tmp_path / "v.pt")
    np.testing.assert_array_equal(read_features(tmp_path / "v.pt", _cfg(tmp_path / "x").dataset, "v"), data)
    path = tmp_path / "s.pkl"
    path.write_bytes(pickle.dumps({"slow_feature": data.T[None], "fast_feature": data.T[None, :1]}))
    cfg = _cfg(tmp_path / "x", input_dim=5, allow_pickle_features=True).dataset
    assert read_features(path, cfg, "s").shape == (3, 5)


def test_torch_features_without_torch(tmp_path, without_torch):
    path = tmp_path / "v.pt"
    path.write_bytes(b"anything")
    with pytest.raises(DataError, match="needs torch") as e:
        read_features(path, _cfg(tmp_path / "x").dataset, "v")
    assert str(path) in str(e.value) and "'v'" in str(e.value) and ".npy" in str(e.value)


def _save(array):
    return lambda p: np.save(p, array, allow_pickle=True)


def _truncated_npz(path):
    np.savez(path, feats=np.zeros((50, 4)))
    data = path.read_bytes()
    path.write_bytes(data[:20] + data[-200:])  # header and central directory survive, the data do not


BAD_FEATURES = [
    ("missing.npy", None, "file not found"),
    ("corrupt.npy", lambda p: p.write_bytes(b"not an array"), "unreadable or corrupt"),
    ("objects.npy", _save(np.array([None, 1], dtype=object)), "not a plain numeric"),
    ("nokey.npz", lambda p: np.savez(p, other=np.zeros((2, 4))), "no key 'feats'"),
    ("corrupt.npz", lambda p: p.write_bytes(b"PK garbage"), "unreadable or corrupt"),
    ("truncated.npz", _truncated_npz, "unreadable or corrupt"),
    ("ndim.npy", _save(np.zeros((2, 4, 1))), "2-D"),
    ("width.npy", _save(np.zeros((2, 5))), "input_dim is 4"),
    ("empty.npy", _save(np.zeros((0, 4))), "T = 0"),
    ("nan.npy", _save(np.array([[0, 0, 0, 0], [0, np.nan, 0, 0]])), "NaN/Inf values (first at time step 1)"),
    ("inf.npy", _save(np.array([[np.inf, 0, 0, 0]])), "NaN/Inf"),
    ("overflow.npy", _save(np.full((1, 4), 1e300)), "NaN/Inf"),
    ("text.npy", _save(np.array([["a"] * 4])), "numeric"),
    ("complex.npy", _save(np.ones((2, 4), np.complex64)), "real numeric array, got dtype complex64"),
    ("complex.npz", lambda p: np.savez(p, feats=np.ones((2, 4), np.complex128)), "real numeric array"),
    ("bad.pkl", lambda p: p.write_bytes(pickle.dumps({"x": 1})), "allow_pickle_features"),
    ("feats.txt", lambda p: p.write_text("1 2 3 4"), "unsupported extension"),
]


@pytest.mark.parametrize("name,write,message", BAD_FEATURES, ids=[b[0] for b in BAD_FEATURES])
def test_bad_feature_files(tmp_path, name, write, message):
    path = tmp_path / name
    if write:
        write(path)
    with pytest.raises(DataError) as e:
        read_features(path, _cfg(tmp_path / "x").dataset, "video_7")
    assert message in str(e.value) and str(path) in str(e.value) and "'video_7'" in str(e.value)


BAD_PICKLES = [
    ({"x": 1}, "'slow_feature' and 'fast_feature'"),
    ({"slow_feature": np.zeros((2, 4)), "fast_feature": np.zeros((1, 1, 2))}, "[1, C, T]"),
    ({"slow_feature": np.zeros((1, 2, 3)), "fast_feature": np.zeros((1, 2, 4))}, "time steps"),
]


@pytest.mark.parametrize("content,message", BAD_PICKLES)
def test_bad_pickle_features(tmp_path, content, message):
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps(content))
    cfg = _cfg(tmp_path / "x", allow_pickle_features=True).dataset
    with pytest.raises(DataError) as e:
        read_features(path, cfg, "video_7")
    assert message in str(e.value) and str(path) in str(e.value) and "'video_7'" in str(e.value)
    path.write_bytes(b"\x80\x05 truncated")
    with pytest.raises(DataError, match="unreadable or corrupt"):
        read_features(path, cfg, "video_7")


def test_rgb_slicing_needs_enough_columns(tmp_path):
    _write_feats(tmp_path, "v.npy", 3, width=1000)
    with pytest.raises(DataError, match="cannot keep the first 1024") as e:
        read_features(tmp_path / "v.npy", _cfg(tmp_path / "x", input_dim=1024).dataset, "v", columns=1024)
    assert str(tmp_path / "v.npy") in str(e.value)


# ---------------------------------------------------------------------------------------------------
# Annotation validation

_BAD_LABEL = {"v_bad": _video(acts=[("A", 5, [1, 2])])}

BAD_ANNOTATIONS = [
    # (id, database or raw JSON text, dataset name, dataset overrides, expected message, video named)
    ("malformed", '{"database": {', "thumos", {}, "not valid JSON", None),
    ("no-database", '{"version": 1}', "thumos", {}, "'database'", None),
    ("duplicate-id", '{"database": {"v_dup": {}, "v_dup": {}}}', "thumos", {}, "listed twice", "v_dup"),
    (
        "no-annotations",
        {"v_x": {"subset": "Validation", "duration": 3}},
        "thumos",
        {},
        "'annotations'",
        "v_x",
    ),
    ("no-subset", _two_classes(v_x={"annotations": []}), "thumos", {}, "'subset'", "v_x"),
    ("no-duration", _two_classes(v_x=_video(duration=None)), "anet", {"num_classes": 1}, "duration", "v_x"),
    ("no-fps", _two_classes(v_x=_video(fps=None)), "thumos", {}, "'fps'", "v_x"),
    ("label-id-range", _two_classes(**_BAD_LABEL), "thumos", {}, "outside [0, 2)", "v_bad"),
    (
        "negative-id",
        _two_classes(v_x=_video(acts=[("C", -1, [1, 2])])),
        "anet",
        {"num_classes": 1},
        "-1",
        "v_x",
    ),
    ("name-two-ids", _two_classes(v_x=_video(acts=[("A", 1, [1, 2])])), "thumos", {}, "here but 0", "v_x"),
    ("id-two-names", _two_classes(v_x=_video(acts=[("C", 1, [1, 2])])), "thumos", {}, "'B' elsewhere", "v_x"),
    ("id-not-int", _two_classes(v_x=_video(acts=[("A", "0", [1, 2])])), "thumos", {}, "non-integer", "v_x"),
    (
        "no-label",
        {"v_x": {"subset": "x", "annotations": [{"label_id": 0, "segment": [1, 2]}]}},
        "thumos",
        {},
        "'label'",
        "v_x",
    ),
    ("bad-segment", _two_classes(v_x=_video(acts=[("A", 0, [1])])), "thumos", {}, "[start_s, end_s]", "v_x"),
    (
        "nan-segment",
        _two_classes(v_x=_video(acts=[("A", 0, [1, float("nan")])])),
        "thumos",
        {},
        "segment",
        "v_x",
    ),
    ("class-count", _two_classes(), "thumos", {"num_classes": 3}, "2 classes are annotated", None),
    ("hacs-count", _two_classes(), "hacs", {"num_classes": 3, "backbone_type": "i3d"}, "2 classes", None),
    ("no-videos", _two_classes(), "thumos", {}, "subsets in the file: validation", None),
]


@pytest.mark.parametrize(
    "database,name,overrides,message,video",
    [b[1:] for b in BAD_ANNOTATIONS],
    ids=[b[0] for b in BAD_ANNOTATIONS],
)
def test_bad_annotation_files(tmp_path, database, name, overrides, message, video):
    path = tmp_path / "ann.json"
    path.write_text(database if isinstance(database, str) else json.dumps({"database": database}))
    cfg = _cfg(path, name, **overrides)
    splits = ["test"] if message.startswith("subsets") else ["validation"]
    with pytest.raises(DataError) as e:
        load_annotations(cfg, splits, require_features=False)
    assert message in str(e.value) and str(path) in str(e.value)
    if video:
        assert repr(video) in str(e.value)


@pytest.mark.parametrize(
    "segment,problem",
    [
        ([3.0, 2.0], "reversed"),
        ([2.0, 2.0], "zero-length"),
        ([11.0, 12.0], "outside"),
        ([-3.0, 0.0], "outside"),
    ],
)
def test_bad_segments_dropped_by_default_and_rejected_when_strict(tmp_path, segment, problem, caplog):
    db = _two_classes(v_x=_video(duration=10.0, acts=[("A", 0, [1, 2]), ("B", 1, segment)]))
    cfg = _cfg(_write_json(tmp_path, db))
    with pytest.raises(DataError, match=problem) as e:
        load_annotations(cfg, ["validation"], require_features=False, strict=True)
    assert "'v_x'" in str(e.value) and str(tmp_path / "ann.json") in str(e.value)
    with caplog.at_level(logging.WARNING):
        records, names, info = load_annotations(cfg, ["validation"], require_features=False)
    assert info[f"dropped_{problem.replace('-', '_')}"] == 1 and "v_x" in caplog.text
    r = records[1]
    np.testing.assert_array_equal(r.segments_sec, [[1, 2]])
    np.testing.assert_array_equal(r.labels, [0])
    gt = ground_truth(cfg.dataset.json_file, "validation", "official")  # the evaluator keeps it, as published
    keep = gt.video_id == "v_x"
    assert [[s, e] for s, e in zip(gt.t_start[keep], gt.t_end[keep], strict=True)] == [[1, 2], segment]


def test_partly_outside_segments_are_kept_and_counted(tmp_path):
    db = _two_classes(v_x=_video(duration=10.0, acts=[("A", 0, [-0.5, 2]), ("B", 1, [9, 10.2])]))
    records, _, info = load_annotations(_cfg(_write_json(tmp_path, db)), ["validation"], require_features=False)
    assert info["partly_outside"] == 2 and info["num_segments"] == 4
    np.testing.assert_array_equal(records[1].segments_sec, [[-0.5, 2], [9, 10.2]])


def test_loader_rules(tmp_path):
    db = _two_classes(
        v_nodur=_video(duration=None, fps=25.0, acts=[]),
        v_test=_video(subset="TEST"),
    )
    path = _write_json(tmp_path, db)
    records, names, info = load_annotations(_cfg(path), ["VALIDATION"], require_features=False)
    assert [r.video_id for r in records] == ["v_a", "v_nodur"]  # subsets compared lower-cased
    assert records[1].duration == 1e8 and records[1].fps == 25.0 and records[1].labels.shape == (0,)
    assert names == ["A", "B"] and info["empty_label_ids"] == []
    records, _, _ = load_annotations(_cfg(path, default_fps=15), ["validation"], require_features=False)
    assert {r.fps for r in records} == {15.0}
    assert records[0].feature_path == tmp_path / "feats" / "v_a.npy"
    cfg = _cfg(path, "thumos_new", file_prefix="p_", feature_type="_spatial", file_ext=".pt")
    records, _, _ = load_annotations(cfg, ["validation"], require_features=False)
    assert records[0].feature_path == tmp_path / "feats" / "p_v_a_spatial.pt"


def test_anet_deduplicates_and_keeps_label_ids(tmp_path):
    acts = [("A", 7, [1.0, 5.0]), ("A", 7, [1.0005, 4.9995]), ("B", 3, [1.0, 5.0]), ("A", 7, [1.0, 5.002])]
    db = {"x": _video(subset="training", acts=acts)}
    path = _write_json(tmp_path, db)
    records, names, info = load_annotations(_cfg(path, "anet", num_classes=1), ["training"], require_features=False)
    assert info["duplicates"] == 1
    np.testing.assert_array_equal(records[0].labels, [7, 3, 7])  # JSON ids; items use 0 (class-agnostic)
    assert names[7] == "A" and names[3] == "B" and len(names) == 8
    records, _, info = load_annotations(_cfg(path, "custom", num_classes=8), ["training"], require_features=False)
    assert len(records[0].labels) == 4  # only anet and hacs de-duplicate


def test_missing_features_skip_or_fail(tmp_path, caplog):
    db = _two_classes(v_b=_video(), v_c=_video())
    path = _write_json(tmp_path, db)
    _write_feats(tmp_path / "feats", "v_b.npy", 5)
    for name in ("thumos", "multithumos", "custom"):
        with caplog.at_level(logging.WARNING):
            records, _, info = load_annotations(_cfg(path, name), ["validation"])
        assert [r.video_id for r in records] == ["v_b"] and info["skipped"] == ["v_a", "v_c"]
        assert "skipped 2 videos without a feature file: v_a, v_c" in caplog.text
    overrides = {
        "epic": {},
        "thumos_new": {},
        "anet": {"num_classes": 1},
        "hacs": {"backbone_type": "i3d"},
    }
    for name, extra in overrides.items():
        with pytest.raises(DataError, match="feature file of video 'v_a' not found") as e:
            load_annotations(_cfg(path, name, **extra), ["validation"])
        assert str(tmp_path / "feats") in str(e.value)


def test_config_problems(tmp_path):
    path = _write_json(tmp_path, _two_classes())
    with pytest.raises(DataError, match="dataset_name 'kinetics' is unknown"):
        load_annotations(_cfg(path, "kinetics"), ["validation"])
    with pytest.raises(DataError, match="no dataset.file_prefix"):
        load_annotations(_cfg(path, "hacs", backbone_type="i3d", file_prefix="v_"), ["validation"])
    with pytest.raises(DataError, match="force_upsampling"):
        load_annotations(_cfg(path, "anet", num_classes=1, force_upsampling=True), ["validation"])


# ---------------------------------------------------------------------------------------------------
# Dataset items


def test_items_map_seconds_to_the_feature_grid(tmp_path):
    db = _two_classes(v_empty=_video(fps=29.97, acts=[]))
    db["v_a"]["fps"] = 29.97
    path = _write_json(tmp_path, db)
    feats = _write_feats(tmp_path / "feats", "v_a.npy", 40)
    _write_feats(tmp_path / "feats", "v_empty.npy", 7)
    ds = VideoDataset(_cfg(path), ["validation"], training=False)
    item = ds[0]
    assert set(item) == {
        "video_id",
        "feats",
        "segments",
        "labels",
        "fps",
        "duration",
        "feat_stride",
        "feat_num_frames",
    }
    np.testing.assert_array_equal(item["feats"], feats)
    sec = np.array([[1.0, 2.0], [3.0, 4.0]])
    expect64 = (sec * 29.97 - 8.0) / 4  # float64 re-derivation
    assert item["segments"].dtype == np.float32 and item["labels"].dtype == np.int32
    np.testing.assert_allclose(item["segments"], expect64, rtol=1e-6)
    s32 = sec.astype(np.float32)
    np.testing.assert_array_equal(item["segments"], (s32 * np.float32(29.97) - np.float32(8)) / np.float32(4))
    np.testing.assert_array_equal(item["labels"], [0, 1])
    assert (item["fps"], item["duration"], item["feat_stride"], item["feat_num_frames"]) == (
        29.97,
        10.0,
        4,
        16,
    )
    empty = ds[1]
    assert empty["segments"].shape == (0, 2) and empty["labels"].shape == (0,)
    assert ds.class_names == ["A", "B"] and ds.empty_label_ids == []
    np.testing.assert_allclose(ds.tiou_thresholds, [0.3, 0.4, 0.5, 0.6, 0.7])


def test_training_items_are_cropped_deterministically(tmp_path):
    acts = [("A", 0, [float(t), float(t) + 1.5]) for t in range(1, 9)] + [("B", 1, [2.0, 9.0])]
    db = {"v_a": _video(acts=acts), "v_empty": _video(acts=[])}
    path = _write_json(tmp_path, db)
    _write_feats(tmp_path / "feats", "v_a.npy", 100)
    _write_feats(tmp_path / "feats", "v_empty.npy", 10)
    cfg = _cfg(path, crop_ratio=[0.9, 1.0])
    ds = VideoDataset(cfg, ["validation"], training=True, seed=5)
    assert [r.video_id for r in ds.records] == ["v_a"]  # training leaves out videos without annotations
    items = [ds.get(0, np.random.default_rng(1)) for _ in range(2)]
    for key in ("feats", "segments", "labels"):
        np.testing.assert_array_equal(items[0][key], items[1][key])
    item = items[0]
    assert item["feats"].shape == (32, 4) and len(item["labels"]) > 0
    assert item["segments"].min() >= 0 and item["segments"].max() <= 32
    preloaded = VideoDataset(cfg, ["validation"], training=True, preload=True, seed=5)
    np.testing.assert_array_equal(preloaded[0]["feats"], VideoDataset(cfg, ["validation"], True, seed=5)[0]["feats"])
    with pytest.raises(ValueError, match="rng"):
        ds.get(0, None)


def _grid_to_sec(g, fps, num_frames, stride):
    return [(x * stride + 0.5 * num_frames) / fps for x in g]


def test_anet_training_filter_and_class_agnostic_labels(tmp_path):
    # fps 15, stride 16, 16 frames: g = (15 s - 8) / 16; T = 10 -> vid_len = 10.5.
    grids = {"keep": [2, 6], "mostly_out": [9, 13], "clamped": [8, 12], "after": [11, 12]}
    acts = [(n, 5 + i, _grid_to_sec(g, 15, 16, 16)) for i, (n, g) in enumerate(grids.items())]
    path = _write_json(tmp_path, {"x": _video(subset="training", duration=20.0, acts=acts)})
    _write_feats(tmp_path / "feats", "v_x.npy", 10)
    cfg = _cfg(path, "anet", num_classes=1, default_fps=15, feat_stride=16, file_prefix="v_")
    item = VideoDataset(cfg, ["training"], training=True)[0]
    np.testing.assert_allclose(item["segments"], [[2, 6], [8, 10.5]], atol=1e-5)
    assert item["segments"][1, 1] == np.float32(10.5)
    np.testing.assert_array_equal(item["labels"], [0, 0])
    eval_item = VideoDataset(cfg, ["training"], training=False)[0]
    assert len(eval_item["labels"]) == 4  # no filter at inference
    np.testing.assert_allclose(VideoDataset(cfg, ["training"], False).tiou_thresholds, np.linspace(0.5, 0.95, 10))

    path = _write_json(tmp_path, {"x": _video(subset="training", duration=20.0, acts=acts[3:])})
    with pytest.raises(DataError, match="'x'.*no actions left"):
        VideoDataset(cfg, ["training"], training=True)[0]


def test_hacs_feature_folder_and_training_filter(tmp_path):
    # i3d: fps 2, stride 1, 1 frame: g = 2 s - 0.5; T = 10.
    acts = [("A", 0, [1.25, 2.75]), ("B", 1, [4.25, 6.25]), ("A", 0, [5.25, 5.75])]
    quirk = [("A", 0, [5.25, 5.75]), ("B", 1, [6.25, 6.75])]
    db = {"x": _video(subset="training", acts=acts), "y": _video(subset="training", acts=quirk)}
    path = _write_json(tmp_path, db)
    _write_feats(tmp_path / "feats" / "training", "x.npy", 10)
    _write_feats(tmp_path / "feats" / "training", "y.npy", 10)
    cfg = _cfg(path, "hacs", backbone_type="i3d", default_fps=2, feat_stride=1, num_frames=1, max_seq_len=64)
    ds = VideoDataset(cfg, ["training"], training=True)
    assert ds.records[0].feature_path == tmp_path / "feats" / "training" / "x.npy"
    np.testing.assert_array_equal(ds[0]["segments"], [[2, 5], [8, 10]])  # start >= 10 dropped, end clamped
    np.testing.assert_array_equal(ds[0]["labels"], [0, 1])
    np.testing.assert_array_equal(ds[1]["segments"], [[10, 11], [12, 13]])  # all dropped -> all kept (quirk)


def test_multithumos_rgb_only(tmp_path, caplog):
    path = _write_json(tmp_path, _two_classes())
    feats = _write_feats(tmp_path / "feats", "v_a.npy", 6, width=2048)
    for input_dim, rgb_only, width in ((1024, None, 1024), (2048, None, 2048), (1024, True, 1024)):
        cfg = _cfg(path, "multithumos", input_dim=input_dim, rgb_only=rgb_only)
        with caplog.at_level(logging.INFO):
            ds = VideoDataset(cfg, ["validation"], training=False)
        np.testing.assert_array_equal(ds[0]["feats"], feats[:, :width])
        assert f"rgb_only={width == 1024}" in caplog.text
    np.testing.assert_allclose(ds.tiou_thresholds, np.linspace(0.1, 0.9, 9))
    with pytest.raises(DataError, match="input_dim is 2048"):
        VideoDataset(_cfg(path, "multithumos", input_dim=2048, rgb_only=True), ["validation"], False)[0]


def test_epic_empty_label_ids_and_npz_features(tmp_path):
    db = {"P01": _video(acts=[("take", 0, [1, 2]), ("open", 3, [2, 3])])}
    path = _write_json(tmp_path, db)
    (tmp_path / "feats").mkdir()
    np.savez(tmp_path / "feats" / "P01.npz", feats=np.ones((9, 4), np.float32))
    ds = VideoDataset(_cfg(path, "epic", num_classes=5, file_ext=".npz", default_fps=30), ["validation"], False)
    assert ds.empty_label_ids == [1, 2, 4]
    assert ds.class_names == ["take", "class_1", "class_2", "open", "class_4"]
    assert ds[0]["feats"].shape == (9, 4)
    np.testing.assert_allclose(ds.tiou_thresholds, [0.1, 0.2, 0.3, 0.4, 0.5])


def test_downsample_rate_scales_the_stride(tmp_path):
    path = _write_json(tmp_path, _two_classes())
    feats = _write_feats(tmp_path / "feats", "v_a.npy", 9)
    item = VideoDataset(_cfg(path, downsample_rate=2), ["validation"], False)[0]
    assert item["feat_stride"] == 8 and item["feats"].shape == (5, 4)
    np.testing.assert_array_equal(item["feats"], feats[::2])
    np.testing.assert_allclose(item["segments"][0], [(30 - 8) / 8, (60 - 8) / 8])


def test_custom_dataset(tmp_path):
    db = _two_classes(v_nodur=_video(duration=None))
    path = _write_json(tmp_path, db)
    with pytest.raises(DataError, match="'v_nodur': missing or invalid 'duration'"):
        VideoDataset(_cfg(path, "custom"), ["validation"], False)
    del db["v_nodur"]
    _write_feats(tmp_path / "feats", "v_a.npy", 12)
    ds = VideoDataset(_cfg(_write_json(tmp_path, db), "custom", num_classes=3), ["validation"], False)
    assert ds[0]["fps"] == 30.0 and ds.empty_label_ids == [2]
    np.testing.assert_allclose(ds.tiou_thresholds, [0.3, 0.4, 0.5, 0.6, 0.7])
