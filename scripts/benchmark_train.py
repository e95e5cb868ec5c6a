#!/usr/bin/env python
"""Training-step benchmark at the THUMOS I3D config (batch 2 x 2304 x 2048, 21.9 M parameters).

    python scripts/benchmark_train.py [--steps 5] [--config configs/thumos_i3d_focalloss.yaml]
    python scripts/benchmark_train.py --variants float32:highest,float32:default,bfloat16:default
    python scripts/benchmark_train.py --variants float32,float32+xla-defaults,float32,float32+xla-defaults
    python scripts/benchmark_train.py --variants float32 --slots 64 --set dataset.max_seq_len=512 ...

Prints one JSON object: per variant (compute dtype : matmul precision) the compile time, median step time,
steps/s, peak resident memory of a process that does only that (and its peak after compiling), XLA's FLOP
count of one step and the achieved FLOP/s as a fraction of a dense matmul measured in the same run. Each
dtype runs in its own process so that peak memory is its own; a variant ending in "+xla-defaults" compiles
with XLA's default options instead of ours (cltdr_jax/xla_options.py), to measure what they are worth.
`--slots N`: ground-truth segment slots per video (default 16; `cltdr train` uses
`input_pipeline.segment_slots` of its training set, and the target assignment grows with it).
`--profile` adds the step time by operation kind, by model part and the costliest instructions from XLA's
profile (CLTDR_PROFILE_DEPTH=N: N module names per part, default 2; CLTDR_PROFILE_TOP=N: how many, default 25).
Not a test: timings on shared machines are noisy; compare ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine, matmul_roof_gflops

REPO = Path(__file__).resolve().parents[1]
XLA_DEFAULTS = "+xla-defaults"  # a variant's suffix: compile with XLA's default options (xla_options.DEFAULTS_ENV)


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def peak_device_bytes() -> int | None:
    """Peak bytes the first device has held (GPU / TPU allocators report it; the CPU does not)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def synthetic_batch(cfg, slots: int = 16) -> dict:
    """One training batch of the config's shape: random features, `slots` random segments per video."""
    import numpy as np

    b, t, d = cfg.loader.batch_size, cfg.dataset.max_seq_len, cfg.dataset.input_dim
    rng = np.random.default_rng(0)
    starts = rng.uniform(0, t - 200, (b, slots))
    return {
        "feats": rng.standard_normal((b, t, d)).astype(np.float32),
        "mask": np.ones((b, t), bool),
        "segments": np.stack([starts, starts + rng.uniform(5, 150, (b, slots))], -1).astype(np.float32),
        "labels": rng.integers(0, cfg.dataset.num_classes, (b, slots)).astype(np.int32),
        "segment_mask": np.ones((b, slots), bool),
    }


def train_step_and_state(cfg):
    """The training step as `cltdr train` builds it (jitted, not yet compiled), a fresh train state placed on
    the mesh, and the sharding a batch goes to."""
    from cltdr_jax.optim import make_optimizer
    from cltdr_jax.train import compile_train_step, create_state, make_mesh, make_train_step, training_model

    model = training_model(cfg)
    tx, schedule = make_optimizer(cfg, steps_per_epoch=100)
    step_fn, replicated, data = compile_train_step(cfg, make_train_step(cfg, model, tx, schedule), make_mesh())
    return step_fn, create_state(cfg, model, tx, 0, replicated), data


