#!/usr/bin/env bash
# The GPU benchmark: one command, one JSON (scripts/benchmark_device.py), made to finish within 8 minutes on one H100 / H200
# (its compilations dominate; it has not run on a GPU yet).
#
#   ./scripts/benchmark_gpu.sh [--out gpu.json]          # needs the CUDA build of jax: pip install -U "jax[cuda12]"
#   ./scripts/benchmark_gpu.sh --small                   # the same measures, smaller: runs on a CPU too
#
# With torch (CUDA) installed and REF_DIR pointing at a checkout of the reference (see
# ../shared/tools/reference/setup.sh), the reference's train step and inference are timed on the same card.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$PY" -c "import jax; print('jax', jax.__version__, 'on', jax.devices()[0].device_kind, file=__import__('sys').stderr)"
exec "$PY" scripts/benchmark_device.py "$@"
