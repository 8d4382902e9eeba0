"""EDF, EDF+C, EDF+D, BDF, BDF+C and BDF+D recordings as a :class:`~gateway.recording.Recording`.

:func:`read_edf` first parses the raw header itself (:mod:`.edf_header`: every field, checked, with
errors that name the file and the field). Then:

* a well-formed continuous file goes through pyedflib, the authority on such files: it validates the
  file and gives labels, rates, units, gains, the start time and the EDF+ annotations;
* a file pyedflib cannot read goes through the raw reader (:mod:`.edf_discontinuous`): EDF+D/BDF+D
  (discontinuous; records placed at their time-stamps, gaps zero-filled and marked invalid), and the
  field quirks edflib refuses: non-ASCII header bytes, physical or digital min == max (read as a
  constant), ``-1`` data records, a file shorter than its header says (the partial last record is
  dropped), a signal with 0 samples per record (skipped), a start date that is not a date (start
  unknown). A continuous file that pyedflib refuses for another reason is tried with the raw reader
  too, and fails there with the raw reader's error if it is really broken.

Either way, samples are read the same way: pyedflib reads a signal one data record at a time (about as
slow in digital mode as in float64 mode: ~4 s for an 8-hour, 18-channel night), so :meth:`Channel.read`
maps the data records into memory and gathers one signal with numpy, converting digital values to
physical float32 with the header's gain and offset in fixed-size blocks. The output equals pyedflib's
physical ``readSignal`` cast to float32 (same formula, float64 arithmetic). ``read_edf(path,
sample_reader="pyedflib")`` reads through pyedflib instead (digital, in blocks; files on the pyedflib
path only), and the numpy path falls back to it by itself whenever the raw header layout does not agree
with what pyedflib reports.

Field quirks and how they are read
    ============================================  ==================================================
    labels with trailing spaces / NUL padding      stripped at the end; leading text kept as recorded
    vendor prefixes (``"EEG C3-A2"``)              kept as recorded (matching is the montage's job)
    non-ASCII bytes in any text field              UTF-8 if valid, else latin-1; raw reader
    duplicate labels                               both channels kept, in header order
    physical min == max / digital min == max       constant channel (physical minimum), warning
    digital max < digital min                      the linear scaling as written, warning
    a truncated last data record                   complete records read, partial dropped, warning
    ``-1`` data records                            derived from the file size, warning
    file longer than the declared records          trailing bytes ignored, warning
    file shorter than the declared records         complete records read, warning
    0 data records (or ``-1`` and no record)       ReaderError ("0 data records ...")
    rates from 1 Hz to 512 Hz (up to 1 MHz)        each channel at its own rate
    annotation-only files (no signal channel)      no channels, annotations only
    ============================================  ==================================================

Warnings (what was dropped or guessed) go to ``Recording.warnings`` (and to the ``warnings`` list
passed to :func:`read_edf`, if any). They never hold identifiers or the path.
"""

from __future__ import annotations

import dataclasses
import warnings as _pywarnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pyedflib

from ..recording import Annotation, Channel, Recording, checked_range
from .edf_discontinuous import RecordSource, build_raw_recording
from .edf_header import (
    EdfHeader,
    FileStamp,
    Scaling,
    admin_code,
    check_unchanged,
    patient_fields,
    read_header,
    require_data_records,
    technician,
)
from .errors import ReaderError, os_error

__all__ = ["ReaderError", "read_edf"]

_BLOCK_SAMPLES = 1 << 20  # samples converted per step (8 MB of float64 scratch)


@dataclasses.dataclass(frozen=True)
class _PyedflibSource:
    """Reads one signal through pyedflib in digital mode, block by block (slower; the fallback)."""

    path: Path
    stamp: FileStamp
    index: int
    n_samples: int
    scaling: Scaling

    def __call__(self) -> np.ndarray:
        check_unchanged(self.path, self.stamp)
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


# ---- the reader --------------------------------------------------------------------------------------------


