"""Montage tables: which of a site's channel labels feed which SleepFM modality (BAS, RESP, EKG, EMG).

A table is a reviewable YAML file: a list of rules (``mappings/default.yaml`` is the built-in one; its
header and ``docs/montage.md`` describe the format). The built-in table ships inside the package as
``gateway/data/default_montage.yaml``, an exact copy of ``mappings/default.yaml``.

A rule is one of three kinds, each with a default priority:

* ``exact`` (300): the recorded label, trimmed, equals the rule's text (case and punctuation count);
* ``normalised`` (200): the labels are equal after :func:`normalise_label` (case, spaces and punctuation
  ignored: ``"C3:M2"`` == ``"c3 - m2"`` == ``"C3M2"``); a label that starts with a vendor prefix (``EEG``,
  ``EOG``, ``EMG``, ``ECG``, ``EKG``, ``Resp``) followed by a separator also matches on the rest
  (``"EEG C3-A2"`` -> ``"C3-A2"``), one step weaker than a match of the whole label;
* ``regex`` (100): the regular expression matches the whole label (case-insensitive, whitespace runs
  collapsed to one space).
* ``code`` (400): the channel's coded source (DICOM Channel Source Sequence: coding scheme designator and
  code value, ``"SCPECG:5.6.3-9-1"``, ``"MDC:2:62"``) equals the rule's; code rules are tried before the
  label, and the label is looked up only when no code rule matches the channel's code.

Each rule maps to a modality or to ``exclude`` (known, not a model input: reported as excluded, not as
unmapped). A rule may be scoped to one source (``dicom:<calling AE title>``, ``folder:<path>``,
``archive:<name>``): it then applies only when :meth:`MontageTable.map_labels` is given a matching source.

For a label, the rules that match are ranked: higher priority first; at equal priority a scoped rule
before an unscoped one; then a whole-label match before a vendor-prefix match. The first one decides. Two
rules tied at the top with different modalities are a *conflict*: :meth:`MontageTable.problems` finds them
among the labels the table names (a table with one is refused by :meth:`MontageTable.load`), and a label
that still meets one at run time (two regular expressions) is left unmapped and listed in
:attr:`MontageMatch.conflicts`.

A table may ``extends`` another (``default`` for the built-in one, or a path relative to the file): the
base's rules come first and take part in the ranking like the table's own.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import posixpath
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_PRIORITY",
    "EXCLUDE",
    "IGNORE",
    "KINDS",
    "MODALITIES",
    "ChannelMapping",
    "MontageError",
    "MontageMatch",
    "MontageRule",
    "MontageTable",
    "Problem",
    "Resolution",
    "canonical_code",
    "default_table",
    "load_table",
    "normalise_label",
    "parse_source",
    "scope_matches",
]

MODALITIES: tuple[str, ...] = ("BAS", "RESP", "EKG", "EMG")
EXCLUDE = "exclude"
IGNORE = EXCLUDE  # the name the first table format used; kept for callers
KINDS: tuple[str, ...] = ("exact", "normalised", "regex", "code")
LABEL_KINDS: tuple[str, ...] = ("exact", "normalised")  # kinds that name a label
DEFAULT_PRIORITY: dict[str, int] = {"exact": 300, "normalised": 200, "regex": 100, "code": 400}
TABLE_FORMAT = 2
LEGACY_FORMAT = 1
VENDOR_PREFIXES: tuple[str, ...] = ("eeg", "eog", "emg", "ecg", "ekg", "resp", "pol")
SOURCE_KINDS: tuple[str, ...] = ("dicom", "folder", "archive")
BUILTIN_NAME = "default"
DEFAULT_RESOURCE = "data/default_montage.yaml"

_KIND_ALIASES = {"exact": "exact", "normalised": "normalised", "normalized": "normalised", "regex": "regex",
                 "code": "code"}
_TOP_KEYS = ("name", "format", "description", "extends", "rules")
_LEGACY_TOP_KEYS = ("name", "format", "description", "modalities", "ignore", "rules")
_RULE_KEYS = ("exact", "normalised", "normalized", "regex", "code", "modality", "priority", "scope", "note")
_MAX_EXTENDS = 8


class MontageError(ValueError):
    """A montage table is unreadable, malformed or has conflicting rules. The message names the file and
    the offending key or line; ``problems`` holds the conflicts when that is the reason."""

    def __init__(self, source: str | Path, message: str, *, key: str | None = None,
                 line: int | None = None, problems: Sequence[Problem] = ()) -> None:
        self.source = str(source)
        self.key = key
        self.line = line
        self.problems = list(problems)
        where = f"{source}, line {line}" if line is not None else f"{source}"
        super().__init__(f"montage table {where}: {message}")


# ---- labels and sources --------------------------------------------------------------------------------------


def normalise_label(label: str) -> str:
    """The form ``normalised`` rules compare labels in: Unicode-normalised (NFKC), case-folded, and only
    letters and digits kept (spaces and punctuation dropped).

    >>> normalise_label("  EEG  C3:M2 ")
    'eegc3m2'
    """
    text = unicodedata.normalize("NFKC", label).casefold()
    return "".join(ch for ch in text if ch.isalnum())


def vendor_prefix(label: str) -> tuple[str, str] | None:
    """``(prefix, rest)`` when ``label`` starts with a vendor prefix and a separator (``"EEG C3-A2"`` ->
    ``("eeg", "C3-A2")``); None otherwise. The rest must hold a letter or digit."""
    text = unicodedata.normalize("NFKC", label).strip()
    folded = text.casefold()
    for prefix in VENDOR_PREFIXES:
        if len(folded) > len(prefix) and folded.startswith(prefix) and not folded[len(prefix)].isalnum():
            rest = text[len(prefix):].lstrip(" \t:-_/.,;|")
            if normalise_label(rest):
                return prefix, rest
    return None


def canonical_code(text: str) -> str:
    """The form ``code`` rules compare coded channel sources in: ``SCHEME:VALUE`` with the coding scheme
    designator upper-cased and both parts trimmed (``"scpecg: 5.6.3-9-1"`` -> ``"SCPECG:5.6.3-9-1"``).
    Only the first colon separates them (MDC values hold colons: ``"MDC:2:62"``). ValueError when malformed."""
    scheme, sep, value = str(text).partition(":")
    scheme, value = scheme.strip().upper(), value.strip()
    if not sep or not scheme or not value:
        raise ValueError(f"code {text!r} is not of the form SCHEME:VALUE (e.g. SCPECG:5.6.3-9-1, MDC:2:62)")
    return f"{scheme}:{value}"


def code_key(code: tuple[str, str] | str | None) -> str | None:
    """:func:`canonical_code` of a channel's coded source ``(scheme, value)`` (or ``"SCHEME:VALUE"``); None
    when there is none or it is malformed."""
    if code is None:
        return None
    try:
        return canonical_code(code if isinstance(code, str) else f"{code[0]}:{code[1]}")
    except (ValueError, IndexError, TypeError):
        return None


def _collapse(label: str) -> str:
    return " ".join(label.split())


def parse_source(text: str) -> str:
    """The canonical form of a source (or scope) string ``<kind>:<value>``; ValueError when malformed.

    ``dicom:<calling AE title>`` (surrounding spaces dropped, case kept), ``folder:<absolute path>``
    (normalised, no trailing slash), ``archive:<name>``.
    """
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"source {text!r} is not of the form <kind>:<value> (kinds: {', '.join(SOURCE_KINDS)})")
    kind, _, value = text.partition(":")
    kind = kind.strip().lower()
    value = value.strip()
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source {text!r}: unknown kind {kind!r} (expected {', '.join(SOURCE_KINDS)})")
    if not value:
        raise ValueError(f"source {text!r}: nothing after '{kind}:'")
    if kind == "folder":
        if not value.startswith("/"):
            raise ValueError(f"source {text!r}: a folder must be an absolute path")
        value = posixpath.normpath(value)
        if value.startswith("//"):
            value = "/" + value.lstrip("/")
    elif kind == "dicom" and len(value) > 16:
        raise ValueError(f"source {text!r}: a DICOM AE title has at most 16 characters")
    return f"{kind}:{value}"


def _folder_contains(outer: str, inner: str) -> bool:
    return inner == outer or outer == "/" or inner.startswith(outer + "/")


def scope_matches(scope: str | None, source: str | None) -> bool:
    """Whether a rule with ``scope`` applies to a study from ``source`` (both canonical, see
    :func:`parse_source`). Unscoped rules apply everywhere; a folder scope covers its sub-folders."""
    if scope is None:
        return True
    if source is None:
        return False
    s_kind, _, s_value = scope.partition(":")
    kind, _, value = source.partition(":")
    if s_kind != kind:
        return False
    if kind == "folder":
        return _folder_contains(s_value, value)
    return s_value == value


def _scopes_overlap(a: str | None, b: str | None) -> bool:
    """Whether some source gets both scopes' rules."""
    if a is None or b is None:
        return True
    a_kind, _, a_value = a.partition(":")
    b_kind, _, b_value = b.partition(":")
    if a_kind != b_kind:
        return False
    if a_kind == "folder":
        return _folder_contains(a_value, b_value) or _folder_contains(b_value, a_value)
    return a_value == b_value


