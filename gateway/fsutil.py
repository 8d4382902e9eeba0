"""File-system helpers shared by the sources, the pipeline, the outputs and the CLI: durable atomic
writes, durable folders and folder fsyncs.

"Durable" here means what a committed database state may depend on: the file's bytes are fsynced before
the rename, and the folder holding the new name is fsynced after it, so that after a power cut a state
that says INFERRED or FAILED never points at an empty or missing ``hazards.csv`` or ``REASON.txt``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_with", "durable_mkdir", "fsync_dir", "fsync_file"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the permissions an ordinary open() would give (mkstemp's are 0600).
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` durably, so that a reader (or a crash) sees the old file or the new one,
    never a part: temporary file, fsync, rename, folder fsync. ``mode``: the new file's permissions
    (default: what open() would give under the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent, best_effort=True)


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Like :func:`atomic_write` for a writer that wants a file name (pyarrow's Parquet and CSV writers):
    ``write(tmp)`` on a temporary name beside ``path``, fsync, rename over ``path``, folder fsync."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)
        fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent, best_effort=True)


def durable_mkdir(path: Path) -> None:
    """``mkdir -p`` whose new entries survive a power cut (each created folder's parent is fsynced)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent, best_effort=True)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
