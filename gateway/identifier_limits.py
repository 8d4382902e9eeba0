"""Bounds on identifiers and demographics: the one gate every source's values pass before use or storage.

The readers (EDF/BDF header, DICOM), the site's sidecar JSON and the file-name pattern all end in
:func:`apply_identifier_limits`: :func:`gateway.pipeline.identifiers.apply_site_identifiers` calls it last (so
``psg-gateway infer``, the daemon and the archive batch get it for one file or one DICOM folder) and
:func:`gateway.pipeline.steps.decode_inputs` calls it for a study of several DICOM instances.

Per field (characters, after control characters are removed)::

    patient id            80   longer: refused   (the EDF header's patient field, which a plain-EDF file may
                                                 fill with one free-text id; DICOM LO is 64; PID-3.1 is 15
                                                 in the v2.5.1 table, but sites use more)
    patient id issuer     64   longer: refused   (DICOM LO; the ORU's PID-3.4 takes 20, so a longer issuer
                                                 needs hl7.mrn_assigning_authority)
    accession number      64   longer: refused   (ORC-2/3 and OBR-2/3 EI.1)
    study instance UID    64   longer: refused   (DICOM UI; the database column holds 64)
    patient name         199   longer: cut, with a warning (the ORU's PID-5 name components hold 199)
    scorer                64   longer: cut, with a warning (a staff name: EDF+ technician, DICOM Operators'
                                                 Name, a sidecar's ``scorer``); ``X`` is unknown (EDF+'s mark)

An identifier is refused rather than cut because a cut MRN or accession names another patient or order:
the study fails with ``patient id longer than 80 characters`` (a :class:`IdentifierError`, which the
daemon treats like an unreadable input: FAILED, quarantined with REASON.txt). All limits are within the
database columns (``gateway/store/models.py``: patient id, issuer, accession and scorer 128, name 256, UID 64).

Control characters (C0 including CR/LF/TAB, DEL, C1) and unpaired surrogates are removed, with a warning:
they end HL7 segments, PostgreSQL refuses NUL, and UTF-8 cannot encode a lone surrogate. In a name a run
of them becomes one space (``Doe\\r\\nJane`` stays two words); in an identifier they are dropped. HL7
delimiters (``| ^ ~ & \\``) are left alone: the ORU builder escapes them.

A birth date after the recording start (or, with no start, after today) or more than 130 years before it
becomes unknown with the warning ``birth date implausible: age unknown`` (the model's diagnosis head then
gets an unknown age, which the bundle's demographics encoding centres). A stated age (``age_years``)
outside 0..130 becomes unknown likewise. A sex code that a reader did not recognise is unknown, with a
warning. Warnings and errors name the field, never its value.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .readers.errors import ReaderError
from .recording import Demographics, Recording

__all__ = [
    "FIELD_LIMITS",
    "MAX_AGE_YEARS",
    "FieldLimit",
    "IdentifierError",
    "apply_identifier_limits",
    "clean_text",
]

MAX_AGE_YEARS = 130.0
_DAYS_PER_YEAR = 365.2425


@dataclass(frozen=True)
class FieldLimit:
    """One identifier attribute's bound."""

    attribute: str  # Identifiers attribute
    label: str  # what warnings and errors call it
    max_chars: int
    identity: bool  # True: a longer value is refused (cutting it changes whom it names); False: cut


FIELD_LIMITS: tuple[FieldLimit, ...] = (
    FieldLimit("patient_id", "patient id", 80, identity=True),
    FieldLimit("patient_id_issuer", "patient id issuer", 64, identity=True),
    FieldLimit("admin_code", "accession number", 64, identity=True),
    FieldLimit("study_uid", "study instance UID", 64, identity=True),
    FieldLimit("patient_name", "patient name", 199, identity=False),
    FieldLimit("scorer", "scorer", 64, identity=False),
)


_REFUSED_WHY = (" (a shortened identifier would name another patient or order: correct the source, or give "
                "the identifier in a sidecar)")


