"""Real protocol peers for tests: DCMTK tools (skip without them unless PSG_REQUIRE_DCMTK=1), pynetdicom as a
C-STORE sender, free ports."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

# DCMTK peers stall at ~22 instances/s without TCP_NODELAY (Nagle against delayed ACKs).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def required(env: str) -> bool:
    """Whether ``.ci/run`` (or the caller) requires a peer: ``env`` set to anything but empty/0/false/no."""
    return os.environ.get(env, "") not in ("", "0", "false", "no")


def system_tool(*names: str, env: str, package: str) -> str:
    """Path of the first of ``names`` on PATH, a tool from Debian's ``package`` (``make peers`` installs it);
    skip without it, or fail when ``env`` requires it."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    message = f"{names[0]} is not installed (Debian package {package}; make peers installs it)"
    if required(env):
        pytest.fail(f"{env}=1 but {message}")
    pytest.skip(message)


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool; skip without it, or fail under ``PSG_REQUIRE_DCMTK=1``."""
    return system_tool(tool, env="PSG_REQUIRE_DCMTK", package="dcmtk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_with_pynetdicom(port: int, files: Sequence[Path], called_ae: str = "PSGGATEWAY") -> list[int]:
    """Send ``files`` in one association from pynetdicom (AE title PYNETDICOM); the C-STORE statuses."""
    from pydicom import dcmread
    from pynetdicom import AE

    ae = AE(ae_title="PYNETDICOM")
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()
