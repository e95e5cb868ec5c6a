"""Pictures: each writes a valid PNG; the plot command names the file when the video is missing."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("matplotlib", reason="plots need the optional matplotlib dependency")

from cltdr_jax import plots  # noqa: E402
from cltdr_jax.errors import DataError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def _files(tmp_path):
    gt = {
        "taxonomy": [{"nodeId": 0, "nodeName": "Jump"}, {"nodeId": 1, "nodeName": "Throw"}],
        "database": {
            "vid": {
                "subset": "validation",
                "duration": 60.0,
                "annotations": [
                    {"segment": [5.0, 12.0], "label": "Jump", "label_id": 0},
                    {"segment": [30.0, 41.5], "label": "Throw", "label_id": 1},
                ],
            }
        },
    }
    dets = {
        "results": {
            "vid": [
                {"segment": [4.5, 12.5], "label": 0, "score": 0.93},
                {"segment": [6.0, 10.0], "label": 0, "score": 0.41},
                {"segment": [29.0, 40.0], "label": 1, "score": 0.77},
                {"segment": [50.0, 55.0], "label": 5, "score": 0.12},
            ]
        }
    }
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    det_path.write_text(json.dumps(dets))
    return gt_path, det_path


def test_plot_timeline_direct(tmp_path):
    out = plots.plot_timeline(
        [{"segment": [1, 3], "label": 0, "score": 0.9}, {"segment": [2, 4], "label": "Other", "score": 0.2}],
        [{"segment": [1, 3], "label": 0}],
        ["Jump"],
        None,
        tmp_path / "t.png",
        top=5,
    )
    _assert_png(out)


def test_cmd_plot_writes_png(tmp_path, capsys):
    gt_path, det_path = _files(tmp_path)
    out = tmp_path / "fig" / "timeline.png"
    args = argparse.Namespace(detections=str(det_path), gt=str(gt_path), video="vid", out=str(out), top=3)
    from cltdr_jax import commands

    assert commands.plot(args) == 0
    _assert_png(out)
    assert "timeline.png" in capsys.readouterr().out


def test_cmd_plot_missing_video_names_the_file(tmp_path):
    gt_path, det_path = _files(tmp_path)
    with pytest.raises(DataError, match=r"dets\.json: video 'nope'"):
        plots.plot_video(det_path, gt_path, "nope", tmp_path / "x.png", top=3)
    other = json.loads(det_path.read_text())
    other["results"]["nope"] = other["results"]["vid"]
    det_path.write_text(json.dumps(other))
    with pytest.raises(DataError, match=r"gt\.json: video 'nope'"):
        plots.plot_video(det_path, gt_path, "nope", tmp_path / "x.png", top=3)


def test_plot_ap(tmp_path):
    metrics = {
        "tiou_thresholds": [0.3, 0.5, 0.7],
        "mAP": [0.6, 0.5, 0.3],
        "average_mAP": 0.4666,
        "per_class_AP": {"Jump": [0.7, 0.6, 0.4], "Throw": [0.5, 0.4, 0.2]},
    }
    paths = plots.plot_ap(metrics, tmp_path / "ap")
    assert [p.name for p in paths] == ["per_class_ap.png", "map_vs_tiou.png"]
    for p in paths:
        _assert_png(p)


def test_plot_training_curves(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [
        {
            "step": s,
            "loss": 2.0 / (s + 1),
            "cls_loss": 1.5 / (s + 1),
            "reg_loss": 0.5 / (s + 1),
            "lr": 1e-4 * s,
            "grad_norm": 3.0,
        }
        for s in range(20)
    ]
    lines += [{"epoch": 1, "step": 10, "average_mAP": 0.2}, {"epoch": 2, "step": 20, "average_mAP": 0.35}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    _assert_png(plots.plot_training_curves(log, tmp_path / "curves.png"))

    # Missing series are drawn as empty panels, not errors.
    sparse = tmp_path / "sparse.jsonl"
    sparse.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    _assert_png(plots.plot_training_curves(sparse, tmp_path / "sparse.png"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        plots.plot_training_curves(bad, tmp_path / "bad.png")


def test_missing_matplotlib_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(plots.PlotDependencyError, match=r"pip install cltdr-jax\[plot\]"):
        plots._new_figure(1, 1)
