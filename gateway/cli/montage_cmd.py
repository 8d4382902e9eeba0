"""``psg-gateway montage ...``: list, explain, test, edit, validate and compare montage tables.

Exit codes, every command: 0 ok; 1 problems found (unmapped or conflicting labels, unreadable recordings,
conflicts in a table, an edit refused because it would make one); 2 usage error (bad arguments, a path that
does not exist, a table that cannot be read). Human output is a table on stdout; ``--json`` prints one JSON
document instead. Errors go to stderr as one line naming the file and the reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..montage.audit import audit_log_path
from ..montage.editing import (
    MontageEditError,
    RuleExistsError,
    TableEdit,
    add_rule,
    editable_table,
    remove_rules,
)
from ..montage.table import (
    EXCLUDE,
    KINDS,
    MODALITIES,
    MontageError,
    MontageRule,
    MontageTable,
    Resolution,
    load_table,
    parse_source,
)

montage_app = typer.Typer(
    help="Montage tables: how channel labels map to modalities (list, show, test, add, remove, validate, "
         "diff, unmapped).",
    no_args_is_help=True,
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

TableOpt = Annotated[Path | None, typer.Option(
    "--table", "-t", help="Montage table YAML (default: the built-in table)", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table")]
SourceOpt = Annotated[str | None, typer.Option(
    "--source", "-s", help="Where the studies come from: dicom:<calling AE title>, folder:<path> or "
                           "archive:<name> (scoped rules apply only to their source)", show_default=False)]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


# ---- helpers ------------------------------------------------------------------------------------------------


def _usage(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(EXIT_USAGE)


def _echo_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))


def _load(path: Path | str | None, *, check: bool = True) -> MontageTable:
    try:
        return load_table(path, check=check)
    except MontageError as exc:
        raise _usage(str(exc)) from None


def _source(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_source(value)
    except ValueError as exc:
        raise _usage(f"--source: {exc}") from None


def _table_doc(table: MontageTable) -> dict[str, Any]:
    return {"name": table.name, "version": table.version, "file": table.source, "extends": table.chain[1:]}


def _title(table: MontageTable) -> str:
    extends = f", extends {' -> '.join(table.chain[1:])}" if table.base else ""
    return f"montage table {table.name} (version {table.version}{extends})"


def _modality_text(modality: str | None, status: str) -> str:
    if status == "conflict":
        return "[bold red]CONFLICT[/]"
    if status == "unmapped":
        return "[bold red]UNMAPPED[/]"
    if status == "excluded":
        return "[dim]excluded[/]"
    return f"[bold]{modality}[/]"


def _suggest_doc(table: MontageTable, label: str, source: str | None, n: int = 3) -> list[dict[str, Any]]:
    return [{"label": r.pattern, "modality": r.modality, "rule": r.short(), "where": r.where}
            for r in table.suggest(label, n=n, source=source)]


def _suggest_text(suggestions: list[dict[str, Any]]) -> str:
    if not suggestions:
        return "no similar label in the table"
    return "closest: " + ", ".join(f"{s['label']!r} ({s['modality']})" for s in suggestions)


def _kind(kind: str) -> str:
    k = "normalised" if kind.lower() == "normalized" else kind.lower()
    if k not in KINDS:
        raise _usage(f"--kind: unknown kind {kind!r} (expected {', '.join(KINDS)})")
    return k


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _check_paths(paths: Sequence[Path]) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise _usage(f"{missing[0]}: no such file or folder")


# ---- list ---------------------------------------------------------------------------------------------------


@montage_app.command("list")
def list_rules(
    modality: Annotated[str | None, typer.Option(help="Only rules for this modality (BAS, RESP, EKG, EMG, "
                                                      "exclude)")] = None,
    scope: Annotated[str | None, typer.Option(help="Only rules with this scope (e.g. dicom:PSG_SCU); 'none' "
                                                   "for unscoped rules")] = None,
    kind: Annotated[str | None, typer.Option(help="Only rules of this kind (exact, normalised, regex)")] = None,
    table_path: TableOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a table's rules (with those of the table it extends), in the order they are written."""
    table = _load(table_path, check=False)
    rules = list(table.rules)
    if modality is not None:
        wanted = modality.upper() if modality.upper() in MODALITIES else modality.lower()
        if wanted not in (*MODALITIES, EXCLUDE, "ignore"):
            raise _usage(f"--modality: unknown modality {modality!r} (expected {', '.join(MODALITIES)} or exclude)")
        wanted = EXCLUDE if wanted == "ignore" else wanted
        rules = [r for r in rules if r.modality == wanted]
    if scope is not None:
        wanted_scope = None if scope.lower() == "none" else _source(scope)
        rules = [r for r in rules if r.scope == wanted_scope]
    if kind is not None:
        k = _kind(kind)
        rules = [r for r in rules if r.kind == k]
    if as_json:
        _echo_json({"table": _table_doc(table), "rules": [r.as_dict() for r in rules]})
        return
    grid = Table(title=f"{_title(table)}: {len(rules)} of {len(table.rules)} rules")
    for column in ("where", "kind", "label / pattern", "modality", "priority", "scope", "note"):
        grid.add_column(column, overflow="fold")
    for r in rules:
        grid.add_row(escape(r.where), r.kind, escape(r.pattern), r.modality, str(r.priority),
                     escape(r.scope or ""), escape(r.note))
    out.print(grid)


