"""The one error type readers raise for a file they cannot decode."""

from __future__ import annotations

from pathlib import Path


class ReaderError(Exception):
    """A recording file could not be read: missing, not the expected format, truncated, corrupt, unsupported.

    ``str(error)`` names the file and what is wrong. ``kind`` is a short machine-readable reason:
    ``"not_found"``, ``"unreadable"``, ``"not_edf"``, ``"truncated"``, ``"corrupt"`` or ``"unsupported"``.
    An operating-system error becomes one through :func:`os_error`, whichever reader meets it.
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


def os_error(path: str | Path, exc: OSError, doing: str = "cannot read the file") -> ReaderError:
    """The one mapping of an operating-system error to a :class:`ReaderError`, the same in every reader.

    A missing file is ``not_found``; a folder where a file was expected, a permission problem or any
    other I/O error is ``unreadable``, described by ``doing`` and the system's words (``strerror``,
    never ``str(exc)``, which quotes the path: a file name can hold a patient's name or MRN).
    """
    if isinstance(exc, FileNotFoundError):
        return ReaderError(path, "file not found", kind="not_found")
    if isinstance(exc, IsADirectoryError):
        return ReaderError(path, "is a folder, not a file", kind="unreadable")
    if isinstance(exc, PermissionError):
        return ReaderError(path, f"{doing}: permission denied", kind="unreadable")
    return ReaderError(path, f"{doing}: {exc.strerror or type(exc).__name__}", kind="unreadable")
