"""The raw EDF/EDF+/BDF/BDF+ header and EDF+ annotation (TAL) parser, independent of pyedflib.

:func:`read_header` parses every field of the fixed and the per-signal header, reconciles the declared
number of data records with the file's size, and says whether pyedflib can be trusted with the file
(:attr:`EdfHeader.raw_reasons`). It never raises anything but :class:`ReaderError` for a bad file; each
error names the file and the header field (and the signal, for a per-signal field).

Leniency, field by field (the quirks of files seen in the field):

* text fields are decoded as UTF-8 when they are valid UTF-8, else as latin-1 (any byte is accepted,
  nothing is ever refused for non-ASCII), NUL
  padding counts as space padding; labels keep leading text as recorded (``"EEG C3-A2"``) and lose
  trailing spaces;
* numbers may carry NUL padding, a decimal comma, or (digital min/max) an integral ``.0``;
* a start date/time that is not a date gives ``start=None`` and a warning (not an error);
* the number of data records: ``-1`` (a recording that was never closed) is derived from the file size;
  bytes after the declared records are ignored; a file shorter than the header says is read up to its
  last complete record, the partial record is dropped; each of these leaves a warning;
* physical min == max, or digital min == max: the signal cannot be scaled; it is read as a constant
  (physical minimum) with a warning. A signal with 0 samples per record is skipped with a warning.

Anything that leaves the layout of the data records unknown is an error: a header size that does not
fit the number of signals, numbers that are not numbers, negative counts, a zero or negative data
record duration when there are samples, a sampling rate above 1 MHz.

Warnings never hold identifiers or the file's path (the caller knows the file).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..recording import Demographics, Identifiers
from .errors import ReaderError, os_error

__all__ = [
    "ANNOTATION_LABELS",
    "Constant",
    "EdfHeader",
    "FileStamp",
    "Scaling",
    "SignalHeader",
    "Tal",
    "admin_code",
    "check_unchanged",
    "parse_tals",
    "patient_fields",
    "read_header",
    "require_data_records",
    "technician",
]

EDF_VERSION = b"0       "
BDF_VERSION = b"\xffBIOSEMI"
ANNOTATION_LABELS = frozenset({"EDF Annotations", "BDF Annotations"})
MAX_SIGNALS = 4096
MAX_RATE_HZ = 1_000_000.0
_MAX_PHYSICAL = 1e38  # float32 holds up to 3.4e38
_MONTHS = {m: i for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), start=1)}
_EDFPLUS_DATE = re.compile(r"^(\d{2})-([A-Za-z]{3})-(\d{4})$")
_HEADER_DATE = re.compile(r"^(\d{1,2})\D(\d{1,2})\D(\d{2})$")
_HEADER_TIME = re.compile(r"^(\d{1,2})\D(\d{1,2})\D(\d{1,2})$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

# Per-signal fields: (name in messages, width). Each is stored for all signals before the next one.
_SIGNAL_FIELDS = (
    ("label", 16), ("transducer type", 80), ("physical dimension", 8), ("physical minimum", 8),
    ("physical maximum", 8), ("digital minimum", 8), ("digital maximum", 8), ("prefiltering", 80),
    ("number of samples per data record", 8), ("reserved", 32),
)


# ---- small shared types -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileStamp:
    """Size and modification time, to notice a file that changes between decoding and reading samples."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns)


def check_unchanged(path: Path, stamp: FileStamp) -> None:
    try:
        now = FileStamp.of(path)
    except FileNotFoundError as exc:
        raise ReaderError(path, "file has gone since it was decoded", kind="not_found") from exc
    except OSError as exc:
        raise os_error(path, exc, "cannot stat the file") from exc
    if now != stamp:
        raise ReaderError(path, "file changed since it was decoded (size or modification time differ)",
                          kind="corrupt")


@dataclass(frozen=True)
class Scaling:
    """edflib's digital -> physical conversion: physical = bitvalue * (offset + digital)."""

    bitvalue: float
    offset: float

    @classmethod
    def from_header(cls, pmin: float, pmax: float, dmin: int, dmax: int) -> Scaling:
        bitvalue = (pmax - pmin) / (dmax - dmin)
        return cls(bitvalue, pmax / bitvalue - dmax)

    def apply(self, digital: np.ndarray, out: np.ndarray) -> None:
        scratch = digital.astype(np.float64)
        scratch += self.offset
        scratch *= self.bitvalue
        out[...] = scratch.reshape(out.shape)


