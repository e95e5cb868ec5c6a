"""Shared test fixtures: where the golden data lives and how to skip without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEST_DATA = REPO / "tests" / "data"

# Under pytest-xdist (scripts/test.sh) each worker gets its own persistent XLA cache: JAX writes a cache
# entry in place, so a worker could read another's half-written program.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("CLTDR_XLA_CACHE"):
    os.environ["CLTDR_XLA_CACHE"] = str(Path(os.environ["CLTDR_XLA_CACHE"]) / os.environ["PYTEST_XDIST_WORKER"])


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout (present in CI and for developers, absent in users' clones)."""
    if not (SHARED / "fixtures").is_dir():
        pytest.skip("needs ../shared (golden fixtures and real annotations), absent in this checkout")
    return SHARED


@pytest.fixture
def without_torch(monkeypatch):
    """`import torch` fails inside the test, installed or not: the code paths of a plain install (torch is an
    optional extra; CI installs it, so both paths run there)."""
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.fixture(scope="session")
def thumos_small() -> Path:
    """The `thumos_small` model fixture: the full one in ../shared, else the slimmed copy in tests/data."""
    full = SHARED / "fixtures" / "thumos_small"
    return full if (full / "config.yaml").is_file() else TEST_DATA / "thumos_small"


# A model small enough to compile and train in seconds: 3 pyramid levels, 16 channels, T = 320.
TINY_OVERRIDES = [
    "dataset.max_seq_len=320",
    "model.backbone_arch=[2,1,2]",
    "model.regression_range=[[0,4],[4,8],[8,10000]]",
    "model.embd_dim=16",
    "model.fpn_dim=16",
    "model.head_dim=16",
    "model.sgp_mlp_dim=32",
    "model.num_bins=4",
    "loader.batch_size=4",
    "opt.warmup_epochs=1",
    "opt.epochs=2",
    "opt.learning_rate=0.001",
    "trainer.log_every_steps=1",
]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A synthetic THUMOS-like dataset (16 videos of at most 40 s, 16-d features); returns its config."""
    from cltdr_jax.synth import synthesize

    out = tmp_path_factory.mktemp("tiny_synth")
    return synthesize("thumos14", out, feature_dim=16, num_videos=16, seed=3, max_duration=40.0)
