"""MNE interoperability (the optional ``mne`` extra): :func:`to_mne` and :func:`from_mne`.

``mne`` is imported inside the functions only, so the gateway imports and runs without it; calling one
of them without MNE installed raises :class:`ImportError` naming the extra.

Choices (see the researcher guide, "MNE: from any format to a StudyResult"):

* **One sampling rate.** An MNE ``Raw`` holds every channel at one ``sfreq``. :func:`to_mne` uses the
  recording's highest rate and brings each slower channel up to it with MNE's own FFT resampler,
  ``mne.filter.resample(x, up=M, down=N, npad=0)`` on the whole channel: exactly what
  ``mne.io.read_raw_edf`` does, and so what the SleepFM release's reader does (``inference.upsample``
  reproduces the same step without MNE). ``to_mne`` of an EDF we read therefore equals MNE's own read of
  that file. :func:`from_mne` cannot restore the rates a file had before MNE resampled it: every channel
  comes back at ``sfreq``.
* **Units.** MNE holds voltages in volts. Channels recorded in V, mV, uV (µV) or nV are scaled to volts;
  any other unit (``%``, ``cmH2O``, ``bpm``, none) is passed through unscaled with MNE's unit "none" and the
  unit string kept in the Raw's original units. :func:`from_mne` brings voltages back in uV.
* **Channel types** come from the label (EOG, EMG, ECG, respiratory, SpO2 words), else ``eeg`` for a
  voltage and ``misc`` for anything else; ``ch_types`` overrides them label by label.
* **Gaps.** Samples in a gap (a validity mask) become ``BAD_ACQ_SKIP`` annotations: one without channel
  names when every channel has the same gaps (as in EDF+D), else one per channel naming it. The filled
  values stay in the data. :func:`from_mne` turns ``BAD_ACQ_SKIP`` annotations back into validity masks.
* **Time.** ``meas_date`` is the recording start; a naive start (EDF's clock time) is written as if it
  were UTC, as ``mne.io.read_raw_edf`` does, and read back naive.
* **Identifiers.** Sex always goes into ``subject_info``; the patient id and birth date only with
  ``identifiers=True`` (they are PHI). :func:`from_mne` reads ``his_id``, ``sex`` and ``birthday``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from ..recording import Annotation, Channel, Demographics, Identifiers, Recording

if TYPE_CHECKING:  # pragma: no cover
    import mne

__all__ = ["channel_type", "from_mne", "to_mne"]

GAP_DESCRIPTION = "BAD_ACQ_SKIP"
INSTALL_HINT = "install psg-gateway[mne] to use MNE"

_VOLT_SCALE = {"v": 1.0, "mv": 1e-3, "uv": 1e-6, "µv": 1e-6, "μv": 1e-6, "nv": 1e-9}
_FIFF_UNIT_V = 107
_FIFF_UNIT_NONE = -1

_TYPE_WORDS = (  # first match wins; words are matched on the label's letters, case-insensitive
    ("eog", re.compile(r"eog|^loc\b|^roc\b|^e[12]\b|^e[12]-|horiz|vert")),
    ("ecg", re.compile(r"ecg|ekg|^ii\b|^mlii|^v[1-6]\b|\blead\b")),
    ("emg", re.compile(r"emg|chin|leg|tib|submental|masseter")),
    ("resp", re.compile(r"resp|flow|thor|chest|abd|effort|pres|snore|cannula|therm|pap\b")),
    ("misc", re.compile(r"spo2|sao2|sat\b|pulse|pleth|\bhr\b|pos(ition)?\b|light|lux")),
)


def _import_mne():
    try:
        import mne
    except ImportError as exc:  # the optional extra is not installed
        raise ImportError(INSTALL_HINT) from exc
    return mne


def _volt_scale(unit: str) -> float | None:
    """Volts per recorded unit, or None when ``unit`` is not a voltage."""
    return _VOLT_SCALE.get(unit.strip().lower().replace("micro", "u"))


def channel_type(label: str, unit: str) -> str:
    """The MNE channel type :func:`to_mne` gives a channel: from the label's words, else by unit."""
    text = label.strip().lower()
    for kind, pattern in _TYPE_WORDS:
        if pattern.search(text):
            return kind
    return "eeg" if _volt_scale(unit) is not None else "misc"


