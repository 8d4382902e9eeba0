"""``psg-gateway reference``: the site's own distribution that percentile flags compare a study with."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .service_cmd import ConfigOption, load_or_exit
from .store_access import StoreConfigOption, open_store

reference_app = typer.Typer(help="The site reference behind percentile flags: fill it from an archive, inspect it.",
                            no_args_is_help=True)
err = Console(stderr=True)
out = Console()


@reference_app.command("seed")
def reference_seed(
    archives: Annotated[list[Path], typer.Argument(help="Archive folders or files (EDF/BDF, DICOM waveform)")],
    config: ConfigOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Seed from at most N studies")] = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help="Decode/preprocess processes; 0: inline (default: batch.workers)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON")] = False,
) -> None:
    """Run an archive through the pipeline with messages off, so that its studies fill the reference.

    Every study is processed as the daemon would (outputs, quality gate) and ends FLAGGED: nothing is
    built for or sent to the EHR. Resumable like ``batch``. Exit codes: 0 done, 1 done with failed studies,
    2 a problem before any work.
    """
    from ..batch.runner import BatchError
    from ..batch.seed import seed_reference
    from ..logging import configure_logging

    cfg = load_or_exit(config)
    configure_logging("warning", json=None if cfg.logging.format == "auto" else cfg.logging.format == "json")
    try:
        seeded = seed_reference(cfg, list(archives), limit=limit, workers=workers, progress=sys.stderr.isatty())
    except BatchError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    tally = seeded.batch.summary.get("studies", {})
    if as_json:
        print(json.dumps({"model_hash": seeded.model_hash, "reference": seeded.sizes, "needed": seeded.needed,
                          "active": seeded.active, "outcomes": tally}, indent=2))
    else:
        out.print(f"processed: {', '.join(f'{k} {v}' for k, v in tally.items() if v) or 'nothing'}",
                  markup=False, highlight=False)
        _print_sizes(seeded.sizes, seeded.needed, seeded.model_hash)
    raise typer.Exit(seeded.batch.exit_code)


@reference_app.command("show")
def reference_show(config: StoreConfigOption = None,
                   as_json: Annotated[bool, typer.Option("--json", help="Print as JSON")] = False) -> None:
    """Studies in the reference per model and watched outcome, and whether percentile flags are active."""
    cfg, repo = open_store(config)
    sizes: dict[str, dict[str, int]] = {}
    for key, n in repo.reference_sizes().items():
        label, model = key.rsplit("@", 1)
        sizes.setdefault(model, {})[label] = n
    needed = cfg.flags.percentile_min_reference
    if as_json:
        print(json.dumps({"needed": needed, "models": sizes}, indent=2))
        return
    if not sizes:
        out.print(f"the reference is empty: percentile flags are inactive until {needed} studies of a model "
                  "are in it (psg-gateway reference seed ARCHIVE)", markup=False, highlight=False)
    for model, by_label in sizes.items():
        _print_sizes(by_label, needed, model)


def _print_sizes(sizes: dict[str, int], needed: int, model: str) -> None:
    table = Table(title=f"site reference, model {model[:12] or '-'}")
    for col in ("watched outcome", "studies", "percentile flags"):
        table.add_column(col)
    for label, n in sorted(sizes.items()):
        table.add_row(label, str(n), "active" if n >= needed else f"inactive ({needed} needed)")
    out.print(table)
