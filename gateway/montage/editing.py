"""Editing a site's montage table file: what ``psg-gateway montage add|remove`` do, as a library.

An edit is one transaction on the file, under :func:`table_lock`: read the text, parse it (a format-2 table
only), change the text in place (:func:`add_rule_text`, :func:`remove_rules_text`: the admin's comments,
order and layout are kept, only the rule's own lines change), parse the result with every check the
gateway applies when it loads a table (a change that would make the table invalid is refused, the file is
left as it was), write it atomically (keeping the file's permissions; a new table is an ordinary file),
and append one line to its audit log (:mod:`gateway.montage.audit`).

Errors: :class:`MontageEditError` (a ``ValueError``) when the edit cannot be made as asked (a bad rule, a
file that cannot be read or edited in place, no rule or several to remove); ``MontageError`` when the
result would be an invalid table (its ``problems`` list the conflicts), and :class:`RuleExistsError` (a
``MontageError``) when the file already has the rule with other settings. An ``OSError`` from the write
goes up as it is: the old file stays whole and no audit line is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from ..fsutil import atomic_write, launcher_umask
from .audit import append_audit_entry
from .table import (
    BUILTIN_NAME,
    DEFAULT_RESOURCE,
    MontageError,
    MontageRule,
    MontageTable,
    RuleSpan,
    code_key,
    compose,
    normalise_label,
)

__all__ = [
    "MontageEditError",
    "RuleExistsError",
    "TableEdit",
    "add_rule",
    "add_rule_text",
    "editable_table",
    "remove_rules",
    "remove_rules_text",
    "render_rule",
    "table_lock",
]


class MontageEditError(ValueError):
    """A rule cannot be added to or removed from a table's text in place."""


class RuleExistsError(MontageError):
    """The file already has a rule for the label (same kind and scope) with other settings: remove it first."""


@dataclass(frozen=True)
class TableEdit:
    """What :func:`add_rule` or :func:`remove_rules` did to a table file."""

    action: str  # "add" | "remove"
    path: Path
    table: MontageTable  # the table as the file now holds it
    rules: tuple[MontageRule, ...] = ()  # the rule added (as the new file has it), or the rules removed
    version_before: str | None = None  # None: the file was created by this edit
    written: bool = True
    created: bool = False
    message: str = ""  # why nothing was written


# ---- one edit: lock, read, change, validate, write, audit ---------------------------------------------------


def editable_table(path: Path) -> Path:
    """The file an edit of ``path`` writes (a symbolic link's target, so the link stays); MontageEditError
    for a folder, or for the built-in table's packaged copy (read-only: a site table extends it)."""
    target = path.resolve() if path.is_symlink() else path
    if target.is_dir():
        raise MontageEditError(f"{path}: is a folder, not a table file")
    with contextlib.suppress(OSError, TypeError):
        builtin = Path(str(resources.files("gateway").joinpath(DEFAULT_RESOURCE)))
        if target.exists() and builtin.exists() and target.resolve() == builtin.resolve():
            raise MontageEditError(f"{path}: the built-in table is read-only; write a site table that extends it")
    return target


@contextlib.contextmanager
def table_lock(folder: Path) -> Iterator[None]:
    """Serialise edits of tables in one folder (flock on the folder; best effort where unsupported).

    The folder, not the file: an edit renames a new file over the table, so a lock held on the old file
    would not exclude a writer that opened the new one.
    """
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_rule(path: Path, kind: str, label: str, modality: str, *, priority: int | None = None,
             scope: str | None = None, note: str | None = None, user: str | None = None) -> TableEdit:
    """Add one rule to the table file ``path`` (created, extending the built-in table, when missing).
    ``user``: who, for the audit log (default: the OS user; the web console names its own user).

    Nothing is written when the rule is already in effect as given (``written`` False, ``message`` says
    so). See the module docstring for the errors.
    """
    path = editable_table(path)
    try:
        line = render_rule(kind, label, modality, priority=priority, scope=scope, note=note)
        new_rule = MontageRule(kind, label, modality, priority, scope, note or "")
    except ValueError as exc:
        raise MontageEditError(str(exc)) from None
    with table_lock(path.parent):
        created = not path.exists()
        text = _new_table_text(path) if created else _read(path)
        current = _parse_for_edit(text, path)
        for rule in current.rules:
            if rule.identity != new_rule.identity:
                continue
            if (rule.modality, rule.priority, rule.note) == (new_rule.modality, new_rule.priority, new_rule.note):
                return TableEdit("add", path, current, version_before=current.version, written=False,
                                 message=f"nothing to do: {rule.describe()} is already in effect")
            if rule in current.own_rules:
                raise RuleExistsError(path, f"{rule.describe()} already exists for this label; remove it first "
                                            "(montage remove)")
        new_text = add_rule_text(text, line, source=str(path))
        new = MontageTable.parse(new_text, source=str(path), default_name=path.stem, base_dir=path.parent)
        _write_table(path, new_text)
        added = new.own_rules[-1]
        before = None if created else current.version
        append_audit_entry(path, "add", [added.as_dict()], before, new.version, user=user)
    return TableEdit("add", path, new, (added,), version_before=before, created=created)


