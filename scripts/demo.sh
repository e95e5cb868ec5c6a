#!/usr/bin/env bash
# The main job on a fresh machine: sets up a virtual environment, installs cltdr-jax, then synthesises a
# THUMOS14-like dataset, trains, evaluates and plots (`cltdr demo`, about 5-8 minutes on 2 CPU cores).
# Extra arguments go to `cltdr demo` (e.g. --workdir DIR, --seed N).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$VENV/bin/python" -m pip install -q -e ".[plot]"
exec "$VENV/bin/cltdr" demo "$@"
