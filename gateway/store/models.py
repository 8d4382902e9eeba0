"""SQLAlchemy 2 models: studies, DICOM instances, the append-only event log, and stored outputs.

One row per study. ``version`` counts how many times the study has been (re)opened for processing: a
DICOM instance arriving after the study was processed, or ``studies reprocess``, bumps it, and every
state change is guarded by (id, version) so a worker never overwrites a newer version's state.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..pipeline.states import FINAL_STATES, PIPELINE_DONE, WORKING_STATES, State

__all__ = ["FINAL_STATES", "PIPELINE_DONE", "WORKING_STATES", "AccessAudit", "ArchiveFile", "AttemptOutcome", "Base", "BatchRun", "DeliveryAttempt", "DeliveryLease", "Event", "Instance", "Message", "MessageState", "Output", "ReferenceHazard", "State", "Study", "StudyReview", "User"]


_TS = DateTime(timezone=True)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: _TS}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(32), unique=True)  # what logs carry: never PHI
    state: Mapped[str] = mapped_column(String(16), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    source: Mapped[str] = mapped_column(String(512))  # folder:/path, dicom:AE, archive, cli
    source_kind: Mapped[str] = mapped_column(String(16))  # file | dicom
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)  # SHA-256 of a file input
    dicom_study_uid: Mapped[str | None] = mapped_column(String(64))
    input_path: Mapped[str | None] = mapped_column(Text)  # where the input is now (spool, processed, quarantine)
    input_name: Mapped[str | None] = mapped_column(Text)  # the name it arrived under
    filename_pattern: Mapped[str | None] = mapped_column(Text)
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("studies.id"))
    # identifiers as decoded (for HL7 and the CLI; never logged)
    patient_id: Mapped[str | None] = mapped_column(String(128))
    patient_id_issuer: Mapped[str | None] = mapped_column(String(128))
    accession: Mapped[str | None] = mapped_column(String(128))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(256))  # as recorded (family^given or free text)
    birth_date: Mapped[date | None] = mapped_column(Date)
    sex: Mapped[str | None] = mapped_column(String(1))
    recording_start: Mapped[datetime | None] = mapped_column(_TS)
    flags: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the flag decision (flags, findings, notes)
    montage_name: Mapped[str | None] = mapped_column(String(128))
    montage_version: Mapped[str | None] = mapped_column(String(64))
    bundle_name: Mapped[str | None] = mapped_column(String(128))
    bundle_version: Mapped[str | None] = mapped_column(String(64))
    bundle_hash: Mapped[str | None] = mapped_column(String(64))
    bundle_validated: Mapped[bool | None] = mapped_column(Boolean)  # False: demo weights, test messages only
    output_path: Mapped[str | None] = mapped_column(Text)
    scorer: Mapped[str | None] = mapped_column(String(128))  # the scoring technician, as recorded
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(_TS)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(_TS)
    last_error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(16))  # transient | permanent
    received_at: Mapped[datetime] = mapped_column(_TS)
    last_instance_at: Mapped[datetime | None] = mapped_column(_TS)
    ready_at: Mapped[datetime | None] = mapped_column(_TS)
    finished_at: Mapped[datetime | None] = mapped_column(_TS)
    updated_at: Mapped[datetime] = mapped_column(_TS)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    mapping: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Registered by an archive batch: only batch runs process it (the daemon's workers leave it alone).
    batch_run_id: Mapped[int | None] = mapped_column(ForeignKey("batch_runs.id"), index=True)

    __table_args__ = (
        # One original per content hash; later copies are rows with duplicate_of set.
        Index("uq_studies_content_original", "content_hash", unique=True,
              sqlite_where=text("duplicate_of IS NULL"), postgresql_where=text("duplicate_of IS NULL")),
        Index("uq_studies_dicom_uid", "dicom_study_uid", unique=True),
        Index("ix_studies_claim", "state", "next_attempt_at"),
    )


class Instance(Base):
    """One DICOM SOP instance, stored once whatever how often it is sent."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(_TS)


