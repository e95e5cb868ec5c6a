"""Training: `train_and_evaluate(cfg, workdir)`, read top to bottom.

    cltdr train thumos_i3d_focalloss --workdir runs/thumos

The same code runs on one CPU, several GPUs or several hosts: the batch is split over a 1-D device mesh
("data"), the train state is replicated, and `train_step` is one `jax.jit` with donated state. Every
`checkpoint_every_steps` (default: each epoch) an orbax checkpoint is written atomically; restarting
`cltdr train` on the same workdir resumes from the latest one and continues exactly as if never stopped.
A non-finite loss stops the run with a message; the state of that step is never kept, so the last
checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shutil
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
from cltdr_jax import threefry
from cltdr_jax.assignment import assign_targets_batch
from cltdr_jax.config import Config
from cltdr_jax.data.datasets import VideoDataset
from cltdr_jax.errors import CheckpointError, CltdrError
from cltdr_jax.inference import Predictor
from cltdr_jax.input_pipeline import TrainBatches
from cltdr_jax.losses import detection_losses
from cltdr_jax.model.detector import CLTDRGMG
from cltdr_jax.optim import ema_update, make_optimizer
from cltdr_jax.points import make_points
from cltdr_jax.xla_cache import enable_persistent_cache
from cltdr_jax.xla_options import compiler_options

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


def training_model(cfg: Config) -> CLTDRGMG:
    """The detector as training computes it: `trainer.compute_dtype` and `trainer.precision`."""
    dtype = jnp.bfloat16 if cfg.trainer.compute_dtype == "bfloat16" else jnp.float32
    t = cfg.trainer
    return CLTDRGMG(
        cfg.model, cfg.train_cfg, dtype=dtype, precision=t.precision, remat=t.remat, remat_policy=t.remat_policy
    )


def create_state(cfg: Config, model: CLTDRGMG, tx: optax.GradientTransformation, seed: int, sharding) -> TrainState:
    """`init_state` as one compiled program placed straight onto the mesh (eager init runs hundreds of small
    ops and leaves their memory behind)."""
    return jax.jit(lambda: init_state(cfg, model, tx, seed), out_shardings=sharding)()


def make_train_step(cfg: Config, model: CLTDRGMG, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """train_step(state, batch) -> (state, metrics): forward, reference losses, AdamW, EMA."""
    points = np.concatenate(make_points(cfg.dataset.max_seq_len, cfg.strides, cfg.model.regression_range))
    noise_std = cfg.model.input_noise

    def cast(tree: Any, dtype: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        # The named scopes label XLA's profile (scripts/xla_profile.py) by part of the step.
        rng, noise_key, drop_key = jax.random.split(state.rng, 3)
        feats = batch["feats"]
        if noise_std > 0:  # on every element, padding included, as the reference
            # jax.random.normal's numbers, drawn in one fused pass on the CPU (threefry.py)
            feats = feats + noise_std * threefry.normal(noise_key, feats.shape, feats.dtype)
        with jax.named_scope("assign_targets"):
            cls_targets, reg_targets = assign_targets_batch(
                points,
                batch["segments"],
                batch["labels"],
                batch["segment_mask"],
                cfg.dataset.num_classes,
                cfg.train_cfg.center_sample_radius,
            )

        def loss_fn(params):
            # The model computes in its own dtype (trainer.compute_dtype): the float32 parameters are cast
            # inside each layer, so their gradients arrive in float32.
            outputs = model.apply(
                {"params": params},
                feats,
                batch["mask"],
                deterministic=False,
                rngs={"droppath": drop_key},
            )
            outputs = cast(outputs, jnp.float32)
            with jax.named_scope("losses"):
                losses, loss_norm = detection_losses(
                    outputs, cls_targets, reg_targets, outputs["masks"], state.loss_norm, cfg.train_cfg, cfg.model
                )
            return losses["final_loss"], (losses, loss_norm)

        (loss, (losses, loss_norm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)

        def updated() -> TrainState:
            with jax.named_scope("optimizer"):
                updates, opt_state = tx.update(grads, state.opt_state, state.params)
                params = optax.apply_updates(state.params, updates)
            with jax.named_scope("ema"):
                ema_params = ema_update(state.ema_params, params, cfg.trainer.ema_decay)
            return TrainState(
                step=state.step + 1,
                params=params,
                ema_params=ema_params,
                opt_state=opt_state,
                loss_norm=loss_norm,
                rng=rng,
            )

        # A non-finite step keeps the old state: the host sees the NaN in the metrics and stops. A branch,
        # not a select per array: selecting re-reads and rewrites the whole state (~75 ms at the THUMOS
        # size on 2 CPU cores, measured alone); the branch costs nothing when the step is finite.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.lax.cond(ok, updated, lambda: state)
        metrics = {**losses, "grad_norm": grad_norm, "lr": schedule(state.step)}
        return new_state, metrics

    return train_step


def return_freed_memory() -> None:
    """Gives the memory the compiler has freed back to the system (glibc keeps it otherwise).

    Compiling the THUMOS step peaks at ~2.2 GB and leaves ~1 GB freed but held; the step's own working
    memory then comes on top of it. Returning it first lowers training's peak RSS by that much.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def compile_train_step(cfg: Config, train_step, mesh: jax.sharding.Mesh):
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    return (
        jax.jit(
            train_step,
            in_shardings=(replicated, data),
            out_shardings=(replicated, replicated),
            # The state is donated (updated in place). The batch is not: no output has its shapes, so XLA could
            # not reuse its buffers (JAX warns and ignores such a donation); it is freed when the next arrives.
            donate_argnums=0,
            compiler_options=compiler_options(compute_dtype=cfg.trainer.compute_dtype),
        ),
        replicated,
        data,
    )


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles the host-local batches of all processes into global arrays split over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


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


