"""EDF+D / BDF+D (discontinuous) recordings, and any EDF/BDF file that pyedflib refuses, read without pyedflib.

pyedflib (edflib) refuses discontinuous files and files with common field quirks (non-ASCII header
bytes, physical or digital min == max, ``-1`` data records, a truncated last record). This module reads
them from the raw header (:mod:`.edf_header`) and the data records themselves; :func:`gateway.readers.edf.read_edf`
sends a file here when the raw header shows it must, or when pyedflib refuses it.

Timeline of a discontinuous file
    Every data record of an EDF+D/BDF+D file carries its onset in the first TAL of its first annotation
    signal (``+<seconds>\\x14\\x14\\x00``, seconds after the header's start date/time). Records are sorted by
    onset and placed at their onset on one continuous timeline that starts at the first record
    (``Recording.start`` = header start + that record's onset; annotation onsets are relative to it).
    The recording lasts from the first record's onset to the end of the last record. A record that
    begins before the previous one ends (by more than half a sample of the fastest signal) is an
    overlap: a :class:`ReaderError` naming the file and both record numbers (1-based, file order).
    Sub-sample jitter between time-stamps and the sample grid is absorbed (a record starts at the
    nearest sample, never inside the previous record).

Gaps
    Samples between records are **filled with 0 and marked invalid**: such channels have a validity
    source, so :meth:`Channel.read_valid` is False there (``Channel.has_gaps`` is True). The
    preprocessing keeps the timeline: gap samples are left out of the channel's z-score and set to 0 in
    the 128 Hz signal (the channel mean after z-scoring), so 5-s tokens over a gap carry a flat, neutral
    signal at their clock time (see :mod:`inference.gaps`).

Streaming
    :meth:`Channel.read` maps the data records into memory and gathers one signal, block by block, into
    its place on the timeline; no channel is held between reads, and channels are never read together.

Annotations
    All TALs of all annotation signals become :class:`~gateway.recording.Annotation` s (the records'
    time-keeping entries excepted), onset relative to the first record, in file order (as pyedflib
    gives them). Texts are
    UTF-8 (latin-1 if not). Malformed TALs are skipped with a warning.

Limits: a discontinuous timeline longer than 7 days, or above 2**31 samples per channel, is refused
(a corrupt time-stamp, not a recording).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..recording import Annotation, Channel, Recording, checked_range
from .edf_header import (
    Constant,
    EdfHeader,
    FileStamp,
    Scaling,
    admin_code,
    check_unchanged,
    parse_tals,
    patient_fields,
    read_header,
    require_data_records,
    start_plus,
    technician,
)
from .errors import ReaderError, os_error

__all__ = ["MAX_TIMELINE_S", "Placement", "RecordSource", "build_raw_recording", "read_raw_edf"]

MAX_TIMELINE_S = 7 * 24 * 3600.0
_MAX_SAMPLES = 2**31 - 1
_BLOCK_SAMPLES = 1 << 20  # samples converted per step (8 MB of float64 scratch)
_BLOCK_BYTES = 8 << 20  # bytes of data records mapped in per step
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


# ---- where each data record goes ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Placement:
    """Onsets of the data records (file order, seconds after the first record's onset) on the timeline."""

    onsets_s: np.ndarray = field(repr=False)
    record_duration: float

    def starts(self, spr: int) -> np.ndarray:
        """First sample index of each data record (file order) for a signal with ``spr`` samples per record."""
        n = self.onsets_s.size
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        rate = spr / self.record_duration
        pos = np.rint(self.onsets_s * rate).astype(np.int64)
        order = np.argsort(self.onsets_s, kind="stable")
        step = np.arange(n, dtype=np.int64) * spr
        # never start inside the previous record (sub-sample jitter of the time-stamps)
        pos[order] = np.maximum.accumulate(pos[order] - step) + step
        return pos

    def n_samples(self, spr: int) -> int:
        starts = self.starts(spr)
        return int(starts.max()) + spr if starts.size else 0

    def has_gaps(self, spr: int) -> bool:
        return self.n_samples(spr) != self.onsets_s.size * spr


@dataclass(frozen=True, eq=False)
class _Validity:
    """True where a data record put a sample, False in the gaps between records."""

    placement: Placement
    spr: int

    def __call__(self) -> np.ndarray:
        starts = self.placement.starts(self.spr)
        n = self.placement.n_samples(self.spr)
        edges = np.zeros(n + 1, dtype=np.int32)
        np.add.at(edges, starts, 1)
        np.add.at(edges, starts + self.spr, -1)
        return np.cumsum(edges[:-1]) > 0


# ---- samples -----------------------------------------------------------------------------------------------


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


def _digital(raw: np.ndarray, is_bdf: bool, n_rec: int, spr: int) -> np.ndarray:
    if is_bdf:
        b = raw.reshape(n_rec, spr, 3)
        return (b[..., 0].astype(np.int32) | (b[..., 1].astype(np.int32) << 8)
                | (b[..., 2].view(np.int8).astype(np.int32) << 16))
    return raw.view("<i2").reshape(n_rec, spr)


@dataclass(frozen=True, eq=False)
class RecordSource:
    """Reads one signal by mapping the data records and gathering its slice of each record.

    Without a placement the records follow each other; with one, each record goes to its onset on the
    timeline and the samples between records are 0.
    """

    path: Path
    stamp: FileStamp
    header_bytes: int
    n_records: int
    record_bytes: int
    byte_offset: int  # of this signal inside a data record
    samples_per_record: int
    is_bdf: bool
    scaling: Scaling | Constant
    placement: Placement | None = None

    def __call__(self) -> np.ndarray:
        check_unchanged(self.path, self.stamp)
        spr = self.samples_per_record
        if self.placement is None:
            out = np.empty(self.n_records * spr, dtype=np.float32)
        else:
            out = np.zeros(self.placement.n_samples(spr), dtype=np.float32)
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
            raise os_error(self.path, exc, "cannot read samples") from exc
        return out

    def _gather(self, mapped: mmap.mmap, out: np.ndarray) -> None:
        spr, bps = self.samples_per_record, 3 if self.is_bdf else 2
        records = np.frombuffer(mapped, dtype=np.uint8, count=self.n_records * self.record_bytes,
                                offset=self.header_bytes).reshape(self.n_records, self.record_bytes)
        starts = self.placement.starts(spr) if self.placement is not None else None
        within = np.arange(spr, dtype=np.int64)
        lo = self.byte_offset
        step = max(1, min(_BLOCK_SAMPLES // spr, _BLOCK_BYTES // max(self.record_bytes, 1)))
        for first in range(0, self.n_records, step):
            last = min(self.n_records, first + step)
            n_rec = last - first
            raw = np.ascontiguousarray(records[first:last, lo:lo + spr * bps])
            digital = _digital(raw, self.is_bdf, n_rec, spr)
            if starts is None:
                self.scaling.apply(digital, out[first * spr:last * spr].reshape(n_rec, spr))
            else:
                block_starts = starts[first:last]
                at = int(block_starts[0])
                if np.array_equal(block_starts, at + np.arange(n_rec, dtype=np.int64) * spr):
                    self.scaling.apply(digital, out[at:at + n_rec * spr].reshape(n_rec, spr))
                else:  # records out of time order, or a gap inside the block
                    scratch = np.empty((n_rec, spr), dtype=np.float32)
                    self.scaling.apply(digital, scratch)
                    out[(block_starts[:, None] + within).reshape(-1)] = scratch.reshape(-1)
            del raw, digital
            _release(mapped, self.header_bytes + first * self.record_bytes,
                     self.header_bytes + last * self.record_bytes)
        del records


# ---- annotations and record time-stamps --------------------------------------------------------------------


def _annotation_bytes(header: EdfHeader, index: int) -> np.ndarray:
    """The bytes of annotation signal ``index`` in every data record, shape (n_records, bytes)."""
    path = header.path
    signal = header.signals[index]
    width = signal.samples_per_record * header.bytes_per_sample
    if header.n_records == 0:
        return np.zeros((0, width), dtype=np.uint8)
    lo = header.byte_offset(index)
    try:
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                records = np.frombuffer(mapped, dtype=np.uint8, count=header.n_records * header.record_bytes,
                                        offset=header.header_bytes).reshape(header.n_records, header.record_bytes)
                out = records[:, lo:lo + width].copy()
                del records
            finally:
                try:
                    mapped.close()
                except BufferError:
                    pass
    except OSError as exc:
        raise os_error(path, exc, "cannot read the annotations") from None
    return out


@dataclass
class _Tals:
    record_onsets: np.ndarray  # per data record (file order); NaN where a record has no time-keeping TAL
    missing_stamp: int | None  # 0-based index of the first record without a time-keeping TAL
    annotations: list[tuple[float, float | None, str]]  # onset from the file start
    malformed: int


def _read_tals(header: EdfHeader) -> _Tals:
    n = header.n_records
    onsets = np.full(n, np.nan)
    annotations: list[tuple[float, float | None, str]] = []
    malformed = 0
    for which, signal in enumerate(header.annotation_signals):
        rows = _annotation_bytes(header, signal.index)
        for k in range(n):
            tals, bad = parse_tals(rows[k].tobytes())
            malformed += bad
            for position, tal in enumerate(tals):
                texts = tal.texts
                if which == 0 and position == 0 and (not texts or texts[0] == ""):
                    onsets[k] = tal.onset  # the record's time-keeping TAL
                    texts = texts[1:]
                annotations.extend((tal.onset, tal.duration, text) for text in texts if text)
    missing = np.flatnonzero(np.isnan(onsets))
    return _Tals(onsets, int(missing[0]) if missing.size else None, annotations, malformed)


def _place(header: EdfHeader, onsets: np.ndarray, notes: list[str]) -> tuple[Placement, float]:
    """Check the records' time-stamps and return their placement and the first record's onset."""
    path, dur = header.path, header.record_duration
    order = np.argsort(onsets, kind="stable")
    ordered = onsets[order]
    rates = [header.rate(s) for s in header.data_signals]
    tolerance = 0.5 / max(rates) if rates else 1e-6
    overlap = np.flatnonzero(ordered[1:] < ordered[:-1] + dur - tolerance)
    if overlap.size:
        k = int(overlap[0]) + 1
        this, previous = int(order[k]), int(order[k - 1])
        raise ReaderError(
            path, f"data record {this + 1} (time-stamp {ordered[k]:.7g} s) overlaps data record {previous + 1} "
                  f"({ordered[k - 1]:.7g} s to {ordered[k - 1] + dur:.7g} s): overlapping data records",
            kind="corrupt")
    t0 = float(ordered[0])
    span = float(ordered[-1]) + dur - t0
    if span > MAX_TIMELINE_S:
        raise ReaderError(
            path, f"data record {int(order[-1]) + 1} has time-stamp {ordered[-1]:.7g} s, "
                  f"{span / 3600:.1f} hours after the first record: more than 7 days, not a recording",
            kind="corrupt")
    if np.any(np.diff(order) < 0):
        notes.append("data records are not in time order: placed by their time-stamps")
    placement = Placement(onsets - t0, dur)
    for s in header.data_signals:
        if placement.n_samples(s.samples_per_record) > _MAX_SAMPLES:
            raise ReaderError(path, f"signal {s.index + 1} ({s.label!r}) would need more than 2**31 samples "
                                    "on the discontinuous timeline", kind="corrupt")
    gaps = ordered[1:] - (ordered[:-1] + dur)
    if gaps.size and gaps.max() > tolerance:
        total = float(gaps[gaps > tolerance].sum())
        notes.append(f"{int((gaps > tolerance).sum())} gaps between data records ({total:.6g} s in all): "
                     "zero-filled and marked invalid")
    return placement, t0


# ---- the recording -----------------------------------------------------------------------------------------


def build_raw_recording(header: EdfHeader, stamp: FileStamp, notes: list[str]) -> Recording:
    """A :class:`Recording` from a parsed header, without pyedflib. Appends warnings to ``notes``."""
    path = header.path
    if header.is_discontinuous and not header.annotation_signals:
        raise ReaderError(path, f"{header.format} (discontinuous) file without an annotation signal: the data "
                                "records cannot be placed in time (reserved field / signal labels)", kind="corrupt")
    tals = _read_tals(header) if header.annotation_signals else _Tals(np.zeros(0), None, [], 0)
    if tals.malformed:
        notes.append(f"{tals.malformed} malformed annotations (TALs) skipped")

    placement: Placement | None = None
    t0 = 0.0
    duration = header.n_records * header.record_duration
    if header.is_discontinuous and header.n_records:
        if tals.missing_stamp is not None:
            k = tals.missing_stamp
            raise ReaderError(path, f"data record {k + 1} has no time-keeping annotation (its first TAL must be "
                                    "'+<seconds>' with an empty text): cannot place it on the timeline",
                              kind="corrupt")
        placement, t0 = _place(header, tals.record_onsets, notes)
        duration = float(placement.onsets_s.max()) + header.record_duration
        in_order = bool(np.all(np.diff(placement.onsets_s) > 0))
        if in_order and not any(placement.has_gaps(s.samples_per_record) for s in header.data_signals):
            placement = None  # records back to back: read like a continuous file
    elif tals.record_onsets.size and np.isfinite(tals.record_onsets[0]):
        t0 = float(tals.record_onsets[0])  # continuous: records follow the first one
    elif tals.record_onsets.size:
        notes.append("the first data record has no time-keeping annotation: it is taken to start at 0 s")

    channels: list[Channel] = []
    for s in header.data_signals:
        spr = s.samples_per_record
        gapped = placement is not None and placement.has_gaps(spr)
        source = RecordSource(path, stamp, header.header_bytes, header.n_records, header.record_bytes,
                              header.byte_offset(s.index), spr, header.is_bdf, s.scaling(), placement)
        n_samples = placement.n_samples(spr) if placement is not None else header.n_records * spr
        channels.append(Channel(
            label=s.label,
            sampling_rate=header.rate(s),
            unit=s.unit,
            n_samples=n_samples,
            _source=source,
            prefilter=s.prefilter,
            transducer=s.transducer,
            _valid=_Validity(placement, spr) if gapped and placement is not None else None,
            # the digital limits in physical units; none for a signal read as a constant
            physical_range=None if s.degenerate else checked_range((s.physical_min, s.physical_max)),
        ))

    annotations = [Annotation(onset - t0, d, text) for onset, d, text in tals.annotations]
    identifiers, demographics = patient_fields(header.patient)
    identifiers.admin_code = admin_code(header.recording)
    identifiers.scorer = technician(header.recording)
    identifiers.source_path = path
    return Recording(
        channels=channels,
        duration_s=float(duration),
        start=start_plus(header.start, t0),
        identifiers=identifiers,
        demographics=demographics,
        annotations=annotations,
        format=header.format,
    )


def _stamp(path: Path) -> FileStamp:
    try:
        return FileStamp.of(path)
    except OSError as exc:
        raise os_error(path, exc, "cannot stat the file") from None


def read_raw_edf(path: str | Path, *, warnings: list[str] | None = None) -> Recording:
    """Read any EDF/EDF+/BDF/BDF+ file (continuous or not) with the raw parser, never pyedflib.

    :func:`gateway.readers.edf.read_edf` is the entry point; this one is for files known to need it and
    for comparing the two paths. Warnings (dropped records, degenerate ranges, gaps...) are appended to
    ``warnings`` when given.
    """
    path = Path(path)
    header = read_header(path)
    require_data_records(header)
    notes = list(header.warnings)
    recording = build_raw_recording(header, _stamp(path), notes)
    if warnings is not None:
        warnings.extend(notes)
    return recording
