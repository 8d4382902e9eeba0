"""The study pipeline: a worker claims a study and carries it through decode -> map -> infer.

Every step ends in a committed state (DECODED, MAPPED, INFERRED, then FLAGGED/QUEUED/SHADOW); after a crash the study is resumed
from the last committed one (intermediate arrays are recomputed, which is cheaper than storing them).
Then the flag step applies the site's flag policy to the stored outputs and, when a message is due,
commits the ORU^R01 to the outbox in the same transaction that moves the study to QUEUED (or SHADOW);
the delivery job sends it. A study with nothing to send ends FLAGGED.

Errors are sorted into two kinds:

* transient (database busy or gone, GPU/CPU out of memory, a full disk): the study keeps its state and
  is retried with exponential backoff and jitter, up to ``pipeline.max_attempts``;
* permanent (unreadable or corrupt input, no channel mapped, input the model cannot take, or an
  unexpected error): the study is FAILED with the reason and its input goes to ``quarantine/`` with a
  ``REASON.txt`` beside it. ``psg-gateway studies retry`` puts it back.

Inputs are moved, never deleted: a finished study's input goes to ``processed/<study key>/``, named after
the study key (``<study key>.edf``, sidecars ``<study key>.edf.json``/``<study key>.json``); the name it
arrived under (which can hold a name or an MRN) is kept only in the database's ``input_name``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePath

from hl7apy.exceptions import MaxLengthReached
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy.exc import OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from inference.bundle import ModelBundle
from inference.engine import Engine, InputError
from inference.results import StudyResult

from ..config import FlagsConfig, Hl7Config, PathsConfig, PipelineConfig
from ..crashpoints import crashpoint
from ..fsutil import atomic_write, make_private, private_mkdir
from ..hl7.compose import build_study_message, new_control_id
from ..hl7.oru import OruError
from ..logging import add_study_identifiers, bind_study, get_logger, scrub
from ..metrics import Metrics
from ..montage.table import MontageTable
from ..readers.errors import ReaderError
from ..sources.dropfolder import forget_original, spool_name
from ..store.models import PIPELINE_DONE, MessageState, State, Study
from ..store.repo import Repo, StudyChanged
from .flags import (
    FlagDecision,
    HazardRow,
    demographics_note,
    evaluate,
    read_hazards,
    read_metrics,
    watched_hazards,
)
from .prepare import MappingError
from .steps import Decoded, decode_and_map, infer_prepared, store_outputs

__all__ = ["MontageFailure", "MontageHolder", "Pipeline", "StepError", "classify", "study_decision"]

log = get_logger("psg.pipeline")

_TRANSIENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ENOMEM}


class StepError(Exception):
    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def classify(exc: BaseException) -> StepError:
    """The reason (no paths, no identifiers, no values) and whether trying again later can help.

    Every reason is stored (``last_error``, the events table, ``REASON.txt``) and logged, so every branch
    ends in :func:`~gateway.logging.scrub`: the bound study's identifiers, quoted values, paths and long
    digit runs out, one line of at most 300 characters. A library's error (hl7apy, pydicom, pyedflib,
    pydantic, SQLAlchemy, a plain ValueError) is reduced to ``<ExceptionType>: <message without values>``
    or, where the library says which field, the field alone.
    """
    if isinstance(exc, StepError):  # ours, or a worker process's classification: the study's identifiers
        return StepError(scrub(exc), exc.transient)  # are known here and were not there
    if isinstance(exc, ReaderError):
        return StepError(scrub(f"unreadable input ({exc.kind}): {exc.reason}"), transient=False)
    if isinstance(exc, MappingError):
        return StepError(scrub(f"montage: {exc}"), transient=False)
    if isinstance(exc, InputError):
        return StepError(scrub(f"model input: {exc}"), transient=False)
    if isinstance(exc, OruError):
        return StepError(scrub(f"result message: {exc}"), transient=False)
    if isinstance(exc, (OperationalError, PoolTimeout)):
        return StepError(f"database unavailable: {type(exc.orig if hasattr(exc, 'orig') else exc).__name__}",
                         transient=True)
    if isinstance(exc, StatementError):  # its text holds the statement's parameters: patient fields
        orig = getattr(exc, "orig", None)
        return StepError(f"database: {type(exc).__name__}" + (f" ({type(orig).__name__})" if orig is not None else ""),
                         transient=False)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return StepError("out of memory during inference", transient=True)
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return StepError(f"storage: {errno.errorcode.get(exc.errno or 0, 'error')} ({exc.strerror})", transient=True)
    if isinstance(exc, OSError):  # str(exc) would quote the file name, which can hold an MRN
        return StepError(scrub(f"storage: {type(exc).__name__}: {exc.strerror or exc}"), transient=False)
    return StepError(scrub(f"internal error: {_library_error(exc)}"), transient=False)


def _library_error(exc: BaseException) -> str:
    """``<ExceptionType>: <what is wrong>`` for an exception we did not raise, without the value it quotes
    where the library keeps it apart (hl7apy's too-long value, pydantic's input); scrub() does the rest."""
    name = type(exc).__name__
    if isinstance(exc, PydanticValidationError):  # field paths and error kinds, never the input
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'} ({e['type']})"
                           for e in exc.errors(include_url=False, include_input=False, include_context=False)[:5])
        return f"{name}: {fields}"
    if isinstance(exc, MaxLengthReached):
        return f"{name}: a value exceeds its maximum length ({exc.limit})"
    if isinstance(exc, UnicodeError):  # str() quotes the bytes around the bad one
        return f"{name}: {getattr(exc, 'reason', '') or 'cannot encode or decode text'}"
    return f"{name}: {exc}"


# The folders of an absolute path in a message ("/etc/psg/site.yaml" -> "site.yaml").
_FOLDERS = re.compile(r"(?<![\w.~])/(?:[^/\s'\",:;()]+/)+")


@dataclass(frozen=True)
class MontageFailure:
    """Why the site's table file does not load now; the holder keeps serving ``kept_version`` meanwhile."""

    reason: str  # the loader's message with file names only (no folders): it is shown on /healthz
    since: datetime  # the first failed check of this failure (UTC)
    file_hash: str  # sha256 (12 hex) of the file's bytes, or "unreadable" when it cannot be read
    kept_version: str

    def describe(self) -> str:
        """The one-line problem /healthz lists."""
        return (f"montage table on disk does not load: {self.reason}; serving version {self.kept_version} "
                f"(failing since {self.since.isoformat(timespec='seconds')})")