# ---- rules ---------------------------------------------------------------------------------------------------


def _canonical_modality(value: str) -> str | None:
    if value.upper() in MODALITIES:
        return value.upper()
    if value.lower() in (EXCLUDE, "ignore"):
        return EXCLUDE
    return None


@dataclass(frozen=True, eq=False)
class MontageRule:
    """One rule of a table. ``table``/``origin``/``line`` say where it was written."""

    kind: str  # one of KINDS
    pattern: str  # as written in the table
    modality: str  # one of MODALITIES, or EXCLUDE
    priority: int | None = None  # None: the kind's default
    scope: str | None = None  # canonical source string, or None for every source
    note: str = ""
    table: str = ""
    origin: str = ""
    line: int | None = None
    key: str = field(init=False, repr=False)
    regex: re.Pattern[str] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        kind = _KIND_ALIASES.get(self.kind)
        if kind is None:
            raise ValueError(f"unknown rule kind {self.kind!r} (expected {', '.join(KINDS)})")
        object.__setattr__(self, "kind", kind)
        modality = _canonical_modality(self.modality)
        if modality is None:
            raise ValueError(f"unknown modality {self.modality!r} (expected {', '.join(MODALITIES)} or {EXCLUDE})")
        object.__setattr__(self, "modality", modality)
        if self.priority is None:
            object.__setattr__(self, "priority", DEFAULT_PRIORITY[kind])
        if self.scope is not None:
            object.__setattr__(self, "scope", parse_source(self.scope))
        regex = None
        if kind == "exact":
            key = self.pattern.strip()
        elif kind == "normalised":
            key = normalise_label(self.pattern)
        elif kind == "code":
            key = canonical_code(self.pattern)
        else:
            key = self.pattern
            try:
                regex = re.compile(self.pattern, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {self.pattern!r}: {exc}") from None
        if not key:
            raise ValueError(f"empty {kind} label {self.pattern!r}" if kind != "regex" else "empty regex")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "regex", regex)

    @property
    def specificity(self) -> int:
        return 0 if self.scope is None else 1

    @property
    def identity(self) -> tuple[str, str, str | None]:
        """What makes two rules "the same rule" (for ``add``, ``remove`` and ``diff``)."""
        return self.kind, self.key, self.scope

    @property
    def where(self) -> str:
        if self.line is None:
            return self.table or "?"
        return f"{self.table}:{self.line}"

    def applies_to(self, source: str | None) -> bool:
        return scope_matches(self.scope, source)

    def quality(self, label: str) -> int | None:
        """0 when the rule matches the label, 1 when it matches only the label without its vendor prefix,
        None when it does not match."""
        if self.kind == "exact":
            return 0 if label.strip() == self.key else None
        if self.kind == "code":
            return None  # matches a channel's coded source, never its label (see MontageTable.resolve)
        if self.kind == "regex":
            assert self.regex is not None
            return 0 if self.regex.fullmatch(_collapse(label)) else None
        if normalise_label(label) == self.key:
            return 0
        prefixed = vendor_prefix(label)
        if prefixed is not None and normalise_label(prefixed[1]) == self.key:
            return 1
        return None

    def short(self) -> str:
        """``normalised "C3-M2"`` (plus the scope when it has one)."""
        text = f"{self.kind} {json.dumps(self.pattern, ensure_ascii=False)}"
        return f"{text} [{self.scope}]" if self.scope else text

    def describe(self) -> str:
        """``normalised "C3-M2" -> BAS (priority 200, default:57)``."""
        return f"{self.short()} -> {self.modality} (priority {self.priority}, {self.where})"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "pattern": self.pattern, "modality": self.modality, "priority": self.priority,
                "scope": self.scope, "note": self.note or None, "table": self.table, "line": self.line}