@dataclass(frozen=True)
class Constant:
    """The 'scaling' of a signal whose header range is degenerate: every sample is ``value``."""

    value: float

    def apply(self, digital: np.ndarray, out: np.ndarray) -> None:
        out[...] = self.value


# ---- the header --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalHeader:
    index: int  # 0-based position in the header
    label: str
    transducer: str
    unit: str
    physical_min: float
    physical_max: float
    digital_min: int
    digital_max: int
    prefilter: str
    samples_per_record: int

    @property
    def degenerate(self) -> bool:
        """True when the header's ranges give no (finite, non-zero) digital -> physical conversion."""
        if self.physical_min == self.physical_max or self.digital_min == self.digital_max:
            return True
        bitvalue = (self.physical_max - self.physical_min) / (self.digital_max - self.digital_min)
        return not (math.isfinite(bitvalue) and bitvalue != 0 and math.isfinite(self.physical_max / bitvalue))

    def scaling(self) -> Scaling | Constant:
        if self.degenerate:
            return Constant(self.physical_min)
        return Scaling.from_header(self.physical_min, self.physical_max, self.digital_min, self.digital_max)


@dataclass(frozen=True)
class EdfHeader:
    """A parsed header, with the number of data records reconciled with the file size."""

    path: Path
    is_bdf: bool
    patient: str
    recording: str
    start_date: str  # the raw dd.mm.yy field
    start_time: str  # the raw hh.mm.ss field
    start: datetime | None  # from the fixed header (whole seconds); None when not a valid date/time
    header_bytes: int
    reserved: str
    declared_records: int  # as the header says (-1: unknown)
    n_records: int  # complete data records present and to be read
    record_duration: float  # seconds
    signals: tuple[SignalHeader, ...]
    file_size: int
    warnings: tuple[str, ...]
    raw_reasons: tuple[str, ...]  # why pyedflib cannot (or must not) read this file; empty: it may

    @property
    def bytes_per_sample(self) -> int:
        return 3 if self.is_bdf else 2

    @property
    def record_bytes(self) -> int:
        return sum(s.samples_per_record for s in self.signals) * self.bytes_per_sample

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(s.label for s in self.signals)

    @property
    def samples_per_record(self) -> tuple[int, ...]:
        return tuple(s.samples_per_record for s in self.signals)

    def byte_offset(self, index: int) -> int:
        """Offset of signal ``index`` inside a data record, in bytes."""
        return sum(s.samples_per_record for s in self.signals[:index]) * self.bytes_per_sample

    @property
    def is_plus(self) -> bool:
        return self.reserved.startswith(("EDF+", "BDF+"))

    @property
    def is_discontinuous(self) -> bool:
        return self.reserved.startswith(("EDF+D", "BDF+D"))

    @property
    def format(self) -> str:
        base = "BDF" if self.is_bdf else "EDF"
        if self.reserved.startswith(("EDF+C", "BDF+C")):
            return base + "+C"
        if self.is_discontinuous:
            return base + "+D"
        return base

    @property
    def annotation_signals(self) -> tuple[SignalHeader, ...]:
        """The EDF+ annotation signals (none in a plain EDF/BDF file: there a label is only a label)."""
        if not self.is_plus:
            return ()
        return tuple(s for s in self.signals if s.label in ANNOTATION_LABELS)

    @property
    def data_signals(self) -> tuple[SignalHeader, ...]:
        """Signals that become channels: not annotation signals, at least one sample per record."""
        annotations = {s.index for s in self.annotation_signals}
        return tuple(s for s in self.signals if s.index not in annotations and s.samples_per_record > 0)

    def rate(self, signal: SignalHeader) -> float:
        return signal.samples_per_record / self.record_duration if self.record_duration > 0 else 0.0


