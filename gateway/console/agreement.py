"""``/ui/agreement``: model-versus-scorer agreement per scorer over time, with a drift alert.

Computed here from each study's ``metrics.json`` (``staging_agreement``: Cohen's kappa and per-stage F1 of
the model's hypnogram against the scored one) and the study's ``scorer`` (the technician, when recorded);
a scorer's rolling kappa over ``console.drift_window_studies`` studies that falls ``console.drift_kappa_drop``
or more below the lab's is flagged as drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from statistics import fmean

from flask import Blueprint, render_template
from sqlalchemy import select

from ..store.models import Study
from . import queries
from .app import context

bp = Blueprint("agreement", __name__)

STAGES = ("Wake", "N1", "N2", "N3", "REM")
UNKNOWN = "(scorer not recorded)"


@dataclass
class Point:
    key: str
    at: datetime | None
    kappa: float
    f1: dict[str, float | None]


@dataclass
class ScorerTrend:
    scorer: str
    points: list[Point] = field(default_factory=list)  # oldest first
    rolling: float | None = None  # mean kappa of the last window
    mean: float | None = None
    stage_f1: dict[str, float | None] = field(default_factory=dict)
    drift: bool = False


def scorer_trends(studies: list[tuple[Study, dict]], window: int, drop: float
                  ) -> tuple[list[ScorerTrend], float | None]:
    """(one trend per scorer, the lab's mean kappa over the same rolling window per scorer's studies)."""
    by: dict[str, ScorerTrend] = {}
    for study, agreement in studies:
        kappa = agreement.get("kappa")
        if kappa is None:
            continue
        name = (getattr(study, "scorer", None) or "").strip() or UNKNOWN
        by.setdefault(name, ScorerTrend(name)).points.append(
            Point(study.key, queries.aware(study.recording_start or study.received_at), float(kappa),
                  agreement.get("f1") or {}))
    all_points = [p for t in by.values() for p in t.points]
    all_points.sort(key=lambda p: (p.at is None, p.at))
    lab = fmean(p.kappa for p in all_points[-window * max(1, len(by)):]) if all_points else None
    for trend in by.values():
        trend.points.sort(key=lambda p: (p.at is None, p.at))
        trend.mean = fmean(p.kappa for p in trend.points)
        trend.rolling = fmean(p.kappa for p in trend.points[-window:])
        for stage in STAGES:
            values = [p.f1.get(stage) for p in trend.points if p.f1.get(stage) is not None]
            trend.stage_f1[stage] = fmean(values) if values else None
        trend.drift = lab is not None and trend.rolling is not None and trend.rolling <= lab - drop
    return sorted(by.values(), key=lambda t: (not t.drift, t.scorer)), lab


@bp.route("/agreement")
def index():  # type: ignore[no-untyped-def]
    ctx = context()
    with ctx.repo.sessions() as s:
        rows = list(s.scalars(select(Study).where(Study.output_path.is_not(None), Study.duplicate_of.is_(None))
                              .order_by(Study.received_at.desc()).limit(queries.RECENT)))
    scored = []
    for study in rows:
        metrics = queries.read_metrics(study) or {}
        agreement = metrics.get("staging_agreement")
        if isinstance(agreement, dict) and agreement.get("epochs"):
            scored.append((study, agreement))
    c = ctx.cfg.console
    trends, lab = scorer_trends(scored, c.drift_window_studies, c.drift_kappa_drop)
    return render_template("agreement.html", trends=trends, lab=lab, stages=STAGES, window=c.drift_window_studies,
                           drop=c.drift_kappa_drop, scored=len(scored), looked=len(rows))
