"""DICOM waveform studies (sleep EEG, EOG, EMG, ECG, respiratory, ...) as one :class:`~gateway.recording.Recording`.

A PSG can reach the gateway as one or several DICOM waveform instances of one study (say the EEG/EOG/EMG
in a Sleep EEG object, the respiration in a Multi-channel Respiratory object and the ECG in a General
ECG object). :func:`read_dicom_study` decodes them all and merges them onto one timeline.

Accepted SOP classes
    See :data:`WAVEFORM_SOP_CLASSES` (UID -> name, modality, accepted). Audio waveforms (Basic Voice
    Audio, General Audio) are waveform objects but not PSG signals and are refused, as is any
    non-waveform object (an image, a report): ``ReaderError(kind="unsupported")`` naming the file and
    the SOP class. ``read_dicom_study(..., ignore_unsupported=True)`` skips such instances instead.

Samples (PS3.3 C.10.9, Waveform module)
    Every item of the Waveform Sequence is a multiplex group with its own Sampling Frequency, Number of
    Waveform Channels/Samples, Waveform Bits Allocated (8, 16, 32 or 64) and Waveform Sample
    Interpretation (SB, UB, SS, US, SL, UL, SV, UV; the companded audio encodings MB/AB are refused).
    Waveform Data is decoded here (channel-interleaved: C1S1 C2S1 ... CnS1 C1S2 ...), with the byte
    order of the transfer syntax and a check that its length is samples x channels x bytes. pydicom's
    ``ds.waveform_array(i)`` returns the same raw values but neither checks the length nor handles
    big-endian data, and its ``as_raw=False`` conversion is not used.

Calibration (PS3.3 C.10.9.1.4.3-5)
    Channel Sensitivity is the nominal value of one least significant bit in Channel Sensitivity
    Units; the Channel Sensitivity Correction Factor is the ratio of the calibrated to the nominal
    value; Channel Baseline is the offset of encoded sample value 0 from actual 0, in Channel
    Sensitivity Units. Hence, in float64, then stored as float32::

        physical = raw * ChannelSensitivity * ChannelSensitivityCorrectionFactor + ChannelBaseline

    A missing correction factor is 1, a missing baseline 0. Without Channel Sensitivity the raw values
    are kept (arbitrary units, unit ``""``). The unit is the Code Value of the Channel Sensitivity Units
    Sequence (UCUM: ``uV``, ``mV``, ``%``, ``{ratio}`` ...).

Gaps
    Samples equal to the group's Waveform Padding Value are gaps: value 0, validity False. A channel
    whose Channel Status says DISCONNECTED or INVALID is a gap throughout.

Labels
    Channel Label when present, else the Code Meaning of the first Channel Source Sequence item, else
    ``"<group label or 'Group n'> channel m"``.

Timeline and merging
    The reference time of an instance is its Acquisition DateTime, else Content Date + Content Time,
    else Study Date + Study Time. Time zone offsets (in the DT value or Timezone Offset From UTC) are
    honoured when instances differ; times are reported as naive wall-clock time of the first instance
    that states an offset. A multiplex group starts at reference time + Multiplex Group Time Offset
    (ms). The recording starts at the earliest group start; every channel covers the whole recording
    at its own native rate, its first sample placed at round((group start - recording start) x rate);
    samples outside the channel's own data are gaps. Segments of the same label from different
    instances that do not overlap in time (a night split into consecutive objects) are concatenated
    in order, with gaps between; objects that meet within 1 ms (or one sample) join seamlessly. Same
    label overlapping across instances, or recorded at a different rate or unit, is an error naming
    both files. The same label twice in one instance gives two channels (duplicates kept, like EDF).
    A DERIVED multiplex group whose labels all repeat an ORIGINAL group of the same instance (an ECG
    median beat) is a template, not a signal in time, and is skipped with a warning in
    ``Recording.warnings`` naming the group's number and label and why. Instances of different studies
    (Study Instance UID) are refused; an instance received twice (same SOP Instance UID) is read once.

Annotations
    Waveform Annotation Sequence items with a text (Unformatted Text Value, else Concept Name Code
    Meaning with its Concept Code meaning or Numeric Value and unit) and a time (Referenced Sample
    Positions in the referenced multiplex group, Referenced Time Offsets in seconds from the
    referenced group's start, or Referenced DateTime) become :class:`Annotation` s: one per point, or
    one per (begin, end) pair for SEGMENT/MULTISEGMENT. Items without a time are skipped.

Memory
    Each file is decoded and its dataset dropped before the next one is read; the merged channels hold
    one float32 copy of the signals (:meth:`Channel.from_array`).

Identifiers
    Patient ID, Issuer of Patient ID, Patient's Name (read, never logged or shown), Accession Number
    (-> ``admin_code``), Study Instance UID (:func:`study_uid_of`; also passed to ``Identifiers`` as
    ``study_uid`` / ``patient_id_issuer`` once that type has such fields), Patient's Sex (M/F, anything
    else unknown), Patient's Birth Date and Patient's Age (``045Y``, ``006M``, ``010W``, ``003D``).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from ..recording import Annotation, Channel, Demographics, Identifiers, Recording
from .errors import ReaderError, os_error

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "WAVEFORM_SOP_CLASSES",
    "WaveformSopClass",
    "parse_patient_age",
    "read_dicom_study",
    "sop_class_name",
    "study_uid_of",
]

_DAYS_PER_YEAR = 365.2425


class WaveformSopClass(NamedTuple):
    """One waveform storage SOP class: its name (PS3.4 Annex B), the IOD's Modality, whether PSG reads it."""

    name: str
    modality: str
    accepted: bool


