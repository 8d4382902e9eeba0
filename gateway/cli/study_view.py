"""The human view of ``psg-gateway studies show``: one study on a terminal, flags first.

:func:`study_view` gathers what an operator looks at (header, flags, watched outcomes, sleep metrics,
signal quality, the state timeline, the study's messages and its report files) from the study row, its
events and outbox rows and its outputs folder's ``metrics.json``, and returns rich renderables.
``studies show`` prints it on a terminal (or with ``--human``); ``--json`` and a stdout that is not a
terminal keep the full JSON document.

Identifiers: the same as the JSON view shows an operator (patient id and issuer, accession, study UID,
the input's name), no more: never the patient's name, birth date or sex. Nothing here logs. Every value
from the database or a file is printed as text, never read as rich markup.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ..pipeline.outputs import read_metrics

if TYPE_CHECKING:
    from ..store.models import Message, Study
    from ..store.repo import Repo

__all__ = ["study_view"]

DASH = "\u2014"
STAGES = ("W", "N1", "N2", "N3", "REM")
REPORT_FILES = ("report.pdf", "report.html")
_STATUS = {  # flag decision status -> (shown as, style); the study report's words
    "flagged": ("FLAGGED", "bold red"),
    "borderline": ("second look", "yellow"),
    "not flagged": ("not flagged", ""),
    "inactive": ("no threshold yet", "dim"),
    "withheld": ("withheld", "yellow"),
}
_DETAIL_CHARS = 72


# ---- small formatters --------------------------------------------------------------------------------------
def _finite(v: Any) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _num(v: Any, digits: int = 1, unit: str = "", missing: str = DASH) -> str:
    v = _finite(v)
    if v is None:
        return missing
    return f"{v:.{digits}f}{(' ' + unit) if unit else ''}"


def _when(v: datetime | None) -> str:
    if v is None:
        return DASH
    if v.tzinfo is not None:
        v = v.astimezone(UTC)
    return v.strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: Any) -> str:
    seconds = _finite(seconds)
    if seconds is None:
        return DASH
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list:
    return list(v) if isinstance(v, list | tuple) else []


def _short(detail: Any, limit: int = _DETAIL_CHARS) -> str:
    """An event's detail on one line: ``key=value`` pairs (compact JSON for nested values), cut to ``limit``."""
    if not detail:
        return ""
    if isinstance(detail, dict):
        text = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, default=str, separators=(',', ':'))}"
                         for k, v in detail.items())
    else:
        text = str(detail)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _section(title: str) -> Rule:
    return Rule(Text(title, style="bold"), align="left", style="dim")


