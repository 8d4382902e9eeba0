"""The repository: every read and write the daemon, the sources and the CLI make to the database.

Each public method is one transaction. A state change is a guarded UPDATE (``id``, ``version`` and
the expected state must still hold) plus an event row in the same transaction, so a worker whose study
changed under it (a late DICOM instance, a ``studies retry`` from the CLI) learns it from the row count
and stops instead of overwriting the newer state.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..pipeline.states import check_transition
from .db import is_sqlite, session_factory
from .models import (
    FINAL_STATES,
    PIPELINE_DONE,
    WORKING_STATES,
    ArchiveFile,
    AttemptOutcome,
    DeliveryAttempt,
    DeliveryLease,
    Event,
    Instance,
    Message,
    MessageState,
    Output,
    ReferenceHazard,
    State,
    Study,
)

__all__ = ["Repo", "StudyChanged", "TakenOver", "new_study_key", "utcnow"]

# pg_advisory_xact_lock(key1, key2) key1 for queueing a destination's messages (key2: the destination).
_PG_OUTBOX_LOCK = 0x70736702

# Guarded UPDATEs are decided by the database; SQLite returns naive datetimes that the ORM's in-Python
# re-evaluation of the WHERE clause would compare with aware ones.
_NO_SYNC = {"synchronize_session": False}


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


def new_study_key() -> str:
    return "st-" + uuid.uuid4().hex[:12]


class StudyChanged(RuntimeError):
    """The study's version or state moved on under a worker (late instance, CLI retry)."""


@dataclass(frozen=True)
class TakenOver:
    """An attempt found in flight when a deliverer took the lease: the EHR may or may not have it."""

    message_id: int
    study_id: int
    control_id: str
    attempt: int
    previous_holder: str


@dataclass(frozen=True)
class Registered:
    study: Study
    duplicate: bool


