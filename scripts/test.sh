#!/usr/bin/env bash
# Sets up a virtual environment on first use (./.venv, or $CLTDR_VENV), installs the package with its test
# dependencies, and runs the whole test suite. Extra arguments go to pytest (e.g. -k parity, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CLTDR_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
exec "$VENV/bin/python" -m pytest -q "$@"
