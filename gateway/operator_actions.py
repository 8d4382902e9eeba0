"""What an operator does to a study or a message, as a library: the ``psg-gateway studies retry|reprocess|
replace`` and ``outbox retry|resend|release`` commands and the web console's buttons call the same functions.

Each raises :class:`ActionError` (a ``ValueError``) with a one-line reason that names study keys and message
ids only, never a file name of the input (it may carry a patient's name).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from .config import GatewayConfig
from .fsutil import fsync_dir
from .store.models import Message, State, Study
from .store.repo import Repo

__all__ = ["ActionError", "preview_message", "release_messages", "reopen_study", "replace_input",
           "requeue_message"]


class ActionError(ValueError):
    """An operator action refused or failed; the message says why in one line."""


def reopen_study(repo: Repo, study: Study, action: Literal["retry", "reprocess"], actor: str) -> Study:
    """Put a FAILED study back in the queue (``retry``), or run a finished one again as a new version
    (``reprocess``); a running daemon picks it up."""
    try:
        return getattr(repo, action)(study.id, actor=actor)
    except ValueError as exc:
        raise ActionError(str(exc)) from None


def requeue_message(repo: Repo, message_id: int, actor: str, *, resend: bool) -> Message:
    """Send a dead letter again (``resend`` False) or a delivered message once more (True); same MSH-10."""
    try:
        return repo.message_requeue(message_id, actor=actor, resend=resend)
    except KeyError:
        raise ActionError(f"no message {message_id}") from None
    except ValueError as exc:
        raise ActionError(str(exc)) from None


def release_messages(repo: Repo, message_ids: Sequence[int] | None, actor: str) -> tuple[list[int], list[int]]:
    """Release HELD messages (None: all of them); returns (released, asked for but not HELD)."""
    released = repo.message_release(None if message_ids is None else list(message_ids), actor=actor)
    missing = sorted(set(message_ids or ()) - set(released))
    return released, missing


def preview_message(cfg: GatewayConfig, repo: Repo, study: Study) -> tuple[str, str | None]:
    """(ER7 text the study would send now, with flags re-evaluated, a note or None); nothing stored or sent."""
    from .hl7.compose import build_study_message
    from .pipeline.runner import study_decision

    if not study.output_path:
        raise ActionError(f"study {study.key} has no outputs yet ({study.state})")
    decision, _, sleep = study_decision(repo, cfg.flags, study)
    er7 = build_study_message(study, decision, sleep, cfg.hl7, control_id="PREVIEW", now=datetime.now(UTC),
                              correction=repo.was_delivered(study.id), validated=bool(study.bundle_validated),
                              include_metrics=cfg.flags.include_sleep_metrics)
    note = None
    if not decision.flagged and cfg.flags.send_mode == "flagged_only":
        note = "nothing flagged: with send_mode flagged_only this study sends no message"
    return er7, note


# ---- replace: a corrected input for a FAILED file study ------------------------------------------
_BLOCK = 1 << 22


def quarantined_input(cfg: GatewayConfig, s: Study) -> Path:
    """The study's input file in ``<quarantine>/<key>/`` (under the name it has there, not ``input_name``,
    which may be PHI); ActionError when the study or its files do not allow a replace."""
    if s.source_kind != "file":
        raise ActionError(f"study {s.key} is a DICOM study; only a file study's input can be replaced")
    if s.state != State.FAILED:
        raise ActionError(f"study {s.key} is {s.state}; only FAILED studies can have their input replaced")
    folder = Path(cfg.paths.quarantine or cfg.paths.var_dir / "quarantine") / s.key
    if not folder.is_dir():
        raise ActionError(f"the quarantine folder of study {s.key} is gone (removed by retention?); "
                          "nothing to replace")
    target = Path(s.input_path) if s.input_path else None
    if target is None or target.parent.resolve() != folder.resolve():
        # an archive batch's study keeps its file in the archive; a crash may have left it in the spool
        raise ActionError(f"the input of study {s.key} is not in its quarantine folder; nothing to replace")
    if not target.is_file():
        raise ActionError(f"the quarantined input of study {s.key} is gone (removed by retention?); "
                          "nothing to replace")
    return folder / target.name


def _stage_copy(source: Path, target: Path) -> tuple[Path, str, int]:
    """Copy ``source`` to a temporary file beside ``target``, hashing the bytes as they are copied (so the
    recorded SHA-256 is that of the bytes written, even if ``source`` changes meanwhile); fsynced.
    Returns (temporary file, SHA-256, size)."""
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent)
    try:
        os.fchmod(fd, stat.S_IMODE(target.stat().st_mode))  # the quarantined file's permissions, not 0600
        with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
            while block := src.read(_BLOCK):
                digest.update(block)
                dst.write(block)
                size += len(block)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), digest.hexdigest(), size


def _keep_old(target: Path, old: Path) -> None:
    """A second name for the old file until the database has the new hash: a failed transaction puts it
    back, so a refused replace leaves file and record as they were."""
    old.unlink(missing_ok=True)
    try:
        os.link(target, old)
    except OSError:  # a file system without hard links: a durable copy
        shutil.copy2(target, old)
        with open(old, "rb") as fh:
            os.fsync(fh.fileno())


def _original_with(repo: Repo, sha256: str, other_than: int) -> str | None:
    """The key of another original study (not a duplicate) with this content, if any."""
    with repo.sessions() as session:
        return session.scalar(select(Study.key).where(Study.content_hash == sha256,
                                                      Study.duplicate_of.is_(None), Study.id != other_than))


def replace_input(cfg: GatewayConfig, repo: Repo, s: Study, file: Path, actor: str) -> tuple[Study, str, int]:
    """Replace a FAILED study's quarantined input with ``file`` and put the study back in the queue;
    returns (study, SHA-256, size). ``file`` is hashed and checked for duplicates like a new file; the study
    keeps its key and its input's name, its record gets the new SHA-256 and a study.input_replaced event.
    A refused or failed replace leaves the quarantined file and the record as they were."""
    target = quarantined_input(cfg, s)
    if not file.is_file() or not os.access(file, os.R_OK):
        raise ActionError("FILE is not a readable file")  # its name is not repeated: it may carry a patient's name
    folder = target.parent
    try:
        tmp, sha256, size = _stage_copy(file, target)
    except OSError as exc:
        raise ActionError(f"cannot copy FILE into the quarantine folder of study {s.key}: {exc.strerror}") from None
    other = _original_with(repo, sha256, s.id)
    if other is not None:  # refused before the quarantined file is touched
        tmp.unlink(missing_ok=True)
        raise ActionError(f"the same content is already study {other}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    swapped = False
    try:
        _keep_old(target, old)
        os.replace(tmp, target)
        swapped = True
        fsync_dir(folder)
    except OSError as exc:
        if swapped:
            os.replace(old, target)
        tmp.unlink(missing_ok=True)
        old.unlink(missing_ok=True)
        raise ActionError(f"cannot replace the input of study {s.key}: {exc.strerror}") from None
    try:
        s = repo.replace_input(s.id, path=str(target), sha256=sha256, size=size, actor=actor)
    except (ValueError, KeyError, SQLAlchemyError) as exc:
        os.replace(old, target)  # the record kept the old hash: so does the folder
        fsync_dir(folder)
        raise ActionError(str(exc) if isinstance(exc, ValueError)
                          else f"study {s.key} not changed: {type(exc).__name__}") from None
    old.unlink(missing_ok=True)
    fsync_dir(folder, best_effort=True)
    return s, sha256, size