# fmt: off
WAVEFORM_SOP_CLASSES: Mapping[str, WaveformSopClass] = MappingProxyType({
    "1.2.840.10008.5.1.4.1.1.9.1.1": WaveformSopClass("12-lead ECG Waveform Storage", "ECG", True),
    "1.2.840.10008.5.1.4.1.1.9.1.2": WaveformSopClass("General ECG Waveform Storage", "ECG", True),
    "1.2.840.10008.5.1.4.1.1.9.1.3": WaveformSopClass("Ambulatory ECG Waveform Storage", "ECG", True),
    "1.2.840.10008.5.1.4.1.1.9.1.4": WaveformSopClass("General 32-bit ECG Waveform Storage", "ECG", True),
    "1.2.840.10008.5.1.4.1.1.9.2.1": WaveformSopClass("Hemodynamic Waveform Storage", "HD", True),
    "1.2.840.10008.5.1.4.1.1.9.3.1": WaveformSopClass("Cardiac Electrophysiology Waveform Storage", "EPS", True),
    "1.2.840.10008.5.1.4.1.1.9.4.1": WaveformSopClass("Basic Voice Audio Waveform Storage", "AU", False),
    "1.2.840.10008.5.1.4.1.1.9.4.2": WaveformSopClass("General Audio Waveform Storage", "AU", False),
    "1.2.840.10008.5.1.4.1.1.9.5.1": WaveformSopClass("Arterial Pulse Waveform Storage", "HD", True),
    "1.2.840.10008.5.1.4.1.1.9.6.1": WaveformSopClass("Respiratory Waveform Storage", "RESP", True),
    "1.2.840.10008.5.1.4.1.1.9.6.2": WaveformSopClass("Multi-channel Respiratory Waveform Storage", "RESP", True),
    "1.2.840.10008.5.1.4.1.1.9.7.1": WaveformSopClass(
        "Routine Scalp Electroencephalogram Waveform Storage", "EEG", True),
    "1.2.840.10008.5.1.4.1.1.9.7.2": WaveformSopClass("Electromyogram Waveform Storage", "EMG", True),
    "1.2.840.10008.5.1.4.1.1.9.7.3": WaveformSopClass("Electrooculogram Waveform Storage", "EOG", True),
    "1.2.840.10008.5.1.4.1.1.9.7.4": WaveformSopClass("Sleep Electroencephalogram Waveform Storage", "EEG", True),
    "1.2.840.10008.5.1.4.1.1.9.8.1": WaveformSopClass("Body Position Waveform Storage", "POS", True),
})
"""Every waveform storage SOP class of PS3.4 Annex B, UID -> (name, modality, accepted for PSG)."""
# fmt: on

ACCEPTED_SOP_CLASSES: frozenset[str] = frozenset(uid for uid, c in WAVEFORM_SOP_CLASSES.items() if c.accepted)

_DTYPES: Mapping[tuple[int, str], str] = MappingProxyType({
    (8, "SB"): "i1", (8, "UB"): "u1",
    (16, "SS"): "i2", (16, "US"): "u2",
    (32, "SL"): "i4", (32, "UL"): "u4",
    (64, "SV"): "i8", (64, "UV"): "u8",
})
_DEAD_STATUS = ("DISCONNECTED", "INVALID")
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_GROUP_ITEM_REQUIRED = ("NumberOfWaveformChannels", "NumberOfWaveformSamples", "SamplingFrequency",
                        "WaveformBitsAllocated", "WaveformSampleInterpretation", "WaveformData")


def sop_class_name(uid: str) -> str:
    """A SOP class UID with its name when pydicom or :data:`WAVEFORM_SOP_CLASSES` knows it."""
    uid = str(uid).strip()
    known = WAVEFORM_SOP_CLASSES.get(uid)
    if known is not None:
        return f"{known.name} ({uid})"
    try:
        from pydicom.uid import UID

        name = UID(uid).name
    except Exception:  # noqa: BLE001 - a name is a nicety
        name = uid
    return f"{name} ({uid})" if name and name != uid else uid


def parse_patient_age(value: object) -> float | None:
    """DICOM Patient's Age (AS: ``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``) in years; None when absent or malformed.

    >>> parse_patient_age("045Y"), parse_patient_age("006M"), round(parse_patient_age("003D"), 5)
    (45.0, 0.5, 0.00821)
    """
    if value is None:
        return None
    match = _AGE.match(str(value))
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2).upper()
    return {"Y": float(number), "M": number / 12.0, "W": number * 7.0 / _DAYS_PER_YEAR,
            "D": number / _DAYS_PER_YEAR}[unit]


