"""The one :class:`Recording` type that every reader (EDF/BDF today; EDF+D and DICOM waveform later) produces.

A recording holds channel *metadata* only. Samples are fetched on demand with :meth:`Channel.read`,
which goes back to the source on every call and returns a fresh float32 array in physical units
that the caller owns; nothing is cached. A caller can therefore process one channel at a time and
keep at most one native-rate channel in memory.

PHI: patient id, patient name, birth date, admin/accession code, start date and the source path are
available as attributes but never appear in ``repr()``/``str()`` of any type here, so a recording can
be logged or shown in a traceback without leaking them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

SampleSource = Callable[[], np.ndarray]
"""Returns a channel's physical samples as a new float32 array on every call."""

ValiditySource = Callable[[], np.ndarray]
"""Returns a bool array, one per sample, True where the sample was measured (False in a gap)."""

_REDACTED = "<redacted>"


def _detached_source() -> np.ndarray:
    raise RuntimeError("the samples of a detached recording are not available")

_DAYS_PER_YEAR = 365.2425


@dataclass(eq=False)
class Channel:
    """One signal of a recording: label, rate, unit and a way to (re-)read its samples.

    ``label`` is as recorded, with trailing spaces stripped. ``unit`` is the physical dimension as
    recorded (``"uV"``, ``"mV"``, ``"%"``, ``""`` ...). ``prefilter``/``transducer`` are informational.
    ``source_code`` is the channel's coded source (scheme, value) where the format has one (DICOM).
    A channel with gaps (EDF+D, DICOM padding, instances that do not meet) has a validity source:
    its samples in a gap are filled (with 0) and :meth:`read_valid` says which they are.
    ``physical_range`` is (low, high), the physical values of the digital limits where the format
    records them (EDF/BDF header physical minimum/maximum): a signal pinned there is saturated. None
    when unknown (DICOM waveforms, in-memory channels) or when the header gives no scaling.
    """

    label: str
    sampling_rate: float
    unit: str
    n_samples: int
    _source: SampleSource = field(repr=False)
    prefilter: str = ""
    transducer: str = ""
    _valid: ValiditySource | None = field(default=None, repr=False)
    physical_range: tuple[float, float] | None = None
    # The coded source of the channel where the format records one (DICOM Channel Source Sequence):
    # (coding scheme designator, code value), e.g. ("SCPECG", "5.6.3-9-1"); None otherwise. Montage
    # ``code`` rules are tried on it before the label.
    source_code: tuple[str, str] | None = None

    @property
    def has_gaps(self) -> bool:
        return self._valid is not None

    def read_valid(self) -> np.ndarray | None:
        """Bool per sample, True where measured; None when the channel has no gaps."""
        if self._valid is None:
            return None
        valid = np.asarray(self._valid(), dtype=bool).reshape(-1)
        if valid.size != self.n_samples:
            raise ValueError(f"channel {self.label!r}: validity mask has {valid.size} values for "
                             f"{self.n_samples} samples")
        return valid

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.sampling_rate if self.sampling_rate > 0 else 0.0

    def read(self) -> np.ndarray:
        """The channel's physical samples as a new 1-D float32 array (read from the source each call)."""
        data = self._source()
        if data.dtype != np.float32 or data.ndim != 1:
            data = np.asarray(data, dtype=np.float32).reshape(-1)
        return data

    @classmethod
    def from_array(
        cls,
        label: str,
        rate: float,
        data: np.ndarray,
        unit: str = "uV",
        *,
        prefilter: str = "",
        transducer: str = "",
        valid: np.ndarray | None = None,
        physical_range: tuple[float, float] | None = None,
    ) -> Channel:
        """A channel backed by an in-memory array (tests, synthetic nights, decoded DICOM waveforms).

        The array is copied once (as float32); each :meth:`read` returns a fresh copy, so a caller may
        modify what it gets without affecting later reads.
        """
        if rate <= 0:
            raise ValueError(f"channel {label!r}: sampling rate must be positive, got {rate}")
        samples = np.array(data, dtype=np.float32, copy=True).reshape(-1)
        samples.flags.writeable = False
        valid_source = None
        if valid is not None:
            mask = np.array(valid, dtype=bool, copy=True).reshape(-1)
            if mask.size != samples.size:
                raise ValueError(f"channel {label!r}: validity mask has {mask.size} values for "
                                 f"{samples.size} samples")
            if not mask.all():
                mask.flags.writeable = False
                valid_source = mask.copy
        return cls(
            label=label.rstrip(),
            sampling_rate=float(rate),
            unit=unit,
            n_samples=int(samples.size),
            _source=samples.copy,
            prefilter=prefilter,
            transducer=transducer,
            _valid=valid_source,
            physical_range=checked_range(physical_range),
        )


