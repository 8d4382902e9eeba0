"""What every source is to the daemon, and the one way into the store it hands arrivals to.

Like a Mirth source connector, a source has one lifecycle (``start``, ``poll``, ``stop``) and one way
in: it never writes to the database or moves a study itself, it hands what arrived to the
:class:`Intake` it was built with (``file_claimed`` for a whole recording claimed from a drop folder,
``instance_received`` for one DICOM instance). The daemon keeps a list of sources and treats them
alike: it starts them, polls them on the scan interval, asks them for their health and stops them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .dicom.receiver import ReceivedInstance
    from .dropfolder import ClaimedFile

__all__ = ["Intake", "Source"]


class Intake(Protocol):
    """Where sources hand what arrived: the store decides duplicates, versions and the next state."""

    def known_input(self, path: Path) -> bool:
        """True: a spooled file is already registered (a claim recovered after a crash is not re-registered)."""
        ...

    def file_claimed(self, claim: ClaimedFile) -> bool:
        """Register a recording claimed from a drop folder. False: not registered (the database is
        unreachable); the claim stays in the spool and the source offers it again on a later poll."""
        ...

    def known_instance(self, sop_instance_uid: str) -> bool:
        """True: this DICOM instance is already stored (not written again, answered Success)."""
        ...

    def instance_received(self, instance: ReceivedInstance) -> None:
        """Record one received DICOM instance; raising makes the receiver remove it and answer 0xA700."""
        ...

    def promote_stable(self, stable_age_seconds: float) -> int:
        """Mark ready the DICOM studies that received nothing for ``stable_age_seconds``; how many."""
        ...


@runtime_checkable
class Source(Protocol):
    """A source of studies: a drop folder watcher or the DICOM receiver."""

    name: str

    def start(self) -> None:
        """Begin accepting (listen, recover what a previous run left); raises OSError when it cannot."""
        ...

    def poll(self) -> int:
        """The periodic work (scan the folders, promote stable studies): how many studies it handed over."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting; what was accepted is in the intake or is offered again on the next start."""
        ...

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` shows for this source (no PHI: counts, ports, reasons)."""
        ...
