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
