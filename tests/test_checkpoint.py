"""Which checkpoint `load_params` reads, and how an unreadable one is reported (converted checkpoints; training
runs are covered in test_train.py); how a training state is written (packed) and read back."""

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


def _small_state():
    """A training state of the real type with a few parameters of each kind of leaf the real one has."""
    import optax

    from cltdr_jax.train import TrainState

    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.standard_normal((3, 4, 5), np.float32)}, "norm": {"scale": np.ones(5, np.float32)}}
    ema = jax.tree_util.tree_map(lambda x: x * np.float32(0.5), params)
    return TrainState(
        step=np.int32(12),
        params=params,
        ema_params=ema,
        opt_state=optax.adamw(1e-3).init(params),
        loss_norm=np.float32(87.5),
        rng=np.array([7, 9], np.uint32),
    )


def _abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device), tree
    )


def _assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_training_state_is_written_packed_and_read_back_exactly(tmp_path):
    """One array per dtype on disk (orbax's cost is per array), every leaf back bit for bit, in its place."""
    import orbax.checkpoint as ocp

    from cltdr_jax.checkpoint import STATE_LAYOUT, manager, restore_training, save_training

    state = _small_state()
    mngr = manager(tmp_path / "ckpt")
    save_training(mngr, state, {"step": 12})
    saved = mngr.item_metadata(12)["train_state"]
    assert sorted(saved) == ["float32", "int32", "uint32"]
    # 65 weights as parameters, EMA and two Adam moments, and the loss normaliser; the step and Adam's count; the key.
    assert [saved[k].shape for k in ("float32", "int32", "uint32")] == [(4 * (3 * 4 * 5 + 5) + 1,), (2,), (2,)]
    restored, meta = restore_training(mngr, 12, _abstract(state), "the test's state")
    assert meta == {"step": 12} and STATE_LAYOUT not in meta
    _assert_same_tree(restored, state)
    params = mngr.restore(12, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    _assert_same_tree(params, state.ema_params)
    mngr.close()


def test_an_asynchronous_save_keeps_its_steps_state_while_training_goes_on(tmp_path):
    """Training saves asynchronously: the save returns before the files are written and the next steps
    overwrite the state's device buffers (donated). Each checkpoint still holds the state of its own step;
    closing the manager waits for the last write; the temporary folder of a killed write is removed."""
    import orbax.checkpoint as ocp

    from cltdr_jax.checkpoint import manager, restore_training, save_training

    state = jax.device_put(_small_state())
    expected = jax.tree_util.tree_map(np.array, jax.device_get(state))  # copies, before anything changes
    overwrite = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x * 0 + 7, s), donate_argnums=0)
    mngr = manager(tmp_path / "ckpt", asynchronous=True)
    save_training(mngr, state, {"step": 12})
    state = jax.block_until_ready(overwrite(state))  # while orbax may still be writing step 12
    save_training(mngr, state.replace(step=np.int32(13)), {"step": 13})
    mngr.close()
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir()) == [12, 13]

    (tmp_path / "ckpt" / f"14{ocp.utils.TMP_DIR_SUFFIX}-1").mkdir()  # what a run killed mid-write leaves
    mngr = manager(tmp_path / "ckpt", asynchronous=True)
    assert mngr.all_steps() == [12, 13]
    save_training(mngr, state.replace(step=np.int32(14)), {"step": 14})  # the resumed run's next save
    mngr.wait_until_finished()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["12", "13", "14"]
    restored, _ = restore_training(mngr, 12, _abstract(expected), "the test's state")
    _assert_same_tree(restored, expected)
    params = mngr.restore(12, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    _assert_same_tree(params, expected.ema_params)
    later, _ = restore_training(mngr, 13, _abstract(expected), "the test's state")
    assert np.all(np.asarray(later.params["conv"]["kernel"]) == 7)
    mngr.close()


def test_a_training_state_that_does_not_fit_names_the_leaf(tmp_path):
    from cltdr_jax.checkpoint import manager, restore_training, save_training

    state = _small_state()
    mngr = manager(tmp_path / "ckpt")
    save_training(mngr, state, {"step": 12})
    other = state.replace(params={**state.params, "norm": {"scale": np.ones(6, np.float32)}})
    with pytest.raises(CheckpointError) as e:
        restore_training(mngr, 12, _abstract(other), "this run's model")
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'ckpt' / '12'}: the checkpoint does not fit this run's model")
    assert ".params['norm']['scale']: checkpoint (5,), config needs (6,)" in message
    mngr.close()


def test_packed_arrays_that_do_not_match_their_layout_are_refused():
    from cltdr_jax.checkpoint import pack_state, unpack_state

    packed, layout = pack_state(_small_state())
    leaves = unpack_state(packed, layout, prefix=".params")
    assert sorted(leaves) == ["['conv']['kernel']", "['norm']['scale']"]
    np.testing.assert_array_equal(leaves["['conv']['kernel']"], _small_state().params["conv"]["kernel"])
    with pytest.raises(ValueError, match="do not match their layout"):
        unpack_state({**packed, "float32": packed["float32"][:-1]}, layout)


def test_training_state_written_before_packing_still_resumes(tmp_path):
    """A checkpoint of an earlier version (the state as a tree of arrays) is read as it was written."""
    import orbax.checkpoint as ocp

    from cltdr_jax.checkpoint import manager, restore_training

    state = _small_state()
    mngr = manager(tmp_path / "ckpt")
    items = {"params": ocp.args.StandardSave(state.ema_params), "train_state": ocp.args.StandardSave(state)}
    mngr.save(12, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave({"step": 12})), force=True)
    mngr.wait_until_finished()
    restored, meta = restore_training(mngr, 12, _abstract(state), "the test's state")
    assert meta == {"step": 12}
    _assert_same_tree(restored, state)
    mngr.close()


def test_resuming_with_another_model_stops_and_moves_nothing(tmp_path):
    from cltdr_jax.checkpoint import manager, save_training
    from cltdr_jax.train import restore_latest_readable

    state = _small_state()
    mngr = manager(tmp_path / "checkpoints")
    save_training(mngr, state, {"step": 12})
    mngr.close()
    other = state.replace(params={**state.params, "conv": {"kernel": np.zeros((3, 4, 6), np.float32)}})
    with pytest.raises(CheckpointError, match=r"(?s)does not fit this run's model.*\['conv'\]\['kernel'\]"):
        restore_latest_readable(tmp_path, _abstract(other), keep=3, primary=True)
    assert (tmp_path / "checkpoints" / "12").is_dir() and not (tmp_path / "unreadable_checkpoints").exists()
    _, (restored, _) = restore_latest_readable(tmp_path, _abstract(state), keep=3, primary=True)
    _assert_same_tree(restored, state)
