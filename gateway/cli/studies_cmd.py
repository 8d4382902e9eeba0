"""``psg-gateway studies list|show|report|retry|reprocess|replace``: what the daemon did with each study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..fsutil import atomic_write
from .store_access import StoreConfigOption, open_store

if TYPE_CHECKING:  # the store (sqlalchemy) loads when a command opens it, not with the CLI
    from ..store.models import Study
    from ..store.repo import Repo

studies_app = typer.Typer(
    help="List studies, show one with its history or write its report, retry, reprocess or replace its input.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def _repo(config: Path | None) -> Repo:
    """The store of ``--config``/``PSG_CONFIG``, never created or migrated here (see store_access)."""
    return open_store(config)[1]


def _find(repo: Repo, ref: str) -> Study:
    study = repo.get(ref)
    if study is None:
        err.print(f"no study {ref!r} (give the row id or the st-... key)")
        raise typer.Exit(1)
    return study


def _summary(s: Study) -> dict[str, Any]:
    return {"id": s.id, "key": s.key, "state": s.state, "version": s.version, "source": s.source,
            "received_at": s.received_at.isoformat() if s.received_at else None,
            "finished_at": s.finished_at.isoformat() if s.finished_at else None,
            "attempts": s.attempts, "last_error": s.last_error, "output_path": s.output_path,
            "duplicate_of": s.duplicate_of}


@studies_app.command("list")
def studies_list(
    config: StoreConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only this state (READY, FAILED, ...)")] = None,
    limit: Annotated[int, typer.Option(help="Newest N studies")] = 50,
    second_look: Annotated[bool, typer.Option(
        "--second-look", help="Only studies with an outcome in its second-look band (among the newest N)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Newest studies first, with state and last error."""
    studies = _repo(config).list(state=state, limit=limit)
    if second_look:
        studies = [s for s in studies if (s.flags or {}).get("borderline")]
    rows = [_summary(s) | ({"second_look": [b["code"] for b in s.flags["borderline"]]} if second_look else {})
            for s in studies]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "key", "state", "v", "source", "received", "last error",
                  *(["second look"] if second_look else []))
    for r in rows:
        table.add_row(str(r["id"]), r["key"], r["state"], str(r["version"]), r["source"],
                      (r["received_at"] or "")[:19], (r["last_error"] or "")[:60],
                      *([", ".join(r["second_look"])] if second_look else []))
    out.print(table)


@studies_app.command("show")
def studies_show(ref: Annotated[str, typer.Argument(help="Study id or key")], config: StoreConfigOption = None,
                 as_json: JsonOption = False,
                 human: Annotated[bool, typer.Option(
                     "--human", help="The human view even when stdout is not a terminal (a pager, a file)")] = False,
                 ) -> None:
    """One study. On a terminal: header, flags, watched outcomes, sleep metrics, signal quality, the state
    timeline, messages and report files. With --json, or when stdout is not a terminal (a script, a pipe):
    the full JSON document (identifiers, model, montage, flags, outputs, every event), as before."""
    if as_json and human:
        err.print("[bold red]error:[/] --json and --human exclude each other")
        raise typer.Exit(2)
    repo = _repo(config)
    s = _find(repo, ref)
    if human or (not as_json and out.is_terminal):
        from .study_view import study_view

        out.print(study_view(repo, s), highlight=False)
        return
    doc = _summary(s) | {
        "identifiers": {"patient_id": s.patient_id, "issuer": s.patient_id_issuer, "accession": s.accession,
                        "study_uid": s.study_uid, "scorer": s.scorer},
        "input": {"path": s.input_path, "name": s.input_name, "sha256": s.content_hash},
        "montage": {"name": s.montage_name, "version": s.montage_version, "mapping": s.mapping},
        "model": {"bundle": s.bundle_name, "version": s.bundle_version, "hash": s.bundle_hash},
        "flags": s.flags,
        "timings": s.timings,
        "instances": len(repo.instances_of(s.id)),
        "outputs": [{"name": o.name, "size": o.size, "version": o.version} for o in repo.outputs(s.id)],
        "events": [{"at": e.at.isoformat(), "event": e.event, "from": e.from_state, "to": e.to_state,
                    "version": e.version, "actor": e.actor, "detail": e.detail} for e in repo.events(s.id)],
    }
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return
    out.print_json(data=doc, default=str)


