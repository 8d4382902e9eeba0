"""The one error type readers raise for a file they cannot decode."""

from __future__ import annotations

from pathlib import Path


class ReaderError(Exception):
    """A recording file could not be read: missing, not the expected format, truncated, corrupt, unsupported.

    ``str(error)`` names the file and what is wrong. ``kind`` is a short machine-readable reason:
    ``"not_found"``, ``"unreadable"``, ``"not_edf"``, ``"truncated"``, ``"corrupt"`` or ``"unsupported"``.
    """

    def __init__(self, path: str | Path, message: str, *, kind: str = "corrupt") -> None:
        self.path = Path(path)
        self.reason = message
        self.kind = kind
        super().__init__(f"{path}: {message}")

    def __reduce__(self):  # keep pickling (multiprocessing) working with the keyword argument
        return (_rebuild, (str(self.path), self.reason, self.kind))


def _rebuild(path: str, message: str, kind: str) -> ReaderError:
    return ReaderError(path, message, kind=kind)
