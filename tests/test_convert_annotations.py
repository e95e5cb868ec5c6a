"""`cltdr convert-annotations` on the real EPIC-KITCHENS-100 and ActivityNet-1.3 (BSN) files."""

from __future__ import annotations

import json
from argparse import Namespace
from collections import Counter

import pytest

from cltdr_jax.commands import convert_annotations as cmd_convert_annotations
from cltdr_jax.config import config_from_dict
from cltdr_jax.data import load_annotations
from cltdr_jax.data.convert_annotations import identify_input, parse_timestamp
from cltdr_jax.errors import DataError


def _convert(tmp_path, kind, inputs, classes="verb"):
    out = tmp_path / "sub" / f"{kind}_{classes}.json"
    assert (
        cmd_convert_annotations(Namespace(kind=kind, inputs=[str(p) for p in inputs], out=str(out), classes=classes))
        == 0
    )
    return out, json.loads(out.read_text())


def _cfg(json_file, name, num_classes, **dataset):
    dataset = {"json_file": str(json_file), "num_classes": num_classes, **dataset}
    return config_from_dict({"dataset_name": name, "dataset": dataset, "model": {"sgp_mlp_dim": 8}})


def _counts(database):
    videos, segments = Counter(), Counter()
    for v in database.values():
        videos[v["subset"]] += 1
        segments[v["subset"]] += len(v["annotations"])
    return videos, segments


@pytest.fixture(scope="module")
def epic_dir(shared_dir):
    return shared_dir / "data" / "epic_kitchens_100"


@pytest.fixture(scope="module")
def anet_dir(shared_dir):
    return shared_dir / "data" / "activitynet_1.3"