def study_uid_of(paths: Iterable[str | Path]) -> str | None:
    """The Study Instance UID shared by the given DICOM files (None when they carry none).

    Reads only the header elements it needs. Files of different studies raise :class:`ReaderError`.
    """
    found: tuple[str, Path] | None = None
    for path in (Path(p) for p in paths):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _dcmread(path, specific_tags=["StudyInstanceUID"])
        uid = _text(ds, "StudyInstanceUID")
        if uid is None:
            continue
        if found is not None and found[0] != uid:
            raise ReaderError(path, f"belongs to another study than {found[1]} (Study Instance UID differs)",
                              kind="corrupt")
        found = found or (uid, path)
    return found[0] if found else None


# ---- decoded pieces ------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    """One channel of one multiplex group of one instance, decoded to physical float32."""

    label: str
    rate: float
    unit: str
    start_s: float  # from the study epoch
    data: np.ndarray  # float32
    valid: np.ndarray | None  # bool, None: all measured
    path: Path
    order: tuple[int, int, int]  # (instance, group, channel) for a stable channel order
    code: tuple[str, str] | None = None  # the coded Channel Source (scheme, value)

    @property
    def n(self) -> int:
        return int(self.data.size)


@dataclass
class _Group:
    index: int
    rate: float
    offset_ms: float
    label: str
    originality: str
    channels: list[tuple[str, str, np.ndarray, np.ndarray | None]]  # label, unit, data, valid
    codes: dict[int, tuple[str, str]] = field(default_factory=dict)  # channel index -> coded Channel Source


@dataclass
class _RawAnnotation:
    text: str
    group: int | None  # 0-based group index referenced
    positions: list[int] | None  # 1-based sample numbers
    offsets_s: list[float] | None
    datetimes: list[datetime] | None
    range_type: str


@dataclass
class _Instance:
    path: Path
    sop_class: str
    sop_instance_uid: str | None
    study_uid: str | None
    wall: datetime | None  # reference time (naive wall clock)
    utc_offset: timedelta | None
    groups: list[_Group]
    timing: dict[int, tuple[float, float]]  # group index -> (time offset ms, rate), templates included
    templates: frozenset[int]  # indices of the skipped template groups
    annotations: list[_RawAnnotation]
    patient_id: str | None
    issuer: str | None
    patient_name: str | None
    accession: str | None
    sex: str | None
    birth_date: date | None
    age_years: float | None
    sex_unrecognised: bool = False  # Patient's Sex held a code other than M, F, O (or nothing)
    operator: str | None = None  # Operators' Name (0008,1070), the first one: who scored the study
    skipped: list[str] = field(default_factory=list)  # one warning per skipped waveform group


@dataclass
class _Track:
    label: str
    rate: float
    unit: str
    segments: list[tuple[_Segment, int]] = field(default_factory=list)  # segment, first sample index

    @property
    def end(self) -> int:
        seg, first = self.segments[-1]
        return first + seg.n


# ---- the reader ----------------------------------------------------------------------------------------------


