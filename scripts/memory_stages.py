"""Where a training process's memory goes: its resident size at each stage of one THUMOS training step.

Builds the state, the batch and the compiled step as `benchmark_train.py` does, and after each stage reads
the process's resident size from /proc (`VmRSS`, its peak `VmHWM`, the anonymous part `RssAnon`) and the
bytes malloc has handed out and not got back (glibc's `mallinfo2`). At the end it drops the compiled step,
then the state, so that what each of them holds shows as the memory that leaves with it. Prints JSON.

    python scripts/memory_stages.py [--set trainer.remat=[gmg,heads]] [--cache DIR]

With `--cache DIR` the step comes from (and goes to) JAX's persistent compilation cache in DIR, as in a
second `cltdr train` of the same config: run it twice and read the second run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
from pathlib import Path

from benchmark_train import synthetic_batch, train_step_and_state
from machine import machine

REPO = Path(__file__).resolve().parents[1]


_MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t counters
    _fields_ = [(name, ctypes.c_size_t) for name in (*_MALLINFO2_FIELDS, "keepcost")]


def _malloc_in_use_gb() -> float | None:
    """Bytes malloc has handed out (heap and mmapped chunks), over all arenas; None without glibc 2.33+."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return round((info.uordblks + info.hblkhd) / 2**30, 3)


def _resident() -> dict[str, float | None]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            fields[key] = round(int(value.split()[0]) / 2**20, 3)  # kB -> GB
    fields["malloc_in_use"] = _malloc_in_use_gb()
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "thumos_i3d_focalloss.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cache", help="JAX's persistent compilation cache directory")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    stages: list[dict] = []

    def stage(name: str) -> None:
        stages.append({"stage": name, **_resident()})

    import jax

    from cltdr_jax.config import load_config
    from cltdr_jax.train import return_freed_memory
    from cltdr_jax.xla_cache import compile_counts, enable_persistent_cache

    if args.cache:
        enable_persistent_cache(args.cache)
    stage("imports")
    cfg = load_config(args.config, args.overrides)
    step_fn, state, data = train_step_and_state(cfg)
    jax.block_until_ready(state)
    stage("state initialised")
    return_freed_memory()
    stage("freed memory returned")
    batch = jax.device_put(synthetic_batch(cfg), data)
    stage("batch placed")
    loaded_before = compile_counts()["cache_hits"]
    compiled = step_fn.lower(state, batch).compile()
    stage("step loaded from the cache" if compile_counts()["cache_hits"] > loaded_before else "step compiled")
    return_freed_memory()
    stage("freed memory returned")
    for i in range(args.steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        stage(f"after step {i + 1}")
    # Read after the steps: the analysis itself takes ~0.1 GB for a moment, which `cltdr train` never spends.
    analysis = compiled.memory_analysis()
    del metrics
    return_freed_memory()
    stage("freed memory returned")
    del compiled
    jax.clear_caches()
    gc.collect()
    return_freed_memory()
    stage("compiled step dropped")
    del state, batch
    gc.collect()
    return_freed_memory()
    stage("state and batch dropped")
    print(
        json.dumps(
            {
                "benchmark": "memory by stage of one training process (GB)",
                "config": args.config,
                "overrides": args.overrides,
                "cache": args.cache,
                "stages": stages,
                # XLA's own account of the step: its temporaries, and its arguments (the state, the batch)
                "xla_temp_gb": round(analysis.temp_size_in_bytes / 2**30, 3),
                "xla_argument_gb": round(analysis.argument_size_in_bytes / 2**30, 3),
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
