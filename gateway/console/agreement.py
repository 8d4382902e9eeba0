"""``/ui/agreement``: model-versus-scorer agreement per scorer over time, with drift alerts.

Every number on the page comes from :mod:`gateway.pipeline.agreement_trend` (:func:`agreement_rows` over the
store, then :func:`agreement_by_scorer` with ``console.drift_window_studies`` and
``console.drift_kappa_drop``); this module only lays the result out, the kappa-over-time plot included.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, render_template

from ..pipeline.agreement_trend import ScorerAgreement, TrendPoint, agreement_by_scorer, agreement_rows
from ..pipeline.scoring import STAGES
from .app import context

bp = Blueprint("agreement", __name__)

UNKNOWN = "(scorer not recorded)"
STAGE_NAMES = {"W": "Wake"}  # the other stages' codes are their names

# the plot's frame (SVG user units): kappa 0 at the bottom, 1 at the top; a negative kappa sits on 0
_LEFT, _RIGHT, _TOP, _BOTTOM = 30.0, 395.0, 10.0, 110.0


def _y(kappa: float) -> float:
    return round(_BOTTOM - (_BOTTOM - _TOP) * min(max(kappa, 0.0), 1.0), 1)


@dataclass(frozen=True)
class Plot:
    """Where a scorer's series is drawn: one dot per study (its kappa), the rolling kappa as a line."""

    dots: list[tuple[float, float, TrendPoint]]  # (x, y, the point)
    rolling: str  # the polyline's points
    lab_y: float | None


def plot(scorer: ScorerAgreement, lab_kappa: float | None) -> Plot:
    n = len(scorer.series)
    xs = [round(_LEFT + (_RIGHT - _LEFT) * i / (n - 1), 1) if n > 1 else (_LEFT + _RIGHT) / 2 for i in range(n)]
    dots = [(x, _y(p.kappa), p) for x, p in zip(xs, scorer.series, strict=True)]
    rolling = " ".join(f"{x},{_y(p.rolling_kappa)}" for x, p in zip(xs, scorer.series, strict=True))
    return Plot(dots, rolling, None if lab_kappa is None else _y(lab_kappa))


@bp.route("/agreement")
def index():  # type: ignore[no-untyped-def]
    ctx = context()
    c = ctx.cfg.console
    trend = agreement_by_scorer(agreement_rows(ctx.repo), window=c.drift_window_studies, drop=c.drift_kappa_drop)
    scorers = sorted(trend.scorers, key=lambda s: s.alert is None)  # alerted scorers first, else trend's order
    return render_template("agreement.html", trend=trend,
                           entries=[(s, plot(s, trend.lab.mean_kappa)) for s in scorers],
                           stages=[(s, STAGE_NAMES.get(s, s)) for s in STAGES], unknown=UNKNOWN)
