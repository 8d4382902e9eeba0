"""The gateway daemon: sources, workers, scheduler, ops endpoint and systemd integration in one process.

Start order: lock the var folder (one daemon per spool and SQLite file), migrate the database, load
the model and montage, resume what a previous run left (leases, unfinished input moves, claims that
were never registered), start the workers, the DICOM listener, the scheduler and the ops endpoint, then
tell systemd READY=1.

Stop (SIGTERM, SIGINT): STOPPING=1, stop accepting (DICOM listener closed, no more folder scans), let
each worker finish its study for up to ``service.shutdown_timeout_seconds``. A study still running then
keeps its last committed state and is resumed on the next start.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic.util.exc import CommandError as AlembicCommandError
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from inference.bundle import BundleError
from inference.checkpoints import CheckpointError
from inference.engine import Engine, EngineOptions

from .config import GatewayConfig
from .cpu import engine_threads
from .crashpoints import crashpoint
from .fsutil import private_mkdir, set_private_mode, tighten_tree
from .heads.store import HeadError
from .hl7.delivery import Deliverer
from .http import OpsServer
from .logging import configure_logging, get_logger
from .metrics import Metrics
from .model import load_model
from .montage.holder import MontageHolder
from .montage.table import MontageError
from .pipeline.flags import absolute_thresholds_refused
from .pipeline.intake import StudyIntake
from .pipeline.runner import Pipeline
from .sdnotify import notify, watchdog_interval
from .sources.base import Source
from .sources.dicom.receiver import DicomReceiver
from .sources.dropfolder import DropFolderSource
from .store.db import SQLITE_SIDE_FILES, make_engine, sqlite_path, upgrade
from .store.models import WORKING_STATES, MessageState, State, Study
from .store.repo import Repo

__all__ = ["Daemon", "DaemonLockedError", "StartupError"]

log = get_logger("psg.daemon")


class DaemonLockedError(RuntimeError):
    pass


class StartupError(RuntimeError):
    """The daemon cannot start (port taken, database unreachable, bad bundle); the message says why."""


def _without_password(text: str, url: str) -> str:
    """``text`` with the database URL's password masked (a driver's message may quote the URL)."""
    password = url.split("://", 1)[-1].rpartition("@")[0].partition(":")[2]
    return text.replace(password, "***") if password else text


def _describe(exc: BaseException) -> str:
    """An unforeseen start failure on one line, without what could hold PHI: an OSError's file name (a
    spooled file's name may hold an MRN) or a database error's statement parameters."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or exc.errno}"
    if isinstance(exc, SQLAlchemyError):
        return f"database: {type(getattr(exc, 'orig', None) or exc).__name__}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


