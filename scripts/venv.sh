# Sourced by demo.sh and test.sh: creates the virtual environment on first use (./.venv, or $CLTDR_VENV)
# and sets VENV to it. Python >= 3.11 ($PYTHON, default python3).
VENV="${CLTDR_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
