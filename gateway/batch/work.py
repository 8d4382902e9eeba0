"""What a batch's worker processes (or Ray's CPU tasks) do: hash a file, decode + map + preprocess a study.

A prepared 8-hour night is ~250 MB of float32 signals. Sent back through a pipe it would be pickled,
copied and unpickled in the process that runs the engine; instead a local worker writes the arrays
to a spill file (on ``/dev/shm`` where there is room) and the engine's process maps them read-only:
one copy, made by the worker, while the engine keeps computing. Ray's object store does the same for
its tasks, so there the arrays travel inline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.quality import QualityThresholds

from ..montage.table import MontageTable
from ..pipeline.steps import ReadyStudy, decode_and_prepare

__all__ = [
    "FileHash",
    "PrepareJob",
    "Prepared",
    "WorkFailure",
    "attach_scoring",
    "choose_spill_dir",
    "discard",
    "hash_file",
    "init_worker",
    "load",
    "prepare",
    "scoring_form",
]

_table: MontageTable | None = None
_spill_dir: Path | None = None


def init_worker(table: MontageTable, spill_dir: str | None, parent: int | None = None) -> None:
    """Process initializer: one thread per worker (the workers are the parallelism), the site's table."""
    global _table, _spill_dir
    from inference.preprocess import set_default_workers

    set_default_workers(1)
    # Ctrl-C reaches the whole process group: the runner stops the batch in order, the workers must
    # not die under it mid-study.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent or os.getppid())
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency; workers do not need it
        pass
    _table = table
    _spill_dir = Path(spill_dir) if spill_dir else None


def _exit_with_parent(parent: int, interval_s: float = 1.0) -> None:
    """A worker must not outlive its batch (kill -9, out of memory): it would hold its memory for ever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="psg-parent-watch", daemon=True).start()


@dataclass(frozen=True)
class FileHash:
    sha256: str
    size: int
    mtime_ns: int
    seconds: float


def hash_file(path: str) -> FileHash:
    """SHA-256 of the file's content with the size and mtime it had when read (the cache's key)."""
    t0 = time.perf_counter()
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return FileHash(digest.hexdigest(), st.st_size, st.st_mtime_ns, time.perf_counter() - t0)


@dataclass(frozen=True)
class PrepareJob:
    study_id: int
    key: str  # the study key: the only name a spill file or a log line carries
    paths: tuple[str, ...]
    filename_pattern: str | None
    source: str
    quality: QualityThresholds | None = None  # the signal-quality gate's thresholds (None: the defaults)
    scoring: str | None = None  # a scoring file found beside the recording (NSRR/Profusion XML)


SPILL_SUFFIX = ".signals"
OLD_SPILL_SUFFIXES = (".f32",)  # float32 spill files of earlier versions, removed like ours


@dataclass(frozen=True)
class SpillRef:
    path: str
    layout: tuple[tuple[str, int, int, int, str], ...]  # (modality, rows, columns, byte offset, dtype)


@dataclass
class Prepared:
    """A worker's ready study, as it travels back to the runner: the job it answers, and the signals
    either inside ``ready`` or spilled to a shared-memory file (``spill``) to keep them out of the pipe."""

    job: PrepareJob
    ready: ReadyStudy
    spill: SpillRef | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkFailure:
    """A study's CPU part failed: the reason as the pipeline classifies it (no paths, no identifiers).
    Returned, not raised, so that no exception type has to survive pickling between processes."""

    job: PrepareJob
    reason: str
    transient: bool


def prepare(job: PrepareJob, table: MontageTable | None = None,
            spill_dir: str | None = None) -> Prepared | WorkFailure:
    """Decode, map and preprocess one study; a failure comes back classified."""
    from ..pipeline.errors import classify

    try:
        return _prepare(job, table, spill_dir)
    except Exception as exc:  # noqa: BLE001 - every failure is the study's, recorded by the runner
        err = classify(exc)
        return WorkFailure(job, str(err), err.transient)


def _prepare(job: PrepareJob, table: MontageTable | None, spill_dir: str | None) -> Prepared:
    table = table or _table
    if table is None:
        raise RuntimeError("worker not initialised with a montage table")
    t0 = time.perf_counter()
    ready = decode_and_prepare([Path(p) for p in job.paths], job.filename_pattern, table, job.key, job.source,
                               quality=job.quality)
    if job.scoring:
        attach_scoring(ready, Path(job.scoring))
    where = Path(spill_dir) if spill_dir else _spill_dir
    spill = _spill(ready, where, job.key) if where is not None else None
    return Prepared(job, ready, spill, {"worker_s": round(time.perf_counter() - t0, 3)})


def attach_scoring(ready: ReadyStudy, path: Path) -> None:
    """Read the scoring file beside the recording into ``ready.scoring``; one that cannot be read is a
    warning of the recording (the study goes on, scored by its own annotations if it has any). The file
    is named by its form only (``X-nsrr.xml``): an archive's file names may hold a patient's name."""
    from ..scoring_files import ScoringFileError, read_scoring

    form = scoring_form(path)
    try:
        ready.scoring = read_scoring(path)
        ready.scoring_name = form
    except ScoringFileError as exc:
        reason = str(exc).replace(str(path), form)
        ready.recording.warnings.append(f"scoring file not used: {reason}")
    except Exception as exc:  # noqa: BLE001 - a scoring file must never fail its study
        ready.recording.warnings.append(f"scoring file not used: {form}: {type(exc).__name__}")


def scoring_form(path: Path) -> str:
    """``X-nsrr.xml``, ``X-profusion.xml``, ``X.edf.xml`` or ``X.xml``: how a scoring file is named
    beside its recording ``X.edf``, without the recording's own name."""
    from ..readers import EDF_SUFFIXES

    name = path.name.lower()
    for suffix in ("-nsrr.xml", "-profusion.xml", *(f"{s}.xml" for s in EDF_SUFFIXES), ".xml"):
        if name.endswith(suffix):
            return "X" + path.name[len(path.name) - len(suffix):]
    return "scoring file"