class MontageHolder:
    """The montage table in use; ``check()`` re-reads the site's file and swaps in a changed table.

    A table file that stops loading (a broken edit, a deleted file) leaves the last good table in use;
    ``failure`` then says why, so /healthz can report the daemon as degraded until the file loads again.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.table = self._load()  # a table that does not load at start is the caller's start failure
        self._lock = threading.Lock()
        self.failure: MontageFailure | None = None
        # (file hash, reason) of the failure last logged: a failing file is logged once per change, not
        # at every check (every montage.reload_check_seconds).
        self._logged: tuple[str, str] | None = None

    def _load(self) -> MontageTable:
        from ..montage.table import default_table

        return MontageTable.load(self.path) if self.path else default_table()

    def _file_hash(self) -> str:
        assert self.path is not None
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        except OSError:
            return "unreadable"

    def _reason(self, exc: Exception) -> str:
        """The load error on one line, without folders (a table's folder is the site's; keep /healthz free of
        paths) and without the loader's ``montage table`` prefix (the problem text says it)."""
        from ..montage.table import MontageError

        text = str(exc) if isinstance(exc, MontageError) else f"{type(exc).__name__}: {exc}"
        # Keep the last part of any absolute path (the table and the tables it extends, named by file).
        text = _FOLDERS.sub("", text).removeprefix("montage table ")
        return " ".join(text.split())[:500]

    def check(self) -> bool:
        """Reload when the table's content changed; a broken edit keeps the old table (and says so)."""
        if self.path is None:
            return False
        try:
            fresh = self._load()
        except Exception as exc:  # noqa: BLE001 - any load failure keeps serving the previous table
            self._failed(exc)
            return False
        failure, self.failure, self._logged = self.failure, None, None
        if failure is not None:
            log.info("montage.recovered", montage=fresh.name, version=fresh.version,
                     failing_since=failure.since.isoformat())
        with self._lock:
            if fresh.version == self.table.version:
                return False
            old, self.table = self.table, fresh
        log.info("montage.reloaded", montage=fresh.name, version=fresh.version, previous=old.version)
        return True

    def _failed(self, exc: Exception) -> None:
        reason, file_hash = self._reason(exc), self._file_hash()
        previous = self.failure
        # "since" is when the table stopped loading, not when the latest broken edit was saved.
        since = previous.since if previous is not None else datetime.now(UTC)
        self.failure = MontageFailure(reason, since, file_hash, self.table.version)
        if self._logged != (file_hash, reason):
            self._logged = (file_hash, reason)
            log.error("montage.reload_failed", table=str(self.path), error=reason, file_hash=file_hash,
                      kept_version=self.table.version)


