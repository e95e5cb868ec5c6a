"""`cltdr demo`'s settings: the whole job on a fresh CPU machine, on synthetic THUMOS-like data (the job
itself, with its printing, is the `demo` command in `commands.py`).

Synthesise a reduced THUMOS14-shaped dataset (real class names, durations, action statistics; short
videos so every test video fits one padded length), train a small CLTDR-GMG on it, evaluate the last
epoch's EMA model, and draw the results. A fixed seed gives the same mAP on the same machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cltdr_jax.config import Config, load_config

log = logging.getLogger(__name__)

FEATURE_DIM = 64
MAX_DURATION = 60.0  # seconds: T <= 60 * 30 / 4 = 450 feature steps, all padded to max_seq_len

# A reduced THUMOS I3D config: the same architecture (6 levels, Trident head, CLTDR decoder) at 1/8 width.
DEMO_OVERRIDES = [
    "dataset.max_seq_len=512",
    "model.embd_dim=64",
    "model.fpn_dim=64",
    "model.head_dim=64",
    "model.sgp_mlp_dim=128",
    "model.input_noise=0.05",
    "loader.batch_size=4",
    "opt.learning_rate=0.001",
    "opt.weight_decay=0.035",
    "opt.warmup_epochs=2",
    "opt.epochs=40",
    "train_cfg.init_loss_norm=100",
    "trainer.log_every_steps=20",
    # The reference's 0.999 EMA averages over ~1000 steps; this run has ~300, so average over ~100.
    "trainer.ema_decay=0.99",
]
QUICK_OVERRIDES = ["opt.warmup_epochs=1", "opt.epochs=1", "trainer.log_every_steps=1"]


def demo_config(dataset_config: Path, quick: bool, extra: list[str] = ()) -> Config:
    return load_config(dataset_config, [*DEMO_OVERRIDES, *(QUICK_OVERRIDES if quick else []), *extra])
