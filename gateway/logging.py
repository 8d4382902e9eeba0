"""structlog set-up: JSON lines for services and files, a readable renderer on a terminal.

Log events carry study keys (a content hash or row id), never names, MRNs or birth dates. That is not
left to each call site: every event, from structlog or from a library's stdlib ``logging`` (pynetdicom,
hl7apy, pydicom), passes through :func:`redact_identifiers` before it is rendered, which

* replaces the value of any field whose name is an identifier field (``patient_id``, ``patient_name``,
  ``name``, ``mrn``, ``birth_date``, ``accession``, ``study_uid``, ``input_name``, ``path``, ...; see
  :data:`IDENTIFIER_FIELDS`) with ``[redacted]``, at any depth;
* replaces, in every string value (the message and a formatted exception included), each occurrence of
  the current study's identifiers with ``[redacted]``: :func:`bind_study` binds them with structlog's
  contextvars when a worker starts on a study (``study_key`` is bound too, and rendered: it is not PHI;
  the identifier set itself is never rendered);
* cuts every string value to :data:`MAX_VALUE_CHARS` (a formatted traceback keeps its last
  :data:`MAX_TRACEBACK_CHARS`, where the error is, with the value-bearing message lines scrubbed).

:func:`scrub` is the same redaction for error texts stored outside the logs (a study's ``last_error``,
``REASON.txt``, the events table): it also drops quoted substrings, absolute paths and runs of more than
four digits, which is where a library's message puts the value it choked on.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, datetime
from pathlib import PurePath
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "IDENTIFIER_FIELDS",
    "MAX_VALUE_CHARS",
    "REDACTED",
    "add_study_identifiers",
    "bind_study",
    "bound_identifiers",
    "configure_logging",
    "get_logger",
    "identifier_variants",
    "redact_identifiers",
    "scrub",
]

REDACTED = "[redacted]"
MAX_VALUE_CHARS = 500  # any string value of an event (a reason, an error, the message itself)
MAX_TRACEBACK_CHARS = 4000  # a formatted exception: its end (the error itself) is what matters
MAX_REASON_CHARS = 300  # scrub(): a failure reason stored with the study

# Field names (compared lower-case, without "_" and "-") whose values are identifiers wherever they appear.
IDENTIFIER_FIELDS = frozenset({
    "patientid", "patientname", "patient", "name", "givenname", "familyname", "mrn", "otherpatientids",
    "birthdate", "patientbirthdate", "dob", "accession", "accessionnumber", "admincode",
    "studyuid", "studyinstanceuid", "dicomstudyuid",  # a Study Instance UID identifies the patient's study
    "inputname", "inputpath", "input", "filename", "path", "paths", "file", "files", "sidecar",
})

# The current study's identifier texts (None: no study bound). A ContextVar of our own, not one of
# structlog's bound contextvars: merge_contextvars copies those into every event, and a renderer without
# redact_identifiers() in front of it (structlog's defaults, a test's configuration) would print them.
_IDENTIFIERS: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("psg_study_identifiers",
                                                                                    default=None)
_MIN_IDENTIFIER_CHARS = 3  # shorter values ("F", "12") would redact ordinary text everywhere
_NAME_SEPARATORS = re.compile(r"[\^,\s_]+")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


# ---- the study's identifiers, bound per worker -----------------------------------------------------------

def _date_variants(value: date) -> set[str]:
    """The ways a birth date is written in the formats we read and the texts libraries produce."""
    d, m, y = value.day, value.month, value.year
    return {
        value.isoformat(), f"{y:04d}{m:02d}{d:02d}",  # ISO, DICOM DA / HL7 DTM
        f"{d:02d}-{_MONTHS[m - 1]}-{y:04d}",  # EDF+ patient field (matched without regard to case)
        f"{d:02d}.{m:02d}.{y:04d}", f"{d:02d}/{m:02d}/{y:04d}", f"{m:02d}/{d:02d}/{y:04d}", f"{y:04d}/{m:02d}/{d:02d}",
        f"{d:02d}.{m:02d}.{y % 100:02d}",  # the EDF header's dd.mm.yy
        f"date({y}, {m}, {d})",  # a date's repr inside an exception message
    }


def identifier_variants(*values: object) -> frozenset[str]:
    """Every text form of ``values`` that redaction looks for: each value as given; a name's parts
    (``Doe^Jane``: ``Doe``, ``Jane``); a date in the formats it may be written in; a path's file name and
    stem. Values shorter than three characters are left out (they would redact ordinary words)."""
    out: set[str] = set()
    for value in values:
        if value is None:
            continue
        if isinstance(value, datetime):
            value = value.date()
        if isinstance(value, date):
            out |= _date_variants(value)
            continue
        if isinstance(value, PurePath):
            out |= {value.name, value.stem}
            continue
        text = str(value).strip()
        out.add(text)
        # A person's name, or any value with separators: its parts appear alone (a family name in a
        # header, "Jane Doe" reordered), so each part is redacted on its own.
        out.update(_NAME_SEPARATORS.split(text))
    return frozenset(v for v in out if len(v) >= _MIN_IDENTIFIER_CHARS)


def bound_study_key() -> str | None:
    """The key of the study bound to this thread's (or task's) log context, if any."""
    return structlog.contextvars.get_contextvars().get("study_key")


def bound_identifiers() -> frozenset[str]:
    """The identifier texts bound for the study this thread (or task) works on; empty outside a study."""
    return _IDENTIFIERS.get() or frozenset()


@contextlib.contextmanager
def bind_study(study_key: str, *identifiers: object) -> Iterator[None]:
    """Within the block, log events carry ``study_key`` and have ``identifiers`` (patient id, name, birth
    date, accession, input file name, ...: see :func:`identifier_variants`) redacted from every value.

    The binding is per thread/task (contextvars), restored on exit, so nested bindings (a batch runner's
    step inside a study's) and concurrent workers do not see each other's identifiers. A nested binding of
    the same study keeps what the outer one knows (identifiers learnt since are not on its row yet).
    """
    ids = identifier_variants(*identifiers)
    current = _IDENTIFIERS.get()
    if current is not None and structlog.contextvars.get_contextvars().get("study_key") == study_key:
        ids |= current
    token = _IDENTIFIERS.set(ids)
    try:
        with structlog.contextvars.bound_contextvars(study_key=study_key):
            yield
    finally:
        _IDENTIFIERS.reset(token)  # also drops what add_study_identifiers() added inside the block


def add_study_identifiers(*identifiers: object) -> None:
    """Add identifiers learnt while working on the bound study (the header's, once decoded). Outside a
    :func:`bind_study` block this does nothing: binding them then would outlive the study."""
    current = _IDENTIFIERS.get()
    if current is not None:
        _IDENTIFIERS.set(current | identifier_variants(*identifiers))


@functools.lru_cache(maxsize=64)
def _pattern(identifiers: frozenset[str]) -> re.Pattern[str] | None:
    """One case-insensitive alternation, longest first (``Doe^Jane`` before ``Doe``); cached per study."""
    if not identifiers:
        return None
    return re.compile("|".join(re.escape(v) for v in sorted(identifiers, key=len, reverse=True)), re.IGNORECASE)


def _redact_text(text: str, identifiers: frozenset[str], mark: str = REDACTED) -> str:
    pattern = _pattern(identifiers)
    return pattern.sub(mark, text) if pattern is not None else text


# ---- scrubbing error texts -------------------------------------------------------------------------------

# A quoted value: '...' or "..." (a repr's b/r prefix included) that does not start or end inside a word,
# so that "the site's table" is not read as an opening quote.
_QUOTED = re.compile(r"""(?<!\w)[bBrRuU]{0,2}(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")(?!\w)""")
_UNCLOSED = re.compile(r"""(?<!\w)[bBrRuU]{0,2}['"].*$""", re.DOTALL)  # a quote cut off (a truncated repr)
_ABS_PATH = re.compile(r"""(?<![\w.~])/(?:[^/\s'",:;()\[\]]+/)*[^/\s'",:;()\[\]]*""")
_LONG_DIGITS = re.compile(r"\d{5,}")  # MRNs, accession and phone numbers, dates written as digits
_MARK = "\ue000"  # a private-use character: stands for [redacted] while scrub() works


def scrub(text: object, limit: int = MAX_REASON_CHARS, identifiers: Iterable[str] | None = None) -> str:
    """``text`` on one line without values: the bound study's identifiers (or ``identifiers``) become
    ``[redacted]``, quoted substrings ``<value>``, absolute paths ``<path>``, digit runs longer than four
    ``<n>``; cut to ``limit`` characters. For library error messages, which quote what they refused."""
    ids = frozenset(identifiers) if identifiers is not None else bound_identifiers()
    # Identifiers first (an MRN is matched whole before its digits become <n>), as a one-character mark
    # that the later patterns treat as text: a path ending in a redacted file name is still one path.
    out = _redact_text(str(text), ids, _MARK)
    out = _QUOTED.sub("<value>", out)
    out = _UNCLOSED.sub("<value>", out)
    out = _ABS_PATH.sub("<path>", out)
    out = _LONG_DIGITS.sub("<n>", out)
    out = " ".join(out.split()).replace(_MARK, REDACTED)
    return out if len(out) <= limit else out[: limit - 1].rstrip() + "…"


def _cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…[{len(text) - limit} more characters]"


_TRACEBACK_FRAMES = ("Traceback (", "During handling of", "The above exception")


def _redact_traceback(text: str, identifiers: frozenset[str]) -> str:
    """A formatted exception: its code lines kept (they show our code, not data), its message lines
    (``ValueError: 'MRN...' is too long``) scrubbed, then its last MAX_TRACEBACK_CHARS kept."""
    lines = []
    for line in text.splitlines():
        structural = not line or line[0].isspace() or line.startswith(_TRACEBACK_FRAMES)
        lines.append(_redact_text(line, identifiers) if structural
                     else scrub(line, MAX_VALUE_CHARS, identifiers))
    out = "\n".join(lines)
    return out if len(out) <= MAX_TRACEBACK_CHARS else "…" + out[-MAX_TRACEBACK_CHARS:]


# ---- the processor ----------------------------------------------------------------------------------------

def _is_identifier_field(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("_", "").replace("-", "") in IDENTIFIER_FIELDS


def _redact_value(value: Any, identifiers: frozenset[str], depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _cut(_redact_text(value, identifiers))
    if depth > 8:  # a structure this deep is not something we log on purpose
        return "[nested]"
    if isinstance(value, Mapping):
        return {k: (REDACTED if _is_identifier_field(k) and v not in (None, "") else
                    _redact_value(v, identifiers, depth + 1)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact_value(v, identifiers, depth + 1) for v in value]
    if isinstance(value, BaseException):  # its message may quote the value it refused
        return f"{type(value).__name__}: {scrub(value, MAX_VALUE_CHARS, identifiers)}"
    if isinstance(value, (date, datetime)):
        return _redact_text(value.isoformat(), identifiers)
    # Anything else would be rendered by repr() (a Path names the file): render it here, redacted.
    return _cut(_redact_text(str(value), identifiers))


def redact_identifiers(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: identifier fields, the bound study's identifiers and over-long values out of
    the event (see the module docstring). Runs after ``format_exc_info``, before the renderer."""
    identifiers = bound_identifiers()
    for key in list(event_dict):
        value = event_dict[key]
        if key == "exc_info":  # not formatted yet (a chain without format_exc_info): the renderer's
            continue
        if _is_identifier_field(key):
            if value not in (None, ""):
                event_dict[key] = REDACTED
        elif key in ("exception", "stack") and isinstance(value, str):
            event_dict[key] = _redact_traceback(value, identifiers)
        else:
            event_dict[key] = _redact_value(value, identifiers)
    return event_dict


def _scrub_foreign_message(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """A library's log message (stdlib logging) is text we did not write: it gets the full :func:`scrub`
    (quoted values, paths, long digit runs), not only the identifier redaction our own events get."""
    event = event_dict.get("event")
    if isinstance(event, str):
        event_dict["event"] = scrub(event, MAX_VALUE_CHARS)
    return event_dict


# ---- set-up -------------------------------------------------------------------------------------------------

class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write (test runners and the CLI swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _BridgeHandler(logging.StreamHandler):
    """The root handler that renders stdlib records (pynetdicom, hl7apy, pydicom) as our events; a class
    of its own so that configuring again replaces it instead of adding a second one."""


def configure_logging(level: str = "info", json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog once per process; ``json=None`` picks JSON unless stderr is a terminal.

    ``stream`` (default: the current ``sys.stderr``) receives structlog's events and, through a root
    handler, the stdlib records of WARNING and above; both pass through :func:`redact_identifiers`.
    """
    if json is None:
        json = not sys.stderr.isatty()
    out: Any = stream if stream is not None else _Stderr()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_identifiers,  # last before rendering: it sees the formatted exception too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # The stdlib bridge: libraries log through ``logging``; their records get the same processors.
    handler = _BridgeHandler(out)
    handler.setLevel(max(logging.WARNING, threshold))  # library INFO/DEBUG chatter dumps datasets
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub_foreign_message,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_identifiers,
            renderer,
        ],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BridgeHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # pydicom's warnings quote offending header values, which can be a patient's name.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)


def _redacting_defaults() -> None:
    """structlog's own default chain with the redaction in front of its renderer, for a process that
    logs before (or without) configure_logging(): a CLI command, a library use, a test."""
    if structlog.is_configured():
        return
    structlog.configure(processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.dev.set_exc_info,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        structlog.processors.format_exc_info,
        redact_identifiers,
        structlog.dev.ConsoleRenderer(),
    ])


_redacting_defaults()
