"""Training: `train_and_evaluate(cfg, workdir)`, read top to bottom.

    cltdr train configs/thumos_i3d.yaml --workdir runs/thumos

The same code runs on one CPU, several GPUs or several hosts: the batch is split over a 1-D device mesh
("data"), the train state is replicated, and `train_step` is one `jax.jit` with donated state. Every
`checkpoint_every_steps` (default: each epoch) an orbax checkpoint is written atomically; restarting
`cltdr train` on the same workdir resumes from the latest one and continues exactly as if never stopped.
A non-finite loss stops the run with a message; the state of that step is never kept, so the last
checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cltdr_jax import checkpoint as ckpt
from cltdr_jax.assignment import assign_targets_batch
from cltdr_jax.config import Config
from cltdr_jax.data.datasets import VideoDataset
from cltdr_jax.points import make_points
from cltdr_jax.errors import CltdrError
from cltdr_jax.input_pipeline import TrainBatches
from cltdr_jax.losses import detection_losses
from cltdr_jax.model.detector import CLTDRGMG
from cltdr_jax.optim import ema_update, make_optimizer
from cltdr_jax.xla_cache import enable_persistent_cache

log = logging.getLogger(__name__)


class TrainingError(CltdrError):
    """Training cannot go on (non-finite loss, inconsistent resume)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken
    params: Any
    ema_params: Any
    opt_state: Any
    loss_norm: jax.Array  # the reference's EMA loss normaliser, carried instead of hidden in the model
    rng: jax.Array  # uint32[2] key data


# ---------------------------------------------------------------------------------------------------
# Mesh


