"""``psg-gateway studies list|show|retry|reprocess``: what the daemon did with each study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..store.db import make_engine, upgrade
from ..store.models import Study
from ..store.repo import Repo
from .service_cmd import ConfigOption, load_or_exit

studies_app = typer.Typer(help="List studies, show one with its history, retry or reprocess.",
                          no_args_is_help=True)
out = Console()
err = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def _repo(config: Path | None) -> Repo:
    cfg = load_or_exit(config)
    engine = make_engine(cfg.database_url)
    upgrade(engine)
    return Repo(engine)


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
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only this state (READY, FAILED, ...)")] = None,
    limit: Annotated[int, typer.Option(help="Newest N studies")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Newest studies first, with state and last error."""
    rows = [_summary(s) for s in _repo(config).list(state=state, limit=limit)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "key", "state", "v", "source", "received", "last error")
    for r in rows:
        table.add_row(str(r["id"]), r["key"], r["state"], str(r["version"]), r["source"],
                      (r["received_at"] or "")[:19], (r["last_error"] or "")[:60])
    out.print(table)


@studies_app.command("show")
def studies_show(ref: Annotated[str, typer.Argument(help="Study id or key")], config: ConfigOption = None,
                 as_json: JsonOption = False) -> None:
    """One study: identifiers, model, montage, outputs and its full event history."""
    repo = _repo(config)
    s = _find(repo, ref)
    doc = _summary(s) | {
        "identifiers": {"patient_id": s.patient_id, "issuer": s.patient_id_issuer, "accession": s.accession,
                        "study_uid": s.study_uid},
        "input": {"path": s.input_path, "name": s.input_name, "sha256": s.content_hash},
        "montage": {"name": s.montage_name, "version": s.montage_version, "mapping": s.mapping},
        "model": {"bundle": s.bundle_name, "version": s.bundle_version, "hash": s.bundle_hash},
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


def _reopen(ref: str, config: Path | None, action: str) -> None:
    repo = _repo(config)
    s = _find(repo, ref)
    try:
        s = getattr(repo, action)(s.id, actor="cli")
    except ValueError as exc:
        err.print(str(exc))
        raise typer.Exit(1) from None
    out.print(f"study {s.key}: {s.state}, version {s.version} (a running daemon picks it up)")


@studies_app.command("retry")
def studies_retry(ref: Annotated[str, typer.Argument(help="Study id or key")], config: ConfigOption = None) -> None:
    """Put a FAILED study back in the queue (after fixing its cause: montage, bundle, disk)."""
    _reopen(ref, config, "retry")


@studies_app.command("reprocess")
def studies_reprocess(ref: Annotated[str, typer.Argument(help="Study id or key")],
                      config: ConfigOption = None) -> None:
    """Run a finished study again as a new version (new montage or model); outputs are replaced."""
    _reopen(ref, config, "reprocess")