# ---- results -------------------------------------------------------------------------------------------------


def _rank(rule: MontageRule, quality: int) -> tuple[int, int, int]:
    assert rule.priority is not None
    return (-rule.priority, -rule.specificity, quality)


@dataclass
class Resolution:
    """How one label resolves: the deciding rule, every rule that matched (best first, with the quality of
    the match) and, on a conflict, the tied rules."""

    label: str
    normalised: str
    source: str | None
    rule: MontageRule | None
    quality: int | None
    candidates: list[tuple[MontageRule, int]]
    conflict: list[MontageRule]

    @property
    def modality(self) -> str | None:
        """A modality, ``"exclude"``, or None (unmapped or conflict)."""
        return self.rule.modality if self.rule is not None else None

    @property
    def status(self) -> str:
        if self.conflict:
            return "conflict"
        if self.rule is None:
            return "unmapped"
        return "excluded" if self.rule.modality == EXCLUDE else "mapped"

    @property
    def how(self) -> str | None:
        """Why the deciding rule matched, in words."""
        rule = self.rule
        if rule is None:
            return None
        if rule.kind == "exact":
            return "the label equals the rule's text exactly"
        if rule.kind == "code":
            return f"the channel's coded source {rule.key} equals the rule's code (tried before the label)"
        if rule.kind == "regex":
            return "the regular expression matches the whole label"
        if self.quality == 1:
            prefix = vendor_prefix(self.label)
            rest = prefix[1] if prefix else self.label
            return (f"vendor prefix {prefix[0].upper() if prefix else '?'!r} dropped; "
                    f"{normalise_label(rest)!r} equals the rule's normalised form")
        return f"normalised {self.normalised!r} equals the rule's normalised form"

    def why_not(self, rule: MontageRule, quality: int) -> str:
        """Why a matching rule lost to the deciding one."""
        best = self.rule or (self.conflict[0] if self.conflict else None)
        if best is None or rule is best:
            return "decides"
        assert rule.priority is not None and best.priority is not None
        if rule.priority != best.priority:
            return f"lower priority ({rule.priority} < {best.priority})"
        if rule.specificity != best.specificity:
            return "unscoped; a scoped rule of the same priority wins"
        if quality != (self.quality or 0):
            return "matches only without the vendor prefix"
        if rule in self.conflict:
            return "tied (conflict)"
        return "same result, listed later"

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "normalised": self.normalised, "source": self.source, "status": self.status,
            "modality": self.modality, "rule": self.rule.as_dict() if self.rule else None, "how": self.how,
            "candidates": [{**r.as_dict(), "outcome": self.why_not(r, q)} for r, q in self.candidates],
            "conflict": [r.as_dict() for r in self.conflict],
        }