def test_parse_timestamp():
    assert parse_timestamp("00:00:01.89") == 1.89
    assert parse_timestamp("01:02:03.45") == 3723.45  # one rounding from the exact decimal
    assert parse_timestamp("00:05:27.28") == 327.28
    for bad in ("1.5", "00:xx:01.00"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


@pytest.mark.parametrize("classes,present,num_classes", [("verb", 78, 97), ("noun", 211, 300)])
def test_epic_validation(tmp_path, epic_dir, classes, present, num_classes):
    inputs = [  # any order
        epic_dir / "EPIC_100_noun_classes.csv",
        epic_dir / "EPIC_100_video_info.csv",
        epic_dir / "EPIC_100_validation.csv",
        epic_dir / "EPIC_100_verb_classes.csv",
    ]
    out, converted = _convert(tmp_path, "epic", inputs, classes)
    db = converted["database"]
    videos, segments = _counts(db)
    assert videos == {"validation": 138} and segments == {"validation": 9668}  # data README
    assert len({a["label_id"] for v in db.values() for a in v["annotations"]}) == present
    first = db["P01_11"]
    assert first["fps"] == pytest.approx(59.94, abs=1e-3) and first["duration"] > 0
    if classes == "verb":  # first row: take plate, 00:00:00.00 .. 00:00:01.89, verb_class 0 ("take")
        assert first["annotations"][0] == {"label": "take", "label_id": 0, "segment": [0.0, 1.89]}
    else:  # noun_class 2 ("plate")
        assert first["annotations"][0] == {"label": "plate", "label_id": 2, "segment": [0.0, 1.89]}

    records, names, info = load_annotations(
        _cfg(out, "epic", num_classes, default_fps=30), ["validation"], require_features=False
    )
    # Nothing is dropped; one segment (P29_05, 1820.75 .. 1821.75 s) ends 0.01 s after the stated duration.
    assert len(records) == 138 and info["num_segments"] == 9668 and info["partly_outside"] == 1
    assert len(info["empty_label_ids"]) == num_classes - present
    assert {r.fps for r in records} == {30.0}  # default_fps overrides the video's own fps


def test_anet_bsn(tmp_path, anet_dir):
    inputs = [
        anet_dir / "video_info_new.csv",
        anet_dir / "action_name.csv",
        anet_dir / "anet_anno_action.json",
    ]
    out, converted = _convert(tmp_path, "anet-bsn", inputs)
    db = converted["database"]
    videos, segments = _counts(db)
    # data README: training 9,649 / 14,859, validation 4,728 / 7,293, testing 4,851 without annotations.
    assert videos == {"training": 9649, "validation": 4728, "testing": 4851}
    assert segments == {"training": 14859, "validation": 7293, "testing": 0}
    names = (anet_dir / "action_name.csv").read_text().splitlines()[1:]
    assert len({a["label_id"] for v in db.values() for a in v["annotations"]}) == 200
    first = db["QOlSCBRmfWY"]  # "v_QOlSCBRmfWY" in the BSN file
    assert first["duration"] == pytest.approx(82.73) and first["subset"] == "training"
    assert first["annotations"][0]["label"] == "Ballet"
    assert first["annotations"][0]["label_id"] == names.index("Ballet")
    bsn = json.loads((anet_dir / "anet_anno_action.json").read_text())
    assert list(db) == [key[2:] for key in bsn]  # every BSN id is "v_" + the YouTube id

    cfg = _cfg(out, "anet", 1, default_fps=15, feat_stride=16, num_frames=16, file_prefix="v_")
    for subset, published in (("training", 14859), ("validation", 7293)):
        records, class_names, info = load_annotations(cfg, [subset], require_features=False)
        expected_dups, expected_zero = _anet_policy(db, subset)
        # validation: 3 zero-length, 19 duplicates (data README) -> 7,271 kept; training: 9 and 31 -> 14,819
        assert (info["dropped_zero_length"], info["duplicates"]) == (expected_zero, expected_dups)
        assert info["num_segments"] == published - expected_zero - expected_dups
        assert class_names == names  # label_ids kept for the evaluator; items are class-agnostic
    assert (expected_zero, expected_dups) == (3, 19)


def _anet_policy(db, subset):
    """Independent count: duplicates (same label_id, boundaries within 1e-3 s of an earlier kept one), then
    zero-length segments among the remaining."""
    dups = zero = 0
    for v in db.values():
        if v["subset"] != subset:
            continue
        kept = []
        for a in v["annotations"]:
            (s, e), c = a["segment"], a["label_id"]
            if any(k[2] == c and abs(k[0] - s) <= 1e-3 and abs(k[1] - e) <= 1e-3 for k in kept):
                dups += 1
                continue
            kept.append((s, e, c))
            zero += e == s
    return dups, zero


def test_missing_and_unrecognised_inputs(tmp_path, epic_dir, anet_dir):
    with pytest.raises(DataError, match="exactly one EPIC_100_noun_classes.csv"):
        _convert(
            tmp_path,
            "epic",
            [
                epic_dir / "EPIC_100_validation.csv",
                epic_dir / "EPIC_100_video_info.csv",
                epic_dir / "EPIC_100_verb_classes.csv",
            ],
            classes="noun",
        )
    with pytest.raises(DataError, match="needs EPIC_100_train.csv"):
        _convert(tmp_path, "epic", [epic_dir / "EPIC_100_video_info.csv", epic_dir / "EPIC_100_verb_classes.csv"])
    with pytest.raises(DataError, match="exactly one action_name.csv"):
        _convert(tmp_path, "anet-bsn", [anet_dir / "video_info_new.csv", anet_dir / "anet_anno_action.json"])
    odd = tmp_path / "odd.csv"
    odd.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a recognised annotation input") as e:
        identify_input(odd)
    assert str(odd) in str(e.value)
    renamed = tmp_path / "classes.csv"
    renamed.write_text("id,key,instances,category\n0,take,[],x\n")
    with pytest.raises(DataError, match="neither 'verb' nor 'noun'"):
        identify_input(renamed)
    assert identify_input(epic_dir / "EPIC_100_validation.csv") == "epic_annotations"


def test_bad_epic_rows_name_the_file_row_and_video(tmp_path, epic_dir):
    header = (epic_dir / "EPIC_100_validation.csv").read_text().splitlines()[0]
    good = "P01_11_0,P01,P01_11,00:00:00.560,00:00:00.00,00:00:01.89,1,113,take plate,take,0,plate,2,[],[2]"
    rows = {
        "expected hh:mm:ss.ss": good.replace("00:00:00.00", "00:00:xx"),
        "not listed in": good.replace("P01_11", "X_99"),
        "verb_class 999 is not in": good.replace("take,0,", "take,999,"),
    }
    for message, row in rows.items():
        csv_path = tmp_path / "EPIC_100_validation.csv"
        csv_path.write_text(f"{header}\n{row}\n")
        inputs = [csv_path, epic_dir / "EPIC_100_video_info.csv", epic_dir / "EPIC_100_verb_classes.csv"]
        with pytest.raises(DataError, match=message) as e:
            _convert(tmp_path, "epic", inputs)
        video = "X_99" if message == "not listed in" else "P01_11"
        assert f"{csv_path}: row 2 (video {video!r})" in str(e.value)


def test_bad_anet_label_names_the_video(tmp_path, anet_dir):
    bsn = tmp_path / "anet_anno_action.json"
    bsn.write_text(
        json.dumps(
            {
                "v_---9CpRcKoU": {
                    "duration_second": 14.07,
                    "annotations": [{"segment": [1, 2], "label": "Juggling fire"}],
                }
            }
        )
    )
    inputs = [bsn, anet_dir / "video_info_new.csv", anet_dir / "action_name.csv"]
    with pytest.raises(DataError, match="label 'Juggling fire' is not in") as e:
        _convert(tmp_path, "anet-bsn", inputs)
    assert str(bsn) in str(e.value) and "'v_---9CpRcKoU'" in str(e.value)
