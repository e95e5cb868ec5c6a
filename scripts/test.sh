#!/usr/bin/env bash
# Sets up a virtual environment on first use, installs the package with its test dependencies, and runs the
# whole test suite (after ruff's lint and format checks). Extra arguments go to pytest (e.g. -k parity, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/ruff" check cltdr_jax tests scripts
"$VENV/bin/ruff" format --check cltdr_jax tests scripts
exec "$VENV/bin/python" -m pytest -q "$@"