def read_edf(path: str | Path, *, sample_reader: Literal["numpy", "pyedflib"] = "numpy",
             warnings: list[str] | None = None) -> Recording:
    """Decode the header and annotations of an EDF/EDF+/BDF/BDF+ file (continuous or not) into a :class:`Recording`.

    Samples are not read here: each channel's :meth:`~gateway.recording.Channel.read` reads them from the
    file when called. Annotation signals are not channels. Raises :class:`ReaderError` (naming the file
    and the problem) for a missing, unreadable, truncated, corrupt or unsupported file, and nothing
    else for any content of the file. What was read with a compromise (a dropped partial record, a
    constant channel, gaps...) is appended to ``warnings`` when a list is given.
    """
    path = Path(path)
    if sample_reader not in ("numpy", "pyedflib"):
        raise ValueError(f"sample_reader must be 'numpy' or 'pyedflib', got {sample_reader!r}")
    header = read_header(path)
    require_data_records(header)
    try:
        stamp = FileStamp.of(path)
    except OSError as exc:
        raise os_error(path, exc, "cannot stat the file") from None
    notes = list(header.warnings)
    recording: Recording | None = None
    if not header.raw_reasons:
        try:
            reader = _open_pyedflib(path, annotations=True)
        except ReaderError as exc:
            if exc.kind in ("not_found", "unreadable"):
                raise
            reason = exc.reason.replace(str(path), "<file>").replace(path.name, "<file>")  # no path in warnings
            notes.append(f"pyedflib refused the file ({reason}); read by the raw EDF parser")
        else:
            try:
                recording = _build(path, header, stamp, reader, sample_reader)
            except ReaderError:
                raise
            except (OSError, ValueError, IndexError) as exc:  # pyedflib getters on a malformed header
                raise ReaderError(path, f"cannot decode the header: {exc}", kind="corrupt") from None
            finally:
                reader.close()
    if recording is None:
        recording = build_raw_recording(header, stamp, notes)
    recording.warnings.extend(notes)
    if warnings is not None:
        warnings.extend(notes)
    return recording


def _start(reader: pyedflib.EdfReader) -> datetime | None:
    try:
        start: datetime = reader.getStartdatetime()
    except (ValueError, OverflowError):
        return None
    # edflib keeps the sub-second start (EDF+ first time-stamp) in units of 100 ns; pyedflib 0.1.42
    # converts it to microseconds dividing by 100 instead of 10.
    subsecond = int(getattr(reader, "starttime_subsecond", 0) or 0)
    return start.replace(microsecond=0) + timedelta(microseconds=round(subsecond / 10))


def _build(path: Path, raw: EdfHeader, stamp: FileStamp, reader: pyedflib.EdfReader,
           sample_reader: str) -> Recording:
    n = reader.signals_in_file
    data_signals = list(raw.data_signals)
    n_records = reader.datarecords_in_file
    layout_ok = (
        sample_reader == "numpy"
        and len(data_signals) == n
        and n_records == raw.n_records
        and all(reader.samples_in_datarecord(i) == s.samples_per_record for i, s in enumerate(data_signals))
    )

    channels: list[Channel] = []
    for i in range(n):
        dmin, dmax = reader.getDigitalMinimum(i), reader.getDigitalMaximum(i)
        pmin, pmax = reader.getPhysicalMinimum(i), reader.getPhysicalMaximum(i)
        label = reader.getLabel(i).rstrip()
        if dmax <= dmin or pmax == pmin:
            raise ReaderError(path, f"signal {i + 1} ({label!r}): digital range {dmin}..{dmax} / physical range "
                                    f"{pmin}..{pmax} cannot be converted", kind="corrupt")
        scaling = Scaling.from_header(pmin, pmax, dmin, dmax)
        n_samples = int(reader.samples_in_file(i))
        source: RecordSource | _PyedflibSource
        if layout_ok:
            s = data_signals[i]
            source = RecordSource(path, stamp, raw.header_bytes, raw.n_records, raw.record_bytes,
                                  raw.byte_offset(s.index), s.samples_per_record, raw.is_bdf, scaling)
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
            physical_range=checked_range((pmin, pmax)),  # the digital limits, in physical units
        ))

    identifiers, demographics = patient_fields(raw.patient)
    identifiers.admin_code = admin_code(raw.recording)
    identifiers.scorer = technician(raw.recording)
    identifiers.source_path = path

    annotations: list[Annotation] = []
    if raw.is_plus:
        with _pywarnings.catch_warnings():  # pyedflib warns when a text is not UTF-8; latin-1 is fine
            _pywarnings.simplefilter("ignore", UserWarning)
            onsets, durations, texts = reader.readAnnotations()
        for onset, duration, text in zip(onsets, durations, texts, strict=True):
            d = float(duration)
            annotations.append(Annotation(float(onset), d if d >= 0 else None, str(text)))

    return Recording(
        channels=channels,
        duration_s=float(reader.getFileDuration()),
        start=_start(reader),
        identifiers=identifiers,
        demographics=demographics,
        annotations=annotations,
        format=raw.format,
    )