def _text(raw: bytes) -> str:
    """A header text field: UTF-8 when it is valid UTF-8 (some writers), else latin-1 (never fails)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\x00", " ")


def _number_text(raw: bytes) -> str:
    return _text(raw).strip()


def _int_value(path: Path, raw: bytes, what: str) -> int:
    text = _number_text(raw)
    if _INT.match(text):
        return int(text)
    value = _float_or_none(text)
    if value is not None and value.is_integer():  # "-2048.0", written by some vendors
        return int(value)
    raise ReaderError(path, f"not a valid EDF/BDF file: {what} is {text!r}, not a whole number", kind="corrupt")


def _float_or_none(text: str) -> float | None:
    text = text.replace(",", ".") if text.count(",") == 1 and "." not in text else text
    if not _FLOAT.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _float_value(path: Path, raw: bytes, what: str) -> float:
    text = _number_text(raw)
    value = _float_or_none(text)
    if value is None:
        raise ReaderError(path, f"not a valid EDF/BDF file: {what} is {text!r}, not a number", kind="corrupt")
    return value


def _parse_start(date_text: str, time_text: str, recording: str) -> datetime | None:
    d, t = _HEADER_DATE.match(date_text.strip()), _HEADER_TIME.match(time_text.strip())
    if not d or not t:
        return None
    day, month, yy = (int(g) for g in d.groups())
    year = 1900 + yy if yy >= 85 else 2000 + yy  # the EDF 'clipping date'
    parts = recording.split()
    if len(parts) >= 2 and parts[0] == "Startdate":  # EDF+: a four-digit year, when consistent
        full = parse_edfplus_date(parts[1])
        if full is not None and full.year % 100 == yy:
            year = full.year
    try:
        return datetime(year, month, day, *(int(g) for g in t.groups()))
    except ValueError:
        return None


def _printable(raw: bytes) -> bool:
    return all(32 <= b <= 126 for b in raw)


def read_header(path: Path) -> EdfHeader:
    """Parse and check the header of an EDF/BDF file. Raises :class:`ReaderError` naming the field."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fixed = fh.read(256)
            if len(fixed) == 0:
                raise ReaderError(path, "file is empty", kind="truncated")
            if not fixed.startswith((EDF_VERSION, BDF_VERSION)):
                raise ReaderError(path, "not an EDF or BDF file (no EDF/BDF version field at the start)",
                                  kind="not_edf")
            if len(fixed) < 256:
                raise ReaderError(path, f"truncated: only {len(fixed)} bytes, an EDF/BDF header needs 256",
                                  kind="truncated")
            n_signals = _int_value(path, fixed[252:256], "the number of signals")
            if not 0 <= n_signals <= MAX_SIGNALS:
                raise ReaderError(path, f"not a valid EDF/BDF file: the number of signals is {n_signals}",
                                  kind="corrupt")
            signal_header = fh.read(256 * n_signals)
    except OSError as exc:
        raise os_error(path, exc) from None

    if len(signal_header) < 256 * n_signals:
        raise ReaderError(path, f"truncated inside the header ({size} bytes, the header of {n_signals} "
                                f"signals needs {256 * (n_signals + 1)})", kind="truncated")
    header_bytes = _int_value(path, fixed[184:192], "the header size (number of bytes in header record)")
    if header_bytes != 256 * (n_signals + 1):
        raise ReaderError(path, f"not a valid EDF/BDF file: the header size field says {header_bytes} bytes, "
                                f"{n_signals} signals need {256 * (n_signals + 1)}", kind="corrupt")
    declared = _int_value(path, fixed[236:244], "the number of data records")
    if declared < -1:
        raise ReaderError(path, f"not a valid EDF/BDF file: the number of data records is {declared}",
                          kind="corrupt")
    duration = _float_value(path, fixed[244:252], "the duration of a data record")
    if duration < 0:
        raise ReaderError(path, f"not a valid EDF/BDF file: the duration of a data record is {duration} s",
                          kind="corrupt")

    warnings: list[str] = []
    raw_reasons: list[str] = []
    is_bdf = fixed.startswith(BDF_VERSION)
    if not _printable(fixed[8:]) or not _printable(signal_header):
        raw_reasons.append("non-ASCII bytes in the header")

    def column(field: int) -> list[bytes]:
        start = sum(w for _, w in _SIGNAL_FIELDS[:field]) * n_signals
        width = _SIGNAL_FIELDS[field][1]
        return [signal_header[start + i * width: start + (i + 1) * width] for i in range(n_signals)]

    cols = [column(f) for f in range(len(_SIGNAL_FIELDS))]
    signals: list[SignalHeader] = []
    for i in range(n_signals):
        label = _text(cols[0][i]).rstrip()

        def what(field: int, i: int = i, label: str = label) -> str:
            return f"the {_SIGNAL_FIELDS[field][0]} of signal {i + 1} ({label!r})"

        signals.append(SignalHeader(
            index=i,
            label=label,
            transducer=_text(cols[1][i]).strip(),
            unit=_text(cols[2][i]).strip(),
            physical_min=_float_value(path, cols[3][i], what(3)),
            physical_max=_float_value(path, cols[4][i], what(4)),
            digital_min=_int_value(path, cols[5][i], what(5)),
            digital_max=_int_value(path, cols[6][i], what(6)),
            prefilter=_text(cols[7][i]).strip(),
            samples_per_record=_int_value(path, cols[8][i], what(8)),
        ))
        s = signals[-1]
        for field, value in ((3, s.physical_min), (4, s.physical_max)):
            if abs(value) > _MAX_PHYSICAL:
                raise ReaderError(path, f"not a valid EDF/BDF file: {what(field)} is {value:g}, beyond what float32 "
                                        "samples can hold", kind="corrupt")
        if s.samples_per_record < 0:
            raise ReaderError(path, f"not a valid EDF/BDF file: {what(8)} is {s.samples_per_record}",
                              kind="corrupt")

    reserved = _text(fixed[192:236]).strip()
    is_plus = reserved.startswith(("EDF+", "BDF+"))
    for s in signals:
        if is_plus and s.label in ANNOTATION_LABELS:
            if s.samples_per_record == 0:
                raise ReaderError(path, f"not a valid EDF/BDF file: {s.label} signal {s.index + 1} has 0 samples "
                                        "per data record", kind="corrupt")
            continue
        if s.samples_per_record == 0:
            warnings.append(f"signal {s.index + 1} ({s.label!r}) has 0 samples per data record: skipped")
            raw_reasons.append("a signal without samples")
            continue
        if duration == 0:
            raise ReaderError(path, f"not a valid EDF/BDF file: the duration of a data record is 0 s but signal "
                                    f"{s.index + 1} ({s.label!r}) has samples", kind="corrupt")
        if s.samples_per_record / duration > MAX_RATE_HZ:
            raise ReaderError(path, f"not a valid EDF/BDF file: signal {s.index + 1} ({s.label!r}) would be "
                                    f"sampled at {s.samples_per_record / duration:.6g} Hz (number of samples "
                                    f"per data record / duration of a data record)", kind="corrupt")
        if s.degenerate:
            if s.physical_min == s.physical_max or s.digital_min == s.digital_max:
                which = "physical" if s.physical_min == s.physical_max else "digital"
                value = s.physical_min if which == "physical" else s.digital_min
                problem = f"{which} minimum equals {which} maximum ({value})"
            else:
                which, problem = "scaling", "physical and digital ranges give no finite scaling"
            warnings.append(f"signal {s.index + 1} ({s.label!r}): {problem}; read as a constant {s.physical_min}")
            raw_reasons.append(f"{which} minimum == maximum" if which != "scaling" else "no finite scaling")
        elif s.digital_max < s.digital_min:
            warnings.append(f"signal {s.index + 1} ({s.label!r}): digital maximum {s.digital_max} is below the "
                            f"digital minimum {s.digital_min}; the linear scaling is applied as written")
            raw_reasons.append("digital maximum < minimum")
    if n_signals == 0:
        raw_reasons.append("no signals")

    patient, recording = _text(fixed[8:88]).strip(), _text(fixed[88:168]).strip()
    start_date, start_time = _text(fixed[168:176]), _text(fixed[176:184])
    start = _parse_start(start_date, start_time, recording)
    if start is None:
        warnings.append(f"the start date/time fields ({start_date.strip()!r} {start_time.strip()!r}) are not a "
                        "valid date and time: start unknown")
        raw_reasons.append("invalid start date/time")

    bps = 3 if is_bdf else 2
    record_bytes = sum(s.samples_per_record for s in signals) * bps
    data_bytes = size - header_bytes
    if record_bytes == 0:
        if declared < 0:
            raise ReaderError(path, "not a valid EDF/BDF file: the number of data records is -1 and records "
                                    "hold no samples, so it cannot be derived from the file size", kind="corrupt")
        n_records = declared
    else:
        complete, partial = divmod(data_bytes, record_bytes)
        if declared < 0:
            n_records = complete
            warnings.append(f"the header gives -1 data records (recording not closed): {complete} complete "
                            "records read from the file size" + (
                                f", a partial last record ({partial} of {record_bytes} bytes) dropped"
                                if partial else ""))
            raw_reasons.append("number of data records is -1")
        elif complete >= declared:
            n_records = declared
            extra = data_bytes - declared * record_bytes
            if extra:
                warnings.append(f"{extra} bytes after the {declared} declared data records ignored")
        else:
            n_records = complete
            warnings.append(f"truncated: the header declares {declared} data records, the file holds {complete} "
                            "complete records" + (f" and a partial one ({partial} of {record_bytes} bytes, dropped)"
                                                  if partial else ""))
            raw_reasons.append("file shorter than the header says")
        if n_records == 0 and declared < 0:
            # A recording opened and never written to: say so rather than "truncated", which suggests
            # a copy that was cut short.
            raise ReaderError(
                path, f"0 data records: the header gives -1 (recording not closed) and the file holds no "
                      f"complete data record ({max(data_bytes, 0)} bytes after the header, {record_bytes} "
                      "per record)", kind="truncated")
        if n_records == 0 and declared != 0:
            raise ReaderError(
                path, f"truncated: the file has {size} bytes, not one complete data record "
                      f"({header_bytes} header + {record_bytes} bytes per record)", kind="truncated")
    if is_plus and reserved.startswith(("EDF+D", "BDF+D")):
        raw_reasons.append("discontinuous (EDF+D/BDF+D)")
    if not math.isfinite(n_records * duration):
        raise ReaderError(path, "not a valid EDF/BDF file: the duration of a data record is too large",
                          kind="corrupt")

    return EdfHeader(
        path=path, is_bdf=is_bdf, patient=patient, recording=recording, start_date=start_date,
        start_time=start_time, start=start, header_bytes=header_bytes, reserved=reserved,
        declared_records=declared, n_records=n_records, record_duration=duration, signals=tuple(signals),
        file_size=size, warnings=tuple(warnings), raw_reasons=tuple(dict.fromkeys(raw_reasons)),
    )