def remove_rules(path: Path, label: str, *, kind: str | None = None,
                 scope: str | None | Literal[False] = False, all_matching: bool = False) -> TableEdit:
    """Remove the file's own rule(s) for ``label`` (as written: the text of an exact or regex rule, any
    spelling of a normalised one), of ``kind`` when given, with ``scope`` when given (None: unscoped
    rules only; False: any scope). Several matching rules are an error unless ``all_matching``. See the
    module docstring for the errors."""
    path = editable_table(path)

    def selects(rule: MontageRule) -> bool:
        if kind is not None and rule.kind != kind:
            return False
        if scope is not False and rule.scope != scope:
            return False
        if rule.kind == "exact":
            return rule.key == label.strip()
        if rule.kind == "normalised":
            return rule.key == normalise_label(label)
        if rule.kind == "code":
            return rule.key == code_key(label)
        return rule.pattern == label

    with table_lock(path.parent):
        text = _read(path)
        current = _parse_for_edit(text, path)
        chosen = [r for r in current.own_rules if selects(r)]
        if not chosen:
            inherited = [r for r in (current.base.rules if current.base else ()) if selects(r)]
            if inherited:
                raise MontageEditError(f"{path}: {inherited[0].describe()} comes from the table it extends "
                                       f"({inherited[0].table}); override it here with a rule of higher "
                                       "priority instead")
            raise MontageEditError(f"{path}: no rule for {label!r}" + (f" of kind {kind}" if kind else "")
                                   + (f" with scope {scope or 'none'}" if scope is not False else ""))
        if len(chosen) > 1 and not all_matching:
            listed = "; ".join(r.describe() for r in chosen)
            raise MontageEditError(f"{path}: {len(chosen)} rules match ({listed}); narrow with --kind/--scope "
                                   "or pass --all")
        new_text = remove_rules_text(text, current, chosen)
        new = MontageTable.parse(new_text, source=str(path), default_name=path.stem, base_dir=path.parent)
        _write_table(path, new_text)
        append_audit_entry(path, "remove", [r.as_dict() for r in chosen], current.version, new.version)
    return TableEdit("remove", path, new, tuple(chosen), version_before=current.version)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MontageEditError(f"{path}: cannot read: {exc}") from None


def _parse_for_edit(text: str, path: Path) -> MontageTable:
    """The table as it is (conflicts allowed: an edit may be what removes one); format 2 only."""
    try:
        table = MontageTable.parse(text, source=str(path), default_name=path.stem, base_dir=path.parent,
                                   check=False)
    except MontageError as exc:
        raise MontageEditError(str(exc)) from None
    if table.format != 2:
        raise MontageEditError(f"{path}: a format-1 table (modalities/ignore sections) cannot be edited by the "
                               "CLI; rewrite it in format 2 (see docs/montage.md)")
    return table


def _new_table_text(path: Path) -> str:
    return (f"# Site montage table, created by 'psg-gateway montage add' on "
            f"{dt.datetime.now(dt.UTC):%Y-%m-%d}.\n"
            "# It extends the built-in table: only the site's own labels and overrides go here.\n"
            "# Changes are logged in the .audit.log file beside it. See docs/montage.md.\n"
            f"name: {json.dumps(path.stem)}\nformat: 2\nextends: {BUILTIN_NAME}\nrules:\n")


