"""``psg-gateway scoring``: inspect a scoring file (NSRR / Profusion XML, EDF+ annotations)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

scoring_app = typer.Typer(help="Scoring files (NSRR / Profusion XML, EDF+ annotations): stages, events, AHI, ODI.",
                          no_args_is_help=True)
err = Console(stderr=True)
out = Console()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


@scoring_app.command("show")
def scoring_show(
    path: Annotated[Path, typer.Argument(help="NSRR or Profusion XML scoring file, or an EDF+ file")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Stages, event counts by kind, and AHI3/AHI4/ODI3/ODI4 (per hour of sleep) of one scoring file.

    Exit codes: 0 shown, 2 the file cannot be read.
    """
    from ..respiratory import AROUSAL_WINDOW_S, DESATURATION_WINDOW_S, respiratory_indices
    from ..scoring_files import ScoringFileError, read_scoring

    try:
        night = read_scoring(path)
    except ScoringFileError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    indices = respiratory_indices(night)
    stages = night.stage_counts()
    events = night.event_counts()
    if as_json:
        print(json.dumps({"file": str(path), "source": night.source, "epoch_s": night.epoch_s,
                          "epochs": len(night.stages), "stages": stages, "events": events,
                          "indices": indices.to_dict(),
                          "rules": {"desaturation_window_s": DESATURATION_WINDOW_S,
                                    "arousal_window_s": AROUSAL_WINDOW_S}}, indent=2))
        return
    def say(text: str) -> None:
        out.print(text, markup=False, highlight=False)

    say(f"{path} ({night.source}): {len(night.stages)} epochs of {night.epoch_s:g} s, "
        f"total sleep time {indices.total_sleep_time_h * 60:.1f} min")
    say("stages: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    say("events: " + ", ".join(f"{k} {v}" for k, v in events.items()))
    say(f"in sleep: apneas {indices.apneas}, hypopneas {indices.hypopneas} "
        f"(3 %/arousal {indices.hypopneas_3}, 4 % {indices.hypopneas_4}), "
        f"desaturations >=3 % {indices.desaturations_3}, >=4 % {indices.desaturations_4}; "
        f"left out in wake {indices.events_in_wake}")
    say(f"AHI3 {_fmt(indices.ahi3)}  AHI4 {_fmt(indices.ahi4)}  ODI3 {_fmt(indices.odi3)}  "
        f"ODI4 {_fmt(indices.odi4)}  (per hour of sleep)")
