"""EDF, EDF+C, BDF and BDF+C recordings as a :class:`~gateway.recording.Recording`.

pyedflib is the authority on the header: it validates the file, gives labels, rates, units, gains and
the start time, and reads EDF+ annotations. Samples are read differently: pyedflib reads a signal one
data record at a time (about as slow in digital mode as in float64 mode: ~4 s for an 8-hour,
18-channel night), so :meth:`Channel.read` maps the data records into memory and gathers one signal
with numpy, converting digital values to physical float32 with the header's gain and offset in
fixed-size blocks. The output equals pyedflib's physical ``readSignal`` cast to float32 (same formula,
float64 arithmetic). ``read_edf(path, sample_reader="pyedflib")`` reads through pyedflib instead
(digital, in blocks), and the numpy path falls back to it by itself whenever the raw header layout does
not agree with what pyedflib reports.

EDF+D/BDF+D (discontinuous) files are refused with a :class:`ReaderError` for now.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyedflib

from ..recording import Annotation, Channel, Demographics, Identifiers, Recording
from .errors import ReaderError

__all__ = ["ReaderError", "read_edf"]

_EDF_VERSION = b"0       "
_BDF_VERSION = b"\xffBIOSEMI"
_ANNOTATION_LABELS = {"EDF Annotations", "BDF Annotations"}
_BLOCK_SAMPLES = 1 << 20  # samples converted per step (8 MB of float64 scratch)
_BLOCK_BYTES = 8 << 20  # bytes of data records mapped in per step
_MONTHS = {m: i for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), start=1)}
_EDFPLUS_DATE = re.compile(r"^(\d{2})-([A-Za-z]{3})-(\d{4})$")


@dataclass(frozen=True)
class _RawHeader:
    """The parts of the raw header that pyedflib does not expose, or exposes only for EDF+."""

    is_bdf: bool
    patient: str
    recording: str
    header_bytes: int
    reserved: str
    n_records: int
    labels: tuple[str, ...]
    samples_per_record: tuple[int, ...]

    @property
    def bytes_per_sample(self) -> int:
        return 3 if self.is_bdf else 2

    @property
    def record_bytes(self) -> int:
        return sum(self.samples_per_record) * self.bytes_per_sample

    @property
    def is_plus(self) -> bool:
        return self.reserved.startswith(("EDF+", "BDF+"))

    @property
    def format(self) -> str:
        base = "BDF" if self.is_bdf else "EDF"
        if self.reserved.startswith(("EDF+C", "BDF+C")):
            return base + "+C"
        if self.reserved.startswith(("EDF+D", "BDF+D")):
            return base + "+D"
        return base


@dataclass(frozen=True)
class _FileStamp:
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileStamp:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class _Scaling:
    """edflib's digital -> physical conversion: physical = bitvalue * (offset + digital)."""

    bitvalue: float
    offset: float

    @classmethod
    def from_header(cls, pmin: float, pmax: float, dmin: int, dmax: int) -> _Scaling:
        bitvalue = (pmax - pmin) / (dmax - dmin)
        return cls(bitvalue, pmax / bitvalue - dmax)

    def apply(self, digital: np.ndarray, out: np.ndarray) -> None:
        scratch = digital.astype(np.float64)
        scratch += self.offset
        scratch *= self.bitvalue
        out[...] = scratch.reshape(out.shape)