def read_dicom_study(paths: Iterable[str | Path], *, ignore_unsupported: bool = False) -> Recording:
    """Decode one study's DICOM waveform files into one :class:`Recording` on a common timeline.

    ``paths`` are the study's files (one file is fine). ``ignore_unsupported=True`` skips instances that
    are not PSG waveforms (images, reports, audio) instead of refusing the study. Every problem raises
    :class:`ReaderError` naming the file (and, for conflicts, both files).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReaderError(Path("."), "no DICOM files given", kind="not_found")
    instances: list[_Instance] = []
    seen_uids: dict[str, Path] = {}
    for path in paths:
        instance = _read_instance(path, ignore_unsupported=ignore_unsupported)
        if instance is None:
            continue
        if instance.sop_instance_uid is not None:
            if instance.sop_instance_uid in seen_uids:
                continue  # the same object received twice
            seen_uids[instance.sop_instance_uid] = path
        if instances and instance.study_uid != instances[0].study_uid:
            raise ReaderError(instance.path, f"belongs to another study than {instances[0].path} "
                              "(Study Instance UID differs)", kind="corrupt")
        instances.append(instance)
    if not instances:
        raise ReaderError(paths[0], f"none of the {len(paths)} DICOM file(s) is a PSG waveform object",
                          kind="unsupported")

    epoch, starts = _timeline(instances)
    segments: list[_Segment] = []
    for i, (instance, inst_start) in enumerate(zip(instances, starts, strict=True)):
        for group in instance.groups:
            start_s = inst_start + group.offset_ms / 1000.0
            for c, (label, unit, data, valid) in enumerate(group.channels):
                segments.append(_Segment(label, group.rate, unit, start_s, data, valid, instance.path,
                                         (i, group.index, c), group.codes.get(c)))
        instance.groups = []  # the segments own the arrays now
    if not segments:
        raise ReaderError(instances[0].path, "no waveform channel in the study", kind="corrupt")

    t0 = min(seg.start_s for seg in segments)
    duration_s = max(seg.start_s - t0 + seg.n / seg.rate for seg in segments)
    tracks = _assign_tracks(segments, t0)
    del segments
    channels = [_build_channel(track, duration_s) for track in tracks]

    annotations = sorted(
        (a for instance, s in zip(instances, starts, strict=True) for a in _annotations(instance, s, t0, epoch)),
        key=lambda a: a.onset_s,
    )
    start = epoch + timedelta(seconds=t0) if epoch is not None else None
    identifiers, demographics = _who(instances, paths)
    return Recording(channels=channels, duration_s=float(duration_s), start=start, identifiers=identifiers,
                     demographics=demographics, annotations=annotations, format="DICOM",
                     warnings=[note for instance in instances for note in instance.skipped])


# ---- one file ------------------------------------------------------------------------------------------------


def _dcmread(path: Path, **kwargs: Any):
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        return dcmread(path, **kwargs)
    except InvalidDicomError:
        raise ReaderError(path, "not a DICOM file (no DICM preamble or file meta information)",
                          kind="unsupported") from None
    except EOFError:
        raise ReaderError(path, "DICOM file is truncated (ends inside a data element)",
                          kind="truncated") from None
    except OSError as exc:
        raise os_error(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on garbage; none may escape
        raise ReaderError(path, f"DICOM file cannot be parsed ({type(exc).__name__}: {exc})",
                          kind="corrupt") from None


def _check_complete(path: Path, ds) -> None:
    """pydicom reads a truncated file without complaint: find where it ends inside an element."""
    meta = getattr(ds, "file_meta", None)
    group_length = _value(meta, "FileMetaInformationGroupLength")
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    if size is not None and isinstance(group_length, int) and size < 128 + 4 + 12 + group_length:
        raise ReaderError(path, f"DICOM file is truncated: {size} bytes end inside the file meta information",
                          kind="truncated")
    elements = list(meta.elements()) if meta is not None else []
    elements += list(ds.elements())
    for element in elements:
        value, length = getattr(element, "value", None), getattr(element, "length", None)
        if isinstance(value, bytes) and isinstance(length, int) and length != 0xFFFFFFFF and len(value) < length:
            raise ReaderError(path, f"DICOM file is truncated: element {element.tag} holds {len(value)} of its "
                              f"{length} bytes", kind="truncated")
    if len(ds) == 0:
        raise ReaderError(path, "DICOM file holds no data set after its header (truncated or empty)",
                          kind="truncated")


def _read_instance(path: Path, *, ignore_unsupported: bool) -> _Instance | None:
    # pydicom warns (and logs) about invalid values quoting them, which may be PHI: keep its warnings quiet here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _dcmread(path)
        return _decode_checked(path, ds, ignore_unsupported=ignore_unsupported)


def _decode_checked(path: Path, ds, *, ignore_unsupported: bool) -> _Instance | None:
    try:
        _check_complete(path, ds)
        return _decode_instance(path, ds, ignore_unsupported=ignore_unsupported)
    except ReaderError:
        raise
    except EOFError:
        raise ReaderError(path, "DICOM file is truncated (ends inside a data element)", kind="truncated") from None
    except Exception as exc:  # noqa: BLE001 - deferred pydicom value errors must not escape raw
        raise ReaderError(path, f"DICOM waveform cannot be decoded ({type(exc).__name__}: {exc})",
                          kind="corrupt") from None


def _decode_instance(path: Path, ds, *, ignore_unsupported: bool) -> _Instance | None:
    sop_class = _text(ds, "SOPClassUID")
    if sop_class is None:
        meta = getattr(ds, "file_meta", None)
        sop_class = _text(meta, "MediaStorageSOPClassUID") if meta is not None else None
    if sop_class is None:
        if ignore_unsupported:
            return None
        raise ReaderError(path, "DICOM file has no SOP Class UID", kind="unsupported")
    known = WAVEFORM_SOP_CLASSES.get(sop_class)
    if known is None or not known.accepted:
        if ignore_unsupported:
            return None
        why = "audio, not a PSG signal" if known is not None else "not a waveform storage object"
        raise ReaderError(path, f"unsupported SOP class {sop_class_name(sop_class)}: {why}", kind="unsupported")

    little_endian = _little_endian(ds)
    sequence = ds.get("WaveformSequence")
    if sequence is None or len(sequence) == 0:
        raise ReaderError(path, f"{known.name} object has no Waveform Sequence (5400,0100)", kind="corrupt")
    groups = []
    for g, item in enumerate(sequence):
        groups.append(_decode_group(path, item, g, little_endian))
        del item.WaveformData  # drop the raw bytes as soon as they are decoded
    timing = {grp.index: (grp.offset_ms, grp.rate) for grp in groups}
    kept = _drop_templates(groups)
    templates = frozenset(timing) - {grp.index for grp in kept}
    skipped = [_skipped_warning(known.name, grp) for grp in groups if grp.index in templates]
    groups = kept

    wall, utc_offset = _reference_time(ds)
    return _Instance(
        path=path,
        sop_class=sop_class,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        wall=wall,
        utc_offset=utc_offset,
        groups=groups,
        timing=timing,
        templates=templates,
        annotations=_raw_annotations(ds),
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        accession=_text(ds, "AccessionNumber"),
        sex=_sex(_text(ds, "PatientSex")),
        sex_unrecognised=_sex_unrecognised(_text(ds, "PatientSex")),
        birth_date=_date(_text(ds, "PatientBirthDate")),
        age_years=parse_patient_age(_text(ds, "PatientAge")),
        operator=_first_name(ds, "OperatorsName"),
        skipped=skipped,
    )


def _little_endian(ds) -> bool:
    meta = getattr(ds, "file_meta", None)
    syntax = _text(meta, "TransferSyntaxUID") if meta is not None else None
    if syntax is not None:
        from pydicom.uid import UID

        try:
            return bool(UID(syntax).is_little_endian)
        except Exception:  # noqa: BLE001 - a private/unknown syntax: pydicom read it, so assume the default
            return True
    encoding = getattr(ds, "original_encoding", None)
    if encoding and encoding[1] is not None:
        return bool(encoding[1])
    return True


def _decode_group(path: Path, item, g: int, little_endian: bool) -> _Group:
    where = f"multiplex group {g + 1}"
    missing = [k for k in _GROUP_ITEM_REQUIRED if _value(item, k) is None]
    if missing:
        raise ReaderError(path, f"{where}: missing {', '.join(missing)}", kind="corrupt")
    n_channels = _int(path, where, item, "NumberOfWaveformChannels")
    n_samples = _int(path, where, item, "NumberOfWaveformSamples")
    bits = _int(path, where, item, "WaveformBitsAllocated")
    rate = _float(path, where, item, "SamplingFrequency")
    interpretation = str(item.WaveformSampleInterpretation).strip().upper()
    if n_channels < 1 or n_samples < 1:
        raise ReaderError(path, f"{where}: {n_channels} channels x {n_samples} samples holds no signal",
                          kind="corrupt")
    if not (math.isfinite(rate) and rate > 0):
        raise ReaderError(path, f"{where}: Sampling Frequency {rate} is not a positive number", kind="corrupt")
    code = _DTYPES.get((bits, interpretation))
    if code is None:
        raise ReaderError(path, f"{where}: Waveform Bits Allocated {bits} with Sample Interpretation "
                          f"{interpretation!r} is not supported (companded audio or not a DICOM encoding)",
                          kind="unsupported")
    dtype = np.dtype(code).newbyteorder("<" if little_endian else ">")

    definitions = _value(item, "ChannelDefinitionSequence")
    n_defined = len(definitions) if definitions is not None else 0
    if n_defined != n_channels:
        raise ReaderError(path, f"{where}: Number of Waveform Channels is {n_channels} but the Channel "
                          f"Definition Sequence has {n_defined} item(s)", kind="corrupt")

    data = item.WaveformData
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ReaderError(path, f"{where}: Waveform Data is not a byte string", kind="corrupt")
    expected = n_samples * n_channels * dtype.itemsize
    if len(data) < expected:
        raise ReaderError(path, f"{where}: Waveform Data holds {len(data)} bytes, {n_samples} samples x "
                          f"{n_channels} channels x {dtype.itemsize} bytes = {expected} expected (truncated)",
                          kind="truncated")
    if len(data) > expected + (expected % 2):  # OB/OW values are padded to an even length
        raise ReaderError(path, f"{where}: Waveform Data holds {len(data)} bytes, {n_samples} samples x "
                          f"{n_channels} channels x {dtype.itemsize} bytes = {expected} expected",
                          kind="corrupt")
    raw = np.frombuffer(data, dtype=dtype, count=n_samples * n_channels).reshape(n_samples, n_channels)

    padding = _padding(path, where, item, dtype)
    group_label = _text(item, "MultiplexGroupLabel") or ""
    channels = []
    codes: dict[int, tuple[str, str]] = {}
    for c, definition in enumerate(definitions):
        label = _channel_label(definition) or f"{group_label or f'Group {g + 1}'} channel {c + 1}"
        code = _source_code(definition)
        if code is not None:
            codes[c] = code
        cwhere = f"{where}, channel {c + 1} ({label!r})"
        column = raw[:, c]
        sensitivity = _opt_float(path, cwhere, definition, "ChannelSensitivity")
        if sensitivity is None:
            values = column.astype(np.float32)
            unit = _unit(definition) or ""
        else:
            correction = _opt_float(path, cwhere, definition, "ChannelSensitivityCorrectionFactor")
            baseline = _opt_float(path, cwhere, definition, "ChannelBaseline")
            scale = sensitivity * (1.0 if correction is None else correction)
            physical = column.astype(np.float64)
            physical *= scale
            physical += 0.0 if baseline is None else baseline
            values = physical.astype(np.float32)
            del physical
            unit = _unit(definition) or ""
        valid = None
        if padding is not None:
            gap = column == padding
            if gap.any():
                values[gap] = 0.0
                valid = ~gap
        status = " ".join(_strings(definition, "ChannelStatus")).upper()
        if any(word in status for word in _DEAD_STATUS):
            values[:] = 0.0
            valid = np.zeros(n_samples, dtype=bool)
        channels.append((label, unit, values, valid))
    offset_ms = _opt_float(path, where, item, "MultiplexGroupTimeOffset") or 0.0
    originality = (_text(item, "WaveformOriginality") or "ORIGINAL").upper()
    return _Group(g, rate, offset_ms, group_label, originality, channels, codes)


def _drop_templates(groups: list[_Group]) -> list[_Group]:
    """Skip DERIVED groups whose labels all repeat an ORIGINAL group's (median beats, averaged templates)."""
    original = {label for grp in groups if grp.originality != "DERIVED" for label, *_ in grp.channels}
    return [grp for grp in groups
            if grp.originality != "DERIVED" or not all(label in original for label, *_ in grp.channels)]