class Event(Base):
    """Append-only audit log: every transition and action, who or what did it."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    at: Mapped[datetime] = mapped_column(_TS)
    event: Mapped[str] = mapped_column(String(64))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    version: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Output(Base):
    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(256))  # relative to the study's output folder
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(_TS)


class MessageState(StrEnum):
    PENDING = "PENDING"  # committed, waiting to be sent (or retried)
    SENT = "SENT"  # ACK AA/CA received
    DEAD = "DEAD"  # dead letter: AE/CE, or gave up after hl7.max_attempts
    SHADOW = "SHADOW"  # built and stored, never sent (flags.send_mode: shadow)
    SUPERSEDED = "SUPERSEDED"  # a newer version of the study replaced it before it was sent
    HELD = "HELD"  # built by a batch run with --no-send; ``outbox release`` makes it PENDING


class Message(Base):
    """The outbox: one ORU^R01 per study version, committed with the study's QUEUED/SHADOW state."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(256))
    control_id: Mapped[str] = mapped_column(String(64), unique=True)  # MSH-10, the same on every retry
    message: Mapped[str] = mapped_column(Text)  # ER7 exactly as sent
    state: Mapped[str] = mapped_column(String(16))
    correction: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(_TS)
    last_error: Mapped[str | None] = mapped_column(Text)
    ack_code: Mapped[str | None] = mapped_column(String(4))
    ack_text: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_TS)
    sent_at: Mapped[datetime | None] = mapped_column(_TS)
    updated_at: Mapped[datetime] = mapped_column(_TS)

    __table_args__ = (Index("ix_outbox_drain", "destination", "state", "id"),)


class AttemptOutcome(StrEnum):
    IN_FLIGHT = "IN_FLIGHT"  # recorded before the first byte left; a crash leaves it so
    ACKED = "ACKED"  # AA/CA received
    NAKED = "NAKED"  # AR/CR/AE/CE received: the EHR has the message and answered
    ERROR = "ERROR"  # timeout, reset or bad ACK after the record: the EHR may or may not have it
    INTERRUPTED = "INTERRUPTED"  # found IN_FLIGHT after a crash or a takeover: possibly received


class DeliveryAttempt(Base):
    """One time the message's bytes may have reached the EHR: committed after the connection is open and
    before the first byte is written, so every ORU the EHR receives is a row here."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per message
    holder: Mapped[str] = mapped_column(String(128))  # node:pid of the deliverer
    started_at: Mapped[datetime] = mapped_column(_TS)
    finished_at: Mapped[datetime | None] = mapped_column(_TS)
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    ack_code: Mapped[str | None] = mapped_column(String(4))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("uq_delivery_attempt", "message_id", "attempt", unique=True),)


class DeliveryLease(Base):
    """Who delivers to a destination: one holder across all nodes sharing the database, for a lease that
    the holder renews with every attempt; a dead holder's lease is taken over once it expires."""

    __tablename__ = "delivery_leases"

    destination: Mapped[str] = mapped_column(String(256), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    lease_until: Mapped[datetime] = mapped_column(_TS)
    acquired_at: Mapped[datetime] = mapped_column(_TS)


class ReferenceHazard(Base):
    """The site's own distribution of each watched outcome's hazard, per model (percentile flags)."""

    __tablename__ = "reference_hazards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    model_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(128))
    log_hazard: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(_TS)

    __table_args__ = (
        Index("uq_reference_study_label", "study_id", "label", unique=True),
        Index("ix_reference_lookup", "label", "model_hash", "log_hazard"),
    )


class BatchRun(Base):
    """One ``psg-gateway batch`` invocation: what it was asked, where it ran, how it ended."""

    __tablename__ = "batch_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(_TS)
    finished_at: Mapped[datetime | None] = mapped_column(_TS)
    status: Mapped[str] = mapped_column(String(16))  # running | finished | interrupted | failed
    host: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ArchiveFile(Base):
    """An archive file the batch has hashed: (path, size, mtime) -> content hash and study, so a
    resumed run does not read every file of a large archive again."""

    __tablename__ = "archive_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    seen_at: Mapped[datetime] = mapped_column(_TS)

    __table_args__ = (Index("uq_archive_files_path", "path", unique=True),)


class User(Base):
    """A console/CLI user: a role and an Argon2id password hash (``gateway.access``)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer | operator | admin
    password_hash: Mapped[str] = mapped_column(String(256))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)  # consecutive, reset by a success
    locked_until: Mapped[datetime | None] = mapped_column(_TS)
    last_login_at: Mapped[datetime | None] = mapped_column(_TS)
    created_at: Mapped[datetime] = mapped_column(_TS)
    updated_at: Mapped[datetime] = mapped_column(_TS)


class AccessAudit(Base):
    """Append-only access audit: who viewed which study's page or did what, and when. Study keys, ids,
    labels and paths only, never PHI. The database refuses UPDATE and DELETE (triggers, migration 0005)."""

    __tablename__ = "access_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(_TS, index=True)
    user_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))  # login, view, study.retry, user.add, ...
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"))
    study_key: Mapped[str | None] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(String(256))  # page path, message id, label
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    remote_addr: Mapped[str | None] = mapped_column(String(64))


class StudyReview(Base):
    """A reviewed mark on a study: who, when, and a note."""

    __tablename__ = "study_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(64))
    reviewed_at: Mapped[datetime] = mapped_column(_TS)
    note: Mapped[str] = mapped_column(Text)
