"""Checkpoint conversion: readers, key mapping, and clear errors for checkpoints that do not fit."""

from __future__ import annotations

import io
import pickle
import sys
import zipfile

import jax
import numpy as np
import pytest

from cltdr_jax.checkpoint import load_params, save_params
from cltdr_jax.config import load_config
from cltdr_jax.convert import convert_checkpoint, count_params
from cltdr_jax.errors import CheckpointError
from cltdr_jax.torch_files import read_state_dict


@pytest.fixture(scope="module")
def cfg(thumos_small):
    return load_config(thumos_small / "config.yaml")


def test_parameter_count_matches_reference(cfg, thumos_small):
    params = convert_checkpoint(cfg, thumos_small / "state_dict.npz")
    assert count_params(params) == 610_316  # the fixture README's count of the reference model


@pytest.mark.parametrize("reader", ["ours", "torch"])
def test_torch_archive_equals_npz(shared_dir, reader, monkeypatch):
    """Read by our allow-listed unpickler (torch hidden) and by torch.load(weights_only=True) (the extra)."""
    if reader == "ours":
        monkeypatch.setitem(sys.modules, "torch", None)
    else:
        pytest.importorskip("torch", reason="the torch extra is not installed (CI installs it)")
    fixture = shared_dir / "fixtures" / "thumos_small"
    from_pth = read_state_dict(fixture / "checkpoint.pth.tar", "ema")
    from_npz = read_state_dict(fixture / "state_dict.npz")
    assert from_pth.keys() == from_npz.keys()
    for key in from_npz:
        np.testing.assert_array_equal(from_pth[key], from_npz[key])
    other = read_state_dict(fixture / "checkpoint.pth.tar", "model")
    assert any(not np.array_equal(other[k], from_npz[k]) for k in from_npz)


def test_prefix_is_optional(cfg, thumos_small, tmp_path):
    state = read_state_dict(thumos_small / "state_dict.npz")
    assert not any(k.startswith("module.") for k in state)
    np.savez(tmp_path / "bare.npz", **state)
    a = convert_checkpoint(cfg, thumos_small / "state_dict.npz")
    b = convert_checkpoint(cfg, tmp_path / "bare.npz")
    assert count_params(a) == count_params(b)


def test_mismatched_checkpoint_lists_every_problem(cfg, thumos_small, tmp_path):
    state = dict(np.load(thumos_small / "state_dict.npz"))
    del state["module.neck.fpn_norms.0.weight"]
    state["module.extra.weight"] = np.zeros(3, np.float32)
    state["module.cls_head.cls_head.conv.weight"] = np.zeros((7, 128, 3), np.float32)
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(cfg, tmp_path / "bad.npz")
    msg = str(err.value)
    assert "bad.npz" in msg
    assert "1 missing" in msg and "neck.fpn_norms.0.weight" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "1 mis-shaped" in msg and "cls_head.cls_head.conv.weight" in msg


def test_checkpoint_of_another_config_is_rejected(thumos_small):
    other = load_config(thumos_small / "config.yaml", ["model.head_dim=64", "dataset.num_classes=7"])
    with pytest.raises(CheckpointError, match="mis-shaped"):
        convert_checkpoint(other, thumos_small / "state_dict.npz")


def _evil_checkpoint(path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    pickle.dump({"state_dict": Evil()}, buf)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
    return path


def test_unsafe_pickle_is_refused(tmp_path, without_torch, capsys):
    with pytest.raises(CheckpointError, match="refusing to unpickle builtins.print"):
        read_state_dict(_evil_checkpoint(tmp_path / "evil.pth.tar"))
    assert "pwned" not in capsys.readouterr().out


def test_unsafe_pickle_is_refused_through_torch(tmp_path, capsys):
    pytest.importorskip("torch", reason="the torch extra is not installed (CI installs it)")
    path = _evil_checkpoint(tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match="evil.pth.tar"):  # torch.load(weights_only=True) refuses it
        read_state_dict(path)
    assert "pwned" not in capsys.readouterr().out


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth.tar")
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(CheckpointError, match="corrupt.npz"):
        read_state_dict(bad)


def test_orbax_round_trip_and_config_check(cfg, thumos_small, tmp_path):
    params = convert_checkpoint(cfg, thumos_small / "state_dict.npz")
    save_params(tmp_path / "ckpt", params, {"config": cfg.to_dict()})
    restored, meta = load_params(tmp_path / "ckpt", cfg)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["config"]["model"]["embd_dim"] == 64
    other = load_config(thumos_small / "config.yaml", ["model.head_dim=64"])
    with pytest.raises(CheckpointError, match="does not fit"):
        load_params(tmp_path / "ckpt", other)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_params(tmp_path, cfg)
