#!/usr/bin/env bash
# Sets up a virtual environment on first use, installs the package with its test dependencies, and runs the
# whole test suite. Extra arguments go to pytest (e.g. -k parity, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$VENV/bin/python" -m pip install -q -e ".[dev]"
exec "$VENV/bin/python" -m pytest -q "$@"
