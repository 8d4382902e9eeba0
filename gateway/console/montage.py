"""``/ui/montage``: labels that mapped nowhere in recent studies, mapping one to a modality (previewed, then
written through the same validated, locked, audited edit as ``psg-gateway montage add``), and the table's
audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for

from ..montage.audit import audit_log_path
from ..montage.editing import (
    MontageEditError,
    _new_table_text,
    add_rule,
    add_rule_text,
    editable_table,
    render_rule,
)
from ..montage.table import EXCLUDE, KINDS, MODALITIES, MontageError, MontageTable, load_table
from . import queries
from .app import context, require_post_role
from .auth import audit

bp = Blueprint("montage", __name__)

CHOICES = [*MODALITIES, EXCLUDE]


def _table_path() -> Path | None:
    path = context().cfg.montage.table
    return Path(path) if path else None


def _current() -> MontageTable:
    ctx = context()
    if ctx.montage is not None:
        return ctx.montage.table
    return load_table(_table_path())


def _preview(label: str, modality: str, kind: str) -> dict[str, Any]:
    """What the rule would change, without writing: the rule's line and, for each recent study with the
    label, its resolution now and after."""
    path = _table_path()
    if path is None:
        return {"error": "montage.table is not set: the built-in table is read-only; name a site table file "
                         "in the configuration to map labels here"}
    try:
        line = render_rule(kind, label, modality, note=_note())
        target = editable_table(path)
        text = target.read_text(encoding="utf-8") if target.exists() else _new_table_text(target)
        new = MontageTable.parse(add_rule_text(text, line, source=str(target)), source=str(target),
                                 default_name=target.stem, base_dir=target.parent)
    except MontageError as exc:
        return {"error": f"refused: the rule would make the table invalid: {exc}", "line": None}
    except (MontageEditError, ValueError, OSError) as exc:
        return {"error": str(exc), "line": None}
    current = _current()
    entry = next((e for e in queries.unmapped_labels(context().repo) if e.label == label), None)
    changes = []
    for source in sorted(entry.sources) if entry else [None]:
        before, after = current.resolve(label, source), new.resolve(label, source)
        changes.append({"source": source, "before": before.modality or before.status,
                        "after": after.modality or after.status,
                        "rule": after.rule.describe() if after.rule else None})
    return {"line": line, "changes": changes, "studies": entry.studies if entry else [], "table": str(target),
            "version_before": current.version, "version_after": new.version, "error": None}


def _note() -> str:
    return f"mapped in the web console by {g.user.name}"


def _audit_log(limit: int = 50) -> list[dict[str, Any]]:
    path = _table_path()
    if path is None:
        return []
    try:
        lines = audit_log_path(editable_table(path)).read_text(encoding="utf-8").splitlines()
    except (OSError, MontageEditError):
        return []
    out = []
    for line in reversed(lines[-limit:]):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@bp.route("/montage")
def index():  # type: ignore[no-untyped-def]
    label = request.args.get("label", "").strip()
    modality = request.args.get("modality", "")
    kind = request.args.get("kind", "normalised")
    preview = None
    if label and modality:
        if modality not in CHOICES or kind not in KINDS:
            abort(400, "unknown modality or kind")
        preview = _preview(label, modality, kind)
    table = _current()
    unmapped = queries.unmapped_labels(context().repo)
    # a label the table maps now (mapped since those studies ran): shown apart, without a form
    now = {e.label: next((r.modality for src in sorted(e.sources) if (r := table.resolve(e.label, src)).modality),
                         None) for e in unmapped}
    unmapped.sort(key=lambda e: now[e.label] is not None)
    suggestions = {e.label: [r.pattern + " (" + str(r.modality) + ")" for r in table.suggest(e.label, n=2)]
                   for e in unmapped}
    return render_template("montage.html", unmapped=unmapped, suggestions=suggestions, table=table, now=now,
                           path=_table_path(), choices=CHOICES, kinds=KINDS, label=label, modality=modality,
                           kind=kind, preview=preview, log=_audit_log(),
                           failure=getattr(context().montage, "failure", None))


@bp.route("/montage/map", methods=["POST"])
def map_label():  # type: ignore[no-untyped-def]
    require_post_role("operator")
    ctx = context()
    label = request.form.get("label", "").strip()
    modality = request.form.get("modality", "")
    kind = request.form.get("kind", "normalised")
    path = _table_path()
    if not label or modality not in CHOICES or kind not in KINDS:
        abort(400, "a label, a modality and a kind are needed")
    if path is None:
        flash("montage.table is not set: the built-in table is read-only", "error")
        return redirect(url_for("montage.index"))
    try:
        done = add_rule(editable_table(path), kind, label, modality, note=_note(), user=f"{g.user.name} (web console)")
    except MontageError as exc:
        flash(f"refused: the change would make the table invalid; the table is unchanged ({exc})", "error")
        return redirect(url_for("montage.index", label=label, modality=modality, kind=kind))
    except (MontageEditError, OSError) as exc:
        flash(str(exc), "error")
        return redirect(url_for("montage.index", label=label, modality=modality, kind=kind))
    if ctx.montage is not None:
        ctx.montage.check()  # the daemon uses the new table from the next study on
    audit("montage.map", target=label[:256], detail={"label": label, "modality": modality, "kind": kind,
                                                     "version_before": done.version_before,
                                                     "version_after": done.table.version})
    flash(f"{label!r} -> {modality}: table version {done.version_before or '(new)'} -> {done.table.version}"
          if done.written else done.message, "ok")
    return redirect(url_for("montage.index"))