@dataclass
class ChannelMapping:
    """One channel's outcome: ``modality`` is a modality, ``"exclude"`` or None (unmapped or conflict)."""

    index: int
    label: str
    modality: str | None
    status: str  # mapped, excluded, unmapped, conflict
    rule: MontageRule | None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "modality": self.modality, "status": self.status,
                "rule": self.rule.short() if self.rule else None,
                "where": self.rule.where if self.rule else None}


@dataclass
class MontageMatch:
    """How one recording's labels map.

    ``groups``: modality -> channel indices in recording order; only modalities that have channels, in the
    order BAS, RESP, EKG, EMG. ``ignored`` (also ``excluded``) and ``unmapped``: labels, one entry per
    channel, in recording order; a label in conflict is unmapped and also in ``conflicts`` (label -> the
    tied rules). ``modality_of``: label -> modality for every mapped label. ``matched_by``: label -> the
    deciding rule (``normalised "C3-M2" [dicom:PSG_SCU] @ default:57``) for every mapped or excluded label.
    ``table_name``/``table_version`` name the table that mapped them; ``channels`` has one entry per channel.
    """

    groups: dict[str, list[int]]
    ignored: list[str]
    unmapped: list[str]
    modality_of: dict[str, str]
    matched_by: dict[str, str] = field(default_factory=dict)
    table_name: str = ""
    table_version: str = ""
    source: str | None = None
    channels: list[ChannelMapping] = field(default_factory=list)
    conflicts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def excluded(self) -> list[str]:
        return self.ignored

    def labels(self, modality: str, labels: Sequence[str]) -> list[str]:
        """The labels (from the list that was mapped) that feed ``modality``, in recording order."""
        return [labels[i] for i in self.groups.get(modality, [])]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the mapping, for a study's results."""
        return {
            "table": {"name": self.table_name, "version": self.table_version}, "source": self.source,
            "groups": self.groups, "excluded": self.ignored, "unmapped": self.unmapped,
            "conflicts": self.conflicts, "channels": [c.as_dict() for c in self.channels],
        }


@dataclass
class Problem:
    """A finding of :meth:`MontageTable.problems`: ``severity`` is ``"error"`` (a conflict) or ``"warning"``."""

    severity: str
    message: str
    rules: list[MontageRule]
    label: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "message": self.message, "label": self.label,
                "rules": [r.as_dict() for r in self.rules]}


# ---- tables --------------------------------------------------------------------------------------------------


@dataclass
class RuleSpan:
    """Where a rule is written in its file (0-based lines and columns of the YAML node)."""

    start_line: int
    start_col: int
    end_line: int
    end_col: int