def require_data_records(header: EdfHeader) -> None:
    """Refuse a file whose header declares 0 data records: it holds no sample (and no annotation).

    :func:`read_header` accepts it (its layout is valid, and the header alone is useful, e.g. for its
    start date); a reader must not, or a 0-second recording reaches preprocessing and fails there with
    an internal error instead of this reason.
    """
    if header.n_records == 0:
        raise ReaderError(header.path, "0 data records in the header: the recording holds no samples",
                          kind="truncated")


# ---- EDF+ patient and recording fields ---------------------------------------------------------------------


def parse_edfplus_date(text: str) -> date | None:
    m = _EDFPLUS_DATE.match(text)
    if not m or m.group(2).upper() not in _MONTHS:
        return None
    try:
        return date(int(m.group(3)), _MONTHS[m.group(2).upper()], int(m.group(1)))
    except ValueError:
        return None


def patient_fields(patient: str) -> tuple[Identifiers, Demographics]:
    """EDF+ 'local patient identification': ``code sex birthdate name [additional...]``.

    Many plain-EDF writers (Sleep-EDF, for one) use the same layout, so it is recognised whenever the
    sex and birth-date subfields look right, or the birth-date subfield is a valid ``dd-MMM-yyyy`` date
    after a one-word sex subfield (a sex code other than M/F/X, such as ``U``, is then unknown, and flagged
    so that :mod:`gateway.identifier_limits` warns). Otherwise the whole field is kept as the patient id.
    """
    parts = patient.split()
    sex_code = parts[1].upper() if len(parts) >= 3 else ""
    birth = parse_edfplus_date(parts[2]) if len(parts) >= 3 else None
    # A real date after a one-word sex subfield is layout enough: without this, "MRN U 02-MAY-1951 Name"
    # became one patient id holding the name and birth date. ("Subject 3 01-JAN-2000" stays free text.)
    worded = sex_code.isalpha() and len(sex_code) <= 7
    if len(parts) >= 3 and ((birth is not None and worded)
                            or (sex_code in ("M", "F", "X") and parts[2].upper() == "X")):
        code = parts[0] if parts[0].upper() != "X" else None
        sex = sex_code if sex_code in ("M", "F") else None
        name = parts[3] if len(parts) > 3 and parts[3].upper() != "X" else None
        return (Identifiers(patient_id=code, patient_name=name),
                Demographics(sex=sex, birth_date=birth, sex_unrecognised=sex_code not in ("M", "F", "X")))
    return Identifiers(patient_id=patient or None), Demographics()


