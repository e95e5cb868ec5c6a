"""The command line as users call it: convert, predict (output format, compilations), eval, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cltdr_jax.cli import main


@pytest.fixture(scope="module")
def converted(thumos_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "thumos_small"
    assert main(["convert", str(thumos_small / "config.yaml"), str(thumos_small / "state_dict.npz"), str(out)]) == 0
    return out


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_reproduces_reference_map(thumos_small, converted, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(thumos_small)  # the config's paths are relative to the working directory
    monkeypatch.setenv("CLTDR_XLA_CACHE", str(tmp_path / "cache"))
    code, out, _ = run(
        [
            "eval",
            "config.yaml",
            converted,
            "--protocol",
            "reference",
            "--out",
            tmp_path / "det.json",
            "--metrics-out",
            tmp_path / "metrics.json",
            "--plots",
            tmp_path / "plots",
        ],
        capsys,
    )
    assert code == 0
    assert "mAP (%)" in out
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == ["map_vs_tiou.png", "per_class_ap.png"]
    ours = json.loads((tmp_path / "metrics.json").read_text())
    ref = json.loads((thumos_small / "reference_map.json").read_text())
    np.testing.assert_allclose(ours["mAP"], ref["mAP"], rtol=0, atol=1e-9)
    assert abs(ours["average_mAP"] - ref["average_mAP"]) < 1e-9

    # The detections file: ActivityNet results format, sorted by score, same counts as the reference.
    dets = json.loads((tmp_path / "det.json").read_text())
    assert set(dets) == {"version", "external_data", "results"}
    reference = json.loads((thumos_small / "reference_detections.json").read_text())["results"]
    for vid, rows in dets["results"].items():
        assert len(rows) == len(reference[vid])
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True)
        assert set(rows[0]) == {"segment", "label", "label_id", "score"}
        assert isinstance(rows[0]["label"], str)


def test_second_predict_run_compiles_nothing(thumos_small, converted, tmp_path):
    files = [thumos_small / "features" / f"{v}.npy" for v in ("video_test_0001007", "video_test_0001155")]
    env = dict(os.environ, CLTDR_XLA_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")

    def predict():
        cmd = [
            sys.executable,
            "-m",
            "cltdr_jax.cli",
            "predict",
            str(thumos_small / "config.yaml"),
            str(converted),
            "--out",
            str(tmp_path / "d.json"),
            "--fps",
            "30",
            "--features",
            *map(str, files),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return int(re.search(r"(\d+) compilations for 2 padded lengths", proc.stdout).group(1))

    assert predict() == 2  # 40 and 300 steps pad to 256 and 320
    assert predict() == 0  # everything comes from the persistent compilation cache


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong_width", r"video_test_x\.npy.*(width|31)"),
        ("missing", r"video_test_x\.npy.*(not found|missing|does not exist)"),
        ("corrupt", r"video_test_x\.npy"),
        ("nan", r"video_test_x\.npy.*(NaN|Inf|finite)"),
        ("empty", r"video_test_x\.npy.*no time steps"),
    ],
)
def test_bad_feature_files_get_clear_errors(thumos_small, converted, tmp_path, capsys, case, expected):
    path = tmp_path / "video_test_x.npy"
    if case == "wrong_width":
        np.save(path, np.zeros((50, 31), np.float32))
    elif case == "corrupt":
        path.write_bytes(b"\x93NUMPY garbage")
    elif case == "nan":
        x = np.zeros((50, 32), np.float32)
        x[7, 3] = np.nan
        np.save(path, x)
    elif case == "empty":
        np.save(path, np.zeros((0, 32), np.float32))
    code, _, err = run(
        [
            "predict",
            thumos_small / "config.yaml",
            converted,
            "--out",
            tmp_path / "o.json",
            "--fps",
            "30",
            "--features",
            path,
        ],
        capsys,
    )
    assert code == 2
    assert re.search(expected, err, re.IGNORECASE | re.DOTALL), err
    assert "Traceback" not in err


def test_checkpoint_of_another_config_is_a_clear_error(thumos_small, converted, tmp_path, capsys):
    code, _, err = run(
        [
            "predict",
            thumos_small / "config.yaml",
            converted,
            "--set",
            "model.head_dim=32",
            "--out",
            tmp_path / "o.json",
            "--fps",
            "30",
            "--features",
            thumos_small / "features" / "video_test_0001007.npy",
        ],
        capsys,
    )
    assert code == 2
    assert "does not fit" in err and "config" in err


def test_convert_rejects_a_checkpoint_of_another_config(thumos_small, tmp_path, capsys):
    code, _, err = run(
        [
            "convert",
            thumos_small / "config.yaml",
            thumos_small / "state_dict.npz",
            tmp_path / "c",
            "--set",
            "model.sgp_mlp_dim=64",
        ],
        capsys,
    )
    assert code == 2
    assert "mis-shaped" in err and "mlp.0.weight" in err


def test_unknown_config_key_is_a_clear_error(thumos_small, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((thumos_small / "config.yaml").read_text().replace("num_bins: 16", "num_binz: 16"))
    code, _, err = run(["convert", bad, thumos_small / "state_dict.npz", tmp_path / "c"], capsys)
    assert code == 2
    assert "bad.yaml" in err and "num_binz" in err