class Daemon:
    def __init__(self, cfg: GatewayConfig, *, configure_logs: bool = True):
        self.cfg = cfg
        if configure_logs:
            fmt = cfg.logging.format
            configure_logging(cfg.logging.level, json=None if fmt == "auto" else fmt == "json")
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.ready = False
        self.last_scan: datetime | None = None
        self._wake = threading.Event()
        self._workers: list[threading.Thread] = []
        self._busy: dict[str, str] = {}  # worker -> study key
        self._lock_file: Any = None
        self.repo: Repo | None = None
        self.sources: list[Source] = []  # started in this order, stopped in the reverse
        self.receiver: DicomReceiver | None = None  # the DICOM source, when enabled
        self.ops: OpsServer | None = None
        self.drop_folders: DropFolderSource | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.deliverer: Deliverer | None = None
        self.worker_prefix = f"{cfg.service.node_name}:"
        self.worker_id = f"{cfg.service.node_name}:{os.getpid()}"

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Bring everything up; on failure, stop what was started and raise StartupError."""
        try:
            self._start()
        except DaemonLockedError:
            raise
        except StartupError as exc:
            log.error("daemon.start_failed", reason=str(exc))
            self.stop()
            raise
        except Exception as exc:  # a cause no step names (it re-raises) is still a one-line start failure
            # The traceback is for whoever reproduces it (logging.level: debug), not for the admin's terminal.
            log.debug("daemon.start_failed.traceback", exc_info=True)
            reason = f"unexpected error during start: {_describe(exc)}"
            log.error("daemon.start_failed", reason=reason)
            self.stop()
            raise StartupError(reason) from None

    def _start(self) -> None:
        cfg, paths = self.cfg, self.cfg.paths
        # PHI at rest is private whatever the launcher's umask (make run and the Dockerfile leave 022):
        # everything created from here on is 0600/0700, or 0640/0750 of service.group.
        try:
            set_private_mode(cfg.service.group)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        ours = (paths.var_dir, paths.spool, paths.outputs, paths.processed, paths.quarantine)
        try:
            for folder in ours:
                private_mkdir(Path(folder))
            for folder in (f.path for f in cfg.drop_folders):  # the site's: its mode is the site's call
                Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create {exc.filename}: {exc.strerror}") from None
        self._lock()
        # What an older version (or another launcher) left readable to others: the var tree and the
        # SQLite file wherever it is, minus drop folders inside it. Counts only: paths can hold PHI.
        database = sqlite_path(cfg.database_url)
        roots = [*ours, *([database, *(database.with_name(database.name + x) for x in SQLITE_SIDE_FILES)]
                          if database is not None else [])]
        tightened, foreign = tighten_tree([Path(p) for p in roots], exclude=[f.path for f in cfg.drop_folders])
        log.info("daemon.permissions", tightened=tightened, not_owned=foreign,
                 group=cfg.service.group is not None)
        try:
            self.db = make_engine(cfg.database_url, echo=cfg.database.echo)
        except OSError as exc:  # the SQLite file's folder cannot be created
            raise StartupError(f"database: cannot create {exc.filename}: {exc.strerror}") from None
        except (SQLAlchemyError, ValueError) as exc:  # an unknown driver, a malformed URL (a port not a number)
            raise StartupError(f"database.url cannot be used: {type(exc).__name__}: "
                               f"{_without_password(str(exc), cfg.database_url)[:200]}") from None
        try:
            upgrade(self.db)
        except (SQLAlchemyError, OSError, AlembicCommandError) as exc:
            where = self.db.url.render_as_string(hide_password=True)
            orig = getattr(exc, "orig", None) or exc
            detail = getattr(exc, "strerror", None) or str(orig).strip()
            raise StartupError(f"database {where} unavailable: {type(orig).__name__}: "
                               f"{_without_password(detail, cfg.database_url)[:200]}") from None
        self.repo = Repo(self.db)
        try:
            bundle = load_model(cfg.model)
        except HeadError as exc:
            raise StartupError(f"site heads: {exc}") from None
        except (BundleError, CheckpointError, OSError) as exc:
            raise StartupError(f"model bundle: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a damaged file the loaders do not name (torch, JSON, CSV)
            raise StartupError(f"model bundle: {type(exc).__name__}: {str(exc)[:300]}") from None
        refused = absolute_thresholds_refused(cfg.flags, [(o.phecode, o.name) for o in bundle.outcomes],
                                              bundle.identity.calibrated_outcomes)
        if refused:
            raise StartupError("; ".join(refused))
        threads = engine_threads(cfg.model.threads, runs=cfg.pipeline.workers)
        try:
            engine = Engine(bundle, EngineOptions(device=cfg.model.device, precision=cfg.model.precision,
                                                  threads=threads.threads,
                                                  windows_per_batch=cfg.model.windows_per_batch))
        except (ValueError, RuntimeError) as exc:  # model.device: cuda on a machine without a usable GPU
            raise StartupError(f"model.device {cfg.model.device}: {exc}") from None
        try:
            self.montage = MontageHolder(cfg.montage.table)
        except MontageError as exc:  # missing, unreadable, not YAML, schema, conflicts: the message says which
            # The same words as `config check` (montage.table: <the loader's message, file and line>).
            raise StartupError(f"montage.table: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - anything else the loader meets is still the table's fault
            raise StartupError(f"montage.table: {cfg.montage.table}: {type(exc).__name__}: {exc}") from None
        # 1 while the table file on disk does not load (the last good table is still served).
        self.metrics.montage_reload_failing.set_function(lambda: float(self.montage.failure is not None))
        self.pipeline = Pipeline(self.repo, bundle, self.montage, paths, cfg.pipeline, self.metrics,
                                 flags=cfg.flags, hl7=cfg.hl7, engine=engine, quality=cfg.quality.thresholds())
        self.deliverer = (Deliverer(self.repo, cfg.hl7, self.metrics, holder=self.worker_id,
                                    on_finished=self.pipeline.inputs.place) if cfg.hl7.enabled else None)
        log.info("daemon.starting", site=cfg.site, node=cfg.service.node_name, database=self.db.dialect.name,
                 bundle=bundle.identity.name, validated=bundle.identity.validated,
                 montage=self.montage.table.version, device=str(engine.device))
        log.info("engine.threads", **threads.log_fields())
        # Resume what a previous run left.
        released = self.repo.release_leases(self.worker_prefix)
        # Our downtime must not count toward a DICOM study's stable age: a study whose sender was cut
        # off by it would otherwise go out final from a partial receive right after this start.
        restarted = self.repo.restart_stable_clocks(actor=self.worker_id)
        moved = self.pipeline.inputs.reconcile()
        self.intake = StudyIntake(self.repo, self.pipeline.inputs, self.metrics, on_arrival=self._wake.set)
        self.drop_folders = DropFolderSource(
            cfg.drop_folders, Path(paths.spool), self.intake, metrics=self.metrics,
            exclude=[Path(p) for p in (paths.spool, paths.outputs, paths.processed, paths.quarantine)])
        self.drop_folders.start()  # registers the claims a previous run left unregistered
        self.sources.append(self.drop_folders)
        log.info("daemon.resumed", leases_released=released, inputs_moved=moved,
                 receiving_studies_restarted=restarted)

        for i in range(cfg.pipeline.workers):
            t = threading.Thread(target=self._worker_loop, args=(f"{self.worker_id}:w{i}",),
                                 name=f"worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        if cfg.dicom.enabled:
            receiver = DicomReceiver(cfg.dicom, Path(paths.spool), self.intake, self.metrics)
            try:
                receiver.start()
            except OSError as exc:
                raise StartupError(f"cannot listen for DICOM on {cfg.dicom.host}:{cfg.dicom.port}: "
                                   f"{exc.strerror}") from None
            self.receiver = receiver
            self.sources.append(receiver)
        if cfg.http.enabled:
            try:
                self.ops = OpsServer(cfg.http.host, cfg.http.port, self.metrics.registry, self.health,
                                     console=self._console())
            except OSError as exc:
                raise StartupError(f"cannot listen for HTTP on {cfg.http.host}:{cfg.http.port}: "
                                   f"{exc.strerror}") from None
            self.ops.start()
            log.info("http.listening", host=cfg.http.host, port=self.ops.port)
        self._start_scheduler()
        self.ready = True
        notify("READY=1", f"STATUS=listening; workers={cfg.pipeline.workers}")
        log.info("daemon.ready")

    def _console(self) -> Any:
        """The web console under /ui/ (console.enabled, default: with http), or None."""
        if self.cfg.console.enabled is False or self.repo is None:
            return None
        from .console import ConsoleContext, create_console  # Flask: imported only when served

        try:
            return create_console(ConsoleContext(self.cfg, self.repo, montage=getattr(self, "montage", None),
                                                 health=self.health, metrics=self.metrics))
        except (OSError, ValueError) as exc:
            raise StartupError(f"console: {exc}") from None

    def _start_scheduler(self) -> None:
        cfg = self.cfg
        s = self.scheduler = BackgroundScheduler(timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1})
        s.add_job(self.scan, "interval", seconds=cfg.pipeline.scan_interval_seconds, id="scan",
                  next_run_time=datetime.now(UTC))
        s.add_job(self.montage.check, "interval", seconds=cfg.montage.reload_check_seconds, id="montage")
        s.add_job(self.update_stats, "interval", seconds=15, id="stats", next_run_time=datetime.now(UTC))
        if self.deliverer is not None:
            s.add_job(self.deliver, "interval", seconds=cfg.hl7.drain_interval_seconds, id="deliver",
                      next_run_time=datetime.now(UTC))
        if cfg.retention.processed_days or cfg.retention.quarantine_days:
            s.add_job(self.apply_retention, "interval", seconds=cfg.retention.check_interval_seconds,
                      id="retention", next_run_time=datetime.now(UTC) + timedelta(seconds=60))
        interval = watchdog_interval()
        if cfg.service.watchdog and interval:
            s.add_job(self._watchdog, "interval", seconds=interval, id="watchdog")
        s.start()

    def request_stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def stop(self) -> None:
        """Stop accepting, give workers up to the shutdown timeout, release what is left."""
        self.request_stop()
        notify("STOPPING=1")
        log.info("daemon.stopping", busy=len(self._busy))
        deadline = time.monotonic() + self.cfg.service.shutdown_timeout_seconds
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        for source in reversed(self.sources):
            source.stop(timeout=min(10.0, self.cfg.service.shutdown_timeout_seconds))
        for t in self._workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        unfinished = [t.name for t in self._workers if t.is_alive()]
        if unfinished and self.repo is not None:
            # Their studies keep their last committed state; free the leases so the next start resumes them.
            self.repo.release_leases(self.worker_id)
            log.warning("daemon.stop_timeout", unfinished=list(self._busy.values()))
        if self.deliverer is not None:
            self.deliverer.close()
            try:
                self.deliverer.release()  # another node may deliver at once instead of after the lease
            except Exception as exc:  # noqa: BLE001 - the lease then expires by itself
                log.error("delivery.release_failed", error=type(exc).__name__)
        if self.ops is not None:
            self.ops.stop()
        self.ready = False
        log.info("daemon.stopped")
        if self._lock_file is not None:
            self._lock_file.close()

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop. Returns the exit status."""
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("daemon.signal", signal=signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not self.stopping.wait(1.0):
            pass
        self.stop()
        if any(t.is_alive() for t in self._workers):
            # A worker is still inside torch: interpreter shutdown under a running native thread can
            # abort the process. Its study is already released and resumes on the next start.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0

    # ---- sources ------------------------------------------------------------------------------
    def scan(self) -> None:
        """One pass of the periodic source work: every source polls (drop folders claim stable files, the
        DICOM receiver promotes stable studies); what they hand over goes through the one intake."""
        if self.stopping.is_set() or self.repo is None:
            return
        failed = False
        for source in self.sources:
            try:
                source.poll()
            except Exception as exc:  # noqa: BLE001 - the next scan tries again; the daemon keeps running
                failed = True
                # str(exc) of an OSError quotes the path, which may hold an MRN: the kind and errno text only.
                log.error("scan.failed", source=source.name, error=type(exc).__name__,
                          reason=getattr(exc, "strerror", None))
        if self.receiver is None:
            try:  # DICOM studies a receiver, since disabled, left receiving still complete
                self.intake.promote_stable(self.cfg.dicom.stable_age_seconds)
            except Exception as exc:  # noqa: BLE001 - as above
                failed = True
                log.error("scan.failed", source="dicom", error=type(exc).__name__)
        if not failed:
            self.last_scan = datetime.now(UTC)
            self.metrics.last_scan.set(self.last_scan.timestamp())

    # ---- workers ------------------------------------------------------------------------------
    def _worker_loop(self, worker: str) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                study = self.repo.claim(worker, self.cfg.pipeline.lease_seconds)
            except Exception as exc:  # noqa: BLE001 - database down: wait and try again
                log.error("worker.claim_failed", worker=worker, error=type(exc).__name__)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if study is not None:
                crashpoint("claim")
            if study is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._busy[worker] = study.key
            try:
                self.pipeline.run(study, worker)
            except Exception as exc:  # noqa: BLE001 - the database went away while recording a failure
                log.error("worker.error", worker=worker, study_key=study.key, error=type(exc).__name__)
                self._release_when_possible(study)
            finally:
                self._busy.pop(worker, None)

    def _release_when_possible(self, study: Study) -> None:
        """Give the study back as soon as the database answers again, so it does not wait out its lease."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                self.repo.release(study)
                return
            except Exception:  # noqa: BLE001 - still down
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)

    # ---- periodic housekeeping ----------------------------------------------------------------
    def deliver(self) -> None:
        """Drain the outbox (scheduler job); errors are logged and the next run tries again."""
        if self.deliverer is None or self.stopping.is_set():
            return
        try:
            self.deliverer.drain(self.stopping)
        except Exception as exc:  # noqa: BLE001 - database trouble: the message stays in the outbox
            log.error("delivery.failed", error=type(exc).__name__)

    def update_stats(self) -> None:
        try:
            counts = self.repo.counts_by_state()
            outbox = self.repo.outbox_counts()
        except Exception:  # noqa: BLE001 - health reports the database state
            return
        for state in State:
            self.metrics.studies_by_state.labels(str(state)).set(counts.get(str(state), 0))
        self.metrics.outbox_depth.set(outbox.get(str(MessageState.PENDING), 0))
        self.metrics.dead_letters.set(outbox.get(str(MessageState.DEAD), 0))

    def apply_retention(self) -> None:
        """Delete processed/quarantined inputs older than the configured days (only when configured)."""
        r = self.cfg.retention
        for root, days in ((self.cfg.paths.processed, r.processed_days), (self.cfg.paths.quarantine, r.quarantine_days)):
            if not days:
                continue
            cutoff = time.time() - days * 86400
            for folder in Path(root).iterdir() if Path(root).exists() else []:
                try:
                    if folder.is_dir() and folder.stat().st_mtime < cutoff:
                        shutil.rmtree(folder)
                        study = self.repo.get(folder.name)
                        if study is not None:
                            self.repo.set_fields(study, input_path=None)
                        log.info("retention.removed", study_key=folder.name, folder=Path(root).name)
                except OSError as exc:
                    log.error("retention.failed", study_key=folder.name, error=exc.strerror)

    def _watchdog(self) -> None:
        # Only a daemon whose workers are alive and whose database answers is worth keeping alive.
        if all(t.is_alive() for t in self._workers) and self.repo is not None and self.repo.ping():
            notify("WATCHDOG=1")

    def health(self) -> tuple[bool, dict[str, Any]]:
        db_ok = self.repo.ping() if self.repo is not None else False
        counts = self.repo.counts_by_state() if db_ok else {}
        outbox = self.repo.outbox_counts() if db_ok else {}
        working = sum(counts.get(str(s), 0) for s in WORKING_STATES)
        healthy = self.ready and db_ok and not self.stopping.is_set()
        # Problems the daemon works around: it still takes and processes studies, so "degraded" keeps
        # HTTP 200 (a probe must not restart it), but an operator has something to fix.
        montage_failure = self.montage.failure if hasattr(self, "montage") else None
        problems = [montage_failure.describe()] if montage_failure is not None else []
        destination = self._destination_health(outbox, problems) if db_ok else None
        sources = {source.name: source.health() for source in self.sources}
        for report in sources.values():
            problems.extend(report.get("problems", []))
        if self.stopping.is_set():
            status = "stopping"
        elif not healthy:
            status = "unavailable"
        else:
            status = "degraded" if problems else "ok"
        doc = {
            "status": status,
            "problems": problems,
            "ready": self.ready,
            "database": db_ok,
            "last_scan": self.last_scan.isoformat() if self.last_scan else None,
            "queues": {"receiving": counts.get(str(State.RECEIVED), 0), "waiting": working,
                       "in_progress": len(self._busy), "failed": counts.get(str(State.FAILED), 0),
                       "pending_files": sources.get("drop_folders", {}).get("pending_files", 0),
                       "outbox": outbox.get(str(MessageState.PENDING), 0),
                       "dead_letters": outbox.get(str(MessageState.DEAD), 0)},
            "dicom": sources.get("dicom"),
            "montage": self.montage.table.version if hasattr(self, "montage") else None,
            "destination": destination,
        }
        return healthy, doc

    def _destination_health(self, outbox: dict[str, int], problems: list[str]) -> dict[str, Any] | None:
        """The EHR interface as an integration engine's dashboard shows it; appends to ``problems``
        when results wait longer than ``hl7.degraded_after_seconds`` or dead letters wait for a person."""
        d, hl7 = self.deliverer, self.cfg.hl7
        if d is None or self.repo is None:
            return None
        oldest = self.repo.oldest_pending_at(hl7.destination)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else None
        dead = outbox.get(str(MessageState.DEAD), 0)
        if age is not None and age > hl7.degraded_after_seconds:
            problems.append(f"HL7 destination {hl7.destination}: the oldest result has waited {age / 60:.0f} min "
                            f"(last error: {d.last_error_kind or 'none'})")
        if dead:
            problems.append(f"HL7 destination {hl7.destination}: {dead} dead letter(s) wait for "
                            "`psg-gateway outbox retry`")
        return {"address": hl7.destination, "connected": d.connected, "delivering_here": d.holding,
                "last_error": d.last_error_kind,
                "last_error_at": d.last_error_at.isoformat() if d.last_error_at else None,
                "last_delivered_at": d.last_delivered_at.isoformat() if d.last_delivered_at else None,
                "pending": outbox.get(str(MessageState.PENDING), 0),
                "oldest_pending_age_s": round(age, 1) if age is not None else None, "dead_letters": dead}

    def _lock(self) -> None:
        path = Path(self.cfg.paths.var_dir) / "psg-gateway.lock"
        try:
            f = open(path, "a+")  # noqa: SIM115 - held open for the daemon's lifetime
        except OSError as exc:  # var_dir not writable by the service user, or the lock path is a folder
            raise StartupError(f"cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise DaemonLockedError(f"another psg-gateway daemon is using {self.cfg.paths.var_dir}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f