class MontageTable:
    """A loaded montage table. Build one with :meth:`load`, :meth:`parse` or :func:`default_table`.

    ``rules`` are all rules in effect (the base table's first); ``own_rules`` those written in this file.
    ``version`` is the first 12 hex digits of the SHA-256 of the file (for a table that extends another,
    of the file and the base's version), so any change to the rules in effect changes it.
    """

    def __init__(self, name: str, version: str, rules: Iterable[MontageRule], *, source: str = "<memory>",
                 base: MontageTable | None = None, description: str = "", table_format: int = TABLE_FORMAT,
                 spans: Sequence[RuleSpan] = (), path: Path | None = None) -> None:
        self.name = name
        self.version = version
        self.source = source
        self.path = path
        self.base = base
        self.description = description
        self.format = table_format
        self.own_rules: tuple[MontageRule, ...] = tuple(rules)
        self.spans: tuple[RuleSpan, ...] = tuple(spans)
        self.rules: tuple[MontageRule, ...] = (base.rules if base else ()) + self.own_rules
        self._position = {id(r): i for i, r in enumerate(self.rules)}
        self._exact: dict[str, list[MontageRule]] = {}
        self._normalised: dict[str, list[MontageRule]] = {}
        self._regexes: list[MontageRule] = []
        self._codes: dict[str, list[MontageRule]] = {}
        for rule in self.rules:
            if rule.kind == "code":
                self._codes.setdefault(rule.key, []).append(rule)
            elif rule.kind == "exact":
                self._exact.setdefault(rule.key, []).append(rule)
            elif rule.kind == "normalised":
                self._normalised.setdefault(rule.key, []).append(rule)
            else:
                self._regexes.append(rule)


    def __setstate__(self, state: dict) -> None:
        # Unpickled (a batch's worker processes get the table this way): the rules are new objects,
        # so the position index, keyed by identity, is rebuilt.
        self.__dict__.update(state)
        self._position = {id(r): i for i, r in enumerate(self.rules)}
    def __repr__(self) -> str:
        return f"MontageTable(name={self.name!r}, version={self.version!r}, rules={len(self.rules)})"

    @property
    def chain(self) -> list[str]:
        """This table's name and those of the tables it extends, nearest first."""
        return [self.name] + (self.base.chain if self.base else [])

    # ---- building ----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, check: bool = True) -> MontageTable:
        """Read a table file (and the tables it extends).

        Raises :class:`MontageError` naming the file (and line) when it is unreadable or malformed and,
        with ``check`` (the default), when two of its rules conflict.
        """
        return cls._load(Path(path), check=check, seen=())

    @classmethod
    def _load(cls, path: Path, *, check: bool, seen: tuple[str, ...]) -> MontageTable:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MontageError(path, "file not found") from None
        except IsADirectoryError:
            raise MontageError(path, "is a folder, not a table file") from None
        except OSError as exc:
            raise MontageError(path, f"cannot read: {exc.strerror or exc}") from None
        return cls._parse(data, source=str(path), default_name=path.stem, base_dir=path.parent,
                          check=check, seen=seen + (str(path.resolve()),), path=path)

    @classmethod
    def parse(cls, data: bytes | str, source: str = "<string>", default_name: str = "site", *,
              base_dir: str | Path | None = None, check: bool = True) -> MontageTable:
        """Build a table from YAML text; ``extends`` paths are relative to ``base_dir`` (default: the
        current folder)."""
        return cls._parse(data, source=source, default_name=default_name,
                          base_dir=Path(base_dir) if base_dir is not None else Path.cwd(), check=check, seen=())

    @classmethod
    def _parse(cls, data: bytes | str, *, source: str, default_name: str, base_dir: Path, check: bool,
               seen: tuple[str, ...], path: Path | None = None) -> MontageTable:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MontageError(source, f"not UTF-8 text (byte {exc.start})") from None
        parsed = _TableParser(source).parse(text, default_name)
        base = None
        if parsed.extends is not None:
            base = cls._resolve_base(parsed.extends, source, base_dir, seen, parsed.extends_line)
        digest = hashlib.sha256(raw)
        if base is not None:
            digest.update(b"\0extends\0" + base.version.encode())
        rules = [MontageRule(r.kind, r.pattern, r.modality, r.priority, r.scope, r.note, table=parsed.name,
                             origin=source, line=r.line) for r in parsed.rules]
        table = cls(parsed.name, digest.hexdigest()[:12], rules, source=source, base=base,
                    description=parsed.description, table_format=parsed.format, spans=parsed.spans, path=path)
        if check:
            errors = [p for p in table.problems() if p.severity == "error"]
            if errors:
                shown = "; ".join(p.message for p in errors[:3])
                more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
                raise MontageError(source, f"{len(errors)} conflicting rule(s): {shown}{more}; "
                                   "'psg-gateway montage validate' lists them all", problems=errors)
        return table

    @classmethod
    def _resolve_base(cls, extends: str, source: str, base_dir: Path, seen: tuple[str, ...],
                      line: int | None) -> MontageTable:
        if len(seen) > _MAX_EXTENDS:
            raise MontageError(source, f"'extends' chain longer than {_MAX_EXTENDS} tables", key="extends",
                               line=line)
        if extends == BUILTIN_NAME:
            if "<builtin>" in seen:
                raise MontageError(source, "the built-in table cannot extend a table", key="extends", line=line)
            return default_table()
        base_path = Path(extends).expanduser()
        if not base_path.is_absolute():
            base_path = base_dir / base_path
        if str(base_path.resolve()) in seen:
            raise MontageError(source, f"'extends: {extends}' makes a cycle", key="extends", line=line)
        if not base_path.exists():
            raise MontageError(source, f"'extends: {extends}': {base_path} not found", key="extends", line=line)
        return cls._load(base_path, check=False, seen=seen)

    # ---- matching ----------------------------------------------------------------------------------------

    def _candidates(self, label: str, source: str | None, any_source: bool = False,
                    code: tuple[str, str] | str | None = None) -> list[tuple[MontageRule, int]]:
        found: dict[int, tuple[MontageRule, int]] = {}

        def add(rule: MontageRule, quality: int) -> None:
            if not any_source and not rule.applies_to(source):
                return
            old = found.get(id(rule))
            if old is None or quality < old[1]:
                found[id(rule)] = (rule, quality)

        key = code_key(code)
        if key is not None:
            for rule in self._codes.get(key, ()):
                add(rule, 0)
            if found:  # a code rule decides before any label rule is tried
                return sorted(found.values(), key=lambda rq: (_rank(*rq), self._position[id(rq[0])]))

        for rule in self._exact.get(label.strip(), ()):
            add(rule, 0)
        key = normalise_label(label)
        for rule in self._normalised.get(key, ()):
            add(rule, 0)
        prefixed = vendor_prefix(label)
        if prefixed is not None:
            for rule in self._normalised.get(normalise_label(prefixed[1]), ()):
                add(rule, 1)
        collapsed = _collapse(label)
        for rule in self._regexes:
            assert rule.regex is not None
            if rule.regex.fullmatch(collapsed):
                add(rule, 0)
        return sorted(found.values(), key=lambda rq: (_rank(*rq), self._position[id(rq[0])]))

    def matches(self, label: str, source: str | None = None, *, any_source: bool = False,
                code: tuple[str, str] | str | None = None) -> list[tuple[MontageRule, int]]:
        """Every rule that matches ``label`` for ``source`` (or for any source), best first, each with its
        match quality (0: the whole label, 1: the label without its vendor prefix). With ``code`` (a
        channel's coded source), the code rules that match it, when there are any, instead."""
        return self._candidates(label, parse_source(source) if source is not None else None, any_source, code)

    def resolve(self, label: str, source: str | None = None,
                code: tuple[str, str] | str | None = None) -> Resolution:
        """Which rule decides ``label`` for a study from ``source`` (see :func:`parse_source`), and why.
        ``code``: the channel's coded source ``(scheme, value)`` (DICOM Channel Source); the table's
        ``code`` rules are tried on it first, and only when none matches is the label looked up."""
        source = parse_source(source) if source is not None else None
        candidates = self._candidates(label, source, code=code)
        rule = quality = None
        conflict: list[MontageRule] = []
        if candidates:
            top = _rank(*candidates[0])
            tied = [r for r, q in candidates if _rank(r, q) == top]
            if len({r.modality for r in tied}) > 1:
                conflict = tied
            else:
                rule, quality = candidates[0]
        return Resolution(label, normalise_label(label), source, rule, quality, candidates, conflict)

    def lookup(self, label: str, source: str | None = None) -> tuple[str | None, str | None]:
        """``(modality or "exclude" or None, the deciding rule's kind)``; ``(None, None)`` when nothing
        decides. The kind is ``"prefix"`` for a normalised match after dropping a vendor prefix."""
        res = self.resolve(label, source)
        if res.rule is None:
            return None, None
        return res.rule.modality, ("prefix" if res.quality == 1 else res.rule.kind)

    def map_labels(self, labels: Sequence[str], source: str | None = None,
                   codes: Sequence[tuple[str, str] | None] | None = None) -> MontageMatch:
        """Map a recording's channel labels (in recording order; duplicates each keep their index) for a
        study that came from ``source`` (``dicom:<AE title>``, ``folder:<path>``; None: unscoped rules only).
        ``codes``: each channel's coded source or None, in the same order (``Recording.channel_codes``);
        a channel's code rules decide before its label."""
        source = parse_source(source) if source is not None else None
        groups: dict[str, list[int]] = {m: [] for m in MODALITIES}
        ignored: list[str] = []
        unmapped: list[str] = []
        modality_of: dict[str, str] = {}
        matched_by: dict[str, str] = {}
        conflicts: dict[str, list[str]] = {}
        channels: list[ChannelMapping] = []
        cache: dict[tuple[str, tuple[str, str] | None], Resolution] = {}
        for index, label in enumerate(labels):
            code = codes[index] if codes is not None and index < len(codes) else None
            res = cache.get((label, code))
            if res is None:
                res = cache[(label, code)] = self.resolve(label, source, code)
            channels.append(ChannelMapping(index, label, res.modality, res.status, res.rule))
            if res.conflict:
                conflicts[label] = [r.describe() for r in res.conflict]
                unmapped.append(label)
                continue
            if res.rule is None:
                unmapped.append(label)
                continue
            matched_by[label] = f"{res.rule.short()} @ {res.rule.where}"
            if res.rule.modality == EXCLUDE:
                ignored.append(label)
            else:
                groups[res.rule.modality].append(index)
                modality_of[label] = res.rule.modality
        return MontageMatch(
            groups={m: ix for m, ix in groups.items() if ix}, ignored=ignored, unmapped=unmapped,
            modality_of=modality_of, matched_by=matched_by, table_name=self.name, table_version=self.version,
            source=source, channels=channels, conflicts=conflicts,
        )

    # ---- querying ----------------------------------------------------------------------------------------

    def labels_for(self, modality: str) -> list[str]:
        """The labels (as written) of the table's exact and normalised rules for a modality or ``exclude``."""
        modality = _canonical_modality(modality) or modality
        return [r.pattern for r in self.rules if r.kind in LABEL_KINDS and r.modality == modality]

    def suggest(self, label: str, n: int = 3, source: str | None = None) -> list[MontageRule]:
        """The table's exact/normalised rules whose labels are closest to ``label`` (difflib on the normalised
        forms), best first; empty when nothing is close."""
        source = parse_source(source) if source is not None else None
        by_key: dict[str, MontageRule] = {}
        for rule in self.rules:
            if rule.kind in LABEL_KINDS and rule.applies_to(source):
                by_key.setdefault(normalise_label(rule.pattern), rule)
        wanted = [normalise_label(label)]
        prefixed = vendor_prefix(label)
        if prefixed is not None:
            wanted.append(normalise_label(prefixed[1]))
        scored: dict[str, float] = {}
        for want in filter(None, wanted):
            for key in difflib.get_close_matches(want, list(by_key), n=n, cutoff=0.6):
                ratio = difflib.SequenceMatcher(None, want, key).ratio()
                scored[key] = max(scored.get(key, 0.0), ratio)
        return [by_key[k] for k, _ in sorted(scored.items(), key=lambda kv: -kv[1])[:n]]

    def problems(self) -> list[Problem]:
        """Conflicts (errors) and redundant rules (warnings) among the rules in effect.

        A conflict: some label is matched by two rules with different modalities that tie at the top
        (same priority, both scoped or both unscoped with scopes that can meet, same match quality). The
        labels tried are those every exact and normalised rule names; two regular expressions that only
        meet on other labels are found at run time instead (the label is then left unmapped)."""
        out: list[Problem] = []
        seen_pairs: set[tuple[int, int]] = set()
        probes: dict[str, None] = {}
        for rule in self.rules:
            if rule.kind in LABEL_KINDS:
                probes.setdefault(rule.pattern.strip(), None)
        coded = [("", key) for key in self._codes]
        for label, code in [(label, None) for label in probes] + coded:
            candidates = self._candidates(label, None, any_source=True, code=code)
            for i, (a, qa) in enumerate(candidates):
                for b, qb in candidates[i + 1:]:
                    if _rank(a, qa) != _rank(b, qb) or a.modality == b.modality:
                        continue
                    if not _scopes_overlap(a.scope, b.scope):
                        continue
                    pair = (min(id(a), id(b)), max(id(a), id(b)))
                    if pair in seen_pairs:
                        continue
                    seen_pairs.add(pair)
                    first, second = sorted((a, b), key=lambda r: self._position[id(r)])
                    out.append(Problem(
                        "error",
                        f"{f'code {code}' if code else f'label {label!r}'} matches {first.describe()} and "
                        f"{second.describe()}: same priority, "
                        "different modalities; give one a higher priority, a scope, or remove one",
                        [first, second], code or label))
        identities: dict[tuple[str, str, str | None], MontageRule] = {}
        for rule in self.rules:
            other = identities.get(rule.identity)
            if other is None:
                identities[rule.identity] = rule
            elif other.modality == rule.modality and other.priority == rule.priority:
                out.append(Problem("warning", f"{rule.describe()} repeats {other.describe()}", [other, rule],
                                   rule.pattern))
        return out


