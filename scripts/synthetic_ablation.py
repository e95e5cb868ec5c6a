#!/usr/bin/env python
"""Ablations on the synthetic benchmark: does it rank model variants, as the paper's ablations do?

    python scripts/synthetic_ablation.py --workdir runs/ablation [--variants reference,no_global,no_refine]

Synthesises the demo's THUMOS14-like dataset once, trains the demo's reduced config (CPU-sized: 1/8 width
of the THUMOS I3D model) once per variant with the same seed, and prints one JSON object with each
variant's mAP at the THUMOS thresholds. Each variant takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from cltdr_jax.demo import FEATURE_DIM, MAX_DURATION, demo_config
from cltdr_jax.synth import synthesize
from cltdr_jax.train import train_and_evaluate

VARIANTS = {
    "reference": [],
    "no_global": ["model.gmg_branches=[instant,local]"],  # Table 6: no FFT global branch
    "no_gate": ["model.gmg_gate=false"],  # Table 7
    "no_refine": ["model.refine_cls=false", "model.refine_reg=false"],  # Table 10
    "fusion_add": ["model.fusion=add"],  # Table 11
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/ablation")
    parser.add_argument("--variants", default="reference,no_global,no_refine")
    parser.add_argument("--videos", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=float, default=1.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir).absolute()
    config = synthesize(
        "thumos14",
        work / "data",
        feature_dim=FEATURE_DIM,
        num_videos=args.videos,
        seed=args.seed,
        max_duration=MAX_DURATION,
        difficulty=args.difficulty,
    )
    results = {}
    for name in args.variants.split(","):
        cfg = demo_config(config, quick=False, extra=[f"init_rand_seed={args.seed}", *VARIANTS[name], *args.overrides])
        start = time.perf_counter()
        summary = train_and_evaluate(cfg, work / name)
        metrics = summary["final_metrics"]
        results[name] = {
            "overrides": VARIANTS[name],
            "average_mAP": metrics["average_mAP"],
            "mAP": metrics["mAP"],
            "train_and_eval_s": round(time.perf_counter() - start, 1),
        }
        print(json.dumps({name: results[name]}), flush=True)
    print(
        json.dumps(
            {
                "dataset": "synthetic thumos14-like (demo)",
                "videos": args.videos,
                "seed": args.seed,
                "difficulty": args.difficulty,
                "feature_dim": FEATURE_DIM,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
