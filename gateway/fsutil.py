"""File-system helpers shared by the sources, the pipeline, the outputs and the CLI: durable atomic
writes, durable folders and folder fsyncs, and the permissions of what the gateway keeps at rest.

"Durable" here means what a committed database state may depend on: the file's bytes are fsynced before
the rename, and the folder holding the new name is fsynced after it, so that after a power cut a state
that says INFERRED or FAILED never points at an empty or missing ``hazards.csv`` or ``REASON.txt``.

"Private" means what the gateway writes is readable by its own user only (files 0600, folders 0700), or
also by one configured group (``service.group``: files 0640, folders 0750, group-owned by it), whatever
umask the launcher left (``make run`` and the Dockerfile leave 022). The daemon and every CLI command
call :func:`set_private_mode` at start; the helpers here use :func:`private_file_mode` and
:func:`private_dir_mode` explicitly, so a file written before (or without) that call is private too.
"""

from __future__ import annotations

import grp
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_with",
    "durable_mkdir",
    "fsync_dir",
    "fsync_file",
    "launcher_umask",
    "make_private",
    "open_private",
    "private_dir_mode",
    "private_file_mode",
    "private_mkdir",
    "resolve_group",
    "set_private_mode",
    "shared_gid",
    "tighten_tree",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The umask before the first set_private_mode still in effect (None: none is): what a file that is not
# the gateway's data (a montage table an admin creates) gets, as any ordinary file would.
_launcher_umask: int | None = None
# The gid of service.group while one is configured, else None (files 0600, folders 0700).
_shared_gid: int | None = None


def resolve_group(group: str | int | None) -> int | None:
    """The gid of ``service.group`` (a group name, or a gid as a number or digits); None for no group.

    Raises ``ValueError`` for a name the system does not know, or a group this process cannot give its
    files (it is not a member, and not root): the daemon would fail on its first chown otherwise.
    """
    if group is None or group == "":
        return None
    if isinstance(group, int) or str(group).isdigit():
        gid = int(group)
    else:
        try:
            gid = grp.getgrnam(str(group)).gr_gid
        except KeyError:
            raise ValueError(f"service.group: no group named {group!r} on this system") from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ValueError(f"service.group: this process (uid {os.geteuid()}) is not a member of group {group} "
                         f"(gid {gid}), so it cannot give its files that group")
    return gid


def set_private_mode(group: str | int | None = None) -> Callable[[], None]:
    """Make everything this process creates from now on private: umask 0077, or 0027 with a group
    (``service.group``, resolved by :func:`resolve_group`), and the modes the helpers here give.

    Returns a function that puts the previous umask and modes back (the CLI calls it when a command
    ends, so a command run in-process, as the tests do, leaves the caller's umask alone).
    """
    global _shared_gid, _launcher_umask
    gid = resolve_group(group)
    previous_gid, previous_launcher = _shared_gid, _launcher_umask
    previous_mask = os.umask(0o027 if gid is not None else 0o077)
    _shared_gid = gid
    if _launcher_umask is None:
        _launcher_umask = previous_mask

    def restore() -> None:
        global _shared_gid, _launcher_umask
        os.umask(previous_mask)
        _shared_gid, _launcher_umask = previous_gid, previous_launcher

    return restore


def shared_gid() -> int | None:
    """The gid of the configured ``service.group``, or None."""
    return _shared_gid


def private_file_mode() -> int:
    """0600, or 0640 with a ``service.group``: what every file the gateway keeps gets."""
    return 0o640 if _shared_gid is not None else 0o600


def private_dir_mode() -> int:
    """0700, or 0750 with a ``service.group``: what every folder the gateway creates gets."""
    return 0o750 if _shared_gid is not None else 0o700


def launcher_umask() -> int:
    """The umask the process started with, before :func:`set_private_mode` (for files that are not PHI,
    like a site's montage table, which other users, the daemon's among them, must be able to read)."""
    return _current_umask() if _launcher_umask is None else _launcher_umask