def checked_range(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    """``bounds`` as (low, high) floats; None for None, or for a range without width or not finite."""
    if bounds is None:
        return None
    low, high = sorted((float(bounds[0]), float(bounds[1])))
    return (low, high) if math.isfinite(low) and math.isfinite(high) and high > low else None


@dataclass
class Demographics:
    """What the model may use about the patient. ``birth_date`` is PHI and is never shown in ``repr``."""

    sex: str | None = None  # "M", "F" or None (unknown / not recorded)
    birth_date: date | None = None
    age_years: float | None = None  # when the source gives an age rather than a birth date
    # The source gave a sex code that is neither M/F nor a code for unknown/other: ``sex`` is then None, and
    # gateway.identifier_limits turns this into a warning (a reader has no say in the recording's warnings).
    sex_unrecognised: bool = False

    def __post_init__(self) -> None:
        if self.sex not in (None, "M", "F"):
            raise ValueError(f"sex must be 'M', 'F' or None, got {self.sex!r}")

    def age_at(self, when: datetime | date | None) -> float | None:
        """Age in years at ``when`` (the recording start) from the birth date; else ``age_years``.

        Returns None when neither is known, or when the birth date is after ``when`` (bad header).
        """
        if self.birth_date is not None and when is not None:
            day = when.date() if isinstance(when, datetime) else when
            days = (day - self.birth_date).days
            if days >= 0:
                return days / _DAYS_PER_YEAR
            return None
        return self.age_years

    def __repr__(self) -> str:
        birth = _REDACTED if self.birth_date is not None else None
        unrecognised = ", sex_unrecognised=True" if self.sex_unrecognised else ""
        return f"Demographics(sex={self.sex!r}, birth_date={birth}, age_years={self.age_years!r}{unrecognised})"

    __str__ = __repr__


@dataclass
class Identifiers:
    """Who/what the recording is about. Read so that the pipeline can match studies; never logged."""

    patient_id: str | None = None
    patient_name: str | None = None
    admin_code: str | None = None  # EDF+ hospital administration code / DICOM accession number
    source_path: Path | None = None
    study_uid: str | None = None  # DICOM Study Instance UID
    patient_id_issuer: str | None = None  # DICOM Issuer of Patient ID (assigning authority)
    # Who scored the recording's hypnogram: the EDF+ header's technician, DICOM Operators' Name or a sidecar's
    # ``scorer``. A staff name, not the patient's, but kept out of logs and ``repr`` like the others.
    scorer: str | None = None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={_REDACTED if getattr(self, name) else None}"
            for name in ("patient_id", "patient_name", "admin_code", "source_path", "study_uid",
                         "patient_id_issuer", "scorer")
        )
        return f"Identifiers({shown})"

    __str__ = __repr__


class Annotation(NamedTuple):
    """One annotation: onset and duration in seconds from the recording start (duration None: unknown)."""

    onset_s: float
    duration_s: float | None
    text: str


@dataclass
class Recording:
    """A decoded PSG recording: channels (metadata + sample sources), timing, identifiers, demographics.

    ``start`` may be None when the source does not record it. ``format`` names the decoder's view of the
    source (``"EDF"``, ``"EDF+C"``, ``"BDF"``, ``"BDF+C"``, ``"memory"`` ...).
    """

    channels: list[Channel]
    duration_s: float
    start: datetime | None = None
    identifiers: Identifiers = field(default_factory=Identifiers)
    demographics: Demographics = field(default_factory=Demographics)
    annotations: list[Annotation] = field(default_factory=list)
    format: str = "memory"
    warnings: list[str] = field(default_factory=list)  # problems that did not stop decoding; no PHI

    @property
    def channel_labels(self) -> list[str]:
        """The channel labels in recording order (duplicates kept)."""
        return [channel.label for channel in self.channels]

    @property
    def channel_codes(self) -> list[tuple[str, str] | None]:
        """Each channel's coded source (scheme, value) or None, in recording order (for montage code rules)."""
        return [channel.source_code for channel in self.channels]

    @property
    def highest_rate(self) -> float | None:
        """The recording's highest sampling rate: the top rate over all its signal channels, mapped or
        not (annotation signals are not channels).

        This is the rate the SleepFM release's reader (MNE) brings every channel to before its own
        preprocessing, and preprocessing reproduces that step. For an EDF+D/BDF+D file it is the top
        rate of its signals whatever the gaps; for a DICOM study, the top rate over all its waveform
        objects and multiplex groups, as if the study had been exported to one EDF file. None for a
        recording without channels.
        """
        return max((c.sampling_rate for c in self.channels), default=None)

    @property
    def age_years(self) -> float | None:
        """The patient's age at the recording start, if known."""
        return self.demographics.age_at(self.start)

    def detached(self) -> Recording:
        """This recording without its sample sources (which hold open files): metadata, identifiers
        and annotations only, cheap to pickle into another process. Reading a channel then raises."""
        channels = [dataclasses.replace(c, _source=_detached_source, _valid=None) for c in self.channels]
        return dataclasses.replace(self, channels=channels)

    def to_mne(self, **options):
        """This recording as an MNE ``RawArray``: see :func:`gateway.interop.mne.to_mne` (needs the
        ``mne`` extra)."""
        from .interop.mne import to_mne

        return to_mne(self, **options)

    @classmethod
    def from_mne(cls, raw) -> Recording:
        """An MNE ``Raw`` as a recording: see :func:`gateway.interop.mne.from_mne` (needs the ``mne`` extra)."""
        from .interop.mne import from_mne

        return from_mne(raw)

    def __repr__(self) -> str:
        # Deliberately no identifiers, no dates, no path, no annotation texts (free text may hold PHI).
        rates = sorted({round(c.sampling_rate, 3) for c in self.channels})
        return (
            f"Recording(format={self.format!r}, channels={len(self.channels)}, "
            f"duration_s={self.duration_s:.1f}, rates_hz={rates}, sex={self.demographics.sex!r}, "
            f"annotations={len(self.annotations)}, warnings={len(self.warnings)})"
        )

    __str__ = __repr__
