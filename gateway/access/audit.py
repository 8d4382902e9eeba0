"""The append-only access audit: every view of a page that shows PHI and every action, with who, when,
which study and what.

PHI rule: a row names a study by its key and id, a message by its id, a montage by its label, a page by
its path; it never holds a patient's name, identifiers, birth date or the HL7 text. Callers pass only
keys, labels and ids in ``target`` and ``detail``; ``record`` refuses a ``detail`` with an identifier
field it knows (``patient_name``, ``patient_id``, ...) as a last guard.

Append-only: this module has no update or delete, and the database refuses both (triggers from
migration 0005, on SQLite and PostgreSQL). ``psg-gateway audit export`` hands rows to the privacy office.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from ..store.models import AccessAudit as AuditTable
from ..store.repo import Repo, aware, utcnow

__all__ = ["PHI_DETAIL_KEYS", "AccessAudit", "AuditRow"]

# detail keys that would carry PHI: refused, whatever their value
PHI_DETAIL_KEYS = frozenset({"patient_name", "patient_id", "patient_id_issuer", "birth_date", "accession",
                             "mrn", "name", "dob", "message", "er7", "input_name", "input_path"})


@dataclass(frozen=True)
class AuditRow:
    """One audit entry, as exported."""

    id: int
    at: datetime
    user_name: str
    action: str
    study_id: int | None
    study_key: str | None
    target: str | None
    detail: dict[str, Any] | None
    remote_addr: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``at`` as ISO 8601 (UTC)."""
        doc = asdict(self)
        doc["at"] = self.at.isoformat()
        return doc


def _utc(dt: datetime) -> datetime:
    """UTC, as stored (SQLite compares the text: a bound in another zone would compare wrongly);
    a naive datetime is taken as UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _clip(value: str | None, size: int) -> str | None:
    return None if value is None else str(value)[:size]


class AccessAudit:
    """Write and read the access audit through a ``Repo``'s sessions."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self.sessions = repo.sessions

    def record(self, user: str, action: str, *, study_id: int | None = None, study_key: str | None = None,
               target: str | None = None, detail: dict[str, Any] | None = None,
               remote_addr: str | None = None) -> None:
        """Append one entry (its own transaction). ``target``: a page path, message id or label;
        ``detail``: small JSON with keys, labels and ids only, never PHI (ValueError for a PHI key)."""
        if not user or not action:
            raise ValueError("an audit entry needs a user and an action")
        if detail is not None:
            phi = sorted(k for k in detail if k.lower() in PHI_DETAIL_KEYS)
            if phi:
                raise ValueError(f"audit detail must not carry PHI: {', '.join(phi)}")
        row = AuditTable(at=utcnow(), user_name=_clip(user, 64), action=_clip(action, 64), study_id=study_id,
                         study_key=_clip(study_key, 32), target=_clip(target, 256), detail=detail,
                         remote_addr=_clip(remote_addr, 64))
        with self.sessions.begin() as s:
            s.add(row)

    def rows(self, since: datetime, until: datetime | None = None, user: str | None = None) -> list[AuditRow]:
        """Entries at or after ``since`` and before ``until``, optionally of one user, oldest first."""
        query = select(AuditTable).where(AuditTable.at >= _utc(since))
        if until is not None:
            query = query.where(AuditTable.at < _utc(until))
        if user is not None:
            query = query.where(AuditTable.user_name == user)
        with self.sessions() as s:
            return [AuditRow(id=r.id, at=aware(r.at), user_name=r.user_name, action=r.action,
                             study_id=r.study_id, study_key=r.study_key, target=r.target, detail=r.detail,
                             remote_addr=r.remote_addr)
                    for r in s.scalars(query.order_by(AuditTable.at, AuditTable.id))]
