"""Reviewed marks: a reviewer says they looked at a study's result, with a note (shown in the worklist).

A mark is stored here and as a ``study.reviewed`` event in the study's history (without the note); the
caller records the action in the access audit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from ..store.models import Event, Study, StudyReview
from ..store.repo import Repo, aware, utcnow

__all__ = ["NOTE_MAX", "Review", "ReviewError", "Reviews"]

NOTE_MAX = 4000


class ReviewError(ValueError):
    """A mark that cannot be made (no such study, no reviewer, a note too long)."""


@dataclass(frozen=True)
class Review:
    id: int
    study_id: int
    reviewer: str
    reviewed_at: datetime
    note: str

    @classmethod
    def of(cls, row: StudyReview) -> Review:
        return cls(id=row.id, study_id=row.study_id, reviewer=row.reviewer,
                   reviewed_at=aware(row.reviewed_at), note=row.note)


class Reviews:
    """The study_reviews table through a ``Repo``'s sessions."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self.sessions = repo.sessions

    def mark(self, study_id: int, reviewer: str, note: str) -> Review:
        """Mark the study reviewed by ``reviewer`` now; a study may be marked again (each mark stays)."""
        if not reviewer:
            raise ReviewError("a reviewed mark needs a reviewer")
        note = (note or "").strip()
        if len(note) > NOTE_MAX:
            raise ReviewError(f"the note is too long: at most {NOTE_MAX} characters")
        now = utcnow()
        with self.sessions.begin() as s:
            study = s.get(Study, study_id)
            if study is None:
                raise ReviewError(f"no study {study_id}")
            row = StudyReview(study_id=study_id, reviewer=reviewer[:64], reviewed_at=now, note=note)
            s.add(row)
            s.flush()
            s.add(Event(study_id=study_id, at=now, event="study.reviewed", version=study.version,
                        actor=reviewer[:128], detail={"review_id": row.id}))
            return Review.of(row)

    def of(self, study_id: int) -> list[Review]:
        """The study's marks, oldest first."""
        with self.sessions() as s:
            rows = s.scalars(select(StudyReview).where(StudyReview.study_id == study_id)
                             .order_by(StudyReview.reviewed_at, StudyReview.id))
            return [Review.of(r) for r in rows]

    def latest(self, study_ids: list[int]) -> dict[int, Review]:
        """The newest mark of each of ``study_ids`` that has one (for the worklist)."""
        if not study_ids:
            return {}
        with self.sessions() as s:
            newest = (select(func.max(StudyReview.id)).where(StudyReview.study_id.in_(list(study_ids)))
                      .group_by(StudyReview.study_id))
            rows = s.scalars(select(StudyReview).where(StudyReview.id.in_(newest)))
            return {r.study_id: Review.of(r) for r in rows}
