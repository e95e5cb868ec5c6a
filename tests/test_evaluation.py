"""Detection mAP: golden evaluator fixtures, hand-computed cases, edge cases, and a per-prediction loop.

Independent expectations: the official evaluator's and the reference's own numbers (fixtures), APs worked
out by hand, and `loop_evaluate` below, a direct transcription of both protocols' rules (one prediction at
a time, Python floats) that shares no code with cltdr_jax.evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import pytest

from cltdr_jax import evaluation as ev
from cltdr_jax.errors import DataError

CASE_NAMES = ["case_01_thumos_like", "case_02_anet_like"]


# ---------------------------------------------------------------------------------------------------------
# Golden fixtures
# ---------------------------------------------------------------------------------------------------------


def _case_dirs(shared_dir):
    cases = sorted((shared_dir / "fixtures" / "eval_official").glob("case_*"))
    assert [c.name for c in cases][:2] == CASE_NAMES
    return cases


def _assert_metrics(got: dict, want: dict) -> None:
    assert got["tiou_thresholds"] == want["tiou_thresholds"]
    assert set(got["per_class_AP"]) == set(want["per_class_AP"])
    for name, ap in want["per_class_AP"].items():
        assert got["per_class_AP"][name] == ap, name  # bit for bit
    np.testing.assert_allclose(got["mAP"], want["mAP"], rtol=0, atol=1e-12)
    assert abs(got["average_mAP"] - want["average_mAP"]) <= 1e-12


@pytest.mark.parametrize("set_name", ["thumos", "anet"])
@pytest.mark.parametrize("protocol", ["official", "reference"])
def test_official_fixture_cases(shared_dir, protocol, set_name):
    for case in _case_dirs(shared_dir):
        expected = json.loads((case / "expected.json").read_text())
        thr = np.array(expected["thresholds"][set_name])
        gt = ev.load_ground_truth(case / "gt.json", subset=expected["subset"], protocol=protocol)
        got = ev.evaluate(gt, ev.load_predictions(case / "pred.json"), thr)
        if protocol == "official":
            want = expected["official"][set_name]
            assert list(got["per_class_AP"]) == expected["official_class_order"]
            counts = expected["official_counts"]
            assert len(gt.t_start) == counts["gt_instances_loaded"]
            assert len(gt.class_names) == counts["classes_evaluated"]
            preds = ev.load_predictions(case / "pred.json")
            assert int(np.sum(ev.prediction_classes(gt, preds) >= 0)) == counts["predictions_loaded"]
        else:
            want = expected["reference_cltdr_gmg"]["results"][set_name]
            assert len(gt.t_start) == expected["reference_cltdr_gmg"]["gt_instances_loaded"]
            assert list(gt.class_ids) == sorted(gt.class_ids)
        _assert_metrics(got, want)


def test_fixture_thresholds_are_the_dataset_defaults(shared_dir):
    expected = json.loads((_case_dirs(shared_dir)[0] / "expected.json").read_text())
    assert list(ev.DATASET_TIOU["thumos"]) == expected["thresholds"]["thumos"]
    assert list(ev.DATASET_TIOU["anet"]) == expected["thresholds"]["anet"]
    assert list(ev.DATASET_TIOU["hacs"]) == expected["thresholds"]["anet"]
    assert list(ev.DATASET_TIOU["multithumos"]) == list(np.linspace(0.1, 0.9, 9))
    assert list(ev.DATASET_TIOU["epic"]) == list(np.linspace(0.1, 0.5, 5))


def test_fixture_is_invariant_to_prediction_order(shared_dir):
    # The fixture is built so that tie order cannot matter; reversing every list must change nothing.
    case = _case_dirs(shared_dir)[0]
    gt = ev.load_ground_truth(case / "gt.json")
    pred = json.loads((case / "pred.json").read_text())
    reversed_pred = {"results": {v: d[::-1] for v, d in reversed(list(pred["results"].items()))}}
    thr = ev.DATASET_TIOU["anet"]
    assert (
        ev.evaluate(gt, ev.load_predictions(reversed_pred), thr)["per_class_AP"]
        == ev.evaluate(gt, ev.load_predictions(pred), thr)["per_class_AP"]
    )


def test_thumos_small_reference_map(thumos_small):
    fix = thumos_small
    want = json.loads((fix / "reference_map.json").read_text())
    gt = ev.load_ground_truth(fix / "annotations.json", subset="test", protocol="reference")
    preds = ev.load_predictions(fix / "reference_detections.json")
    got = ev.evaluate(gt, preds, want["tiou_thresholds"])
    np.testing.assert_allclose(got["mAP"], want["mAP"], rtol=0, atol=1e-12)
    assert abs(got["average_mAP"] - want["average_mAP"]) <= 1e-12
    by_id = dict(zip(gt.class_ids.tolist(), gt.class_names, strict=True))
    assert sorted(str(i) for i in by_id) == sorted(want["ap_per_class"])
    for cid, ap in want["ap_per_class"].items():
        np.testing.assert_allclose(got["per_class_AP"][by_id[int(cid)]], ap, rtol=0, atol=1e-12)

    # The same through evaluate_arrays, the entry point of the inference code.
    got_arrays = ev.evaluate_arrays(
        preds.video_id, preds.t_start, preds.t_end, preds.label_id, preds.score, gt, want["tiou_thresholds"]
    )
    assert got_arrays == got


# ---------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------


def _gt(anns, subset="validation", video="v1"):
    return {"database": {video: {"subset": subset, "duration": 100.0, "annotations": anns}}}


def _ann(s, e, label="a", label_id=0):
    return {"segment": [s, e], "label": label, "label_id": label_id}


def _det(s, e, score, label="a", label_id=None):
    d = {"segment": [s, e], "label": label, "score": score}
    if label_id is not None:
        d["label_id"] = label_id
    return d


def _ap(gt_json, dets, thr, protocol="official", video="v1", subset="validation"):
    gt = ev.load_ground_truth(gt_json, subset=subset, protocol=protocol)
    res = ev.evaluate(gt, ev.load_predictions({"results": {video: dets}}), thr)
    return res


def test_hand_computed_two_gt_three_predictions():
    gt = _gt([_ann(0, 10), _ann(20, 30)])
    dets = [_det(0, 10, 0.9), _det(100, 110, 0.8), _det(20, 28, 0.7)]
    res = _ap(gt, dets, [0.5, 0.9])
    # 0.5: TP FP TP -> P = 1, 1/2, 2/3; R = 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3.
    # 0.9: TP FP FP (third tIoU 0.8)                   -> AP = 1/2 * 1.
    assert res["per_class_AP"]["a"] == pytest.approx([0.5 + 0.5 * 2 / 3, 0.5], abs=1e-15)
    assert res["mAP"] == res["per_class_AP"]["a"]
    assert res["average_mAP"] == pytest.approx((0.5 + 0.5 * 2 / 3 + 0.5) / 2, abs=1e-15)


def test_second_prediction_on_a_matched_gt_takes_the_next_free_one():
    # The best prediction overlaps both GTs; the second one can still take the remaining GT.
    gt = _gt([_ann(0, 10), _ann(8, 18)])
    res = _ap(gt, [_det(1, 11, 0.9), _det(1, 11, 0.8)], [0.3, 0.8])
    # tIoU with GT1 = 9/11, with GT2 = 3/17 -> at 0.3 the second prediction finds no free GT >= 0.3.
    assert res["per_class_AP"]["a"] == [0.5, 0.5]
    res = _ap(gt, [_det(4, 14, 0.9), _det(4, 14, 0.8)], [0.4])
    # tIoU 6/14 with both -> both match at 0.4.
    assert res["per_class_AP"]["a"] == [1.0]


def test_threshold_equality_is_a_match():
    gt = _gt([_ann(0.0, 10.0)])
    res = _ap(gt, [_det(0.0, 5.0, 0.9)], [0.5, np.nextafter(0.5, 1.0)])
    assert res["per_class_AP"]["a"] == [1.0, 0.0]


def test_nan_tiou_counts_as_true_positive_official():
    # union == 0: zero-length prediction against a zero-length GT, anywhere in the same video.
    gt = _gt([_ann(5.0, 5.0)])
    assert _ap(gt, [_det(7.0, 7.0, 0.9)], [0.5, 0.95])["per_class_AP"]["a"] == [1.0, 1.0]
    # union == 0: reversed prediction whose length is minus the GT length.
    gt = _gt([_ann(0.0, 4.0)])
    assert _ap(gt, [_det(10.0, 6.0, 0.9)], [0.5])["per_class_AP"]["a"] == [1.0]
    # Ordinary reversed prediction: tIoU 0 -> false positive.
    assert _ap(gt, [_det(3.0, 0.0, 0.9)], [0.5])["per_class_AP"]["a"] == [0.0]


def test_duplicate_and_zero_length_gt_official_versus_reference():
    dup = _gt([_ann(0, 10), _ann(0, 10), _ann(0.0005, 10.0009)])
    one = [_det(0, 10, 0.9)]
    assert _ap(dup, one, [0.5])["per_class_AP"]["a"] == [1 / 3]
    assert _ap(dup, one, [0.5], protocol="reference")["per_class_AP"]["a"] == [1.0]
    three = [_det(0, 10, 0.9), _det(0, 10, 0.8), _det(0, 10, 0.7)]
    assert _ap(dup, three, [0.5])["per_class_AP"]["a"] == [1.0]

    zero = _gt([_ann(0, 10), _ann(20, 20)])
    assert _ap(zero, one, [0.5])["per_class_AP"]["a"] == [0.5]  # counted, never matched
    assert _ap(zero, one, [0.5], protocol="reference")["per_class_AP"]["a"] == [1.0]  # dropped

    rev = _gt([_ann(0, 10), _ann(30, 20)])
    assert _ap(rev, one, [0.5])["per_class_AP"]["a"] == [0.5]
    assert _ap(rev, one, [0.5], protocol="reference")["per_class_AP"]["a"] == [0.5]


def test_subset_comparison_official_exact_reference_lowercased():
    gt = _gt([_ann(0, 10)], subset="Validation")
    with pytest.raises(DataError, match="no video of subset 'validation'"):
        ev.load_ground_truth(gt, subset="validation")
    assert _ap(gt, [_det(0, 10, 0.9)], [0.5], protocol="reference")["per_class_AP"]["a"] == [1.0]


def test_predictions_without_gt_class_absent_video_and_class_without_predictions():
    gt = {
        "database": {
            "v1": {"subset": "validation", "annotations": [_ann(0, 10, "a", 4), _ann(0, 10, "b", 7)]},
            "v2": {"subset": "training", "annotations": [_ann(0, 10, "z", 0)]},
        }
    }
    g = ev.load_ground_truth(gt)
    assert g.class_names == ("a", "b") and list(g.class_ids) == [4, 7]
    results = {
        "v1": [_det(0, 10, 0.5, "a", 4), _det(0, 10, 0.99, "z", 0)],  # "z" has no validation GT
        "v_absent": [_det(0, 10, 0.9, "a", 4)],
        "v2": [_det(0, 10, 0.8, "a", 4)],  # training video: no GT in the subset
    }
    res = ev.evaluate(g, ev.load_predictions({"results": results}), [0.5])
    # official: "z" ignored; "a": FP FP TP -> AP = 1 * 1/3; "b": no predictions -> 0, counted in the mean.
    assert res["per_class_AP"] == {"a": [1 / 3], "b": [0.0]}
    assert res["mAP"] == [1 / 6]
    # reference: label_id 0 has no GT, keeps its raw value 0 and lands in class index 0 ("a", id 4).
    g = ev.load_ground_truth(gt, protocol="reference")
    assert g.class_names == ("a", "b")
    res = ev.evaluate(g, ev.load_predictions({"results": results}), [0.5])
    # "a" ranked: z(0.99, TP) absent(0.9, FP) training(0.8, FP) v1(0.5, FP; GT taken) -> AP 1.
    assert res["per_class_AP"] == {"a": [1.0], "b": [0.0]}


def test_official_class_order_and_integer_labels():
    gt = {
        "taxonomy": [{"nodeId": 9, "nodeName": "late"}, {"nodeId": 1, "nodeName": "early"}],
        "database": {
            "v1": {"subset": "validation", "annotations": [_ann(0, 10, "late", 9)]},
            "v2": {"subset": "validation", "annotations": [_ann(0, 10, "early", 1)]},
        },
    }
    official = ev.load_ground_truth(gt)
    reference = ev.load_ground_truth(gt, protocol="reference")
    assert official.class_names == ("late", "early")
    assert reference.class_names == ("early", "late")
    # Integer labels are label_ids in both protocols.
    preds = ev.load_predictions({"results": {"v1": [{"segment": [0, 10], "label": 9, "score": 0.5}]}})
    for g in (official, reference):
        assert ev.evaluate(g, preds, [0.5])["per_class_AP"] == {"late": [1.0], "early": [0.0]}


def test_predictions_with_only_names_under_the_reference_protocol():
    gt = _gt([_ann(0, 10, "a", 3)])
    assert _ap(gt, [_det(0, 10, 0.9, "a")], [0.5], protocol="reference")["per_class_AP"] == {"a": [1.0]}


def test_empty_predictions_give_zero():
    g = ev.load_ground_truth(_gt([_ann(0, 10)]))
    res = ev.evaluate(g, ev.load_predictions({"results": {}}), ev.DATASET_TIOU["thumos"])
    assert res["mAP"] == [0.0] * 5 and res["average_mAP"] == 0.0


def test_interpolated_ap_matches_hand_values():
    assert ev.interpolated_ap(np.array([1.0, 0.5, 2 / 3]), np.array([0.5, 0.5, 1.0])) == 0.5 + 0.5 * (2 / 3)
    assert ev.interpolated_ap(np.array([0.0]), np.array([0.0])) == 0.0
    assert ev.interpolated_ap(np.array([1.0]), np.array([1.0])) == 1.0


def test_segment_tiou_values():
    t = ev.segment_tiou(
        np.array([0.0, 5.0, 3.0]),
        np.array([10.0, 5.0, 1.0]),
        np.array([[0.0, 5.0]] * 3),
        np.array([[5.0, 5.0]] * 3),
    )
    assert t[0, 0] == 0.5 and t[0, 1] == 0.0
    assert math.isnan(t[1, 1])  # zero-length against zero-length
    assert t[2, 0] == 0.0  # reversed


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_files_name_file_and_video(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        ev.load_ground_truth(bad)
    with pytest.raises(DataError, match=r"missing\.json: ground truth file not found"):
        ev.load_ground_truth(tmp_path / "missing.json")
    nodb = tmp_path / "nodb.json"
    nodb.write_text(json.dumps({"version": "x"}))
    with pytest.raises(DataError, match=r"nodb\.json: no 'database'"):
        ev.load_ground_truth(nodb)
    with pytest.raises(DataError, match=r"nodb\.json: no 'results'"):
        ev.load_predictions(nodb)
    noann = tmp_path / "noann.json"
    noann.write_text(json.dumps({"database": {"vid_7": {"subset": "validation"}}}))
    with pytest.raises(DataError, match=r"noann\.json: video 'vid_7'.*no 'annotations'"):
        ev.load_ground_truth(noann)
    badseg = tmp_path / "badseg.json"
    badseg.write_text(json.dumps(_gt([{"segment": [1], "label": "a"}], video="vid_8")))
    with pytest.raises(DataError, match=r"badseg\.json: video 'vid_8', annotation 0: 'segment'"):
        ev.load_ground_truth(badseg)
    with pytest.raises(DataError, match=r"no 'label_id'"):
        ev.load_ground_truth(_gt([{"segment": [0, 1], "label": "a"}]), protocol="reference")
    badpred = tmp_path / "badpred.json"
    badpred.write_text(json.dumps({"results": {"vid_9": [{"segment": [0, 1], "label": "a"}]}}))
    with pytest.raises(DataError, match=r"badpred\.json: video 'vid_9', detection 0: 'score'"):
        ev.load_predictions(badpred)
    badlabel = tmp_path / "badlabel.json"
    badlabel.write_text(json.dumps({"results": {"vid_9": [{"segment": [0, 1], "label": 1.5, "score": 1}]}}))
    with pytest.raises(DataError, match=r"badlabel\.json: video 'vid_9', detection 0: 'label'"):
        ev.load_predictions(badlabel)
    with pytest.raises(DataError, match="no annotations"):
        ev.load_ground_truth(_gt([]))
    with pytest.raises(DataError, match="non-finite"):
        ev.Predictions.from_arrays(["v"], [0.0], [float("nan")], [0], [1.0])


# ---------------------------------------------------------------------------------------------------------
# The `cltdr map` command and the table
# ---------------------------------------------------------------------------------------------------------


def test_cmd_map_writes_metrics(tmp_path, capsys):
    from cltdr_jax import commands

    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps(_gt([_ann(0, 10), _ann(20, 30)])))
    pred_path.write_text(json.dumps({"results": {"v1": [_det(0, 10, 0.9), _det(100, 110, 0.8), _det(20, 28, 0.7)]}}))
    out = tmp_path / "sub" / "metrics.json"
    args = argparse.Namespace(
        gt=str(gt_path),
        pred=str(pred_path),
        tiou="0.5,0.9",
        subset="validation",
        out=str(out),
        protocol="official",
    )
    assert commands.map_(args) == 0
    printed = capsys.readouterr().out
    assert "Avg." in printed and "83.33" in printed and "66.67" in printed
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"tiou_thresholds", "mAP", "average_mAP", "per_class_AP"}
    assert metrics["tiou_thresholds"] == [0.5, 0.9]
    assert metrics["per_class_AP"]["a"] == pytest.approx([0.5 + 1 / 3, 0.5], abs=1e-15)


def test_parse_tiou():
    assert list(ev.parse_tiou("0.3, 0.5,0.7")) == [0.3, 0.5, 0.7]
    assert list(ev.parse_tiou("anet")) == list(np.linspace(0.5, 0.95, 10))
    with pytest.raises(DataError, match="--tiou"):
        ev.parse_tiou("0.3;0.5")


def test_format_table_layout():
    metrics = {
        "tiou_thresholds": [0.3, 0.5],
        "mAP": [0.5, 0.25],
        "average_mAP": 0.375,
        "per_class_AP": {"x": [0.5, 0.25]},
    }
    text = ev.format_table(metrics, per_class=True)
    lines = text.splitlines()
    assert lines[0].split() == ["tIoU", "0.30", "0.50", "|", "Avg."]
    assert lines[2].split() == ["mAP", "(%)", "50.00", "25.00", "|", "37.50"]
    assert lines[3].split() == ["x", "50.00", "25.00", "|", "37.50"]


# ---------------------------------------------------------------------------------------------------------
# A straightforward per-prediction loop, for exact comparison on random data
# ---------------------------------------------------------------------------------------------------------


def _loop_tiou(s, e, gs, ge):
    inter = max(0.0, min(e, ge) - max(s, gs))
    union = (ge - gs) + (e - s) - inter
    return inter / union if union != 0 else math.nan


def _loop_ap(tp, n_pos):
    tp_cum = fp_cum = 0
    prec, rec = [], []
    for x in tp:
        tp_cum += x
        fp_cum += 1 - x
        prec.append(tp_cum / (tp_cum + fp_cum))
        rec.append(tp_cum / n_pos)
    prec = [0.0, *prec, 0.0]
    rec = [0.0, *rec, 1.0]
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    terms = [(rec[i] - rec[i - 1]) * prec[i] for i in range(1, len(rec)) if rec[i] != rec[i - 1]]
    # np.sum, not sum(): the evaluators' pairwise summation decides the last bit.
    return float(np.sum(np.array(terms)))


def loop_evaluate(gt_json, pred_json, subset, protocol, thresholds):
    """Both protocols' rules written out one GT and one prediction at a time."""
    gts = []
    for vid, v in gt_json["database"].items():
        if (v["subset"] != subset) if protocol == "official" else (v["subset"].lower() != subset):
            continue
        anns = v["annotations"]
        if protocol == "reference":
            kept = []
            for a in anns:
                if not any(
                    abs(a["segment"][0] - b["segment"][0]) <= 1e-3
                    and abs(a["segment"][1] - b["segment"][1]) <= 1e-3
                    and a["label_id"] == b["label_id"]
                    for b in kept
                ):
                    kept.append(a)
            anns = kept
        for a in anns:
            key = a["label"] if protocol == "official" else a["label_id"]
            gts.append((vid, float(a["segment"][0]), float(a["segment"][1]), key))
    keys = list(dict.fromkeys(g[3] for g in gts)) if protocol == "official" else sorted({g[3] for g in gts})
    index = {k: i for i, k in enumerate(keys)}
    gts = [(v, s, e, index[k]) for v, s, e, k in gts]
    if protocol == "reference":
        gts = [g for g in gts if g[1] != g[2]]

    preds = []
    for vid, dets in pred_json["results"].items():
        for d in dets:
            if protocol == "official":
                if d["label"] not in index:
                    continue
                cls = index[d["label"]]
            else:
                cls = index.get(d["label_id"], d["label_id"])
            preds.append((vid, float(d["segment"][0]), float(d["segment"][1]), cls, d["score"]))

    ap = np.zeros((len(thresholds), len(keys)))
    for k in range(len(keys)):
        g = [x for x in gts if x[3] == k]
        p = [x for x in preds if x[3] == k]
        if not p:
            continue
        order = np.array([x[4] for x in p], dtype=np.float64).argsort()[::-1]
        locked = [[False] * len(g) for _ in thresholds]
        tp = [[0] * len(p) for _ in thresholds]
        for r, i in enumerate(order):
            vid, s, e = p[i][:3]
            mine = [j for j in range(len(g)) if g[j][0] == vid]
            tious = {j: _loop_tiou(s, e, g[j][1], g[j][2]) for j in mine}
            # NaN first, then decreasing tIoU, ties: later GT first.
            visit = sorted(
                mine,
                key=lambda j: (math.isnan(tious[j]), 0.0 if math.isnan(tious[j]) else tious[j], j),
                reverse=True,
            )
            for t, th in enumerate(thresholds):
                for j in visit:
                    if tious[j] < th:
                        break
                    if locked[t][j]:
                        continue
                    locked[t][j] = True
                    tp[t][r] = 1
                    break
        for t in range(len(thresholds)):
            ap[t, k] = _loop_ap(tp[t], len(g)) if g else 0.0
    m_ap = ap.mean(axis=1)
    return {
        "tiou_thresholds": [float(t) for t in thresholds],
        "mAP": [float(x) for x in m_ap],
        "average_mAP": float(m_ap.mean()),
        "per_class_AP": dict(zip(keys, ap.T.tolist(), strict=True)),
    }