def _skipped_warning(sop_name: str, grp: _Group) -> str:
    """The warning for a skipped group: its number and label, what it holds and why (no PHI: no file name)."""
    label = f" {grp.label!r}" if grp.label else ""
    return (f"{sop_name}: waveform group {grp.index + 1}{label} skipped ({grp.originality}, "
            f"{len(grp.channels)} channel(s) at {grp.rate:g} Hz): every channel repeats an ORIGINAL group's "
            "label, so it is a template such as a median beat, not a signal in time")


def _padding(path: Path, where: str, item, dtype: np.dtype):
    value = _value(item, "WaveformPaddingValue")
    if value is None:
        return None
    if isinstance(value, int):  # a non-standard VR (US/SS) read as a number
        return value
    if not isinstance(value, bytes | bytearray):
        raise ReaderError(path, f"{where}: Waveform Padding Value is not a byte string", kind="corrupt")
    if len(value) < dtype.itemsize:
        raise ReaderError(path, f"{where}: Waveform Padding Value has {len(value)} byte(s), "
                          f"{dtype.itemsize} needed", kind="corrupt")
    return np.frombuffer(bytes(value[: dtype.itemsize]), dtype=dtype)[0]


def _channel_label(definition) -> str | None:
    label = _text(definition, "ChannelLabel")
    if label:
        return label
    sources = _value(definition, "ChannelSourceSequence")
    if sources:
        return _text(sources[0], "CodeMeaning")
    return None


