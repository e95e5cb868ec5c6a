"""What machine a benchmark ran on, recorded in every benchmark's JSON (figures differ by machine kind).

The CPU model and the instruction sets that decide the bfloat16 paths (AMX on Intel Xeons, AVX-512 BF16 on
AMD Zen 4), from /proc/cpuinfo; `platform.processor()` where there is none.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""

    def field(name: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(name)), "")

    model = field("model name")
    return {
        "cpu": model or platform.processor() or platform.machine(),
        # Where the model name is only "AMD EPYC": family 25 model 1 is Zen 3 (Milan), 17 Zen 4 (Genoa).
        "cpu_family_model": f"{field('cpu family')}/{field('model')}",
        "avx512f": "avx512f" in cpuinfo,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "amx": "amx_bf16" in cpuinfo,
        "avx512_bf16": "avx512_bf16" in cpuinfo,
    }


def matmul_roof_gflops(dtype: str, n: int = 2048, repeats: int = 7) -> dict:
    """The matmul roof for `dtype`: GFLOP/s of an n^3 `jnp.dot` (float32 output), median of `repeats`, the
    fastest of XLA's own dot and YNNPACK's (on the CPU, jaxlib 0.10 has both: XLA's is the faster in float32,
    YNNPACK's in bfloat16, where XLA's converts to float32). Returns the rate and which dot gave it."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp

    from cltdr_jax.xla_options import NO_YNNPACK, YNNPACK_DOTS

    choices = {"xla": NO_YNNPACK, "ynnpack": YNNPACK_DOTS}
    if jax.default_backend() != "cpu":
        choices = {"default": None}
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    rates = {}
    for name, options in choices.items():
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32), compiler_options=options)
        f(a, a).block_until_ready()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            times.append(time.perf_counter() - t)
        rates[name] = 2 * n**3 / statistics.median(times) / 1e9
    best = max(rates, key=rates.get)
    return {"gflops": round(rates[best], 1), "dot": best, "all_gflops": {k: round(v, 1) for k, v in rates.items()}}
