"""Training: schedule and optimizer against hand-computed values, the input pipeline's determinism, and the
train loop end to end (sharding, kill-and-resume, NaN stop) on a tiny synthetic dataset."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_OVERRIDES

from cltdr_jax.checkpoint import load_params
from cltdr_jax.config import config_from_dict, load_config
from cltdr_jax.data.datasets import VideoDataset
from cltdr_jax.input_pipeline import TrainBatches
from cltdr_jax.optim import clip_by_global_norm_like_torch, decay_mask, make_optimizer, warmup_cosine


def schedule_cfg(**opt):
    return config_from_dict({"model": {"sgp_mlp_dim": 8}, "opt": opt})


def test_schedule_reference_quirks():
    cfg = schedule_cfg(learning_rate=1.0, eta_min=0.1, warmup_epochs=2, epochs=2)
    lr = warmup_cosine(cfg, steps_per_epoch=3)  # W = 6 warm-up steps, S = 12
    assert float(lr(0)) == 0.0  # the first step uses lr 0
    assert math.isclose(float(lr(1)), 1 / 5, rel_tol=1e-6)
    assert math.isclose(float(lr(5)), 1.0, rel_tol=1e-6)  # eta one step before the warm-up ends
    assert math.isclose(float(lr(6)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(lr(9)), 0.1 + 0.45 * (1 + math.cos(math.pi * 3 / 6)), rel_tol=1e-6)
    assert math.isclose(float(lr(12)), 0.1, rel_tol=1e-6)


def test_decay_groups():
    params = {
        "a": {"kernel": 1, "bias": 1, "scale": 1},
        "gmg": {"w1": 1, "b1": 1, "gamma1": 1, "fc_kernel": 1, "convw_bias": 1},
        "reg": {"scale_0": 1},
    }
    mask = decay_mask(params)
    assert mask == {
        "a": {"kernel": True, "bias": False, "scale": False},
        "gmg": {"w1": True, "b1": False, "gamma1": False, "fc_kernel": True, "convw_bias": False},
        "reg": {"scale_0": False},
    }


def test_clip_matches_torch_formula():
    grads = {"x": jnp.array([3.0, 4.0])}  # norm 5
    clipped, _ = clip_by_global_norm_like_torch(1.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(clipped["x"], np.array([3.0, 4.0]) / (5 + 1e-6), rtol=1e-6)
    unclipped, _ = clip_by_global_norm_like_torch(10.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(unclipped["x"], [3.0, 4.0])


def test_adamw_matches_torch_semantics():
    """Two steps of our optimizer against a float64 re-derivation of torch.optim.AdamW."""
    cfg = schedule_cfg(learning_rate=0.1, weight_decay=0.5, warmup=False, epochs=1000, eta_min=0.1)
    tx, _ = make_optimizer(cfg, steps_per_epoch=1)
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
    grads = [
        {"kernel": jnp.array([0.3, -0.1]), "bias": jnp.array([0.2])},
        {"kernel": jnp.array([-0.2, 0.4]), "bias": jnp.array([0.1])},
    ]
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)

    def torch_adamw(p, gs, wd):
        p, m, v = np.array(p, float), 0.0, 0.0
        for t, g in enumerate(gs, 1):
            g = np.array(g, float)
            p = p - 0.1 * wd * p
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - 0.1 / (1 - 0.9**t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8)
        return p

    np.testing.assert_allclose(params["kernel"], torch_adamw([1.0, -2.0], [g["kernel"] for g in grads], 0.5), rtol=1e-5)
    np.testing.assert_allclose(params["bias"], torch_adamw([0.5], [g["bias"] for g in grads], 0.0), rtol=1e-5)


def tiny_cfg(config_path: Path, *extra: str):
    return load_config(config_path, [*TINY_OVERRIDES, *extra])


def test_batches_are_a_function_of_the_step(tiny_dataset):
    cfg = tiny_cfg(tiny_dataset)
    dataset = VideoDataset(cfg, cfg.train_split, training=True)
    batches = TrainBatches(cfg, dataset, seed=5)
    a, b = batches(3), TrainBatches(cfg, VideoDataset(cfg, cfg.train_split, training=True), seed=5)(3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["feats"].shape == (4, 320, 16) and a["mask"].dtype == bool
    assert not np.array_equal(batches(0)["feats"], batches(batches.steps_per_epoch)["feats"])  # new epoch
    # Two hosts each get half of the same global batch.
    halves = [TrainBatches(cfg, dataset, seed=5, process_index=i, process_count=2)(3) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["feats"] for h in halves]), a["feats"])
    # The grain iterator resumes from its saved state.
    it = batches.iterator(6)
    next(it), next(it)
    state = it.get_state()
    expected = next(it)
    resumed = next(batches.iterator(6, state=state))
    np.testing.assert_array_equal(expected["feats"], resumed["feats"])


def test_worker_processes_give_the_same_batches(tiny_dataset):
    cfg = tiny_cfg(tiny_dataset)
    batches = TrainBatches(cfg, VideoDataset(cfg, cfg.train_split, training=True), seed=5)
    single, workers = batches.iterator(4), batches.iterator(4, workers=2)
    try:
        for _ in range(4):
            a, b = next(single), next(workers)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    finally:
        workers.close()


# ---------------------------------------------------------------------------------------------------
# The train loop, run as users run it: `cltdr train` in a subprocess.


def run_train(
    config: Path,
    workdir: Path,
    *overrides: str,
    devices: int = 1,
    wait: bool = True,
    cache=None,
    env=None,
    args=(),
    check: bool = True,
):
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **(env or {})
    )
    if cache:
        env["CLTDR_XLA_CACHE"] = str(cache)
    args = [sys.executable, "-m", "cltdr_jax.cli", "train", str(config), "--workdir", str(workdir), *args]
    for item in [*TINY_OVERRIDES, "model.extend_point_buffer=true", *overrides]:
        args += ["--set", item]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=900)
    if check:
        assert proc.returncode == 0, out
    return out


def final_params(config: Path, workdir: Path, *overrides: str):
    params, meta = load_params(workdir / "checkpoints", tiny_cfg(config, "model.extend_point_buffer=true", *overrides))
    return jax.tree_util.tree_leaves(params), meta


@pytest.fixture(scope="module")
def baseline_run(tiny_dataset, tmp_path_factory):
    """An uninterrupted 6-step run on one device, checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("train")
    out = run_train(
        tiny_dataset,
        root / "baseline",
        "trainer.checkpoint_every_steps=2",
        "trainer.eval_every_epochs=1",
        cache=root / "cache",
    )
    return root, out


