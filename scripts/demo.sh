#!/usr/bin/env bash
# The main job on a fresh machine: creates a virtual environment (./.venv, or $CLTDR_VENV), installs
# cltdr-jax, then synthesises a THUMOS14-like dataset, trains, evaluates and plots (`cltdr demo`, about
# 4-8 minutes on 2 CPU cores). Extra arguments go to `cltdr demo` (e.g. --workdir DIR, --seed N).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CLTDR_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q -e ".[plot]"
exec "$VENV/bin/cltdr" demo "$@"
