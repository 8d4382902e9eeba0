"""A scored (reference) hypnogram from a recording's annotations, and its agreement with the model's.

Sleep stage annotations become one stage per 30-s epoch, epoch ``i`` covering ``[30 i, 30 i + 30)`` s
from the recording start (the onset of annotations). An annotation covers the epochs whose *midpoint*
lies inside ``[onset, onset + duration)``, so a run of stages (Sleep-EDF: one annotation per run, with
its duration) fills all its epochs, and an annotation that is not aligned to the 30-s grid lands on the
epochs it mostly covers. An annotation without a duration (or with 0) scores one epoch. A later
annotation overrides an earlier one on the same epoch.

Stages are ``W``, ``N1``, ``N2``, ``N3`` and ``REM`` (as in :data:`inference.results.STAGES`); R&K stages 3
and 4 are N3. Movement time and unscored/unknown epochs are ``None`` and, like epochs no annotation
covers, are left out of the agreement. Recognised spellings (case, ``-``/``_`` and spaces do not
matter)::

    Sleep stage W|1|2|3|4|R|?     Sleep stage N1|N2|N3|REM     Stage 1 .. Stage 4, Stage W, Stage R/REM, Stage N1..
    W, Wake, Awake, N1, N2, N3, N4, NREM1..NREM3, R, REM       SLEEP-S0..SLEEP-S4, SLEEP-REM, SLEEP-MT, SLEEP-UNSCORED
    Movement time, MT, ?, Unscored, Unknown, Sleep stage ?    (-> None)

Other annotations (arousals, lights off...) are ignored; bare digits are not read as stages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..recording import Annotation

__all__ = ["EPOCH_S", "STAGES", "Agreement", "agreement", "reference_hypnogram", "stage_of"]

EPOCH_S = 30.0
STAGES: tuple[str, ...] = ("W", "N1", "N2", "N3", "REM")


class _Unscored:
    def __repr__(self) -> str:
        return "UNSCORED"


UNSCORED = _Unscored()  # a stage annotation that scores no stage (movement time, '?')

_CORE = {  # after a "sleep stage" / "stage" / "sleep" prefix, or bare
    "w": "W", "wake": "W", "awake": "W",
    "n1": "N1", "nrem1": "N1", "n2": "N2", "nrem2": "N2", "n3": "N3", "nrem3": "N3", "n4": "N3", "nrem4": "N3",
    "r": "REM", "rem": "REM",
    "?": UNSCORED, "unscored": UNSCORED, "unknown": UNSCORED, "movement time": UNSCORED, "movement": UNSCORED,
    "mt": UNSCORED,
}
_PREFIXED = {  # only with a prefix: "Stage 2", "SLEEP-S2", "Sleep stage 4"
    "0": "W", "1": "N1", "2": "N2", "3": "N3", "4": "N3", "5": "REM",
    "s0": "W", "s1": "N1", "s2": "N2", "s3": "N3", "s4": "N3", "s5": "REM", "sw": "W", "sr": "REM",
    "rem sleep": "REM",
}
_PREFIX = re.compile(r"^(sleep stage|stage|sleep)\s+(.*)$")
_SPACES = re.compile(r"[\s_\-:]+")


def stage_of(text: str) -> str | _Unscored | None:
    """``"W"``/``"N1"``/``"N2"``/``"N3"``/``"REM"``, :data:`UNSCORED` (movement, unknown), or None (not a stage)."""
    norm = _SPACES.sub(" ", text.strip().lower()).strip()
    if norm in ("rem sleep", "sleep rem"):
        return "REM"
    m = _PREFIX.match(norm)
    if m:
        core = m.group(2).strip()
        return _CORE.get(core, _PREFIXED.get(core.replace(" ", "") if core.startswith("s") else core))
    return _CORE.get(norm)


def _normalise_predicted(stage: str | None) -> str | None:
    if stage is None:
        return None
    found = stage_of(stage)
    return found if isinstance(found, str) else None


def reference_hypnogram(annotations: Iterable[Annotation], n_epochs: int | None = None) -> list[str | None] | None:
    """One stage (or None) per 30-s epoch from the stage annotations; None when there are none.

    ``n_epochs`` fixes the length (the model hypnogram's, say): stages past it are cut, epochs past the
    last annotation are None. Without it the hypnogram ends with the epoch holding the last scored end.
    """
    scored: list[tuple[float, float, str | None]] = []
    for annotation in annotations:
        stage = stage_of(annotation.text)
        if stage is None:
            continue
        onset = float(annotation.onset_s)
        duration = annotation.duration_s
        if duration is None or not math.isfinite(duration) or duration <= 0:
            duration = EPOCH_S
        if not math.isfinite(onset):
            continue
        scored.append((onset, onset + float(duration), stage if isinstance(stage, str) else None))
    if not scored:
        return None
    if n_epochs is None:
        end = max(e for _, e, _ in scored)
        n_epochs = max(0, math.ceil(end / EPOCH_S - 0.5))  # epochs whose midpoint is before the end
    hypnogram: list[str | None] = [None] * n_epochs
    for onset, end, stage in scored:
        # epochs i with onset <= 30 i + 15 < end
        first = max(0, math.ceil((onset - EPOCH_S / 2) / EPOCH_S))
        stop = min(n_epochs, math.ceil((end - EPOCH_S / 2) / EPOCH_S))
        for i in range(first, stop):
            hypnogram[i] = stage
    return hypnogram


@dataclass(frozen=True)
class Agreement:
    """Epoch-by-epoch agreement of a predicted hypnogram with the reference (scored) one.

    ``confusion[reference][predicted]`` counts epochs, over :data:`STAGES` (rows and columns always all
    present). ``accuracy`` and ``kappa`` (Cohen's) are None when no epoch was compared, ``kappa`` also
    when it is undefined (both hypnograms one and the same single stage). ``f1[stage]`` is None for a
    stage that neither hypnogram holds.
    """

    epochs: int  # epochs compared: both hypnograms have a stage
    accuracy: float | None
    kappa: float | None
    confusion: dict[str, dict[str, int]]
    f1: dict[str, float | None]

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "accuracy": self.accuracy, "kappa": self.kappa,
                "confusion": self.confusion, "f1": self.f1}


def agreement(predicted: Sequence[str | None], reference: Sequence[str | None]) -> Agreement:
    """Accuracy, Cohen's kappa, confusion matrix and per-stage F1 over the epochs both hypnograms score.

    Epochs are compared up to the shorter hypnogram. Stage names are normalised (``"R"`` is ``"REM"``);
    a reference epoch that is None (unscored, movement) and a predicted one that is None or not a stage
    are left out.
    """
    confusion = {r: {p: 0 for p in STAGES} for r in STAGES}
    n = 0
    for pred, ref in zip(predicted, reference, strict=False):
        p, r = _normalise_predicted(pred), _normalise_predicted(ref)
        if p is None or r is None:
            continue
        confusion[r][p] += 1
        n += 1
    if n == 0:
        return Agreement(0, None, None, confusion, {s: None for s in STAGES})
    observed = sum(confusion[s][s] for s in STAGES) / n
    row = {s: sum(confusion[s].values()) for s in STAGES}
    col = {s: sum(confusion[r][s] for r in STAGES) for s in STAGES}
    expected = sum(row[s] * col[s] for s in STAGES) / (n * n)
    kappa = (observed - expected) / (1.0 - expected) if expected < 1.0 else None
    f1: dict[str, float | None] = {}
    for s in STAGES:
        tp = confusion[s][s]
        denominator = row[s] + col[s]  # 2 TP + FP + FN
        f1[s] = 2 * tp / denominator if denominator else None
    return Agreement(n, observed, kappa, confusion, f1)