# ---- show ---------------------------------------------------------------------------------------------------


def _show_doc(table: MontageTable, res: Resolution, source: str | None) -> dict[str, Any]:
    doc = res.as_dict()
    applied = {id(r) for r, _ in res.candidates}
    doc["other_sources"] = [r.as_dict() for r, _ in table.matches(res.label, any_source=True)
                            if id(r) not in applied]
    doc["suggestions"] = _suggest_doc(table, res.label, source, n=5) if res.rule is None else []
    return {"table": _table_doc(table), **doc}


@montage_app.command("show")
def show(
    label: Annotated[str, typer.Argument(help="A channel label as recorded")],
    source: SourceOpt = None,
    table_path: TableOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which rule maps LABEL and why; UNMAPPED with the closest known labels when none does."""
    table = _load(table_path, check=False)  # so that it can explain a conflict
    src = _source(source)
    res = table.resolve(label, src)
    doc = _show_doc(table, res, src)
    code = EXIT_OK if res.status in ("mapped", "excluded") else EXIT_PROBLEMS
    if as_json:
        _echo_json(doc)
        raise typer.Exit(code)
    grid = Table(title=_title(table), show_header=False)
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("label", escape(repr(label)))
    grid.add_row("compared as", escape(repr(res.normalised)) + " (normalised: case, spaces, punctuation ignored)")
    grid.add_row("source", escape(src or "none given (unscoped rules only)"))
    grid.add_row("result", _modality_text(res.modality, res.status))
    if res.rule is not None:
        grid.add_row("rule", escape(res.rule.describe()))
        grid.add_row("why", escape(res.how or ""))
        if res.rule.note:
            grid.add_row("note", escape(res.rule.note))
    for rule in res.conflict:
        grid.add_row("tied", escape(rule.describe()))
    if res.conflict:
        grid.add_row("fix", "give one of the tied rules a higher priority or a scope, or remove one")
    for rule, quality in res.candidates:
        if rule is not res.rule and rule not in res.conflict:
            grid.add_row("also matches", escape(f"{rule.describe()}: {res.why_not(rule, quality)}"))
    for other in doc["other_sources"]:
        grid.add_row("other source", escape(f"{other['kind']} {json.dumps(other['pattern'])} -> "
                                            f"{other['modality']} only for {other['scope']} (line {other['line']})"))
    if res.rule is None and not res.conflict:
        grid.add_row("closest", escape(", ".join(f"{s['label']!r} -> {s['modality']} ({s['where']})"
                                                 for s in doc["suggestions"]) or "no similar label in the table"))
    out.print(grid)
    raise typer.Exit(code)


# ---- test / map ---------------------------------------------------------------------------------------------


def _study_doc(table: MontageTable, recording: Any, source: str | None) -> dict[str, Any]:
    labels = [ch.label for ch in recording.channels]
    match = table.map_labels(labels, source, [getattr(ch, "source_code", None) for ch in recording.channels])
    channels = []
    for ch, cm in zip(recording.channels, match.channels, strict=True):
        entry = {"index": cm.index, "label": ch.label, "rate_hz": float(ch.sampling_rate),
                 "modality": cm.modality, "status": cm.status,
                 "rule": cm.rule.short() if cm.rule else None, "where": cm.rule.where if cm.rule else None,
                 "suggestions": _suggest_doc(table, ch.label, source) if cm.status == "unmapped" else []}
        if cm.status == "conflict":
            entry["conflict"] = match.conflicts.get(ch.label, [])
        channels.append(entry)
    covered = {m: len(ix) for m, ix in match.groups.items()}
    return {"channels": channels, "modalities": covered,
            "missing": [m for m in MODALITIES if m not in covered],
            "unmapped": match.unmapped, "excluded": match.ignored, "conflicts": match.conflicts}


def _print_study(name: str, table: MontageTable, doc: dict[str, Any]) -> None:
    grid = Table(title=f"{escape(name)}  [dim]({escape(table.name)} {table.version})[/]", title_justify="left")
    for column, justify in (("#", "right"), ("label", "left"), ("rate Hz", "right"), ("modality", "left"),
                            ("rule / closest known label", "left")):
        grid.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for ch in doc["channels"]:
        if ch["status"] == "unmapped":
            detail = _suggest_text(ch["suggestions"])
        elif ch["status"] == "conflict":
            detail = "tied: " + " / ".join(ch["conflict"])
        else:
            detail = f"{ch['rule']} ({ch['where']})"
        grid.add_row(str(ch["index"]), escape(ch["label"]), f"{ch['rate_hz']:g}",
                     _modality_text(ch["modality"], ch["status"]), escape(detail))
    out.print(grid)
    covered = ", ".join(f"{m} ({n})" for m, n in doc["modalities"].items()) or "none"
    line = f"  covers {covered}; missing {', '.join(doc['missing']) or 'none'}"
    if doc["unmapped"]:
        line += f"; [bold red]{len(doc['unmapped'])} unmapped[/]: {escape(', '.join(doc['unmapped']))}"
    out.print(line)


def _test_paths(paths: Sequence[Path], table: MontageTable, source: str | None, as_json: bool) -> int:
    from ..montage.recordings import read_studies  # the readers and numpy: only for a command that reads

    studies: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for study in read_studies(paths):
        if study.error is not None:
            errors.append({"input": study.name, "error": study.error})
            if not as_json:
                err.print(f"[bold red]error:[/] {escape(study.error)}")
            continue
        doc = {"input": study.name, **_study_doc(table, study.recording, source)}
        studies.append(doc)
        if not as_json:
            _print_study(study.name, table, doc)
    problems = errors or any(s["unmapped"] for s in studies)
    if as_json:
        _echo_json({"table": _table_doc(table), "source": source, "studies": studies, "errors": errors,
                    "ok": not problems})
    else:
        n_unmapped = sum(1 for s in studies if s["unmapped"])
        out.print(f"{_n(len(studies), 'study', 'studies')}, {n_unmapped} with unmapped labels, "
                  f"{len(errors)} unreadable")
    return EXIT_PROBLEMS if problems else EXIT_OK


@montage_app.command("test")
def test(
    paths: Annotated[list[Path], typer.Argument(help="EDF/BDF files, DICOM files, or folders (every EDF/BDF "
                                                     "file and DICOM study in them)")],
    source: SourceOpt = None,
    table_path: TableOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Map every channel of recordings: label, rate, modality or UNMAPPED (with the closest known label),
    and which modalities each study covers."""
    _check_paths(paths)
    table = _load(table_path)
    raise typer.Exit(_test_paths(paths, table, _source(source), as_json))


@montage_app.command("map")
def map_labels(
    labels: Annotated[list[str], typer.Argument(help="Channel labels, or one recording file or folder")],
    source: SourceOpt = None,
    table_path: TableOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quick check: how channel labels (or one recording's channels, like 'test') map."""
    table = _load(table_path)
    src = _source(source)
    if len(labels) == 1 and Path(labels[0]).exists():
        raise typer.Exit(_test_paths([Path(labels[0])], table, src, as_json))
    match = table.map_labels(labels, src)
    rows = [{"label": cm.label, "modality": cm.modality, "status": cm.status,
             "rule": cm.rule.short() if cm.rule else None, "where": cm.rule.where if cm.rule else None,
             "suggestions": _suggest_doc(table, cm.label, src) if cm.status == "unmapped" else []}
            for cm in match.channels]
    code = EXIT_PROBLEMS if match.unmapped else EXIT_OK
    if as_json:
        _echo_json({"table": _table_doc(table), "source": src, "labels": rows, "unmapped": match.unmapped})
        raise typer.Exit(code)
    grid = Table(title=_title(table))
    for column in ("label", "modality", "rule / closest known label"):
        grid.add_column(column, overflow="fold")
    for row in rows:
        detail = f"{row['rule']} ({row['where']})" if row["rule"] else _suggest_text(row["suggestions"])
        grid.add_row(escape(row["label"]), _modality_text(row["modality"], row["status"]), escape(detail))
    out.print(grid)
    if match.unmapped:
        out.print(f"{len(match.unmapped)} unmapped: {escape(', '.join(match.unmapped))}")
    raise typer.Exit(code)


# ---- unmapped -----------------------------------------------------------------------------------------------


@montage_app.command("unmapped")
def unmapped(
    paths: Annotated[list[Path], typer.Argument(help="Folders (or files) of studies")],
    source: SourceOpt = None,
    table_path: TableOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Labels across studies that map nowhere, with how many channels and studies carry them, most
    frequent first."""
    from ..montage.recordings import read_studies

    _check_paths(paths)
    table = _load(table_path)
    src = _source(source)
    channels: Counter[str] = Counter()
    studies_with: Counter[str] = Counter()
    errors: list[dict[str, str]] = []
    n_studies = 0
    for study in read_studies(paths):
        if study.error is not None:
            errors.append({"input": study.name, "error": study.error})
            continue
        n_studies += 1
        match = table.map_labels([ch.label for ch in study.recording.channels], src,
                                 [getattr(ch, "source_code", None) for ch in study.recording.channels])
        channels.update(match.unmapped)
        studies_with.update(set(match.unmapped))
    rows = [{"label": label, "channels": n, "studies": studies_with[label],
             "suggestions": _suggest_doc(table, label, src)}
            for label, n in sorted(channels.items(), key=lambda kv: (-kv[1], kv[0]))]
    code = EXIT_PROBLEMS if rows or errors else EXIT_OK
    if as_json:
        _echo_json({"table": _table_doc(table), "source": src, "studies": n_studies, "unmapped": rows,
                    "errors": errors})
        raise typer.Exit(code)
    for error in errors:
        err.print(f"[bold red]error:[/] {escape(error['error'])}")
    grid = Table(title=f"{_title(table)}: unmapped labels in {_n(n_studies, 'study', 'studies')}")
    for column, justify in (("label", "left"), ("channels", "right"), ("studies", "right"),
                            ("closest known label", "left")):
        grid.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        grid.add_row(escape(row["label"]), str(row["channels"]), str(row["studies"]),
                     escape(_suggest_text(row["suggestions"])))
    out.print(grid)
    out.print(f"{_n(len(rows), 'unmapped label', 'unmapped labels')}, {len(errors)} unreadable")
    raise typer.Exit(code)


# ---- validate -----------------------------------------------------------------------------------------------


@montage_app.command("validate")
def validate(
    file: Annotated[Path | None, typer.Argument(help="Table to check (default: --table, else the built-in "
                                                     "table)", show_default=False)] = None,
    table_path: TableOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a table: syntax (exit 2 when it cannot be read), conflicting rules (exit 1), repeated rules
    (warnings)."""
    table = _load(file or table_path, check=False)
    problems = table.problems()
    errors = [p for p in problems if p.severity == "error"]
    by_kind = Counter(r.kind for r in table.rules)
    by_modality = Counter(r.modality for r in table.rules)
    code = EXIT_PROBLEMS if errors else EXIT_OK
    if as_json:
        _echo_json({"table": _table_doc(table), "rules": len(table.rules), "own_rules": len(table.own_rules),
                    "by_kind": dict(by_kind), "by_modality": dict(by_modality), "ok": not errors,
                    "problems": [p.as_dict() for p in problems]})
        raise typer.Exit(code)
    out.print(escape(_title(table)) + f"  [dim]{escape(table.source)}[/]")
    out.print(f"  {len(table.rules)} rules ({len(table.own_rules)} in this file): "
              + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())) + "; "
              + ", ".join(f"{m} {by_modality[m]}" for m in (*MODALITIES, EXCLUDE) if by_modality[m]))
    for p in problems:
        tag = "[bold red]conflict[/]" if p.severity == "error" else "[yellow]warning[/]"
        out.print(f"  {tag}: {escape(p.message)}")
    out.print("  [bold red]INVALID[/]: the gateway refuses this table" if errors
              else "  [bold green]OK[/]: no conflicts")
    raise typer.Exit(code)


# ---- diff ---------------------------------------------------------------------------------------------------


def _labels_from(paths: Sequence[Path]) -> tuple[list[str], list[dict[str, str]]]:
    """Labels to compare: from recordings, or from text files with one label per line."""
    from ..montage.recordings import read_studies

    labels: dict[str, None] = {}
    errors: list[dict[str, str]] = []
    recordings: list[Path] = []
    for path in paths:
        if path.is_file() and path.suffix.lower() in (".txt", ".lst", ".csv"):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip():
                    labels.setdefault(line.strip(), None)
        else:
            recordings.append(path)
    for study in read_studies(recordings):
        if study.error is not None:
            errors.append({"input": study.name, "error": study.error})
            continue
        for ch in study.recording.channels:
            labels.setdefault(ch.label, None)
    return list(labels), errors


@montage_app.command("diff")
def diff(
    a: Annotated[str, typer.Argument(help="Old table file ('default': the built-in table)")],
    b: Annotated[str, typer.Argument(help="New table file ('default': the built-in table)")],
    labels: Annotated[list[Path] | None, typer.Option(
        "--labels", help="Recordings, folders, or .txt files (one label per line): show the labels whose "
                         "modality changes from A to B", show_default=False)] = None,
    source: SourceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rules added, removed and changed from table A to table B (with the tables they extend)."""
    table_a, table_b = _load(a, check=False), _load(b, check=False)
    src = _source(source)

    def index(table: MontageTable) -> dict[tuple[str, str, str | None], MontageRule]:
        out_: dict[tuple[str, str, str | None], MontageRule] = {}
        for r in table.rules:
            out_.setdefault(r.identity, r)
        return out_

    ia, ib = index(table_a), index(table_b)
    added = [ib[k].as_dict() for k in ib if k not in ia]
    removed = [ia[k].as_dict() for k in ia if k not in ib]
    changed = []
    for k in ia:
        if k in ib:
            ra, rb = ia[k], ib[k]
            fields = [f for f in ("modality", "priority", "note") if getattr(ra, f) != getattr(rb, f)]
            if fields:
                changed.append({"old": ra.as_dict(), "new": rb.as_dict(), "fields": fields})
    label_changes: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    if labels:
        _check_paths(labels)
        names, errors = _labels_from(labels)
        for name in names:
            ra_, rb_ = table_a.resolve(name, src), table_b.resolve(name, src)
            if (ra_.status, ra_.modality) != (rb_.status, rb_.modality):
                label_changes.append({
                    "label": name,
                    "old": {"status": ra_.status, "modality": ra_.modality,
                            "rule": ra_.rule.short() if ra_.rule else None},
                    "new": {"status": rb_.status, "modality": rb_.modality,
                            "rule": rb_.rule.short() if rb_.rule else None}})
    if as_json:
        _echo_json({"a": _table_doc(table_a), "b": _table_doc(table_b), "added": added, "removed": removed,
                    "changed": changed, "labels": label_changes if labels else None, "errors": errors,
                    "same": not (added or removed or changed)})
        return
    out.print(f"A: {escape(_title(table_a))}\nB: {escape(_title(table_b))}")
    if not (added or removed or changed):
        out.print("no rule differs")
    grid = Table(show_header=True)
    for column in ("", "kind", "label / pattern", "scope", "modality", "priority", "where"):
        grid.add_column(column, overflow="fold", no_wrap=column in ("", "kind", "modality", "priority"))

    def row(mark: str, r: dict[str, Any], modality: str | None = None, priority: str | None = None) -> None:
        grid.add_row(mark, r["kind"], escape(r["pattern"]), escape(r["scope"] or ""),
                     escape(modality or r["modality"]), priority or str(r["priority"]),
                     escape(f"{r['table']}:{r['line']}"))

    for r in added:
        row("[green]+ added[/]", r)
    for r in removed:
        row("[red]- removed[/]", r)
    for c in changed:
        old, new = c["old"], c["new"]
        row("[yellow]~ changed[/]", new,
            modality=f"{old['modality']} -> {new['modality']}" if old["modality"] != new["modality"] else None,
            priority=f"{old['priority']} -> {new['priority']}" if old["priority"] != new["priority"] else None)
    if added or removed or changed:
        out.print(grid)
        out.print(f"{len(added)} added, {len(removed)} removed, {len(changed)} changed")
    if labels:
        for error in errors:
            err.print(f"[bold red]error:[/] {escape(error['error'])}")
        if not label_changes:
            out.print("no label changes modality")
        else:
            lg = Table(title="labels whose mapping changes")
            for column in ("label", "A", "B"):
                lg.add_column(column, overflow="fold")
            for c in label_changes:
                lg.add_row(escape(c["label"]), _modality_text(c["old"]["modality"], c["old"]["status"]),
                           _modality_text(c["new"]["modality"], c["new"]["status"]))
            out.print(lg)


# ---- add / remove -------------------------------------------------------------------------------------------


def _editable(table_path: Path | None, command: str) -> Path:
    if table_path is None:
        raise _usage(f"{command} needs --table FILE: the built-in table is read-only; name a site table "
                     "(a new FILE is created, extending the built-in table)")
    try:
        return editable_table(table_path)
    except MontageEditError as exc:
        raise _usage(str(exc)) from None


def _refuse_conflicts(exc: MontageError, path: Path, as_json: bool, action: str,
                      code: int | None = None) -> typer.Exit:
    if as_json:
        _echo_json({"action": action, "table": str(path), "ok": False, "written": False, "error": str(exc),
                    "problems": [p.as_dict() for p in exc.problems]})
    else:
        err.print(f"[bold red]refused:[/] the change would make {escape(str(path))} invalid; "
                  "the table is unchanged")
        for p in exc.problems or []:
            err.print(f"  conflict: {escape(p.message)}")
        hint = _override_hint(exc.problems)
        if hint:
            err.print(f"  {escape(hint)}")
        if not exc.problems:
            err.print(f"  {escape(str(exc))}")
    if code is None:
        code = EXIT_PROBLEMS if exc.problems else EXIT_USAGE
    return typer.Exit(code)


def _override_hint(problems: Sequence[Any]) -> str | None:
    """For a conflict between a rule of this file and one it inherits: the priority that would override."""
    for p in problems:
        tables = {r.table for r in p.rules}
        if len(tables) > 1:
            top = max(r.priority for r in p.rules)
            return (f"to override the inherited rule, add yours with --priority {top + 1} (or more), or give it "
                    "a --scope")
    return None


def _edit(action: str, path: Path, as_json: bool, edit: Callable[[], TableEdit]) -> TableEdit:
    """Run one edit of the library; its refusals and errors as this command reports them."""
    try:
        return edit()
    except RuleExistsError as exc:
        raise _refuse_conflicts(exc, path, as_json, action, code=EXIT_PROBLEMS) from None
    except MontageError as exc:  # the edited table would be invalid
        raise _refuse_conflicts(exc, path, as_json, action) from None
    except MontageEditError as exc:
        raise _usage(str(exc)) from None


@montage_app.command("add")
def add(
    label: Annotated[str, typer.Argument(help="The label (or, with --kind regex, the regular expression)")],
    modality: Annotated[str, typer.Argument(help="BAS, RESP, EKG, EMG or exclude")],
    table_path: TableOpt = None,
    kind: Annotated[str, typer.Option(help="exact, normalised or regex")] = "normalised",
    priority: Annotated[int | None, typer.Option(help="Higher wins (default: exact 300, normalised 200, "
                                                      "regex 100)", show_default=False)] = None,
    scope: Annotated[str | None, typer.Option(help="Only for this source: dicom:<AE title>, folder:<path>, "
                                                   "archive:<name>", show_default=False)] = None,
    note: Annotated[str | None, typer.Option(help="Why the rule is there (kept in the table)",
                                             show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a rule to a site table: validated first, written atomically, logged in <table>.audit.log."""
    path = _editable(table_path, "add")
    done = _edit("add", path, as_json, lambda: add_rule(path, kind, label, modality, priority=priority,
                                                        scope=scope, note=note))
    if not done.written:
        if as_json:
            _echo_json({"action": "add", "table": str(path), "ok": True, "written": False,
                        "message": done.message})
        else:
            out.print(escape(done.message))
        raise typer.Exit(EXIT_OK)
    (added,) = done.rules
    effect = _effect(done.table, added)
    if as_json:
        _echo_json({"action": "add", "table": str(path), "ok": True, "written": True, "created": done.created,
                    "rule": added.as_dict(), "version_before": done.version_before,
                    "version_after": done.table.version, "effect": effect})
        return
    out.print(f"{'created' if done.created else 'updated'} {escape(str(path))}: added {escape(added.describe())}")
    out.print(f"version {'(new)' if done.created else done.version_before} -> {done.table.version}; "
              f"logged in {escape(str(audit_log_path(path)))}")
    if effect:
        out.print(escape(effect["text"]))


def _effect(table: MontageTable, rule: MontageRule) -> dict[str, Any] | None:
    """What a label written as the rule's text now resolves to (not for regex rules)."""
    if rule.kind in ("regex", "code"):
        return None
    source = rule.scope
    res = table.resolve(rule.pattern, source)
    where = f" for source {source}" if source else ""
    if res.rule is rule:
        text = f"now {rule.pattern!r}{where} -> {rule.modality}"
    elif res.rule is not None:
        text = (f"note: {rule.pattern!r}{where} still resolves by {res.rule.describe()}; give the new rule a "
                "higher priority to make it decide")
    else:
        text = f"note: {rule.pattern!r}{where} is {res.status}"
    return {"label": rule.pattern, "status": res.status, "modality": res.modality,
            "decided_by_new_rule": res.rule is rule, "text": text}


@montage_app.command("remove")
def remove(
    label: Annotated[str, typer.Argument(help="The rule's label (or regular expression) as written")],
    table_path: TableOpt = None,
    kind: Annotated[str | None, typer.Option(help="Only a rule of this kind (exact, normalised, regex)",
                                             show_default=False)] = None,
    scope: Annotated[str | None, typer.Option(help="Only the rule with this scope ('none': unscoped)",
                                              show_default=False)] = None,
    all_matching: Annotated[bool, typer.Option("--all", help="Remove every matching rule when several match")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a rule from a site table: validated first, written atomically, logged in <table>.audit.log."""
    path = _editable(table_path, "remove")
    if not path.exists():
        raise _usage(f"{path}: file not found")
    k = None if kind is None else _kind(kind)
    wanted_scope: str | None | Literal[False] = False  # False: any scope
    if scope is not None:
        wanted_scope = None if scope.lower() == "none" else _source(scope)
    done = _edit("remove", path, as_json, lambda: remove_rules(path, label, kind=k, scope=wanted_scope,
                                                               all_matching=all_matching))
    effects = []
    for rule in done.rules:
        if rule.kind not in ("regex", "code"):
            res = done.table.resolve(rule.pattern, rule.scope)
            effects.append({"label": rule.pattern, "status": res.status, "modality": res.modality,
                            "rule": res.rule.describe() if res.rule else None})
    if as_json:
        _echo_json({"action": "remove", "table": str(path), "ok": True, "written": True,
                    "rules": [r.as_dict() for r in done.rules], "version_before": done.version_before,
                    "version_after": done.table.version, "effect": effects})
        return
    for rule in done.rules:
        out.print(f"removed {escape(rule.describe())}")
    out.print(f"version {done.version_before} -> {done.table.version}; "
              f"logged in {escape(str(audit_log_path(path)))}")
    for e in effects:
        now = f"{e['modality']} by {e['rule']}" if e["rule"] else e["status"]
        out.print(escape(f"now {e['label']!r} -> {now}"))
