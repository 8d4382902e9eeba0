"""Small file-system helpers shared by the sources, the pipeline and the outputs: atomic writes and
folder fsyncs (a rename is durable only once its folder is synced)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_with", "fsync_dir"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the permissions an ordinary open() would give (mkstemp's are 0600).
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Like :func:`atomic_write` for a writer that wants a file name (pyarrow's Parquet and CSV writers):
    ``write(tmp)`` on a temporary name beside ``path``, then a rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path, *, best_effort: bool = False) -> None:
    """Sync a folder's entries to disk; ``best_effort`` swallows the OSError (a file system without it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not best_effort:
            raise