@dataclass
class Pipeline:
    repo: Repo
    engine: Engine | None  # None: the engine runs elsewhere (an archive batch on Ray)
    bundle: ModelBundle
    montage: MontageHolder
    paths: PathsConfig
    cfg: PipelineConfig
    metrics: Metrics
    flags: FlagsConfig = field(default_factory=FlagsConfig)
    hl7: Hl7Config = field(default_factory=Hl7Config)
    # An archive batch without --send: messages are built and held (HELD) until ``outbox release``.
    hold_messages: bool = False

    # ---- worker loop --------------------------------------------------------------------------
    def run_once(self, worker: str) -> bool:
        """Claim and process one study; False when nothing was waiting."""
        study = self.repo.claim(worker, self.cfg.lease_seconds)
        if study is None:
            return False
        self.process(study, worker)
        return True

    def process(self, study: Study, worker: str) -> Study | None:
        """Carry one claimed study as far as it goes; returns its last state (None: it changed under us).

        Runs with the study bound to the worker's log context (:func:`study_logging`): its key on every
        event, its identifiers redacted from every event and from the failure reason."""
        with study_logging(study):
            log.info("study.claimed", study_key=study.key, state=study.state, version=study.version,
                     attempt=study.attempts, worker=worker)
            try:
                study = self._steps(study, worker)
            except StudyChanged:
                log.info("study.superseded", study_key=study.key)
                return None
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, the worker goes on
                return self._failed(study, worker, classify(exc))
            return study

    def _steps(self, study: Study, worker: str) -> Study:
        if study.state == State.INFERRED:  # resumed after a crash: outputs are stored, only flagging is left
            return self.flag(study, worker)
        decoded = decode_and_map(self.input_paths(study), study.filename_pattern, self.montage.table, study.key,
                                 study.source, name=study.input_name)  # the pattern reads the arrival name
        study = self.record_decoded(study, decoded, worker)
        t0 = time.perf_counter()
        assert self.engine is not None, "this pipeline has no engine of its own"
        result = infer_prepared(self.engine, decoded.prepared)
        return self.record_inferred(study, decoded, result, worker, time.perf_counter() - t0)

    def record_decoded(self, study: Study, decoded: Decoded, worker: str) -> Study:
        """Commit READY -> DECODED -> MAPPED (the steps this study has not committed yet)."""
        recording, prepared, table = decoded.recording, decoded.prepared, decoded.table
        add_study_identifiers(*recording_identifiers(decoded))  # now known: redacted from here on
        for stage in ("decode", "map"):
            self.metrics.stage_seconds.labels(stage).observe(decoded.timings.get(f"{stage}_s", 0.0))
        if study.state == State.READY:
            study = self._to(study, State.DECODED, worker, "study.decoded",
                             {"channels": len(recording.channels), "duration_s": round(recording.duration_s, 1),
                              "format": recording.format, "warnings": len(recording.warnings)},
                             patient_id=recording.identifiers.patient_id,
                             patient_id_issuer=recording.identifiers.patient_id_issuer,
                             accession=recording.identifiers.admin_code,
                             study_uid=recording.identifiers.study_uid or study.study_uid,
                             patient_name=recording.identifiers.patient_name,
                             birth_date=recording.demographics.birth_date, sex=recording.demographics.sex,
                             recording_start=recording.start)
            crashpoint("decoded")
        if study.state == State.DECODED:
            study = self._to(study, State.MAPPED, worker, "study.mapped",
                             {"montage": table.version,
                              "modalities": {m: len(v) for m, v in prepared.channels.items()},
                              "unmapped": len(prepared.match.unmapped)},
                             montage_name=table.name, montage_version=table.version,
                             mapping={"channels": prepared.channels, "unmapped": prepared.match.unmapped,
                                      "ignored": prepared.match.ignored})
            crashpoint("mapped")
        return study

    def record_inferred(self, study: Study, decoded: Decoded, result: StudyResult, worker: str,
                        infer_s: float) -> Study:
        """Store the outputs, commit INFERRED, then apply the flag policy."""
        t0 = time.perf_counter()
        out_dir = Path(self.paths.outputs) / study.key
        written = store_outputs(result, out_dir, decoded.table, study.source, decoded.prepared, decoded.recording)
        crashpoint("outputs")
        self.repo.add_outputs(study, [(str(p.relative_to(out_dir)), p.stat().st_size) for p in written])
        timings = {**(study.timings or {}), **decoded.timings, "infer_s": round(infer_s, 3),
                   "store_s": round(time.perf_counter() - t0, 3)}
        self.metrics.stage_seconds.labels("infer").observe(infer_s)
        identity = self.bundle.identity
        study = self._to(study, State.INFERRED, worker, "study.inferred",
                         {"tokens": result.n_tokens, "missing": result.missing_modalities,
                          "validated": result.validated},
                         output_path=str(out_dir), bundle_name=identity.name, bundle_version=identity.version,
                         bundle_hash=identity.model_hash, bundle_validated=identity.validated,
                         timings=timings)
        crashpoint("inferred")
        return self.flag(study, worker)

    def flag(self, study: Study, worker: str) -> Study:
        """INFERRED -> FLAGGED (nothing to send), QUEUED (message committed with the state) or SHADOW.

        Works from the stored outputs only, so a study resumed at INFERRED after a crash needs no model.
        """
        t0 = time.perf_counter()
        decision, hazards, sleep = study_decision(self.repo, self.flags, study)
        if hazards:
            self.repo.add_reference(study.id, study.bundle_hash or "", watched_hazards(self.flags, hazards))
        done = {"finished_at": _now(), "claimed_by": None, "lease_until": None, "last_error": None,
                "error_kind": None, "flags": decision.as_dict()}
        detail = {"flags": [f.code for f in decision.flags], "findings": [f.metric for f in decision.findings],
                  "notes": len(decision.notes)}
        self.metrics.stage_seconds.labels("flag").observe(time.perf_counter() - t0)
        mode = self.flags.send_mode
        if not self.hl7.enabled or (mode == "flagged_only" and not decision.flagged):
            study = self._to(study, State.FLAGGED, worker, "study.flagged", detail, **done)
            self.finalize(study, State.FLAGGED)
            return study
        correction = self.repo.was_delivered(study.id)
        control_id = new_control_id()
        er7 = build_study_message(study, decision, sleep, self.hl7, control_id=control_id, now=_now(),
                                  correction=correction, validated=bool(study.bundle_validated),
                                  include_metrics=self.flags.include_sleep_metrics)
        to_state, msg_state = ((State.SHADOW, MessageState.SHADOW) if mode == "shadow" else
                               (State.HELD, MessageState.HELD) if self.hold_messages else
                               (State.QUEUED, MessageState.PENDING))
        event = f"study.{to_state.lower()}"
        study, _ = self.repo.queue_message(
            study, to_state, worker, event, {**detail, "correction": correction}, destination=self.hl7.destination,
            control_id=control_id, er7=er7, message_state=msg_state, correction=correction, **done)
        self.metrics.study_transitions.labels(str(to_state)).inc()
        log.info(event, study_key=study.key, version=study.version, control_id=control_id, correction=correction,
                 **detail)
        crashpoint("queued")
        self.finalize(study, to_state)
        return study

    def input_paths(self, study: Study) -> list[Path]:
        """The files to decode: the study's file, or its recorded DICOM instances."""
        if study.source_kind == "dicom":
            paths = [Path(i.path) for i in self.repo.instances_of(study.id)]
            if not paths:
                raise StepError("no DICOM instances recorded for this study", transient=False)
        else:
            if not study.input_path:
                raise StepError("the study has no input file", transient=False)
            paths = [Path(study.input_path)]
        return paths

    def _to(self, study: Study, state: State, worker: str, event: str, detail: dict, **fields) -> Study:
        study = self.repo.transition(study, state, worker, event, detail, **fields)
        self.metrics.study_transitions.labels(str(state)).inc()
        log.info(event, study_key=study.key, version=study.version, **detail)
        return study

    def fail(self, study: Study, worker: str, exc: BaseException) -> Study | None:
        """Record a failure of ``study``: a retry later (transient) or FAILED with its input quarantined."""
        return self._failed(study, worker, classify(exc))

    def _failed(self, study: Study, worker: str, err: StepError) -> Study | None:
        current = self.repo.get(study.id)
        if current is None or current.version != study.version:
            return None
        try:
            if err.transient and current.attempts < self.cfg.max_attempts:
                delay = min(self.cfg.retry_backoff_max_seconds,
                            self.cfg.retry_backoff_seconds * 2 ** max(current.attempts - 1, 0))
                delay *= random.uniform(0.8, 1.2)  # jitter: workers that failed together do not retry together
                log.warning("study.retry_scheduled", study_key=study.key, reason=str(err),
                            attempt=current.attempts, delay_s=round(delay, 1))
                return self.repo.schedule_retry(current, str(err), delay, worker)
            reason = str(err) if not err.transient else f"{err} (gave up after {current.attempts} attempts)"
            failed = self.repo.transition(current, State.FAILED, worker, "study.failed",
                                          {"reason": reason, "transient": err.transient},
                                          last_error=reason, error_kind="transient" if err.transient else "permanent",
                                          finished_at=_now(), claimed_by=None, lease_until=None)
        except StudyChanged:
            return None
        self.metrics.study_transitions.labels(str(State.FAILED)).inc()
        log.error("study.failed", study_key=study.key, reason=reason, transient=err.transient)
        self.finalize(failed, State.FAILED)
        return failed

    # ---- inputs: processed/ or quarantine/ -------------------------------------------------------
    def finalize(self, study: Study, state: State) -> None:
        """Move the input out of the spool (processed/ or quarantine/); a failure here is only logged:
        the study's state is already committed and ``reconcile`` finishes the move on the next start."""
        try:
            self._move_input(study, state)
        except OSError as exc:
            log.error("study.input_move_failed", study_key=study.key, error=exc.strerror)

    def _owned(self, path: Path) -> bool:
        roots = [Path(self.paths.spool), Path(self.paths.processed), Path(self.paths.quarantine)]
        return any(path.is_relative_to(r) for r in roots)

    def place_input(self, study_id: int) -> None:
        """Put a finished study's input where its committed state says (after delivery or a dead letter:
        FAILED in quarantine/ with REASON.txt, anything else in processed/)."""
        study = self.repo.get(study_id)
        if study is not None and study.state in [str(s) for s in PIPELINE_DONE]:
            self.finalize(study, State(study.state))

    def _move_input(self, study: Study, state: State) -> None:
        dest = Path(self.paths.quarantine if state == State.FAILED else self.paths.processed) / study.key
        if state == State.FAILED:
            private_mkdir(dest)
            dead = (self.repo.messages(state=str(MessageState.DEAD), study_id=study.id, limit=1)
                    if study.error_kind == "delivery" else [])
            _write_reason(dest / "REASON.txt", study, dead[0].id if dead else None)
        else:
            # Out of quarantine (a dead letter retried and delivered): its reason no longer holds.
            (Path(self.paths.quarantine) / study.key / "REASON.txt").unlink(missing_ok=True)
        if study.source_kind == "dicom":
            instances = self.repo.instances_of(study.id)
            if not any(self._owned(Path(i.path)) for i in instances):
                return  # an archive batch's study: its files stay in the archive
            private_mkdir(dest)
            for inst in instances:
                src = Path(inst.path)
                if src.parent == dest or not self._owned(src):
                    continue
                target = dest / src.name  # named by a hash of the SOP Instance UID: no PHI in it
                if src.exists():
                    shutil.move(src, target)
                    _make_private(target)
                if target.exists():
                    self.repo.move_instance(inst.id, str(target))
            if study.input_path:
                _remove_empty(Path(study.input_path))
            self.repo.set_fields(study, input_path=str(dest))
            return
        if not study.input_path:
            return
        src = Path(study.input_path)
        if src.parent == dest or not self._owned(src):
            return
        private_mkdir(dest)
        # The claim folder holds the recording, its sidecars and claim.json: they travel together, renamed
        # after the study key (a claim from an older version still has the original name: not kept).
        items = sorted(src.parent.iterdir()) if src.parent.exists() else []
        # The recording's and its sidecars' names too when already moved (a crash mid-way): the manifest,
        # moved last or not, then names what is there.
        renames = _key_names(src, study.key, [item.name for item in items]
                             + [src.name, src.name + ".json", src.stem + ".json"])
        for item in items:
            target = dest / renames.get(item.name, item.name)
            shutil.move(item, target)
            _make_private(target)
        forget_original(dest, renames)  # the manifest: new names, and no original path
        _remove_empty(src.parent)
        moved = dest / renames.get(src.name, src.name)
        if moved.exists():
            self.repo.set_fields(study, input_path=str(moved))

    def reconcile(self) -> int:
        """On start: finish input moves a crash interrupted (state committed, input not yet where it says)."""
        n = 0
        roots = [str(Path(r)) + "/" for r in (self.paths.spool, self.paths.processed, self.paths.quarantine)]
        for study in self.repo.misplaced_inputs(*roots):
            self._move_input(study, State(study.state))
            n += 1
        return n