def _unique(labels: list[str]) -> list[str]:
    """MNE needs unique, non-empty channel names: a repeat gets ``-1``, ``-2`` ... appended."""
    seen: dict[str, int] = {}
    out: list[str] = []
    taken = set(labels)
    for label in labels:
        name = label or "ch"
        if name in seen or (not label and name in taken):
            n = seen.get(name, 0)
            while f"{name}-{n + 1}" in taken:
                n += 1
            seen[name] = n + 1
            name = f"{name}-{n + 1}"
            taken.add(name)
        else:
            seen[name] = 0
        out.append(name)
    return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of False in ``mask``."""
    bad = np.concatenate([[False], ~mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(bad))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def to_mne(recording: Recording, *, ch_types: Mapping[str, str] | None = None,
           identifiers: bool = False) -> mne.io.RawArray:
    """``recording`` as an MNE ``RawArray`` (preloaded, float64, volts for voltage channels).

    Every channel is read once. ``ch_types``: MNE channel type by label, over :func:`channel_type`'s
    guess. ``identifiers``: also write the patient id and birth date into ``subject_info`` (PHI).
    """
    mne = _import_mne()
    from inference.upsample import recording_grid_length

    if not recording.channels:
        raise ValueError("a recording without channels has no MNE form")
    sfreq = float(recording.highest_rate)
    lengths = [recording_grid_length(c.n_samples, c.sampling_rate, sfreq) for c in recording.channels]
    n_times = max(lengths)
    names = _unique(recording.channel_labels)
    data = np.zeros((len(names), n_times), dtype=np.float64)
    gaps: list[list[tuple[float, float]]] = []
    for row, (channel, n_up) in enumerate(zip(recording.channels, lengths, strict=True)):
        x = channel.read().astype(np.float64)
        if n_up != x.size:
            x = mne.filter.resample(x, up=n_up, down=x.size, npad=0, verbose="error")
        data[row, : x.size] = x[:n_times] * (_volt_scale(channel.unit) or 1.0)
        valid = channel.read_valid()
        gaps.append([] if valid is None else
                     [(a / channel.sampling_rate, (b - a) / channel.sampling_rate) for a, b in _runs(valid)])

    types = [(ch_types or {}).get(c.label) or channel_type(c.label, c.unit) for c in recording.channels]
    info = mne.create_info(names, sfreq, ch_types=types, verbose="error")
    for ch, channel in zip(info["chs"], recording.channels, strict=True):
        if _volt_scale(channel.unit) is None:
            ch["unit"] = _FIFF_UNIT_NONE
    subject: dict[str, Any] = {}
    sex = recording.demographics.sex
    if sex is not None:
        subject["sex"] = 1 if sex == "M" else 2
    if identifiers:
        if recording.identifiers.patient_id:
            subject["his_id"] = recording.identifiers.patient_id
        if recording.demographics.birth_date is not None:
            subject["birthday"] = recording.demographics.birth_date
    if subject:
        info["subject_info"] = subject
    raw = mne.io.RawArray(data, info, verbose="error")
    raw._orig_units = {name: c.unit for name, c in zip(names, recording.channels, strict=True)}

    meas_date = None
    if recording.start is not None:
        start = recording.start
        meas_date = start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
        raw.set_meas_date(meas_date)
    notes = [(note.onset_s, note.duration_s or 0.0, note.text, ()) for note in recording.annotations]
    if gaps and all(g and g == gaps[0] for g in gaps):  # the same gaps in every channel: the recording's
        notes += [(onset, duration, GAP_DESCRIPTION, ()) for onset, duration in gaps[0]]
    else:
        notes += [(onset, duration, GAP_DESCRIPTION, (name,))
                  for name, channel_gaps in zip(names, gaps, strict=True) for onset, duration in channel_gaps]
    if notes:
        onsets, durations, texts, where = zip(*notes, strict=True)
        raw.set_annotations(mne.Annotations(list(onsets), list(durations), list(texts), orig_time=meas_date,
                                            ch_names=list(where)))
    return raw


def _birth_date(value: Any) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 3:  # MNE before 1.7: (year, month, day)
        try:
            return date(*(int(v) for v in value))
        except (TypeError, ValueError):
            return None
    return None


def from_mne(raw: mne.io.BaseRaw) -> Recording:
    """An MNE ``Raw`` as a :class:`Recording`: one channel per MNE channel, all at ``raw.info["sfreq"]``.

    Samples stay in ``raw``: each channel's source calls ``raw.get_data(picks=[i])`` (so a Raw that is not
    preloaded is read from its file channel by channel). Voltage channels come back in uV; the others in
    their original unit where the Raw records it. Annotations are carried over (onsets from the first
    sample), except ``BAD_ACQ_SKIP`` ones, which become the named (or all) channels' validity masks.
    """
    mne = _import_mne()
    info = raw.info
    sfreq = float(info["sfreq"])
    n_times = int(raw.n_times)
    orig_units = getattr(raw, "_orig_units", None) or {}
    first = float(raw.first_time)
    onsets = np.asarray(raw.annotations.onset, dtype=np.float64) - first
    gap_rows: dict[str | None, list[tuple[int, int]]] = {}
    annotations: list[Annotation] = []
    ch_names_of = getattr(raw.annotations, "ch_names", None)
    for k, (onset, duration, text) in enumerate(zip(onsets, raw.annotations.duration,
                                                    raw.annotations.description, strict=True)):
        if text == GAP_DESCRIPTION:
            a = max(0, round(onset * sfreq))
            b = min(n_times, round((onset + float(duration)) * sfreq))
            names = tuple(ch_names_of[k]) if ch_names_of is not None and len(ch_names_of[k]) else (None,)
            for name in names:
                gap_rows.setdefault(name, []).append((a, b))
        else:
            annotations.append(Annotation(float(onset), float(duration) if duration else None, str(text)))

    channels: list[Channel] = []
    for i, (name, ch) in enumerate(zip(info["ch_names"], info["chs"], strict=True)):
        volts = ch["unit"] == _FIFF_UNIT_V
        scale = 1e6 * 10.0 ** ch.get("unit_mul", 0) if volts else 1.0
        unit = "uV" if volts else str(orig_units.get(name, ""))
        runs = gap_rows.get(None, []) + gap_rows.get(name, [])
        valid_source = None
        if runs:
            mask = np.ones(n_times, dtype=bool)
            for a, b in runs:
                mask[a:b] = False
            if not mask.all():
                mask.flags.writeable = False
                valid_source = mask.copy

        def source(i: int = i, scale: float = scale) -> np.ndarray:
            x = raw.get_data(picks=[i], verbose="error")[0]
            return (x * scale).astype(np.float32) if scale != 1.0 else x.astype(np.float32)

        channels.append(Channel(label=name, sampling_rate=sfreq, unit=unit, n_samples=n_times,
                                _source=source, _valid=valid_source))

    start = None
    meas_date = info["meas_date"]
    if meas_date is not None:
        start = meas_date + timedelta(seconds=first)
        if start.utcoffset() == timedelta(0):
            start = start.replace(tzinfo=None)
    subject = info.get("subject_info") or {}
    sex = {1: "M", 2: "F"}.get(subject.get("sex"))
    his_id = subject.get("his_id")
    del mne  # imported for the clear error only
    return Recording(
        channels=channels,
        duration_s=n_times / sfreq,
        start=start,
        identifiers=Identifiers(patient_id=str(his_id) if his_id else None),
        demographics=Demographics(sex=sex, birth_date=_birth_date(subject.get("birthday"))),
        annotations=annotations,
        format=f"MNE:{type(raw).__name__}",
    )


def with_source_path(recording: Recording, path) -> Recording:
    """``recording`` with its identifiers' ``source_path`` set (the reader's last step)."""
    return dataclasses.replace(recording, identifiers=dataclasses.replace(recording.identifiers, source_path=path))