def admin_code(recording: str) -> str | None:
    """EDF+ 'local recording identification': ``Startdate dd-MMM-yyyy admincode technician equipment``."""
    parts = recording.split()
    if len(parts) >= 3 and parts[0] == "Startdate" and parts[2].upper() != "X":
        return parts[2]
    return None


def technician(recording: str) -> str | None:
    """The technician subfield of an EDF+ 'local recording identification' (``Startdate dd-MMM-yyyy admincode
    technician equipment``): who recorded or scored the night. None when the field is not in that layout
    or the subfield is ``X`` (unknown). The EDF+ convention writes a name's spaces as ``_``: they are
    given back as spaces (``J_Smith`` -> ``J Smith``), so the same person matches a sidecar's ``scorer``."""
    parts = recording.split()
    if len(parts) >= 4 and parts[0] == "Startdate" and parts[3].upper() != "X":
        name = " ".join(parts[3].replace("_", " ").split())
        return name or None
    return None


def start_plus(start: datetime | None, seconds: float) -> datetime | None:
    """``start`` moved by ``seconds`` (the first data record's time-stamp), or None when out of range."""
    if start is None:
        return None
    try:
        return start + timedelta(seconds=seconds)
    except OverflowError:
        return None


# ---- EDF+ time-stamped annotation lists ---------------------------------------------------------------------


