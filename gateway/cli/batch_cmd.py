"""``psg-gateway batch ARCHIVE...``: a retrospective run over a PSG archive on the daemon's pipeline."""

from __future__ import annotations

import json
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .service_cmd import ConfigOption, load_or_exit

err = Console(stderr=True)
out = Console()


def _since(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


def batch(
    archives: Annotated[list[Path], typer.Argument(help="Archive folders or files (EDF/BDF, DICOM waveform)")],
    config: ConfigOption = None,
    since: Annotated[str | None, typer.Option(help="Only recordings from this date on (YYYY-MM-DD)")] = None,
    include: Annotated[list[str] | None, typer.Option(
        help="Only paths matching this glob (relative to the archive; repeatable)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Skip paths matching this glob (repeatable)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Process at most N studies in this run")] = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help="Decode/preprocess processes; 0: inline in the engine's process (default: batch.workers)")
                       ] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="The engine's torch threads (default: model.threads, else the physical cores less the workers)")
                       ] = None,
    send: Annotated[bool, typer.Option(
        "--send/--no-send", help="Queue ORU messages for the EHR like the daemon (default: hold them)")] = False,
    export: Annotated[Path | None, typer.Option(help="Write embeddings (.npy) and a studies table here")] = None,
    export_csv: Annotated[bool, typer.Option(help="Also write the table as CSV")] = False,
    export_identifiers: Annotated[bool, typer.Option(
        help="Put patient ID, accession, study UID and start time in the table (PHI: off by default)")] = False,
    drop_identifiers: Annotated[bool, typer.Option(
        "--drop-identifiers", help="Rewrite an export that has identifier columns without them (without this "
                                   "flag or --export-identifiers, such an export is refused, exit 2)")] = False,
    export_tokens: Annotated[bool, typer.Option(help="Also export the 5-s token embeddings (large)")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume/--restart",
        help="Resume: skip what earlier runs finished (default). Restart: process this archive's batch "
             "studies again as new versions")] = True,
    dry_run: Annotated[bool, typer.Option(help="List what would be processed, with montage coverage; run nothing")
                       ] = False,
    ray: Annotated[str | None, typer.Option(help="Run on Ray: 'auto' (RAY_ADDRESS or a local instance) or an "
                                                 "address like ray://head:10001")] = None,
    summary: Annotated[Path | None, typer.Option(help="Summary file (default <var>/batch/run-N/summary.json)")
                       ] = None,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Live progress bar (default: on a terminal)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary (or the dry-run plan) as JSON")] = False,
) -> None:
    """Process a whole archive through the daemon's pipeline: resumable, deduplicated, results held by default.

    Exit codes: 0 done, 1 done with failed studies or a failed export, 2 a problem before any work (missing archive,
    unwritable export folder, an export whose identifier columns would be dropped, database unreachable),
    3 aborted (database lost), 130 interrupted.
    """
    from ..batch.runner import BatchError, BatchOptions, BatchRunner
    from ..logging import configure_logging

    if drop_identifiers and (export is None or export_identifiers):
        _error("--drop-identifiers goes with --export and without --export-identifiers")
    cfg = load_or_exit(config)
    live = sys.stderr.isatty() if progress is None else progress
    fmt = cfg.logging.format
    # With a live bar, per-study log lines would tear it: only warnings and errors are shown then.
    configure_logging("warning" if live and cfg.logging.level in ("debug", "info") else cfg.logging.level,
                      json=None if fmt == "auto" else fmt == "json")
    opts = BatchOptions(archives=list(archives), since=_since(since), include=tuple(include or ()),
                        exclude=tuple(exclude or ()), limit=limit, workers=workers, threads=threads, send=send, export=export,
                        export_csv=export_csv, export_identifiers=export_identifiers,
                        export_drop_identifiers=drop_identifiers, export_tokens=export_tokens,
                        restart=not resume, ray=ray, summary=summary, progress=live)
    runner = BatchRunner(cfg, opts)
    try:
        runner.preflight()
        found = runner.discover()
        if dry_run:
            _dry_run(runner, found, as_json)
            return
        outcome = runner.run(found)
    except BatchError as exc:
        _error(str(exc))
    finally:
        runner.close()
    if as_json:
        print(json.dumps(outcome.summary, indent=2, default=str))
    else:
        from ..batch.summary import render_text

        out.print(render_text(outcome.summary), markup=False, highlight=False)
        out.print(f"summary: {outcome.summary_path}", markup=False, highlight=False)
        if outcome.export is not None:
            out.print(f"export: {outcome.export.table}", markup=False, highlight=False)
    raise typer.Exit(outcome.exit_code)


def _error(message: str) -> NoReturn:
    """A problem before any work: one line (however narrow the terminal), exit code 2."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _dry_run(runner, found, as_json: bool) -> None:
    from dataclasses import asdict

    from ..batch.dryrun import plan

    rows = plan(found, runner.brepo, runner.montage.table, restart=runner.opts.restart, limit=runner.opts.limit)
    if as_json:
        print(json.dumps({"studies": [asdict(r) for r in rows], "skipped_files": dict(found.skipped)}, indent=2))
        return
    table = Table(title=f"batch --dry-run: {len(rows)} studies", show_lines=False)
    for col in ("study", "kind", "recorded", "status", "hours", "modalities (channels)", "unmapped", "problem"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.name, r.kind, r.recorded or "", r.status,
                      "" if r.duration_h is None else f"{r.duration_h:.2f}",
                      " ".join(f"{m}:{n}" for m, n in r.modalities.items()), ", ".join(r.unmapped[:8]),
                      r.problem or "")
    out.print(table)
    would = sum(r.would_process for r in rows)
    out.print(f"{would} would be processed; "
              + ", ".join(f"{n} {why}" for why, n in found.skipped.items()) if found.skipped else
              f"{would} would be processed", markup=False, highlight=False)
