"""``/ui/outbox``: messages pending, sent, held and dead letters with their reasons; retry, resend and
release for operators (the same functions as ``psg-gateway outbox``)."""

from __future__ import annotations

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for

from ..operator_actions import ActionError, release_messages, requeue_message
from ..store.models import MessageState
from . import queries
from .app import context, require_post_role
from .auth import audit, audit_view

bp = Blueprint("outbox", __name__)

TABS = ["DEAD", "PENDING", "SENT", "HELD", "SHADOW", "SUPERSEDED"]


@bp.route("/outbox")
def index():  # type: ignore[no-untyped-def]
    ctx = context()
    counts = ctx.repo.outbox_counts()
    default = "DEAD" if counts.get("DEAD") else "PENDING"
    state = request.args.get("state", default).upper()
    if state not in TABS and state != "ALL":
        abort(404)
    rows = queries.messages_with_keys(ctx.repo, None if state == "ALL" else state)
    audit_view()
    return render_template("outbox.html", rows=rows, state=state, tabs=TABS, counts=counts,
                           destination=ctx.cfg.hl7.destination if ctx.cfg.hl7.enabled else None)


@bp.route("/outbox/<int:message_id>")
def show(message_id: int):  # type: ignore[no-untyped-def]
    ctx = context()
    m = ctx.repo.message(message_id)
    if m is None:
        abort(404, "no such message")
    study = ctx.repo.get(m.study_id)
    audit_view(study)
    return render_template("message.html", m=m, study=study, attempts=ctx.repo.attempts(m.id),
                           er7=m.message.replace("\r", "\n"))


@bp.route("/outbox/<int:message_id>/<action>", methods=["POST"])
def act(message_id: int, action: str):  # type: ignore[no-untyped-def]
    if action not in ("retry", "resend", "release"):
        abort(404)
    require_post_role("operator")
    ctx = context()
    m = ctx.repo.message(message_id)
    if m is None:
        abort(404, "no such message")
    study = ctx.repo.get(m.study_id)
    actor = f"console:{g.user.name}"
    try:
        if action == "release":
            released, _ = release_messages(ctx.repo, [message_id], actor=actor)
            if not released:
                raise ActionError(f"message {message_id} is not HELD")
            text = f"message {message_id}: released; the daemon's delivery job sends it"
        else:
            m = requeue_message(ctx.repo, message_id, actor=actor, resend=action == "resend")
            text = f"message {m.id} ({m.control_id}): {m.state}; the daemon's delivery job sends it"
    except ActionError as exc:
        flash(str(exc), "error")
        return redirect(url_for("outbox.index", state=m.state))
    audit(f"message.{action}", study=study, target=str(message_id), detail={"message_id": message_id})
    flash(text, "ok")
    return redirect(url_for("outbox.index", state=str(MessageState.PENDING)))