def _source_code(definition) -> tuple[str, str] | None:
    """The channel's coded Channel Source as (coding scheme designator, code value), or None."""
    sources = _value(definition, "ChannelSourceSequence")
    if not sources:
        return None
    scheme = _text(sources[0], "CodingSchemeDesignator")
    value = _text(sources[0], "CodeValue") or _text(sources[0], "LongCodeValue")
    if not scheme or not value:
        return None
    return scheme.strip(), value.strip()


def _unit(definition) -> str | None:
    units = _value(definition, "ChannelSensitivityUnitsSequence")
    if units:
        return _text(units[0], "CodeValue")
    return None


# ---- time ----------------------------------------------------------------------------------------------------


def _parse_dt(text: str | None) -> datetime | None:
    if not text:
        return None
    from pydicom.valuerep import DT

    try:
        value = DT(text)
    except Exception:  # noqa: BLE001 - a malformed value falls back to the next source
        return None
    return datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                    value.microsecond, tzinfo=value.tzinfo)


def _date(text: str | None) -> date | None:
    if not text:
        return None
    from pydicom.valuerep import DA

    try:
        value = DA(text)
    except Exception:  # noqa: BLE001
        return None
    return date(value.year, value.month, value.day) if value is not None else None


def _date_time(day: str | None, time: str | None) -> datetime | None:
    d = _date(day)
    if d is None or not time:
        return None
    from pydicom.valuerep import TM

    try:
        t = TM(time)
    except Exception:  # noqa: BLE001
        return None
    if t is None:
        return None
    return datetime(d.year, d.month, d.day, t.hour, t.minute, t.second, t.microsecond)


def _reference_time(ds) -> tuple[datetime | None, timedelta | None]:
    """(naive wall-clock reference time, UTC offset if stated) of an instance."""
    when = (_parse_dt(_text(ds, "AcquisitionDateTime"))
            or _date_time(_text(ds, "ContentDate"), _text(ds, "ContentTime"))
            or _date_time(_text(ds, "StudyDate"), _text(ds, "StudyTime")))
    if when is None:
        return None, None
    offset = when.utcoffset()
    if offset is None:
        tz = _text(ds, "TimezoneOffsetFromUTC")
        match = re.match(r"^([+-])(\d{2})(\d{2})$", tz or "")
        if match:
            sign = -1 if match.group(1) == "-" else 1
            offset = sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
    return when.replace(tzinfo=None), offset