class Repo:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions = session_factory(engine)
        # SQLite has no row locks: claims in one process go through this lock (one daemon per database).
        self._claim_lock = threading.Lock()
        self._sqlite = is_sqlite(engine)

    # ---- health -------------------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False

    # ---- registration -------------------------------------------------------------------------
    def register_file(self, *, source: str, path: str, name: str, sha256: str, filename_pattern: str | None,
                      actor: str, batch_run_id: int | None = None,
                      stamp: tuple[int, int] | None = None) -> Registered:
        """Record a claimed file: a new study (READY: it was stable when claimed) or a duplicate.

        An archive batch passes its run (the study is then the batch's, not the daemon's) and the
        file's (size, mtime_ns): the hash is cached under the path in the same transaction.
        """
        now = utcnow()
        for _ in range(3):  # a concurrent insert of the same content loses the unique index race
            with self.sessions.begin() as s:
                original = s.scalar(select(Study).where(Study.content_hash == sha256,
                                                        Study.duplicate_of.is_(None)))
                study = Study(key=new_study_key(), state=State.RECEIVED, version=1, source=source,
                              source_kind="file", content_hash=sha256, input_path=path, input_name=name,
                              filename_pattern=filename_pattern, attempts=0, received_at=now, updated_at=now,
                              batch_run_id=batch_run_id)
                if original is not None:
                    study.state = State.DUPLICATE
                    study.duplicate_of = original.id
                    study.finished_at = now
                try:
                    s.add(study)
                    s.flush()
                except IntegrityError:
                    s.rollback()
                    continue
                self._event(s, study, "study.received", None, State.RECEIVED, actor,
                            {"source": source, "size_hash": sha256[:12]})
                if original is not None:
                    self._event(s, study, "study.duplicate", State.RECEIVED, State.DUPLICATE, actor,
                                {"duplicate_of": original.key})
                else:
                    study.state = State.READY
                    study.ready_at = now
                    self._event(s, study, "study.ready", State.RECEIVED, State.READY, actor, None)
                if stamp is not None:
                    s.execute(ArchiveFile.__table__.delete().where(ArchiveFile.path == path))
                    s.add(ArchiveFile(path=path, size=stamp[0], mtime_ns=stamp[1], sha256=sha256,
                                      study_id=study.id, seen_at=now))
                return Registered(study, original is not None)
        raise RuntimeError("could not register file after repeated conflicts")

    def known_instance(self, sop_instance_uid: str) -> bool:
        with self.sessions() as s:
            return s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)) is not None

    def register_instance(self, *, study_uid: str, sop_instance_uid: str, sop_class_uid: str, path: str,
                          folder: str, size: int, calling_ae: str, source: str | None = None,
                          batch_run_id: int | None = None) -> tuple[Study, bool]:
        """Record one received DICOM instance; returns (study, stored). stored=False: a duplicate UID.

        The study collects instances in RECEIVED until ``stable_age`` passes. An instance for a study
        that is already past RECEIVED reopens it as a new version (reprocessed: a correction).
        """
        now = utcnow()
        actor = source or f"dicom:{calling_ae}"
        for _ in range(3):
            with self.sessions.begin() as s:
                if s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)):
                    study = s.scalar(select(Study).join(Instance, Instance.study_id == Study.id)
                                     .where(Instance.sop_instance_uid == sop_instance_uid))
                    return study, False
                study = s.scalar(select(Study).where(Study.dicom_study_uid == study_uid).with_for_update())
                try:
                    if study is None:
                        study = Study(key=new_study_key(), state=State.RECEIVED, version=1, source=actor,
                                      source_kind="dicom", dicom_study_uid=study_uid, study_uid=study_uid,
                                      input_path=folder, attempts=0, received_at=now, updated_at=now,
                                      last_instance_at=now, batch_run_id=batch_run_id)
                        s.add(study)
                        s.flush()
                        self._event(s, study, "study.received", None, State.RECEIVED, actor, None)
                    elif study.state != State.RECEIVED:
                        study.version += 1
                        study.last_instance_at = now
                        self._reopen(s, study, "study.reopened", actor, State.RECEIVED,
                                     {"reason": "instance arrived after the study was complete"})
                    else:
                        study.last_instance_at = now
                        study.updated_at = now
                    s.add(Instance(sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                                   study_id=study.id, path=path, size=size, calling_ae=calling_ae,
                                   received_at=now))
                    s.flush()
                except IntegrityError:
                    s.rollback()
                    continue
                return study, True
        raise RuntimeError("could not register instance after repeated conflicts")

    def promote_stable(self, stable_age_seconds: float, actor: str = "scheduler",
                       study_ids: Sequence[int] | None = None) -> list[Study]:
        """RECEIVED DICOM studies with no new instance for ``stable_age_seconds`` become READY
        (a batch passes the studies it has read completely, with age 0)."""
        cutoff = utcnow() - timedelta(seconds=stable_age_seconds)
        promoted = []
        with self.sessions.begin() as s:
            q = select(Study).where(Study.state == State.RECEIVED, Study.source_kind == "dicom",
                                    Study.last_instance_at <= cutoff)
            q = q.where(Study.id.in_(study_ids)) if study_ids is not None else q.where(Study.batch_run_id.is_(None))
            rows = s.scalars(q).all()
            for study in rows:
                n = self._guarded(s, study, State.RECEIVED, State.READY, {"ready_at": utcnow()})
                if n:
                    count = s.scalar(select(func.count()).select_from(Instance).where(Instance.study_id == study.id))
                    self._event(s, study, "study.ready", State.RECEIVED, State.READY, actor,
                                {"instances": count})
                    promoted.append(study)
        return promoted

    def restart_stable_clocks(self, actor: str) -> int:
        """On the daemon's start: every DICOM study still receiving starts its stable age again (time
        the receiver was down must not count: the sender may have been cut off mid-study by it)."""
        now = utcnow()
        with self.sessions.begin() as s:
            rows = s.scalars(select(Study).where(Study.state == State.RECEIVED, Study.source_kind == "dicom",
                                                 Study.batch_run_id.is_(None))).all()
            for study in rows:
                study.last_instance_at = now
                self._event(s, study, "study.stable_clock_restarted", None, None, actor,
                            {"reason": "daemon start: downtime does not count toward the stable age"})
            return len(rows)

    # ---- the worker's side --------------------------------------------------------------------
    def claim(self, worker: str, lease_seconds: float) -> Study | None:
        """Take the oldest study waiting for a worker, with a lease; None when there is none."""
        now = utcnow()
        with self._claim_lock, self.sessions.begin() as s:
            q = (select(Study)
                 .where(Study.state.in_([str(x) for x in WORKING_STATES]), Study.batch_run_id.is_(None),
                        or_(Study.next_attempt_at.is_(None), Study.next_attempt_at <= now),
                        or_(Study.lease_until.is_(None), Study.lease_until < now))
                 .order_by(Study.id).limit(1))
            if not self._sqlite:
                q = q.with_for_update(skip_locked=True)
            study = s.scalar(q)
            if study is None:
                return None
            n = s.execute(update(Study).where(Study.id == study.id, Study.version == study.version,
                                              Study.state == study.state,
                                              or_(Study.lease_until.is_(None), Study.lease_until < now))
                          .values(claimed_by=worker, lease_until=now + timedelta(seconds=lease_seconds),
                                  attempts=Study.attempts + 1, updated_at=now), execution_options=_NO_SYNC).rowcount
            if n != 1:
                return None
            s.refresh(study)
            return study

    def transition(self, study: Study, to_state: State, actor: str, event: str,
                   detail: dict[str, Any] | None = None, **fields: Any) -> Study:
        """Move ``study`` on from its current state; raises StudyChanged when it moved under us."""
        with self.sessions.begin() as s:
            if not self._guarded(s, study, State(study.state), to_state, fields):
                raise StudyChanged(study.key)
            self._event(s, study, event, study.state, to_state, actor, detail)
        return self._reload(study)

    def schedule_retry(self, study: Study, error: str, delay_seconds: float, actor: str) -> Study:
        """A transient failure: keep the state, release the lease, try again after ``delay_seconds``."""
        with self.sessions.begin() as s:
            fields = {"next_attempt_at": utcnow() + timedelta(seconds=delay_seconds), "last_error": error,
                      "error_kind": "transient", "claimed_by": None, "lease_until": None}
            if not self._guarded(s, study, State(study.state), State(study.state), fields):
                raise StudyChanged(study.key)
            self._event(s, study, "study.retry_scheduled", study.state, study.state, actor,
                        {"error": error, "delay_s": round(delay_seconds, 1), "attempt": study.attempts})
        return self._reload(study)

    def release(self, study: Study) -> None:
        """Give a claimed study back without changing its state (shutdown mid-study)."""
        with self.sessions.begin() as s:
            s.execute(update(Study).where(Study.id == study.id, Study.version == study.version)
                      .values(claimed_by=None, lease_until=None), execution_options=_NO_SYNC)

    def release_leases(self, worker_prefix: str) -> int:
        """On start: studies a previous run of this node held are free to resume at once."""
        with self.sessions.begin() as s:
            return s.execute(update(Study).where(Study.claimed_by.like(f"{worker_prefix}%"))
                             .values(claimed_by=None, lease_until=None), execution_options=_NO_SYNC).rowcount

    def set_fields(self, study: Study, **fields: Any) -> Study:
        with self.sessions.begin() as s:
            s.execute(update(Study).where(Study.id == study.id).values(updated_at=utcnow(), **fields), execution_options=_NO_SYNC)
        return self._reload(study)

    def add_outputs(self, study: Study, files: Sequence[tuple[str, int]], replace: bool = True) -> None:
        """Record the files of this version's outputs (replacing a record a crashed run left); with
        ``replace=False`` add ``files`` to the record (replacing only their own earlier rows)."""
        now = utcnow()
        with self.sessions.begin() as s:
            same = [Output.study_id == study.id, Output.version == study.version]
            if not replace:
                same.append(Output.name.in_([n for n, _ in files]))
            s.execute(Output.__table__.delete().where(*same))
            s.add_all(Output(study_id=study.id, version=study.version, name=n, size=size, created_at=now)
                      for n, size in files)

    def instances_of(self, study_id: int) -> list[Instance]:
        with self.sessions() as s:
            return list(s.scalars(select(Instance).where(Instance.study_id == study_id).order_by(Instance.id)))

    def move_instance(self, instance_id: int, path: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Instance).where(Instance.id == instance_id).values(path=path), execution_options=_NO_SYNC)

    # ---- the operator's side ------------------------------------------------------------------
    def retry(self, study_id: int, actor: str) -> Study:
        """A FAILED study goes back to READY with a fresh attempt count (input stays where it is)."""
        with self.sessions.begin() as s:
            study = s.get(Study, study_id)
            if study is None:
                raise KeyError(study_id)
            if study.state != State.FAILED:
                raise ValueError(f"study {study.key} is {study.state}; only FAILED studies can be retried")
            self._reopen(s, study, "study.retry", actor)
        return self._reload(study)

    def reprocess(self, study_id: int, actor: str) -> Study:
        """Any finished study (not a duplicate) runs again as a new version."""
        with self.sessions.begin() as s:
            study = s.get(Study, study_id)
            if study is None:
                raise KeyError(study_id)
            if study.state not in [str(x) for x in FINAL_STATES] or study.state == State.DUPLICATE:
                raise ValueError(f"study {study.key} is {study.state}; only finished studies can be reprocessed")
            study.version += 1
            self._reopen(s, study, "study.reprocess", actor)
        return self._reload(study)

    def replace_input(self, study_id: int, *, path: str, sha256: str, size: int, actor: str) -> Study:
        """A FAILED file study's corrected input: its SHA-256 and path recorded, a ``study.input_replaced``
        event, and back to READY as :meth:`retry` does, all in one transaction.

        ValueError for a DICOM study, a study that is not FAILED, or content another original study
        already has (the duplicate detection a new file gets; the unique index decides a race).
        """
        try:
            with self.sessions.begin() as s:
                study = s.get(Study, study_id)
                if study is None:
                    raise KeyError(study_id)
                if study.source_kind != "file":
                    raise ValueError(f"study {study.key} is a DICOM study; only a file study's input "
                                     "can be replaced")
                if study.state != State.FAILED:
                    raise ValueError(f"study {study.key} is {study.state}; only FAILED studies can have "
                                     "their input replaced")
                other = s.scalar(select(Study.key).where(Study.content_hash == sha256,
                                                         Study.duplicate_of.is_(None), Study.id != study.id))
                if other is not None:
                    raise ValueError(f"the same content is already study {other}")
                old = study.content_hash or ""
                study.content_hash = sha256
                study.input_path = path
                # a concurrent registration of the same content fails here, on uq_studies_content_original
                s.flush()
                self._event(s, study, "study.input_replaced", study.state, study.state, actor,
                            {"old_sha256": old[:12], "new_sha256": sha256[:12], "size": size})
                self._reopen(s, study, "study.retry", actor)
        except IntegrityError:
            with self.sessions() as s:
                other = s.scalar(select(Study.key).where(Study.content_hash == sha256,
                                                         Study.duplicate_of.is_(None), Study.id != study_id))
            raise ValueError(f"the same content is already study {other or '(another study)'}") from None
        return self._reload(study)

    def _reopen(self, s: Session, study: Study, event: str, actor: str, to_state: State = State.READY,
                detail: dict[str, Any] | None = None) -> None:
        """Back into the queue (READY) or collecting instances again (RECEIVED), attempts reset."""
        previous = study.state
        now = utcnow()
        study.state = to_state
        study.attempts = 0
        study.next_attempt_at = None
        study.claimed_by = None
        study.lease_until = None
        study.finished_at = None
        study.ready_at = now if to_state == State.READY else None
        study.updated_at = now
        self._event(s, study, event, previous, to_state, actor, detail)

    def get(self, ref: str | int) -> Study | None:
        with self.sessions() as s:
            if isinstance(ref, int) or str(ref).isdigit():
                return s.get(Study, int(ref))
            return s.scalar(select(Study).where(Study.key == ref))

    def list(self, state: str | None = None, limit: int = 50) -> list[Study]:
        with self.sessions() as s:
            q = select(Study).order_by(Study.id.desc()).limit(limit)
            if state:
                q = q.where(Study.state == state.upper())
            return list(s.scalars(q))

    def events(self, study_id: int) -> list[Event]:
        with self.sessions() as s:
            return list(s.scalars(select(Event).where(Event.study_id == study_id).order_by(Event.id)))

    def outputs(self, study_id: int) -> list[Output]:
        with self.sessions() as s:
            return list(s.scalars(select(Output).where(Output.study_id == study_id).order_by(Output.id)))

    def counts_by_state(self) -> dict[str, int]:
        with self.sessions() as s:
            return {state: n for state, n in s.execute(select(Study.state, func.count()).group_by(Study.state))}

    def misplaced_inputs(self, spool: str, processed: str, quarantine: str) -> list[Study]:
        """Studies whose input is not where their state puts it (a crash between the state and the move):
        past the worker with the input still in the spool; FAILED with it in processed/ (a dead letter);
        done and not FAILED with it in quarantine/ (a dead letter retried and delivered)."""
        done = [str(x) for x in PIPELINE_DONE if x != State.FAILED]
        with self.sessions() as s:
            return list(s.scalars(select(Study).where(or_(
                (Study.state.in_([*done, str(State.FAILED)])) & Study.input_path.like(f"{spool}%"),
                (Study.state == str(State.FAILED)) & Study.input_path.like(f"{processed}%"),
                (Study.state.in_(done)) & Study.input_path.like(f"{quarantine}%")))))

    # ---- outbox ---------------------------------------------------------------------------------
    def queue_message(self, study: Study, to_state: State, actor: str, event: str, detail: dict[str, Any] | None,
                      *, destination: str, control_id: str, er7: str, message_state: MessageState,
                      correction: bool, **fields: Any) -> tuple[Study, Message]:
        """Move the study to QUEUED or SHADOW and commit its message in the same transaction.

        Older unsent messages of the same study are superseded: the EHR gets the newest version only.
        """
        now = utcnow()
        with self.sessions.begin() as s:
            if not self._guarded(s, study, State(study.state), to_state, fields):
                raise StudyChanged(study.key)
            if not self._sqlite:
                # Outbox ids of one destination are handed out in commit order across nodes, so the
                # deliverer never sends id N+1 while id N is still uncommitted (results stay in order).
                s.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:d))"),
                          {"k": _PG_OUTBOX_LOCK, "d": destination})
            s.execute(update(Message).where(Message.study_id == study.id,
                                            Message.state.in_([str(MessageState.PENDING),
                                                               str(MessageState.HELD)]))
                      .values(state=str(MessageState.SUPERSEDED), updated_at=now), execution_options=_NO_SYNC)
            msg = Message(study_id=study.id, study_version=study.version, destination=destination,
                          control_id=control_id, message=er7, state=str(message_state), correction=correction,
                          attempts=0, created_at=now, updated_at=now)
            s.add(msg)
            s.flush()
            self._event(s, study, event, study.state, to_state, actor,
                        {**(detail or {}), "message_id": msg.id, "control_id": control_id})
        return self._reload(study), msg

    def next_message(self, destination: str) -> Message | None:
        """The oldest pending message for ``destination``; None when there is none or it is not due yet
        (the queue holds behind a message in backoff: results arrive in order)."""
        with self.sessions() as s:
            msg = s.scalar(select(Message).where(Message.destination == destination,
                                                 Message.state == str(MessageState.PENDING))
                           .order_by(Message.id).limit(1))
            if msg is None:
                return None
            due = aware(msg.next_attempt_at)
            return msg if due is None or due <= utcnow() else None

    # ---- one deliverer per destination, attempts recorded before the bytes leave ------------------
    def hold_delivery(self, destination: str, holder: str, lease_seconds: float,
                      take_from: str | None = None) -> list[TakenOver] | None:
        """Take or renew the destination's delivery lease; None when another holder has it.

        The lease is free when it has expired, or when ``take_from`` (a holder the caller knows is dead:
        this node's previous process) has it. Every attempt still IN_FLIGHT for the destination is then
        stale (one drain at a time per holder): it becomes INTERRUPTED with a ``message.possible_duplicate``
        event, and the message is resent with the same MSH-10. Returns those attempts.
        """
        try:
            with self.sessions.begin() as s:
                return self._hold_delivery(s, destination, holder, lease_seconds, take_from)
        except IntegrityError:
            return None  # another node inserted the lease first

    def _hold_delivery(self, s: Session, destination: str, holder: str, lease_seconds: float,
                       take_from: str | None) -> list[TakenOver] | None:
        # Writes first: on SQLite a read before the first write could not be upgraded to a write lock
        # once another connection of this process committed (SQLITE_BUSY_SNAPSHOT).
        now = self._db_now(s)
        until = now + timedelta(seconds=lease_seconds)
        lease = DeliveryLease.destination == destination
        renewed = s.execute(update(DeliveryLease).where(lease, DeliveryLease.holder == holder)
                            .values(lease_until=until), execution_options=_NO_SYNC).rowcount
        if not renewed:
            free = DeliveryLease.lease_until < now
            if take_from is not None:
                free = or_(free, DeliveryLease.holder == take_from)
            taken = s.execute(update(DeliveryLease).where(lease, free)
                              .values(holder=holder, lease_until=until, acquired_at=now),
                              execution_options=_NO_SYNC).rowcount
            if not taken:
                if s.scalar(select(DeliveryLease.holder).where(lease)) is not None:
                    return None  # a live lease of another holder
                s.add(DeliveryLease(destination=destination, holder=holder, lease_until=until, acquired_at=now))
                s.flush()
        return self._interrupt_stale_attempts(s, destination, holder, now)

    def release_delivery(self, destination: str, holder: str) -> None:
        """On a clean stop: hand the destination over at once instead of after the lease."""
        with self.sessions.begin() as s:
            s.execute(DeliveryLease.__table__.delete().where(DeliveryLease.destination == destination,
                                                             DeliveryLease.holder == holder))

    def delivery_holder(self, destination: str) -> str | None:
        with self.sessions() as s:
            return s.scalar(select(DeliveryLease.holder).where(DeliveryLease.destination == destination))

    def begin_attempt(self, msg: Message, holder: str, lease_seconds: float) -> DeliveryAttempt | None:
        """Record an attempt (IN_FLIGHT) before the first byte leaves, counting it on the message.

        Fenced by the lease: None (nothing recorded, nothing may be sent) when this holder no longer
        holds a live lease on the message's destination, or the message is no longer pending.
        """
        with self.sessions.begin() as s:
            now = self._db_now(s)
            n = s.execute(update(DeliveryLease).where(DeliveryLease.destination == msg.destination,
                                                      DeliveryLease.holder == holder,
                                                      DeliveryLease.lease_until >= now)
                          .values(lease_until=now + timedelta(seconds=lease_seconds)),
                          execution_options=_NO_SYNC).rowcount
            if n != 1:
                return None
            n = s.execute(update(Message).where(Message.id == msg.id, Message.state == str(MessageState.PENDING))
                          .values(attempts=Message.attempts + 1, updated_at=utcnow()),
                          execution_options=_NO_SYNC).rowcount
            if n != 1:
                return None
            number = (s.scalar(select(func.max(DeliveryAttempt.attempt))
                               .where(DeliveryAttempt.message_id == msg.id)) or 0) + 1
            attempt = DeliveryAttempt(message_id=msg.id, attempt=number, holder=holder, started_at=utcnow(),
                                      outcome=str(AttemptOutcome.IN_FLIGHT))
            s.add(attempt)
            s.flush()
            return attempt

    def attempts(self, message_id: int) -> list[DeliveryAttempt]:
        with self.sessions() as s:
            return list(s.scalars(select(DeliveryAttempt).where(DeliveryAttempt.message_id == message_id)
                                  .order_by(DeliveryAttempt.attempt)))

    def message_sent(self, msg: Message, attempt: DeliveryAttempt, ack_code: str, ack_text: str | None,
                     actor: str) -> None:
        now = utcnow()
        with self.sessions.begin() as s:
            self._finish_attempt(s, attempt, AttemptOutcome.ACKED, ack_code, None)
            s.execute(update(Message).where(Message.id == msg.id).values(
                state=str(MessageState.SENT), ack_code=ack_code, ack_text=ack_text, sent_at=now, updated_at=now,
                last_error=None), execution_options=_NO_SYNC)
            self._move_study_of(s, msg, (State.QUEUED, State.FAILED), State.DELIVERED, "study.delivered", actor,
                                {"message_id": msg.id, "control_id": msg.control_id, "ack": ack_code,
                                 "attempt": attempt.attempt},
                                last_error=None, error_kind=None)

    def message_retry_later(self, msg: Message, attempt: DeliveryAttempt | None, error: str,
                            delay_seconds: float, ack_code: str | None = None) -> int:
        """Keep the message first in line until ``delay_seconds`` pass; returns its tries so far.

        ``attempt`` None: the connection could not be opened, no byte left (a try, not an attempt)."""
        with self.sessions.begin() as s:
            self._end_try(s, msg, attempt, ack_code, error, last_error=error, updated_at=utcnow(),
                          next_attempt_at=utcnow() + timedelta(seconds=delay_seconds))
            return s.get(Message, msg.id).attempts

    def message_dead(self, msg: Message, attempt: DeliveryAttempt | None, reason: str, ack_code: str | None,
                     actor: str) -> None:
        """Dead letter: the message leaves the queue (the next one goes), the study is FAILED with the reason."""
        now = utcnow()
        with self.sessions.begin() as s:
            self._end_try(s, msg, attempt, ack_code, reason, state=str(MessageState.DEAD), ack_code=ack_code,
                          last_error=reason, updated_at=now)
            self._move_study_of(s, msg, (State.QUEUED,), State.FAILED, "message.dead_letter", actor,
                                {"message_id": msg.id, "control_id": msg.control_id, "reason": reason},
                                last_error=f"delivery: {reason}", error_kind="delivery", finished_at=now)

    def _end_try(self, s: Session, msg: Message, attempt: DeliveryAttempt | None, answer: str | None,
                 error: str, **values: Any) -> None:
        """A try that was not accepted: its attempt ends NAKED (``answer``: the ACK code) or ERROR; a try without an
        attempt (no connection) is counted on the message, whose other ``values`` are set with it."""
        if attempt is None:
            values["attempts"] = Message.attempts + 1
        else:
            self._finish_attempt(s, attempt, AttemptOutcome.NAKED if answer else AttemptOutcome.ERROR,
                                 answer, error)
        s.execute(update(Message).where(Message.id == msg.id).values(**values), execution_options=_NO_SYNC)

    def _finish_attempt(self, s: Session, attempt: DeliveryAttempt, outcome: AttemptOutcome,
                        ack_code: str | None, error: str | None) -> None:
        s.execute(update(DeliveryAttempt).where(DeliveryAttempt.id == attempt.id,
                                                DeliveryAttempt.outcome == str(AttemptOutcome.IN_FLIGHT))
                  .values(outcome=str(outcome), ack_code=ack_code, error=error and error[:500],
                          finished_at=utcnow()), execution_options=_NO_SYNC)

    def _interrupt_stale_attempts(self, s: Session, destination: str, holder: str,
                                  now: datetime) -> list[TakenOver]:
        rows = s.execute(select(DeliveryAttempt, Message)
                         .join(Message, Message.id == DeliveryAttempt.message_id)
                         .where(Message.destination == destination,
                                DeliveryAttempt.outcome == str(AttemptOutcome.IN_FLIGHT))).all()
        found = []
        for attempt, msg in rows:
            s.execute(update(DeliveryAttempt).where(DeliveryAttempt.id == attempt.id)
                      .values(outcome=str(AttemptOutcome.INTERRUPTED), finished_at=now,
                              error=f"interrupted: found in flight by {holder}; the EHR may have it"),
                      execution_options=_NO_SYNC)
            study = s.get(Study, msg.study_id)
            if study is not None:
                self._event(s, study, "message.possible_duplicate", None, None, holder,
                            {"message_id": msg.id, "control_id": msg.control_id, "attempt": attempt.attempt,
                             "previous_holder": attempt.holder})
            found.append(TakenOver(msg.id, msg.study_id, msg.control_id, attempt.attempt, attempt.holder))
        return found

    def _db_now(self, s: Session) -> datetime:
        """The database's clock for leases shared between nodes (SQLite: one host, its clock)."""
        if self._sqlite:
            return utcnow()
        return aware(s.scalar(select(func.now())))

    def message_requeue(self, message_id: int, actor: str, *, resend: bool) -> Message:
        """``retry`` a dead letter, or ``resend`` a sent message (same ER7, same MSH-10)."""
        allowed = (MessageState.SENT,) if resend else (MessageState.DEAD,)
        now = utcnow()
        with self.sessions.begin() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                raise KeyError(message_id)
            if msg.state not in [str(x) for x in allowed]:
                raise ValueError(f"message {message_id} is {msg.state}; "
                                 f"{'resend' if resend else 'retry'} takes {allowed[0]} messages")
            msg.state = str(MessageState.PENDING)
            msg.attempts = 0
            msg.next_attempt_at = None
            msg.updated_at = now
            self._move_study_of(s, msg, (State.FAILED, State.DELIVERED), State.QUEUED,
                                "message.resend" if resend else "message.retry", actor, {"message_id": msg.id})
        return self.message(message_id)

    def message_release(self, message_ids: Sequence[int] | None, actor: str) -> list[int]:
        """HELD messages (a batch run with --no-send) become PENDING, their studies QUEUED; None: all."""
        now = utcnow()
        with self.sessions.begin() as s:
            q = select(Message).where(Message.state == str(MessageState.HELD)).order_by(Message.id)
            if message_ids is not None:
                q = q.where(Message.id.in_(message_ids))
            released = []
            for msg in s.scalars(q).all():
                msg.state = str(MessageState.PENDING)
                msg.attempts = 0
                msg.next_attempt_at = None
                msg.updated_at = now
                self._move_study_of(s, msg, (State.HELD,), State.QUEUED, "message.release", actor,
                                    {"message_id": msg.id})
                released.append(msg.id)
        return released

    def _move_study_of(self, s: Session, msg: Message, from_states: tuple[State, ...], to_state: State,
                       event: str, actor: str, detail: dict[str, Any], **fields: Any) -> None:
        """The message's study follows it, when the study is still at the message's version and in
        one of ``from_states`` (a newer version or a CLI action has the last word otherwise)."""
        study = s.get(Study, msg.study_id)
        if study is None or study.version != msg.study_version or study.state not in from_states:
            return
        previous = study.state
        study.state = to_state
        study.updated_at = utcnow()
        for name, value in fields.items():
            setattr(study, name, value)
        self._event(s, study, event, previous, to_state, actor, detail)

    def message(self, message_id: int) -> Message | None:
        with self.sessions() as s:
            return s.get(Message, message_id)

    def messages(self, state: str | None = None, study_id: int | None = None, limit: int = 50) -> list[Message]:
        with self.sessions() as s:
            q = select(Message).order_by(Message.id.desc()).limit(limit)
            if state:
                q = q.where(Message.state == state.upper())
            if study_id is not None:
                q = q.where(Message.study_id == study_id)
            return list(s.scalars(q))

    def oldest_pending_at(self, destination: str) -> datetime | None:
        """When the oldest message still waiting for ``destination`` was queued (None: nothing waits)."""
        with self.sessions() as s:
            return aware(s.scalar(select(func.min(Message.created_at)).where(
                Message.destination == destination, Message.state == str(MessageState.PENDING))))

    def outbox_counts(self) -> dict[str, int]:
        with self.sessions() as s:
            return {st: n for st, n in s.execute(select(Message.state, func.count()).group_by(Message.state))}

    def was_delivered(self, study_id: int) -> bool:
        with self.sessions() as s:
            return s.scalar(select(Message.id).where(Message.study_id == study_id,
                                                     Message.state == str(MessageState.SENT)).limit(1)) is not None

    # ---- the site's reference distribution --------------------------------------------------------
    def add_reference(self, study_id: int, model_hash: str, values: dict[str, float]) -> None:
        """Record (or, on reprocessing, replace) a study's watched hazards in the reference."""
        now = utcnow()
        with self.sessions.begin() as s:
            s.execute(ReferenceHazard.__table__.delete().where(ReferenceHazard.study_id == study_id))
            s.add_all(ReferenceHazard(study_id=study_id, model_hash=model_hash, label=label, log_hazard=value,
                                      created_at=now) for label, value in values.items())

    def percentile(self, label: str, model_hash: str, log_hazard: float,
                   exclude_study: int | None = None) -> tuple[float, int] | None:
        """(percent of the reference below ``log_hazard``, reference size), or None without a reference."""
        with self.sessions() as s:
            base = [ReferenceHazard.label == label, ReferenceHazard.model_hash == model_hash]
            if exclude_study is not None:
                base.append(ReferenceHazard.study_id != exclude_study)
            n = s.scalar(select(func.count()).select_from(ReferenceHazard).where(*base)) or 0
            if n == 0:
                return None
            below = s.scalar(select(func.count()).select_from(ReferenceHazard)
                             .where(*base, ReferenceHazard.log_hazard < log_hazard)) or 0
            return 100.0 * below / n, n

    def reference_sizes(self, model_hash: str | None = None) -> dict[str, int]:
        """Watched outcome label -> studies in the reference (of ``model_hash``; of every model when None,
        keyed ``label@model-hash``)."""
        with self.sessions() as s:
            if model_hash is not None:
                rows = s.execute(select(ReferenceHazard.label, func.count()).where(
                    ReferenceHazard.model_hash == model_hash).group_by(ReferenceHazard.label)).all()
                return {label: n for label, n in rows}
            rows = s.execute(select(ReferenceHazard.label, ReferenceHazard.model_hash, func.count())
                             .group_by(ReferenceHazard.label, ReferenceHazard.model_hash)).all()
            return {f"{label}@{model}": n for label, model, n in rows}

    def known_input(self, path: str) -> bool:
        with self.sessions() as s:
            return s.scalar(select(Study.id).where(Study.input_path == path).limit(1)) is not None

    # ---- internals ----------------------------------------------------------------------------
    def _guarded(self, s: Session, study: Study, from_state: State, to_state: State,
                 fields: dict[str, Any]) -> bool:
        values = {"state": str(to_state), "updated_at": utcnow(), **fields}
        n = s.execute(update(Study).where(Study.id == study.id, Study.version == study.version,
                                          Study.state == str(from_state)).values(**values), execution_options=_NO_SYNC).rowcount
        return n == 1

    def _event(self, s: Session, study: Study, event: str, from_state: str | None, to_state: str | None,
               actor: str, detail: dict[str, Any] | None) -> None:
        """Record an event; every state change passes here, so here it is checked against the table
        (raising rolls the whole transaction back: an illegal transition is never committed)."""
        check_transition(event, from_state, to_state)
        s.add(Event(study_id=study.id, at=utcnow(), event=event, from_state=from_state and str(from_state),
                    to_state=to_state and str(to_state), version=study.version, actor=actor, detail=detail))

    def _reload(self, study: Study) -> Study:
        with self.sessions() as s:
            fresh = s.get(Study, study.id)
            if fresh is None:
                raise StudyChanged(study.key)
            return fresh
