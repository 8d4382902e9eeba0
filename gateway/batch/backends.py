"""Where a batch's work runs. The runner asks a backend for futures and never waits on one study:

* :class:`LocalBackend`: decode/preprocess (and hashing) in worker processes, the engine in this
  process, fed several nights per call while the workers prepare the next ones;
* ``RayBackend`` (``ray_backend.py``, the ``[ray]`` extra): the same two steps as Ray CPU tasks
  and GPU (or CPU) actors across a cluster.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Protocol

from inference.engine import Engine
from inference.results import StudyResult

from ..montage.table import MontageTable
from ..pipeline.prepare import ReadyStudy
from ..pipeline.steps import with_ready_timings
from .work import (
    OLD_SPILL_SUFFIXES,
    SPILL_SUFFIX,
    FileHash,
    Prepared,
    PrepareJob,
    WorkFailure,
    discard,
    hash_file,
    init_worker,
    load,
    prepare,
)

__all__ = ["Backend", "InferOutcome", "LocalBackend", "infer_many"]

InferOutcome = StudyResult | BaseException


class Backend(Protocol):
    name: str
    workers: int
    infer_slots: int  # inference calls that may be in flight at once

    def hash(self, path: str) -> Future[FileHash]: ...
    def prepare(self, job: PrepareJob) -> Future[Prepared | WorkFailure]: ...
    def infer(self, items: list[Prepared]) -> Future[list[InferOutcome]]: ...
    def release(self, item: Prepared | WorkFailure) -> None: ...
    def close(self) -> None: ...


def infer_many(engine: Engine, ready: list[ReadyStudy]) -> list[InferOutcome]:
    """Run the engine over several nights at once; when the call fails, run them one by one so one
    bad night fails alone (its error is returned in its place)."""
    try:
        results = engine.run_many([r.engine_input for r in ready])
        return [with_ready_timings(result, r) for result, r in zip(results, ready)]
    except Exception as exc:  # noqa: BLE001 - isolate the night that caused it
        if len(ready) == 1:
            return [exc]
    out: list[InferOutcome] = []
    for r in ready:
        try:
            out.append(with_ready_timings(engine.run_many([r.engine_input])[0], r))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


class LocalBackend:
    """``workers`` >= 1: decode/preprocess in that many worker processes, overlapping the engine.
    ``workers`` = 0 (inline): each study is prepared in this process, with all cores, just before the
    engine runs it; only hashing overlaps (a thread: hashlib releases the GIL). On a small CPU-only
    machine the engine already keeps every core busy, and a worker process beside it only slows it
    down (``bench/bench_batch.py``), so that is the automatic choice there.

    ``engine_thread``: the engine runs in a thread of its own, with a second call queued behind the
    running one, while this thread stores the finished studies' outputs, decides their flags and draws
    their reports (about a second a study): a GPU then never waits for that. The default (None) is on
    for a CUDA engine only: a CPU engine already uses every core it was given."""

    name = "local"

    def __init__(self, engine: Engine, table: MontageTable, workers: int, spill_dir: Path | None,
                 engine_thread: bool | None = None):
        self.engine = engine
        self.workers = workers
        self.spill_dir = spill_dir
        self.table = table
        overlap = engine.device.type == "cuda" if engine_thread is None else engine_thread
        self.engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="psg-engine") if overlap else None
        self.infer_slots = 2 if overlap else 1  # one running, one waiting
        # spawn, not fork: the engine's process has torch threads and open database connections.
        self.pool: ProcessPoolExecutor | None = self._pool() if workers else None
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="psg-hash") if not workers else None

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=init_worker, initargs=(self.table, str(self.spill_dir), os.getpid()))

    def _submit(self, fn: Any, arg: Any) -> Future:
        assert self.pool is not None
        try:
            return self.pool.submit(fn, arg)
        except BrokenProcessPool:
            # A worker died (killed for memory, a crash in C code): its studies come back as
            # BrokenProcessPool and are retried; a fresh pool takes the work on.
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._pool()
            return self.pool.submit(fn, arg)

    def hash(self, path: str) -> Future[FileHash]:
        if self.hasher is not None:
            return self.hasher.submit(hash_file, path)
        return self._submit(hash_file, path)

    def prepare(self, job: PrepareJob) -> Future[Prepared | WorkFailure]:
        if self.pool is None:  # inline: now, in this process, signals kept in memory
            done: Future[Prepared | WorkFailure] = Future()
            done.set_result(prepare(job, self.table))
            return done
        return self._submit(prepare, job)

    def infer(self, items: list[Prepared]) -> Future[list[InferOutcome]]:
        """Runs in the engine's thread, or now, in this thread, returning a done future (the workers keep
        preparing meanwhile either way)."""
        ready = [load(p) for p in items]
        if self.engine_thread is not None:
            return self.engine_thread.submit(infer_many, self.engine, ready)
        done: Future[list[InferOutcome]] = Future()
        done.set_result(infer_many(self.engine, ready))
        return done

    def release(self, item: Prepared | WorkFailure) -> None:
        if isinstance(item, Prepared):
            discard(item)

    def close(self) -> None:
        for pool in (self.engine_thread, self.pool, self.hasher):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self.spill_dir is None:
            return
        if self.spill_dir.name.startswith("psg-batch-"):  # our own folder under /dev/shm
            shutil.rmtree(self.spill_dir, ignore_errors=True)
        else:
            for suffix in (SPILL_SUFFIX, *OLD_SPILL_SUFFIXES):
                for leftover in self.spill_dir.glob(f"*{suffix}"):
                    leftover.unlink(missing_ok=True)
