"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _reference_required() -> bool:
    return os.environ.get("PSG_REQUIRE_REFERENCE", "") not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference``; skips when absent, fails instead under PSG_REQUIRE_REFERENCE=1."""
    if not REFERENCE_DIR.is_dir():
        if _reference_required():
            pytest.fail(f"PSG_REQUIRE_REFERENCE=1 but {REFERENCE_DIR} is missing")
        pytest.skip(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR
