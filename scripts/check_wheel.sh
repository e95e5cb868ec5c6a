#!/usr/bin/env bash
# The package as users install it: builds the wheel, installs it (not editable, no extras) into a fresh
# virtual environment and, from a folder outside the checkout, runs what a new user runs first:
# `cltdr configs`, `cltdr demo --quick`, then `cltdr predict` on the demo's training workdir.
# Run by the test suite (tests/test_packaging.py, marked slow) and so by CI; pip's cache keeps it to minutes.
#
#   ./scripts/check_wheel.sh            # PYTHON=python3.12 ./scripts/check_wheel.sh for another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cltdr_wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Build from a copy of the files git would commit: setuptools writes build/ and *.egg-info into the tree.
mkdir "$WORK/src" "$WORK/run"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check wheel
"$VPY" -m pip wheel -q --disable-pip-version-check --no-deps "$WORK/src" -w "$WORK/dist"
"$VPY" -m pip install -q --disable-pip-version-check "$WORK"/dist/cltdr_jax-*.whl
echo "check_wheel: installed $(ls "$WORK"/dist)"

cd "$WORK/run"
"$VPY" - <<'EOF'
import cltdr_jax, cltdr_jax.config as c
assert "site-packages" in cltdr_jax.__file__, cltdr_jax.__file__
names = [b.name for b in c.bundled_configs() if b.reference]
assert len(names) == 11 and "site-packages" in str(c.bundled_config_dir()), (names, c.bundled_config_dir())
EOF
listing=$("$WORK/venv/bin/cltdr" configs)
grep -q "thumos_i3d_focalloss" <<<"$listing"
"$WORK/venv/bin/cltdr" demo --quick --workdir demo
test -s demo/train/training_curves.png && test -s demo/train/metrics.json
ls demo/timeline_*.png > /dev/null
# The train -> predict handoff: the training workdir and the config it wrote.
"$WORK/venv/bin/cltdr" predict demo/train/config.yaml demo/train --out detections.json
test -s detections.json
echo "check_wheel: the installed wheel ran configs, demo --quick and predict from $WORK/run"
