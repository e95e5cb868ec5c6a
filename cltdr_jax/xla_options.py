"""Compiler options for the programs we compile (`jax.jit(..., compiler_options=xla_options.compiler_options())`).

On the CPU, XLA (jaxlib 0.10) hands dots, reductions and elementwise chains to YNNPACK fusions by default. For
this model that costs memory and time: with them off, the THUMOS train step (batch 2 x 2304) needs 1.19 GB of
XLA temporaries instead of 1.95 (peak RSS 2.8 GB instead of 3.5) and ran 2-20 % faster in float32 and in
bfloat16 over the day's runs (AMD EPYC Zen 4, 2026-12-03; scripts/results/xla_options_ab_2026-12-03_epyc.json,
README); the inference network and the demo's small train step did not change measurably. Measure again
with `scripts/benchmark_train.py --variants float32,float32+xla-defaults`. A user's own XLA_FLAGS setting of
the option wins, CLTDR_XLA_DEFAULTS=1 keeps all of XLA's defaults, and on other backends nothing is set.
"""

from __future__ import annotations

import os
from typing import Any

import jax

_CPU = {"xla_cpu_experimental_ynn_fusion_type": ""}  # "": no YNNPACK fusions; XLA's own dots and loops
DEFAULTS_ENV = "CLTDR_XLA_DEFAULTS"


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """The options for `backend` (default: JAX's default backend), or None where we keep XLA's defaults."""
    if os.environ.get(DEFAULTS_ENV) == "1" or (backend or jax.default_backend()) != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in _CPU.items() if f"--{k}" not in flags}
    return options or None