def study_logging(study: Study | None) -> contextlib.AbstractContextManager[None]:
    """Bind ``study`` to this thread's log context: ``study_key`` on every event, and the identifiers the
    row holds (patient id, name, birth date, accession, Study Instance UID, the input's file name) redacted
    from every event and every failure reason (see :mod:`gateway.logging`). Nothing when ``study`` is None."""
    if study is None:
        return contextlib.nullcontext()
    names = [PurePath(p) for p in (study.input_name, study.input_path) if p]
    return bind_study(study.key, study.patient_id, study.patient_name, study.birth_date, study.accession,
                      study.study_uid, study.dicom_study_uid, *names)


def recording_identifiers(decoded: Decoded) -> list[object]:
    """What a decoded recording says about who it is (header, sidecar or file name): for redaction."""
    ids, demo = decoded.recording.identifiers, decoded.recording.demographics
    return [ids.patient_id, ids.patient_name, ids.admin_code, ids.study_uid, demo.birth_date,
            *([PurePath(ids.source_path)] if ids.source_path else [])]


def study_decision(repo: Repo, flags: FlagsConfig, study: Study
                   ) -> tuple[FlagDecision, list[HazardRow] | None, dict | None]:
    """The flag decision for a study from its stored outputs (hazards.csv, metrics.json) and the
    site's reference distribution for the same model (the study itself left out)."""
    out_dir = Path(study.output_path or "")
    hazards = read_hazards(out_dir / "hazards.csv") if (out_dir / "hazards.csv").is_file() else None
    metrics = read_metrics(out_dir / "metrics.json") if (out_dir / "metrics.json").is_file() else None
    sleep = None if metrics is None else metrics.get("sleep")
    model = study.bundle_hash or ""
    decision = evaluate(flags, hazards, sleep,
                        lambda label, value: repo.percentile(label, model, value, exclude_study=study.id))
    if hazards and metrics is not None:
        decision.notes.append(demographics_note(metrics.get("demographics_encoding")))
    return decision, hazards, sleep


