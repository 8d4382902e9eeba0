"""``psg-gateway studies list|show|report|retry|reprocess|replace``: what the daemon did with each study."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ..config import GatewayConfig
from ..fsutil import atomic_write, fsync_dir
from ..store.models import State, Study
from ..store.repo import Repo
from .store_access import StoreConfigOption, open_store

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
    repo = _repo(config)
    s = _find(repo, ref)
    try:
        s = getattr(repo, action)(s.id, actor="cli")
    except ValueError as exc:
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


# ---- replace: a corrected input for a FAILED file study ------------------------------------------
_BLOCK = 1 << 22


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # one line, any width
    raise typer.Exit(1)


def _quarantined_input(cfg: GatewayConfig, s: Study) -> Path:
    """The study's input file in ``<quarantine>/<key>/`` (under the name it has there, not ``input_name``,
    which may be PHI); exits with a one-line reason when the study or its files do not allow a replace."""
    if s.source_kind != "file":
        _fail(f"study {s.key} is a DICOM study; only a file study's input can be replaced")
    if s.state != State.FAILED:
        _fail(f"study {s.key} is {s.state}; only FAILED studies can have their input replaced")
    folder = Path(cfg.paths.quarantine or cfg.paths.var_dir / "quarantine") / s.key
    if not folder.is_dir():
        _fail(f"the quarantine folder of study {s.key} is gone (removed by retention?); nothing to replace")
    target = Path(s.input_path) if s.input_path else None
    if target is None or target.parent.resolve() != folder.resolve():
        # an archive batch's study keeps its file in the archive; a crash may have left it in the spool
        _fail(f"the input of study {s.key} is not in its quarantine folder; nothing to replace")
    if not target.is_file():
        _fail(f"the quarantined input of study {s.key} is gone (removed by retention?); nothing to replace")
    return folder / target.name


def _stage_copy(source: Path, target: Path) -> tuple[Path, str, int]:
    """Copy ``source`` to a temporary file beside ``target``, hashing the bytes as they are copied (so the
    recorded SHA-256 is that of the bytes written, even if ``source`` changes meanwhile); fsynced.
    Returns (temporary file, SHA-256, size)."""
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent)
    try:
        os.fchmod(fd, stat.S_IMODE(target.stat().st_mode))  # the quarantined file's permissions, not 0600
        with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
            while block := src.read(_BLOCK):
                digest.update(block)
                dst.write(block)
                size += len(block)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), digest.hexdigest(), size


def _keep_old(target: Path, old: Path) -> None:
    """A second name for the old file until the database has the new hash: a failed transaction puts it
    back, so a refused replace leaves file and record as they were."""
    old.unlink(missing_ok=True)
    try:
        os.link(target, old)
    except OSError:  # a file system without hard links: a durable copy
        shutil.copy2(target, old)
        with open(old, "rb") as fh:
            os.fsync(fh.fileno())


def _original_with(repo: Repo, sha256: str, other_than: int) -> str | None:
    """The key of another original study (not a duplicate) with this content, if any."""
    with repo.sessions() as session:
        return session.scalar(select(Study.key).where(Study.content_hash == sha256,
                                                      Study.duplicate_of.is_(None), Study.id != other_than))


@studies_app.command("replace")
def studies_replace(ref: Annotated[str, typer.Argument(help="Study id or key")],
                    file: Annotated[Path, typer.Argument(help="The corrected recording")],
                    config: StoreConfigOption = None) -> None:
    """Replace a FAILED study's quarantined input with FILE and put the study back in the queue.

    FILE is hashed and checked for duplicates like a new file; the study keeps its key and its input's
    name. Its record gets the new SHA-256 and a study.input_replaced event (old and new hash).
    """
    cfg, repo = open_store(config)
    s = _find(repo, ref)
    target = _quarantined_input(cfg, s)
    if not file.is_file() or not os.access(file, os.R_OK):
        _fail("FILE is not a readable file")  # its name is not repeated: it may carry a patient's name
    folder = target.parent
    try:
        tmp, sha256, size = _stage_copy(file, target)
    except OSError as exc:
        _fail(f"cannot copy FILE into the quarantine folder of study {s.key}: {exc.strerror}")
    other = _original_with(repo, sha256, s.id)
    if other is not None:  # refused before the quarantined file is touched
        tmp.unlink(missing_ok=True)
        _fail(f"the same content is already study {other}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    swapped = False
    try:
        _keep_old(target, old)
        os.replace(tmp, target)
        swapped = True
        fsync_dir(folder)
    except OSError as exc:
        if swapped:
            os.replace(old, target)
        tmp.unlink(missing_ok=True)
        old.unlink(missing_ok=True)
        _fail(f"cannot replace the input of study {s.key}: {exc.strerror}")
    try:
        s = repo.replace_input(s.id, path=str(target), sha256=sha256, size=size, actor="cli")
    except (ValueError, KeyError, SQLAlchemyError) as exc:
        os.replace(old, target)  # the record kept the old hash: so does the folder
        fsync_dir(folder)
        _fail(str(exc) if isinstance(exc, ValueError) else f"study {s.key} not changed: {type(exc).__name__}")
    old.unlink(missing_ok=True)
    fsync_dir(folder, best_effort=True)
    out.print(f"study {s.key}: input replaced (sha256 {sha256[:12]}, {size} bytes); {s.state}, "
              f"version {s.version} (a running daemon picks it up)", highlight=False)
