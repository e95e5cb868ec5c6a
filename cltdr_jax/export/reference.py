"""Export to the authors' PyTorch format: the inverse of `cltdr convert` (REFERENCE.md 11).

    cltdr export-torch CONFIG CHECKPOINT OUT.pth.tar          # what the reference's eval.py loads
    cltdr export-torch CONFIG CHECKPOINT OUT.npz --format npz  # the same tensors, no pickle

The `.pth.tar` is a dict as the reference's train.py saves it, less the optimizer and scheduler states
(theirs are torch objects of the reference's training loop; ours have another structure):

    epoch           int: the epochs finished here, as train.py counts them (0 for a converted checkpoint)
    state_dict      the live (raw) weights
    state_dict_ema  the EMA weights: what eval.py loads, and what our inference uses

Each state dict maps `module.<reference key>` (nn.DataParallel's prefix, which eval.py's model carries) to a
float32 tensor in the reference's layout, in the reference's state_dict order.

The tensors come from `convert.state_dict_from_params`, the exact inverse of the conversion, so
`convert(export(params)) == params` bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax.config import Config
from cltdr_jax.convert import convert_checkpoint, state_dict_from_params
from cltdr_jax.errors import CheckpointError
from cltdr_jax.torch_files import read_state_dict, write_torch_checkpoint

log = logging.getLogger(__name__)

PREFIX = "module."  # the reference wraps its model in nn.DataParallel before saving and loading


@dataclass
class Weights:
    """A model's weights as Flax trees: `ema` (inference), `raw` (the live training weights) and `epoch`."""

    ema: Any
    raw: Any
    epoch: int
    raw_note: str  # where `raw` came from, for the log


# ---------------------------------------------------------------------------------------------------
# Reading our checkpoints


def load_weights(cfg: Config, checkpoint: str | Path, step: int | None = None, raw: bool = True) -> Weights:
    """The weights of one of our checkpoints (a training workdir, a checkpoints folder or a step's folder),
    or of a reference checkpoint file (.pth.tar / .pth / .npz), for `cfg`.

    A checkpoint written by `cltdr train` holds both weight sets; one written by `cltdr convert` only the
    inference (EMA) weights, which then stand for the raw ones too. `raw=False` skips the raw weights.
    """
    from cltdr_jax.checkpoint import load_params, resolve_checkpoint

    path = Path(checkpoint)
    if path.is_file():
        ema = convert_checkpoint(cfg, path, "ema")
        try:
            live = convert_checkpoint(cfg, path, "model") if raw else ema
        except CheckpointError:  # a full checkpoint without `state_dict`
            return Weights(ema, ema, 0, f"{path} has no state_dict: state_dict = state_dict_ema")
        return Weights(ema, live, 0, f"the state_dict of {path} (a bare state_dict stands for both)")
    directory, step = resolve_checkpoint(path, step)
    ema, meta = load_params(directory, cfg, step, "ema")
    # train.py's `epoch` counts finished epochs; ours is fractional (steps / steps per epoch).
    epoch = int(math.floor(float(meta.get("epoch", 0)) + 1e-6))
    if not (raw and (directory / str(step) / "train_state").is_dir()):
        note = f"{meta['checkpoint']} holds only inference weights ({meta['loaded_weights']}): state_dict = EMA"
        return Weights(ema, ema, epoch, note)
    live, _ = load_params(directory, cfg, step, "raw")
    return Weights(ema, live, epoch, f"the raw weights of the training state in {meta['checkpoint']}")


# ---------------------------------------------------------------------------------------------------
# Writing the reference's format


def reference_checkpoint(cfg: Config, weights: Weights) -> dict[str, Any]:
    """The dict the reference's train.py saves (less optimizer and scheduler), as numpy arrays."""

    def prefixed(params: Any, what: str) -> OrderedDict:
        state = state_dict_from_params(cfg, params, source=what)
        return OrderedDict((PREFIX + k, v) for k, v in state.items())

    return {
        "epoch": int(weights.epoch),
        "state_dict": prefixed(weights.raw, "the raw weights"),
        "state_dict_ema": prefixed(weights.ema, "the EMA weights"),
    }


def _check_written(path: Path, expected: dict[str, np.ndarray], weights: str) -> None:
    """Reads the file back with the project's own reader: a file that does not round-trip is not left."""
    back = read_state_dict(path, weights)
    want = {k[len(PREFIX) :]: v for k, v in expected.items()}
    bad = [k for k in want if k not in back or back[k].shape != want[k].shape or back[k].tobytes() != want[k].tobytes()]
    if bad or set(back) != set(want):
        path.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: the written file does not read back as written ({len(bad)} tensors differ)")


def export_torch(
    cfg: Config,
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "pth",
    weights: str = "ema",
    step: int | None = None,
) -> dict:
    """Writes the reference-format checkpoint of our `checkpoint` to `out`; returns a summary for the log.

    fmt "pth": torch's zip format (torch.save's, through torch when installed); "npz": a numpy archive of
    one weight set (`weights`: "ema" or "raw") keyed by the torch names with `module.`, like the fixtures'
    state_dict.npz.
    """
    out = Path(out)
    loaded = load_weights(cfg, checkpoint, step, raw=fmt == "pth" or weights == "raw")
    ckpt = reference_checkpoint(cfg, loaded)
    if fmt == "pth" or weights == "raw":
        log.info("state_dict: %s", loaded.raw_note)
    if fmt == "npz":
        state = ckpt["state_dict_ema" if weights == "ema" else "state_dict"]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez(tmp, **state)
        tmp.replace(out)
        writer = "numpy"
        _check_written(out, state, "ema")
    elif fmt == "pth":
        writer = write_torch_checkpoint(out, ckpt)
        _check_written(out, ckpt["state_dict_ema"], "ema")
        _check_written(out, ckpt["state_dict"], "model")
    else:
        raise CheckpointError(f"unknown export format {fmt!r} (use pth or npz)")
    state = ckpt["state_dict_ema"]
    return {
        "path": str(out),
        "format": fmt,
        "writer": writer,
        "tensors": len(state),
        "values": int(sum(v.size for v in state.values())),
        "epoch": ckpt["epoch"],
        "raw_note": loaded.raw_note,
    }
