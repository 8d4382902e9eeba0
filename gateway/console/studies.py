"""``/ui/studies``: the searchable list and the review worklist; ``/ui/studies/<key>``: one study with its
timeline, report, channel map, ORU preview, reviewed marks and the operator's actions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, url_for

from ..logging import get_logger
from ..operator_actions import ActionError, preview_message, reopen_study, replace_input
from ..pipeline.states import State
from ..store.models import Study
from . import queries
from .app import context, require_post_role
from .auth import audit, audit_view

log = get_logger("psg.console")

bp = Blueprint("studies", __name__)

STATES = [str(s) for s in State]


def _study(key: str) -> Study:
    if not key.startswith("st-"):
        abort(404, "no such study")
    study = context().repo.get(key)
    if study is None:
        abort(404, "no such study")
    return study


@bp.route("/studies")
def index():  # type: ignore[no-untyped-def]
    ctx = context()
    view = request.args.get("view", "list")
    if view == "worklist":
        groups = queries.worklist(ctx.repo)
        reviews = ctx.reviews.latest([e.study.id for entries in groups.values() for e in entries])
        audit_view()
        return render_template("worklist.html", groups=groups, reviews=reviews,
                               unreviewed=request.args.get("unreviewed") == "1")
    f = queries.StudyFilter.from_args(request.args)
    rows = queries.list_studies(ctx.repo, f)
    reviews = ctx.reviews.latest([s.id for s in rows])
    audit_view()
    return render_template("studies.html", rows=rows, f=f, states=STATES, sources=queries.sources(ctx.repo),
                           reviews=reviews, flag_group=queries.flag_group, top=queries.top_percentile,
                           quality_ok=queries.quality_ok)


@bp.route("/studies/<key>")
def show(key: str):  # type: ignore[no-untyped-def]
    ctx = context()
    study = _study(key)
    metrics = queries.read_metrics(study) or {}
    preview, preview_note, preview_error = None, None, None
    if study.output_path:
        try:
            preview, preview_note = preview_message(ctx.cfg, ctx.repo, study)
        except ActionError as exc:
            preview_error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the page shows the study even when the preview cannot be built
            preview_error = f"cannot build the preview: {type(exc).__name__}"
    report = bool(study.output_path and (Path(study.output_path) / "metrics.json").is_file())
    audit_view(study)
    return render_template(
        "study.html", s=study, events=ctx.repo.events(study.id), metrics=metrics,
        mapping=(metrics.get("montage") or {}).get("mapping") or [], montage=metrics.get("montage") or {},
        preview=preview.replace("\r", "\n") if preview else None, preview_note=preview_note,
        preview_error=preview_error, reviews=ctx.reviews.of(study.id), report=report,
        messages=ctx.repo.messages(study_id=study.id, limit=20), group=queries.flag_group(study.flags),
        top=queries.top_percentile(study.flags), outputs=ctx.repo.outputs(study.id),
        can_retry=study.state == State.FAILED,
        can_reprocess=study.state in (State.DELIVERED, State.FLAGGED, State.SHADOW, State.QUEUED, State.FAILED)
        and bool(study.output_path or study.state == State.FAILED),
        can_replace=study.state == State.FAILED and study.source_kind == "file")


@bp.route("/studies/<key>/report")
def report(key: str):  # type: ignore[no-untyped-def]
    """The study's own report page (written by the pipeline into its outputs; rendered now when missing),
    shown in a frame on the study page: no scripts, its images inline."""
    study = _study(key)
    if not study.output_path:
        abort(404, "this study has no outputs yet")
    path = Path(study.output_path) / "report.html"
    try:
        html = path.read_text(encoding="utf-8")
    except OSError:
        from ..report import ReportError, build_report, render_html

        try:
            html = render_html(build_report(study))
        except (ReportError, OSError) as exc:
            abort(404, f"no report: {exc}")
    audit_view(study)
    resp = Response(html, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                               "frame-ancestors 'self'; base-uri 'none'; form-action 'none'")
    return resp


def _done(study: Study, message: str, category: str = "ok"):  # type: ignore[no-untyped-def]
    flash(message, category)
    return redirect(url_for("studies.show", key=study.key))


@bp.route("/studies/<key>/<action>", methods=["POST"])
def act(key: str, action: str):  # type: ignore[no-untyped-def]
    if action not in ("retry", "reprocess"):
        abort(404)
    require_post_role("operator")
    ctx = context()
    study = _study(key)
    try:
        study = reopen_study(ctx.repo, study, action, actor=f"console:{_user()}")  # type: ignore[arg-type]
    except ActionError as exc:
        return _done(study, str(exc), "error")
    audit(f"study.{action}", study=study, target=request.script_root + request.path,
          detail={"version": study.version, "state": str(study.state)})
    log.info(f"console.study_{action}", study=study.key, user=_user())
    return _done(study, f"{action}: {study.state}, version {study.version} (a running daemon picks it up)")


@bp.route("/studies/<key>/replace", methods=["POST"])
def replace(key: str):  # type: ignore[no-untyped-def]
    require_post_role("operator")
    ctx = context()
    study = _study(key)
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        return _done(study, "choose the corrected recording to upload", "error")
    folder = Path(ctx.cfg.paths.var_dir) / "console-uploads"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".upload")
    os.close(fd)
    try:
        upload.save(tmp)
        study, sha256, size = replace_input(ctx.cfg, ctx.repo, study, Path(tmp), actor=f"console:{_user()}")
    except ActionError as exc:
        return _done(study, str(exc), "error")
    finally:
        Path(tmp).unlink(missing_ok=True)
    audit("study.replace", study=study, target=request.script_root + request.path,
          detail={"sha256": sha256, "size": size, "version": study.version})
    return _done(study, f"input replaced (sha256 {sha256[:12]}, {size} bytes); {study.state}, "
                        f"version {study.version}")


@bp.route("/studies/<key>/review", methods=["POST"])
def review(key: str):  # type: ignore[no-untyped-def]
    require_post_role("operator")
    ctx = context()
    study = _study(key)
    from ..access import ReviewError

    try:
        mark = ctx.reviews.mark(study.id, _user(), request.form.get("note", ""))
    except ReviewError as exc:
        return _done(study, str(exc), "error")
    audit("study.reviewed", study=study, target=request.script_root + request.path,
          detail={"review_id": mark.id})
    return _done(study, "marked reviewed")


def _user() -> str:
    from flask import g

    return g.user.name
