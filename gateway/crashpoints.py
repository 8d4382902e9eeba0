"""Named crash points for the chaos test: ``PSG_CRASHPOINT=NAME`` (or ``NAME@N``, the N-th time) makes
the process kill itself with SIGKILL when it reaches that point, exactly as ``kill -9`` or a power cut
would at that moment.

Without the variable, :func:`crashpoint` is one comparison with ``None``. The points sit at every
boundary where a crash leaves different committed state behind (see ``POINTS``); the chaos test
(``tests/test_chaos.py``) visits each one, restarts the daemon and checks that nothing was lost or sent
without a record.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["POINTS", "crashpoint"]

POINTS = (
    "receive.file",  # a dropped file is in the spool, not yet registered
    "receive.dicom",  # a DICOM instance is in the spool, not yet registered (no C-STORE response sent)
    "dicom.stored",  # an instance is registered, its C-STORE response not yet sent
    "claim",  # a worker has a study's lease
    "decoded",  # DECODED committed
    "mapped",  # MAPPED committed
    "outputs",  # some output files written, INFERRED not committed
    "inferred",  # INFERRED committed
    "queued",  # QUEUED and its message committed, the input not yet moved to processed/
    "delivery.recorded",  # the attempt is recorded, no byte sent yet
    "delivery.sent",  # the message is written to the EHR's socket, its ACK not read
    "delivery.acked",  # the ACK is read, not yet committed
)


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"PSG_CRASHPOINT: unknown point {name!r} (known: {', '.join(POINTS)})")
    return name, int(nth or 1)


_target = _parse(os.environ.get("PSG_CRASHPOINT"))
_hits = 0
_lock = threading.Lock()


def crashpoint(name: str) -> None:
    """SIGKILL this process when ``PSG_CRASHPOINT`` names this point (on its N-th visit)."""
    global _hits
    if _target is None or _target[0] != name:
        return
    with _lock:
        _hits += 1
        if _hits == _target[1]:
            os.kill(os.getpid(), signal.SIGKILL)
