"""Shared test fixtures: where the golden data lives and how to skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEST_DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout (present in CI and for developers, absent in users' clones)."""
    if not (SHARED / "fixtures").is_dir():
        pytest.skip("needs ../shared (golden fixtures and real annotations), absent in this checkout")
    return SHARED


@pytest.fixture(scope="session")
def thumos_small() -> Path:
    """The `thumos_small` model fixture: the full one in ../shared, else the slimmed copy in tests/data."""
    full = SHARED / "fixtures" / "thumos_small"
    return full if (full / "config.yaml").is_file() else TEST_DATA / "thumos_small"
