"""The site's flag policy: which outcomes and sleep findings of a study are worth a quiet result.

Pure decisions over a study's stored results: :func:`evaluate` takes the hazards and sleep metrics
(as written to ``hazards.csv`` and ``metrics.json``) and a percentile lookup into the site's own
reference distribution, and returns the flags with the reason each was raised, plus notes the
result must carry (for example that percentile thresholds are not active yet).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import FlagOutcome, FlagsConfig, SleepFinding
from .outputs import HazardRow

__all__ = [
    "Borderline",
    "Finding",
    "Flag",
    "FlagDecision",
    "HazardRow",
    "demographics_note",
    "evaluate",
    "outcome_code",
    "watched_hazards",
]

# (label, log_hazard) -> (percentile 0-100, reference size); None when no reference exists for the model.
PercentileLookup = Callable[[str, float], tuple[float, int] | None]

_FINDING_TEXT = {
    "tst_min": "Total sleep time",
    "sleep_efficiency_pct": "Sleep efficiency",
    "sleep_onset_latency_min": "Sleep onset latency",
    "waso_min": "Wake after sleep onset",
    "rem_latency_min": "REM latency",
}


@dataclass(frozen=True)
class Flag:
    label: str  # as configured (phecode or phenotype)
    code: str  # local code
    phecode: str
    phenotype: str
    log_hazard: float
    hazard_ratio: float
    percentile: float | None  # None while percentile thresholds are inactive
    reason: str
    head: str = ""  # "" for the bundle's diagnosis head, else the site head's name@checksum


@dataclass(frozen=True)
class Borderline:
    """A watched outcome in its second-look band: below the flag threshold, worth a review."""

    label: str
    code: str
    phecode: str
    phenotype: str
    log_hazard: float
    percentile: float
    reference_size: int
    reason: str
    head: str = ""


@dataclass(frozen=True)
class Finding:
    metric: str
    value: float
    text: str
    reason: str


@dataclass
class FlagDecision:
    flags: list[Flag] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    borderline: list[Borderline] = field(default_factory=list)  # second look: not flagged

    @property
    def flagged(self) -> bool:
        return bool(self.flags or self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"flags": [asdict(f) for f in self.flags], "findings": [asdict(f) for f in self.findings],
                "notes": list(self.notes), "borderline": [asdict(b) for b in self.borderline]}


def outcome_code(outcome: FlagOutcome) -> str:
    if outcome.code:
        return outcome.code
    slug = "".join(ch if ch.isalnum() else "-" for ch in outcome.label.upper()).strip("-")
    return f"PSG-{slug}"[:20]


def demographics_note(encoding: str | None) -> str:
    """The ORU note that names the age/sex encoding behind the risk estimates: never silence. Outputs
    written before the encoding was recorded (``None``) count as unconfirmed."""
    if not encoding or encoding == "unconfirmed":
        return ("Age/sex encoding UNCONFIRMED: the model bundle does not declare how age and sex were "
                "encoded in training; risk estimates may not match the model's.")
    return f"Age/sex inputs encoded as: {encoding} (declared by the model bundle)."


def _find(rows: list[HazardRow], label: str) -> HazardRow | None:
    wanted = label.strip().lower()
    for row in rows:
        if row.phecode.lower() == wanted or row.phenotype.lower() == wanted:
            return row
    return None


def watched_hazards(cfg: FlagsConfig, rows: list[HazardRow]) -> dict[str, float]:
    """label -> log-hazard of every watched outcome the model has (what the reference keeps)."""
    out = {}
    for outcome in cfg.outcomes:
        row = _find(rows, outcome.label)
        if row is not None:
            out[_ref_label(outcome.label, row)] = row.log_hazard
    return out


def _ref_label(label: str, row: HazardRow) -> str:
    """The key of an outcome in the site reference: a site head's outcomes are kept per head version,
    so a re-fitted head starts a fresh reference."""
    return label if not row.head else f"{label}@{row.head.rsplit('@', 1)[-1]}"


def evaluate(cfg: FlagsConfig, hazards: list[HazardRow] | None, sleep: dict[str, Any] | None,
             percentile_of: PercentileLookup) -> FlagDecision:
    decision = FlagDecision()
    inactive_noted = False
    for outcome in cfg.outcomes if hazards else []:
        row = _find(hazards, outcome.label)
        if row is None:
            decision.notes.append(f"outcome '{outcome.label}' is not in this model's diagnosis head or site heads")
            continue
        reasons = []
        second_look: Borderline | None = None
        hr = row.hazard_ratio
        if outcome.hazard_ratio is not None and hr >= outcome.hazard_ratio:
            reasons.append(f"hazard ratio {hr:.2f} >= {outcome.hazard_ratio:g}")
        percentile = None
        if outcome.percentile is not None:
            ref = percentile_of(_ref_label(outcome.label, row), row.log_hazard)
            if ref is None or ref[1] < cfg.percentile_min_reference:
                if not inactive_noted:
                    size = 0 if ref is None else ref[1]
                    decision.notes.append(
                        f"percentile thresholds inactive: the site reference holds {size} studies for this "
                        f"model, {cfg.percentile_min_reference} needed")
                    inactive_noted = True
            else:
                percentile = ref[0]
                if percentile >= outcome.percentile:
                    reasons.append(f"percentile {percentile:.1f} >= {outcome.percentile:g} "
                                   f"(site reference of {ref[1]} studies)")
                elif outcome.second_look_percentile is not None and percentile >= outcome.second_look_percentile:
                    second_look = Borderline(
                        outcome.label, outcome_code(outcome), row.phecode, row.phenotype, row.log_hazard,
                        percentile, ref[1],
                        f"percentile {percentile:.1f} in the second-look band {outcome.second_look_percentile:g}"
                        f" to {outcome.percentile:g} (site reference of {ref[1]} studies)", row.head)
        if reasons:
            decision.flags.append(Flag(outcome.label, outcome_code(outcome), row.phecode, row.phenotype,
                                       row.log_hazard, hr, percentile, "; ".join(reasons), row.head))
        elif second_look is not None:
            decision.borderline.append(second_look)
    if hazards is None and cfg.outcomes:
        decision.notes.append("no diagnosis head in the model bundle: no risk flags")
    for rule in cfg.sleep_findings:
        finding = _finding(rule, sleep)
        if finding is not None:
            decision.findings.append(finding)
    return decision


def _finding(rule: SleepFinding, sleep: dict[str, Any] | None) -> Finding | None:
    if not sleep or sleep.get(rule.metric) is None:
        return None
    value = float(sleep[rule.metric])
    text = rule.text or _FINDING_TEXT[rule.metric]
    if rule.below is not None and value < rule.below:
        return Finding(rule.metric, value, text, f"{text} {value:.1f} < {rule.below:g}")
    if rule.above is not None and value > rule.above:
        return Finding(rule.metric, value, text, f"{text} {value:.1f} > {rule.above:g}")
    return None