REPORT_FORMATS = {".pdf": "pdf", ".html": "html", ".htm": "html"}


@studies_app.command("report")
def studies_report(
    ref: Annotated[str, typer.Argument(help="Study id or key")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="FILE.pdf or FILE.html: the suffix picks the format",
                                           dir_okay=False)],
    config: StoreConfigOption = None,
) -> None:
    """Write a study's report (hypnogram, sleep metrics, watched outcomes, flags, quality, attribution,
    model and montage) from its outputs, as PDF or HTML. Name the file after the study key, not the
    patient: the file is written private (0600)."""
    fmt = REPORT_FORMATS.get(out_file.suffix.lower())
    if fmt is None:
        _fail(f"--out must end in .pdf or .html (got {out_file.suffix or 'no suffix'!r})")
    if not out_file.parent.is_dir():
        _fail("the folder of --out does not exist")
    from ..report import ReportError, build_report, render_html, render_pdf  # matplotlib: only when asked

    s = _find(_repo(config), ref)
    try:
        report = build_report(s)
    except ReportError as exc:
        _fail(str(exc))
    data = render_pdf(report) if fmt == "pdf" else render_html(report).encode("utf-8")
    try:
        atomic_write(out_file, data)
    except OSError as exc:
        _fail(f"cannot write --out: {exc.strerror}")
    out.print(f"study {s.key}: {fmt.upper()} report written ({len(data)} bytes)", highlight=False)


def _reopen(ref: str, config: Path | None, action: str) -> None:
    from ..operator_actions import ActionError, reopen_study

    repo = _repo(config)
    s = _find(repo, ref)
    try:
        s = reopen_study(repo, s, action, actor="cli")
    except ActionError as exc:
        err.print(str(exc))
        raise typer.Exit(1) from None
    out.print(f"study {s.key}: {s.state}, version {s.version} (a running daemon picks it up)")


@studies_app.command("retry")
def studies_retry(ref: Annotated[str, typer.Argument(help="Study id or key")],
                  config: StoreConfigOption = None) -> None:
    """Put a FAILED study back in the queue (after fixing its cause: montage, bundle, disk)."""
    _reopen(ref, config, "retry")


@studies_app.command("reprocess")
def studies_reprocess(ref: Annotated[str, typer.Argument(help="Study id or key")],
                      config: StoreConfigOption = None) -> None:
    """Run a finished study again as a new version (new montage or model); outputs are replaced."""
    _reopen(ref, config, "reprocess")


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # one line, any width
    raise typer.Exit(1)


@studies_app.command("replace")
def studies_replace(ref: Annotated[str, typer.Argument(help="Study id or key")],
                    file: Annotated[Path, typer.Argument(help="The corrected recording")],
                    config: StoreConfigOption = None) -> None:
    """Replace a FAILED study's quarantined input with FILE and put the study back in the queue.

    FILE is hashed and checked for duplicates like a new file; the study keeps its key and its input's
    name. Its record gets the new SHA-256 and a study.input_replaced event (old and new hash).
    """
    from ..operator_actions import ActionError, replace_input

    cfg, repo = open_store(config)
    s = _find(repo, ref)
    try:
        s, sha256, size = replace_input(cfg, repo, s, file, actor="cli")
    except ActionError as exc:
        _fail(str(exc))
    out.print(f"study {s.key}: input replaced (sha256 {sha256[:12]}, {size} bytes); {s.state}, "
              f"version {s.version} (a running daemon picks it up)", highlight=False)
