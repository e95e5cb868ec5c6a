"""Which checkpoint `load_params` reads, and how an unreadable one is reported (converted checkpoints; the
trained ones are covered in test_train.py)."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from cltdr_jax.checkpoint import load_params, resolve_checkpoint, save_params
from cltdr_jax.config import load_config
from cltdr_jax.convert import convert_checkpoint
from cltdr_jax.errors import CheckpointError


@pytest.fixture(scope="module")
def converted(thumos_small, tmp_path_factory):
    cfg = load_config(thumos_small / "config.yaml")
    out = tmp_path_factory.mktemp("ckpt") / "converted"
    params = convert_checkpoint(cfg, thumos_small / "state_dict.npz")
    meta = {"source": "state_dict.npz", "weights": "state_dict_ema", "config": cfg.to_dict()}
    save_params(out, params, meta, step=0)
    save_params(out, params, meta, step=3)
    return cfg, out, params


def test_a_folder_of_steps_or_one_step(converted):
    cfg, out, params = converted
    assert resolve_checkpoint(out) == (out, 3)
    assert resolve_checkpoint(out, 0) == (out, 0)
    assert resolve_checkpoint(out / "0") == (out, 0)
    restored, meta = load_params(out / "0", cfg)
    assert meta["checkpoint"] == str(out / "0")
    assert meta["loaded_weights"] == "state_dict_ema of state_dict.npz"
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="holds only inference weights.*cltdr train"):
        load_params(out, cfg, weights="raw")
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_params(out / "7", cfg)


def test_unreadable_checkpoint_is_one_line_naming_the_step_folder(converted, tmp_path):
    cfg, out, _ = converted
    copy = tmp_path / "ckpt"
    shutil.copytree(out, copy)
    for f in (copy / "3" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 16:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_params(copy, cfg)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{copy / '3'}: cannot read this checkpoint, corrupt or truncated (")
    assert message.endswith("other steps here: 0 (--step N)")
    load_params(copy, cfg, step=0)  # the other step still loads
