"""Montage tables: which of a site's channel labels feed which SleepFM modality (BAS, RESP, EKG, EMG).

A table is a reviewable YAML file (see ``mappings/default.yaml`` for the format, documented in its header).
The built-in default table ships inside the package as ``gateway/data/default_montage.yaml``, an exact copy
of ``mappings/default.yaml``.

Matching a recorded label, first hit wins:

1. the label, normalised (:func:`normalise_label`: trimmed, case-folded, whitespace collapsed, ``:`` and
   ``-`` between electrode names treated alike), equals a normalised label of the table;
2. the label starts with a vendor prefix (``EEG``, ``EOG``, ``EMG``, ``ECG``, ``EKG``) and the rest matches
   a table label (``EEG C3-A2`` -> ``C3-A2``);
3. a regex rule of the table matches the whole label (case-insensitive; whitespace collapsed), in order.

A table label may map to a modality or be listed under ``ignore`` (known, but not a model input: reported
as ignored rather than unmapped). A table whose labels collide after normalisation across sections is
refused, so the order of sections never matters.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import yaml

__all__ = [
    "IGNORE",
    "MODALITIES",
    "MontageError",
    "MontageMatch",
    "MontageRule",
    "MontageTable",
    "default_table",
    "normalise_label",
]

MODALITIES: tuple[str, ...] = ("BAS", "RESP", "EKG", "EMG")
IGNORE = "ignore"
TABLE_FORMAT = 1
VENDOR_PREFIXES: tuple[str, ...] = ("eeg ", "eog ", "emg ", "ecg ", "ekg ")
DEFAULT_RESOURCE = "data/default_montage.yaml"

_TOP_KEYS = ("name", "format", "description", "modalities", "ignore", "rules")
_RULE_KEYS = ("match", "modality")
_SEPARATOR = re.compile(r"\s*[:\-]\s*")


class MontageError(ValueError):
    """A montage table file is malformed. The message names the file and the offending key or line."""

    def __init__(self, source: str | Path, message: str, *, key: str | None = None,
                 line: int | None = None) -> None:
        self.source = str(source)
        self.key = key
        self.line = line
        where = f"{source}, line {line}" if line is not None else f"{source}"
        super().__init__(f"montage table {where}: {message}")


def normalise_label(label: str) -> str:
    """The form labels are compared in: trimmed, case-folded, whitespace collapsed, ``:`` == ``-``.

    >>> normalise_label("  EEG  C3:M2 ")
    'eeg c3-m2'
    """
    text = " ".join(label.split()).casefold()
    return _SEPARATOR.sub("-", text)


def _collapse(label: str) -> str:
    return " ".join(label.split())


@dataclass(frozen=True)
class MontageRule:
    """A regex rule: labels that ``pattern`` matches in full (case-insensitive) go to ``modality``."""

    pattern: str
    modality: str  # one of MODALITIES, or IGNORE
    line: int | None = None
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern, re.IGNORECASE))

    def matches(self, label: str) -> bool:
        return self.regex.fullmatch(_collapse(label)) is not None


@dataclass
class MontageMatch:
    """How one recording's labels map.

    ``groups``: modality -> channel indices in recording order; only modalities that have channels, in the
    order BAS, RESP, EKG, EMG. ``ignored``/``unmapped``: labels, one entry per channel, in recording order.
    ``modality_of``: label -> modality for every mapped label. ``matched_by``: label -> ``"label"``,
    ``"prefix"`` or ``"rule <pattern>"`` for every mapped or ignored label.
    """

    groups: dict[str, list[int]]
    ignored: list[str]
    unmapped: list[str]
    modality_of: dict[str, str]
    matched_by: dict[str, str] = field(default_factory=dict)

    def labels(self, modality: str, labels: Sequence[str]) -> list[str]:
        """The labels (from the list that was mapped) that feed ``modality``, in recording order."""
        return [labels[i] for i in self.groups.get(modality, [])]


class MontageTable:
    """A loaded montage table. Immutable; build one with :meth:`load`, :meth:`parse` or :func:`default_table`."""

    def __init__(self, name: str, version: str, labels: Mapping[str, str], spellings: Mapping[str, str],
                 rules: Iterable[MontageRule] = (), source: str = "<memory>") -> None:
        self.name = name
        self.version = version
        self.source = source
        self._labels = MappingProxyType(dict(labels))  # normalised label -> modality or IGNORE
        self._spellings = MappingProxyType(dict(spellings))  # normalised label -> as written in the table
        self.rules: tuple[MontageRule, ...] = tuple(rules)

    def __repr__(self) -> str:
        return (f"MontageTable(name={self.name!r}, version={self.version!r}, labels={len(self._labels)}, "
                f"rules={len(self.rules)})")

    # ---- building ----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> MontageTable:
        """Read a table file. Raises :class:`MontageError` naming the file (and line) when it is malformed."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MontageError(path, "file not found") from None
        except OSError as exc:
            raise MontageError(path, f"cannot read: {exc.strerror or exc}") from None
        return cls.parse(data, source=str(path), default_name=path.stem)

    @classmethod
    def parse(cls, data: bytes | str, source: str = "<string>", default_name: str = "site") -> MontageTable:
        """Build a table from YAML text. ``version`` is the first 12 hex digits of the content's SHA-256."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MontageError(source, f"not UTF-8 text (byte {exc.start})") from None
        version = hashlib.sha256(raw).hexdigest()[:12]
        return _TableParser(source).build(text, version, default_name)

    # ---- querying ----------------------------------------------------------------------------------------

    def labels_for(self, modality: str) -> list[str]:
        """The table's labels (as written) for a modality or for ``"ignore"``."""
        return [self._spellings[k] for k, m in self._labels.items() if m == modality]

    def lookup(self, label: str) -> tuple[str | None, str | None]:
        """``(modality or "ignore" or None, how)`` for one label; ``how`` is None when nothing matched."""
        key = normalise_label(label)
        if not key:
            return None, None
        if key in self._labels:
            return self._labels[key], "label"
        for prefix in VENDOR_PREFIXES:
            if key.startswith(prefix) and key[len(prefix):] in self._labels:
                return self._labels[key[len(prefix):]], "prefix"
        for rule in self.rules:
            if rule.matches(label):
                return rule.modality, f"rule {rule.pattern}"
        return None, None

    def map_labels(self, labels: Sequence[str]) -> MontageMatch:
        """Map a recording's channel labels (in recording order; duplicates each keep their index)."""
        groups: dict[str, list[int]] = {m: [] for m in MODALITIES}
        ignored: list[str] = []
        unmapped: list[str] = []
        modality_of: dict[str, str] = {}
        matched_by: dict[str, str] = {}
        for index, label in enumerate(labels):
            modality, how = self.lookup(label)
            if modality is None:
                unmapped.append(label)
                continue
            matched_by[label] = how or ""
            if modality == IGNORE:
                ignored.append(label)
            else:
                groups[modality].append(index)
                modality_of[label] = modality
        return MontageMatch(
            groups={m: ix for m, ix in groups.items() if ix},
            ignored=ignored,
            unmapped=unmapped,
            modality_of=modality_of,
            matched_by=matched_by,
        )


