"""`cltdr demo --quick`: the embedded default job end to end (synthesise, train, evaluate, plot)."""

from __future__ import annotations

import json

import pytest

from cltdr_jax.cli import main


@pytest.mark.slow
def test_quick_demo_trains_evaluates_and_draws(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLTDR_XLA_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "mAP (%)" in out and "training curves" in out

    work = tmp_path / "demo"
    log = [json.loads(line) for line in (work / "train" / "log.jsonl").read_text().splitlines()]
    losses = [r["final_loss"] for r in log if "final_loss" in r]
    assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2, f"the loss did not fall: {losses}"

    metrics = json.loads((work / "train" / "metrics.json").read_text())
    assert len(metrics["mAP"]) == 5 and 0.0 <= metrics["average_mAP"] <= 1.0
    detections = json.loads((work / "train" / "detections.json").read_text())["results"]
    gt = json.loads((work / "data" / "annotations.json").read_text())["database"]
    test_videos = {v for v, e in gt.items() if e["subset"].lower() == "test"}
    assert set(detections) == test_videos
    for rows in detections.values():
        for r in rows:
            start, end = r["segment"]
            assert 0.0 <= start <= end and 0.0 < r["score"] <= 1.0
    pictures = sorted(work.glob("timeline_*.png"))
    assert len(pictures) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    assert (work / "train" / "training_curves.png").is_file()
