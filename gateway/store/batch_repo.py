"""The database side of an archive batch: runs, the archive hash cache, adopting and claiming studies.

Batch studies carry ``batch_run_id``: the daemon's workers never claim them (a retrospective study
must not be sent by the daemon's send policy), and a later batch run adopts the unfinished ones of an
earlier, interrupted run, so nothing is processed twice and nothing is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update

from .models import FINAL_STATES, WORKING_STATES, ArchiveFile, BatchRun, Study
from .repo import _NO_SYNC, Repo, utcnow

__all__ = ["BatchRepo", "pid_alive"]


class BatchRepo:
    def __init__(self, repo: Repo):
        self.repo = repo
        self.sessions = repo.sessions

    # ---- runs -------------------------------------------------------------------------------------
    def start_run(self, host: str, options: dict[str, Any]) -> int:
        with self.sessions.begin() as s:
            run = BatchRun(started_at=utcnow(), status="running", host=host, pid=os.getpid(), options=options)
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, status: str, summary: dict[str, Any]) -> None:
        with self.sessions.begin() as s:
            s.execute(update(BatchRun).where(BatchRun.id == run_id)
                      .values(status=status, finished_at=utcnow(), summary=summary), execution_options=_NO_SYNC)

    # ---- the archive hash cache ---------------------------------------------------------------------
    def cached(self, path: str, size: int, mtime_ns: int) -> Study | None:
        """The study a file was registered as, when the file is unchanged since (same size and mtime)."""
        with self.sessions() as s:
            return s.scalar(select(Study).join(ArchiveFile, ArchiveFile.study_id == Study.id)
                            .where(ArchiveFile.path == path, ArchiveFile.size == size,
                                   ArchiveFile.mtime_ns == mtime_ns))

    def original_of_hash(self, sha256: str) -> Study | None:
        with self.sessions() as s:
            return s.scalar(select(Study).where(Study.content_hash == sha256, Study.duplicate_of.is_(None)))

    def study_of_instance(self, sop_instance_uid: str) -> Study | None:
        from .models import Instance

        with self.sessions() as s:
            return s.scalar(select(Study).join(Instance, Instance.study_id == Study.id)
                            .where(Instance.sop_instance_uid == sop_instance_uid))

    # ---- studies ------------------------------------------------------------------------------------
    def adopt(self, study: Study, run_id: int) -> Study:
        """An unfinished study of an earlier batch run becomes this run's (its claim is this run's to make)."""
        if study.batch_run_id in (None, run_id) or study.state in [str(x) for x in FINAL_STATES]:
            return study
        with self.sessions.begin() as s:
            s.execute(update(Study).where(Study.id == study.id, Study.version == study.version)
                      .values(batch_run_id=run_id), execution_options=_NO_SYNC)
        return self.repo.get(study.id) or study

    def claim_study(self, study: Study, worker: str, lease_seconds: float) -> Study | None:
        """Take this study for ``worker`` when it waits for a worker and nobody holds it; else None."""
        now = utcnow()
        with self.sessions.begin() as s:
            n = s.execute(update(Study).where(
                Study.id == study.id, Study.state.in_([str(x) for x in WORKING_STATES]),
                or_(Study.next_attempt_at.is_(None), Study.next_attempt_at <= now),
                or_(Study.lease_until.is_(None), Study.lease_until < now))
                .values(claimed_by=worker, lease_until=now + timedelta(seconds=lease_seconds),
                        attempts=Study.attempts + 1, updated_at=now), execution_options=_NO_SYNC).rowcount
        return self.repo.get(study.id) if n == 1 else None

    def close_dead_runs(self, host: str) -> int:
        """Runs of this host whose process is gone (killed, crashed) are marked interrupted."""
        with self.sessions.begin() as s:
            runs = s.scalars(select(BatchRun).where(BatchRun.status == "running", BatchRun.host == host)).all()
            dead = [r for r in runs if r.pid != os.getpid() and not pid_alive(r.pid)]
            for run in dead:
                run.status = "interrupted"
                run.finished_at = utcnow()
            return len(dead)

    def release_dead_leases(self, host: str, alive: Sequence[int]) -> int:
        """Leases held by batch processes of this host that are gone (killed, crashed) are freed now,
        not when they expire: a re-run continues at once."""
        prefix = f"batch:{host}:"
        freed = 0
        with self.sessions.begin() as s:
            rows = s.execute(select(Study.id, Study.claimed_by).where(Study.claimed_by.like(f"{prefix}%"))).all()
            for study_id, claimed_by in rows:
                try:
                    pid = int(claimed_by[len(prefix):].split(":", 1)[0])
                except ValueError:
                    continue
                if pid in alive or pid_alive(pid):
                    continue
                freed += s.execute(update(Study).where(Study.id == study_id, Study.claimed_by == claimed_by)
                                   .values(claimed_by=None, lease_until=None), execution_options=_NO_SYNC).rowcount
        return freed

    def studies(self, ids: Sequence[int]) -> list[Study]:
        if not ids:
            return []
        out: list[Study] = []
        with self.sessions() as s:
            for i in range(0, len(ids), 500):  # bound the IN list
                out += s.scalars(select(Study).where(Study.id.in_(ids[i:i + 500]))).all()
        return sorted(out, key=lambda st: st.id)



def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
