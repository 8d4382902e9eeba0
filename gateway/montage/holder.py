"""The montage table the daemon serves: loaded at start, re-read when the site's file changes.

A table file that stops loading (a broken edit, a deleted file) leaves the last good table in use;
the holder then says why, so /healthz reports the daemon as degraded until the file loads again.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..logging import get_logger
from .table import MontageError, MontageTable, default_table

__all__ = ["MontageFailure", "MontageHolder"]

log = get_logger("psg.montage")

# The folders of an absolute path in a message ("/etc/psg/site.yaml" -> "site.yaml").
_FOLDERS = re.compile(r"(?<![\w.~])/(?:[^/\s'\",:;()]+/)+")


@dataclass(frozen=True)
class MontageFailure:
    """Why the site's table file does not load now; the holder keeps serving ``kept_version`` meanwhile."""

    reason: str  # the loader's message with file names only (no folders): it is shown on /healthz
    since: datetime  # the first failed check of this failure (UTC)
    file_hash: str  # sha256 (12 hex) of the file's bytes, or "unreadable" when it cannot be read
    kept_version: str

    def describe(self) -> str:
        """The one-line problem /healthz lists."""
        return (f"montage table on disk does not load: {self.reason}; serving version {self.kept_version} "
                f"(failing since {self.since.isoformat(timespec='seconds')})")


class MontageHolder:
    """The montage table in use; ``check()`` re-reads the site's file and swaps in a changed table.

    A table file that stops loading (a broken edit, a deleted file) leaves the last good table in use;
    ``failure`` then says why, so /healthz can report the daemon as degraded until the file loads again.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.table = self._load()  # a table that does not load at start is the caller's start failure
        self._lock = threading.Lock()
        self.failure: MontageFailure | None = None
        # (file hash, reason) of the failure last logged: a failing file is logged once per change, not
        # at every check (every montage.reload_check_seconds).
        self._logged: tuple[str, str] | None = None

    def _load(self) -> MontageTable:
        return MontageTable.load(self.path) if self.path else default_table()

    def _file_hash(self) -> str:
        assert self.path is not None
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        except OSError:
            return "unreadable"

    def _reason(self, exc: Exception) -> str:
        """The load error on one line, without folders (a table's folder is the site's; keep /healthz free of
        paths) and without the loader's ``montage table`` prefix (the problem text says it)."""
        text = str(exc) if isinstance(exc, MontageError) else f"{type(exc).__name__}: {exc}"
        # Keep the last part of any absolute path (the table and the tables it extends, named by file).
        text = _FOLDERS.sub("", text).removeprefix("montage table ")
        return " ".join(text.split())[:500]

    def check(self) -> bool:
        """Reload when the table's content changed; a broken edit keeps the old table (and says so)."""
        if self.path is None:
            return False
        try:
            fresh = self._load()
        except Exception as exc:  # noqa: BLE001 - any load failure keeps serving the previous table
            self._failed(exc)
            return False
        failure, self.failure, self._logged = self.failure, None, None
        if failure is not None:
            log.info("montage.recovered", montage=fresh.name, version=fresh.version,
                     failing_since=failure.since.isoformat())
        with self._lock:
            if fresh.version == self.table.version:
                return False
            old, self.table = self.table, fresh
        log.info("montage.reloaded", montage=fresh.name, version=fresh.version, previous=old.version)
        return True

    def _failed(self, exc: Exception) -> None:
        reason, file_hash = self._reason(exc), self._file_hash()
        previous = self.failure
        # "since" is when the table stopped loading, not when the latest broken edit was saved.
        since = previous.since if previous is not None else datetime.now(UTC)
        self.failure = MontageFailure(reason, since, file_hash, self.table.version)
        if self._logged != (file_hash, reason):
            self._logged = (file_hash, reason)
            log.error("montage.reload_failed", table=str(self.path), error=reason, file_hash=file_hash,
                      kept_version=self.table.version)
