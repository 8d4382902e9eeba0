"""``/ui/``: the dashboard: sources, the destination, studies by state, throughput, recent failures."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

from ..pipeline.states import State
from . import queries
from .app import context

bp = Blueprint("dashboard", __name__)

STATE_ORDER = [str(s) for s in State]


@bp.route("/")
def index():  # type: ignore[no-untyped-def]
    ctx = context()
    health: dict[str, Any] = {}
    healthy = None
    if ctx.health is not None:
        try:
            healthy, health = ctx.health()
        except Exception as exc:  # noqa: BLE001 - the page still shows what the database says
            healthy, health = False, {"status": "error", "error": type(exc).__name__}
    counts = ctx.repo.counts_by_state()
    by_state = [(s, counts.get(s, 0)) for s in STATE_ORDER if counts.get(s, 0)]
    outbox = ctx.repo.outbox_counts()
    hours = queries.throughput_24h(ctx.repo)
    peak = max((n for _, n in hours), default=0)
    failures = queries.failures(ctx.repo)

    return render_template("dashboard.html", health=health, healthy=healthy, by_state=by_state,
                           total=sum(counts.values()), outbox=outbox, hours=hours, peak=peak,
                           failures=failures, received=queries.received_24h(ctx.repo),
                           drop_folders=[str(f.path) for f in ctx.cfg.drop_folders], cfg=ctx.cfg)
