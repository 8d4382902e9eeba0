"""A scored night (stages and scored events) and its respiratory indices: AHI (3 % and 4 % rules) and ODI.

Pure: no I/O. :mod:`gateway.scoring_files` reads NSRR / Compumedics Profusion XML and EDF+ annotations
into a :class:`ScoredNight`; :func:`respiratory_indices` counts.

The rules (docs/researcher-guide.md, "Scoring files: NSRR and Profusion XML, AHI and ODI"):

* **Total sleep time** is the number of 30-s epochs scored N1, N2, N3 or REM, times 30 s.
* **Events during wake are excluded**: an event counts only when the epoch holding its onset is scored
  sleep (an unscored epoch, or an onset past the hypnogram, is not sleep).
* **Apneas** (obstructive, central, mixed, unspecified) count regardless of desaturation or arousal.
* **Hypopneas, 3 % rule** (AHI3; AASM 2012 *recommended*, NSRR ``nsrr_ahi_hp3r_aasm15``): a hypopnea
  counts when it is associated with a desaturation of >= 3 % or with an arousal.
* **Hypopneas, 4 % rule** (AHI4; AASM 2012 *acceptable* / CMS, NSRR ``nsrr_ahi_hp4u_aasm15``): a hypopnea
  counts when it is associated with a desaturation of >= 4 %; arousals do not matter.
* **Association** (the scoring file only says which events were scored, not which belong together, so
  this is our rule): a hypopnea's desaturation is the largest of the drop recorded on the hypopnea itself
  (Profusion ``<Desaturation>``, NSRR ``SpO2Baseline - SpO2Nadir``) and the drops of the desaturation
  events that *begin* between the hypopnea's onset and 30 s after its end
  (:data:`DESATURATION_WINDOW_S`); an arousal is associated when it begins between the hypopnea's onset
  and 5 s after its end (:data:`AROUSAL_WINDOW_S`).
* **ODI3 / ODI4**: desaturation events with a known drop of >= 3 % / >= 4 %, beginning in sleep, per hour
  of total sleep time. Desaturations without a drop are counted apart (``desaturations_without_drop``).

Every index is per hour of total sleep time, and None when the night has no sleep.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .pipeline.scoring import EPOCH_S, STAGES, reference_hypnogram
from .recording import Annotation

__all__ = [
    "APNEA_KINDS", "AROUSAL_WINDOW_S", "DESATURATION_WINDOW_S", "EVENT_KINDS", "RespiratoryIndices",
    "ScoredEvent", "ScoredNight", "event_kind_of", "night_from_annotations", "respiratory_indices",
]

DESATURATION_WINDOW_S = 30.0  # a desaturation beginning up to this long after a hypopnea's end is its own
AROUSAL_WINDOW_S = 5.0  # an arousal beginning up to this long after a hypopnea's end is its own
APNEA_KINDS: tuple[str, ...] = ("obstructive_apnea", "central_apnea", "mixed_apnea", "apnea")
EVENT_KINDS: tuple[str, ...] = (*APNEA_KINDS, "hypopnea", "arousal", "desaturation")
SLEEP_STAGES = frozenset(s for s in STAGES if s != "W")


@dataclass(frozen=True)
class ScoredEvent:
    """One scored event: ``kind`` one of :data:`EVENT_KINDS`, onset and duration in seconds from the
    recording start, SpO2 values (%) when the file gives them, and the label it was read from."""

    kind: str
    onset_s: float
    duration_s: float
    spo2_nadir: float | None = None
    spo2_baseline: float | None = None
    spo2_drop: float | None = None  # given, or baseline - nadir
    label: str = ""

    @property
    def end_s(self) -> float:
        return self.onset_s + self.duration_s

    def to_dict(self) -> dict:
        return {"kind": self.kind, "onset_s": self.onset_s, "duration_s": self.duration_s,
                "spo2_nadir": self.spo2_nadir, "spo2_baseline": self.spo2_baseline,
                "spo2_drop": self.spo2_drop, "label": self.label}


@dataclass(frozen=True)
class ScoredNight:
    """A scored night: one stage per 30-s epoch (``W``/``N1``/``N2``/``N3``/``REM``, None for unscored or
    movement) and the scored events in onset order. ``source``: ``"nsrr"``, ``"profusion"`` or ``"edf+"``."""

    stages: list[str | None]
    events: list[ScoredEvent] = field(default_factory=list)
    source: str = ""
    epoch_s: float = EPOCH_S

    def stage_counts(self) -> dict[str, int]:
        """Epochs per stage (every stage of :data:`STAGES`, and ``"unscored"``)."""
        counts = Counter("unscored" if s is None else s for s in self.stages)
        return {s: counts.get(s, 0) for s in (*STAGES, "unscored")}

    def event_counts(self) -> dict[str, int]:
        """Events per kind, all of them (wake included)."""
        counts = Counter(e.kind for e in self.events)
        return {k: counts.get(k, 0) for k in EVENT_KINDS}

    def stage_at(self, t_s: float) -> str | None:
        """The stage of the epoch holding time ``t_s`` (None: unscored, or outside the hypnogram)."""
        if not math.isfinite(t_s) or t_s < 0:
            return None
        i = int(t_s // self.epoch_s)
        return self.stages[i] if i < len(self.stages) else None


@dataclass(frozen=True)
class RespiratoryIndices:
    """Counts of events in sleep and the indices per hour of total sleep time (None when no sleep)."""

    total_sleep_time_h: float
    apneas: int
    hypopneas: int  # all hypopneas in sleep
    hypopneas_3: int  # with >= 3 % desaturation or an arousal
    hypopneas_4: int  # with >= 4 % desaturation
    desaturations_3: int
    desaturations_4: int
    desaturations_without_drop: int
    events_in_wake: int  # apneas, hypopneas and desaturations left out: onset not in sleep
    ahi3: float | None
    ahi4: float | None
    odi3: float | None
    odi4: float | None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_LABEL_SPACES = re.compile(r"[\s_\-]+")
_DROP = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def event_kind_of(label: str) -> str | None:
    """The event kind (:data:`EVENT_KINDS`) of a label, or None. Case, ``_``/``-`` and an NSRR ``|`` code
    part do not matter: ``"Obstructive apnea|Obstructive Apnea"``, ``"Hypopnea"``, ``"Arousal (ASDA)"``,
    ``"SpO2 desaturation"``, ``"Central Apnea"``, ``"Mixed Apnea"``, ``"Obstructive Hypopnea"``.
    Artifacts (``"SpO2 artifact"``), ``"Unsure"`` events and anything else are None."""
    text = _LABEL_SPACES.sub(" ", label.split("|", 1)[0].strip().lower())
    if not text or "artifact" in text or "artefact" in text:
        return None
    if "hypopnea" in text or "hypopnoea" in text:
        return "hypopnea"
    if "apnea" in text or "apnoea" in text:
        for kind in ("obstructive", "central", "mixed"):
            if kind in text:
                return f"{kind}_apnea"
        return "apnea"
    if "desaturation" in text or text in ("desat", "spo2 desat", "oxygen desaturation"):
        return "desaturation"
    if "arousal" in text:
        return "arousal"
    return None


def make_event(kind: str, onset_s: float, duration_s: float | None, *, nadir: float | None = None,
               baseline: float | None = None, drop: float | None = None, label: str = "") -> ScoredEvent:
    """A :class:`ScoredEvent`, the drop filled from baseline - nadir when not given (negative: unknown)."""
    if drop is None and nadir is not None and baseline is not None:
        drop = round(baseline - nadir, 6)
    if drop is not None and (not math.isfinite(drop) or drop < 0):
        drop = None
    dur = duration_s if duration_s is not None and math.isfinite(duration_s) and duration_s > 0 else 0.0
    return ScoredEvent(kind, float(onset_s), float(dur), nadir, baseline, drop, label)


def night_from_annotations(annotations: Iterable[Annotation], *, source: str = "edf+") -> ScoredNight:
    """A :class:`ScoredNight` from EDF+ (or any) annotations: stages as :func:`reference_hypnogram` reads
    them, events by :func:`event_kind_of`; a desaturation label holding a percentage (``"SpO2
    desaturation 4%"``) gives its drop."""
    annotations = list(annotations)
    stages = reference_hypnogram(annotations) or []
    events = []
    for a in annotations:
        kind = event_kind_of(a.text)
        if kind is None or not math.isfinite(a.onset_s):
            continue
        drop = None
        if kind == "desaturation":
            m = _DROP.search(a.text)
            drop = float(m.group(1)) if m else None
        events.append(make_event(kind, a.onset_s, a.duration_s, drop=drop, label=a.text))
    events.sort(key=lambda e: (e.onset_s, e.kind))
    return ScoredNight(stages, events, source)


def _associated(hypopnea: ScoredEvent, others: Sequence[ScoredEvent], window_s: float) -> list[ScoredEvent]:
    return [e for e in others if hypopnea.onset_s <= e.onset_s <= hypopnea.end_s + window_s]


def hypopnea_drop(hypopnea: ScoredEvent, desaturations: Sequence[ScoredEvent]) -> float | None:
    """The largest known drop of the hypopnea itself and of its associated desaturations (None: none known)."""
    drops = [d.spo2_drop for d in (hypopnea, *_associated(hypopnea, desaturations, DESATURATION_WINDOW_S))
             if d.spo2_drop is not None]
    return max(drops) if drops else None


def respiratory_indices(night: ScoredNight) -> RespiratoryIndices:
    """AHI3, AHI4, ODI3 and ODI4 of a scored night, by the rules in this module's docstring."""
    tst_h = sum(1 for s in night.stages if s in SLEEP_STAGES) * night.epoch_s / 3600.0
    desats = [e for e in night.events if e.kind == "desaturation"]
    arousals = [e for e in night.events if e.kind == "arousal"]
    apneas = hypopneas = h3 = h4 = d3 = d4 = d_unknown = in_wake = 0
    for e in night.events:
        if e.kind == "arousal":
            continue
        if night.stage_at(e.onset_s) not in SLEEP_STAGES:
            in_wake += 1
            continue
        if e.kind in APNEA_KINDS:
            apneas += 1
        elif e.kind == "hypopnea":
            hypopneas += 1
            drop = hypopnea_drop(e, desats)
            aroused = bool(_associated(e, arousals, AROUSAL_WINDOW_S))
            h3 += (drop is not None and drop >= 3.0) or aroused
            h4 += drop is not None and drop >= 4.0
        elif e.kind == "desaturation":
            if e.spo2_drop is None:
                d_unknown += 1
            else:
                d3 += e.spo2_drop >= 3.0
                d4 += e.spo2_drop >= 4.0

    def per_hour(n: int) -> float | None:
        return n / tst_h if tst_h > 0 else None

    return RespiratoryIndices(tst_h, apneas, hypopneas, h3, h4, d3, d4, d_unknown, in_wake,
                              per_hour(apneas + h3), per_hour(apneas + h4), per_hour(d3), per_hour(d4))