def _timeline(instances: list[_Instance]) -> tuple[datetime | None, list[float]]:
    """The study epoch (naive wall time, or None) and each instance's reference time in seconds from it."""
    dated = [inst for inst in instances if inst.wall is not None]
    if not dated:
        return None, [0.0] * len(instances)
    if len(dated) != len(instances):
        undated = next(inst for inst in instances if inst.wall is None)
        raise ReaderError(undated.path, f"has no acquisition, content or study date/time, so it cannot be placed "
                          f"on the timeline of {dated[0].path}", kind="corrupt")
    zone = next((inst.utc_offset for inst in instances if inst.utc_offset is not None), None)
    walls = []
    for inst in instances:
        wall = inst.wall
        if zone is not None and inst.utc_offset is not None and inst.utc_offset != zone:
            wall = wall - inst.utc_offset + zone
        walls.append(wall)
    epoch = min(walls)
    return epoch, [(w - epoch).total_seconds() for w in walls]


# ---- merging -------------------------------------------------------------------------------------------------


def _assign_tracks(segments: list[_Segment], t0: float) -> list[_Track]:
    """Place each segment on a track (one output channel) of its label; see the module docstring."""
    by_label: dict[str, list[_Track]] = {}
    ordered = sorted(segments, key=lambda s: (s.start_s, s.order))
    for seg in ordered:
        first = round((seg.start_s - t0) * seg.rate)
        tolerance = max(1, math.ceil(0.001 * seg.rate))
        tracks = by_label.setdefault(seg.label, [])
        for track in tracks:
            if track.rate != seg.rate or track.unit != seg.unit:
                continue
            if first >= track.end - tolerance:
                if abs(first - track.end) <= tolerance:
                    first = track.end  # timestamp jitter: join seamlessly
                track.segments.append((seg, first))
                break
        else:
            for track in tracks:
                for other, _ in track.segments:
                    if other.path == seg.path:
                        continue
                    if track.rate != seg.rate or track.unit != seg.unit:
                        raise ReaderError(seg.path, f"channel {seg.label!r} is recorded at {seg.rate:g} Hz in "
                                          f"{seg.unit or 'no unit'} here but at {track.rate:g} Hz in "
                                          f"{track.unit or 'no unit'} in {other.path}", kind="unsupported")
                    o_start, o_end = other.start_s - t0, other.start_s - t0 + other.n / other.rate
                    s_start, s_end = seg.start_s - t0, seg.start_s - t0 + seg.n / seg.rate
                    if s_start < o_end and o_start < s_end:
                        raise ReaderError(seg.path, f"channel {seg.label!r} overlaps in time with the same "
                                          f"channel in {other.path} ({max(s_start, o_start):.3f} s to "
                                          f"{min(s_end, o_end):.3f} s from the study start)", kind="corrupt")
            track = _Track(seg.label, seg.rate, seg.unit)
            track.segments.append((seg, max(first, 0)))
            tracks.append(track)
    all_tracks = [track for tracks in by_label.values() for track in tracks]
    all_tracks.sort(key=lambda track: min(seg.order for seg, _ in track.segments))
    return all_tracks


def _build_channel(track: _Track, duration_s: float) -> Channel:
    n_total = max(track.end, round(duration_s * track.rate))
    data = np.zeros(n_total, dtype=np.float32)
    valid = np.zeros(n_total, dtype=bool)
    for seg, first in track.segments:
        data[first : first + seg.n] = seg.data
        valid[first : first + seg.n] = True if seg.valid is None else seg.valid
    code = next((seg.code for seg, _ in track.segments if seg.code is not None), None)
    track.segments.clear()  # release the decoded pieces before the channel takes its copy
    channel = Channel.from_array(track.label, track.rate, data, track.unit, valid=valid)
    channel.source_code = code
    return channel


# ---- annotations ---------------------------------------------------------------------------------------------


def _raw_annotations(ds) -> list[_RawAnnotation]:
    out: list[_RawAnnotation] = []
    for item in _value(ds, "WaveformAnnotationSequence") or []:
        text = _annotation_text(item)
        if not text:
            continue
        channels = _numbers(item, "ReferencedWaveformChannels")
        group = int(channels[0]) - 1 if channels and int(channels[0]) >= 1 else None
        positions = [int(p) for p in _numbers(item, "ReferencedSamplePositions")] or None
        offsets = [float(v) for v in _numbers(item, "ReferencedTimeOffsets")] or None
        stamps = [d for d in (_parse_dt(s) for s in _strings(item, "ReferencedDateTime")) if d is not None] or None
        if positions is None and offsets is None and stamps is None:
            continue  # no time: a statement about the whole object, skipped
        range_type = (_text(item, "TemporalRangeType") or "POINT").upper()
        out.append(_RawAnnotation(text, group, positions, offsets, stamps, range_type))
    return out


def _annotation_text(item) -> str | None:
    text = _text(item, "UnformattedTextValue")
    if text:
        return text
    names = _value(item, "ConceptNameCodeSequence")
    name = _text(names[0], "CodeMeaning") if names else None
    if not name:
        return None
    concepts = _value(item, "ConceptCodeSequence")
    concept = _text(concepts[0], "CodeMeaning") if concepts else None
    if concept:
        return f"{name}: {concept}"
    numeric = _text(item, "NumericValue")
    if numeric:
        units = _value(item, "MeasurementUnitsCodeSequence")
        unit = _text(units[0], "CodeValue") if units else None
        return f"{name}: {numeric}{' ' + unit if unit else ''}"
    return name


