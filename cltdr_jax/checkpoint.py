"""Checkpoints with orbax: one layout for converted and for trained models.

    CHECKPOINT_DIR/<step>/params       the weights inference uses (the EMA weights, as the reference)
    CHECKPOINT_DIR/<step>/train_state  everything needed to resume training (only written by `cltdr train`),
                                       packed: one flat array per dtype (`pack_state`)
    CHECKPOINT_DIR/<step>/meta         JSON: config, step, epoch, provenance; the packed state's layout

Orbax writes each step into a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint behind. Restoring always places arrays on the local default device, so a checkpoint
written on GPUs restores on a CPU-only machine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cltdr_jax.config import Config
from cltdr_jax.convert import abstract_params
from cltdr_jax.errors import CheckpointError

ITEMS = ("params", "train_state", "meta")
STATE_LAYOUT = "train_state_layout"  # meta's key for the packed training state's [path, dtype, shape] per leaf


def manager(directory: str | Path, max_to_keep: int | None = None, asynchronous: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of a checkpoint folder. `asynchronous` (training's): a save returns once its arrays
    are on the host, and orbax writes them in a background thread (each save first waits for the one
    before; `close` waits for the last). Either way a step's folder appears only when it is complete (orbax
    writes into a temporary folder and renames it), and an asynchronous manager removes the temporary folders
    a killed run left behind."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=asynchronous,
    )
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "train_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a tree of arrays, of abstract arrays or of orbax metadata."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def _check_shapes(saved: dict[str, tuple[int, ...]], expected: Any, where: str, fitting: str) -> None:
    """Compares the saved shapes ({path: shape}) with those `expected` before restoring, for a message that names
    every mismatch (orbax itself fails deep inside its readers). `fitting`: what they must fit, in words."""
    wanted = _shapes(expected)
    problems = [f"missing {k} (config needs {v})" for k, v in wanted.items() if k not in saved]
    problems += [f"unexpected {k} {v}" for k, v in saved.items() if k not in wanted]
    problems += [
        f"{k}: checkpoint {saved[k]}, config needs {v}" for k, v in wanted.items() if k in saved and saved[k] != v
    ]
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{where}: the checkpoint does not fit {fitting}:\n  {listed}")


def _on_local_device(tree: Any) -> Any:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def save_params(directory: str | Path, params: Any, meta: dict[str, Any], step: int = 0) -> Path:
    """Writes an inference checkpoint (what `cltdr convert` produces)."""
    mngr = manager(directory)
    mngr.save(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mngr.wait_until_finished()
    mngr.close()
    return Path(directory) / str(step)


def pack_state(state: Any) -> tuple[dict[str, np.ndarray], list[list]]:
    """A training state as one flat host array per dtype, and its layout: [path, dtype, shape] per leaf, in order.

    Orbax's cost is per array, about 2 ms each on a 2-core CPU, and a training state has ~850 of them at the
    demo's size (parameters, EMA, two Adam moments): saved leaf by leaf, each epoch's checkpoint took 2.0-2.6 s
    (the demo's 19 steps take ~3 s); packed, 0.2-0.4 s with the parameters. The state is replicated: each
    process has all of it, and orbax writes host arrays from process 0 only.
    """
    parts: dict[str, list[np.ndarray]] = {}
    layout = []
    # device_get starts every leaf's copy before waiting for any (on a GPU: one wait, not one per array).
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
        value = np.asarray(leaf)
        parts.setdefault(value.dtype.name, []).append(value.ravel())
        layout.append([jax.tree_util.keystr(path), value.dtype.name, list(value.shape)])
    return {dtype: np.concatenate(arrays) for dtype, arrays in parts.items()}, layout


def unpack_state(packed: dict[str, np.ndarray], layout: list[list], prefix: str = "") -> dict[str, np.ndarray]:
    """{path: array} of a packed training state (`pack_state`), of the leaves whose path starts with `prefix`
    (the prefix removed: ".params" gives the raw weights' paths as in a parameter tree)."""
    sizes: dict[str, int] = {}
    for _, dtype, shape in layout:
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    lengths = {dtype: len(values) for dtype, values in packed.items()}
    if sizes != lengths:
        raise ValueError(f"the packed arrays ({lengths}) do not match their layout ({sizes})")
    offsets = dict.fromkeys(packed, 0)
    leaves = {}
    for path, dtype, shape in layout:
        size = math.prod(shape)
        if path.startswith(prefix):
            leaves[path[len(prefix) :]] = packed[dtype][offsets[dtype] : offsets[dtype] + size].reshape(shape)
        offsets[dtype] += size
    return leaves


def place_leaves(abstract: Any, leaves: dict[str, np.ndarray], where: str, fitting: str) -> Any:
    """`abstract`'s tree (abstract arrays with a sharding) with each leaf taken from `leaves` by its path and
    placed on the leaf's sharding; a CheckpointError names every leaf that does not fit."""
    _check_shapes({path: value.shape for path, value in leaves.items()}, abstract, where, fitting)

    def place(path: Any, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        value = leaves[jax.tree_util.keystr(path)].astype(leaf.dtype, copy=False)
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

    return jax.tree_util.tree_map_with_path(place, abstract)


def save_training(mngr: ocp.CheckpointManager, state: Any, meta: dict[str, Any]) -> None:
    """Writes a training state (train.TrainState) as the checkpoint of its step: its EMA weights as `params`,
    the whole state packed as `train_state`, `meta` with the packing's layout.

    With an asynchronous manager the files are written after this returns, from host copies of the arrays
    made here: on a CPU a device array read into numpy is a view of its buffer, which the next steps reuse
    (the state is donated) or, while a view lives, cannot. Saving the THUMOS state so holds training up for
    0.2-0.4 s instead of 0.6-1.4 s, the demo's for 0.04-0.09 s instead of 0.13-0.26 s (2-core AMD EPYC Zen 4,
    2026-12-07).
    """
    host = jax.device_get(state)  # one transfer of the whole state (pack_state leaves host arrays as they are)
    packed, layout = pack_state(host)  # new host arrays (concatenated)
    ema_params = jax.tree_util.tree_map(np.array, host.ema_params)  # np.array copies
    mngr.save(
        int(state.step),
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(ema_params),
            train_state=ocp.args.StandardSave(packed),
            meta=ocp.args.JsonSave({**meta, STATE_LAYOUT: layout}),
        ),
        force=True,
    )


def _read_packed_state(
    mngr: ocp.CheckpointManager, step: int, prefix: str = ""
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """A step's packed training state as {path: array} (`unpack_state` with `prefix`) and its metadata without
    the layout; None for the state of a checkpoint written before packing (a tree, read by the caller)."""
    meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
    layout = meta.pop(STATE_LAYOUT, None)
    if layout is None:
        return None, meta
    packed = mngr.restore(step, args=ocp.args.Composite(train_state=ocp.args.StandardRestore()))["train_state"]
    return unpack_state(packed, layout, prefix), meta


def restore_training(mngr: ocp.CheckpointManager, step: int, abstract: Any, fitting: str) -> tuple[Any, dict]:
    """The training state of a step's checkpoint on `abstract`'s shardings, and its metadata (without the
    layout). Checkpoints of versions before packing (a `train_state` tree) are read as they were written."""
    leaves, meta = _read_packed_state(mngr, step)
    if leaves is None:
        restored = mngr.restore(step, args=ocp.args.Composite(train_state=ocp.args.StandardRestore(abstract)))
        return restored["train_state"], meta
    return place_leaves(abstract, leaves, str(Path(mngr.directory) / str(step)), fitting), meta


def short_error(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception, shortened: orbax and TensorStore errors run to whole screens."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def available_steps(directory: str | Path) -> list[int]:
    """The complete step folders of a checkpoints directory, in increasing order (orbax writes a step into a
    temporary folder and renames it when complete, so a numbered folder is a finished save)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """(checkpoints directory, step) from what users pass as CHECKPOINT: a training workdir (its
    `checkpoints/` folder), a checkpoints folder (`cltdr convert`'s output), or one step's folder.
    Without `step`, the latest step."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if path.name.isdigit() and any((path / item).exists() for item in ITEMS):  # one step's folder
        if step is not None and step != int(path.name):
            raise CheckpointError(f"{path} is the folder of step {path.name}, but step {step} was asked for")
        return path.parent, int(path.name)
    if not available_steps(path) and (path / "checkpoints").is_dir():  # a training workdir
        path = path / "checkpoints"
    steps = available_steps(path)
    if not steps:
        raise CheckpointError(
            f"{path}: no checkpoint in this directory (expected a training workdir, its checkpoints/ folder, "
            "numbered step folders written by `cltdr convert` or `cltdr train`, or one of them)"
        )
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise CheckpointError(f"{path}: no checkpoint of step {step}; steps here: {', '.join(map(str, steps))}")
    return path, step


def latest_step(directory: str | Path) -> int:
    return resolve_checkpoint(directory)[1]


def _metadata_abstract(tree: Any) -> Any:
    """Placeholders on the local device for an orbax metadata tree (its leaves have shape and dtype)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
        tree,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
    )


def load_params(
    path: str | Path, cfg: Config, step: int | None = None, weights: str = "ema"
) -> tuple[Any, dict[str, Any]]:
    """The inference weights of a checkpoint and its metadata.

    path: a training workdir, a checkpoints folder or one step's folder (see `resolve_checkpoint`); `step`
    picks a step (default: the latest). weights: "ema" (the `params` item: the EMA weights of a trained
    model, or what `cltdr convert` wrote) or "raw" (the trained weights before averaging, from the training
    state; only in checkpoints written by `cltdr train`). The metadata gains `checkpoint` (the step folder)
    and `loaded_weights` (what was loaded, in words).
    """
    if weights not in ("ema", "raw"):
        raise CheckpointError(f"weights must be ema or raw, got {weights!r}")
    directory, step = resolve_checkpoint(path, step)
    where = directory / str(step)
    mngr = manager(directory)
    abstract = abstract_params(cfg)
    try:
        if weights == "raw" and not (where / "train_state").is_dir():
            raise CheckpointError(
                f"{where}: holds only inference weights (written by `cltdr convert`); --weights raw needs a "
                "checkpoint written by `cltdr train`"
            )
        fitting = f"the model of config {cfg.source}"
        if weights == "ema":
            _check_shapes(_shapes(mngr.item_metadata(step)["params"]), abstract, str(where), fitting)
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(_on_local_device(abstract)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            params, meta = restored["params"], restored["meta"]
        else:
            leaves, meta = _read_packed_state(mngr, step, prefix=".params")
            if leaves is not None:
                params = place_leaves(_on_local_device(abstract), leaves, str(where), fitting)
            else:  # written before packing: a tree
                state_tree = mngr.item_metadata(step)["train_state"]
                restored = mngr.restore(
                    step, args=ocp.args.Composite(train_state=ocp.args.StandardRestore(_metadata_abstract(state_tree)))
                )
                params = restored["train_state"]["params"]
                _check_shapes(_shapes(params), abstract, str(where), fitting)
    except CheckpointError:
        raise
    except Exception as e:  # unreadable, corrupt or truncated checkpoint files
        others = [s for s in available_steps(directory) if s != step]
        hint = f"; other steps here: {', '.join(map(str, others))} (--step N)" if others else ""
        raise CheckpointError(
            f"{where}: cannot read this checkpoint, corrupt or truncated ({short_error(e)}){hint}"
        ) from None
    finally:
        mngr.close()
    meta = dict(meta or {})
    meta.pop(STATE_LAYOUT, None)
    if weights == "raw":
        described = "raw weights (the training state's, not averaged)"
    elif "weights" in meta:  # cltdr convert
        described = f"{meta['weights']} of {meta.get('source', 'a reference checkpoint')}"
    else:
        described = "EMA weights"
        decay = meta.get("config", {}).get("trainer", {}).get("ema_decay")
        described += f" (decay {decay})" if decay is not None else ""
    meta.update(checkpoint=str(where), loaded_weights=described)
    return params, meta