def evaluate_ema(cfg: Config, params: Any, predictor: Predictor | None = None):
    """(metrics, prediction) of the EMA weights on the config's evaluation split; `predictor` keeps its
    compiled programs from one evaluation to the next (its parameters are replaced)."""
    from cltdr_jax.predict import evaluate_prediction, predict_split

    prediction = predict_split(cfg, params, predictor=predictor)
    return evaluate_prediction(cfg, prediction), prediction


PROFILE_STEPS = 3  # steps traced by --profile, after the first (which compiles)


def train_and_evaluate(cfg: Config, workdir: str | Path, profile_dir: str | Path | None = None) -> dict[str, Any]:
    """Trains `cfg` in `workdir` (resuming from its latest readable checkpoint) and evaluates the EMA model.

    Returns a summary with the final metrics (the last epoch's model, never a selection on the test split).
    profile_dir: write a JAX profiler trace of PROFILE_STEPS steps there.
    """
    workdir = Path(workdir)
    if cfg.trainer.tensorboard:  # fail now, not after the training
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise TrainingError(
                "trainer.tensorboard: true needs tensorboardX: pip install 'cltdr-jax[tensorboard]'"
            ) from None
    if cfg.trainer.grain_workers is not None:
        log.warning(
            "trainer.grain_workers is the old name of loader.num_workers (which now sets the data workers); "
            "using trainer.grain_workers=%d",
            cfg.trainer.grain_workers,
        )
    workdir.mkdir(parents=True, exist_ok=True)
    enable_persistent_cache()
    maybe_initialize_distributed()
    mesh = make_mesh()
    primary = jax.process_index() == 0

    dataset = VideoDataset(cfg, cfg.train_split, training=True)
    check_same_videos(cfg, [r.video_id for r in dataset.records])
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

    model = training_model(cfg)
    tx, schedule = make_optimizer(cfg, batches.steps_per_epoch)
    step_fn, replicated, data_sharding = compile_train_step(cfg, make_train_step(cfg, model, tx, schedule), mesh)

    abstract = jax.eval_shape(lambda: init_state(cfg, model, tx, cfg.init_rand_seed))
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    mngr, restored = restore_latest_readable(workdir, abstract, cfg.trainer.keep_checkpoints, primary)
    log_path = workdir / "log.jsonl"
    if restored is not None:
        state, meta = restored
        data_state = meta["data_iterator"]
        latest = int(state.step)
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

    iterator = batches.iterator(total_steps, cfg.data_workers, data_state)
    progress = Progress(total_steps, batches.steps_per_epoch, start_step, cfg.trainer.log_every_steps)
    eval_every = cfg.trainer.eval_every_epochs * batches.steps_per_epoch
    trace = StepTrace(profile_dir, start_step + 2, min(start_step + 1 + PROFILE_STEPS, total_steps))
    history = []
    scalars = ScalarLog(workdir, primary, cfg.trainer.tensorboard, purge_step=start_step + 1)
    predictor = Predictor(cfg, None)  # one for every evaluation: each padded length compiles once per run

    def finish(step: int, device_metrics: dict[str, jax.Array], step_time: float) -> None:
        """Reads a dispatched step's metrics back, logs them, and stops on a non-finite loss."""
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        trace.after(step)
        if not np.isfinite(metrics["final_loss"]) or not np.isfinite(metrics["grad_norm"]):
            mngr.wait_until_finished()  # the checkpoint being written is good: let it finish first
            last = mngr.latest_step()
            raise TrainingError(
                f"non-finite loss at step {step} (epoch {(step - 1) // batches.steps_per_epoch + 1}): "
                f"final_loss={metrics['final_loss']}, grad_norm={metrics['grad_norm']}. Stopped without "
                f"saving this step; the last good checkpoint is step {last} in {workdir / 'checkpoints'}"
            )
        record = {"step": step, "epoch": (step - 1) // batches.steps_per_epoch + 1, **metrics, "step_time": step_time}
        scalars.write(record)
        progress.update(step, metrics)

    # The host never waits for the step it just dispatched: it assembles the next batch (on the device before
    # the current step ends) and reads the metrics of the step before, which is done by then. A step's
    # metrics are read at once only where a checkpoint or an evaluation needs the step known to be finite.
    # However the loop ends (a non-finite loss, an interrupt), the checkpoint being written is finished.
    with scalars, _closing(iterator), trace, _closing(mngr):
        pending = None  # (step, metrics on the device, dispatch time) of the last step not yet read back
        batch = global_batch(next(iterator), data_sharding) if start_step < total_steps else None
        if batch is not None:
            step_fn = step_fn.lower(state, batch).compile()  # the shapes never change: compile once, here
            return_freed_memory()
        for step in range(start_step + 1, total_steps + 1):
            trace.before(step)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            saving = step % ckpt_every == 0 or step == total_steps
            evaluating = bool(eval_every and step % eval_every == 0 and step != total_steps)
            data_state = iterator.get_state() if saving else None  # batches consumed up to this step
            batch = global_batch(next(iterator), data_sharding) if step < total_steps else None
            if pending is not None:
                finish(pending[0], pending[1], t0 - pending[2])
            pending = (step, metrics, t0)
            if saving or evaluating:
                jax.block_until_ready(metrics)
                finish(step, metrics, time.perf_counter() - t0)
                pending = None
            if saving:
                ckpt.save_training(mngr, state, meta(step, data_state))
            if evaluating:
                # Process 0 evaluates; the others wait for it, so every process leaves each evaluation together.
                result = (
                    _evaluate_and_log(cfg, state, step, batches.steps_per_epoch, scalars, predictor)
                    if primary
                    else None
                )
                barrier(f"evaluation at step {step}")
                if result:
                    result.pop("detections")
                history.append(result)
        final = (
            _evaluate_and_log(cfg, state, total_steps, batches.steps_per_epoch, scalars, predictor) if primary else None
        )
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
    barrier("end of training")  # no process exits while process 0 still evaluates and writes
    return summary


# ---------------------------------------------------------------------------------------------------
# Several hosts: the same videos everywhere, evaluations in step


def barrier(name: str) -> None:
    """Waits until every process arrives here (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _ids_digest(ids: list[str] | None) -> np.ndarray:
    text = "\n".join(sorted(ids)) if ids is not None else "<no evaluation data>"
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)


def check_same_videos(cfg: Config, train_ids: list[str]) -> None:
    """Stops when the processes do not all see the same training and evaluation videos.

    The THUMOS-family loaders skip videos whose feature file is missing, so hosts with different copies of the
    features would silently train on different data and disagree on the mAP.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    try:
        eval_ids = [r.video_id for r in VideoDataset(cfg, (cfg.val_split[0],), training=False).records]
    except CltdrError:
        eval_ids = None
    local = np.concatenate([_ids_digest(train_ids), _ids_digest(eval_ids)])
    counts = np.array([len(train_ids), -1 if eval_ids is None else len(eval_ids)], np.int32)
    digests = np.asarray(multihost_utils.process_allgather(local))
    all_counts = np.asarray(multihost_utils.process_allgather(counts))
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:

        def sees(i: int) -> str:
            n_train, n_eval = all_counts[i]
            return f"process {i} sees {n_train} training and {n_eval if n_eval >= 0 else 'no'} evaluation videos"

        raise TrainingError(
            f"the processes do not see the same videos: {'; '.join(sees(i) for i in [0, *differ])} "
            f"(lists differ on process {', '.join(map(str, differ))}). Videos whose feature file is missing are "
            "skipped per host: give every host the same feature files (each process logs the ids it skipped)"
        )


# ---------------------------------------------------------------------------------------------------
# Resuming from the latest readable checkpoint


def restore_latest_readable(
    workdir: Path, abstract: TrainState, keep: int, primary: bool
) -> tuple[ocp.CheckpointManager, tuple[TrainState, dict] | None]:
    """The checkpoint manager of `workdir/checkpoints` and the (state, meta) of its latest readable step.

    A step that cannot be read (corrupt or truncated files) is reported, moved to
    `workdir/unreadable_checkpoints/` (so that it neither shadows later saves nor is tried again), and the
    step before it is used.
    """
    directory = workdir / "checkpoints"
    mngr = ckpt.manager(directory, max_to_keep=keep, asynchronous=True)
    unreadable = []
    restored = None
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = ckpt.restore_training(mngr, step, abstract, "this run's model and optimizer (config.yaml)")
            break
        except CheckpointError:  # readable, but of another model: moving it aside would not help
            mngr.close()
            raise
        except Exception as e:
            log.warning("checkpoint %s is unreadable (%s)", directory / str(step), ckpt.short_error(e))
            unreadable.append(step)
    if not unreadable:
        return mngr, restored
    if restored is None:
        mngr.close()
        raise TrainingError(
            f"{directory}: no readable checkpoint (steps {', '.join(map(str, unreadable))} are corrupt or "
            "truncated); move them away to train from scratch, or use another --workdir"
        )
    mngr.close()
    aside = workdir / "unreadable_checkpoints"
    if primary:
        aside.mkdir(exist_ok=True)
        for step in unreadable:
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            shutil.move(str(directory / str(step)), str(target))
    barrier("unreadable checkpoints moved")
    log.warning(
        "resuming from step %d, the previous readable checkpoint; moved the unreadable step(s) %s to %s",
        int(restored[0].step),
        ", ".join(map(str, unreadable)),
        aside,
    )
    return ckpt.manager(directory, max_to_keep=keep, asynchronous=True), restored


# ---------------------------------------------------------------------------------------------------
# Logs: log.jsonl, TensorBoard, profiler traces


class ScalarLog:
    """Writes each record to `workdir/log.jsonl` and, with `tensorboard`, its scalars as TensorBoard event files
    in `workdir` (training scalars as train/<key>, evaluations as eval/<key>). Only on process 0."""

    def __init__(self, workdir: Path, primary: bool, tensorboard: bool, purge_step: int):
        self.file = open(workdir / "log.jsonl", "a") if primary else None  # closed in __exit__
        self.writer = None
        if primary and tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: after a resume, TensorBoard drops the events of the steps that are run again.
            self.writer = SummaryWriter(str(workdir), purge_step=purge_step if purge_step > 1 else None)

    def write(self, record: dict[str, Any], extra_scalars: dict[str, float] | None = None) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            group = "train" if "final_loss" in record else "eval"
            scalars = {k: v for k, v in record.items() if k not in ("step", "epoch")}
            for key, value in {**scalars, **(extra_scalars or {})}.items():
                self.writer.add_scalar(f"{group}/{key}", float(value), record["step"])
            self.writer.flush()

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def profiler_trace(directory: str | Path | None):
    """A JAX profiler trace of the enclosed code in `directory` (nothing when None)."""
    if directory is None:
        yield
        return
    jax.profiler.start_trace(str(directory))
    try:
        yield
    finally:
        jax.profiler.stop_trace()
        log.info("profiler trace in %s (TensorBoard's profile plugin or Perfetto reads it)", directory)


class StepTrace:
    """A JAX profiler trace of training steps first .. last (in `directory/process_<i>` with several hosts)."""

    def __init__(self, directory: str | Path | None, first: int, last: int):
        self.directory, self.first, self.last = directory, first, max(first, last)
        if directory is not None and jax.process_count() > 1:
            self.directory = Path(directory) / f"process_{jax.process_index()}"
        self.active = self.traced = False

    def before(self, step: int) -> None:
        if self.directory is not None and step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.active = self.traced = True

    def after(self, step: int) -> None:  # the step's metrics are on the host: its work is done
        if self.active and step == self.last:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.active = False
        log.info("profiler trace of steps %d-%d in %s", self.first, self.last, self.directory)

    def __enter__(self) -> StepTrace:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self._stop()
        elif self.directory is not None and not self.traced:
            log.warning("no profiler trace: the run had fewer than 2 steps left (the first one compiles)")


# ---------------------------------------------------------------------------------------------------
# Several seeds


def train_seeds(
    cfg: Config, workdir: str | Path, seeds: list[int], profile_dir: str | Path | None = None
) -> dict[str, Any]:
    """One run per seed (`init_rand_seed`: initialisation, data order, crops) in `workdir/seed_<S>`, then the
    mean and standard deviation of the final mAP at each threshold, printed and written to
    `workdir/seeds_summary.json`. Runs that already finished are evaluated again, not retrained."""
    workdir = Path(workdir)
    finals = {}
    for i, seed in enumerate(seeds):
        log.info("seed %d (%d of %d) in %s", seed, i + 1, len(seeds), workdir / f"seed_{seed}")
        run_cfg = dataclasses.replace(cfg, init_rand_seed=seed)
        summary = train_and_evaluate(run_cfg, workdir / f"seed_{seed}", profile_dir if i == 0 else None)
        finals[seed] = summary["final_metrics"]
    if jax.process_index() != 0:
        return {}
    result = seed_summary(finals)
    (workdir / "seeds_summary.json").write_text(json.dumps(result, indent=1))
    print(format_seed_summary(result))
    print(f"seed summary: {workdir / 'seeds_summary.json'}")
    return result


def seed_summary(finals: dict[int, dict | None]) -> dict[str, Any]:
    """Mean and standard deviation (sample, n - 1; 0 for one run) over the runs' final metrics (fractions)."""
    done = {seed: m for seed, m in finals.items() if m is not None}
    if not done:
        raise TrainingError("no run was evaluated (no evaluation data), so there is no mAP to summarise")
    thresholds = list(next(iter(done.values()))["tiou_thresholds"])
    maps = np.array([m["mAP"] for m in done.values()], np.float64)  # [runs, thresholds]
    avg = np.array([m["average_mAP"] for m in done.values()], np.float64)
    ddof = 1 if len(done) > 1 else 0
    return {
        "seeds": list(done),
        "not_evaluated": [seed for seed in finals if seed not in done],
        "tiou_thresholds": thresholds,
        "mAP_mean": maps.mean(0).tolist(),
        "mAP_std": maps.std(0, ddof=ddof).tolist(),
        "average_mAP_mean": float(avg.mean()),
        "average_mAP_std": float(avg.std(ddof=ddof)),
        "runs": {str(seed): {"mAP": list(m["mAP"]), "average_mAP": m["average_mAP"]} for seed, m in done.items()},
    }


def format_seed_summary(result: dict[str, Any]) -> str:
    """The mAP table (%) of `seed_summary`: mean ± std per threshold, then one row per seed."""
    thr = result["tiou_thresholds"]
    cell = 15
    header = f"{'tIoU':<10}" + "".join(f"{t:>{cell}.2f}" for t in thr) + f"{'Avg.':>{cell}}"
    means, stds = [*result["mAP_mean"], result["average_mAP_mean"]], [*result["mAP_std"], result["average_mAP_std"]]
    mean_std = zip(means, stds, strict=True)
    lines = [
        f"final mAP (%) over seeds {', '.join(map(str, result['seeds']))}: mean ± standard deviation",
        header,
        "-" * len(header),
        f"{'mAP (%)':<10}" + "".join(f"{f'{100 * m:.2f} ± {100 * s:.2f}':>{cell}}" for m, s in mean_std),
    ]
    for seed, run in result["runs"].items():
        values = [*run["mAP"], run["average_mAP"]]
        lines.append(f"{'seed ' + seed:<10}" + "".join(f"{100 * v:>{cell}.2f}" for v in values))
    if result["not_evaluated"]:
        lines.append(f"not evaluated (no evaluation data): seeds {', '.join(map(str, result['not_evaluated']))}")
    return "\n".join(lines)


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
def _closing(resource):
    """Closes `resource` however the loop ends: grain's worker processes stop, orbax's last write finishes."""
    try:
        yield resource
    finally:
        if hasattr(resource, "close"):
            resource.close()


def _evaluate_and_log(
    cfg: Config, state: TrainState, step: int, steps_per_epoch: int, scalars: ScalarLog, predictor: Predictor
):
    from cltdr_jax.evaluation import format_table

    try:
        metrics, prediction = evaluate_ema(cfg, state.ema_params, predictor)
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
    per_threshold = {f"mAP_{t:.2f}": v for t, v in zip(metrics["tiou_thresholds"], metrics["mAP"], strict=True)}
    scalars.write(record, per_threshold)
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
