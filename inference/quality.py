"""Signal quality of a PSG recording, channel by channel and for the study (pure compute, no I/O).

The gate runs before the flag step, on what preprocessing already holds in memory: each channel's raw
samples (native rate, physical units, validity mask) and its 128 Hz preprocessed row. Per channel it
measures, per 30-s epoch (the AASM scoring epoch; YASA's ``art_detect`` and Luna's ``SIGSTATS`` /
``CHEP-MASK`` also judge epochs, not samples):

========================  ======================================================================
``flat``                  the epoch's peak-to-peak range is at most ``flat_epsilon`` physical
                          units: a flat line (YASA marks an epoch flat when all its samples are
                          equal; Luna's ``SIGSTATS flat`` counts steps ``|x[i]-x[i-1]| < 1e-6``)
``clipped``               more than ``clip_epoch_fraction`` of the epoch's samples sit at the
                          channel's physical minimum or maximum (the digital limits), within
                          ``clip_tolerance`` of the physical span (Luna's ``MiscMath::clipped``
                          tolerance; its older ``SIGSTATS`` excluded an epoch above 5 % clipped)
gap                       half or more of the epoch's samples are not measured (EDF+D, DICOM)
========================  ======================================================================

and, on a sample of ``sample_epochs`` evenly spaced epochs with a signal (enough for a night-level
figure, and cheap):

* **mains interference**: the line-noise ratio of Luna's ``COMBINE-EMG`` (power at 50 +/- ``line_noise_band_hz``
  or 60 +/- ``line_noise_band_hz`` Hz, whichever is larger, over the power from 10 Hz to
  min(100 Hz, Nyquist - 0.5 Hz); Welch with 4-s Hann segments and 2-s steps), median over the sampled
  epochs. It needs content in the mains bands: the 60-Hz band needs a sampling rate above 2 x 61 Hz,
  the 50-Hz band above 2 x 51 Hz. Between 102 and 122 Hz only 50 Hz is measured; at 102 Hz or less
  (Sleep-EDF's 100 Hz) ``line_noise_ratio`` is None; a note says which;
* **amplitude**: a robust standard deviation per epoch (1.4826 x the median absolute deviation from
  the epoch's median), median over the sampled epochs, compared in microvolts with the modality's
  plausible range. Only voltage channels (``uV``/``mV``/``V``) sampled at ``amplitude_min_rate_hz``
  or more are judged (a 1-Hz "EMG" is an envelope, e.g. Sleep-EDF's RMS chin EMG); other units (``%``,
  ``cmH2O``, blank...) are skipped with a note.

From the 128 Hz row (the model's view: z-scored over the night) it takes the typical epoch standard
deviation; near 1 for a stationary channel, near 0 when a few huge artifacts set the channel's scale
and squash the rest of the night (``artifact_dominated``; judged on EEG/EOG and ECG, which are
continuous by nature, not on snore or EMG, which burst).

Problem codes, in this order: ``flat`` (flat in at least ``flat_max_fraction`` of the epochs with
data), ``disconnected`` (no signal, flat or gap, for ``disconnected_min_seconds`` in a row; not reported
for a channel already ``flat``), ``gaps`` (``gap_max_fraction`` of the samples not measured),
``clipped`` (``clipped_max_fraction`` of the epochs with data), ``line_noise``, ``amplitude_low``,
``amplitude_high``, ``artifact_dominated``, ``non_finite`` (the row holds NaN or infinity), and
``dropped`` (set by the caller when preprocessing refused the channel). A channel with no problem is
usable.

Oximeter trends (units ``%`` and beats per minute: SpO2, pulse rate) hold one integer value for many
seconds and sit at the top of their range (SpO2 100 %) legitimately: for them only a constant whole
night is flat, only gaps count toward a dropout, and saturation is not judged.

The study is interpretable unless a modality that is present has no usable channel, or more than
``max_unusable_fraction`` of the mapped channels are unusable. A missing modality is not judged
here (the flag step handles it).

Cost: two passes over the samples (per-epoch minimum and maximum) plus fixed work on the sampled
epochs; about 0.2 s for an 8-hour, 18-channel night on 2 CPU cores, against ~6 s of preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = [
    "ChannelQuality",
    "QualityThresholds",
    "StudyQuality",
    "assess_channel",
    "assess_row",
    "assess_study",
    "microvolts_per_unit",
]

MODALITIES = ("BAS", "RESP", "EKG", "EMG")
_MAD_TO_SD = 1.4826  # the median absolute deviation of a normal distribution is 0.6745 sd
_ROW_RATE = 128.0  # the preprocessed row's rate (inference.preprocess.TARGET_RATE)
_LINE_HZ = (50.0, 60.0)
_WELCH_SEGMENT_S = 4.0  # Luna's COMBINE-EMG line-noise Welch: 4-s segments, 2-s steps
_AMPLITUDE_SAMPLES = 2048  # samples per epoch for the robust SD
_TREND_UNITS = frozenset({"%", "bpm", "/min", "1/min", "beats/min", "b/min"})

# Plausible robust amplitude (µV) per modality: (lowest, highest); None: no bound on that side.
DEFAULT_AMPLITUDE_UV: Mapping[str, tuple[float | None, float | None]] = MappingProxyType({
    # YASA refuses EEG/EOG/EMG whose trimmed standard deviation is outside 0.1-1000 µV ("Unit of data
    # MUST be uV!", yasa.detection._check_data_hypno): a unit or gain error, or no signal at all.
    "BAS": (0.1, 1000.0),
    "EMG": (0.1, 1000.0),
    # ECG: a QRS complex is about 1 mV; ECG amplifiers take +/-5 mV of input (the dynamic range of the
    # IEC 60601-2-25 / AHA recommendations), so a typical deviation above 5 mV is not an ECG in mV, and
    # below 5 µV there is no ECG above the amplifier's noise.
    "EKG": (5.0, 5000.0),
    # RESP: flow, effort, pressure and oximetry come in many units and gains; only an order-of-magnitude
    # error on a voltage channel is caught (generous by design).
    "RESP": (0.01, 1.0e6),
})


@dataclass(frozen=True)
class QualityThresholds:
    """Every threshold of the signal-quality gate, with its source.

    Parameters
    ----------
    epoch_seconds : float, default 30.0
        Epoch length in seconds: the AASM scoring epoch (the AASM Manual for the Scoring of Sleep and
        Associated Events); YASA and Luna judge artifacts per epoch too.
    flat_epsilon : float, default 1e-6
        An epoch is flat when its peak-to-peak range is at most this many physical units: Luna's
        ``SIGSTATS flat`` epsilon (``|x[i]-x[i-1]| < 1e-6``), applied to the whole epoch as YASA's
        ``art_detect`` does (all samples equal).
    flat_max_fraction : float, default 0.25
        The channel is ``flat`` when this share of its epochs with data is flat (gateway default:
        a quarter of the night).
    clip_tolerance : float, default 1e-4
        A sample is at a physical limit when within this fraction of the physical span of it: Luna's
        ``MiscMath::clipped`` tolerance (``range * 0.0001``).
    clip_epoch_fraction : float, default 0.05
        An epoch is clipped when more than this share of its samples are at a limit: Luna's ``SIGSTATS``
        epoch exclusion ("more than 5 % of points are clipped").
    clipped_max_fraction : float, default 0.25
        The channel is ``clipped`` when this share of its epochs with data is clipped (gateway default).
    disconnected_min_seconds : float, default 3600.0
        The channel is ``disconnected`` when it has no signal (flat or gap epochs) for this long in a
        row (gateway default: an hour).
    gap_max_fraction : float, default 0.25
        The channel has ``gaps`` when this share of its samples is not measured (gateway default).
    line_noise_band_hz : float, default 1.0
        Half-width of the mains bands around 50 and 60 Hz (Luna's ``COMBINE-EMG`` uses 2 Hz; 1 Hz keeps
        more of the EEG's own beta/gamma out of the band).
    line_noise_broadband_hz : tuple of float, default (10.0, 100.0)
        The reference band of the line-noise ratio, capped at Nyquist - 0.5 Hz: Luna's ``COMBINE-EMG``
        (``line-lo``/``line-hi``).
    line_noise_max_ratio : float, default 0.3
        The channel has ``line_noise`` when the median line-noise ratio exceeds this: Luna's
        ``COMBINE-EMG`` ``line-th``.
    amplitude_uv : mapping of str to (float or None, float or None)
        Per modality, the plausible robust amplitude in µV (``None``: no bound). Defaults: BAS and EMG
        0.1-1000 µV (YASA's amplitude check), EKG 5-5000 µV (±5 mV ECG input range), RESP
        0.01 µV-1 V (units vary: only gross unit errors).
    amplitude_min_rate_hz : float, default 50.0
        Amplitude is judged only on channels sampled at least this fast (below, a "voltage" channel
        is usually an envelope or a trend; the AASM minimum for EEG, EOG, EMG and ECG is 200 Hz).
    min_typical_epoch_sd : float, default 0.05
        The channel is ``artifact_dominated`` when the median epoch standard deviation of its z-scored
        128 Hz row is below this (gateway default: a few artifacts 20 times the signal set its scale).
    typical_sd_modalities : tuple of str, default ("BAS", "EKG")
        The modalities judged by ``min_typical_epoch_sd``: signals that are continuous by nature. Snore,
        leg and chin EMG are bursty by nature (a snoring hour 100 times a quiet one is no artifact).
    sample_epochs : int, default 16
        Epochs sampled (evenly spaced) for the spectral, amplitude and 128 Hz measures.
    max_unusable_fraction : float, default 0.5
        The study is not interpretable when more than this share of its mapped channels is unusable
        (gateway default).
    """

    epoch_seconds: float = 30.0
    flat_epsilon: float = 1e-6
    flat_max_fraction: float = 0.25
    clip_tolerance: float = 1e-4
    clip_epoch_fraction: float = 0.05
    clipped_max_fraction: float = 0.25
    disconnected_min_seconds: float = 3600.0
    gap_max_fraction: float = 0.25
    line_noise_band_hz: float = 1.0
    line_noise_broadband_hz: tuple[float, float] = (10.0, 100.0)
    line_noise_max_ratio: float = 0.3
    amplitude_uv: Mapping[str, tuple[float | None, float | None]] = field(
        default_factory=lambda: dict(DEFAULT_AMPLITUDE_UV))
    amplitude_min_rate_hz: float = 50.0
    min_typical_epoch_sd: float = 0.05
    typical_sd_modalities: tuple[str, ...] = ("BAS", "EKG")
    sample_epochs: int = 16
    max_unusable_fraction: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not self.epoch_seconds > 0:
            problems.append(f"epoch_seconds must be > 0, got {self.epoch_seconds}")
        for name in ("flat_max_fraction", "clip_epoch_fraction", "clipped_max_fraction", "gap_max_fraction",
                     "line_noise_max_ratio", "max_unusable_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                problems.append(f"{name} must be within 0..1, got {value}")
        for name in ("flat_epsilon", "clip_tolerance", "disconnected_min_seconds", "amplitude_min_rate_hz",
                     "min_typical_epoch_sd"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.line_noise_band_hz > 0:
            problems.append(f"line_noise_band_hz must be > 0, got {self.line_noise_band_hz}")
        lo, hi = self.line_noise_broadband_hz
        if not 0 <= lo < hi:
            problems.append(f"line_noise_broadband_hz must be (low, high) with 0 <= low < high, got {(lo, hi)}")
        if self.sample_epochs < 1:
            problems.append(f"sample_epochs must be >= 1, got {self.sample_epochs}")
        for modality, bounds in self.amplitude_uv.items():
            low, high = bounds
            if (low is not None and low < 0) or (low is not None and high is not None and low >= high):
                problems.append(f"amplitude_uv[{modality}] must be (low, high) with 0 <= low < high, got {bounds}")
        if problems:
            raise ValueError("; ".join(problems))
        # A plain dict keeps the value picklable and comparable; freeze the bounds as tuples.
        object.__setattr__(self, "amplitude_uv", {m: (b[0], b[1]) for m, b in self.amplitude_uv.items()})
        object.__setattr__(self, "line_noise_broadband_hz", (float(lo), float(hi)))
        object.__setattr__(self, "typical_sd_modalities", tuple(self.typical_sd_modalities))

    def as_dict(self) -> dict[str, Any]:
        """The thresholds as JSON-ready values (recorded beside the verdict they produced)."""
        out = asdict(self)
        out["amplitude_uv"] = {m: list(b) for m, b in self.amplitude_uv.items()}
        out["line_noise_broadband_hz"] = list(self.line_noise_broadband_hz)
        out["typical_sd_modalities"] = list(self.typical_sd_modalities)
        return out


@dataclass
class ChannelQuality:
    """What the gate measured on one channel, and its problems (empty: the channel is usable).

    Fractions are shares of the epochs with data (``flat_fraction``, ``clipped_fraction``) or of the
    samples (``gap_fraction``). A measure that could not be taken is None, and ``notes`` says why.
    """

    label: str
    modality: str
    problems: list[str]
    rate_hz: float
    unit: str
    epochs: int  # whole epochs judged
    flat_fraction: float
    clipped_fraction: float | None  # None: physical range unknown, or an oximeter trend
    gap_fraction: float
    longest_dropout_s: float  # the longest run of flat or gap epochs
    line_noise_ratio: float | None  # None: rate too low for the mains bands
    line_noise_hz: float | None  # 50 or 60: the larger band
    amplitude: float | None  # robust standard deviation, physical units
    amplitude_uv: float | None  # the same in µV; None when the unit is not a voltage
    typical_epoch_sd: float | None = None  # median epoch SD of the 128 Hz z-scored row
    notes: list[str] = field(default_factory=list)
    thresholds: QualityThresholds = field(default_factory=QualityThresholds, repr=False, compare=False)

    @property
    def usable(self) -> bool:
        """True when the gate found no problem."""
        return not self.problems

    def describe(self) -> str:
        """One line for people: the channel's label, modality and what is wrong with it."""
        if not self.problems:
            return f"{self.label} ({self.modality}): no problem found"
        t = self.thresholds
        parts = []
        for code in self.problems:
            if code == "flat":
                parts.append(f"flat line in {_pct(self.flat_fraction)} of its epochs")
            elif code == "disconnected":
                parts.append(f"no signal for {self.longest_dropout_s / 60:.0f} min in a row")
            elif code == "gaps":
                parts.append(f"{_pct(self.gap_fraction)} of the recording not measured")
            elif code == "clipped":
                parts.append(f"saturated at its physical limits in {_pct(self.clipped_fraction or 0.0)} "
                             "of its epochs")
            elif code == "line_noise":
                parts.append(f"{self.line_noise_hz:g} Hz mains interference (ratio {self.line_noise_ratio:.2f})")
            elif code in ("amplitude_low", "amplitude_high"):
                low, high = t.amplitude_uv.get(self.modality, (None, None))
                bound = low if code == "amplitude_low" else high
                word = "below" if code == "amplitude_low" else "above"
                parts.append(f"amplitude {self.amplitude_uv:.3g} µV, {word} the {bound:g} µV plausible "
                             f"for {self.modality}")
            elif code == "dropped":
                parts.append("not used by the model (preprocessing refused it)")
            elif code == "non_finite":
                parts.append("non-finite values after preprocessing")
            elif code == "artifact_dominated":
                parts.append(f"large artifacts set its scale (typical epoch SD {self.typical_epoch_sd:.3f} "
                             "after standardisation)")
            else:
                parts.append(code)
        return f"{self.label} ({self.modality}): " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``metrics.json``'s ``quality.channels.<label>``)."""
        return {
            "modality": self.modality,
            "problems": list(self.problems),
            "usable": self.usable,
            "rate_hz": self.rate_hz,
            "unit": self.unit,
            "epochs": self.epochs,
            "flat_fraction": _round(self.flat_fraction),
            "clipped_fraction": _round(self.clipped_fraction),
            "gap_fraction": _round(self.gap_fraction),
            "longest_dropout_s": _round(self.longest_dropout_s, 1),
            "line_noise_ratio": _round(self.line_noise_ratio),
            "line_noise_hz": self.line_noise_hz,
            "amplitude": _round_sig(self.amplitude),
            "amplitude_uv": _round_sig(self.amplitude_uv),
            "typical_epoch_sd": _round(self.typical_epoch_sd),
            "notes": list(self.notes),
        }


@dataclass
class StudyQuality:
    """The study's verdict: ``interpretable``, the ``reasons`` when it is not (one sentence each, naming
    channel labels), each channel's measures, and usable/mapped channel counts per modality.

    ``warnings`` describes every unusable channel, whatever the verdict.
    """

    interpretable: bool
    reasons: list[str]
    channels: dict[str, ChannelQuality]
    modalities: dict[str, dict[str, int]]
    warnings: list[str] = field(default_factory=list)
    thresholds: QualityThresholds = field(default_factory=QualityThresholds, repr=False)

    @property
    def unusable(self) -> list[str]:
        """Labels of the channels with a problem, in mapping order."""
        return [label for label, c in self.channels.items() if not c.usable]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: ``metrics.json``'s ``quality``."""
        return {
            "interpretable": self.interpretable,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "modalities": {m: dict(v) for m, v in self.modalities.items()},
            "channels": {label: c.as_dict() for label, c in self.channels.items()},
            "thresholds": self.thresholds.as_dict(),
        }


# ---- units ---------------------------------------------------------------------------------------------------

_VOLT_FACTORS = {"nv": 1e-3, "uv": 1.0, "mv": 1e3, "v": 1e6}


def microvolts_per_unit(unit: str) -> float | None:
    """How many µV one physical unit is: 1 for ``uV``/``µV``, 1000 for ``mV``, 1e6 for ``V``; None
    when ``unit`` is not a voltage (``%``, ``cmH2O``, blank...).

    Parameters
    ----------
    unit : str
        The channel's physical dimension as recorded (case and the micro sign's spelling are ignored).

    Returns
    -------
    float or None
        The factor, or None for a unit that is not a voltage.
    """
    key = unit.strip().replace("\u00b5", "u").replace("\u03bc", "u").lower()
    return _VOLT_FACTORS.get(key)


def _is_trend(unit: str) -> bool:
    return unit.strip().lower() in _TREND_UNITS


# ---- one channel ---------------------------------------------------------------------------------------------


def _runs_max(flags: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D bool array."""
    if not flags.any():
        return 0
    padded = np.concatenate(([False], flags, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return int((edges[1::2] - edges[::2]).max())


def _spread(candidates: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` of ``candidates`` (sorted indices), evenly spread over them."""
    if candidates.size <= k:
        return candidates
    return candidates[np.unique(np.linspace(0, candidates.size - 1, k).round().astype(np.int64))]


def _welch(epochs: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies, power) per row of ``epochs``: Welch's average over periodic-Hann-windowed 4-s
    segments with 2-s steps of the mean-removed epoch, in float32 and unscaled (only ratios are taken;
    scipy's ``welch`` costs ~30 ms a call here)."""
    nperseg = min(epochs.shape[1], max(8, int(_WELCH_SEGMENT_S * rate + 0.5)))
    step = max(1, nperseg // 2)
    centred = epochs - epochs.mean(axis=1, keepdims=True, dtype=np.float64).astype(epochs.dtype)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(nperseg) / nperseg)).astype(epochs.dtype)
    segments = np.lib.stride_tricks.sliding_window_view(centred, nperseg, axis=-1)[:, ::step] * window
    spectrum = np.fft.rfft(segments, axis=-1)
    power = (spectrum.real ** 2 + spectrum.imag ** 2).mean(axis=1)
    return np.fft.rfftfreq(nperseg, 1.0 / rate), power


def _line_noise(epochs: np.ndarray, rate: float, t: QualityThresholds) -> tuple[float | None, float | None, str | None]:
    """(median ratio, mains frequency, note) over the sampled epochs (rows of ``epochs``)."""
    nyquist = rate / 2.0
    band = t.line_noise_band_hz
    lines = [f for f in _LINE_HZ if f + band < nyquist]
    broad_lo, broad_hi = t.line_noise_broadband_hz[0], min(t.line_noise_broadband_hz[1], nyquist - 0.5)
    if not lines or broad_hi <= broad_lo:
        return None, None, (f"mains interference not measured: {rate:g} Hz sampling has no content at "
                            f"{_LINE_HZ[0]:g} Hz (needs more than {2 * (_LINE_HZ[0] + band):g} Hz)")
    if epochs.shape[0] == 0:
        return None, None, "mains interference not measured: no epoch with a signal"
    freqs, psd = _welch(epochs, rate)
    broad = psd[:, (freqs >= broad_lo) & (freqs <= broad_hi)].sum(axis=1)
    per_line = np.stack([psd[:, (freqs >= f - band) & (freqs <= f + band)].sum(axis=1) for f in lines])
    ok = broad > 0
    if not ok.any():
        return None, None, "mains interference not measured: no power from 10 Hz up"
    ratios = per_line[:, ok].max(axis=0) / broad[ok]
    which = lines[int(np.argmax(np.median(per_line[:, ok], axis=1)))]
    note = None
    if len(lines) < len(_LINE_HZ):
        note = (f"mains interference measured at {', '.join(f'{f:g}' for f in lines)} Hz only "
                f"({rate:g} Hz sampling)")
    return float(np.median(ratios)), which, note


def assess_channel(
    label: str,
    modality: str,
    samples: np.ndarray,
    rate: float,
    *,
    unit: str = "",
    valid: np.ndarray | None = None,
    physical_range: tuple[float, float] | None = None,
    row: np.ndarray | None = None,
    thresholds: QualityThresholds | None = None,
) -> ChannelQuality:
    """Measure one channel's quality from its raw samples (and its 128 Hz row, when given).

    Costs a few passes over the samples (per-epoch minimum and maximum) plus a Welch spectrum and a
    median on ``sample_epochs`` epochs; the samples are neither copied nor modified.

    Parameters
    ----------
    label : str
        The channel's label (it names the channel in reasons).
    modality : str
        The modality it is mapped to (``BAS``, ``RESP``, ``EKG``, ``EMG``): selects the amplitude range.
    samples : numpy.ndarray
        1-D samples at the native rate in physical units; samples in a gap may hold anything.
    rate : float
        Native sampling rate in Hz.
    unit : str, default ""
        Physical dimension as recorded (``uV``, ``mV``, ``V``, ``%``...): the amplitude is judged in µV
        for voltages only; ``%`` and beats per minute mark an oximeter trend.
    valid : numpy.ndarray or None, default None
        Boolean per sample, False in a gap; None when the channel has no gap.
    physical_range : tuple of float or None, default None
        The physical values of the digital minimum and maximum (EDF/BDF header); saturation is judged
        only when known.
    row : numpy.ndarray or None, default None
        The channel's preprocessed 128 Hz row (z-scored), for :func:`assess_row`.
    thresholds : QualityThresholds or None, default None
        The gate's thresholds (None: the defaults).

    Returns
    -------
    ChannelQuality
        The measures and the problem codes.
    """
    t = thresholds or QualityThresholds()
    x = np.asarray(samples).reshape(-1)
    if rate <= 0:
        raise ValueError(f"channel {label!r}: sampling rate must be positive, got {rate}")
    notes: list[str] = []
    trend = _is_trend(unit)
    n = x.size
    length = max(1, int(rate * t.epoch_seconds + 0.5))
    n_ep = n // length
    if n_ep == 0:  # shorter than one epoch: judge what there is as one
        length, n_ep = max(n, 1), 1
    used = n_ep * length
    if n == 0:
        x = np.zeros(1, dtype=np.float32)
        valid = np.zeros(1, dtype=bool)
    view = x[:used].reshape(n_ep, length)

    if valid is not None:
        valid = np.asarray(valid, dtype=bool).reshape(-1)
        if valid.size != x.size:
            raise ValueError(f"channel {label!r}: validity mask has {valid.size} values for {x.size} samples")
        gap_fraction = 1.0 - float(np.count_nonzero(valid)) / valid.size
        valid_share = valid[:used].reshape(n_ep, length).mean(axis=1)
        gap = valid_share < 0.5
        whole = valid_share == 1.0
    else:
        gap_fraction = 0.0
        gap = np.zeros(n_ep, dtype=bool)
        whole = ~gap
    data = ~gap
    n_data = int(np.count_nonzero(data))

    lo_ep = view.min(axis=1)
    hi_ep = view.max(axis=1)
    flat = ((hi_ep.astype(np.float64) - lo_ep) <= t.flat_epsilon) & data
    flat_fraction = float(np.count_nonzero(flat)) / n_data if n_data else 0.0

    # Saturation: only epochs whose extreme reaches a limit are counted sample by sample.
    clipped_fraction: float | None = None
    if trend:
        notes.append(f"saturation not judged: unit {unit!r} is an oximeter trend")
    elif physical_range is None:
        notes.append("saturation not judged: physical range unknown")
    else:
        p_lo, p_hi = sorted(float(v) for v in physical_range)
        tol = t.clip_tolerance * (p_hi - p_lo)
        at_limit = data & ((hi_ep >= p_hi - tol) | (lo_ep <= p_lo + tol))
        clipped = np.zeros(n_ep, dtype=bool)
        for i in np.flatnonzero(at_limit):
            epoch = view[i]
            hits = (epoch >= p_hi - tol) | (epoch <= p_lo + tol)
            if valid is not None:
                mask = valid[i * length:(i + 1) * length]
                share = np.count_nonzero(hits & mask) / max(1, np.count_nonzero(mask))
            else:
                share = np.count_nonzero(hits) / length
            clipped[i] = share > t.clip_epoch_fraction
        clipped_fraction = float(np.count_nonzero(clipped)) / n_data if n_data else 0.0

    # No signal: gap epochs, and flat epochs except on an oximeter trend (it may hold a value for long).
    dropout = gap | (flat if not trend else np.zeros_like(flat))
    longest_dropout_s = _runs_max(dropout) * length / rate

    # The sampled epochs: with a signal, whole (no gap sample) where there are such epochs.
    signal = data & ~flat
    candidates = np.flatnonzero(signal & whole)
    if candidates.size == 0:
        candidates = np.flatnonzero(signal)
    picked = _spread(candidates, t.sample_epochs)
    sample = view[picked].astype(np.float32) if picked.size else np.empty((0, length), np.float32)

    line_ratio, line_hz, note = _line_noise(sample, rate, t)
    if note:
        notes.append(note)

    amplitude = amplitude_uv = None
    if sample.shape[0]:
        # The robust SD of an epoch is a property of its amplitude distribution: a strided subset of
        # its samples estimates it as well and keeps the medians cheap at high rates.
        thin = sample[:, :: max(1, length // _AMPLITUDE_SAMPLES)]
        centre = np.median(thin, axis=1, keepdims=True)
        amplitude = float(np.median(_MAD_TO_SD * np.median(np.abs(thin - centre), axis=1)))
        factor = microvolts_per_unit(unit)
        if factor is not None:
            amplitude_uv = amplitude * factor
    problems: list[str] = []
    # An oximeter trend is flat only when it holds one value all night.
    constant = n_data > 0 and float(hi_ep[data].max()) - float(lo_ep[data].min()) <= t.flat_epsilon
    if constant if trend else (n_data > 0 and flat_fraction >= t.flat_max_fraction):
        problems.append("flat")
    if "flat" not in problems and longest_dropout_s >= t.disconnected_min_seconds:
        problems.append("disconnected")
    if gap_fraction >= t.gap_max_fraction and gap_fraction > 0:
        problems.append("gaps")
    if clipped_fraction is not None and clipped_fraction >= t.clipped_max_fraction and clipped_fraction > 0:
        problems.append("clipped")
    if line_ratio is not None and line_ratio > t.line_noise_max_ratio:
        problems.append("line_noise")

    low, high = t.amplitude_uv.get(modality, (None, None))
    if low is None and high is None:
        pass
    elif microvolts_per_unit(unit) is None:
        notes.append(f"amplitude not judged: unit {unit!r} is not a voltage")
    elif rate < t.amplitude_min_rate_hz:
        notes.append(f"amplitude not judged: {rate:g} Hz is below {t.amplitude_min_rate_hz:g} Hz "
                     "(an envelope or a trend)")
    elif amplitude_uv is not None:
        if low is not None and amplitude_uv < low:
            problems.append("amplitude_low")
        elif high is not None and amplitude_uv > high:
            problems.append("amplitude_high")

    quality = ChannelQuality(
        label=label, modality=modality, problems=problems, rate_hz=float(rate), unit=unit, epochs=n_ep,
        flat_fraction=flat_fraction, clipped_fraction=clipped_fraction, gap_fraction=gap_fraction,
        longest_dropout_s=float(longest_dropout_s), line_noise_ratio=line_ratio, line_noise_hz=line_hz,
        amplitude=amplitude, amplitude_uv=amplitude_uv, notes=notes, thresholds=t,
    )
    return assess_row(quality, row) if row is not None else quality


def assess_row(quality: ChannelQuality, row: np.ndarray) -> ChannelQuality:
    """Add what the channel's 128 Hz preprocessed row shows: the typical epoch standard deviation in
    the model's standardised units, and ``artifact_dominated`` when it is tiny.

    The row is z-scored over the night: a stationary channel's epochs have a standard deviation near 1;
    when a few huge artifacts (a loose electrode railing, movement) set the channel's scale, the rest of
    the night is squashed towards 0. Flat and gap epochs (all zero) are left out.

    Parameters
    ----------
    quality : ChannelQuality
        The channel's measures from :func:`assess_channel` (its thresholds are used).
    row : numpy.ndarray
        The channel's 1-D 128 Hz preprocessed (z-scored) row.

    Returns
    -------
    ChannelQuality
        A copy of ``quality`` with ``typical_epoch_sd`` set and the problem added when it applies.
    """
    t = quality.thresholds
    row = np.asarray(row).reshape(-1)
    length = max(1, int(_ROW_RATE * t.epoch_seconds + 0.5))
    n_ep = row.size // length
    if n_ep == 0:
        return quality
    epochs = row[: n_ep * length].reshape(n_ep, length)
    # Sample epochs first (cheap), then drop the all-zero ones (gap or flat): a dense sample of rows.
    picked = _spread(np.arange(n_ep), max(t.sample_epochs * 2, 1))
    sd = epochs[picked].astype(np.float64).std(axis=1)
    problems = list(quality.problems)
    if not np.isfinite(sd).all():
        if "non_finite" not in problems:
            problems.append("non_finite")
        return replace(quality, problems=problems)
    sd = sd[sd > 0]
    if sd.size == 0:
        return replace(quality, typical_epoch_sd=0.0)
    typical = float(np.median(sd))
    if (typical < t.min_typical_epoch_sd and quality.modality in t.typical_sd_modalities
            and "artifact_dominated" not in problems and "flat" not in problems):
        problems.append("artifact_dominated")
    return replace(quality, typical_epoch_sd=typical, problems=problems)


# ---- the study -----------------------------------------------------------------------------------------------


def assess_study(channels: Iterable[ChannelQuality], thresholds: QualityThresholds | None = None) -> StudyQuality:
    """Combine the mapped channels' quality into the study's verdict.

    Uninterpretable when a modality that has mapped channels has no usable one, or when more than
    ``max_unusable_fraction`` of all mapped channels are unusable. Modalities without any mapped
    channel are not judged (the flag step handles a missing modality).

    Parameters
    ----------
    channels : iterable of ChannelQuality
        Every mapped channel's quality, in mapping order (a channel that preprocessing dropped
        included: it is mapped, and unusable).
    thresholds : QualityThresholds or None, default None
        The gate's thresholds (None: the defaults).

    Returns
    -------
    StudyQuality
        The verdict, its reasons and the per-channel and per-modality figures.
    """
    t = thresholds or QualityThresholds()
    by_label: dict[str, ChannelQuality] = {}
    for c in channels:
        key, k = c.label, 2
        while key in by_label:  # duplicate labels are kept by the readers
            key, k = f"{c.label} #{k}", k + 1
        by_label[key] = c
    order = list(MODALITIES) + sorted({c.modality for c in by_label.values()} - set(MODALITIES))
    modalities: dict[str, dict[str, int]] = {}
    for m in order:
        members = [c for c in by_label.values() if c.modality == m]
        if members:
            modalities[m] = {"usable": sum(c.usable for c in members), "channels": len(members)}
    reasons: list[str] = []
    for m, counts in modalities.items():
        if counts["usable"] == 0:
            bad = [f"{label} ({', '.join(c.problems)})" for label, c in by_label.items() if c.modality == m]
            reasons.append(f"{m} has no usable channel: {'; '.join(bad)}")
    unusable = [label for label, c in by_label.items() if not c.usable]
    if by_label and len(unusable) / len(by_label) > t.max_unusable_fraction:
        reasons.append(f"{len(unusable)} of {len(by_label)} mapped channels are unusable (more than "
                       f"{_pct(t.max_unusable_fraction)}): {', '.join(unusable)}")
    warnings = [c.describe() for c in by_label.values() if not c.usable]
    return StudyQuality(interpretable=not reasons, reasons=reasons, channels=by_label, modalities=modalities,
                        warnings=warnings, thresholds=t)


# ---- formatting ---------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %" if value >= 0.01 or value == 0 else f"{100 * value:.1f} %"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _round_sig(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")
