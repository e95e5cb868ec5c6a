"""`cltdr demo`: the whole job on a fresh CPU machine, on synthetic THUMOS-like data.

Synthesise a reduced THUMOS14-shaped dataset (real class names, durations, action statistics; short
videos so every test video fits one padded length), train a small CLTDR-GMG on it, evaluate the last
epoch's EMA model, and draw the results. A fixed seed gives the same mAP on the same machine.
"""

from __future__ import annotations

import json
import logging
import time
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


def run_demo(workdir: str | Path, seed: int = 0, quick: bool = False) -> dict:
    """Runs the demo in `workdir`; returns the final metrics. `quick` is a much shorter run for tests."""
    from cltdr_jax import evaluation
    from cltdr_jax.plots import plot_timeline
    from cltdr_jax.synth import synthesize
    from cltdr_jax.train import train_and_evaluate

    workdir = Path(workdir).absolute()
    start = time.perf_counter()
    data_dir = workdir / "data"
    num_videos = 24 if quick else 160
    print(f"[1/4] synthesising a THUMOS14-like dataset ({num_videos} videos, {FEATURE_DIM}-d) in {data_dir}")
    dataset_config = synthesize(
        "thumos14", data_dir, feature_dim=FEATURE_DIM, num_videos=num_videos, seed=seed, max_duration=MAX_DURATION
    )
    cfg = demo_config(dataset_config, quick, [f"init_rand_seed={seed}"])

    print(f"[2/4] training ({cfg.opt.warmup_epochs + cfg.opt.epochs} epochs) in {workdir / 'train'}")
    summary = train_and_evaluate(cfg, workdir / "train")
    metrics = summary["final_metrics"]

    print("[3/4] the final EMA model's detections on the test split")
    results = summary["final_detections"]
    detections_path = workdir / "train" / "detections.json"

    print("[4/4] drawing detections against ground truth")
    gt = json.loads(Path(cfg.dataset.json_file).read_text())["database"]
    figures = []
    test_videos = sorted(v for v, e in gt.items() if e["subset"].lower() == cfg.val_split[0])
    for vid in test_videos[:3]:
        out = workdir / f"timeline_{vid}.png"
        plot_timeline(results["results"].get(vid, []), gt[vid]["annotations"], None, gt[vid]["duration"], out, top=5)
        figures.append(out)

    print()
    print(f"Synthetic THUMOS14-like test split, {len(test_videos)} videos, EMA model after the last epoch:")
    print(evaluation.format_table(metrics))
    print()
    print(f"finished in {time.perf_counter() - start:.0f} s. Results in {workdir}:")
    print(f"  detections        {detections_path}")
    print(f"  metrics           {workdir / 'train' / 'metrics.json'}")
    print(f"  training log      {workdir / 'train' / 'log.jsonl'}")
    print(f"  training curves   {workdir / 'train' / 'training_curves.png'}")
    for f in figures:
        print(f"  timeline          {f}")
    print(f"  checkpoints       {workdir / 'train' / 'checkpoints'}  (cltdr predict / cltdr eval read them)")
    return metrics
