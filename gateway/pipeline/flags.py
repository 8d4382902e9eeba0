"""The site's flag policy: which outcomes and sleep findings of a study are worth a quiet result.

Pure decisions over a study's stored results: :func:`evaluate` takes the hazards and sleep metrics
(as written to ``hazards.csv`` and ``metrics.json``) and a percentile lookup into the site's own
reference distribution, and returns the flags with the reason each was raised, every watched outcome
with its percentile and status, plus notes the result must carry (for example that percentile
thresholds are not active yet).

Risk flags are withheld, with the reason recorded, from a study whose signals are not interpretable
(``metrics.json`` ``quality``) or that lacks a modality the heads were trained with
(``flags.require_modalities``); its sleep findings still stand. A Cox head's log-hazard is defined only
up to a constant per outcome, so an absolute threshold (``log_hazard``) applies, and a hazard ratio is
reported, only for outcomes the model bundle declares calibrated.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
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
    "WatchedOutcome",
    "absolute_thresholds_refused",
    "demographics_note",
    "evaluate",
    "outcome_code",
    "watched_hazards",
    "withheld_reasons",
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
    percentile: float | None  # None while percentile thresholds are inactive
    reason: str
    head: str = ""  # "" for the bundle's diagnosis head, else the site head's name@checksum
    # exp(log_hazard) against the bundle's declared baseline; None when the outcome is not calibrated
    # (a Cox head's exp(log_hazard) is then not a ratio to anything and is never reported).
    hazard_ratio: float | None = None


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
class WatchedOutcome:
    """A watched outcome as this study has it: what a reviewer sees for every outcome, flagged or not."""

    label: str
    code: str
    phecode: str
    phenotype: str
    log_hazard: float
    percentile: float | None  # None: no reference yet (or fewer studies than needed), or no percentile rule
    reference_size: int
    status: str  # flagged | borderline | not flagged | withheld
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
    outcomes: list[WatchedOutcome] = field(default_factory=list)  # every watched outcome the model has
    # Why risk flags were withheld, by kind ("quality", "modality"); empty when they were not.
    withheld: dict[str, str] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return bool(self.flags or self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"flags": [asdict(f) for f in self.flags], "findings": [asdict(f) for f in self.findings],
                "notes": list(self.notes), "borderline": [asdict(b) for b in self.borderline],
                "outcomes": [asdict(o) for o in self.outcomes],
                "risk_flags": {"suppressed": bool(self.withheld), "reasons": list(self.withheld.values()),
                               "kinds": list(self.withheld)}}


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


def withheld_reasons(cfg: FlagsConfig, metrics: dict[str, Any] | None) -> dict[str, str]:
    """Why risk flags must not be raised for a study, by kind (empty: they may): ``quality`` (signals not
    interpretable) and ``modality`` (one the heads were trained with missing). Read from ``metrics.json``."""
    if not metrics:
        return {}
    reasons = {}
    quality = metrics.get("quality") or {}
    if quality.get("interpretable") is False:
        why = "; ".join(quality.get("reasons") or []) or "see the quality panel"
        reasons["quality"] = f"signals not interpretable: {why}"
    missing = [m for m in cfg.require_modalities if m in (metrics.get("missing_modalities") or [])]
    if missing:
        reasons["modality"] = (f"modality missing ({', '.join(missing)}): the heads were trained on studies "
                               "that had it")
    return reasons


def evaluate(cfg: FlagsConfig, hazards: list[HazardRow] | None, sleep: dict[str, Any] | None,
             percentile_of: PercentileLookup, calibrated: Collection[str] = (),
             withheld: dict[str, str] | None = None) -> FlagDecision:
    """The site's flag policy over one study's stored results.

    ``calibrated``: phecodes whose log-hazard the bundle declares calibrated (absolute thresholds and
    hazard ratios apply to those only). ``withheld``: reasons no risk flag may be raised (see
    :func:`withheld_reasons`); every watched outcome is then listed as ``withheld`` and sleep findings
    still apply.
    """
    decision = FlagDecision(withheld=dict(withheld or {}))
    if decision.withheld and hazards:
        decision.notes.append("no risk flags for this study: " + "; ".join(decision.withheld.values()))
    inactive_noted = False
    for outcome in cfg.outcomes if hazards else []:
        row = _find(hazards, outcome.label)
        if row is None:
            decision.notes.append(f"outcome '{outcome.label}' is not in this model's diagnosis head or site heads")
            continue
        is_calibrated = not row.head and row.phecode in calibrated
        reasons = []
        if outcome.log_hazard is not None and is_calibrated and row.log_hazard >= outcome.log_hazard:
            reasons.append(f"log-hazard {row.log_hazard:.2f} >= {outcome.log_hazard:g} (calibrated)")
        percentile, size = None, 0
        in_band = False
        if outcome.percentile is not None:
            ref = percentile_of(_ref_label(outcome.label, row), row.log_hazard)
            size = 0 if ref is None else ref[1]
            if ref is None or ref[1] < cfg.percentile_min_reference:
                if not inactive_noted and not decision.withheld:
                    decision.notes.append(
                        f"percentile thresholds inactive: the site reference holds {size} studies for this "
                        f"model, {cfg.percentile_min_reference} needed; no percentile flag is raised until then")
                    inactive_noted = True
            else:
                percentile = ref[0]
                if percentile >= outcome.percentile:
                    reasons.append(f"percentile {percentile:.1f} >= {outcome.percentile:g} "
                                   f"(site reference of {size} studies)")
                elif outcome.second_look_percentile is not None and percentile >= outcome.second_look_percentile:
                    in_band = True
        code = outcome_code(outcome)
        if decision.withheld:
            status = "withheld"
        elif reasons:
            status = "flagged"
            decision.flags.append(Flag(outcome.label, code, row.phecode, row.phenotype, row.log_hazard, percentile,
                                       "; ".join(reasons), row.head,
                                       row.hazard_ratio if is_calibrated else None))
        elif in_band:
            status = "borderline"
            decision.borderline.append(Borderline(
                outcome.label, code, row.phecode, row.phenotype, row.log_hazard, percentile, size,
                f"percentile {percentile:.1f} in the second-look band {outcome.second_look_percentile:g}"
                f" to {outcome.percentile:g} (site reference of {size} studies)", row.head))
        else:
            status = "not flagged"
        decision.outcomes.append(WatchedOutcome(outcome.label, code, row.phecode, row.phenotype, row.log_hazard,
                                                percentile, size, status, row.head))
    if hazards is None and cfg.outcomes:
        decision.notes.append("no diagnosis head in the model bundle: no risk flags")
    for rule in cfg.sleep_findings:
        finding = _finding(rule, sleep)
        if finding is not None:
            decision.findings.append(finding)
    return decision


def absolute_thresholds_refused(cfg: FlagsConfig, outcomes: list[tuple[str, str]],
                                calibrated: Collection[str]) -> list[str]:
    """The watched outcomes with a ``log_hazard`` threshold the model cannot honour: one line each.

    ``outcomes``: (phecode, phenotype) of the bundle's diagnosis head. An absolute threshold is
    model-specific and meaningful only where the bundle declares a calibrated baseline.
    """
    refused = []
    for outcome in cfg.outcomes:
        if outcome.log_hazard is None:
            continue
        wanted = outcome.label.strip().lower()
        phecode = next((p for p, name in outcomes if wanted in (p.lower(), name.lower())), None)
        if phecode is None or phecode not in calibrated:
            refused.append(f"flags.outcomes '{outcome.label}': log_hazard needs an outcome the model bundle "
                           "declares calibrated (bundle.json calibrated_outcomes); this bundle does not")
    return refused


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