def random_case(seed):
    """Small random GT + predictions on a 0.5 s grid: exact threshold ties, zero-length, reversed and
    duplicate segments, label_ids without GT, absent and other-subset videos, tied scores."""
    rng = random.Random(seed)
    names = [f"c{i}" for i in range(8)]
    gt_classes = rng.sample(range(8), 4)
    db = {}
    for v in range(10):
        subset = rng.choice(["validation"] * 6 + ["training", "Validation"])
        anns = []
        for _ in range(rng.randint(0, 6)):
            c = rng.choice(gt_classes)
            s = rng.randint(0, 80) / 2
            e = s + rng.choice([0, 1, 2, 3, 4, 6, 10, -2]) / 2
            anns.append({"segment": [s, e], "label": names[c], "label_id": c})
        if anns and rng.random() < 0.5:
            a = rng.choice(anns)
            jitter = rng.choice([0.0, 0.0004, 0.002])
            anns.append(
                {
                    "segment": [a["segment"][0] + jitter, a["segment"][1]],
                    "label": a["label"],
                    "label_id": a["label_id"],
                }
            )
        db[f"vid{v}"] = {"subset": subset, "annotations": anns}
    results = {}
    for v in [*range(10), 99]:
        dets = []
        for _ in range(rng.randint(0, 25)):
            c = rng.choice(gt_classes) if rng.random() < 0.8 else rng.randrange(8)
            s = rng.randint(0, 80) / 2
            e = s + rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 10, -2]) / 2
            score = rng.choice([0.9, 0.5, 0.25]) if rng.random() < 0.2 else rng.random()
            dets.append({"segment": [s, e], "label": names[c], "label_id": c, "score": score})
        results[f"vid{v}"] = dets
    return {"database": db}, {"results": results}