@functools.cache
def default_table() -> MontageTable:
    """The built-in table (``gateway/data/default_montage.yaml``, identical to ``mappings/default.yaml``)."""
    resource = resources.files("gateway").joinpath(DEFAULT_RESOURCE)
    return MontageTable._parse(resource.read_bytes(), source=f"gateway/{DEFAULT_RESOURCE}",
                               default_name=BUILTIN_NAME, base_dir=Path("."), check=True, seen=("<builtin>",))


def load_table(spec: str | Path | None, *, check: bool = True) -> MontageTable:
    """A table file, or the built-in table for None or the word ``default`` (when no such file exists)."""
    if spec is None or (str(spec) == BUILTIN_NAME and not Path(spec).exists()):
        return default_table()
    return MontageTable.load(spec, check=check)


# ---- parsing with line numbers -------------------------------------------------------------------------------


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


@dataclass
class _ParsedRule:
    kind: str
    pattern: str
    modality: str
    priority: int | None
    scope: str | None
    note: str
    line: int


@dataclass
class _Parsed:
    name: str
    format: int
    description: str = ""
    extends: str | None = None
    extends_line: int | None = None
    rules: list[_ParsedRule] = field(default_factory=list)
    spans: list[RuleSpan] = field(default_factory=list)


class _TableParser:
    """Walks the YAML node tree (not the constructed objects) so that every error can name its line, and
    so that labels are always taken as text (a label ``NO`` or ``1`` stays a label)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, message: str, node: yaml.Node | None = None, key: str | None = None) -> MontageError:
        return MontageError(self.source, message, key=key, line=_line(node) if node is not None else None)

    def parse(self, text: str, default_name: str) -> _Parsed:
        root = compose(text, self.source)
        if root is None:
            raise self.error("the file is empty; expected a mapping with 'rules'")
        top = self.mapping(root, "the table")
        fmt = TABLE_FORMAT
        if "format" in top:
            value = top["format"][1]
            text_fmt = self.scalar(value, "'format'")
            if text_fmt not in (str(TABLE_FORMAT), str(LEGACY_FORMAT)):
                raise self.error(f"unsupported format {text_fmt!r} (this version reads formats "
                                 f"{LEGACY_FORMAT} and {TABLE_FORMAT})", value, key="format")
            fmt = int(text_fmt)
        elif "modalities" in top or "ignore" in top:
            fmt = LEGACY_FORMAT
        parsed = _Parsed(name=default_name, format=fmt)
        allowed = _TOP_KEYS if fmt == TABLE_FORMAT else _LEGACY_TOP_KEYS
        for key, (key_node, value) in top.items():
            if key not in allowed:
                raise self.error(f"unknown key {key!r} (expected {', '.join(allowed)})", key_node, key=key)
        if "name" in top:
            parsed.name = self.scalar(top["name"][1], "'name'")
            if not parsed.name:
                raise self.error("'name' must not be empty", top["name"][1], key="name")
        if "description" in top:
            parsed.description = self.scalar(top["description"][1], "'description'")
        if fmt == LEGACY_FORMAT:
            self.legacy(top, root, parsed)
            return parsed
        if "extends" in top:
            node = top["extends"][1]
            parsed.extends = self.scalar(node, "'extends'")
            parsed.extends_line = _line(node)
            if not parsed.extends:
                raise self.error("'extends' must name a table ('default' or a path)", node, key="extends")
        if "rules" not in top:
            raise self.error("missing required key 'rules' (a list; may be empty)", root, key="rules")
        for item in self.sequence(top["rules"][1], "'rules'"):
            parsed.rules.append(self.rule(item))
            parsed.spans.append(RuleSpan(item.start_mark.line, item.start_mark.column, item.end_mark.line,
                                         item.end_mark.column))
        return parsed

    def rule(self, item: yaml.Node) -> _ParsedRule:
        fields = self.mapping(item, "a rule")
        for key, (key_node, _) in fields.items():
            if key not in _RULE_KEYS:
                raise self.error(f"unknown key {key!r} in a rule (expected one of exact, normalised, regex, code; "
                                 "modality; optional priority, scope, note)", key_node, key=key)
        kinds = [k for k in fields if k in _KIND_ALIASES]
        if len(kinds) != 1:
            raise self.error("a rule needs exactly one of 'exact', 'normalised', 'regex' or 'code'"
                             + (f" (has {', '.join(kinds)})" if kinds else ""), item, key="kind")
        kind = _KIND_ALIASES[kinds[0]]
        pattern_node = fields[kinds[0]][1]
        pattern = self.scalar(pattern_node, f"a rule's {kinds[0]!r}", strip=False)
        if "modality" not in fields:
            raise self.error("a rule needs 'modality'", item, key="modality")
        mod_node = fields["modality"][1]
        modality = self.scalar(mod_node, "a rule's 'modality'")
        if _canonical_modality(modality) is None:
            raise self.error(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)} or "
                             f"{EXCLUDE})", mod_node, key=modality)
        priority = None
        if "priority" in fields:
            node = fields["priority"][1]
            value = self.scalar(node, "a rule's 'priority'")
            try:
                priority = int(value)
            except ValueError:
                raise self.error(f"'priority' must be a whole number, not {value!r}", node,
                                 key="priority") from None
        scope = None
        if "scope" in fields:
            node = fields["scope"][1]
            if isinstance(node, yaml.MappingNode):
                sub = self.mapping(node, "'scope'")
                if set(sub) != {"source"}:
                    raise self.error("'scope' must be a string like 'dicom:PSG_SCU' or {source: ...}", node,
                                     key="scope")
                node = sub["source"][1]
            scope = self.scalar(node, "a rule's 'scope'")
            try:
                scope = parse_source(scope)
            except ValueError as exc:
                raise self.error(f"bad 'scope': {exc}", node, key="scope") from None
        note = self.scalar(fields["note"][1], "a rule's 'note'") if "note" in fields else ""
        try:
            MontageRule(kind, pattern, modality, priority, scope, note)
        except ValueError as exc:
            raise self.error(str(exc), pattern_node, key=kinds[0]) from None
        return _ParsedRule(kind, pattern, modality, priority, scope, note, _line(item))

    def legacy(self, top: dict[str, tuple[yaml.Node, yaml.Node]], root: yaml.Node, parsed: _Parsed) -> None:
        """Format 1: ``modalities: {BAS: [labels]}``, ``ignore: [labels]``, ``rules: [{match, modality}]``,
        read as normalised rules (labels) and regex rules."""
        if "modalities" not in top:
            raise self.error("missing required key 'modalities'", root, key="modalities")
        sections = self.mapping(top["modalities"][1], "'modalities'")
        entries: list[tuple[str, yaml.Node]] = []
        for modality, (mod_node, items) in sections.items():
            if modality not in MODALITIES:
                raise self.error(f"unknown modality {modality!r} under 'modalities' (expected one of "
                                 f"{', '.join(MODALITIES)})", mod_node, key=modality)
            entries += [(modality, item) for item in self.sequence(items, repr(modality))]
        if "ignore" in top:
            entries += [(EXCLUDE, item) for item in self.sequence(top["ignore"][1], "'ignore'")]
        for modality, item in entries:
            label = self.scalar(item, f"a label under {modality!r}")
            if not normalise_label(label):
                raise self.error(f"empty label under {modality!r}", item, key=modality)
            parsed.rules.append(_ParsedRule("normalised", label, modality, None, None, "", _line(item)))
        if "rules" in top:
            for item in self.sequence(top["rules"][1], "'rules'"):
                fields = self.mapping(item, "a rule")
                for key, (key_node, _) in fields.items():
                    if key not in ("match", "modality"):
                        raise self.error(f"unknown key {key!r} in a rule (expected match, modality)", key_node,
                                         key=key)
                for required in ("match", "modality"):
                    if required not in fields:
                        raise self.error(f"a rule needs {required!r}", item, key=required)
                pattern = self.scalar(fields["match"][1], "a rule's 'match'")
                modality = self.scalar(fields["modality"][1], "a rule's 'modality'")
                if _canonical_modality(modality) is None:
                    raise self.error(f"unknown modality {modality!r} in a rule", fields["modality"][1],
                                     key=modality)
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise self.error(f"invalid regular expression {pattern!r}: {exc}", fields["match"][1],
                                     key="match") from None
                parsed.rules.append(_ParsedRule("regex", pattern, modality, None, None, "", _line(item)))

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(f"{what} must be a mapping", node)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value in node.value:
            key = self.scalar(key_node, f"a key in {what}")
            if key in out:
                raise self.error(f"duplicate key {key!r} in {what}", key_node, key=key)
            out[key] = (key_node, value)
        return out

    def scalar(self, node: yaml.Node, what: str, strip: bool = True) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(f"{what} must be a single value, not a list or mapping", node)
        if node.tag == "tag:yaml.org,2002:null" and node.value in ("", "~"):
            return ""
        return str(node.value).strip() if strip else str(node.value)

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []  # "rules:" with nothing under it
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(f"{what} must be a list", node)
        return list(node.value)


def compose(text: str, source: str) -> yaml.Node | None:
    """The YAML node tree of ``text``; MontageError naming ``source`` and the line on a syntax error."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise MontageError(source, f"not valid YAML: {exc.problem or exc.context}",
                           line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise MontageError(source, f"not valid YAML: {exc}") from None