def _write_reason(path: Path, study: Study, dead_message_id: int | None = None) -> None:
    text = (f"study: {study.key} (id {study.id}, version {study.version})\n"
            f"state: {study.state}\nwhen: {_now().isoformat()}\n"
            f"kind: {study.error_kind or 'permanent'}\nreason: {study.last_error or ''}\n")
    if dead_message_id is not None:  # the result exists; only its delivery failed
        text += f"retry: psg-gateway outbox retry {dead_message_id} (after fixing what the EHR refused)\n"
    else:
        text += (f"retry: psg-gateway studies retry {study.id}\n"
                 f"replace the input: psg-gateway studies replace {study.id} FILE\n")
    atomic_write(path, text.encode("utf-8"))


def _key_names(recording: Path, key: str, names: list[str]) -> dict[str, str]:
    """New names (old -> new) for the files of a claim folder whose recording is ``recording``: the study
    key for the recording's name or stem, so that find_sidecar still pairs the sidecars with it
    (``<file>.json`` -> ``<key><ext>.json``, ``<stem>.json`` -> ``<key>.json``)."""
    new = spool_name(recording.name, key)
    stem = recording.stem
    out: dict[str, str] = {}
    for name in names:
        if name == recording.name:
            out[name] = new
        elif name == recording.name + ".json":
            out[name] = new + ".json"
        elif name == stem + ".json":
            out[name] = Path(new).stem + ".json"
        elif stem and name.lstrip(".").startswith(stem) and name not in ("claim.json", "REASON.txt"):
            out[name] = name.replace(stem, key, 1)  # a leftover temporary named after it (.<name>.copying)
    return out


def _make_private(path: Path) -> None:
    """Private mode (and group) for a moved input; a file another user owns keeps its mode (the daemon's
    start counts it among those it could not tighten)."""
    try:
        make_private(path, is_dir=path.is_dir())
    except OSError:
        pass


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _now() -> datetime:
    return datetime.now(UTC)
