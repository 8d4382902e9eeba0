"""A worker's side of a study: claim it and carry it through decode -> map -> infer -> flag.

Every step ends in a committed state (DECODED, MAPPED, INFERRED, then FLAGGED/QUEUED/SHADOW/HELD; the
table is :mod:`gateway.pipeline.states`); after a crash the study is resumed from the last committed one
(intermediate arrays are recomputed, which is cheaper than storing them). The flag step applies the
site's flag policy to the stored outputs and, when a message is due, commits the ORU^R01 to the outbox
in the same transaction that moves the study to QUEUED (or SHADOW); the delivery job sends it. A study
with nothing to send ends FLAGGED. A failure is classified (:mod:`gateway.pipeline.errors`): retried
later or FAILED; the input files follow the committed state (:mod:`gateway.pipeline.inputs`).

The daemon runs :meth:`Pipeline.run` (its own engine); an archive batch prepares studies in worker
processes, runs the engine in batches (locally or on Ray) and records each step with the same
:class:`StudySteps` methods (``record_ready``, ``record_inferred``, ``flag``, ``fail``).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePath

from inference.bundle import ModelBundle
from inference.engine import Engine
from inference.quality import QualityThresholds
from inference.results import StudyResult

from ..backoff import backoff_delay
from ..config import FlagsConfig, Hl7Config, PathsConfig, PipelineConfig
from ..crashpoints import crashpoint
from ..hl7.compose import build_study_message, new_control_id
from ..hl7.oru import REPORT_MAX_BYTES
from ..logging import add_study_identifiers, bind_study, bound_study_key, get_logger
from ..metrics import Metrics
from ..montage.holder import MontageHolder
from ..store.models import MessageState, State, Study
from ..store.repo import Repo, StudyChanged
from .errors import StepError, classify
from .flags import FlagDecision, demographics_note, evaluate, watched_hazards, withheld_reasons
from .inputs import InputFiles
from .outputs import HazardRow, read_hazards, read_metrics
from .prepare import ReadyStudy
from .steps import decode_and_prepare, infer_ready, store_outputs

__all__ = ["Pipeline", "StudySteps", "study_decision", "study_logging"]

log = get_logger("psg.pipeline")


def _bound(method: Callable) -> Callable:
    """Run a step with its study bound to the log context (:func:`study_logging`): every event carries
    the study key and has the study's identifiers redacted, whoever called the step (a daemon worker,
    the batch runner). Within a binding of the same study it adds none: identifiers learnt in the step
    (the header's, once decoded) must stay bound for the rest of the study."""

    @functools.wraps(method)
    def wrapper(self: StudySteps, study: Study, *args: object, **kwargs: object) -> object:
        if bound_study_key() == study.key:
            return method(self, study, *args, **kwargs)
        with study_logging(study):
            return method(self, study, *args, **kwargs)

    return wrapper


@dataclass
class StudySteps:
    """Records a study's steps as committed states and decides its flag: what the daemon's workers and
    an archive batch (which runs the engine elsewhere, in batches or on Ray) share."""

    repo: Repo
    bundle: ModelBundle
    montage: MontageHolder
    paths: PathsConfig
    cfg: PipelineConfig
    metrics: Metrics
    flags: FlagsConfig = field(default_factory=FlagsConfig)
    hl7: Hl7Config = field(default_factory=Hl7Config)
    # An archive batch without --send: messages are built and held (HELD) until ``outbox release``.
    hold_messages: bool = False
    inputs: InputFiles = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = InputFiles(self.repo, self.paths)

    @_bound
    def record_ready(self, study: Study, ready: ReadyStudy, worker: str) -> Study:
        """Commit READY -> DECODED -> MAPPED (the steps this study has not committed yet)."""
        recording, table = ready.recording, ready.table
        add_study_identifiers(*recording_identifiers(ready))  # now known: redacted from here on
        for stage in ("decode", "map"):
            self.metrics.stage_seconds.labels(stage).observe(ready.stage_s.get(f"{stage}_s", 0.0))
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
                             recording_start=recording.start, scorer=recording.identifiers.scorer)
            crashpoint("decoded")
        if study.state == State.DECODED:
            study = self._to(study, State.MAPPED, worker, "study.mapped",
                             {"montage": table.version,
                              "modalities": {m: len(v) for m, v in ready.channels.items()},
                              "unmapped": len(ready.match.unmapped)},
                             montage_name=table.name, montage_version=table.version,
                             mapping={"channels": ready.channels, "unmapped": ready.match.unmapped,
                                      "ignored": ready.match.ignored})
            crashpoint("mapped")
        return study

    @_bound
    def record_inferred(self, study: Study, ready: ReadyStudy, result: StudyResult, worker: str,
                        infer_s: float) -> Study:
        """Store the outputs, commit INFERRED, then apply the flag policy."""
        t0 = time.perf_counter()
        out_dir = Path(self.paths.outputs) / study.key
        written = store_outputs(result, out_dir, ready)
        crashpoint("outputs")
        self.repo.add_outputs(study, [(str(p.relative_to(out_dir)), p.stat().st_size) for p in written])
        timings = {**(study.timings or {}), **ready.stage_s, "infer_s": round(infer_s, 3),
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

    @_bound
    def flag(self, study: Study, worker: str) -> Study:
        """INFERRED -> FLAGGED (nothing to send), QUEUED (message committed with the state) or SHADOW.

        Works from the stored outputs only, so a study resumed at INFERRED after a crash needs no model.
        """
        t0 = time.perf_counter()
        decision, hazards, sleep = study_decision(self.repo, self.flags, study)
        # A study whose risk flags are withheld (signals not interpretable, a modality missing) stays out
        # of the site reference too: its hazards would skew every later study's percentile.
        if hazards and not decision.withheld:
            self.repo.add_reference(study.id, study.bundle_hash or "", watched_hazards(self.flags, hazards))
        done = {"finished_at": _now(), "claimed_by": None, "lease_until": None, "last_error": None,
                "error_kind": None, "flags": decision.as_dict()}
        detail = {"flags": [f.code for f in decision.flags], "findings": [f.metric for f in decision.findings],
                  "notes": len(decision.notes), "second_look": [b.code for b in decision.borderline],
                  "risk_flags_withheld": len(decision.withheld)}
        report_pdf = self._report(study, decision)
        self.metrics.stage_seconds.labels("flag").observe(time.perf_counter() - t0)
        self.metrics.flag_outcomes.labels("flagged").inc(len(decision.flags))
        self.metrics.flag_outcomes.labels("second_look").inc(len(decision.borderline))
        self.metrics.flag_outcomes.labels("withheld").inc(sum(o.status == "withheld" for o in decision.outcomes))
        for kind in decision.withheld:
            self.metrics.risk_flags_withheld.labels(kind).inc()
        mode = self.flags.send_mode
        if not self.hl7.enabled or (mode == "flagged_only" and not decision.flagged):
            study = self._to(study, State.FLAGGED, worker, "study.flagged", detail, **done)
            self.inputs.finalize(study, State.FLAGGED)
            return study
        correction = self.repo.was_delivered(study.id)
        control_id = new_control_id()
        attached = report_pdf if self.hl7.embed_report and report_pdf else None
        if attached is not None and len(attached) > REPORT_MAX_BYTES:
            decision.notes.append(f"the study report ({len(attached)} bytes) is larger than a message may carry: "
                                  "not attached, see the study's outputs")
            attached = None
        elif self.hl7.embed_report and attached is None:
            decision.notes.append("the study report could not be generated: not attached")
        er7 = build_study_message(study, decision, sleep, self.hl7, control_id=control_id, now=_now(),
                                  correction=correction, validated=bool(study.bundle_validated),
                                  include_metrics=self.flags.include_sleep_metrics,
                                  report_pdf=attached)
        to_state, msg_state = ((State.SHADOW, MessageState.SHADOW) if mode == "shadow" else
                               (State.HELD, MessageState.HELD) if self.hold_messages else
                               (State.QUEUED, MessageState.PENDING))
        event = f"study.{to_state.lower()}"
        study, _ = self.repo.queue_message(
            study, to_state, worker, event, {**detail, "correction": correction}, destination=self.hl7.destination,
            control_id=control_id, er7=er7, message_state=msg_state, correction=correction, **done)
        self.metrics.study_transitions.labels(str(to_state)).inc()
        log.info(event, version=study.version, control_id=control_id, correction=correction, **detail)
        crashpoint("queued")
        self.inputs.finalize(study, to_state)
        return study

    def _report(self, study: Study, decision: FlagDecision) -> bytes | None:
        """Write report.html and report.pdf with this decision into the study's outputs; the PDF's bytes.
        A report that cannot be drawn must not hold the results back: logged and counted, None."""
        if not self.cfg.write_report:
            return None
        from ..report import REPORT_PDF, write_study_report  # matplotlib and jinja2: only when reports are on

        out_dir = Path(study.output_path or "")
        try:
            written = write_study_report(study, out_dir, flags=decision.as_dict())
            self.repo.add_outputs(study, [(p.name, p.stat().st_size) for p in written], replace=False)
            return (out_dir / REPORT_PDF).read_bytes()
        except Exception as exc:  # noqa: BLE001 - any failure to draw is the report's, not the study's
            log.warning("study.report_failed", error=type(exc).__name__)
            self.metrics.report_failures.inc()
            return None

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
        log.info(event, version=study.version, **detail)
        return study

    @_bound
    def fail(self, study: Study, worker: str, exc: BaseException) -> Study | None:
        """Record a failure of ``study``: a retry later (transient) or FAILED with its input quarantined."""
        return self._failed(study, worker, classify(exc))

    def _failed(self, study: Study, worker: str, err: StepError) -> Study | None:
        current = self.repo.get(study.id)
        if current is None or current.version != study.version:
            return None
        try:
            if err.transient and current.attempts < self.cfg.max_attempts:
                delay = backoff_delay(current.attempts, self.cfg.retry_backoff_seconds,
                                      self.cfg.retry_backoff_max_seconds)
                log.warning("study.retry_scheduled", reason=str(err), attempt=current.attempts,
                            delay_s=round(delay, 1))
                return self.repo.schedule_retry(current, str(err), delay, worker)
            reason = str(err) if not err.transient else f"{err} (gave up after {current.attempts} attempts)"
            failed = self.repo.transition(current, State.FAILED, worker, "study.failed",
                                          {"reason": reason, "transient": err.transient},
                                          last_error=reason, error_kind="transient" if err.transient else "permanent",
                                          finished_at=_now(), claimed_by=None, lease_until=None)
        except StudyChanged:
            return None
        self.metrics.study_transitions.labels(str(State.FAILED)).inc()
        log.error("study.failed", reason=reason, transient=err.transient)
        self.inputs.finalize(failed, State.FAILED)
        return failed

@dataclass
class Pipeline(StudySteps):
    """The daemon's pipeline: :class:`StudySteps` with the engine its workers run."""

    engine: Engine = field(kw_only=True)
    # The signal-quality gate's thresholds (the configuration's quality section; None: the defaults).
    quality: QualityThresholds | None = field(default=None, kw_only=True)

    # ---- worker loop --------------------------------------------------------------------------
    def run_once(self, worker: str) -> bool:
        """Claim and process one study; False when nothing was waiting."""
        study = self.repo.claim(worker, self.cfg.lease_seconds)
        if study is None:
            return False
        self.run(study, worker)
        return True

    @_bound
    def run(self, study: Study, worker: str) -> Study | None:
        """Carry one claimed study as far as it goes; returns its last state (None: it changed under us)."""
        log.info("study.claimed", state=study.state, version=study.version, attempt=study.attempts, worker=worker)
        try:
            study = self._steps(study, worker)
        except StudyChanged:
            log.info("study.superseded")
            return None
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the worker goes on
            return self._failed(study, worker, classify(exc))
        return study

    def _steps(self, study: Study, worker: str) -> Study:
        if study.state == State.INFERRED:  # resumed after a crash: outputs are stored, only flagging is left
            return self.flag(study, worker)
        ready = decode_and_prepare(self.input_paths(study), study.filename_pattern, self.montage.table, study.key,
                                   study.source, name=study.input_name,  # the pattern reads the arrival name
                                   quality=self.quality)
        study = self.record_ready(study, ready, worker)
        t0 = time.perf_counter()
        result = infer_ready(self.engine, ready)
        return self.record_inferred(study, ready, result, worker, time.perf_counter() - t0)


def study_logging(study: Study | None) -> contextlib.AbstractContextManager[None]:
    """Bind ``study`` to this thread's log context: ``study_key`` on every event, and the identifiers the
    row holds (patient id, name, birth date, accession, Study Instance UID, the input's file name) redacted
    from every event and every failure reason (see :mod:`gateway.logging`). Nothing when ``study`` is None."""
    if study is None:
        return contextlib.nullcontext()
    names = [PurePath(p) for p in (study.input_name, study.input_path) if p]
    return bind_study(study.key, study.patient_id, study.patient_name, study.birth_date, study.accession,
                      study.study_uid, study.dicom_study_uid, *names)


def recording_identifiers(ready: ReadyStudy) -> list[object]:
    """What a decoded recording says about who it is (header, sidecar or file name): for redaction."""
    ids, demo = ready.recording.identifiers, ready.recording.demographics
    return [ids.patient_id, ids.patient_name, ids.admin_code, ids.study_uid, demo.birth_date,
            *([PurePath(ids.source_path)] if ids.source_path else [])]


def study_decision(repo: Repo, flags: FlagsConfig, study: Study
                   ) -> tuple[FlagDecision, list[HazardRow] | None, dict | None]:
    """The flag decision for a study from its stored outputs (hazards.csv, metrics.json) and the
    site's reference distribution for the same model (the study itself left out). What the bundle
    declared calibrated, the signal quality and the modalities present are read from metrics.json."""
    out_dir = Path(study.output_path or "")
    hazards, metrics = read_hazards(out_dir), read_metrics(out_dir)
    sleep = None if metrics is None else metrics.get("sleep")
    model = study.bundle_hash or ""
    calibrated = ((metrics or {}).get("model_bundle") or {}).get("calibrated_outcomes") or ()
    decision = evaluate(flags, hazards, sleep,
                        lambda label, value: repo.percentile(label, model, value, exclude_study=study.id),
                        calibrated=frozenset(calibrated), withheld=withheld_reasons(flags, metrics))
    if hazards and metrics is not None:
        decision.notes.append(demographics_note(metrics.get("demographics_encoding")))
    return decision, hazards, sleep


def _now() -> datetime:
    return datetime.now(UTC)
