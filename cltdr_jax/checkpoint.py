"""Checkpoints with orbax: one layout for converted and for trained models.

    CHECKPOINT_DIR/<step>/params       the weights inference uses (the EMA weights, as the reference)
    CHECKPOINT_DIR/<step>/train_state  everything needed to resume training (only written by `cltdr train`)
    CHECKPOINT_DIR/<step>/meta         JSON: config, step, epoch, provenance

Orbax writes each step into a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint behind. Restoring always places arrays on the local default device, so a checkpoint
written on GPUs restores on a CPU-only machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from cltdr_jax.config import Config
from cltdr_jax.convert import abstract_params
from cltdr_jax.errors import CheckpointError

ITEMS = ("params", "train_state", "meta")


def manager(directory: str | Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "train_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def _check_shapes(mngr: ocp.CheckpointManager, step: int, expected: Any, where: str, cfg: Config) -> None:
    """Compares the saved parameter shapes with the config's before restoring, for a message that names
    every mismatch (orbax itself fails deep inside its readers)."""
    saved = {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(mngr.item_metadata(step)["params"])
    }
    wanted = {
        jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(expected)
    }
    problems = [f"missing {k} (config needs {v})" for k, v in wanted.items() if k not in saved]
    problems += [f"unexpected {k} {v}" for k, v in saved.items() if k not in wanted]
    problems += [
        f"{k}: checkpoint {saved[k]}, config needs {v}" for k, v in wanted.items() if k in saved and saved[k] != v
    ]
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{where}: the checkpoint does not fit the model of config {cfg.source}:\n  {listed}")


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


def latest_step(directory: str | Path) -> int:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    mngr = manager(directory)
    step = mngr.latest_step()
    mngr.close()
    if step is None:
        raise CheckpointError(
            f"{directory}: no checkpoint in this directory (expected numbered step folders written by "
            "`cltdr convert` or `cltdr train`)"
        )
    return step


def load_params(directory: str | Path, cfg: Config, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The inference weights of the latest (or given) step, and its metadata."""
    directory = Path(directory)
    step = latest_step(directory) if step is None else step
    mngr = manager(directory)
    abstract = abstract_params(cfg)
    try:
        _check_shapes(mngr, step, abstract, f"{directory}/{step}", cfg)
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_on_local_device(abstract)),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except CheckpointError:
        raise
    except Exception as e:  # unreadable or corrupt checkpoint files
        raise CheckpointError(f"{directory}/{step}: cannot read the checkpoint: {e}") from None
    finally:
        mngr.close()
    return restored["params"], dict(restored["meta"] or {})
