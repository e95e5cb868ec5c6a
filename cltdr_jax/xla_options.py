"""Compiler options for the programs we compile (`jax.jit(..., compiler_options=xla_options.compiler_options())`).

On the CPU, XLA (jaxlib 0.10) hands dots, reductions and elementwise chains to YNNPACK fusions by default. For
this model in float32 that costs memory and time: with them off, the THUMOS train step (batch 2 x 2304) needs
1.19 GB of XLA temporaries instead of 1.95 (peak RSS 2.8 GB instead of 3.5) and ran 2-20 % faster over the
day's runs (AMD EPYC Zen 4, 2026-12-03; scripts/results/xla_options_ab_2026-12-03_epyc.json, README); the
inference network and the demo's small train step did not change measurably. In bfloat16 the dots are the
exception: XLA's own dot has no bfloat16 kernel (it converts both operands to float32 and multiplies at the
float32 rate, or below), YNNPACK's uses the CPU's bfloat16 units (AVX-512 BF16: 1.4-1.7x the float32 rate);
so a low-precision program keeps YNNPACK for its dots only (the THUMOS bfloat16 train step: 4.25 s instead
of 6.0 s, 1.05 GB of temporaries instead of 1.97 with every YNNPACK fusion; AMD EPYC Zen 4, 2026-12-06).
Measure again with `scripts/benchmark_train.py --variants float32,float32+xla-defaults`. A user's own
XLA_FLAGS setting of the option wins, CLTDR_XLA_DEFAULTS=1 keeps all of XLA's defaults, and on other backends
nothing is set.

A CPU without bfloat16 arithmetic (no AVX-512 BF16, AMX or Arm BF16) emulates it: there the bfloat16 THUMOS
train step took 1.4x the float32 one (AMD EPYC Zen 3, 2026-12-07, side by side: 12.1 against 8.7 s), so a
low-precision program on such a CPU logs one warning.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import jax

from cltdr_jax.model.layers import is_low_precision

YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
NO_YNNPACK = {YNN_FUSIONS: ""}  # "": no YNNPACK fusions; XLA's own dots and loops (float32 on the CPU)
# Low precision: YNNPACK's dots (both kinds: a dot alone, and a dot with what XLA fuses into it), nothing else.
YNNPACK_DOTS = {YNN_FUSIONS: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
DEFAULTS_ENV = "CLTDR_XLA_DEFAULTS"
# /proc/cpuinfo flags of native bfloat16 arithmetic: AVX-512 BF16 and AMX (x86), FEAT_BF16 (Arm's "Features").
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

log = logging.getLogger(__name__)


def compiler_options(backend: str | None = None, compute_dtype: Any = None) -> dict[str, Any] | None:
    """The options for a program computing in `compute_dtype` (None: float32) on `backend` (default: JAX's
    default backend), or None where we keep XLA's defaults."""
    if (backend or jax.default_backend()) != "cpu":
        return None
    low_precision = compute_dtype is not None and is_low_precision(compute_dtype)
    if low_precision:
        _warn_if_bfloat16_is_emulated()
    if os.environ.get(DEFAULTS_ENV) == "1":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    chosen = YNNPACK_DOTS if low_precision else NO_YNNPACK
    options = {k: v for k, v in chosen.items() if f"--{k}" not in flags}
    return options or None


def cpu_has_bfloat16_arithmetic(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bfloat16 natively, from the flags in `cpuinfo` (default: /proc/cpuinfo);
    None where there are no flags to read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & set(BFLOAT16_CPU_FLAGS)) if flags else None


@functools.cache  # once per process: /proc/cpuinfo read once, at most one warning
def _warn_if_bfloat16_is_emulated() -> None:
    if cpu_has_bfloat16_arithmetic() is not False:  # has the units, or cannot tell
        return
    log.warning(
        "this CPU has no bfloat16 arithmetic (no AVX-512 BF16, AMX or Arm BF16 in /proc/cpuinfo): bfloat16 "
        "compute is emulated here and slower than float32 (measured 1.4x the float32 train step); "
        "use float32 on this machine"
    )
