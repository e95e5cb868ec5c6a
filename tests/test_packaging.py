"""Packaging: what pyproject.toml declares matches what the package imports and ships.

The wheel itself is built, installed into a fresh virtual environment and run (`cltdr demo --quick` from a
folder outside the checkout) by scripts/check_wheel.sh, which the last test here runs (slow, so in CI).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Import names whose distribution is named otherwise.
DISTRIBUTIONS = {
    "absl": {"absl-py"},
    "yaml": {"pyyaml"},
    "orbax": {"orbax-checkpoint"},
    "cv2": {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"},
    "tensorboardX": {"tensorboardx"},
}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files of cltdr_jax importing it, for every import outside the stdlib."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "cltdr_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "cltdr_jax":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_import_is_a_declared_dependency():
    project = PYPROJECT["project"]
    core = {_name(r) for r in project["dependencies"]}
    optional = {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    missing = {
        module: sorted(files)
        for module, files in _third_party_imports().items()
        if not (DISTRIBUTIONS.get(module, {module.lower()}) & (core | optional))
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    # What a plain `pip install cltdr-jax` must bring: every command, the demo's plots included.
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain", "absl-py", "numpy", "pyyaml", "matplotlib"} <= core


def test_lower_bounds_are_the_tested_versions():
    """Every core dependency has a lower bound no newer than what this suite runs with."""
    from importlib.metadata import version

    for requirement in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.strip())
        assert m, f"{requirement!r}: expected name>=version"
        installed = tuple(int(x) for x in re.findall(r"\d+", version(m[1]))[:3])
        bound = tuple(int(x) for x in m[2].split("."))
        assert bound <= installed, f"{requirement}: the tests run with {version(m[1])}"


def test_every_subpackage_is_listed():
    """pyproject lists the packages (configs/ is mapped into the package): a new subpackage must be added."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "cltdr_jax").rglob("*")
        if p.suffix in (".py", ".json") and "__pycache__" not in p.parts
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"cltdr_jax.configs": "configs"}
    assert "*.yaml" in PYPROJECT["tool"]["setuptools"]["package-data"]["cltdr_jax.configs"]


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_checkout():
    """scripts/check_wheel.sh: wheel -> fresh venv (no extras) -> `cltdr configs`, `demo --quick`, `predict`."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the script builds from the files git would commit)")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_wheel.sh")],
        env={**os.environ, "PYTHON": _base_python()},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ran configs, demo --quick and predict" in proc.stdout


def _base_python() -> str:
    """The interpreter the test venv was made from (a venv made from a venv's python works too)."""
    return getattr(sys, "_base_executable", None) or sys.executable