def run_variant(
    config: str, variant: str, steps: int, overrides: tuple[str, ...] = (), profile: bool = False, slots: int = 16
) -> dict:
    """One training-step measurement; `variant` is "dtype" or "dtype:precision"; `profile`: also the step
    time by operation kind, from XLA's profile (scripts/xla_profile.py); `slots`: ground-truth segment slots
    per video (`cltdr train` uses `input_pipeline.segment_slots` of its training set)."""
    import jax
    import numpy as np

    from cltdr_jax.config import load_config
    from cltdr_jax.convert import count_params
    from cltdr_jax.train import return_freed_memory
    from cltdr_jax.xla_options import compiler_options

    variant = variant.removesuffix(XLA_DEFAULTS)  # the environment says it (main sets DEFAULTS_ENV)
    dtype, _, precision = variant.partition(":")
    sets = [f"trainer.compute_dtype={dtype}", *([f"trainer.precision={precision}"] if precision else []), *overrides]
    cfg = load_config(config, sets)
    b, t, d = cfg.loader.batch_size, cfg.dataset.max_seq_len, cfg.dataset.input_dim
    step_fn, state, data = train_step_and_state(cfg)
    batch = jax.device_put(synthetic_batch(cfg, slots), data)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    rss_after_compile = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return_freed_memory()  # as `cltdr train` does before its first step
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    # The training process's peak, read before this harness's own extras: XLA's cost and memory analyses
    # (about 0.1 GB for a moment, measured with scripts/memory_stages.py), the profile and the roof's dots.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = flops_of(compiled)
    memory = compiled.memory_analysis()
    breakdown = None
    if profile:
        sys.path.insert(0, str(REPO / "scripts"))
        from xla_profile import op_breakdown

        holder = {"state": state}

        def one_step():
            holder["state"], m = compiled(holder["state"], batch)
            return m

        breakdown = op_breakdown(
            compiled,
            one_step,
            repeats=2,
            depth=int(os.environ.get("CLTDR_PROFILE_DEPTH", 2)),
            top=int(os.environ.get("CLTDR_PROFILE_TOP", 25)),
        )
    roof = matmul_roof_gflops("float32" if dtype == "float32" else "bfloat16")["gflops"]
    peak = peak_device_bytes()
    return {
        "compute_dtype": dtype,
        "precision": cfg.trainer.precision,
        "xla_options": compiler_options(compute_dtype=dtype),
        "peak_device_gb": round(peak / 2**30, 2) if peak else None,
        "params": count_params(state.params),
        "batch": [b, t, d],
        "segment_slots": slots,
        "compile_s": round(compile_s, 2),
        "step_s_median": round(step_s, 3),
        "step_s_all": [round(x, 3) for x in times],
        "steps_per_s": round(1 / step_s, 3),
        "peak_rss_gb": round(peak_rss / 2**20, 2),
        # The peak before the first step: set by building, compiling and the host batch, not by the step.
        "peak_rss_after_compile_gb": round(rss_after_compile / 2**20, 2),
        # XLA's own memory analysis of the compiled step: its temporaries and its arguments / outputs.
        "xla_temp_gb": round(memory.temp_size_in_bytes / 2**30, 2) if memory else None,
        "xla_argument_gb": round(memory.argument_size_in_bytes / 2**30, 2) if memory else None,
        "xla_output_gb": round(memory.output_size_in_bytes / 2**30, 2) if memory else None,
        "xla_gflop_per_step": round(flops / 1e9, 1),
        "achieved_gflops": round(flops / step_s / 1e9, 1),
        f"matmul_roof_{dtype}_gflops": round(roof, 1),
        "fraction_of_matmul_roof": round(flops / step_s / 1e9 / roof, 3),
        "final_loss_finite": bool(np.isfinite(float(metrics["final_loss"]))),
        "device": str(jax.devices()[0].device_kind),
        "machine": machine(),
        "profile_by_op_kind": breakdown,
    }


def main() -> None:
    from cltdr_jax.xla_options import DEFAULTS_ENV

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "thumos_i3d_focalloss.yaml"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--dtypes",
        "--variants",
        dest="variants",
        default="float32,bfloat16",
        help="comma-separated dtype[:precision] variants (precision default: trainer.precision)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--profile", action="store_true", help="also the step time by operation kind (XLA profile)")
    parser.add_argument("--slots", type=int, default=16, help="ground-truth segment slots per video (default 16)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        result = run_variant(args.config, args.variant, args.steps, tuple(args.overrides), args.profile, args.slots)
        print(json.dumps(result))
        return
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), "--variant", variant]
        cmd += ["--slots", str(args.slots)]
        cmd += [f"--set={o}" for o in args.overrides] + (["--profile"] if args.profile else [])
        env = dict(os.environ, **({DEFAULTS_ENV: "1"} if variant.endswith(XLA_DEFAULTS) else {}))
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    report = {
        "benchmark": "train step, THUMOS I3D config",
        "results": results,
    }
    if [r["compute_dtype"] for r in results] == ["float32", "bfloat16"]:
        report["bfloat16_speedup"] = round(results[0]["step_s_median"] / results[1]["step_s_median"], 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