@pytest.mark.slow
def test_train_run_writes_logs_checkpoints_metrics_and_curves(baseline_run):
    root, out = baseline_run
    work = root / "baseline"
    lines = (work / "log.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    assert [s["step"] for s in steps if "final_loss" in s] == [1, 2, 3, 4, 5, 6]
    assert {"cls_loss", "reg_loss", "lr", "grad_norm", "step_time"} <= set(steps[0])
    assert steps[0]["lr"] == 0.0 and steps[1]["lr"] > 0
    assert [s["step"] for s in steps if "average_mAP" in s] == [2, 4, 6]  # every epoch, then the final model
    assert (work / "metrics.json").is_file() and (work / "training_curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]
    assert "step 6/6" in out and "it/s" in out and "ETA" in out


@pytest.mark.slow
def test_killed_run_resumes_exactly(baseline_run, tiny_dataset):
    root, _ = baseline_run
    work = root / "killed"
    proc = run_train(tiny_dataset, work, "trainer.checkpoint_every_steps=2", wait=False, cache=root / "cache")
    deadline = time.time() + 600
    while not (work / "checkpoints" / "2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "checkpoints" / "2").is_dir()
    out = run_train(tiny_dataset, work, "trainer.checkpoint_every_steps=2", cache=root / "cache")
    assert "resuming from the checkpoint at step" in out
    resumed, meta = final_params(tiny_dataset, work)
    expected, _ = final_params(tiny_dataset, root / "baseline")
    assert meta["step"] == 6
    for a, b in zip(resumed, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_four_devices_train_like_one(baseline_run, tiny_dataset):
    """Data parallel over 4 forced CPU devices: same parameters as 1 device, up to float summation order."""
    root, _ = baseline_run
    run_train(tiny_dataset, root / "four", "trainer.checkpoint_every_steps=2", devices=4, cache=root / "cache")
    four, _ = final_params(tiny_dataset, root / "four")  # also: a 4-device checkpoint restores on 1 device
    one, _ = final_params(tiny_dataset, root / "baseline")
    for a, b in zip(four, one, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_trains_on_two_devices_like_one(baseline_run, tiny_dataset):
    """bfloat16 compute sums its kernels' gradients over the sharded batch axis inside its own matmuls
    (layers.matmul_f32, and the per-tap convolutions' own gradient: head_dim 96 puts the heads' second
    layers on that path): data parallel over 2 forced CPU devices gives the parameters of 1 device, up to
    summation order."""
    root, _ = baseline_run
    for devices in (1, 2):
        run_train(
            tiny_dataset,
            root / f"bf16_{devices}",
            "trainer.compute_dtype=bfloat16",
            "model.head_dim=96",
            devices=devices,
        )
    two, _ = final_params(tiny_dataset, root / "bf16_2", "model.head_dim=96")
    one, _ = final_params(tiny_dataset, root / "bf16_1", "model.head_dim=96")
    for a, b in zip(two, one, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-4)


@pytest.mark.slow
def test_rematerialised_training_on_four_devices_trains_like_one_device_without(baseline_run, tiny_dataset):
    """trainer.remat on a batch sharded over 4 forced CPU devices (its recomputation waits on a reduction of a
    sharded cotangent): the parameters of the 1-device run without it, up to summation order."""
    root, _ = baseline_run
    work = root / "remat_four"
    run_train(
        tiny_dataset,
        work,
        "trainer.checkpoint_every_steps=2",
        "trainer.remat=[gmg, heads, fusion]",
        devices=4,
        cache=root / "cache",
    )
    four, _ = final_params(tiny_dataset, work)
    one, _ = final_params(tiny_dataset, root / "baseline")
    for a, b in zip(four, one, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _two_hosts(config: Path, workdir: Path, cache: Path, *overrides, per_process=((), ())):
    """Starts `cltdr train` as process 0 and 1 of a two-host jax.distributed job on this machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        run_train(
            config,
            workdir,
            *overrides,
            *per_process[i],
            wait=False,
            cache=cache,
            env={
                "CLTDR_DISTRIBUTED": "1",
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "CLTDR_NUM_PROCESSES": "2",
                "CLTDR_PROCESS_ID": str(i),
            },
        )  # fmt: skip
        for i in range(2)
    ]


@pytest.mark.slow
def test_two_processes_train_like_one(baseline_run, tiny_dataset):
    """Multi-host data parallelism through jax.distributed, as two processes on this machine; both take part
    in every evaluation (process 0 evaluates, the other waits) and finish together."""
    root, _ = baseline_run
    work = root / "two_hosts"
    procs = _two_hosts(
        tiny_dataset, work, root / "cache", "trainer.checkpoint_every_steps=2", "trainer.eval_every_epochs=1"
    )
    out, _ = procs[1].communicate(timeout=900)  # process 1 ends only once process 0 wrote the final results
    assert procs[1].returncode == 0, out
    assert (work / "metrics.json").is_file() and (work / "training_curves.png").is_file()
    out, _ = procs[0].communicate(timeout=900)
    assert procs[0].returncode == 0, out
    evaluations = [
        r["step"] for r in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if "average_mAP" in r
    ]
    assert evaluations == [2, 4, 6]
    two, _ = final_params(tiny_dataset, work)
    one, _ = final_params(tiny_dataset, root / "baseline")
    for a, b in zip(two, one, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    import cltdr_jax.train as train

    real_batch = TrainBatches.__call__

    def poisoned(self, step):  # corrupt inputs from the 4th step (index 3) on
        batch = real_batch(self, step)
        if step >= 3:
            batch["feats"][:] = np.nan
        return batch

    monkeypatch.setattr(TrainBatches, "__call__", poisoned)
    monkeypatch.setenv("CLTDR_XLA_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(tiny_dataset, "trainer.checkpoint_every_steps=2", "model.extend_point_buffer=true")
    with pytest.raises(train.TrainingError, match="non-finite loss at step 4.*last good checkpoint is step 2"):
        train.train_and_evaluate(cfg, tmp_path / "run")
    restored, meta = load_params(tmp_path / "run" / "checkpoints", cfg)
    assert meta["step"] == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored))


def compiled_step(cfg):
    """`cltdr train`'s pieces on one device for `cfg`: the model, the compiled step, the initial state, the
    run's batches (seed 5) and the batches' sharding."""
    from cltdr_jax.train import compile_train_step, init_state, make_mesh, make_train_step, training_model

    batches = TrainBatches(cfg, VideoDataset(cfg, cfg.train_split, training=True), seed=5)
    model = training_model(cfg)
    tx, schedule = make_optimizer(cfg, batches.steps_per_epoch)
    step, replicated, data = compile_train_step(cfg, make_train_step(cfg, model, tx, schedule), make_mesh())
    return model, step, jax.device_put(init_state(cfg, model, tx, 0), replicated), batches, data


def test_a_non_finite_step_returns_the_state_it_was_given(tiny_dataset):
    """The step skips its update when the loss or the gradient is not finite (the host then stops): every
    array of the state, step counter and random key included, comes back bit for bit; a finite step
    updates them."""
    _, step, state, batches, data = compiled_step(tiny_cfg(tiny_dataset))
    before = jax.device_get(state)  # the step donates its input
    poisoned = batches(0)
    poisoned["feats"][0, 3, 1] = np.inf
    state, metrics = step(state, jax.device_put(poisoned, data))
    assert not np.isfinite(jax.device_get(metrics["final_loss"]))
    after = jax.device_get(state)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after), strict=True):
        np.testing.assert_array_equal(b, a)
    state, metrics = step(state, jax.device_put(batches(0), data))
    assert np.isfinite(jax.device_get(metrics["final_loss"]))
    updated = jax.device_get(state)
    assert int(updated.step) == int(before.step) + 1
    assert not np.array_equal(updated.rng, before.rng)
    # Step 0's learning rate is 0 (the warm-up's first step), so the parameters stay; Adam's moments move.
    moments = zip(
        jax.tree_util.tree_leaves(before.opt_state), jax.tree_util.tree_leaves(updated.opt_state), strict=True
    )
    assert sum(not np.array_equal(a, b) for a, b in moments) > len(jax.tree_util.tree_leaves(before.params))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_state_and_close_losses(tiny_dataset):
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_cfg(tiny_dataset, f"trainer.compute_dtype={dtype}", "model.input_noise=0")
        model, step, state, batches, data = compiled_step(cfg)
        assert model.dtype == (jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        for i in range(2):
            state, metrics = step(state, jax.device_put(batches(i), data))
        results[dtype] = (state, jax.device_get(metrics))
    (_, m32), (state16, m16) = results["float32"], results["bfloat16"]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state16.params))
    assert all(
        x.dtype == jnp.float32
        for x in jax.tree_util.tree_leaves(state16.opt_state)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    )
    assert np.isfinite(m16["final_loss"])
    np.testing.assert_allclose(m16["final_loss"], m32["final_loss"], rtol=0.05)
    assert m16["final_loss"] != m32["final_loss"]  # bfloat16 really computed in bfloat16


@pytest.mark.slow
def test_activitynet_path_end_to_end(tmp_path):
    """Class-agnostic training, box-voting Soft-NMS and external score fusion, on synthetic ActivityNet."""
    from cltdr_jax.synth import synthesize

    config = synthesize("activitynet", tmp_path / "anet", feature_dim=16, num_videos=16, seed=2, max_duration=200)
    run_train(config, tmp_path / "run", "trainer.max_steps=2", "loader.batch_size=2", cache=tmp_path / "cache")
    detections = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert detections["external_data"]["used"] is True
    gt = json.loads((tmp_path / "anet" / "annotations.json").read_text())["database"]
    names = {a["label"] for r in gt.values() for a in r["annotations"]}
    rows = [r for v in detections["results"].values() for r in v]
    assert rows and all(r["label"] in names or r["label"].isdigit() for r in rows)
    assert max(len(v) for v in detections["results"].values()) <= 2 * 200  # top-2 classes x top-200
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["mAP"]) == 10  # ActivityNet thresholds 0.5:0.05:0.95


@pytest.mark.slow
def test_hosts_that_see_different_videos_stop_naming_the_host(tiny_dataset, tmp_path):
    """THUMOS skips videos without a feature file; a host missing one must not train on other data."""
    features = tmp_path / "features_of_host_1"
    shutil.copytree(tiny_dataset.parent / "features", features)
    train_ids = [v for v, e in json.loads((tiny_dataset.parent / "annotations.json").read_text())["database"].items()
                 if e["subset"] == "Validation" and e["annotations"]]  # fmt: skip
    (features / f"{train_ids[0]}.npy").unlink()
    procs = _two_hosts(
        tiny_dataset,
        tmp_path / "run",
        tmp_path / "cache",
        per_process=((), ("dataset.feat_folder=" + str(features),)),
    )
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 2, out
        assert "the processes do not see the same videos" in out
        assert "process 1 sees 7 training" in out and "process 0 sees 8 training" in out, out
        assert "differ on process 1" in out


# ---------------------------------------------------------------------------------------------------
# Train -> predict handoff, unreadable checkpoints


@pytest.mark.slow
def test_load_params_takes_a_workdir_a_checkpoints_folder_or_a_step(baseline_run, tiny_dataset):
    from cltdr_jax.errors import CheckpointError

    root, _ = baseline_run
    work = root / "baseline"
    cfg = tiny_cfg(tiny_dataset, "model.extend_point_buffer=true")
    loaded = [load_params(p, cfg) for p in (work, work / "checkpoints", work / "checkpoints" / "6")]
    for params, meta in loaded:
        assert meta["step"] == 6 and meta["checkpoint"] == str(work / "checkpoints" / "6")
        assert meta["loaded_weights"] == "EMA weights (decay 0.999)"
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded[0][0]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ema4, meta4 = load_params(work, cfg, step=4)
    raw4, raw_meta = load_params(work / "checkpoints", cfg, step=4, weights="raw")
    assert meta4["step"] == raw_meta["step"] == 4 and raw_meta["loaded_weights"].startswith("raw weights")
    leaves = zip(jax.tree_util.tree_leaves(ema4), jax.tree_util.tree_leaves(raw4), strict=True)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)  # EMA != raw
    with pytest.raises(CheckpointError, match="no checkpoint of step 5; steps here: 2, 4, 6"):
        load_params(work, cfg, step=5)
    with pytest.raises(CheckpointError, match="folder of step 6, but step 4"):
        load_params(work / "checkpoints" / "6", cfg, step=4)


@pytest.mark.slow
def test_predict_and_eval_read_a_training_workdir(baseline_run, tiny_dataset, tmp_path):
    """`cltdr train CONFIG --workdir W` then `cltdr predict CONFIG W`: the log names checkpoint and weights."""
    root, _ = baseline_run
    work = root / "baseline"
    env = dict(os.environ, JAX_PLATFORMS="cpu", CLTDR_XLA_CACHE=str(root / "cache"))
    base = [sys.executable, "-m", "cltdr_jax.cli"]
    # The config train wrote into its workdir is the handiest CONFIG (the original file with --set works too).
    cmd = [*base, "predict", str(work / "config.yaml"), str(work), "--out", str(tmp_path / "d.json")]
    out = subprocess.run(
        [*cmd, "--step", "4", "--weights", "raw", "--profile", str(tmp_path / "trace")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"checkpoint {work / 'checkpoints' / '4'} (step 4): raw weights" in out.stderr
    assert json.loads((tmp_path / "d.json").read_text())["results"]
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no profiler trace written"
    out = subprocess.run(
        [*base, "eval", str(work / "config.yaml"), str(work)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert f"checkpoint {work / 'checkpoints' / '6'} (step 6): EMA weights" in out.stderr and "mAP (%)" in out.stdout


def _corrupt(step_dir: Path) -> None:
    """Truncates every data file of a step's params and train_state, as a disk filling up mid-copy would."""
    for item in ("params", "train_state"):
        for f in (step_dir / item).rglob("*"):
            if f.is_file() and f.stat().st_size > 16:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.slow
def test_unreadable_latest_checkpoint_one_line_and_resume_from_the_previous(baseline_run, tiny_dataset, tmp_path):
    from cltdr_jax.errors import CheckpointError

    root, _ = baseline_run
    work = tmp_path / "run"
    shutil.copytree(root / "baseline", work)
    _corrupt(work / "checkpoints" / "6")
    cfg = tiny_cfg(tiny_dataset, "model.extend_point_buffer=true")
    with pytest.raises(CheckpointError) as e:
        load_params(work, cfg)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{work / 'checkpoints' / '6'}: cannot read this checkpoint, corrupt or truncated")
    assert message.endswith("other steps here: 2, 4 (--step N)")

    out = run_train(
        tiny_dataset, work, "trainer.checkpoint_every_steps=2", "trainer.eval_every_epochs=1", cache=root / "cache"
    )
    assert f"checkpoint {work / 'checkpoints' / '6'} is unreadable" in out
    assert "resuming from step 4, the previous readable checkpoint" in out
    assert (work / "unreadable_checkpoints" / "6").is_dir()
    resumed, meta = final_params(tiny_dataset, work)
    expected, _ = final_params(tiny_dataset, root / "baseline")
    assert meta["step"] == 6
    for a, b in zip(resumed, expected, strict=True):  # the resumed run redid steps 5-6 exactly
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [r["step"] for r in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if "final_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------
# Researchers' tools: TensorBoard, profiler traces, several seeds


def _event_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in `directory` (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow
def test_tensorboard_profile_and_several_seeds(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboardX")
    work = tmp_path / "seeds"
    out = run_train(
        tiny_dataset, work, "trainer.max_steps=3", "trainer.tensorboard=true",
        args=["--seeds", "0,1", "--profile", str(tmp_path / "trace")], cache=tmp_path / "cache",
    )  # fmt: skip
    summary = json.loads((work / "seeds_summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["mAP_mean"]) == len(summary["mAP_std"]) == 5
    runs = [json.loads((work / f"seed_{s}" / "metrics.json").read_text()) for s in (0, 1)]
    np.testing.assert_allclose(summary["mAP_mean"], np.mean([r["mAP"] for r in runs], axis=0))
    np.testing.assert_allclose(summary["mAP_std"], np.std([r["mAP"] for r in runs], axis=0, ddof=1))
    assert "mean ± standard deviation" in out and " ± " in out
    assert load_config(work / "seed_1" / "config.yaml").init_rand_seed == 1

    scalars = _event_scalars(work / "seed_0")
    assert [s for s, _ in scalars["train/final_loss"]] == [1, 2, 3]
    logged = [json.loads(line) for line in (work / "seed_0" / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([v for _, v in scalars["train/lr"]], [r["lr"] for r in logged if "lr" in r], rtol=1e-6)
    assert {"train/cls_loss", "train/grad_norm", "train/step_time", "eval/average_mAP", "eval/mAP_0.50"} <= set(scalars)
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no profiler trace of the first seed's steps"


@pytest.mark.parametrize("policy", ["nothing", "dots"])
def test_rematerialisation_keeps_the_gradients(policy):
    """trainer.remat recomputes activations in the backward pass: the same gradients, up to float rounding,
    with stochastic depth active (the recomputation must draw the same random numbers)."""
    from cltdr_jax.train import training_model

    tiny = [o for o in TINY_OVERRIDES if o.split("=")[0].split(".")[0] in ("model", "dataset")]
    x = jax.random.normal(jax.random.key(0), (2, 320, 8))
    mask = jnp.ones((2, 320), bool).at[1, 200:].set(False)
    grads = []
    for remat in ("[]", "[gmg, heads, fusion]"):
        overrides = [*tiny, "dataset.input_dim=8", f"trainer.remat={remat}", f"trainer.remat_policy={policy}"]
        cfg = load_config(Path(__file__).parents[1] / "configs" / "thumos_i3d_focalloss.yaml", overrides)
        assert cfg.train_cfg.droppath > 0
        model = training_model(cfg)
        params = model.init(jax.random.key(1), x, mask)["params"]

        def loss(p, model=model):
            out = model.apply({"params": p}, x, mask, deterministic=False, rngs={"droppath": jax.random.key(2)})
            keys = ("cls_logits", "start_logits", "reg_offsets", "refine_start")
            return sum(jnp.sum(jnp.square(level)) for k in keys for level in out[k])

        grads.append(jax.jit(jax.grad(loss))(params))
    # the same parameter names, so checkpoints move between runs with and without it
    assert jax.tree_util.tree_structure(grads[0]) == jax.tree_util.tree_structure(grads[1])
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-12)