def _spill(ready: ReadyStudy, folder: Path, key: str) -> SpillRef:
    signals = ready.engine_input.signals
    path = folder / f"{key}.{os.getpid()}{SPILL_SUFFIX}"
    layout = []
    offset = 0
    with open(path, "wb") as fh:
        for modality, arr in signals.items():
            arr = np.ascontiguousarray(arr)  # float16, as prepared (inference.preprocess.STORED_DTYPE)
            fh.write(memoryview(arr).cast("B"))
            layout.append((modality, int(arr.shape[0]), int(arr.shape[1]), offset, arr.dtype.str))
            offset += arr.nbytes
    ready.engine_input.signals = {}
    return SpillRef(str(path), tuple(layout))


def load(prepared: Prepared) -> ReadyStudy:
    """The ready study with its signals mapped back from the spill file (read-only, no copy)."""
    spill = prepared.spill
    if spill is not None and not prepared.ready.engine_input.signals:
        signals = {}
        for modality, rows, cols, offset, dtype in spill.layout:
            signals[modality] = (np.memmap(spill.path, dtype=dtype, mode="r", offset=offset, shape=(rows, cols))
                                 if rows * cols else np.empty((rows, cols), dtype))
        prepared.ready.engine_input.signals = signals
    return prepared.ready


def discard(prepared: Prepared) -> None:
    """Drop the spill file (the mapping, if any, lives on until the arrays are garbage)."""
    if prepared.spill is not None:
        try:
            os.unlink(prepared.spill.path)
        except FileNotFoundError:
            pass
    prepared.ready.engine_input.signals = {}


def choose_spill_dir(fallback: Path, configured: Path | None = None, need_bytes: int = 2 << 30) -> Path:
    """Where workers put prepared signals: the configured folder, else ``/dev/shm`` when it has room
    for the queue (memory-backed, no disk writes), else ``fallback`` (a folder under var/)."""
    if configured is not None:
        folder = Path(configured)
    else:
        shm = Path("/dev/shm")
        _remove_dead_spills(shm)
        ok = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= need_bytes
        folder = shm / f"psg-batch-{os.getpid()}" if ok else Path(fallback)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _remove_dead_spills(shm: Path) -> None:
    """Spill folders of batches that were killed (their prepared nights would stay in RAM until reboot)."""
    from ..store.batch_repo import pid_alive

    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return
    for old in shm.glob("psg-batch-*"):
        pid = old.name.removeprefix("psg-batch-")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