class IdentifierError(ReaderError):
    """An identifier the gateway will not store or send (too long to keep, and cutting it changes identity).

    A :class:`ReaderError` so that every caller that fails an unreadable input (the daemon's pipeline, the
    archive batch, ``psg-gateway infer``) fails this one the same way: permanently, with the reason.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(path, message, kind="identifiers")

    def __reduce__(self):  # pickles across the batch's worker processes as its own type
        return (IdentifierError, (str(self.path), self.reason))


def _unwanted(c: str) -> bool:
    # Cc: C0, DEL and C1 controls; Cs: a lone surrogate (JSON "\ud800" decodes to one).
    return unicodedata.category(c) in ("Cc", "Cs")


def clean_text(value: str, *, free_text: bool) -> tuple[str, bool]:
    """``value`` without control characters and outer blanks, and whether any were removed.

    In free text (a name) each run of them becomes one space; in an identifier they are dropped.
    """
    if not any(_unwanted(c) for c in value):
        return value.strip(), False
    out: list[str] = []
    for c in value:
        if not _unwanted(c):
            out.append(c)
        elif free_text and out and out[-1] != " ":
            out.append(" ")
    return "".join(out).strip(), True


def _plausible_age(age: float | None) -> bool:
    return age is None or (math.isfinite(age) and 0.0 <= age <= MAX_AGE_YEARS)


def _bounded_demographics(recording: Recording, warnings: list[str]) -> Demographics:
    demo = recording.demographics
    sex, birth_date, age_years = demo.sex, demo.birth_date, demo.age_years
    if demo.sex_unrecognised:
        warnings.append("sex code not recognised: sex unknown")
    if not _plausible_age(age_years):
        age_years = None
        warnings.append("age implausible: age unknown")
    if birth_date is not None:
        # The recording start when known; otherwise no one recorded today can be born after today.
        start = recording.start
        reference = start.date() if isinstance(start, datetime) else datetime.now(UTC).date()
        days = (reference - birth_date).days
        if days < 0 or days / _DAYS_PER_YEAR > MAX_AGE_YEARS:
            birth_date = None
            warnings.append("birth date implausible: age unknown" if age_years is None
                            else "birth date implausible: the stated age is used")
    return Demographics(sex=sex, birth_date=birth_date, age_years=age_years)


def apply_identifier_limits(recording: Recording, path: str | Path | None = None) -> Recording:
    """A copy of ``recording`` whose identifiers and demographics are within the limits above.

    What is changed is said in the copy's ``warnings`` (field names only); ``recording`` itself is not
    modified. Applying it twice changes nothing the second time. Raises :class:`IdentifierError` (naming
    ``path``, else the recording's source) for an identifier that is too long to keep.
    """
    warnings: list[str] = []
    refused: list[str] = []
    identifiers = dataclasses.replace(recording.identifiers)
    for limit in FIELD_LIMITS:
        value = getattr(identifiers, limit.attribute)
        if value is None:
            continue
        text, removed = clean_text(value if isinstance(value, str) else str(value), free_text=not limit.identity)
        if removed:
            warnings.append(f"control characters removed from the {limit.label}")
        if len(text) > limit.max_chars:
            if limit.identity:
                refused.append(f"{limit.label} longer than {limit.max_chars} characters")
                continue
            text = text[: limit.max_chars].rstrip()
            warnings.append(f"{limit.label} longer than {limit.max_chars} characters: truncated")
        if limit.attribute == "scorer" and text.upper() == "X":
            text = ""  # EDF+'s "unknown", from whichever source
        setattr(identifiers, limit.attribute, text or None)
    if refused:
        where = path if path is not None else (identifiers.source_path or Path("."))
        raise IdentifierError(where, "; ".join(refused) + _REFUSED_WHY)
    demographics = _bounded_demographics(recording, warnings)
    return dataclasses.replace(recording, identifiers=identifiers, demographics=demographics,
                               warnings=[*recording.warnings, *warnings])