def maybe_initialize_distributed() -> None:
    """Multi-host training: with CLTDR_DISTRIBUTED=1 on every host, calls jax.distributed.initialize().

    Under SLURM, Open MPI or on Cloud TPU JAX finds the coordinator, process count and id itself; elsewhere
    set JAX_COORDINATOR_ADDRESS=host0:port, CLTDR_NUM_PROCESSES=N and CLTDR_PROCESS_ID=i (0 .. N-1).
    """
    if os.environ.get("CLTDR_DISTRIBUTED") != "1" or jax.distributed.is_initialized():
        return
    kwargs = {}
    if "CLTDR_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["CLTDR_NUM_PROCESSES"])
    if "CLTDR_PROCESS_ID" in os.environ:
        kwargs["process_id"] = int(os.environ["CLTDR_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


def make_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",))


# ---------------------------------------------------------------------------------------------------
# Model, optimizer and the update step


def init_state(cfg: Config, model: CLTDRGMG, tx: optax.GradientTransformation, seed: int) -> TrainState:
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    t = cfg.dataset.max_seq_len
    feats = jnp.zeros((1, t, cfg.dataset.input_dim), jnp.float32)
    mask = jnp.ones((1, t), bool)
    params = model.init(init_key, feats, mask)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        # The reference deep-copies the model before training: the EMA starts at the initial weights.
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=tx.init(params),
        loss_norm=jnp.asarray(cfg.train_cfg.init_loss_norm, jnp.float32),
        rng=state_key,
    )


def create_state(cfg: Config, model: CLTDRGMG, tx: optax.GradientTransformation, seed: int, sharding) -> TrainState:
    """`init_state` as one compiled program placed straight onto the mesh (eager init runs hundreds of small
    ops and leaves their memory behind)."""
    return jax.jit(lambda: init_state(cfg, model, tx, seed), out_shardings=sharding)()


def make_train_step(cfg: Config, model: CLTDRGMG, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """train_step(state, batch) -> (state, metrics): forward, reference losses, AdamW, EMA."""
    points = np.concatenate(make_points(cfg.dataset.max_seq_len, cfg.strides, cfg.model.regression_range))
    compute_dtype = jnp.bfloat16 if cfg.trainer.compute_dtype == "bfloat16" else jnp.float32
    noise_std = cfg.model.input_noise

    def cast(tree: Any, dtype: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, noise_key, drop_key = jax.random.split(state.rng, 3)
        feats = batch["feats"]
        if noise_std > 0:  # on every element, padding included, as the reference
            feats = feats + noise_std * jax.random.normal(noise_key, feats.shape, feats.dtype)
        cls_targets, reg_targets = assign_targets_batch(
            points,
            batch["segments"],
            batch["labels"],
            batch["segment_mask"],
            cfg.dataset.num_classes,
            cfg.train_cfg.center_sample_radius,
        )

        def loss_fn(params):
            outputs = model.apply(
                {"params": cast(params, compute_dtype)},
                feats.astype(compute_dtype),
                batch["mask"],
                deterministic=False,
                rngs={"droppath": drop_key},
            )
            outputs = cast(outputs, jnp.float32)
            losses, loss_norm = detection_losses(
                outputs, cls_targets, reg_targets, outputs["masks"], state.loss_norm, cfg.train_cfg, cfg.model
            )
            return losses["final_loss"], (losses, loss_norm)

        (loss, (losses, loss_norm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, cfg.trainer.ema_decay),
            opt_state=opt_state,
            loss_norm=loss_norm,
            rng=rng,
        )
        # A non-finite step keeps the old state: the host sees the NaN in the metrics and stops.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        metrics = {**losses, "grad_norm": grad_norm, "lr": schedule(state.step)}
        return new_state, metrics

    return train_step


def compile_train_step(cfg: Config, train_step, mesh: jax.sharding.Mesh):
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    return (
        jax.jit(
            train_step,
            in_shardings=(replicated, data),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        ),
        replicated,
        data,
    )


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles the host-local batches of all processes into global arrays split over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    step = int(state.step)
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.ema_params),
            train_state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    mngr.wait_until_finished()


def restore_checkpoint(mngr: ocp.CheckpointManager, abstract: TrainState, step: int) -> tuple[TrainState, dict]:
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(train_state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
    )
    return restored["train_state"], dict(restored["meta"])


# ---------------------------------------------------------------------------------------------------
# Progress and logs


class Progress:
    """One status line: epoch, step, losses, it/s and ETA (a fresh line every `every` steps off a terminal)."""

    def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int, every: int):
        self.total, self.per_epoch, self.every = total_steps, steps_per_epoch, max(every, 1)
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every and step != self.total and not self.tty:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        line = (
            f"epoch {(step - 1) // self.per_epoch + 1}/{-(-self.total // self.per_epoch)} "
            f"step {step}/{self.total} loss {metrics['final_loss']:.4f} (cls {metrics['cls_loss']:.4f} "
            f"reg {metrics['reg_loss']:.4f}) lr {metrics['lr']:.2e} {rate:.2f} it/s "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if np.isfinite(eta) else '--'}"
        )
        if self.tty:
            print("\r" + line, end="" if step != self.total else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _truncate_log(path: Path, last_step: int) -> None:
    """Drops log lines of steps after the resumed checkpoint (they will be run again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------------
# The loop


def evaluate_ema(cfg: Config, params: Any):
    """(metrics, prediction) of the EMA weights on the config's evaluation split."""
    from cltdr_jax.predict import evaluate_prediction, predict_split

    prediction = predict_split(cfg, jax.device_get(params))
    return evaluate_prediction(cfg, prediction), prediction


def train_and_evaluate(cfg: Config, workdir: str | Path) -> dict[str, Any]:
    """Trains `cfg` in `workdir` (resuming from its latest checkpoint) and evaluates the EMA model.

    Returns a summary with the final metrics (the last epoch's model, never a selection on the test split).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enable_persistent_cache()
    maybe_initialize_distributed()
    mesh = make_mesh()
    primary = jax.process_index() == 0

    dataset = VideoDataset(cfg, cfg.train_split, training=True)
    # As train.py: classes absent from the training labels get a near -13.8 classifier bias at init.
    cfg = dataclasses.replace(
        cfg, train_cfg=dataclasses.replace(cfg.train_cfg, head_empty_cls=tuple(dataset.empty_label_ids))
    )
    if cfg.loader.batch_size % jax.device_count():
        raise TrainingError(
            f"loader.batch_size {cfg.loader.batch_size} must be divisible by the {jax.device_count()} devices"
        )
    batches = TrainBatches(cfg, dataset, cfg.init_rand_seed, jax.process_index(), jax.process_count())
    epochs = cfg.opt.warmup_epochs + cfg.opt.epochs if cfg.opt.warmup else cfg.opt.epochs
    total_steps = epochs * batches.steps_per_epoch
    if cfg.trainer.max_steps > 0:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    ckpt_every = cfg.trainer.checkpoint_every_steps or batches.steps_per_epoch

    model = CLTDRGMG(cfg.model, cfg.train_cfg)
    tx, schedule = make_optimizer(cfg, batches.steps_per_epoch)
    step_fn, replicated, data_sharding = compile_train_step(cfg, make_train_step(cfg, model, tx, schedule), mesh)

    mngr = ckpt.manager(workdir / "checkpoints", max_to_keep=cfg.trainer.keep_checkpoints)
    abstract = jax.eval_shape(lambda: init_state(cfg, model, tx, cfg.init_rand_seed))
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    latest = mngr.latest_step()
    log_path = workdir / "log.jsonl"
    if latest is not None:
        state, meta = restore_checkpoint(mngr, abstract, latest)
        data_state = meta["data_iterator"]
        log.info("resuming from the checkpoint at step %d in %s", latest, workdir / "checkpoints")
        changed = _changed_keys(meta.get("config", {}), cfg.to_dict())
        if changed:
            log.warning("the config differs from the one this run started with: %s", ", ".join(changed))
        if primary:
            _truncate_log(log_path, latest)
    else:
        state = create_state(cfg, model, tx, cfg.init_rand_seed, replicated)
        data_state = None
        if primary:
            (workdir / "config.yaml").write_text(cfg.to_yaml())
            log_path.unlink(missing_ok=True)
    start_step = int(state.step)
    log.info(
        "%d training videos, %d steps per epoch, %d steps in total, %d device(s), %s compute",
        len(dataset),
        batches.steps_per_epoch,
        total_steps,
        jax.device_count(),
        cfg.trainer.compute_dtype,
    )

    def meta(step: int, data_iterator: dict) -> dict[str, Any]:
        return {
            "step": step,
            "epoch": step / batches.steps_per_epoch,
            "data_iterator": data_iterator,
            "config": cfg.to_dict(),
        }

    iterator = batches.iterator(total_steps, cfg.trainer.grain_workers, data_state)
    progress = Progress(total_steps, batches.steps_per_epoch, start_step, cfg.trainer.log_every_steps)
    eval_every = cfg.trainer.eval_every_epochs * batches.steps_per_epoch
    history = []
    with open(log_path, "a") if primary else open(os.devnull, "w") as log_file, _closing(iterator):
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            state, metrics = step_fn(state, global_batch(next(iterator), data_sharding))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics["final_loss"]) or not np.isfinite(metrics["grad_norm"]):
                last = mngr.latest_step()
                raise TrainingError(
                    f"non-finite loss at step {step} (epoch {(step - 1) // batches.steps_per_epoch + 1}): "
                    f"final_loss={metrics['final_loss']}, grad_norm={metrics['grad_norm']}. Stopped without "
                    f"saving this step; the last good checkpoint is step {last} in {workdir / 'checkpoints'}"
                )
            record = {
                "step": step,
                "epoch": (step - 1) // batches.steps_per_epoch + 1,
                **metrics,
                "step_time": time.perf_counter() - t0,
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            progress.update(step, metrics)
            if step % ckpt_every == 0 or step == total_steps:
                save_checkpoint(mngr, state, meta(step, iterator.get_state()))
            if eval_every and step % eval_every == 0 and step != total_steps:
                result = _evaluate_and_log(cfg, state, step, batches.steps_per_epoch, log_file)
                if result:
                    result.pop("detections")
                history.append(result)
        final = _evaluate_and_log(cfg, state, total_steps, batches.steps_per_epoch, log_file) if primary else None
    mngr.close()
    detections = final.pop("detections") if final else None
    summary = {
        "workdir": str(workdir),
        "steps": total_steps,
        "final_metrics": final,
        "evaluations": history,
        "final_detections": detections,
    }
    if primary:
        if final is not None:
            (workdir / "metrics.json").write_text(json.dumps(final, indent=1))
            (workdir / "detections.json").write_text(json.dumps(detections))
        _plot_curves(log_path, workdir / "training_curves.png")
    return summary


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


@contextlib.contextmanager
def _closing(iterator):
    """Stops grain's worker processes however the loop ends."""
    try:
        yield iterator
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


def _evaluate_and_log(cfg: Config, state: TrainState, step: int, steps_per_epoch: int, log_file) -> dict | None:
    from cltdr_jax.evaluation import format_table

    try:
        metrics, prediction = evaluate_ema(cfg, state.ema_params)
    except CltdrError as e:  # no evaluation data: training results are still saved
        log.warning("evaluation skipped: %s", e)
        return None
    metrics = {**metrics, "detections": prediction.results_json}
    log.info(
        "step %d (epoch %.1f), EMA model on %s:\n%s",
        step,
        step / steps_per_epoch,
        cfg.val_split[0],
        format_table(metrics),
    )
    record = {"step": step, "epoch": step / steps_per_epoch, "average_mAP": metrics["average_mAP"]}
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    return metrics


def _plot_curves(log_path: Path, out: Path) -> None:
    try:
        from cltdr_jax.plots import plot_training_curves

        plot_training_curves(log_path, out)
        log.info("training curves: %s", out)
    except ImportError as e:
        log.warning("no training-curve plot (%s)", e)
    except Exception as e:  # a plot must never lose a finished training run
        log.warning("training-curve plot failed: %s", e)