@functools.cache
def default_table() -> MontageTable:
    """The built-in table (``gateway/data/default_montage.yaml``, identical to ``mappings/default.yaml``)."""
    resource = resources.files("gateway").joinpath(DEFAULT_RESOURCE)
    return MontageTable.parse(resource.read_bytes(), source=f"gateway/{DEFAULT_RESOURCE}",
                              default_name="default")


# ---- parsing with line numbers -------------------------------------------------------------------------------


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _TableParser:
    """Walks the YAML node tree (not the constructed objects) so that every error can name its line, and
    so that labels are always taken as text (a label ``NO`` or ``1`` stays a label)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, message: str, node: yaml.Node | None = None, key: str | None = None) -> MontageError:
        return MontageError(self.source, message, key=key, line=_line(node) if node is not None else None)

    def build(self, text: str, version: str, default_name: str) -> MontageTable:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise MontageError(self.source, f"not valid YAML: {exc.problem or exc.context}",
                               line=mark.line + 1 if mark else None) from None
        except yaml.YAMLError as exc:
            raise MontageError(self.source, f"not valid YAML: {exc}") from None
        if root is None:
            raise self.error("the file is empty; expected a mapping with 'modalities'")
        top = self.mapping(root, "the table")

        name = default_name
        labels: dict[str, str] = {}
        spellings: dict[str, str] = {}
        origin: dict[str, tuple[str, int]] = {}  # normalised -> (section, line) of first occurrence
        rules: list[MontageRule] = []
        if "modalities" not in top:
            raise self.error("missing required key 'modalities'", root, key="modalities")

        for key, (key_node, value) in top.items():
            if key == "name":
                name = self.scalar(value, "'name'")
                if not name:
                    raise self.error("'name' must not be empty", value, key="name")
            elif key == "format":
                fmt = self.scalar(value, "'format'")
                if fmt != str(TABLE_FORMAT):
                    raise self.error(f"unsupported format {fmt!r} (this version reads format {TABLE_FORMAT})",
                                     value, key="format")
            elif key == "description":
                self.scalar(value, "'description'")
            elif key == "modalities":
                sections = self.mapping(value, "'modalities'")
                for modality, (mod_node, items) in sections.items():
                    if modality not in MODALITIES:
                        raise self.error(f"unknown modality {modality!r} under 'modalities' (expected one of "
                                         f"{', '.join(MODALITIES)}; use 'ignore' at the top level for labels "
                                         f"that are not model inputs)", mod_node, key=modality)
                    self.add_labels(items, modality, labels, spellings, origin)
            elif key == "ignore":
                self.add_labels(value, IGNORE, labels, spellings, origin)
            elif key == "rules":
                rules = self.rules(value)
            else:
                raise self.error(f"unknown key {key!r} (expected {', '.join(_TOP_KEYS)})", key_node, key=key)
        return MontageTable(name, version, labels, spellings, rules, source=self.source)

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

    def scalar(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(f"{what} must be a single value, not a list or mapping", node)
        return str(node.value).strip()

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []  # "BAS:" with nothing under it
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(f"{what} must be a list", node)
        return list(node.value)

    def add_labels(self, node: yaml.Node, section: str, labels: dict[str, str], spellings: dict[str, str],
                   origin: dict[str, tuple[str, int]]) -> None:
        for item in self.sequence(node, f"{section!r}"):
            label = self.scalar(item, f"a label under {section!r}")
            key = normalise_label(label)
            if not key:
                raise self.error(f"empty label under {section!r}", item, key=section)
            if key in labels:
                if labels[key] != section:
                    first_section, first_line = origin[key]
                    raise self.error(
                        f"label {label!r} is listed under {section!r} but {spellings[key]!r} (line {first_line}) "
                        f"is already under {first_section!r}; labels are compared case-insensitively with ':' "
                        f"and '-' alike", item, key=label)
                continue  # a duplicate within one section: harmless
            labels[key] = section
            spellings[key] = label
            origin[key] = (section, _line(item))

    def rules(self, node: yaml.Node) -> list[MontageRule]:
        out = []
        for item in self.sequence(node, "'rules'"):
            fields = self.mapping(item, "a rule")
            for key, (key_node, _) in fields.items():
                if key not in _RULE_KEYS:
                    raise self.error(f"unknown key {key!r} in a rule (expected match, modality)", key_node, key=key)
            for required in _RULE_KEYS:
                if required not in fields:
                    raise self.error(f"a rule needs {required!r}", item, key=required)
            pattern = self.scalar(fields["match"][1], "a rule's 'match'")
            modality = self.scalar(fields["modality"][1], "a rule's 'modality'")
            if modality not in (*MODALITIES, IGNORE):
                raise self.error(f"unknown modality {modality!r} in a rule (expected one of "
                                 f"{', '.join(MODALITIES)} or {IGNORE})", fields["modality"][1], key=modality)
            try:
                out.append(MontageRule(pattern, modality, _line(item)))
            except re.error as exc:
                raise self.error(f"invalid regular expression {pattern!r}: {exc}", fields["match"][1],
                                 key="match") from None
        return out
