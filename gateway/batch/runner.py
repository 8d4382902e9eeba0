"""``psg-gateway batch``: a whole archive through the daemon's pipeline, resumable, on one machine or Ray.

The run, in order:

1. preflight: every archive path exists, the export folder is writable, the database answers (and is
   upgraded), the model bundle and the montage table load. Any problem stops the run here, before
   any work, with a clear message;
2. discovery: EDF/BDF files, and DICOM waveform files grouped by StudyInstanceUID;
3. per study, in archive order: registration in the same database with the same dedupe as the
   daemon (content hash for a file, cached by path+size+mtime; SOP Instance UIDs for DICOM); a study
   the daemon or an earlier run finished is counted, not processed again;
4. the pipeline: the backend decodes/preprocesses in worker processes; the engine runs on prepared
   nights as they arrive; each step commits its state exactly as the daemon's workers do, so an
   interrupted run resumes where it stopped. The queue between the workers and the engine is
   bounded (``batch.queue_size``), so memory does not grow with the archive;
5. the export (``--export``) and the summary (counts by outcome, failures by reason with file names,
   unmapped labels, modality coverage, time per stage), in a file and on the terminal.
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from inference.bundle import BundleError, ModelBundle
from inference.checkpoints import CheckpointError
from inference.engine import Engine, EngineOptions, resolve_device

from ..config import GatewayConfig
from ..cpu import cpu_budget, engine_threads
from ..heads.store import HeadError
from ..logging import get_logger
from ..metrics import Metrics
from ..model import load_model
from ..montage.holder import MontageHolder
from ..pipeline.errors import StepError
from ..pipeline.flags import absolute_thresholds_refused
from ..pipeline.runner import StudySteps, study_logging
from ..sources.archive import ArchiveItem, Discovery, discover
from ..store.batch_repo import BatchRepo
from ..store.db import make_engine, normalise_url, upgrade
from ..store.models import PIPELINE_DONE, State, Study
from ..store.repo import Repo, StudyChanged, aware
from .backends import Backend, InferOutcome, LocalBackend
from .export import ExportError, ExportReport, check_export_dir, check_identifiers_kept, export_studies
from .progress import BatchProgress
from .summary import Tally, write_summary
from .work import FileHash, Prepared, PrepareJob, WorkFailure, choose_spill_dir

__all__ = ["BatchError", "BatchOptions", "BatchOutcome", "BatchRunner"]

log = get_logger("psg.batch")


def _study_bound(method: Any) -> Any:
    """Run a per-study step (``method(self, entry, ...)``) with the entry's study bound to the log context,
    as the daemon's ``Pipeline.run`` does: its key on events, its identifiers redacted (the runner
    interleaves studies in one thread, so the binding is per step, not per study)."""
    @functools.wraps(method)
    def bound(self: Any, entry: Any, *args: Any, **kwargs: Any) -> Any:
        with study_logging(entry.study):
            return method(self, entry, *args, **kwargs)
    return bound


# The pipeline's part is over (QUEUED included: delivery is the daemon's job, not the batch's).
_FINAL = [str(s) for s in PIPELINE_DONE]


class BatchError(Exception):
    """A problem found before any work starts (missing archive, unwritable export, database down...)."""


@dataclass
class BatchOptions:
    archives: list[Path]
    since: date | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    limit: int | None = None
    workers: int | None = None  # None: batch.workers from the configuration
    threads: int | None = None  # the engine's torch threads; None: model.threads, else chosen (gateway.cpu)
    send: bool = False
    export: Path | None = None
    export_csv: bool = False
    export_identifiers: bool = False
    export_drop_identifiers: bool = False  # rewrite an export that has identifier columns without them
    export_tokens: bool = False
    restart: bool = False
    ray: str | None = None  # None: local; "auto" or a cluster address
    summary: Path | None = None
    progress: bool | None = None  # None: a bar on a terminal, log lines otherwise

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        for k, v in doc.items():
            if isinstance(v, Path):
                doc[k] = str(v)
            elif isinstance(v, date):
                doc[k] = v.isoformat()
        doc["archives"] = [str(p) for p in self.archives]
        return doc


@dataclass
class BatchOutcome:
    run_id: int
    status: str  # finished | interrupted | failed
    summary: dict[str, Any]
    summary_path: Path
    export: ExportReport | None = None

    @property
    def exit_code(self) -> int:
        """0: finished and nothing failed; 1: finished with failed studies or a failed export;
        130: interrupted; 3: aborted."""
        if self.status == "interrupted":
            return 130
        if self.status == "failed":
            return 3
        return 1 if self.summary["studies"].get("failed") or self.summary.get("export_error") else 0


@dataclass
class _Entry:
    item: ArchiveItem
    study: Study | None = None
    hashed: FileHash | None = None
    claimed: bool = False
    queued_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


class BatchRunner:
    def __init__(self, cfg: GatewayConfig, opts: BatchOptions):
        self.cfg = cfg
        self.opts = opts
        self.quality = cfg.quality.thresholds()  # the signal-quality gate, sent with every prepare job
        self.host = cfg.service.node_name
        self.worker = f"batch:{self.host}:{os.getpid()}"
        self.tally = Tally()
        self.stop_requested = False
        self.export_ids: list[int] = []
        self._seen: set[int] = set()
        self._queued = 0  # studies queued for processing (--limit counts these)
        self._lock_fh: Any = None

    # ---- preflight ------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Everything that can fail before any work, checked now, each with a clear message."""
        for archive in self.opts.archives:
            if not Path(archive).exists():
                raise BatchError(f"archive path not found: {archive}")
            if not os.access(archive, os.R_OK):
                raise BatchError(f"archive path not readable: {archive}")
        if self.opts.export is not None:
            try:
                self.opts.export = check_export_dir(self.opts.export)
                # Now, not after hours of work: an export that has identifier columns is not rewritten
                # without them unless asked (the export re-checks, in case it changed meanwhile).
                check_identifiers_kept(self.opts.export, identifiers=self.opts.export_identifiers,
                                       drop_identifiers=self.opts.export_drop_identifiers)
            except ExportError as exc:
                raise BatchError(str(exc)) from None
        var = Path(self.cfg.paths.var_dir)
        try:
            for folder in (var, self.cfg.paths.outputs, self.cfg.paths.quarantine):
                Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BatchError(f"cannot create {exc.filename}: {exc.strerror}") from None
        self._take_lock(var / "batch.lock")
        where = make_url(normalise_url(self.cfg.database_url)).render_as_string(hide_password=True)
        try:
            self.db = make_engine(self.cfg.database_url, echo=self.cfg.database.echo)
            upgrade(self.db)
        except OSError as exc:  # an SQLite folder that cannot be created
            raise BatchError(f"database {where} unavailable: {type(exc).__name__}: {exc.strerror}") from None
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", exc)
            raise BatchError(f"database {where} unavailable: {type(orig).__name__}: {str(orig).strip()[:200]}") from None
        self.repo = Repo(self.db)
        self.brepo = BatchRepo(self.repo)
        try:
            self.bundle: ModelBundle = load_model(self.cfg.model)
        except (BundleError, CheckpointError, HeadError, OSError) as exc:
            raise BatchError(f"model bundle: {exc}") from None
        refused = absolute_thresholds_refused(self.cfg.flags, [(o.phecode, o.name) for o in self.bundle.outcomes],
                                              self.bundle.identity.calibrated_outcomes)
        if refused:
            raise BatchError("; ".join(refused))
        try:
            self.montage = MontageHolder(self.cfg.montage.table)
        except Exception as exc:  # noqa: BLE001 - any table problem is reported before the run
            raise BatchError(f"montage table: {exc}") from None
        if self.opts.ray is not None:
            try:
                import ray  # noqa: F401
            except ImportError:
                raise BatchError("--ray needs Ray: pip install 'psg-gateway[ray]'") from None

    def _take_lock(self, path: Path) -> None:
        """One batch per var folder at a time (two would fight over the spill folder and the summary)."""
        fh = open(path, "a+")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise BatchError(f"another batch is running on {path.parent} (lock {path})") from None
        self._lock_fh = fh

    def close(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None
        if getattr(self, "db", None) is not None:
            self.db.dispose()

    # ---- the run --------------------------------------------------------------------------------
    def discover(self) -> Discovery:
        return discover(self.opts.archives, since=self.opts.since, include=self.opts.include,
                        exclude=self.opts.exclude)

    def run(self, found: Discovery | None = None) -> BatchOutcome:
        found = found or self.discover()
        self.tally.total = len(found.items) + len(found.unreadable)
        for name, reason in found.unreadable:
            self.tally.add("unreadable")
            self.tally.failures.append({"file": name, "study_key": "", "reason": reason})
        self.brepo.close_dead_runs(self.host)
        self.run_id = self.brepo.start_run(self.host, self.opts.as_dict())
        freed = self.brepo.release_dead_leases(self.host, alive=[os.getpid()])
        log.info("batch.started", run=self.run_id, studies=len(found.items), unreadable=len(found.unreadable),
                 skipped=sum(found.skipped.values()), leases_freed=freed, backend="ray" if self.opts.ray else "local")
        self.backend = self._backend()
        self.pipeline = StudySteps(self.repo, self.bundle, self.montage, self.cfg.paths, self.cfg.pipeline, Metrics(),
                                   flags=self.cfg.flags, hl7=self.cfg.hl7, hold_messages=not self.opts.send)
        t0 = time.perf_counter()
        status = "finished"
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with BatchProgress(live=self.opts.progress, interval_s=self.cfg.batch.progress_interval_seconds) as bar:
                self._loop([_Entry(item) for item in found.items], bar)
            if self.stop_requested:
                status = "interrupted"
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, still in order below
            status = "interrupted"
        except SQLAlchemyError as exc:
            status = "failed"
            log.error("batch.database_failed", run=self.run_id, error=type(getattr(exc, "orig", exc)).__name__)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._drain()
            self.backend.close()
        self.tally.add("interrupted", max(0, self.tally.total - self.tally.done))
        report = self._export() if status == "finished" else None
        wall = time.perf_counter() - t0
        doc = self.tally.document(run_id=self.run_id, wall_s=wall, options=self.opts.as_dict(), status=status)
        doc["skipped_files"] = dict(found.skipped)
        if self.tally.export_error:
            doc["export_error"] = self.tally.export_error
        if report is not None:
            doc["export"] = {"folder": str(self.opts.export), "studies": report.studies,
                             "files_written": report.files_written, "files_kept": report.files_kept,
                             "skipped": len(report.skipped)}
        path = self.opts.summary or (self.cfg.batch.summary_dir or Path(self.cfg.paths.var_dir) / "batch") / \
            f"run-{self.run_id}" / "summary.json"
        try:
            self.brepo.finish_run(self.run_id, status, doc)
        except SQLAlchemyError:
            log.error("batch.finish_not_recorded", run=self.run_id)
        write_summary(doc, Path(path))
        log.info("batch.finished", run=self.run_id, status=status, processed=self.tally.outcomes["processed"],
                 failed=self.tally.failed, wall_s=round(wall, 1), nights_per_hour=doc["nights_per_hour"])
        return BatchOutcome(self.run_id, status, doc, Path(path), report)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_requested:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.stop_requested = True
        log.warning("batch.stopping", signal=signal.Signals(signum).name)

    def _backend(self) -> Backend:
        cfg = self.cfg.batch
        device = resolve_device(self.cfg.model.device) if self.opts.ray is None else None
        gpu = device is not None and device.type == "cuda"
        budget = cpu_budget()
        chosen = self.opts.workers if self.opts.workers is not None else cfg.workers
        workers = _auto_workers(budget.logical, gpu) if chosen == "auto" else int(chosen)
        self.nights_per_call = cfg.nights_per_call or (4 if gpu or self.opts.ray else 1)
        if self.opts.ray is not None:
            from .ray_backend import RayBackend

            model = self.cfg.model.model_copy(update={"threads": self.opts.threads}) if self.opts.threads \
                else self.cfg.model  # --threads reaches the engine actors too
            backend: Backend = RayBackend(self.opts.ray, self.montage.table, model,
                                          workers=None if chosen == "auto" else int(chosen) or None)
        else:
            # The worker processes' cores are not the engine's: no oversubscription.
            threads = engine_threads(self.opts.threads or self.cfg.model.threads, workers=workers, budget=budget,
                                     source="--threads" if self.opts.threads else "model.threads")
            log.info("engine.threads", **threads.log_fields())
            engine = Engine(self.bundle, EngineOptions(device=self.cfg.model.device,
                                                       precision=self.cfg.model.precision, threads=threads.threads,
                                                       windows_per_batch=self.cfg.model.windows_per_batch))
            spill = choose_spill_dir(Path(self.cfg.paths.var_dir) / "batch" / "spill", cfg.spill_dir,
                                     need_bytes=(workers + cfg.queue_size + 1) * (160 << 20)) if workers else None
            backend = LocalBackend(engine, self.montage.table, workers, spill)
        # Prepared or preparing, not yet in the engine: the bound on memory. Inline, one at a time.
        self.depth = backend.workers + cfg.queue_size if backend.workers else 1
        log.info("batch.backend", backend=backend.name, workers=backend.workers, queue=cfg.queue_size,
                 nights_per_call=self.nights_per_call)
        return backend

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self, entries: list[_Entry], bar: BatchProgress) -> None:
        pending: deque[_Entry] = deque(entries)
        self.to_prepare: deque[_Entry] = deque()
        self.retry: list[_Entry] = []
        self.hashing: dict[Future, _Entry] = {}
        self.preparing: dict[Future, _Entry] = {}
        self.ready: deque[tuple[_Entry, Prepared]] = deque()
        self.inferring: dict[Future, list[tuple[_Entry, Prepared]]] = {}
        while not self.stop_requested:
            # 1. register: files by their hash (in the workers, cached by path/size/mtime), DICOM by UID
            while pending and len(self.hashing) < 2 * max(1, self.backend.workers) and \
                    len(self.to_prepare) < 2 * self.depth and not self._limit_reached():
                self._register(pending.popleft())
            if self._limit_reached() and pending:
                self.tally.add("not_reached", len(pending))
                pending.clear()
            # 2. prepare, within the bound
            while self.to_prepare and len(self.preparing) + len(self.ready) < self.depth:
                self._submit_prepare(self.to_prepare.popleft())
            # 3. infer
            while self.ready and len(self.inferring) < self.backend.infer_slots and (
                    len(self.ready) >= self.nights_per_call or not (self.preparing or self.to_prepare)):
                batch = [self.ready.popleft() for _ in range(min(self.nights_per_call, len(self.ready)))]
                self.inferring[self.backend.infer([p for _, p in batch])] = batch
            bar.update(self.tally.done, self.tally.total, self.tally.outcomes["processed"], self.tally.failed)
            futures = [*self.hashing, *self.preparing, *self.inferring]
            if not futures and not pending and not self.to_prepare and not self.ready:
                if not self.retry:
                    break
                time.sleep(min(1.0, max(0.0, self._next_retry_in())))
            elif futures:
                done, _ = wait(futures, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    self._completed(fut)
            self._due_retries()

    def _limit_reached(self) -> bool:
        return self.opts.limit is not None and self._queued >= self.opts.limit

    def _register(self, entry: _Entry) -> None:
        """Register one archive item, or start hashing it (registered when the hash is back)."""
        item = entry.item
        try:
            if item.kind == "dicom":
                self._admit(entry, self._register_dicom(item))
                return
            path = item.paths[0]
            st = path.stat()
            cached = self.brepo.cached(str(path), st.st_size, st.st_mtime_ns)
            if cached is not None:
                self._admit(entry, cached)
                return
            self.hashing[self.backend.hash(str(path))] = entry
        except OSError as exc:
            self.tally.fail(item.name, None, f"storage: {type(exc).__name__}: {exc.strerror}")

    def _register_dicom(self, item: ArchiveItem) -> Study:
        study = None
        for ref in item.instances:
            study, _stored = self.repo.register_instance(
                study_uid=item.study_uid or "", sop_instance_uid=ref.sop_instance_uid, sop_class_uid=ref.sop_class_uid,
                path=str(ref.path), folder=str(ref.path.parent), size=ref.size, calling_ae="ARCHIVE",
                source=item.source, batch_run_id=self.run_id)
        assert study is not None
        if study.state == State.RECEIVED:
            self.repo.promote_stable(0, self.worker, study_ids=[study.id])
        return self.repo.get(study.id) or study

    def _registered_file(self, entry: _Entry, hashed: FileHash) -> None:
        path = entry.item.paths[0]
        entry.timings["hash_s"] = round(hashed.seconds, 3)
        reg = self.repo.register_file(source=entry.item.source, path=str(path), name=path.name, sha256=hashed.sha256,
                                      filename_pattern=self.cfg.batch.filename_pattern, actor=self.worker,
                                      batch_run_id=self.run_id, stamp=(hashed.size, hashed.mtime_ns))
        self._admit(entry, reg.study)

    def _admit(self, entry: _Entry, study: Study) -> None:
        """Decide what a registered study needs: counted as done/duplicate/..., or queued."""
        if study.state == State.DUPLICATE:
            original = self.repo.get(study.duplicate_of) if study.duplicate_of else None
            if original is None or original.id in self._seen:  # the same content twice in this archive
                self.tally.add("duplicate")
                return
            # Content known as another study (the daemon's or an earlier run's): it counts as that
            # study does (already processed, with the daemon, failed before), or is finished now when
            # an earlier batch run left it unfinished.
            study = original
        if study.id in self._seen:
            self.tally.add("duplicate")
            return
        self._seen.add(study.id)
        entry.study = study
        if study.batch_run_id is None and study.state not in _FINAL:
            self.tally.add("daemon")
            return
        if self.opts.restart and study.batch_run_id is not None and study.state in _FINAL:
            try:
                study = (self.repo.retry if study.state == State.FAILED else self.repo.reprocess)(study.id, self.worker)
            except ValueError:
                pass
            entry.study = study
        if study.state == State.FAILED:
            self.tally.add("failed_before")
            return
        if study.state in _FINAL:
            self.tally.add("already_done")
            if study.output_path:
                self.export_ids.append(study.id)
            return
        if self._limit_reached():  # hashed while the limit was being reached: the next run takes it
            self.tally.add("not_reached")
            return
        entry.study = self.brepo.adopt(study, self.run_id)
        self._queued += 1
        self.to_prepare.append(entry)

    def _submit_prepare(self, entry: _Entry) -> None:
        assert entry.study is not None
        study = self.brepo.claim_study(entry.study, self.worker, self.cfg.pipeline.lease_seconds)
        if study is None:  # another process holds it (a second batch on PostgreSQL, a live lease)
            self.tally.add("superseded")
            return
        entry.study, entry.claimed = study, True
        if study.state == State.INFERRED:  # resumed after a crash: only the flag step is left
            self._finish(entry, lambda: self.pipeline.flag(study, self.worker))
            return
        try:
            paths = self.pipeline.input_paths(study)
        except StepError as exc:
            self._failed(entry, exc)
            return
        entry.queued_at = time.perf_counter()
        scoring = str(entry.item.scoring) if entry.item.scoring is not None else None
        job = PrepareJob(study.id, study.key, tuple(str(p) for p in paths), study.filename_pattern, study.source,
                         quality=self.quality, scoring=scoring)
        self.preparing[self.backend.prepare(job)] = entry

    def _completed(self, fut: Future) -> None:
        if fut in self.hashing:
            entry = self.hashing.pop(fut)
            try:
                self._registered_file(entry, fut.result())
            except OSError as exc:
                self.tally.fail(entry.item.name, None, f"storage: {type(exc).__name__}: {exc.strerror}")
        elif fut in self.preparing:
            entry = self.preparing.pop(fut)
            self._prepared(entry, _result(fut))
        elif fut in self.inferring:
            batch = self.inferring.pop(fut)
            outcomes = _result(fut)
            if isinstance(outcomes, BaseException):
                outcomes = [outcomes] * len(batch)
            for (entry, prepared), outcome in zip(batch, outcomes):
                self._inferred(entry, prepared, outcome)

    @_study_bound
    def _prepared(self, entry: _Entry, outcome: Prepared | WorkFailure | BaseException) -> None:
        if isinstance(outcome, WorkFailure):
            self.backend.release(outcome)
            self._failed(entry, StepError(outcome.reason, outcome.transient))
            return
        if isinstance(outcome, BrokenProcessPool):  # not this study's fault alone: try it again
            self._failed(entry, StepError("a worker process died (out of memory, or a crash in a reader)",
                                          transient=True))
            return
        if isinstance(outcome, BaseException):
            self._failed(entry, outcome)
            return
        assert entry.study is not None
        entry.timings.update(outcome.ready.stage_s)
        entry.timings["queue_s"] = round(time.perf_counter() - entry.queued_at - outcome.timings.get("worker_s", 0), 3)
        try:
            entry.study = self.pipeline.record_ready(entry.study, outcome.ready, self.worker)
        except StudyChanged:
            self.backend.release(outcome)
            self._superseded(entry)
            return
        self.tally.mapped(outcome.ready.channels, outcome.ready.match.unmapped)
        self.ready.append((entry, outcome))

    def _inferred(self, entry: _Entry, prepared: Prepared, outcome: InferOutcome) -> None:
        try:
            if isinstance(outcome, BaseException):
                self._failed(entry, outcome)
                return
            infer_s = sum(outcome.timings_s.get(k, 0.0) for k in ("encode", "heads"))
            ready = prepared.ready
            self.tally.recorded_hours += ready.recording.duration_s / 3600
            assert entry.study is not None
            study = entry.study
            self._finish(entry, lambda: self.pipeline.record_inferred(study, ready, outcome, self.worker, infer_s))
        finally:
            self.backend.release(prepared)

    @_study_bound
    def _finish(self, entry: _Entry, step: Any) -> None:
        """Run the last committing step(s) of a study and count the state it ends in."""
        try:
            study = step()
        except StudyChanged:
            self._superseded(entry)
            return
        except SQLAlchemyError:
            raise
        except Exception as exc:  # noqa: BLE001 - the study's own failure
            self._failed(entry, exc)
            return
        entry.claimed = False
        entry.study = study
        self.tally.add("processed")
        self.tally.final_states[str(study.state)] += 1
        self.tally.timed({**entry.timings, **{k: v for k, v in (study.timings or {}).items()
                                              if k in ("infer_s", "store_s")}})
        if study.output_path:
            self.export_ids.append(study.id)

    @_study_bound
    def _failed(self, entry: _Entry, exc: BaseException) -> None:
        assert entry.study is not None
        current = self.pipeline.fail(entry.study, self.worker, exc)
        entry.claimed = False
        if current is None:
            self._superseded(entry)
        elif current.state == State.FAILED:
            self.tally.fail(entry.item.name, current.key, current.last_error or str(exc))
        else:  # transient: retried in this run after its backoff
            entry.study = current
            self.tally.retries += 1
            self.retry.append(entry)

    def _superseded(self, entry: _Entry) -> None:
        entry.claimed = False
        self.tally.add("superseded")

    def _next_retry_in(self) -> float:
        now = time.time()
        return min((_ts(e.study.next_attempt_at) - now for e in self.retry if e.study), default=0.0)

    def _due_retries(self) -> None:
        now = time.time()
        for entry in [e for e in self.retry if e.study is None or _ts(e.study.next_attempt_at) <= now]:
            self.retry.remove(entry)
            self.to_prepare.append(entry)

    def _drain(self) -> None:
        """After a stop: finish nothing new, drop prepared signals, give back every claim we hold."""
        if not hasattr(self, "preparing"):
            return
        for fut, entry in list(self.preparing.items()):
            fut.cancel()
            outcome = _result(fut) if not fut.cancelled() else None
            if isinstance(outcome, Prepared):
                self.backend.release(outcome)
        for _entry, prepared in self.ready:
            self.backend.release(prepared)
        for batch in self.inferring.values():
            for _entry, prepared in batch:
                self.backend.release(prepared)
        held = [e for e in [*self.preparing.values(), *(e for e, _ in self.ready),
                            *(e for batch in self.inferring.values() for e, _ in batch)] if e.claimed and e.study]
        for entry in held:
            try:
                self.repo.release(entry.study)  # type: ignore[arg-type]
            except SQLAlchemyError:
                pass  # the lease expires, or the next run frees it (this process is gone by then)
        self.preparing.clear()
        self.ready.clear()
        self.inferring.clear()

    def _export(self) -> ExportReport | None:
        if self.opts.export is None:
            return None
        studies = self.brepo.studies(sorted(set(self.export_ids)))
        try:
            report = export_studies(studies, self.opts.export, identifiers=self.opts.export_identifiers,
                                    csv=self.opts.export_csv, tokens=self.opts.export_tokens,
                                    drop_identifiers=self.opts.export_drop_identifiers)
        except ExportError as exc:  # the results are stored: the run still ends with its summary
            log.error("batch.export_failed", run=self.run_id, error=str(exc)[:300])
            self.tally.export_error = str(exc)
            return None
        log.info("batch.exported", run=self.run_id, studies=report.studies, written=report.files_written,
                 kept=report.files_kept, skipped=len(report.skipped))
        return report


def _auto_workers(cores: int, gpu: bool) -> int:
    """Worker processes by default: with a GPU, every core but two (the engine's feeder and the
    database); on a CPU engine a quarter of the cores, and none (inline) up to 4 cores, where the
    engine alone keeps them busy and a worker beside it costs more than it overlaps (bench_batch)."""
    if gpu:
        return max(1, cores - 2)
    return cores // 4 if cores > 4 else 0


def _result(fut: Future) -> Any:
    """A future's result, or the exception it raised (a worker process that died, a Ray error)."""
    try:
        return fut.result()
    except BaseException as exc:  # noqa: BLE001 - returned to be recorded against the study
        return exc


def _ts(dt: Any) -> float:
    return aware(dt).timestamp() if dt is not None else 0.0
