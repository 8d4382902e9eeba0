"""The database and output-folder reads behind the console's pages (no Flask here)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select

from ..store.models import Event, Message, State, Study
from ..store.repo import Repo

__all__ = ["StudyFilter", "WorklistEntry", "failures", "list_studies", "read_metrics", "throughput_24h",
           "unmapped_labels", "worklist"]

RECENT = 500  # how many of the newest studies the worklist and the montage page look at


def aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass
class StudyFilter:
    q: str = ""
    state: str = ""
    source: str = ""
    since: date | None = None
    until: date | None = None
    flags: str = ""  # "" | flagged | borderline | withheld | none
    quality: str = ""  # "" | ok | not_interpretable
    limit: int = 100

    @classmethod
    def from_args(cls, args: Any) -> StudyFilter:
        def day(name: str) -> date | None:
            try:
                return date.fromisoformat(args.get(name, "")) if args.get(name) else None
            except ValueError:
                return None

        try:
            limit = max(1, min(int(args.get("limit", 100)), 1000))
        except ValueError:
            limit = 100
        return cls(q=args.get("q", "").strip()[:128], state=args.get("state", "").strip().upper(),
                   source=args.get("source", "").strip()[:512], since=day("since"), until=day("until"),
                   flags=args.get("flags", ""), quality=args.get("quality", ""), limit=limit)


def flag_group(flags: dict[str, Any] | None) -> str | None:
    """flagged | withheld | borderline | clear, or None before the flag step."""
    if not flags:
        return None
    if (flags.get("risk_flags") or {}).get("suppressed"):
        return "withheld"
    if flags.get("flags") or flags.get("findings"):
        return "flagged"
    if flags.get("borderline"):
        return "borderline"
    return "clear"


def top_percentile(flags: dict[str, Any] | None) -> float | None:
    values = [o["percentile"] for o in (flags or {}).get("outcomes", []) if o.get("percentile") is not None]
    return max(values) if values else None


def quality_ok(flags: dict[str, Any] | None) -> bool | None:
    if not flags:
        return None
    return "quality" not in ((flags.get("risk_flags") or {}).get("kinds") or [])


def list_studies(repo: Repo, f: StudyFilter) -> list[Study]:
    query = select(Study).order_by(Study.received_at.desc(), Study.id.desc())
    if f.q:
        like = f"%{f.q}%"
        query = query.where(or_(Study.key.ilike(like), Study.accession.ilike(like), Study.patient_id.ilike(like),
                                Study.patient_name.ilike(like)))
    if f.state:
        query = query.where(Study.state == f.state)
    if f.source:
        query = query.where(Study.source.ilike(f"%{f.source}%"))
    if f.since:
        query = query.where(Study.received_at >= datetime.combine(f.since, time.min, UTC))
    if f.until:
        query = query.where(Study.received_at < datetime.combine(f.until + timedelta(days=1), time.min, UTC))
    post = bool(f.flags or f.quality)
    with repo.sessions() as s:
        rows = list(s.scalars(query.limit(RECENT * 4 if post else f.limit)))
    if f.flags:
        want = "clear" if f.flags == "none" else f.flags
        rows = [r for r in rows if flag_group(r.flags) == want]
    if f.quality:
        want_ok = f.quality == "ok"
        rows = [r for r in rows if quality_ok(r.flags) is want_ok]
    return rows[:f.limit]


def sources(repo: Repo) -> list[str]:
    with repo.sessions() as s:
        return sorted(s.scalars(select(Study.source).distinct()).all())


@dataclass
class WorklistEntry:
    study: Study
    group: str  # flagged | clear | borderline | withheld
    percentile: float | None
    labels: list[str] = field(default_factory=list)  # what put it here: outcome labels or withheld reasons


def worklist(repo: Repo) -> dict[str, list[WorklistEntry]]:
    """The review worklist of the newest studies with a flag decision: ``main`` (flagged and clear results,
    highest watched percentile first), ``borderline`` (a second look, not flagged) and ``withheld``
    (risk flags withheld: uninterpretable signals or a missing modality)."""
    with repo.sessions() as s:
        rows = list(s.scalars(select(Study).where(Study.flags.is_not(None), Study.duplicate_of.is_(None))
                              .order_by(Study.received_at.desc()).limit(RECENT)))
    groups: dict[str, list[WorklistEntry]] = {"main": [], "borderline": [], "withheld": []}
    for st in rows:
        group = flag_group(st.flags)
        if group is None:
            continue
        flags = st.flags or {}
        if group == "withheld":
            labels = list((flags.get("risk_flags") or {}).get("reasons", []))
        elif group == "borderline":
            labels = [f"{b.get('label', b.get('code'))} ({b.get('percentile')})" for b in flags.get("borderline", [])]
        else:
            labels = [f.get("label", "") for f in flags.get("flags", [])] + \
                     [f.get("text", f.get("metric", "")) for f in flags.get("findings", [])]
        key = group if group in ("borderline", "withheld") else "main"
        groups[key].append(WorklistEntry(st, group, top_percentile(flags), labels))
    for entries in groups.values():
        entries.sort(key=lambda e: (e.percentile is None, -(e.percentile or 0.0), e.group != "flagged",
                                    -(e.study.id)))
    return groups


def read_metrics(study: Study) -> dict[str, Any] | None:
    if not study.output_path:
        return None
    try:
        return json.loads((Path(study.output_path) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def failures(repo: Repo, limit: int = 10) -> list[Study]:
    with repo.sessions() as s:
        return list(s.scalars(select(Study).where(Study.state == State.FAILED)
                              .order_by(Study.updated_at.desc()).limit(limit)))


def throughput_24h(repo: Repo, now: datetime | None = None) -> list[tuple[datetime, int]]:
    """Studies that finished in each of the last 24 hours (oldest first)."""
    now = (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=23)
    with repo.sessions() as s:
        done = [aware(t) for t in s.scalars(select(Study.finished_at).where(Study.finished_at >= start))]
    counts = Counter(t.replace(minute=0, second=0, microsecond=0) for t in done if t is not None)
    return [(start + timedelta(hours=i), counts.get(start + timedelta(hours=i), 0)) for i in range(24)]


def received_24h(repo: Repo) -> int:
    since = datetime.now(UTC) - timedelta(hours=24)
    with repo.sessions() as s:
        return s.scalar(select(func.count()).select_from(Study).where(Study.received_at >= since)) or 0


def messages_with_keys(repo: Repo, state: str | None, limit: int = 100) -> list[tuple[Message, str]]:
    query = select(Message, Study.key).join(Study, Study.id == Message.study_id)
    if state:
        query = query.where(Message.state == state)
    with repo.sessions() as s:
        return [(m, k) for m, k in s.execute(query.order_by(Message.id.desc()).limit(limit)).all()]


def events(repo: Repo, study_id: int) -> list[Event]:
    return repo.events(study_id)


_LABELS_IN_ERROR = re.compile(r"no channel maps to a modality \(labels: ([^)]*)\)")


@dataclass
class UnmappedLabel:
    label: str
    channels: int = 0
    studies: list[str] = field(default_factory=list)  # study keys, newest first
    rates: set[float] = field(default_factory=set)  # sample rates (Hz) where the input's header is readable
    sources: set[str] = field(default_factory=set)


def unmapped_labels(repo: Repo, recent: int = RECENT) -> list[UnmappedLabel]:
    """Labels that mapped nowhere in the newest studies: from each study's mapping (studies that mapped) or
    its montage failure (no channel mapped), with the sample rates read from file inputs' headers."""
    with repo.sessions() as s:
        rows = list(s.scalars(select(Study).order_by(Study.received_at.desc()).limit(recent)))
    found: dict[str, UnmappedLabel] = {}
    for st in rows:
        labels: list[str] = list((st.mapping or {}).get("unmapped") or [])
        if not labels and st.state == State.FAILED and st.last_error:
            m = _LABELS_IN_ERROR.search(st.last_error)
            if m:
                labels = [x.strip() for x in m.group(1).split(",") if x.strip()]
        if not labels:
            continue
        rates = _rates(st)
        for label in labels:
            entry = found.setdefault(label, UnmappedLabel(label))
            entry.channels += 1
            if st.key not in entry.studies:
                entry.studies.append(st.key)
            entry.sources.add(st.source)
            entry.rates.update(rates.get(label, ()))
    return sorted(found.values(), key=lambda e: (-len(e.studies), -e.channels, e.label))


def _rates(st: Study) -> dict[str, set[float]]:
    if st.source_kind != "file" or not st.input_path:
        return {}
    try:
        from ..readers.edf_header import read_header

        header = read_header(Path(st.input_path))
    except Exception:  # noqa: BLE001 - a rate is a hint; an unreadable header leaves it blank
        return {}
    out: dict[str, set[float]] = {}
    for sig in header.signals:
        if header.record_duration:
            out.setdefault(sig.label.strip(), set()).add(round(sig.samples_per_record / header.record_duration, 3))
    return out