def make_private(path: Path | int, *, is_dir: bool = False, st: os.stat_result | None = None) -> bool:
    """Give ``path`` (or an open file descriptor) the private mode and, with a group, that group.

    Folders keep a set-group-id bit an admin set. Returns True when something changed.
    """
    st = st or (os.fstat(path) if isinstance(path, int) else os.stat(path))
    want = (private_dir_mode() | (st.st_mode & stat.S_ISGID)) if is_dir else private_file_mode()
    changed = False
    gid = _shared_gid
    if gid is not None and st.st_gid != gid:
        # chown before chmod: chown clears set-id bits, and the mode is right only once the group is.
        if isinstance(path, int):
            os.fchown(path, -1, gid)
        else:
            os.chown(path, -1, gid)
        changed = True
    if stat.S_IMODE(st.st_mode) != want:
        if isinstance(path, int):
            os.fchmod(path, want)
        else:
            os.chmod(path, want)
        changed = True
    return changed


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """``os.open`` a file created with the private mode (and group), whatever the umask; returns the fd."""
    fd = os.open(path, flags, private_file_mode())
    try:
        make_private(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_mkdir(path: Path) -> None:
    """``mkdir -p`` whose new folders are private (mode and group set explicitly, not left to the umask);
    folders that already exist are left as they are."""
    path = Path(path)
    for folder in _missing_folders(path):
        try:
            folder.mkdir(mode=private_dir_mode())
        except FileExistsError:  # created meanwhile by another thread or process: theirs to set
            continue
        make_private(folder, is_dir=True)
    path.mkdir(exist_ok=True)  # a file in the way raises FileExistsError naming it, as mkdir -p fails


def tighten_tree(roots: Iterable[Path], exclude: Iterable[Path] = ()) -> tuple[int, int]:
    """Give every folder and file under ``roots`` that this process owns the private mode (and group).

    For data an older version left 0644 in 0755 folders. Symbolic links are neither followed nor changed;
    folders in ``exclude`` (drop folders inside the var folder: the site's) are skipped with their
    contents. Returns (entries changed, entries skipped because another user owns them).
    """
    skip = {os.path.abspath(p) for p in exclude}
    uid = os.geteuid()
    changed = foreign = 0
    seen: set[str] = set()

    def fix(path: str, st: os.stat_result, is_dir: bool) -> None:
        nonlocal changed, foreign
        if uid != 0 and st.st_uid != uid:
            foreign += 1
            return
        try:
            changed += make_private(path, is_dir=is_dir, st=st)
        except OSError:
            foreign += 1

    for root in roots:
        top = os.path.abspath(root)
        if top in seen or top in skip:
            continue
        try:
            st = os.stat(top)
        except OSError:  # missing, or under a file (a bad database path: the engine reports it)
            continue
        if not stat.S_ISDIR(st.st_mode):  # a single file (the SQLite database outside the var folder)
            seen.add(top)
            fix(top, st, False)
            continue
        stack = [(top, st)]
        while stack:
            folder, fst = stack.pop()
            if folder in seen:
                continue
            seen.add(folder)
            fix(folder, fst, True)
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if entry.path in skip or entry.is_symlink():
                    continue
                try:
                    est = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(est.st_mode):
                    stack.append((entry.path, est))
                elif stat.S_ISREG(est.st_mode):
                    fix(entry.path, est, False)
    return changed, foreign


def atomic_write(path: Path, data: bytes, *, mode: int | None = None, keep_mode: bool = False) -> None:
    """Write ``data`` to ``path`` durably, so that a reader (or a crash) sees the old file or the new one,
    never a part: temporary file, fsync, rename, folder fsync. ``mode``: the new file's permissions
    (default: the private mode, 0600 or 0640 with a ``service.group``, whatever the umask).

    ``keep_mode``: when ``path`` exists, the new file gets its permissions (an admin's edited file stays
    as they set it); ``mode`` then applies only to a file that does not exist yet. The owner is not kept:
    the new file is this process's, as with any rename-into-place.
    """
    if keep_mode:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if mode is None:
            make_private(fd)
        else:
            os.fchmod(fd, mode)
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
        make_private(Path(tmp))  # the writer may have re-created the file under the umask
        fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent, best_effort=True)


def durable_mkdir(path: Path) -> None:
    """``mkdir -p`` whose new entries are private and survive a power cut (each created folder's parent
    is fsynced)."""
    missing = _missing_folders(Path(path))
    private_mkdir(Path(path))
    for created in missing:
        fsync_dir(created.parent, best_effort=True)


def _missing_folders(path: Path) -> list[Path]:
    """The folders ``mkdir -p path`` would create, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    return missing[::-1]


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