class Tal(NamedTuple):
    """One time-stamped annotation list: onset (s from the file start), duration (None: not given), texts."""

    onset: float
    duration: float | None
    texts: tuple[str, ...]


_TAL_ONSET = re.compile(rb"^[+-]?\d+(\.\d*)?$")
_TAL_DURATION = re.compile(rb"^\d+(\.\d*)?$")


def _tal_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()


def parse_tals(data: bytes) -> tuple[list[Tal], int]:
    """The TALs in the bytes of one annotation signal of one data record, and how many were malformed.

    A TAL is ``+onset[\\x15duration]\\x14[text\\x14]...\\x00``; unused bytes at the end are NULs. A malformed
    TAL (no onset, an onset or duration that is not a number) is skipped and counted. Texts are UTF-8 (as
    EDF+ specifies), latin-1 when they are not valid UTF-8.
    """
    tals: list[Tal] = []
    bad = 0
    for chunk in data.split(b"\x00"):
        if not chunk:
            continue
        parts = chunk.split(b"\x14")
        if len(parts) < 2:
            bad += 1
            continue
        stamp, *rest = parts
        onset_raw, _, duration_raw = stamp.partition(b"\x15")
        if not _TAL_ONSET.match(onset_raw) or (duration_raw and not _TAL_DURATION.match(duration_raw)):
            bad += 1
            continue
        onset = float(onset_raw)
        duration = float(duration_raw) if duration_raw else None
        if not math.isfinite(onset) or (duration is not None and not math.isfinite(duration)):
            bad += 1
            continue
        if rest and rest[-1] == b"":
            rest = rest[:-1]
        tals.append(Tal(onset, duration, tuple(_tal_text(t) for t in rest)))
    return tals, bad
