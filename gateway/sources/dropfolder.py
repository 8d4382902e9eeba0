"""The drop-folder source: polls folders (local disks, NFS/SMB shares) and claims finished recordings.

Each :meth:`DropFolderWatcher.scan` is one polling pass over every configured folder. A file is taken
("claimed") only when it is *stable*:

* its size and modification time (``st_mtime_ns``) have not changed for at least ``stable_seconds``,
  measured with the injected clock from the first sighting (any change restarts the timer), and
* for an EDF/BDF file, its size is at least what the header says: header bytes + number of data
  records x the bytes of one record (2 bytes a sample for EDF, 3 for BDF). A header with ``-1`` data
  records (never closed) relies on the time alone; trailing bytes after the records are fine.

A file shorter than its header says (or without its first 256 bytes) is still being copied and waits;
one that stays short and unchanged for ``incomplete_grace_seconds`` is claimed all the same, so the
pipeline quarantines it with the reader's error instead of the folder stalling on it. A file that is
not EDF/BDF at all is claimed after the stable time (the reader rejects it later with a clear reason).
Only the few fixed header fields are read, and only once the file has been still for the stable time.

A sidecar ``<file>.json`` or ``<stem>.json`` (see :func:`gateway.pipeline.identifiers.find_sidecar`) is claimed
together with its recording, once it is stable itself (the recording waits for it).

A claim moves the files into their own folder ``<spool_dir>/incoming/<claim_id>/``: ``claim.json``
(the manifest) is written and synced first, then the recording and its sidecars are renamed in
(``os.rename``; a copy, sync and unlink when the spool is on another filesystem, or when another user
owns the file, so that the spooled copy is ours to make private), then the folder is synced. A claimed
file is never seen again. After a crash between the claim and its registration in the database,
:func:`recover_claims` rebuilds the claims from their manifests.

File names can hold a patient's name or MRN, so nothing the gateway creates is named after the original:
the recording becomes ``<claim_id><ext>`` (``ext``: ``.edf``, ``.bdf``, ``.rec``, ``.dcm``, ``.dicom``,
lower-cased, else ``.dat``; the readers go by content), and its sidecars follow it so that
:func:`~gateway.pipeline.identifiers.find_sidecar` still finds them: ``<file>.json`` becomes
``<claim_id><ext>.json`` and ``<stem>.json`` becomes ``<claim_id>.json``. The original path is in the
manifest only until the study is registered (recovery needs it before: the name goes into the
database's ``input_name``, which the file-name pattern reads, and an interrupted cross-filesystem move
is finished by removing the original); :func:`forget_original` then drops it. Claimed files are private
(:func:`gateway.fsutil.private_file_mode`).

Logs carry a claim id or a short hash of the path (``file_key``), never a file name (it can hold an MRN).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DropFolderConfig
from ..fsutil import fsync_dir, make_private, open_private, private_dir_mode, private_mkdir
from ..logging import get_logger
from ..metrics import Metrics
from ..spool import MANIFEST_NAME, MANIFEST_VERSION, forget_original, spool_name, write_manifest

if TYPE_CHECKING:
    from .base import Intake

__all__ = ["ClaimedFile", "DropFolderSource", "DropFolderWatcher", "recover_claims"]

log = get_logger(__name__)

INCOMING = "incoming"
_MANIFEST_TMP = f".{MANIFEST_NAME}."  # atomic_write's temporary names beside the manifest
_COPY_SUFFIX = ".copying"  # hidden temporary name of a cross-filesystem copy: .<name>.copying
_CHUNK = 1024 * 1024
_SKIP_SUFFIXES = (".part", ".tmp", "~", ".crdownload")
_EDF_VERSION = b"0       "
_BDF_VERSION = b"\xffBIOSEMI"
_MAX_SIGNALS = 4096
_INT = re.compile(r"^[+-]?\d+(\.0*)?$")
_RETRY_FIRST_S = 30.0  # after a failed claim (permission denied), retry after this, doubling
_RETRY_MAX_S = 3600.0

# The one rename that moves files; a module-level indirection so tests can simulate EXDEV.
_rename = os.rename


@dataclass(frozen=True)
class ClaimedFile:
    source: str  # DropFolderConfig.source of the folder it came from
    original_path: Path  # where it was found (its name goes to the database's input_name)
    spool_path: Path  # the claimed recording: <spool_dir>/incoming/<claim_id>/<claim_id><ext>
    sidecars: tuple[Path, ...]  # claimed sidecar files, in the same claim folder
    sha256: str  # of the recording's bytes, computed after the claim
    size: int
    claim_id: str
    filename_pattern: str | None  # the folder's DropFolderConfig.filename_pattern


# ---- helpers ---------------------------------------------------------------------------------------------------


def _file_key(path: Path) -> str:
    """A short, stable key for a path, for logs (never the name itself)."""
    return hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _new_claim_id() -> str:
    """A time-ordered, random UUID (version 7 layout) as 32 hex digits."""
    ms = time.time_ns() // 1_000_000
    value = ((ms & ((1 << 48) - 1)) << 80) | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value).hex


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _irregular_sidecar(recording: Path) -> str | None:
    """Why the recording must wait: a sidecar name beside it that is not a regular file (a symbolic link,
    a folder, a pipe). Claimed without it, the study would go out under the header's identifiers."""
    for name in dict.fromkeys((recording.name + ".json", recording.stem + ".json")):
        if name == recording.name:
            continue
        try:
            st = os.stat(recording.with_name(name), follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            return "sidecar is a symbolic link"
        if not stat.S_ISREG(st.st_mode):
            return "sidecar is not a regular file"
    return None


def _sidecar_target(recording: Path, sidecar: Path, new_recording: str) -> str:
    """The new name of ``sidecar`` for ``recording`` renamed to ``new_recording``, such that
    find_sidecar(new) finds it as it found the original: ``<file>.json`` first, ``<stem>.json`` second."""
    if sidecar.name == recording.name + ".json":
        return new_recording + ".json"
    return Path(new_recording).stem + ".json"


def _original_sidecar(original: Path, recording: str, sidecar: str) -> Path:
    """Where a claimed sidecar came from (the inverse of :func:`_sidecar_target`)."""
    if sidecar == recording + ".json":
        return original.with_name(original.name + ".json")
    if sidecar == Path(recording).stem + ".json":
        return original.with_name(original.stem + ".json")
    return original.with_name(sidecar)


def _header_int(raw: bytes) -> int | None:
    text = raw.replace(b"\x00", b" ").decode("latin-1").strip()
    if not _INT.match(text):
        return None
    return int(float(text)) if "." in text else int(text)


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


# The header verdicts.
_COMPLETE = "complete"  # size agrees with the header (or more)
_SHORT = "short"  # fewer bytes than the header says, or not even the 256-byte fixed header
_TIME_ONLY = "time_only"  # not EDF/BDF, unparsable counts, or -1 data records: the stable time decides


def _header_verdict(path: Path, size: int) -> tuple[str, int | None]:
    """Whether the file's size agrees with its EDF/BDF header; reads the fixed header and one column."""
    if size < 256:
        return _SHORT, 256
    with open(path, "rb") as fh:
        fixed = fh.read(256)
        if len(fixed) < 256:
            return _SHORT, 256
        if not fixed.startswith((_EDF_VERSION, _BDF_VERSION)):
            return _TIME_ONLY, None
        n_signals = _header_int(fixed[252:256])
        if n_signals is None or not 0 <= n_signals <= _MAX_SIGNALS:
            return _TIME_ONLY, None
        header_bytes = 256 * (n_signals + 1)
        if size < header_bytes:
            return _SHORT, header_bytes
        n_records = _header_int(fixed[236:244])
        if n_records is None or n_records < 0:  # -1: never closed, the size cannot be checked
            return _TIME_ONLY, None
        # The "number of samples in each data record" column: after 216 bytes of other fields per signal.
        fh.seek(256 + n_signals * 216)
        column = fh.read(8 * n_signals)
    if len(column) < 8 * n_signals:
        return _SHORT, header_bytes
    samples = 0
    for i in range(n_signals):
        value = _header_int(column[8 * i: 8 * i + 8])
        if value is None or value < 0:
            return _TIME_ONLY, None
        samples += value
    bytes_per_sample = 3 if fixed.startswith(_BDF_VERSION) else 2
    expected = header_bytes + n_records * samples * bytes_per_sample
    return (_COMPLETE if size >= expected else _SHORT), expected


def _ignored_name(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(_SKIP_SUFFIXES)


class _Changed(Exception):
    """The source file changed while it was being copied."""


@dataclass
class _Track:
    stamp: tuple[int, int]
    since: float  # clock reading when this stamp was first seen
    folder: int = -1
    verdict: tuple[str, int | None] | None = None  # header verdict for this stamp
    retry_at: float = float("-inf")
    failures: int = 0


@dataclass
class _Move:
    src: Path
    dst: Path
    copied: bool  # True: a cross-filesystem copy, the original still exists until the commit


# ---- the watcher -----------------------------------------------------------------------------------------------


class DropFolderWatcher:
    """Polls drop folders and claims stable recordings into ``<spool_dir>/incoming/<claim_id>/``.

    ``exclude`` lists folders never scanned even when they lie inside a watched folder (processed and
    quarantine folders); the spool folder is always excluded. ``known(spool_path)`` says whether a claim
    is registered in the database: each scan drops the original path from the manifests of this
    watcher's registered claims (:func:`forget_original`). Not thread-safe: one scanner at a time.
    """

    def __init__(self, folders: list[DropFolderConfig], spool_dir: Path, *,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None,
                 incomplete_grace_seconds: float = 3600.0, exclude: Iterable[Path] = (),
                 known: Callable[[Path], bool] | None = None) -> None:
        self._folders = list(folders)
        self._spool_dir = Path(spool_dir)
        self._incoming = self._spool_dir / INCOMING
        self._clock = clock
        self._metrics = metrics
        self._grace = float(incomplete_grace_seconds)
        self._exclude = tuple({_real(Path(p)) for p in (*exclude, self._spool_dir)})
        self._patterns = [[p.lower() for p in f.patterns] for f in self._folders]
        self._tracks: dict[Path, _Track] = {}
        self._sidecar_tracks: dict[Path, _Track] = {}
        # Originals copied to the spool that could not be unlinked: ignored while unchanged.
        self._leftovers: dict[Path, tuple[int, int]] = {}
        # Recordings not claimed because a sidecar is not a regular file (reason per recording): their
        # identifiers are unknown, and the header's must not stand in for them silently.
        self.held: dict[Path, str] = {}
        self._unavailable: set[int] = set()
        self._known = known
        # Claims whose manifest still names the original: forgotten once the database has the claim.
        self._unregistered: list[Path] = []

    @property
    def pending(self) -> int:
        """Files seen but not yet claimed (waiting to become stable, or to be retried)."""
        return len(self._tracks)

    # -- one pass --

    def scan(self) -> list[ClaimedFile]:
        """One polling pass over all folders; claims (and returns) the files that are stable."""
        self._forget_registered()
        now = self._clock()
        seen: set[Path] = set()
        listed: set[int] = set()
        candidates: list[tuple[int, Path, os.stat_result]] = []
        for index, folder in enumerate(self._folders):
            files = self._list(index, folder)
            if files is None:
                continue
            listed.add(index)
            for path, st in files:
                if path not in seen:  # nested watched folders: the first one wins
                    seen.add(path)
                    candidates.append((index, path, st))

        claimed: list[ClaimedFile] = []
        sidecars_seen: set[Path] = set()
        for index, path, st in candidates:
            result = self._consider(index, path, st, now, sidecars_seen)
            if result is not None:
                claimed.append(result)
        done = {c.original_path for c in claimed}
        self._tracks = {p: t for p, t in self._tracks.items()
                        if (p in seen and p not in done) or t.folder not in listed}
        self._sidecar_tracks = {p: t for p, t in self._sidecar_tracks.items() if p in sidecars_seen}
        self._leftovers = {p: s for p, s in self._leftovers.items() if p in seen}
        self.held = {p: r for p, r in self.held.items() if p in seen}
        if self._known is not None:
            self._unregistered.extend(c.spool_path for c in claimed)
        if self._metrics is not None:
            self._metrics.last_scan.set(time.time())
        return claimed

    def _forget_registered(self) -> None:
        """Drop the original path from the manifests of the claims the database has registered since the
        last scan (the caller registers what scan() returns; a failed registration keeps it for recovery)."""
        waiting: list[Path] = []
        for spool_path in self._unregistered:
            if not spool_path.parent.is_dir():  # already moved on to processed/ (forgotten there)
                continue
            try:
                registered = self._known is not None and self._known(spool_path)
                if registered:
                    forget_original(spool_path.parent)
            except Exception as exc:  # noqa: BLE001 - the database or the disk: try again next scan
                log.warning("dropfolder.forget_failed", claim_id=spool_path.parent.name, error=type(exc).__name__)
                registered = False
            if not registered:
                waiting.append(spool_path)
        self._unregistered = waiting

    def _list(self, index: int, folder: DropFolderConfig) -> list[tuple[Path, os.stat_result]] | None:
        root = Path(folder.path)
        real_root = _real(root)
        if self._excluded(real_root):
            return []
        try:
            files = list(self._walk(root, real_root, folder.recursive, self._patterns[index], top=True))
        except OSError as exc:
            if index not in self._unavailable:
                log.warning("dropfolder.folder_unavailable", source=folder.source,
                            reason=exc.strerror or type(exc).__name__)
                self._unavailable.add(index)
            return None
        if index in self._unavailable:
            log.info("dropfolder.folder_available", source=folder.source)
            self._unavailable.discard(index)
        return files

    def _walk(self, folder: Path, real: Path, recursive: bool, patterns: list[str],
              top: bool = False) -> Iterator[tuple[Path, os.stat_result]]:
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            if top:
                raise
            log.debug("dropfolder.subfolder_unreadable", file_key=_file_key(folder))
            return
        subfolders = []
        for entry in entries:
            name = entry.name
            if _ignored_name(name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        subfolders.append(entry)
                    continue
                if not entry.is_file(follow_symlinks=False):  # symlinks, sockets, ...: never moved
                    continue
                lower = name.lower()
                if not any(fnmatch.fnmatchcase(lower, p) for p in patterns):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished between listing and stat
            yield Path(entry.path), st
        for entry in subfolders:
            sub_real = real / entry.name
            if self._excluded(sub_real):
                continue
            yield from self._walk(Path(entry.path), sub_real, recursive, patterns)

    def _excluded(self, real: Path) -> bool:
        return any(real == ex or real.is_relative_to(ex) for ex in self._exclude)

    # -- one file --

    def _consider(self, index: int, path: Path, st: os.stat_result, now: float,
                  sidecars_seen: set[Path]) -> ClaimedFile | None:
        stamp = _stamp(st)
        if self._leftovers.get(path) == stamp:
            return None
        folder = self._folders[index]
        irregular = _irregular_sidecar(path)
        if irregular is not None:
            if self.held.get(path) != irregular:  # once per file and reason, not at every scan
                log.warning("dropfolder.held", file_key=_file_key(path), source=folder.source, reason=irregular)
            self.held[path] = irregular
            self._tracks.pop(path, None)
            return None
        if self.held.pop(path, None) is not None:
            log.info("dropfolder.released", file_key=_file_key(path), source=folder.source)
        track = self._tracks.get(path)
        if track is None or track.stamp != stamp:
            track = _Track(stamp=stamp, since=now, folder=index)
            self._tracks[path] = track
        sidecars = self._sidecar_state(path, now, folder.stable_seconds, sidecars_seen)
        key = _file_key(path)
        elapsed = now - track.since
        if now < track.retry_at:
            return None
        if elapsed < folder.stable_seconds:
            log.debug("dropfolder.waiting", file_key=key, source=folder.source, reason="changing",
                      size=stamp[0], still_seconds=round(elapsed, 3))
            return None
        if track.verdict is None:
            try:
                track.verdict = _header_verdict(path, stamp[0])
            except FileNotFoundError:
                log.info("dropfolder.claim_failed", file_key=key, source=folder.source, reason="vanished")
                self._tracks.pop(path, None)
                return None
            except OSError as exc:
                self._failed(track, now, key, folder, exc)
                return None
        verdict, expected = track.verdict
        incomplete = verdict == _SHORT
        if incomplete and elapsed < self._grace:
            log.debug("dropfolder.waiting", file_key=key, source=folder.source, reason="incomplete",
                      size=stamp[0], expected=expected, still_seconds=round(elapsed, 3))
            return None
        if sidecars is None:
            log.debug("dropfolder.waiting", file_key=key, source=folder.source, reason="sidecar_changing")
            return None
        if incomplete:
            log.warning("dropfolder.incomplete", file_key=key, source=folder.source, size=stamp[0],
                        expected=expected, still_seconds=round(elapsed, 3))
        return self._claim(index, path, stamp, sidecars, track, now, key)

    def _sidecar_state(self, path: Path, now: float, stable_seconds: float,
                       sidecars_seen: set[Path]) -> list[Path] | None:
        """The recording's sidecars when all are stable ([] when none); None while one is changing."""
        names = dict.fromkeys((path.name + ".json", path.stem + ".json"))
        found: list[Path] = []
        settled = True
        for name in names:
            if name == path.name:
                continue
            candidate = path.with_name(name)
            try:
                st = os.stat(candidate, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            sidecars_seen.add(candidate)
            stamp = _stamp(st)
            track = self._sidecar_tracks.get(candidate)
            if track is None or track.stamp != stamp:
                track = _Track(stamp=stamp, since=now)
                self._sidecar_tracks[candidate] = track
            if now - track.since < stable_seconds:
                settled = False
            found.append(candidate)
        return found if settled else None

    def _failed(self, track: _Track, now: float, key: str, folder: DropFolderConfig, exc: OSError) -> None:
        track.failures += 1
        track.retry_at = now + min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** (track.failures - 1))
        reason = "permission_denied" if isinstance(exc, PermissionError) else \
            f"os_error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
        log.warning("dropfolder.claim_failed", file_key=key, source=folder.source, reason=reason,
                    failures=track.failures)
        if self._metrics is not None:
            self._metrics.dropfolder_files.labels(result="failed").inc()

    # -- the claim --

    def _new_claim_folder(self) -> tuple[str, Path]:
        private_mkdir(self._incoming)
        while True:
            claim_id = _new_claim_id()
            folder = self._incoming / claim_id
            try:
                folder.mkdir(mode=private_dir_mode())
            except FileExistsError:
                continue
            make_private(folder, is_dir=True)  # the group, and a mode the umask did not narrow
            fsync_dir(self._incoming, best_effort=True)
            return claim_id, folder

    def _claim(self, index: int, path: Path, stamp: tuple[int, int], sidecars: list[Path], track: _Track,
               now: float, key: str) -> ClaimedFile | None:
        folder = self._folders[index]
        try:
            claim_id, claim_dir = self._new_claim_folder()
        except OSError as exc:  # the spool itself: nothing about this file
            log.error("dropfolder.claim_failed", file_key=key, source=folder.source, reason="spool_unwritable",
                      error=exc.strerror or type(exc).__name__)
            if self._metrics is not None:
                self._metrics.dropfolder_files.labels(result="failed").inc()
            track.retry_at = now + _RETRY_FIRST_S
            return None
        recording = spool_name(path.name, claim_id)
        targets = {s: _sidecar_target(path, s, recording) for s in sidecars}
        manifest = {
            "version": MANIFEST_VERSION,
            "claim_id": claim_id,
            "source": folder.source,
            # Until the study is registered only: recovery needs the name (input_name) and the original
            # (an interrupted copy is finished by removing it); forget_original() drops it.
            "original_path": str(path),
            "recording": recording,
            "sidecars": list(targets.values()),
            "claimed_at": datetime.now(UTC).isoformat(),
            "filename_pattern": folder.filename_pattern,
        }
        moves: list[_Move] = []
        try:
            write_manifest(claim_dir, manifest)
            moves.append(_move(path, claim_dir / recording, stamp))
            kept: list[str] = []
            for sidecar, target in targets.items():
                try:
                    moves.append(_move(sidecar, claim_dir / target, None))
                    kept.append(target)
                except FileNotFoundError:  # deleted meanwhile: nothing left to claim
                    log.info("dropfolder.sidecar_vanished", claim_id=claim_id)
            if len(kept) != len(sidecars):
                manifest["sidecars"] = kept
                write_manifest(claim_dir, manifest)
        except FileNotFoundError:
            _rollback(moves, claim_dir)
            log.info("dropfolder.claim_failed", file_key=key, source=folder.source, reason="vanished")
            self._tracks.pop(path, None)
            return None
        except _Changed:
            _rollback(moves, claim_dir)
            log.debug("dropfolder.waiting", file_key=key, source=folder.source, reason="changed_while_copying")
            self._tracks.pop(path, None)
            return None
        except OSError as exc:
            _rollback(moves, claim_dir)
            self._failed(track, now, key, folder, exc)
            return None

        # Commit: the copies are durable, remove their originals (a move).
        for move in moves:
            if move.copied:
                try:
                    os.unlink(move.src)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("dropfolder.original_not_removed", claim_id=claim_id,
                                reason=exc.strerror or type(exc).__name__)
                    if move.src == path:
                        self._leftovers[path] = stamp
        fsync_dir(claim_dir, best_effort=True)
        fsync_dir(path.parent, best_effort=True)

        spool_path = claim_dir / recording
        try:
            sha, size = _hash_file(spool_path)
        except OSError as exc:  # the claim stands; recover_claims picks it up at the next start
            log.error("dropfolder.hash_failed", claim_id=claim_id, reason=exc.strerror or type(exc).__name__)
            return None
        if self._metrics is not None:
            self._metrics.dropfolder_files.labels(result="claimed").inc()
        log.info("dropfolder.claimed", claim_id=claim_id, source=folder.source, size=size,
                 sidecars=len(manifest["sidecars"]), file_key=key,
                 incomplete=track.verdict is not None and track.verdict[0] == _SHORT)
        return ClaimedFile(
            source=folder.source, original_path=path, spool_path=spool_path,
            sidecars=tuple(claim_dir / name for name in manifest["sidecars"]), sha256=sha, size=size,
            claim_id=claim_id, filename_pattern=folder.filename_pattern,
        )


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _owned(path: Path) -> bool:
    """Whether this process may chmod ``path`` (it owns it, or it is root)."""
    uid = os.geteuid()
    return uid == 0 or os.stat(path, follow_symlinks=False).st_uid == uid


def _move(src: Path, dst: Path, stamp: tuple[int, int] | None) -> _Move:
    """Rename ``src`` to ``dst`` and make it private; across filesystems, or when another user owns
    ``src`` (its mode could not be changed), copy to a private temporary name, sync and rename.

    The original of a copy is left in place (the caller unlinks it once every file of the claim is in).
    ``stamp``: the size and mtime the source must still have after a copy, else :class:`_Changed`.
    """
    if _owned(src):
        try:
            _rename(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        else:
            try:
                make_private(dst)  # it keeps the drop folder's mode (0644 under umask 022) otherwise
            except OSError:
                _rename(dst, src)
                raise
            return _Move(src, dst, copied=False)
    tmp = dst.with_name("." + dst.name + _COPY_SUFFIX)
    try:
        with open(src, "rb") as fin, os.fdopen(open_private(tmp), "wb") as fout:
            before = os.fstat(fin.fileno())
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
            after = os.fstat(fin.fileno())
        if _stamp(before) != _stamp(after) or (stamp is not None and _stamp(after) != stamp):
            raise _Changed
        try:
            os.utime(tmp, ns=(after.st_atime_ns, after.st_mtime_ns))
        except OSError:
            pass
        _rename(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _Move(src, dst, copied=True)


def _rollback(moves: list[_Move], claim_dir: Path) -> None:
    """Undo a partial claim: renamed files go back, copies are deleted, the claim folder is removed."""
    for move in reversed(moves):
        try:
            if move.copied:
                move.dst.unlink(missing_ok=True)
            else:
                _rename(move.dst, move.src)
        except OSError as exc:
            log.error("dropfolder.rollback_failed", claim_id=claim_dir.name,
                      reason=exc.strerror or type(exc).__name__)
            return  # leave the claim folder (and its manifest) for recover_claims
    _remove_claim_leftovers(claim_dir)


def _remove_claim_leftovers(claim_dir: Path) -> bool:
    """Remove a claim folder holding no data (only its manifest or temporaries); True when removed."""
    try:
        for entry in claim_dir.iterdir():
            if entry.name == MANIFEST_NAME or entry.name.startswith(_MANIFEST_TMP) or (
                    entry.name.startswith(".") and entry.name.endswith(_COPY_SUFFIX)):
                entry.unlink(missing_ok=True)
        claim_dir.rmdir()
    except OSError:
        return False
    return True


# ---- crash recovery --------------------------------------------------------------------------------------------


def recover_claims(spool_dir: Path, known: Callable[[Path], bool]) -> list[ClaimedFile]:
    """The claims under ``<spool_dir>/incoming`` whose recording ``known(path)`` says is not registered.

    Run at start-up, before the first scan. Claim folders holding no recording (a crash before the
    recording was moved in: its original is still in the drop folder) are removed when nothing else is
    in them. A recording copied across filesystems whose identical original is still in the drop
    folder (a crash before the unlink) has that original removed, finishing the move.
    """
    incoming = Path(spool_dir) / INCOMING
    try:
        folders = sorted(p for p in incoming.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    claims: list[ClaimedFile] = []
    for claim_dir in folders:
        claim_id = claim_dir.name
        try:
            manifest = json.loads((claim_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
            recording = manifest["recording"]
            sidecar_names = list(manifest.get("sidecars") or [])
            if not isinstance(recording, str) or Path(recording).name != recording or not all(
                    isinstance(n, str) and Path(n).name == n for n in sidecar_names):
                raise ValueError("bad file names")
        except FileNotFoundError:
            if not _remove_claim_leftovers(claim_dir):
                log.warning("dropfolder.claim_orphaned", claim_id=claim_id, reason="no manifest")
            continue
        except (OSError, ValueError, KeyError, TypeError):
            log.error("dropfolder.claim_unreadable", claim_id=claim_id)
            continue
        spool_path = claim_dir / recording
        if not spool_path.is_file():
            if not _remove_claim_leftovers(claim_dir):
                log.warning("dropfolder.claim_orphaned", claim_id=claim_id, reason="no recording")
            continue
        if known(spool_path):
            # Registered before a crash that came before forget_original: the database has the name now.
            try:
                forget_original(claim_dir)
            except OSError as exc:
                log.warning("dropfolder.forget_failed", claim_id=claim_id, error=exc.strerror)
            continue
        for entry in claim_dir.iterdir():  # an interrupted copy of a sidecar
            if entry.name.startswith(".") and entry.name.endswith(_COPY_SUFFIX):
                entry.unlink(missing_ok=True)
        try:
            sha, size = _hash_file(spool_path)
        except OSError as exc:
            log.error("dropfolder.hash_failed", claim_id=claim_id, reason=exc.strerror or type(exc).__name__)
            continue
        sidecars = tuple(claim_dir / n for n in sidecar_names if (claim_dir / n).is_file())
        if manifest.get("original_path"):
            original = Path(manifest["original_path"])
            _finish_copy(original, spool_path, sha, claim_id)
            for sidecar in sidecars:
                _finish_copy(_original_sidecar(original, recording, sidecar.name), sidecar, None, claim_id)
        else:  # forgotten, yet not registered (the study row was deleted): the name is gone for good
            log.warning("dropfolder.original_unknown", claim_id=claim_id)
            original = spool_path
        log.info("dropfolder.recovered", claim_id=claim_id, size=size)
        claims.append(ClaimedFile(
            source=str(manifest.get("source") or ""), original_path=original, spool_path=spool_path,
            sidecars=sidecars, sha256=sha, size=size, claim_id=claim_id,
            filename_pattern=manifest.get("filename_pattern"),
        ))
    return claims


def _finish_copy(original: Path, claimed: Path, sha: str | None, claim_id: str) -> None:
    """Unlink ``original`` when it is byte-identical to ``claimed`` (a copy-move cut short by a crash)."""
    try:
        if not original.is_file() or original.stat().st_size != claimed.stat().st_size:
            return
        if _hash_file(original)[0] != (sha or _hash_file(claimed)[0]):
            return
        original.unlink()
        log.info("dropfolder.original_removed", claim_id=claim_id)
    except OSError:
        return


class DropFolderSource:
    """The drop folders as a :class:`~gateway.sources.base.Source`: each poll scans them and hands every
    claimed recording to the intake; a claim the intake could not register stays in the spool and is
    offered again (``recover_claims``) on the next poll, as claims a crash left are on ``start``."""

    name = "drop_folders"

    def __init__(self, folders: list[DropFolderConfig], spool_dir: Path, intake: Intake, *,
                 metrics: Metrics | None = None, exclude: Iterable[Path] = ()) -> None:
        self.intake = intake
        self._spool_dir = Path(spool_dir)
        # Registered claims forget the original name (the watcher asks the intake which are registered).
        self.watcher = DropFolderWatcher(folders, spool_dir, metrics=metrics, exclude=exclude,
                                         known=intake.known_input)
        self._recover = False

    def start(self) -> None:
        """Register the claims a previous run left in the spool unregistered (a crash after the claim)."""
        recovered = self._hand_over(recover_claims(self._spool_dir, self.intake.known_input))
        if recovered:
            log.info("dropfolder.claims_recovered", claims=recovered)

    def poll(self) -> int:
        claimed = self.watcher.scan()
        if self._recover:
            self._recover = False
            claimed += recover_claims(self._spool_dir, self.intake.known_input)
        return self._hand_over(claimed)

    def _hand_over(self, claimed: list[ClaimedFile]) -> int:
        n = 0
        for claim in claimed:
            if self.intake.file_claimed(claim):
                n += 1
            else:
                self._recover = True
        return n

    def stop(self, timeout: float = 10.0) -> None:
        """Nothing runs between polls: a claim in progress finishes inside ``poll``."""

    def health(self) -> dict[str, Any]:
        held = self.watcher.held
        problems = []
        if held:  # file names may hold PHI: the count and the reasons only
            problems.append(f"drop folders: {len(held)} file(s) held, not claimed: "
                            f"{'; '.join(sorted(set(held.values())))} (fix or remove the sidecar)")
        return {"pending_files": self.watcher.pending, "held_files": len(held), "problems": problems}
