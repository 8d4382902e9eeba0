"""Build valid DICOM waveform instances from numpy arrays: for tests, demos and the DICOM receiver's tests.

No real person, no real data: every identifier here is fake.

* :func:`make_waveform_dataset` builds one complete waveform instance (file meta, Patient, General Study,
  General Series, Synchronization, General Equipment, Waveform Identification, Acquisition Context,
  Waveform, Waveform Annotation and SOP Common modules) from :class:`WaveformGroup` s of
  :class:`WaveformChannel` s given in physical units. Each channel is encoded as
  ``raw = round((physical - baseline) / (sensitivity * correction))`` so that the reader's
  ``physical = raw * sensitivity * correction + baseline`` gives it back within half a step.
* :func:`write_waveform_file` writes one with file meta (Explicit VR Little Endian by default).
* :func:`write_psg_study` writes a synthetic PSG study as three instances of one study: a Sleep EEG object
  (EEG 256 Hz, EOG 256 Hz, chin and leg EMG 512 Hz), a Multi-channel Respiratory object (airflow, thoracic
  and abdominal effort 32 Hz, SpO2 1 Hz) and a General ECG object (ECG II 512 Hz), with labels the default
  montage table maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from ..readers.dicom_waveform import WAVEFORM_SOP_CLASSES

__all__ = [
    "GENERAL_ECG",
    "MULTICHANNEL_RESPIRATORY",
    "SLEEP_EEG",
    "SyntheticAnnotation",
    "SyntheticPatient",
    "WaveformChannel",
    "WaveformGroup",
    "make_waveform_dataset",
    "write_psg_study",
    "write_waveform_file",
]

SLEEP_EEG = "1.2.840.10008.5.1.4.1.1.9.7.4"
MULTICHANNEL_RESPIRATORY = "1.2.840.10008.5.1.4.1.1.9.6.2"
GENERAL_ECG = "1.2.840.10008.5.1.4.1.1.9.1.2"

_UNIT_MEANINGS = {"uV": "microvolt", "mV": "millivolt", "V": "volt", "%": "percent", "{ratio}": "ratio",
                  "L/s": "liter per second", "cm[H2O]": "centimeter of water", "Pa": "pascal"}
_DTYPES = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16,
           (32, True): np.int32, (32, False): np.uint32}
_LOCAL_SCHEME = "99PSGGW"  # a private coding scheme for the channel sources of synthetic data


@dataclass
class WaveformChannel:
    """One channel in physical units.

    ``sensitivity`` is the nominal value of one LSB (None: chosen so that the largest value uses about 90% of
    the sample range); ``baseline`` is the physical value of raw 0 (None: 0 for signed samples, the smallest
    value for unsigned ones); ``gaps`` (bool, True where there is no data) are written as the group's padding
    value. ``write_label=False`` leaves out Channel Label so that a reader must use the source code meaning.
    """

    label: str
    samples: np.ndarray
    unit: str = "uV"
    sensitivity: float | None = None
    correction: float = 1.0
    baseline: float | None = None
    gaps: np.ndarray | None = None
    write_label: bool = True
    source_meaning: str | None = None  # Code Meaning of the Channel Source; default: the label
    status: str | None = None  # Channel Status, e.g. "OK", "DISCONNECTED"


@dataclass
class WaveformGroup:
    """One multiplex group: channels sharing a rate and a length."""

    rate: float
    channels: Sequence[WaveformChannel]
    time_offset_ms: float = 0.0
    bits_allocated: int = 16
    signed: bool = True
    padding_value: int | None = None  # raw; default when a channel has gaps: the most negative (signed) or max
    label: str = ""
    originality: str = "ORIGINAL"


@dataclass(frozen=True)
class SyntheticPatient:
    """Fake patient and study identifiers."""

    patient_id: str = "SYN-0000"
    issuer: str | None = "PSG-GATEWAY-SYNTHETIC"
    name: str = "Synthetic^Night"
    sex: str = "F"
    birth_date: date | None = date(1970, 5, 17)
    age: str | None = "054Y"
    accession: str = "SYNACC-0000"
    operator: str | None = None  # Operators' Name (0008,1070): who scored the study (a fake staff name)


@dataclass(frozen=True)
class SyntheticAnnotation:
    """A text at a time of a group (seconds from the group's first sample); duration makes it a SEGMENT."""

    text: str
    onset_s: float
    duration_s: float | None = None
    group: int = 0


@dataclass
class _Encoded:
    raw: np.ndarray
    sensitivity: DSfloat
    correction: DSfloat
    baseline: DSfloat


def _ds(value: float) -> DSfloat:
    """A number as a DICOM DS (at most 16 characters), read back so encoder and reader use the same value."""
    return DSfloat(float(value), auto_format=True)


def _encode(channel: WaveformChannel, dtype: type, padding: int | None, n: int) -> _Encoded:
    x = np.asarray(channel.samples, dtype=np.float64).reshape(-1)
    if x.size != n:
        raise ValueError(f"channel {channel.label!r}: {x.size} samples, the group has {n}")
    gaps = None if channel.gaps is None else np.asarray(channel.gaps, dtype=bool).reshape(-1)
    if gaps is not None and gaps.size != n:
        raise ValueError(f"channel {channel.label!r}: gap mask has {gaps.size} values for {n} samples")
    info = np.iinfo(dtype)
    correction = _ds(channel.correction)
    measured = x if gaps is None else x[~gaps]
    if channel.baseline is not None:
        baseline = _ds(channel.baseline)
    elif info.min < 0 or measured.size == 0:
        baseline = _ds(0.0)
    else:  # unsigned samples: raw 0 is the smallest value (rounded down so that nothing falls below it)
        low = float(np.min(measured))
        baseline = _ds(low - abs(low) * 1e-6 - 1e-9)
    centred = x - float(baseline)
    if channel.sensitivity is None:
        measured = centred if gaps is None else centred[~gaps]
        peak = float(np.max(np.abs(measured))) if measured.size else 0.0
        top = 0.9 * min(info.max, -int(info.min) if info.min < 0 else info.max)
        sensitivity = _ds(peak / top / float(correction) if peak > 0 else 1.0)
    else:
        sensitivity = _ds(channel.sensitivity)
    step = float(sensitivity) * float(correction)
    raw = np.rint(centred / step)
    lo, hi = float(info.min), float(info.max)
    if padding is not None and padding == info.min:
        lo += 1
    elif padding is not None and padding == info.max:
        hi -= 1
    raw = np.clip(raw, lo, hi).astype(dtype)
    if padding is not None:
        raw[raw == padding] = padding + 1 if padding < info.max else padding - 1
        if gaps is not None:
            raw[gaps] = padding
    return _Encoded(raw, sensitivity, correction, baseline)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value[:16]
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning[:64]
    return item


def _group_item(group: WaveformGroup, index: int, synchronized: bool = False) -> Dataset:
    if not group.channels:
        raise ValueError(f"group {index + 1}: no channel")
    key = (group.bits_allocated, group.signed)
    if key not in _DTYPES:
        raise ValueError(f"group {index + 1}: {group.bits_allocated}-bit samples are not supported here")
    dtype = _DTYPES[key]
    n = int(np.asarray(group.channels[0].samples).size)
    padding = group.padding_value
    if padding is None and any(c.gaps is not None and np.any(c.gaps) for c in group.channels):
        info = np.iinfo(dtype)
        padding = int(info.min) if group.signed else int(info.max)

    item = Dataset()
    if synchronized:
        # Type 1C: required when Acquisition Time Synchronized is Y, and dciodvfy refuses it otherwise; the
        # instance is synchronized exactly when one of its groups starts later than the others (a reader takes
        # a missing offset as 0 ms, so groups without one start at the reference time).
        item.MultiplexGroupTimeOffset = _ds(group.time_offset_ms)
    # Trigger Time Offset (1C) is for a SOURCE or EXTERNAL Synchronization Trigger: not written (NO TRIGGER).
    item.WaveformOriginality = group.originality
    item.NumberOfWaveformChannels = len(group.channels)
    item.NumberOfWaveformSamples = n
    item.SamplingFrequency = _ds(group.rate)
    if group.label:
        item.MultiplexGroupLabel = group.label
    definitions = []
    columns = []
    for c, channel in enumerate(group.channels):
        encoded = _encode(channel, dtype, padding, n)
        columns.append(encoded.raw)
        definition = Dataset()
        definition.ChannelSourceSequence = DicomSequence([
            _code(f"CH{index + 1}.{c + 1}", _LOCAL_SCHEME, channel.source_meaning or channel.label)])
        if channel.write_label:
            definition.ChannelLabel = channel.label
        if channel.status:
            definition.ChannelStatus = channel.status
        definition.ChannelSensitivity = encoded.sensitivity
        definition.ChannelSensitivityUnitsSequence = DicomSequence([
            _code(channel.unit, "UCUM", _UNIT_MEANINGS.get(channel.unit, channel.unit or "no unit"))])
        definition.ChannelSensitivityCorrectionFactor = encoded.correction
        definition.ChannelBaseline = encoded.baseline
        definition.ChannelSampleSkew = _ds(0.0)
        definition.WaveformBitsStored = group.bits_allocated
        definitions.append(definition)
    item.ChannelDefinitionSequence = DicomSequence(definitions)
    item.WaveformBitsAllocated = group.bits_allocated
    item.WaveformSampleInterpretation = {8: "SB", 16: "SS", 32: "SL"}[group.bits_allocated] if group.signed \
        else {8: "UB", 16: "US", 32: "UL"}[group.bits_allocated]
    vr = "OB" if group.bits_allocated == 8 else "OW"
    little = np.dtype(dtype).newbyteorder("<")
    if padding is not None:
        item.add_new(0x5400100A, vr, np.array([padding], dtype=little).tobytes())
    interleaved = np.stack(columns, axis=1).astype(little, copy=False)
    item.add_new(0x54001010, vr, interleaved.tobytes())
    return item


def make_waveform_dataset(
    sop_class: str,
    groups: Sequence[WaveformGroup],
    *,
    patient: SyntheticPatient | None = None,
    acquisition: datetime = datetime(2024, 3, 1, 22, 30, 0),
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    annotations: Sequence[SyntheticAnnotation] = (),
    write_acquisition_datetime: bool = True,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A complete waveform instance of ``sop_class`` (any UID; see ``WAVEFORM_SOP_CLASSES``) with file meta.

    ``acquisition`` is the Acquisition DateTime (and Content Date/Time); ``write_acquisition_datetime=False``
    leaves Acquisition DateTime out so that a reader falls back to Content Date/Time. UIDs default to new
    random ones (pass them for reproducible files).
    """
    patient = patient or SyntheticPatient()
    known = WAVEFORM_SOP_CLASSES.get(str(sop_class))
    study_uid = study_uid or generate_uid()
    instance_uid = instance_uid or generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PSG_GW_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(instance_uid)
    ds.InstanceCreationDate = acquisition.strftime("%Y%m%d")
    ds.InstanceCreationTime = acquisition.strftime("%H%M%S")
    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    if patient.issuer:
        ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d") if patient.birth_date else ""
    ds.PatientSex = patient.sex or ""
    if patient.age:
        ds.PatientAge = patient.age
    # General Study
    ds.StudyInstanceUID = UID(study_uid)
    ds.StudyDate = acquisition.strftime("%Y%m%d")
    ds.StudyTime = acquisition.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = patient.accession
    ds.StudyDescription = "Synthetic polysomnography"
    # General Series
    ds.Modality = known.modality if known else "OT"
    ds.SeriesInstanceUID = UID(series_uid or generate_uid())
    ds.SeriesNumber = series_number
    if patient.operator:
        ds.OperatorsName = patient.operator
    # Synchronization (mandatory in every waveform IOD): the study's instances share one synchronization
    # frame of reference (0020,0200), derived from the Study Instance UID (not the spatial Frame of Reference
    # UID (0020,0052), which no waveform IOD has).
    synchronized = any(float(g.time_offset_ms) != 0.0 for g in groups)
    ds.SynchronizationFrameOfReferenceUID = UID(generate_uid(entropy_srcs=[str(study_uid), "frame-of-reference"]))
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "Y" if synchronized else "N"
    # General Equipment
    ds.Manufacturer = "psg-gateway synthetic"
    # Waveform Identification
    ds.InstanceNumber = instance_number
    ds.ContentDate = acquisition.strftime("%Y%m%d")
    ds.ContentTime = acquisition.strftime("%H%M%S.%f")
    if write_acquisition_datetime:
        ds.AcquisitionDateTime = acquisition.strftime("%Y%m%d%H%M%S.%f")
    # Acquisition Context (type 2: present, may be empty)
    ds.AcquisitionContextSequence = DicomSequence([])
    # Waveform
    ds.WaveformSequence = DicomSequence([_group_item(g, i, synchronized) for i, g in enumerate(groups)])
    if annotations:
        ds.WaveformAnnotationSequence = DicomSequence([_annotation_item(a, groups) for a in annotations])
    return ds


def _annotation_item(annotation: SyntheticAnnotation, groups: Sequence[WaveformGroup]) -> Dataset:
    rate = groups[annotation.group].rate
    item = Dataset()
    item.UnformattedTextValue = annotation.text
    item.ReferencedWaveformChannels = [annotation.group + 1, 0]
    first = round(annotation.onset_s * rate) + 1
    if annotation.duration_s is None:
        item.TemporalRangeType = "POINT"
        item.ReferencedSamplePositions = first
    else:
        item.TemporalRangeType = "SEGMENT"
        item.ReferencedSamplePositions = [first, first + round(annotation.duration_s * rate)]
    item.AnnotationGroupNumber = 1
    return item


def write_waveform_file(path: str | Path, ds: Dataset) -> Path:
    """Write ``ds`` (from :func:`make_waveform_dataset`) as a DICOM Part 10 file with preamble and file meta."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---- a synthetic PSG study -----------------------------------------------------------------------------------


@dataclass
class _Signals:
    rng: np.random.Generator
    seconds: float
    cache: dict[float, np.ndarray] = field(default_factory=dict)

    def t(self, rate: float) -> np.ndarray:
        if rate not in self.cache:
            self.cache[rate] = np.arange(round(self.seconds * rate)) / rate
        return self.cache[rate]

    def noise(self, rate: float, scale: float) -> np.ndarray:
        return (scale * self.rng.standard_normal(self.t(rate).size)).astype(np.float32)

    def eeg(self, rate: float) -> np.ndarray:
        t = self.t(rate)
        depth = 0.5 * (1 - np.cos(2 * np.pi * t / 5400.0))
        return (12 * (1 - depth) * np.sin(2 * np.pi * self.rng.uniform(9, 11) * t)
                + 40 * depth * np.sin(2 * np.pi * 1.2 * t + self.rng.uniform(0, 6)) + self.noise(rate, 8)
                ).astype(np.float32)

    def breath(self, rate: float, lag: float, scale: float) -> np.ndarray:
        t = self.t(rate)
        return (scale * np.sin(2 * np.pi * (0.25 * t - lag)) + self.noise(rate, scale * 0.05)).astype(np.float32)

    def ecg(self, rate: float) -> np.ndarray:
        frac = np.mod(self.t(rate) * 62 / 60, 1.0)
        return (1.2 * np.exp(-(((frac - 0.2) / 0.01) ** 2)) + 0.3 * np.exp(-(((frac - 0.45) / 0.05) ** 2))
                + self.noise(rate, 0.01)).astype(np.float32)


def write_psg_study(folder: str | Path, hours: float = 8.0, seed: int = 0,
                    start: datetime | None = None, operator: str | None = None) -> list[Path]:
    """Write a synthetic PSG study (three instances, one study, fake patient) into ``folder``; return the files.

    ``eeg.dcm`` (Sleep EEG: F3-M2 F4-M1 C3-M2 C4-M1 O1-M2 O2-M1 at 256 Hz; E1-M2 E2-M1 at 256 Hz; Chin1-Chin2
    LLeg RLeg at 512 Hz), ``resp.dcm`` (Multi-channel Respiratory: Airflow Thor Abdo at 32 Hz, SpO2 at
    1 Hz in %) and ``ecg.dcm`` (General ECG: ECG II at 512 Hz in mV). Identical for the same ``seed``.
    ``operator``: an Operators' Name for every instance (the study's scorer; default: none written).
    """
    folder = Path(folder)
    seconds = round(hours * 3600)
    if seconds < 1:
        raise ValueError(f"hours must give at least one second, got {hours}")
    rng = np.random.default_rng(seed)
    sig = _Signals(rng, float(seconds))
    start = start or datetime(2024, 3, 1, 22, 30, 0) + timedelta(days=int(rng.integers(0, 300)))
    birth = date(1950, 1, 1) + timedelta(days=int(rng.integers(0, 40 * 365)))
    age_years = int((start.date() - birth).days // 365.2425)
    patient = SyntheticPatient(patient_id=f"SYN-{seed:04d}", sex="F" if rng.integers(2) else "M",
                               birth_date=birth, age=f"{age_years:03d}Y", accession=f"SYNACC-{seed:04d}",
                               operator=operator)

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["psg-gateway-synthetic", str(seed), *map(str, parts)])

    study_uid = uid("study")
    eeg_labels = ("F3-M2", "F4-M1", "C3-M2", "C4-M1", "O1-M2", "O2-M1")
    eeg = [
        WaveformGroup(256, [WaveformChannel(lb, sig.eeg(256)) for lb in eeg_labels], label="EEG"),
        WaveformGroup(256, [WaveformChannel(lb, sig.noise(256, 20) + 30 * np.sin(2 * np.pi * sig.t(256) / 7,
                                                                                 dtype=np.float32))
                            for lb in ("E1-M2", "E2-M1")], label="EOG"),
        WaveformGroup(512, [WaveformChannel(lb, sig.noise(512, s)) for lb, s in
                            (("Chin1-Chin2", 10.0), ("LLeg", 5.0), ("RLeg", 5.0))], label="EMG"),
    ]
    resp = [
        WaveformGroup(32, [WaveformChannel("Airflow", sig.breath(32, 0.0, 300.0)),
                           WaveformChannel("Thor", sig.breath(32, 0.05, 600.0)),
                           WaveformChannel("Abdo", sig.breath(32, 0.08, 500.0))], label="RESPIRATION"),
        WaveformGroup(1, [WaveformChannel("SpO2", 96.0 + np.clip(sig.noise(1, 0.7), -3, 3), unit="%",
                                          sensitivity=0.01)], label="OXIMETRY"),
    ]
    ecg = [WaveformGroup(512, [WaveformChannel("ECG II", sig.ecg(512), unit="mV", sensitivity=0.001)],
                         label="ECG")]
    files = []
    for n, (name, sop, groups) in enumerate((("eeg.dcm", SLEEP_EEG, eeg),
                                              ("resp.dcm", MULTICHANNEL_RESPIRATORY, resp),
                                              ("ecg.dcm", GENERAL_ECG, ecg)), start=1):
        annotations = (SyntheticAnnotation("Lights off", min(60.0, seconds / 4)),
                       SyntheticAnnotation("Lights on", max(seconds - 60.0, seconds * 3 / 4))) if n == 1 else ()
        ds = make_waveform_dataset(sop, groups, patient=patient, acquisition=start, study_uid=study_uid,
                                   series_uid=uid("series", n), instance_uid=uid("instance", n), series_number=n,
                                   annotations=annotations)
        files.append(write_waveform_file(folder / name, ds))
        del ds, groups
    return files