def _write_table(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` durably and atomically, keeping an existing table's permissions; a new
    table is an ordinary file (the launcher's umask): configuration, not PHI, which the daemon's user reads."""
    atomic_write(path, text.encode("utf-8"), mode=0o666 & ~launcher_umask(), keep_mode=True)


# ---- the rule as text --------------------------------------------------------------------------------------


def render_rule(kind: str, pattern: str, modality: str, *, priority: int | None = None,
                scope: str | None = None, note: str | None = None) -> str:
    """One rule as a one-line YAML flow mapping, the way the tables write them:
    ``{normalised: "C3-M2", modality: BAS}``."""
    rule = MontageRule(kind, pattern, modality, priority, scope, note or "")  # validates
    q = functools.partial(json.dumps, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted one
    parts = [f"{rule.kind}: {q(pattern)}", f"modality: {rule.modality}"]
    if priority is not None:
        parts.append(f"priority: {int(priority)}")
    if rule.scope is not None:
        parts.append(f"scope: {q(rule.scope)}")
    if note:
        parts.append(f"note: {q(note)}")
    return "{" + ", ".join(parts) + "}"


# ---- editing a table's text in place (comments and layout kept) ---------------------------------------------


def _is_blank_or_comment(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _last_line(lines: list[str], span: RuleSpan) -> int:
    """The last line (0-based) that holds the rule: its end line, or the line before when nothing of the node
    is on its end line (a block mapping ends where the next token starts); trailing blank and comment lines
    are not counted."""
    ends_inside = span.end_line < len(lines) and lines[span.end_line][:span.end_col].strip()
    last = min(span.end_line if ends_inside else span.end_line - 1, len(lines) - 1)
    while last > span.start_line and _is_blank_or_comment(lines[last]):
        last -= 1
    return last


def _rules_node(text: str, source: str) -> tuple[yaml.Node | None, yaml.Node | None]:
    root = compose(text, source)
    if not isinstance(root, yaml.MappingNode):
        raise MontageEditError(f"{source}: the table is not a mapping")
    for key_node, value in root.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == "rules":
            return key_node, value
    return None, None


def add_rule_text(text: str, rule_yaml: str, source: str = "<table>") -> str:
    """``text`` with one rule (as :func:`render_rule` writes it) appended to its ``rules`` list; comments
    and layout are kept. :class:`MontageEditError` when the list is written in a way this cannot extend."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    key_node, value = _rules_node(text, source)
    if key_node is None:
        return "".join(lines) + f"rules:\n  - {rule_yaml}\n"
    assert value is not None
    if isinstance(value, yaml.SequenceNode) and value.value:
        if value.flow_style:
            raise MontageEditError(f"{source}: 'rules' is written as a [...] list; write one rule per line")
        last_item = value.value[-1]
        span = RuleSpan(last_item.start_mark.line, last_item.start_mark.column, last_item.end_mark.line,
                        last_item.end_mark.column)
        first = value.value[0]
        head = lines[first.start_mark.line][:first.start_mark.column]
        if not head.rstrip().endswith("-"):
            raise MontageEditError(f"{source}: cannot find the rule list's indentation")
        indent = head.rstrip()[:-1]
        if indent.strip():
            raise MontageEditError(f"{source}: cannot find the rule list's indentation")
        at = _last_line(lines, span) + 1
        return "".join(lines[:at] + [f"{indent}- {rule_yaml}\n"] + lines[at:])
    empty_scalar = isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:null"
    empty_flow = isinstance(value, yaml.SequenceNode) and not value.value
    if not (empty_scalar or empty_flow):
        raise MontageEditError(f"{source}: 'rules' is not a list")
    line_no = key_node.start_mark.line
    if empty_flow and (value.start_mark.line != line_no or value.end_mark.line != line_no):
        raise MontageEditError(f"{source}: cannot edit the empty 'rules' entry in place")
    line = lines[line_no]
    head = line[:key_node.end_mark.column].rstrip() + ":"
    if empty_flow:
        tail = line[value.end_mark.column:].strip()
    else:
        tail = line[key_node.end_mark.column:].strip()
        tail = tail[1:].strip() if tail.startswith(":") else tail
    if tail and not tail.startswith("#"):
        raise MontageEditError(f"{source}: cannot edit the empty 'rules' entry in place")
    indent = " " * (key_node.start_mark.column + 2)
    new = [head + (f"  {tail}" if tail else "") + "\n", f"{indent}- {rule_yaml}\n"]
    return "".join(lines[:line_no] + new + lines[line_no + 1:])


def remove_rules_text(text: str, table: MontageTable, rules: Sequence[MontageRule]) -> str:
    """``text`` (the file ``table`` was loaded from) without the given rules of its own; each rule's lines
    go, with a comment on the same line. :class:`MontageEditError` when a rule shares a line with another."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    drop: set[int] = set()
    for rule in rules:
        try:
            index = next(i for i, own in enumerate(table.own_rules) if own is rule)
        except StopIteration:
            raise MontageEditError(f"{table.source}: {rule.short()} is not one of this file's rules") from None
        span = table.spans[index]
        head = lines[span.start_line][:span.start_col]
        if head.strip() != "-":
            raise MontageEditError(f"{table.source}, line {span.start_line + 1}: the rule shares its line "
                                   "with other text; edit the file by hand")
        last = _last_line(lines, span)
        end_text = lines[last][span.end_col:] if last == span.end_line else ""
        if end_text.strip() and not end_text.strip().startswith("#"):
            raise MontageEditError(f"{table.source}, line {last + 1}: the rule shares its line with other text; "
                                   "edit the file by hand")
        drop.update(range(span.start_line, last + 1))
    return "".join(line for i, line in enumerate(lines) if i not in drop)
