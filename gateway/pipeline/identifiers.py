"""Identifiers and demographics a site supplies beside the recording: a sidecar JSON or the file name.

Many field files carry no usable identifiers in their header (anonymised EDF, vendor exports that put
the MRN in the file name, a PACS export script that writes a JSON next to each file). A site can
supply them in two ways; :func:`apply_site_identifiers` merges them into a recording, field by field,
in this order of precedence::

    sidecar JSON  >  file-name pattern  >  the file's own header

Sidecar JSON
    ``<file>.json`` (``night.edf.json``) or else ``<stem>.json`` (``night.json``) in the same folder: one
    JSON object with any of these keys (others are ignored, so a BIDS sidecar does no harm)::

        {"patient_id": "MRN123", "patient_name": "Doe^Jane", "accession": "ACC42",
         "sex": "F", "birth_date": "1961-03-02", "age_years": 63}

    ``admin_code`` is accepted for ``accession``, ``study_uid`` and ``patient_id_issuer`` too, and ``scorer``:
    who scored the recording's hypnogram (a technician's name or code, over the EDF+ header's technician
    subfield or DICOM Operators' Name; ``X`` is unknown; cut to 64 characters). ``sex`` is
    M/F (male/female, any case), or U/O/X/unknown to state that it is not known (this overrides the
    header). ``birth_date`` is ISO ``YYYY-MM-DD``; ``age_years`` a number. A missing key or ``null``
    supplies nothing: the field falls through to the next source. A sidecar that is not valid JSON, not an object, or holds a value of
    the wrong kind is a :class:`ReaderError` naming the sidecar file and the key (never the value).

    A sidecar that is there must be usable: one that is a symbolic link (it could point anywhere), not a
    regular file (a directory, a pipe), unreadable, larger than 16 MiB, not UTF-8 or not valid JSON is a
    :class:`ReaderError` too. It never falls back to the header's identifiers: the study fails with the
    reason (the daemon quarantines it; ``psg-gateway studies replace``/``retry`` once it is fixed).

File-name pattern
    A regular expression from the site's configuration, searched in the file's name (``night.edf``),
    with named groups ``patient_id``, ``patient_name``, ``accession`` (or ``admin_code``), ``scorer``, ``sex``,
    ``birth_date`` (``YYYY-MM-DD`` or ``YYYYMMDD``), ``age_years``. For example
    ``^(?P<patient_id>\\d{7})_(?P<accession>A\\d+)\\.edf$``. A name that does not match supplies nothing.

Birth date and age travel together: the source that gives either one gives both (a sidecar with only
``age_years`` replaces a header's birth date), so a stale date never overrides a site's stated age.

The merged result then passes :func:`gateway.identifier_limits.apply_identifier_limits`: lengths, control
characters, plausible birth date and age (see that module).

Nothing here logs; errors never quote identifier values.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import stat
from datetime import date
from pathlib import Path
from typing import Any

from ..identifier_limits import apply_identifier_limits
from ..readers.errors import ReaderError
from ..recording import Demographics, Recording

__all__ = ["SiteIdentifiers", "apply_site_identifiers", "find_sidecar", "from_filename", "read_sidecar"]

_ID_KEYS = {  # source key -> Identifiers attribute
    "patient_id": "patient_id",
    "patient_name": "patient_name",
    "accession": "admin_code",
    "admin_code": "admin_code",
    "study_uid": "study_uid",
    "patient_id_issuer": "patient_id_issuer",
    "scorer": "scorer",
}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "u": None, "o": None, "x": None, "unknown": None,
        "other": None, "": None}
_COMPACT_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
# A sidecar holds a handful of keys (a BIDS one a few KB); the bound keeps a misnamed recording or a
# runaway export from being read into memory whole.
SIDECAR_MAX_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass
class SiteIdentifiers:
    """What one source supplies; None: this source says nothing about the field."""

    identifiers: dict[str, str] = dataclasses.field(default_factory=dict)  # Identifiers attribute -> value
    sex: str | None = None
    sex_given: bool = False  # True when the source states the sex (possibly as unknown)
    birth_date: date | None = None
    age_years: float | None = None

    @property
    def gives_age(self) -> bool:
        return self.birth_date is not None or self.age_years is not None

    def __repr__(self) -> str:  # never the values
        return (f"SiteIdentifiers(fields={sorted(self.identifiers)}, sex_given={self.sex_given}, "
                f"age_given={self.gives_age})")


class _Invalid(ValueError):
    """A value of the wrong kind; carries the key only."""


def _text_value(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Invalid(f"{key} must be a string")
    text = str(value).strip()
    return text or None


def _sex_value(key: str, value: Any) -> tuple[str | None, bool]:
    if value is None:
        return None, False
    if not isinstance(value, str) or value.strip().lower() not in _SEX:
        raise _Invalid(f"{key} must be M, F or unknown")
    return _SEX[value.strip().lower()], True


def _date_value(key: str, value: Any) -> date | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        m = _COMPACT_DATE.match(text)
        try:
            return date(int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else date.fromisoformat(text)
        except ValueError:
            pass
    raise _Invalid(f"{key} must be a date as YYYY-MM-DD")


def _age_value(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Invalid(f"{key} must be a number of years") from None
    # Only the kind is checked here; whether the age is plausible is identifier_limits' call (one bound
    # for every source: an implausible age becomes unknown with a warning).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _Invalid(f"{key} must be a number of years, 0 or more")
    return float(value)


def _collect(values: dict[str, Any]) -> SiteIdentifiers:
    site = SiteIdentifiers()
    for key, attribute in _ID_KEYS.items():
        if key in values:
            text = _text_value(key, values[key])
            if text is not None:
                site.identifiers.setdefault(attribute, text)
    if "sex" in values:
        site.sex, site.sex_given = _sex_value("sex", values["sex"])
    if "birth_date" in values:
        site.birth_date = _date_value("birth_date", values["birth_date"])
    if "age_years" in values:
        site.age_years = _age_value("age_years", values["age_years"])
    return site


# ---- the two sources ---------------------------------------------------------------------------------------


def find_sidecar(path: str | Path) -> Path | None:
    """``<file>.json`` beside the file, else ``<stem>.json``; None when neither exists."""
    path = Path(path)
    for candidate in (path.with_name(path.name + ".json"), path.with_name(path.stem + ".json")):
        # lexists, not is_file: a sidecar that is a symlink or a folder is found here and refused by
        # read_sidecar; skipping it would fall back to the header's identifiers without a word.
        if candidate != path and os.path.lexists(candidate):
            return candidate
    return None


_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _cannot_read(sidecar: Path, exc: OSError) -> ReaderError:
    # strerror only: str(exc) repeats the file name
    return ReaderError(sidecar, f"cannot read the identifier sidecar: {exc.strerror or type(exc).__name__}",
                       kind="unreadable")


def _sidecar_bytes(sidecar: Path) -> bytes:
    """The bytes of ``sidecar``, read only from a regular file that is not a symbolic link."""
    try:
        # O_NOFOLLOW: a symlink swapped in after the lookup is refused too. O_NONBLOCK: opening a FIFO
        # must not wait for a writer (it is refused below as not a regular file).
        fd = os.open(sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(sidecar):
            raise ReaderError(sidecar, "identifier sidecar is a symbolic link (it could point anywhere): put the "
                                       "file itself beside the recording", kind="unreadable") from None
        raise _cannot_read(sidecar, exc) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "a special file")
        raise ReaderError(sidecar, f"identifier sidecar is not a regular file ({what})", kind="unreadable")
    if st.st_size > SIDECAR_MAX_BYTES:
        os.close(fd)
        raise ReaderError(sidecar, f"identifier sidecar is larger than {SIDECAR_MAX_BYTES // 2**20} MiB",
                          kind="corrupt")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(SIDECAR_MAX_BYTES + 1)
        except OSError as exc:
            raise _cannot_read(sidecar, exc) from None
    if len(data) > SIDECAR_MAX_BYTES:  # grew after the fstat
        raise ReaderError(sidecar, f"identifier sidecar is larger than {SIDECAR_MAX_BYTES // 2**20} MiB",
                          kind="corrupt")
    return data


def read_sidecar(sidecar: str | Path) -> SiteIdentifiers:
    """Parse a sidecar JSON file. Raises :class:`ReaderError` naming the sidecar (and the key).

    Refused with a reason (never skipped): a symbolic link, anything but a regular file, an unreadable or
    oversized file, text that is not UTF-8 or not valid JSON, JSON that is not an object.
    """
    sidecar = Path(sidecar)
    try:
        text = _sidecar_bytes(sidecar).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ReaderError(sidecar, "identifier sidecar is not UTF-8 text", kind="corrupt") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        # json's messages name the expected token, never the text found: no value leaks into the reason.
        raise ReaderError(sidecar, f"identifier sidecar is not valid JSON: line {exc.lineno}, "
                                   f"column {exc.colno} ({exc.msg})", kind="corrupt") from None
    except RecursionError:
        raise ReaderError(sidecar, "identifier sidecar is nested too deeply", kind="corrupt") from None
    if not isinstance(values, dict):
        raise ReaderError(sidecar, f"identifier sidecar must hold a JSON object, not {_json_kind(values)}",
                          kind="corrupt")
    try:
        return _collect(values)
    except _Invalid as exc:
        raise ReaderError(sidecar, f"identifier sidecar: {exc}", kind="corrupt") from None


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "a boolean" if isinstance(value, bool) else "a number"


def from_filename(path: str | Path, pattern: str | re.Pattern[str]) -> SiteIdentifiers:
    """What a file-name pattern (named groups) gives for ``path``; nothing when the name does not match.

    Raises ``ValueError`` for a pattern that does not compile (a configuration error), and
    :class:`ReaderError` naming the file when a group's text is not a valid value for its field.
    """
    path = Path(path)
    try:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    except re.error as exc:
        raise ValueError(f"identifier file-name pattern does not compile: {exc}") from None
    match = regex.search(path.name)
    if match is None:
        return SiteIdentifiers()
    groups = {k: v for k, v in match.groupdict().items() if v is not None}
    try:
        return _collect(groups)
    except _Invalid as exc:
        raise ReaderError(path, f"identifier file-name pattern: {exc}", kind="corrupt") from None


# ---- merging -----------------------------------------------------------------------------------------------


def apply_site_identifiers(recording: Recording, path: str | Path, filename_pattern: str | None,
                           name: str | None = None) -> Recording:
    """A copy of ``recording`` with the site's identifiers merged in (sidecar > file name > header), then
    bounded by :func:`gateway.identifier_limits.apply_identifier_limits` (what it changes is in ``warnings``).

    ``path`` is the recording's file, or a DICOM study folder (whose sidecar is ``<folder>.json`` beside
    it). The channels are shared with ``recording`` (they hold no samples); identifiers, demographics and
    warnings are new objects, ``recording`` itself is not modified. Raises :class:`ReaderError` for a
    sidecar or file name that cannot be used, and its subclass ``IdentifierError`` for an identifier too
    long to keep.
    """
    path = Path(path)
    sources: list[SiteIdentifiers] = []  # highest precedence first
    sidecar = find_sidecar(path)
    if sidecar is not None:
        sources.append(read_sidecar(sidecar))
    if filename_pattern:
        # name: the file's name as it arrived (the database's input_name); the daemon's folders name it
        # after the claim id or study key, which the site's pattern must not read.
        sources.append(from_filename(path.with_name(Path(name).name) if name else path, filename_pattern))

    identifiers = dataclasses.replace(recording.identifiers)
    header_demo = recording.demographics
    for attribute in {a for s in sources for a in s.identifiers}:
        value = next(s.identifiers[attribute] for s in sources if attribute in s.identifiers)
        setattr(identifiers, attribute, value)

    sex, sex_unrecognised = header_demo.sex, header_demo.sex_unrecognised
    for source in sources:
        if source.sex_given:  # the site's statement replaces the header's code, recognised or not
            sex, sex_unrecognised = source.sex, False
            break
    birth_date, age_years = header_demo.birth_date, header_demo.age_years
    for source in sources:
        if source.gives_age:
            birth_date, age_years = source.birth_date, source.age_years
            break
    demographics = Demographics(sex=sex, birth_date=birth_date, age_years=age_years,
                                sex_unrecognised=sex_unrecognised)
    merged = dataclasses.replace(recording, identifiers=identifiers, demographics=demographics)
    return apply_identifier_limits(merged, path)