# ---- sample sources ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NumpySource:
    """Reads one signal by mapping the data records and gathering its slice of each record."""

    path: Path
    stamp: _FileStamp
    header_bytes: int
    n_records: int
    record_bytes: int
    byte_offset: int  # of this signal inside a data record
    samples_per_record: int
    is_bdf: bool
    scaling: _Scaling

    def __call__(self) -> np.ndarray:
        _check_unchanged(self.path, self.stamp)
        spr = self.samples_per_record
        out = np.empty(self.n_records * spr, dtype=np.float32)
        if out.size == 0:
            return out
        try:
            with open(self.path, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                try:
                    self._gather(mapped, out)
                finally:
                    try:
                        mapped.close()
                    except BufferError:  # a view is still referenced (only after an error): GC closes it
                        pass
        except OSError as exc:
            raise ReaderError(self.path, f"cannot read samples: {exc.strerror or exc}", kind="unreadable") from exc
        return out

    def _gather(self, mapped: mmap.mmap, out: np.ndarray) -> None:
        spr, bps = self.samples_per_record, 3 if self.is_bdf else 2
        records = np.frombuffer(mapped, dtype=np.uint8, count=self.n_records * self.record_bytes,
                                offset=self.header_bytes).reshape(self.n_records, self.record_bytes)
        lo = self.byte_offset
        step = max(1, min(_BLOCK_SAMPLES // spr, _BLOCK_BYTES // max(self.record_bytes, 1)))
        for first in range(0, self.n_records, step):
            last = min(self.n_records, first + step)
            raw = np.ascontiguousarray(records[first:last, lo:lo + spr * bps])
            if self.is_bdf:
                b = raw.reshape(last - first, spr, 3)
                digital = (b[..., 0].astype(np.int32) | (b[..., 1].astype(np.int32) << 8)
                           | (b[..., 2].view(np.int8).astype(np.int32) << 16))
            else:
                digital = raw.view("<i2")
            self.scaling.apply(digital, out[first * spr:last * spr].reshape(last - first, spr))
            del raw, digital
            _release(mapped, self.header_bytes + first * self.record_bytes,
                     self.header_bytes + last * self.record_bytes)
        del records


_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _release(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop already-gathered pages from this process's mapping (they stay in the page cache), so that
    reading a channel does not inflate the resident set by the size of the file."""
    if _DONTNEED is None:
        return
    start -= start % mmap.PAGESIZE
    try:
        mapped.madvise(_DONTNEED, start, end - start)
    except (OSError, ValueError):
        pass


@dataclass(frozen=True)
class _PyedflibSource:
    """Reads one signal through pyedflib in digital mode, block by block (slower; the fallback)."""

    path: Path
    stamp: _FileStamp
    index: int
    n_samples: int
    scaling: _Scaling

    def __call__(self) -> np.ndarray:
        _check_unchanged(self.path, self.stamp)
        out = np.empty(self.n_samples, dtype=np.float32)
        reader = _open_pyedflib(self.path, annotations=False)
        try:
            buf = np.empty(min(_BLOCK_SAMPLES, max(self.n_samples, 1)), dtype=np.int32)
            for start in range(0, self.n_samples, buf.size):
                n = min(buf.size, self.n_samples - start)
                reader.read_digital_signal(self.index, start, n, buf[:n])
                self.scaling.apply(buf[:n], out[start:start + n])
        finally:
            reader.close()
        return out


def _check_unchanged(path: Path, stamp: _FileStamp) -> None:
    try:
        now = _FileStamp.of(path)
    except FileNotFoundError as exc:
        raise ReaderError(path, "file has gone since it was decoded", kind="not_found") from exc
    except OSError as exc:
        raise ReaderError(path, f"cannot stat file: {exc.strerror or exc}", kind="unreadable") from exc
    if now != stamp:
        raise ReaderError(path, "file changed since it was decoded (size or modification time differ)",
                          kind="corrupt")


# ---- header ------------------------------------------------------------------------------------------------


def _ascii(raw: bytes) -> str:
    return raw.decode("latin-1")


def _int_field(path: Path, raw: bytes, what: str) -> int:
    text = _ascii(raw).strip()
    try:
        return int(text)
    except ValueError:
        raise ReaderError(path, f"not a valid EDF/BDF file: {what} is {text!r}, not a number",
                          kind="corrupt") from None


def _read_raw_header(path: Path) -> _RawHeader:
    try:
        if path.is_dir():
            raise ReaderError(path, "is a directory, not an EDF/BDF file", kind="not_edf")
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fixed = fh.read(256)
            if len(fixed) == 0:
                raise ReaderError(path, "file is empty", kind="truncated")
            if not fixed.startswith((_EDF_VERSION, _BDF_VERSION)):
                raise ReaderError(path, "not an EDF or BDF file (no EDF/BDF version field at the start)",
                                  kind="not_edf")
            if len(fixed) < 256:
                raise ReaderError(path, f"truncated: only {len(fixed)} bytes, an EDF/BDF header needs 256",
                                  kind="truncated")
            n_signals = _int_field(path, fixed[252:256], "the number of signals")
            if not 0 <= n_signals <= 4096:
                raise ReaderError(path, f"not a valid EDF/BDF file: {n_signals} signals", kind="corrupt")
            signal_header = fh.read(256 * n_signals)
    except FileNotFoundError:
        raise ReaderError(path, "file not found", kind="not_found") from None
    except PermissionError:
        raise ReaderError(path, "permission denied", kind="unreadable") from None
    except OSError as exc:
        raise ReaderError(path, f"cannot read file: {exc.strerror or exc}", kind="unreadable") from None

    if len(signal_header) < 256 * n_signals:
        raise ReaderError(path, f"truncated inside the header ({size} bytes, the header of {n_signals} "
                                f"signals needs {256 * (n_signals + 1)})", kind="truncated")
    header_bytes = _int_field(path, fixed[184:192], "the header size")
    n_records = _int_field(path, fixed[236:244], "the number of data records")

    def column(start: int, width: int) -> list[bytes]:
        base = start * n_signals  # each field is stored for all signals before the next field
        return [signal_header[base + i * width: base + (i + 1) * width] for i in range(n_signals)]

    labels = tuple(_ascii(b).strip() for b in column(0, 16))
    # offsets (in units of n_signals bytes): label 16, transducer 80, dimension 8, pmin/pmax/dmin/dmax 8 each,
    # prefilter 80 -> samples per record start at 216 * n_signals
    spr = tuple(_int_field(path, b, f"the samples per record of signal {i + 1}")
                for i, b in enumerate(column(216, 8)))
    header = _RawHeader(
        is_bdf=fixed.startswith(_BDF_VERSION),
        patient=_ascii(fixed[8:88]).strip(),
        recording=_ascii(fixed[88:168]).strip(),
        header_bytes=header_bytes,
        reserved=_ascii(fixed[192:236]).strip(),
        n_records=n_records,
        labels=labels,
        samples_per_record=spr,
    )
    if header.format.endswith("+D"):
        raise ReaderError(path, f"{header.format} (discontinuous) recordings are not supported yet",
                          kind="unsupported")
    if header_bytes != 256 * (n_signals + 1):
        raise ReaderError(path, f"not a valid EDF/BDF file: header size field says {header_bytes} bytes, "
                                f"{n_signals} signals need {256 * (n_signals + 1)}", kind="corrupt")
    if n_records >= 0 and any(s < 0 for s in spr):
        raise ReaderError(path, "not a valid EDF/BDF file: negative samples per record", kind="corrupt")
    if n_records >= 0:
        expected = header_bytes + n_records * header.record_bytes
        if size < expected:
            complete = (size - header_bytes) // header.record_bytes if header.record_bytes else 0
            raise ReaderError(
                path,
                f"truncated: the header declares {n_records} data records ({expected} bytes) but the file "
                f"has {size} bytes ({max(complete, 0)} complete records)",
                kind="truncated",
            )
    return header


def _open_pyedflib(path: Path, annotations: bool) -> pyedflib.EdfReader:
    mode = pyedflib.READ_ALL_ANNOTATIONS if annotations else pyedflib.DO_NOT_READ_ANNOTATIONS
    try:
        return pyedflib.EdfReader(str(path), mode)
    except FileNotFoundError:
        raise ReaderError(path, "file not found", kind="not_found") from None
    except OSError as exc:
        message = str(exc).removeprefix(f"{path}: ")
        if "already been opened" in message:  # edflib allows one open reader per file and process
            raise ReaderError(path, "file is already open through pyedflib elsewhere in this process",
                              kind="unreadable") from None
        kind = "unsupported" if "discontinuous" in message else "corrupt"
        raise ReaderError(path, f"not a valid EDF/BDF file: {message}", kind=kind) from None


def _parse_edfplus_date(text: str) -> date | None:
    m = _EDFPLUS_DATE.match(text)
    if not m or m.group(2).upper() not in _MONTHS:
        return None
    try:
        return date(int(m.group(3)), _MONTHS[m.group(2).upper()], int(m.group(1)))
    except ValueError:
        return None


def _patient_fields(patient: str) -> tuple[Identifiers, Demographics]:
    """EDF+ 'local patient identification': ``code sex birthdate name [additional...]``.

    Many plain-EDF writers (Sleep-EDF, for one) use the same layout, so it is recognised whenever the
    sex and birth-date subfields look right. Otherwise the whole field is kept as the patient id.
    """
    parts = patient.split()
    if (len(parts) >= 3 and parts[1].upper() in ("M", "F", "X")
            and (parts[2].upper() == "X" or _parse_edfplus_date(parts[2]) is not None)):
        code = parts[0] if parts[0].upper() != "X" else None
        sex = parts[1].upper() if parts[1].upper() in ("M", "F") else None
        birth = _parse_edfplus_date(parts[2])
        name = parts[3] if len(parts) > 3 and parts[3].upper() != "X" else None
        return Identifiers(patient_id=code, patient_name=name), Demographics(sex=sex, birth_date=birth)
    return Identifiers(patient_id=patient or None), Demographics()


def _admin_code(recording: str) -> str | None:
    """EDF+ 'local recording identification': ``Startdate dd-MMM-yyyy admincode technician equipment``."""
    parts = recording.split()
    if len(parts) >= 3 and parts[0] == "Startdate" and parts[2].upper() != "X":
        return parts[2]
    return None


# ---- the reader --------------------------------------------------------------------------------------------


def read_edf(path: str | Path, *, sample_reader: Literal["numpy", "pyedflib"] = "numpy") -> Recording:
    """Decode the header and annotations of an EDF/EDF+C/BDF/BDF+C file into a :class:`Recording`.

    Samples are not read here: each channel's :meth:`~gateway.recording.Channel.read` reads them from the
    file when called. Annotation signals are not channels. Raises :class:`ReaderError` (naming the file
    and the problem) for a missing, unreadable, truncated, corrupt or unsupported file.
    """
    path = Path(path)
    if sample_reader not in ("numpy", "pyedflib"):
        raise ValueError(f"sample_reader must be 'numpy' or 'pyedflib', got {sample_reader!r}")
    raw = _read_raw_header(path)
    stamp = _FileStamp.of(path)
    reader = _open_pyedflib(path, annotations=True)
    try:
        recording = _build(path, raw, stamp, reader, sample_reader)
    except ReaderError:
        raise
    except (OSError, ValueError, IndexError) as exc:  # pyedflib getters on a malformed header
        raise ReaderError(path, f"cannot decode the header: {exc}", kind="corrupt") from None
    finally:
        reader.close()
    return recording


def _build(path: Path, raw: _RawHeader, stamp: _FileStamp, reader: pyedflib.EdfReader,
           sample_reader: str) -> Recording:
    n = reader.signals_in_file
    data_signals = [i for i, label in enumerate(raw.labels)
                    if not (raw.is_plus and label in _ANNOTATION_LABELS)]
    offsets = np.concatenate([[0], np.cumsum(raw.samples_per_record)]) * raw.bytes_per_sample
    n_records = reader.datarecords_in_file
    layout_ok = (
        sample_reader == "numpy"
        and len(data_signals) == n
        and n_records == raw.n_records
        and all(reader.samples_in_datarecord(i) == raw.samples_per_record[j] for i, j in enumerate(data_signals))
    )

    channels: list[Channel] = []
    for i in range(n):
        dmin, dmax = reader.getDigitalMinimum(i), reader.getDigitalMaximum(i)
        pmin, pmax = reader.getPhysicalMinimum(i), reader.getPhysicalMaximum(i)
        label = reader.getLabel(i).rstrip()
        if dmax <= dmin or pmax == pmin:
            raise ReaderError(path, f"signal {i + 1} ({label!r}): digital range {dmin}..{dmax} / physical range "
                                    f"{pmin}..{pmax} cannot be converted", kind="corrupt")
        scaling = _Scaling.from_header(pmin, pmax, dmin, dmax)
        n_samples = int(reader.samples_in_file(i))
        source: _NumpySource | _PyedflibSource
        if layout_ok:
            j = data_signals[i]
            source = _NumpySource(path, stamp, raw.header_bytes, raw.n_records, raw.record_bytes,
                                  int(offsets[j]), raw.samples_per_record[j], raw.is_bdf, scaling)
        else:
            source = _PyedflibSource(path, stamp, i, n_samples, scaling)
        channels.append(Channel(
            label=label,
            sampling_rate=float(reader.getSampleFrequency(i)),
            unit=reader.getPhysicalDimension(i).strip(),
            n_samples=n_samples,
            _source=source,
            prefilter=reader.getPrefilter(i).strip(),
            transducer=reader.getTransducer(i).strip(),
        ))

    identifiers, demographics = _patient_fields(raw.patient)
    identifiers.admin_code = _admin_code(raw.recording)
    identifiers.source_path = path
    try:
        start: datetime | None = reader.getStartdatetime()
    except (ValueError, OverflowError):
        start = None

    annotations: list[Annotation] = []
    if raw.is_plus:
        onsets, durations, texts = reader.readAnnotations()
        for onset, duration, text in zip(onsets, durations, texts, strict=True):
            d = float(duration)
            annotations.append(Annotation(float(onset), d if d >= 0 else None, str(text)))

    return Recording(
        channels=channels,
        duration_s=float(reader.getFileDuration()),
        start=start,
        identifiers=identifiers,
        demographics=demographics,
        annotations=annotations,
        format=raw.format,
    )

