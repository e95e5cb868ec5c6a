#!/usr/bin/env bash
# Sets up a virtual environment on first use, installs the package with its test dependencies, and runs the
# whole test suite (after ruff's lint and format checks). Extra arguments go to pytest (e.g. -k parity, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# The torch extra, so that its paths (torch.load / torch.save of checkpoints, .pt features, the pickle opt-in,
# and torch reading the files we write without it) are tested too; the torch-free paths are tested with
# torch hidden. A CPU build: $CLTDR_TORCH_WHEEL, else the CPU wheel of the machine's local wheel folder, else
# PyPI's (a much larger download). CLTDR_NO_TORCH=1 skips it (those tests then skip and say why).
if [ -z "${CLTDR_NO_TORCH:-}" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  torch_wheel="${CLTDR_TORCH_WHEEL:-$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)}"
  "$VENV/bin/python" -m pip install -q "${torch_wheel:-torch>=2.13}"
fi
"$VENV/bin/ruff" check cltdr_jax tests scripts
"$VENV/bin/ruff" format --check cltdr_jax tests scripts
# Two worker processes, one test file each at a time (a file's session fixtures are built once): most of a
# test's time is XLA compiling, one thread per program, so two at once use both cores. CLTDR_TEST_WORKERS=0
# (xdist's -n 0) runs in this process; a -n given on the command line wins.
exec "$VENV/bin/python" -m pytest -q -n "${CLTDR_TEST_WORKERS:-2}" --dist loadfile "$@"