def _annotations(instance: _Instance, inst_start: float, t0: float, epoch: datetime | None) -> list[Annotation]:
    out: list[Annotation] = []
    for raw in instance.annotations:
        index = raw.group if raw.group is not None else 0
        if index in instance.templates:
            continue  # a time inside a median beat or other template, not on the timeline
        group = instance.timing.get(index)
        if raw.positions is not None:
            if group is None:
                continue
            times = [inst_start + group[0] / 1000.0 + (p - 1) / group[1] - t0 for p in raw.positions]
        elif raw.offsets_s is not None:
            base = inst_start + (group[0] / 1000.0 if group is not None else 0.0)
            times = [base + v - t0 for v in raw.offsets_s]
        else:
            if epoch is None:
                continue
            times = [(d.replace(tzinfo=None) - epoch).total_seconds() - t0 for d in raw.datetimes or []]
        if raw.range_type in ("SEGMENT", "MULTISEGMENT") and len(times) >= 2:
            for begin, end in zip(times[0::2], times[1::2], strict=False):
                out.append(Annotation(float(begin), float(max(end - begin, 0.0)), raw.text))
        else:
            out.extend(Annotation(float(t), None, raw.text) for t in times)
    return out


# ---- who -----------------------------------------------------------------------------------------------------


def _who(instances: list[_Instance], paths: list[Path]) -> tuple[Identifiers, Demographics]:
    first = instances[0]
    for other in instances[1:]:
        if other.patient_id and first.patient_id and other.patient_id != first.patient_id:
            raise ReaderError(other.path, f"Patient ID differs from the one in {first.path} (same study)",
                              kind="corrupt")

    def pick(name: str):
        return next((getattr(i, name) for i in instances if getattr(i, name) is not None), None)

    source = paths[0] if len(paths) == 1 else Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    values: dict[str, Any] = {
        "patient_id": pick("patient_id"),
        "patient_name": pick("patient_name"),
        "admin_code": pick("accession"),
        "source_path": source,
        "study_uid": first.study_uid,
        "patient_id_issuer": pick("issuer"),
        "scorer": pick("operator"),
    }
    sex = pick("sex")
    # An unrecognised code matters only when no instance gives M or F; identifier_limits reports it.
    demographics = Demographics(sex=sex, birth_date=pick("birth_date"), age_years=pick("age_years"),
                                sex_unrecognised=sex is None and any(i.sex_unrecognised for i in instances))
    return Identifiers(**values), demographics


# ---- small value helpers -------------------------------------------------------------------------------------


def _value(ds, keyword: str):
    if ds is None:
        return None
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert counts as absent
        return None
    if value is None or (isinstance(value, str | bytes) and len(value) == 0):
        return None
    return value


def _text(ds, keyword: str) -> str | None:
    value = _value(ds, keyword)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if not isinstance(value, str) and hasattr(value, "__iter__") and not hasattr(value, "family_name"):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _first_name(ds, keyword: str) -> str | None:
    """The first value of a person-name element (PN, may be multi-valued), as recorded (``Family^Given``,
    trailing empty components dropped); None when absent or empty."""
    value = _value(ds, keyword)
    if value is None:
        return None
    if not isinstance(value, str | bytes) and not hasattr(value, "family_name") and hasattr(value, "__iter__"):
        value = next((v for v in value if str(v).strip()), None)
        if value is None:
            return None
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    text = str(value).strip().strip("\x00").strip().rstrip("^").strip()
    return text or None


def _strings(ds, keyword: str) -> list[str]:
    value = _value(ds, keyword)
    if value is None:
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        value = [value]
    return [str(v).strip() for v in value if str(v).strip()]


def _numbers(ds, keyword: str) -> list:
    value = _value(ds, keyword)
    if value is None:
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _int(path: Path, where: str, ds, keyword: str) -> int:
    value = _value(ds, keyword)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ReaderError(path, f"{where}: {keyword} {value!r} is not an integer", kind="corrupt") from None


def _opt_float(path: Path, where: str, ds, keyword: str) -> float | None:
    value = _value(ds, keyword)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ReaderError(path, f"{where}: {keyword} {value!r} is not a number", kind="corrupt") from None
    if not math.isfinite(number):
        raise ReaderError(path, f"{where}: {keyword} {value!r} is not a finite number", kind="corrupt")
    return number


def _float(path: Path, where: str, ds, keyword: str) -> float:
    number = _opt_float(path, where, ds, keyword)
    if number is None:
        raise ReaderError(path, f"{where}: missing {keyword}", kind="corrupt")
    return number


def _sex(value: str | None) -> str | None:
    value = (value or "").strip().upper()
    return value if value in ("M", "F") else None


def _sex_unrecognised(value: str | None) -> bool:
    """True for a Patient's Sex that is not one of PS3.3's codes (M, F, O) nor empty."""
    return (value or "").strip().upper() not in ("", "M", "F", "O")
