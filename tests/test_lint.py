"""``make lint`` as a test, so CI enforces it: ruff over the code, the tests and the benchmarks with the
project's settings (pyproject.toml), including D417 (a numpydoc Parameters section names every
parameter of the public inference API)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--no-cache", "gateway", "inference", "tests", "bench"],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
