"""Real protocol peers for tests: DCMTK tools (skip without them unless PSG_REQUIRE_DCMTK=1), free ports."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

# DCMTK peers stall at ~22 instances/s without TCP_NODELAY (Nagle against delayed ACKs).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool; skip without it, or fail under ``PSG_REQUIRE_DCMTK=1``."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("PSG_REQUIRE_DCMTK", "") not in ("", "0", "false", "no"):
            pytest.fail(f"PSG_REQUIRE_DCMTK=1 but DCMTK's {tool} is not installed (Debian package dcmtk)")
        pytest.skip(f"DCMTK's {tool} is not installed (Debian package dcmtk)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