@pytest.mark.parametrize("protocol", ["official", "reference"])
@pytest.mark.parametrize("seed", range(8))
def test_vectorised_equals_loop_on_random_data(protocol, seed):
    gt_json, pred_json = random_case(seed)
    thr = [0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0]
    want = loop_evaluate(gt_json, pred_json, "validation", protocol, thr)
    assert want["per_class_AP"], "the random draw should hold GT"
    gt = ev.load_ground_truth(gt_json, subset="validation", protocol=protocol)
    got = ev.evaluate(gt, ev.load_predictions(pred_json), thr)
    if protocol == "reference":
        # Names of the classes are the file's names; the loop keys by label_id.
        want["per_class_AP"] = {f"c{k}": v for k, v in want["per_class_AP"].items()}
    assert list(got["per_class_AP"]) == list(want["per_class_AP"])
    assert got == want


def test_blocked_tiou_computation_gives_the_same_result(monkeypatch):
    gt_json, pred_json = random_case(3)
    gt = ev.load_ground_truth(gt_json)
    preds = ev.load_predictions(pred_json)
    want = ev.evaluate(gt, preds, ev.DATASET_TIOU["thumos"])
    monkeypatch.setattr(ev, "_TIOU_BLOCK", 7)
    assert ev.evaluate(gt, preds, ev.DATASET_TIOU["thumos"]) == want