def _grid(rows: Iterable[tuple[str, Text | str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, value in rows:
        grid.add_row(Text(label), value if isinstance(value, Text) else Text(value))
    return grid


def _table(*columns: str) -> Table:
    return Table(*columns, header_style="bold", show_edge=False, pad_edge=False, box=None)


# ---- the parts ---------------------------------------------------------------------------------------------
def _model_line(s: Study, metrics: dict | None) -> Text:
    bundle = _dict((metrics or {}).get("model_bundle"))
    name = " ".join(x for x in (s.bundle_name or bundle.get("name"), s.bundle_version or bundle.get("version")) if x)
    if not name:
        return Text(DASH)
    line = Text(name)
    if s.bundle_hash:
        line.append(f" (hash {s.bundle_hash[:12]})", style="dim")
    validated = (metrics or {}).get("validated", bundle.get("validated", s.bundle_validated))
    if validated is True:
        line.append(" \u00b7 validated by this site", style="green")
    else:
        line.append(" \u00b7 NOT FOR CLINICAL USE", style="bold red")
        line.append(" (not validated by this site)")
    return line


def _montage_line(s: Study) -> Text:
    name = " ".join(x for x in (s.montage_name, s.montage_version) if x)
    if not name:
        return Text(DASH)
    mapping = _dict(s.mapping)
    line = Text(name)
    channels = _dict(mapping.get("channels"))
    if channels:
        line.append(" \u00b7 " + ", ".join(f"{m} {len(_list(v))}" for m, v in channels.items()))
    unmapped = [str(u) for u in _list(mapping.get("unmapped"))]
    if unmapped:
        line.append(" \u00b7 unmapped: ", style="yellow")
        line.append(", ".join(unmapped))
    return line


def _header(s: Study, metrics: dict | None) -> RenderableType:
    state = Text(s.state, style="bold red" if s.state == "FAILED" else "bold")
    state.append(f"  version {s.version}, {s.attempts} attempt(s)", style="dim")
    rows: list[tuple[str, Text | str]] = [("State", state)]
    if s.last_error:
        rows.append(("Last error", Text(s.last_error, style="red")))
    if s.duplicate_of:
        rows.append(("Duplicate of", f"study id {s.duplicate_of}"))
    rows.append(("Source", f"{s.source} ({s.source_kind})"))
    rows.append(("Received", f"{_when(s.received_at)} UTC"
                 + (f" \u00b7 finished {_when(s.finished_at)} UTC" if s.finished_at else "")))
    recording = _dict((metrics or {}).get("recording"))
    recorded = _when(s.recording_start)[:16] if s.recording_start else DASH
    if recording:
        recorded += f" \u00b7 {_duration(recording.get('duration_s'))}"
        if recording.get("format"):
            recorded += f", {recording['format']}"
        if recording.get("channels") is not None:
            recorded += f", {recording['channels']} channels"
    rows.append(("Recorded", recorded))
    pid = s.patient_id or DASH
    if s.patient_id and s.patient_id_issuer:
        pid += f" ({s.patient_id_issuer})"
    rows += [("Patient ID", pid), ("Accession", s.accession or DASH), ("Study UID", s.study_uid or DASH)]
    scorer = getattr(s, "scorer", None)
    if scorer:
        rows.append(("Scorer", scorer))
    if s.input_name or s.content_hash:
        line = Text(s.input_name or DASH)
        if s.content_hash:
            line.append(f" (sha256 {s.content_hash[:12]})", style="dim")
        rows.append(("Input", line))
    if s.input_path:
        rows.append(("Input now at", s.input_path))
    rows.append(("Model", _model_line(s, metrics)))
    rows.append(("Montage", _montage_line(s)))
    timings = _dict(s.timings)
    if timings:
        rows.append(("Timings", ", ".join(f"{k.removesuffix('_s')} {_num(v, 2, 's')}" for k, v in timings.items())))
    return _grid(rows)


def _flag_lines(flags: dict[str, Any] | None, state: str) -> RenderableType:
    if flags is None:
        return Text(f"Not decided yet: the flag step has not run for this study ({state}).", style="dim")
    lines: list[Text] = []
    sizes = {(str(o.get("label")), str(o.get("head") or "")): o.get("reference_size")
             for o in _list(flags.get("outcomes")) if isinstance(o, dict)}

    def outcome(tag: str, style: str, f: dict) -> Text:
        line = Text(f"{tag} ", style=style)
        name = str(f.get("phenotype") or f.get("label") or "?")
        line.append(name + (f" ({f['code']})" if f.get("code") else ""), style="bold")
        if f.get("head"):
            line.append(f" [site head {f['head']}]", style="dim")
        size = f.get("reference_size", sizes.get((str(f.get("label")), str(f.get("head") or ""))))
        if f.get("percentile") is not None:
            line.append(f": percentile {_num(f.get('percentile'))}"
                        + (f" of {size}" if isinstance(size, int) and size else ""))
        elif f.get("log_hazard") is not None:
            line.append(f": log-hazard {_num(f.get('log_hazard'), 3)}")
        if f.get("reason"):
            line.append(f" \u2014 {f['reason']}", style="dim")
        return line

    risk = _dict(flags.get("risk_flags"))
    if risk.get("suppressed"):
        reasons = [str(r) for r in _list(risk.get("reasons"))]
        line = Text("RISK FLAGS WITHHELD", style="bold yellow")
        line.append(": " + ("; ".join(reasons) if reasons else "see the notes"))
        lines.append(line)
    lines += [outcome("FLAGGED", "bold red", f) for f in _list(flags.get("flags")) if isinstance(f, dict)]
    lines += [outcome("SECOND LOOK", "bold yellow", b) for b in _list(flags.get("borderline")) if isinstance(b, dict)]
    for finding in _list(flags.get("findings")):
        if isinstance(finding, dict):
            line = Text("FINDING ", style="bold magenta")
            line.append(str(finding.get("reason") or finding.get("text") or finding.get("metric") or "?"))
            lines.append(line)
    if not lines:
        lines.append(Text("Nothing flagged: no risk flag, no second look, no sleep finding.", style="green"))
    lines += [Text(f"Note: {n}", style="dim") for n in _list(flags.get("notes"))]
    return Group(*lines)


def _outcomes_table(flags: dict[str, Any] | None) -> RenderableType | None:
    outcomes = [o for o in _list((flags or {}).get("outcomes")) if isinstance(o, dict)]
    if not outcomes:
        return None
    table = _table("Outcome", "Code", "Log-hazard", "Percentile", "Reference", "Status")
    for column in (2, 3, 4):
        table.columns[column].justify = "right"
    for o in outcomes:
        shown, style = _STATUS.get(str(o.get("status")), (str(o.get("status") or "?"), ""))
        name = str(o.get("phenotype") or o.get("label") or "?")
        if o.get("phecode") and o.get("phecode") != name:
            name += f" ({o['phecode']})"
        if o.get("head"):
            name += f" [{o['head']}]"
        lh = _finite(o.get("log_hazard"))
        table.add_row(Text(name), Text(str(o.get("code") or "")), Text(DASH if lh is None else f"{lh:+.3f}"),
                      Text(_num(o.get("percentile"))),
                      Text(DASH if o.get("reference_size") is None else str(o.get("reference_size"))),
                      Text(shown, style=style))
    return table


def _sleep(metrics: dict, scorer: str | None) -> list[RenderableType]:
    sleep = _dict(metrics.get("sleep"))
    parts: list[RenderableType] = []
    if not sleep:
        parts.append(Text("No sleep metrics (the bundle has no staging head, or none were recorded).", style="dim"))
    else:
        parts.append(_grid([
            ("Time in bed", _num(sleep.get("tib_min"), 1, "min")),
            ("Total sleep time", _num(sleep.get("tst_min"), 1, "min")),
            ("Sleep efficiency", _num(sleep.get("sleep_efficiency_pct"), 1, "%")),
            ("Sleep onset latency", _num(sleep.get("sleep_onset_latency_min"), 1, "min", missing="no sleep")),
            ("WASO", _num(sleep.get("waso_min"), 1, "min")),
            ("REM latency", _num(sleep.get("rem_latency_min"), 1, "min", missing="no REM")),
        ]))
        minutes, pct = _dict(sleep.get("stage_min")), _dict(sleep.get("stage_pct_of_tst"))
        if minutes:
            stages = _table("Stage", "Minutes", "% of TST")
            stages.columns[1].justify = stages.columns[2].justify = "right"
            for stage in STAGES:
                stages.add_row(Text(stage), Text(_num(minutes.get(stage))),
                               Text(DASH if stage == "W" else _num(pct.get(stage))))
            parts.append(stages)
    scoring = metrics.get("staging_agreement")
    if isinstance(scoring, dict):
        line = Text("Scored hypnogram" + (f" (scorer {scorer})" if scorer else "") + ": ", style="bold")
        epochs = scoring.get("epochs") or 0
        if not epochs:
            line.append("no epoch scored in both hypnograms, no agreement computed.", style="")
        else:
            accuracy = scoring.get("accuracy")
            line.append(f"{epochs} epochs, accuracy "
                        f"{_num(None if accuracy is None else 100 * accuracy, 1, '%')}, Cohen's kappa "
                        f"{_num(scoring.get('kappa'), 2, missing='undefined')}", style="")
            f1 = _dict(scoring.get("f1"))
            if f1:
                line.append("; F1 " + ", ".join(f"{s} {_num(f1.get(s), 2)}" for s in STAGES), style="")
        parts.append(line)
    return parts


def _quality(metrics: dict) -> list[RenderableType]:
    quality = metrics.get("quality")
    if not isinstance(quality, dict) or "interpretable" not in quality:
        return [Text("Signal quality checks were not recorded for this study.", style="dim")]
    reasons = [str(r) for r in _list(quality.get("reasons"))]
    if quality.get("interpretable"):
        parts: list[RenderableType] = [Text("Signals interpretable.", style="green")]
    else:
        parts = [Text("Signals NOT interpretable: " + ("; ".join(reasons) if reasons else "see the channels"),
                      style="bold red")]
    for warning in _list(quality.get("warnings")):
        parts.append(Text(f"Warning: {warning}", style="yellow"))
    modalities = _dict(quality.get("modalities"))
    if modalities:
        parts.append(Text(" \u00b7 ".join(f"{m} {_dict(v).get('usable', '?')}/{_dict(v).get('channels', '?')} usable"
                                         for m, v in modalities.items())))
    for label, channel in _dict(quality.get("channels")).items():
        channel = _dict(channel)
        problems = [str(p) for p in _list(channel.get("problems"))]
        if problems or channel.get("usable") is False:
            line = Text(f"{label} ({channel.get('modality', '?')}): ")
            line.append("unusable" if channel.get("usable") is False else "usable", style=(
                "red" if channel.get("usable") is False else ""))
            if problems:
                line.append(" \u2014 " + "; ".join(problems))
            parts.append(line)
    return parts


def _timeline(repo: Repo, s: Study) -> RenderableType:
    events = repo.events(s.id)
    if not events:
        return Text("No events.", style="dim")
    rows = []
    for e in events:
        moved = (f"{e.from_state or DASH} \u2192 {e.to_state}" if e.to_state and e.to_state != e.from_state
                 else (e.to_state or ""))
        rows.append((_when(e.at), e.event, moved, e.actor, _short(e.detail)))
    table = _table("Time (UTC)", "Event", "State", "Actor", "Detail")
    for i, column in enumerate(table.columns[:4]):  # one line per event: the detail gives way, the rest is whole
        column.no_wrap = True
        column.min_width = max(len(str(column.header)), *(len(r[i]) for r in rows))
    for row in rows:
        table.add_row(*map(Text, row[:4]), Text(row[4], style="dim", overflow="ellipsis", no_wrap=True))
    return table


def _messages(messages: list[Message]) -> RenderableType:
    if not messages:
        return Text("No message for this study.", style="dim")
    table = _table("Id", "Version", "State", "Destination", "Attempts", "ACK", "Created (UTC)", "Sent (UTC)",
                   "Last error")
    for m in messages:
        style = {"DEAD": "bold red", "PENDING": "yellow", "SENT": "green"}.get(m.state, "")
        table.add_row(Text(str(m.id)), Text(str(m.study_version)), Text(m.state, style=style),
                      Text(m.destination), Text(str(m.attempts)), Text(m.ack_code or ""),
                      Text(_when(m.created_at)), Text(_when(m.sent_at) if m.sent_at else ""),
                      Text(_short(m.last_error or "", 60)))
    return table


def _report_files(s: Study) -> RenderableType:
    if not s.output_path:
        return Text("No outputs yet.", style="dim")
    folder = Path(s.output_path)
    rows: list[tuple[str, Text | str]] = [("Outputs", str(folder))]
    for name in REPORT_FILES:
        path = folder / name
        rows.append((name, str(path) if path.is_file() else Text("not written", style="dim")))
    return _grid(rows)


# ---- the view ----------------------------------------------------------------------------------------------
def _metrics(s: Study) -> tuple[dict | None, str | None]:
    """The outputs' metrics.json, or None with why (no outputs yet, absent, unreadable)."""
    if not s.output_path:
        return None, None
    try:
        metrics = read_metrics(Path(s.output_path))
    except OSError as exc:
        return None, f"metrics.json cannot be read: {exc.strerror or type(exc).__name__}"
    except ValueError:
        return None, "metrics.json is not valid JSON"
    if metrics is None:
        return None, "metrics.json is not in the outputs folder (removed by retention?)"
    return (metrics, None) if isinstance(metrics, dict) else (None, "metrics.json does not hold an object")


def study_view(repo: Repo, study: Study, *, messages: int = 20) -> Group:
    """The human view of ``study``: header, flags, watched outcomes, sleep metrics, signal quality, the state
    timeline, its newest ``messages`` outbox rows and its report files, as one rich renderable."""
    metrics, why = _metrics(study)
    flags = study.flags if isinstance(study.flags, dict) else None
    title = Text(f"Study {study.key}", style="bold")
    title.append(f"  (id {study.id})", style="dim")
    parts: list[RenderableType] = [Rule(title, align="left"), _header(study, metrics), Text(),
                                   _section("Flags"), _flag_lines(flags, study.state)]
    table = _outcomes_table(flags)
    if table is not None:
        parts += [Text(), _section("Watched outcomes"), table]
    if metrics is not None:
        parts += [Text(), _section("Sleep metrics"), *_sleep(metrics, getattr(study, "scorer", None)),
                  Text(), _section("Signal quality"), *_quality(metrics)]
    elif why:
        parts += [Text(), Text(why, style="yellow")]
    parts += [Text(), _section("Timeline"), _timeline(repo, study),
              Text(), _section("Messages"), _messages(repo.messages(study_id=study.id, limit=messages)),
              Text(), _section("Report"), _report_files(study)]
    return Group(*parts)
