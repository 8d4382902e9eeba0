"""Deterministic synthetic PSG nights, for demos, tests and benchmarks. No real person, no real data.

:func:`write_synthetic_night` writes an EDF+ (``.edf``) or BDF+ (``.bdf``) file with 1-second data
records. The signals are physiologically plausible-ish: filtered noise plus rhythms whose mix follows
a 90-minute "sleep cycle" (alpha while light, delta while deep, less chin EMG while deep), a heartbeat
with respiratory sinus arrhythmia, breathing at ~15/min on the flow and effort belts, a slowly drifting
SpO2, and snoring bursts on inspiration. Every value stays inside the channel's physical range.

The file is generated in 60-second blocks, so memory stays small whatever the length of the night, and
it is identical for the same ``seed`` (and the same pyedflib).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyedflib
from scipy.signal import lfilter, lfilter_zi

__all__ = ["DEFAULT_BENCH_CHANNELS", "SyntheticChannel", "write_synthetic_night"]

_BLOCK_S = 60
_CYCLE_S = 5400.0  # one sleep cycle, ~90 min


@dataclass(frozen=True)
class SyntheticChannel:
    """One channel to synthesise. ``kind`` picks the signal model: eeg, eog, emg_chin, emg_leg, ecg,
    flow, pressure, effort_thor, effort_abdo, spo2 or snore."""

    label: str
    rate: int  # Hz; integer so that it fits a 1-second data record
    kind: str
    unit: str = "uV"
    physical_min: float = -500.0
    physical_max: float = 500.0


DEFAULT_BENCH_CHANNELS: tuple[SyntheticChannel, ...] = (
    SyntheticChannel("F3-M2", 256, "eeg"),
    SyntheticChannel("F4-M1", 256, "eeg"),
    SyntheticChannel("C3-M2", 256, "eeg"),
    SyntheticChannel("C4-M1", 256, "eeg"),
    SyntheticChannel("O1-M2", 256, "eeg"),
    SyntheticChannel("O2-M1", 256, "eeg"),
    SyntheticChannel("E1-M2", 256, "eog"),
    SyntheticChannel("E2-M1", 256, "eog"),
    SyntheticChannel("Chin1-Chin2", 512, "emg_chin", physical_min=-200.0, physical_max=200.0),
    SyntheticChannel("LLeg", 256, "emg_leg", physical_min=-200.0, physical_max=200.0),
    SyntheticChannel("RLeg", 256, "emg_leg", physical_min=-200.0, physical_max=200.0),
    SyntheticChannel("ECG II", 512, "ecg", unit="mV", physical_min=-5.0, physical_max=5.0),
    SyntheticChannel("Airflow", 32, "flow", physical_min=-1000.0, physical_max=1000.0),
    SyntheticChannel("Nasal Pressure", 32, "pressure", unit="cmH2O", physical_min=-5.0, physical_max=5.0),
    SyntheticChannel("Thor", 32, "effort_thor", physical_min=-2000.0, physical_max=2000.0),
    SyntheticChannel("Abdo", 32, "effort_abdo", physical_min=-2000.0, physical_max=2000.0),
    SyntheticChannel("SpO2", 1, "spo2", unit="%", physical_min=0.0, physical_max=100.0),
    SyntheticChannel("Snore", 500, "snore", physical_min=-500.0, physical_max=500.0),
)


# ---- signal models: each maps (absolute times t in s, rng, filter state) -> physical values ----------------


def _depth(t: np.ndarray) -> np.ndarray:
    """Sleep depth in [0, 1] (0 awake/light, 1 deep) over a 90-min cycle, shallower late in the night."""
    cycle = 0.5 * (1.0 - np.cos(2.0 * np.pi * t / _CYCLE_S))
    return cycle * np.exp(-t / (6 * 3600.0))


def _breath_phase(t: np.ndarray) -> np.ndarray:
    """Breathing phase in cycles: ~0.25 Hz, slowly varying (closed form, so blocks join seamlessly)."""
    return 0.25 * t + 0.02 * 300.0 / (2 * np.pi) * (1.0 - np.cos(2 * np.pi * t / 300.0))


def _heart_phase(t: np.ndarray) -> np.ndarray:
    """Heartbeat phase in cycles: ~62 bpm with respiratory sinus arrhythmia."""
    return 62.0 / 60.0 * t + 0.05 / (2 * np.pi * 0.25) * (1.0 - np.cos(2 * np.pi * 0.25 * t))


class _Filtered:
    """Coloured noise with a filter state carried from block to block."""

    def __init__(self, b: np.ndarray, a: np.ndarray, rng: np.random.Generator) -> None:
        self.b, self.a, self.rng = b, a, rng
        self.zi = lfilter_zi(b, a) * 0.0

    def __call__(self, n: int, scale: float = 1.0) -> np.ndarray:
        y, self.zi = lfilter(self.b, self.a, self.rng.standard_normal(n), zi=self.zi)
        return y * scale


def _ar1(pole: float, rng: np.random.Generator) -> _Filtered:
    gain = np.sqrt(1.0 - pole * pole)  # unit variance at steady state
    return _Filtered(np.array([gain]), np.array([1.0, -pole]), rng)


class _Model:
    def __init__(self, spec: SyntheticChannel, rng: np.random.Generator) -> None:
        self.spec = spec
        self.rng = rng
        self.slow = _ar1(0.98 if spec.rate >= 32 else 0.9, rng)  # low-frequency background
        self.drift = _ar1(0.9995 if spec.rate >= 32 else 0.99, rng)  # very slow wander
        self.alpha_hz = 9.5 + rng.uniform(0.0, 1.5)
        self.phase0 = rng.uniform(0.0, 2 * np.pi)

    def block(self, t: np.ndarray) -> np.ndarray:
        return getattr(self, "_" + self.spec.kind)(t)

    def _eeg(self, t: np.ndarray) -> np.ndarray:
        n, depth = t.size, _depth(t)
        alpha = 12.0 * (1.0 - depth) * np.sin(2 * np.pi * self.alpha_hz * t + self.phase0)
        delta = 45.0 * depth * np.sin(2 * np.pi * 1.2 * t + self.phase0) * (0.6 + 0.4 * self.slow(n))
        return 15.0 * self.slow(n) + 3.0 * self.rng.standard_normal(n) + alpha + delta

    def _eog(self, t: np.ndarray) -> np.ndarray:
        n = t.size
        return 60.0 * self.drift(n) + 8.0 * self.slow(n) + 2.0 * self.rng.standard_normal(n)

    def _emg_chin(self, t: np.ndarray) -> np.ndarray:
        return (12.0 - 9.0 * _depth(t)) * self.rng.standard_normal(t.size)

    def _emg_leg(self, t: np.ndarray) -> np.ndarray:
        burst = np.where(np.mod(t + 7.0 * self.phase0, 30.0) < 1.0, 25.0, 2.0)  # periodic leg twitches
        return burst * self.rng.standard_normal(t.size)

    def _ecg(self, t: np.ndarray) -> np.ndarray:
        frac = np.mod(_heart_phase(t), 1.0)
        wave = (
            1.2 * np.exp(-(((frac - 0.20) / 0.010) ** 2))
            - 0.15 * np.exp(-(((frac - 0.185) / 0.008) ** 2))
            - 0.25 * np.exp(-(((frac - 0.22) / 0.008) ** 2))
            + 0.30 * np.exp(-(((frac - 0.45) / 0.050) ** 2))
            + 0.10 * np.exp(-(((frac - 0.05) / 0.030) ** 2))
        )
        return wave + 0.05 * self.drift(t.size) + 0.01 * self.rng.standard_normal(t.size)

    def _breath(self, t: np.ndarray, lag: float = 0.0) -> np.ndarray:
        return np.sin(2 * np.pi * (_breath_phase(t) - lag))

    def _flow(self, t: np.ndarray) -> np.ndarray:
        return 300.0 * self._breath(t) * (1.0 + 0.2 * self.drift(t.size)) + 10.0 * self.slow(t.size)

    def _pressure(self, t: np.ndarray) -> np.ndarray:
        b = self._breath(t)
        return 1.5 * np.sign(b) * np.abs(b) ** 1.5 + 0.05 * self.slow(t.size)

    def _effort_thor(self, t: np.ndarray) -> np.ndarray:
        return 600.0 * self._breath(t, 0.05) + 80.0 * self.drift(t.size)

    def _effort_abdo(self, t: np.ndarray) -> np.ndarray:
        return 500.0 * self._breath(t, 0.08) + 80.0 * self.drift(t.size)

    def _spo2(self, t: np.ndarray) -> np.ndarray:
        return 96.5 + 1.2 * self.drift(t.size) - 0.8 * _depth(t)

    def _snore(self, t: np.ndarray) -> np.ndarray:
        inspiration = np.clip(self._breath(t), 0.0, None) * (_depth(t) > 0.3)
        return (3.0 + 60.0 * inspiration) * self.rng.standard_normal(t.size)


_KINDS = frozenset({
    "eeg", "eog", "emg_chin", "emg_leg", "ecg", "flow", "pressure", "effort_thor", "effort_abdo", "spo2", "snore",
})


def _digitise(x: np.ndarray, spec: SyntheticChannel, dmin: int, dmax: int) -> np.ndarray:
    x = np.clip(x, spec.physical_min, spec.physical_max)
    scale = (dmax - dmin) / (spec.physical_max - spec.physical_min)
    return np.rint((x - spec.physical_min) * scale + dmin).astype(np.int32)


def write_synthetic_night(
    path: str | Path,
    hours: float = 8.0,
    seed: int = 0,
    channels: Sequence[SyntheticChannel] = DEFAULT_BENCH_CHANNELS,
) -> Path:
    """Write a synthetic PSG night to ``path`` (EDF+; BDF+ when the suffix is ``.bdf``) and return it.

    The length is rounded to whole seconds (1-second data records). The header carries a fake patient
    code (``SYN-<seed>``), a sex and a birth date drawn from the seed, and the name ``Synthetic``: never a
    real person. Two annotations mark lights off/on.
    """
    path = Path(path)
    n_records = round(hours * 3600)
    if n_records < 1:
        raise ValueError(f"hours must give at least one second, got {hours}")
    if not channels:
        raise ValueError("at least one channel is needed")
    for spec in channels:
        if spec.kind not in _KINDS:
            raise ValueError(f"channel {spec.label!r}: unknown kind {spec.kind!r} (known: {sorted(_KINDS)})")
        if int(spec.rate) != spec.rate or spec.rate < 1:
            raise ValueError(f"channel {spec.label!r}: rate must be a positive integer, got {spec.rate}")

    bdf = path.suffix.lower() == ".bdf"
    file_type = pyedflib.FILETYPE_BDFPLUS if bdf else pyedflib.FILETYPE_EDFPLUS
    dmin, dmax = (-(2**23), 2**23 - 1) if bdf else (-(2**15), 2**15 - 1)

    seeds = np.random.SeedSequence(seed).spawn(len(channels) + 1)
    header_rng = np.random.default_rng(seeds[0])
    sex = "F" if header_rng.integers(2) else "M"
    birth = date(1950, 1, 1) + timedelta(days=int(header_rng.integers(0, 40 * 365)))
    start = datetime(2024, 1, 1, 22, 30, 0) + timedelta(days=int(header_rng.integers(0, 365)))
    models = [_Model(spec, np.random.default_rng(s)) for spec, s in zip(channels, seeds[1:], strict=True)]

    rates = [int(spec.rate) for spec in channels]
    offsets = np.concatenate([[0], np.cumsum(rates)])
    record_len = int(offsets[-1])

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = pyedflib.EdfWriter(str(path), len(channels), file_type=file_type)
    try:
        writer.setSignalHeaders([
            {
                "label": spec.label,
                "dimension": spec.unit,
                "sample_frequency": int(spec.rate),
                "physical_min": spec.physical_min,
                "physical_max": spec.physical_max,
                "digital_min": dmin,
                "digital_max": dmax,
                "transducer": "",
                "prefilter": "",
            }
            for spec in channels
        ])
        writer.setPatientCode(f"SYN-{seed:04d}")
        writer.setPatientName("Synthetic")
        writer.setSex(1 if sex == "M" else 0)
        writer.setBirthdate(birth)
        writer.setStartdatetime(start)
        writer.setAdmincode(f"SYNADM-{seed:04d}")
        writer.setEquipment("psg-gateway_synthetic")

        for first in range(0, n_records, _BLOCK_S):
            n_rec = min(_BLOCK_S, n_records - first)
            block = np.empty((n_rec, record_len), dtype=np.int32)
            for spec, model, lo, hi in zip(channels, models, offsets[:-1], offsets[1:], strict=True):
                rate = int(spec.rate)
                t = first + np.arange(n_rec * rate) / rate
                block[:, lo:hi] = _digitise(model.block(t), spec, dmin, dmax).reshape(n_rec, rate)
            for row in block:
                if writer.blockWriteDigitalSamples(row) < 0:
                    raise OSError(f"pyedflib could not write a data record to {path}")
        writer.writeAnnotation(min(60.0, n_records / 2), -1, "Lights off")
        writer.writeAnnotation(max(0.0, n_records - 60.0), -1, "Lights on")
    finally:
        writer.close()
    return path
