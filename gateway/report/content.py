"""What a study report holds, gathered once from the study row and its outputs folder.

:func:`build_report` reads the :class:`~gateway.store.models.Study` row (identifiers, model, montage,
the flag decision) and the files of its outputs folder (``hypnogram.csv``, ``metrics.json``,
``hazards.csv``, ``attribution.csv``, through :mod:`gateway.pipeline.outputs`) into one
:class:`StudyReport`; the HTML and the PDF are both drawn from it, so they hold the same content.
Anything may be missing (an older study without ``quality`` or ``outcomes``, a bundle without a
staging or diagnosis head): the report says so instead of failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.identity import BundleIdentity

from ..pipeline.outputs import read_attribution, read_hypnogram, read_metrics

if TYPE_CHECKING:
    from ..store.models import Study

__all__ = [
    "EPOCH_S",
    "STAGES",
    "AttributionRow",
    "ChannelQuality",
    "Outcome",
    "Patient",
    "Quality",
    "ReportError",
    "StudyReport",
    "build_report",
]

EPOCH_S = 30.0
STAGES: tuple[str, ...] = ("W", "N1", "N2", "N3", "REM")
_STAGE_ALIASES = {"R": "REM", "N4": "N3"}


class ReportError(ValueError):
    """The study has nothing to report on (no outputs folder, or no metrics.json in it)."""


@dataclass(frozen=True)
class Patient:
    name: str | None
    patient_id: str | None
    issuer: str | None
    birth_date: date | None
    sex: str | None
    accession: str | None

    @property
    def display_name(self) -> str | None:
        """``Family, Given`` from an HL7/DICOM ``Family^Given^...`` name; free text as recorded."""
        if not self.name:
            return None
        parts = [p.strip() for p in self.name.split("^")]
        if len(parts) == 1:
            return parts[0]
        family, given = parts[0], " ".join(p for p in parts[1:] if p)
        return f"{family}, {given}" if family and given else (family or given)


@dataclass(frozen=True)
class Outcome:
    """A watched outcome as the flag step saw it."""

    label: str
    code: str
    phecode: str
    phenotype: str
    log_hazard: float | None
    percentile: float | None
    reference_size: int | None
    status: str  # flagged | borderline | not flagged | inactive | withheld (as the flag step wrote it)
    head: str = ""
    reason: str | None = None

    @property
    def marked(self) -> bool:
        return self.status in ("flagged", "borderline")


@dataclass(frozen=True)
class ChannelQuality:
    label: str
    modality: str
    usable: bool
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Quality:
    interpretable: bool
    reasons: tuple[str, ...]
    channels: tuple[ChannelQuality, ...]
    modalities: dict[str, tuple[int, int]]  # modality -> (usable channels, channels)


@dataclass(frozen=True)
class AttributionRow:
    """The change in one watched outcome's log-hazard each modality makes (log-hazard minus log-hazard
    with the modality masked)."""

    label: str
    phecode: str
    phenotype: str
    status: str
    changes: dict[str, float]


@dataclass(frozen=True)
class StudyReport:
    """Everything the report shows, in display order; plain values only (no database, no files)."""

    study_id: int | None
    key: str
    state: str | None
    version: int | None
    patient: Patient
    recording_start: datetime | None
    duration_s: float | None
    recording_format: str | None
    # the model's hypnogram (one stage per 30-s epoch) and, when the recording was scored, the scored one
    hypnogram: tuple[str, ...]
    tail_epochs: int  # the last N epochs were staged as the tail past the last whole 5-minute window
    scored: tuple[str | None, ...] | None
    agreement: dict[str, Any] | None  # epochs, accuracy, kappa, f1 (staging_agreement without the stages)
    sleep: dict[str, Any] | None
    outcomes: tuple[Outcome, ...]
    findings: tuple[dict[str, Any], ...]
    notes: tuple[str, ...]
    risk_flags_suppressed: bool
    suppression_reasons: tuple[str, ...]
    flags_decided: bool  # False: the flag step has not run (or stored nothing) for this study yet
    quality: Quality | None
    attribution_modalities: tuple[str, ...]
    attribution: tuple[AttributionRow, ...] | None  # None: attribution.csv absent
    modalities: tuple[str, ...]
    missing_modalities: tuple[str, ...]
    bundle_name: str | None
    bundle_version: str | None
    bundle_hash: str | None
    validated: bool
    montage_name: str | None
    montage_version: str | None
    montage_channels: dict[str, tuple[str, ...]]
    unmapped: tuple[str, ...]
    demographics_encoding: str | None
    demographics_used: dict[str, Any] | None
    device: str | None
    precision: str | None
    generated_at: datetime
    warnings: tuple[str, ...] = field(default=())

    @property
    def flagged(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.status == "flagged")

    @property
    def borderline(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.status == "borderline")

    @property
    def n_epochs(self) -> int:
        return len(self.hypnogram)


# ---- values ------------------------------------------------------------------------------------------------
def finite(v: Any) -> float | None:
    """A finite float, or None for None, NaN, infinity, a bool or anything that is not a number."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    f = finite(v)
    return None if f is None else round(f)


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else []


def _str(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and not v.strip()) else str(v)


def _stage(v: Any) -> str | None:
    s = _str(v)
    if s is None:
        return None
    s = _STAGE_ALIASES.get(s.upper(), s.upper())
    return s if s in STAGES else None


# ---- the flag decision -------------------------------------------------------------------------------------
def _outcome(d: dict, status: str | None = None) -> Outcome:
    return Outcome(label=str(d.get("label") or d.get("phenotype") or d.get("phecode") or "?"),
                   code=str(d.get("code") or ""), phecode=str(d.get("phecode") or ""),
                   phenotype=str(d.get("phenotype") or d.get("label") or ""),
                   log_hazard=finite(d.get("log_hazard")), percentile=finite(d.get("percentile")),
                   reference_size=_int(d.get("reference_size")), status=str(status or d.get("status") or "?"),
                   head=str(d.get("head") or ""), reason=_str(d.get("reason")))


def _outcomes(flags: dict) -> tuple[Outcome, ...]:
    """Every watched outcome with its status; a decision stored before ``outcomes`` existed lists only the
    flagged and borderline ones (the reasons come from ``flags``/``borderline`` either way)."""
    reasons = {(str(f.get("label")), str(f.get("head") or "")): _str(f.get("reason"))
               for f in [*_list(flags.get("flags")), *_list(flags.get("borderline"))] if isinstance(f, dict)}
    if "outcomes" in flags:
        out = []
        for d in _list(flags.get("outcomes")):
            if isinstance(d, dict):
                o = _outcome(d)
                reason = reasons.get((o.label, o.head))
                out.append(o if o.reason or reason is None else replace(o, reason=reason))
        return tuple(out)
    return (*(_outcome(f, "flagged") for f in _list(flags.get("flags")) if isinstance(f, dict)),
            *(_outcome(b, "borderline") for b in _list(flags.get("borderline")) if isinstance(b, dict)))


def _quality(doc: Any) -> Quality | None:
    if not isinstance(doc, dict) or "interpretable" not in doc:
        return None
    channels = tuple(
        ChannelQuality(label=str(label), modality=str(_dict(c).get("modality") or ""),
                       usable=bool(_dict(c).get("usable", True)),
                       problems=tuple(str(p) for p in _list(_dict(c).get("problems"))))
        for label, c in _dict(doc.get("channels")).items())
    modalities = {str(m): (_int(_dict(v).get("usable")) or 0, _int(_dict(v).get("channels")) or 0)
                  for m, v in _dict(doc.get("modalities")).items()}
    return Quality(interpretable=bool(doc.get("interpretable")),
                   reasons=tuple(str(r) for r in _list(doc.get("reasons"))), channels=channels,
                   modalities=modalities)


def _attribution(out_dir: Path, metrics: dict, outcomes: tuple[Outcome, ...]
                 ) -> tuple[tuple[str, ...], tuple[AttributionRow, ...] | None]:
    table = read_attribution(out_dir)
    if table is None:
        return (), None
    modalities = tuple(str(m) for m in _list(_dict(metrics.get("attribution")).get("modalities")))
    if not modalities:
        modalities = tuple(next(iter(table.values()), {}))
    rows = tuple(AttributionRow(o.label, o.phecode, o.phenotype, o.status, dict(table[o.phecode]))
                 for o in outcomes if not o.head and o.phecode in table)
    return modalities, rows


def _bundle_hash(bundle: dict) -> str | None:
    checkpoints = {str(k): str(v) for k, v in _dict(bundle.get("checkpoints")).items()}
    return BundleIdentity("", "", False, "", checkpoints).model_hash


# ---- build -------------------------------------------------------------------------------------------------
def build_report(study: Study, out_dir: Path | str | None = None, flags: dict[str, Any] | None = None, *,
                 generated_at: datetime | None = None) -> StudyReport:
    """Gather a study's report from its row and outputs folder.

    ``out_dir``: the outputs folder (default ``study.output_path``). ``flags``: the flag decision to
    show (``FlagDecision.as_dict()``) instead of ``study.flags``, for a report written before the
    decision is committed. ``generated_at``: the time printed on the report (default: now, UTC).
    Raises :class:`ReportError` when the study has no outputs folder or no ``metrics.json`` in it.
    """
    folder = out_dir if out_dir is not None else study.output_path
    if not folder:
        raise ReportError(f"study {study.key} has no outputs (state {study.state}): nothing to report")
    folder = Path(folder)
    metrics = read_metrics(folder) if folder.is_dir() else None
    if metrics is None:
        raise ReportError(f"study {study.key} has no metrics.json in its outputs folder: nothing to report")
    decision = flags if flags is not None else study.flags
    decided = isinstance(decision, dict)
    decision = _dict(decision)

    epochs = read_hypnogram(folder) or []
    hypnogram = tuple(_stage(e.stage) or "?" for e in epochs)
    tail_epochs = sum(1 for e in epochs if e.tail)

    scoring = metrics.get("staging_agreement")
    scored = agreement = None
    if isinstance(scoring, dict):
        agreement = {k: v for k, v in scoring.items() if k != "scored"}
        if isinstance(scoring.get("scored"), list):
            scored = tuple(_stage(s) for s in scoring["scored"])

    outcomes = _outcomes(decision)
    risk = _dict(decision.get("risk_flags"))
    attribution_modalities, attribution = _attribution(folder, metrics, outcomes)

    bundle = _dict(metrics.get("model_bundle"))
    montage = _dict(metrics.get("montage"))
    recording = _dict(metrics.get("recording"))
    validated = metrics.get("validated")
    if validated is None:
        validated = bundle.get("validated", study.bundle_validated)
    warnings = []
    if hypnogram and scored is not None and len(scored) != len(hypnogram):
        warnings.append(f"the scored hypnogram has {len(scored)} epochs, the model's {len(hypnogram)}")

    return StudyReport(
        study_id=study.id, key=study.key, state=study.state, version=study.version,
        patient=Patient(name=study.patient_name, patient_id=study.patient_id, issuer=study.patient_id_issuer,
                        birth_date=study.birth_date, sex=study.sex, accession=study.accession),
        recording_start=study.recording_start,
        duration_s=finite(recording.get("duration_s")) or finite(metrics.get("duration_encoded_s")),
        recording_format=_str(recording.get("format")),
        hypnogram=hypnogram, tail_epochs=tail_epochs, scored=scored, agreement=agreement,
        sleep=metrics.get("sleep") if isinstance(metrics.get("sleep"), dict) else None,
        outcomes=outcomes,
        findings=tuple(f for f in _list(decision.get("findings")) if isinstance(f, dict)),
        notes=tuple(str(n) for n in _list(decision.get("notes"))),
        risk_flags_suppressed=bool(risk.get("suppressed")),
        suppression_reasons=tuple(str(r) for r in _list(risk.get("reasons"))),
        flags_decided=decided,
        quality=_quality(metrics.get("quality")),
        attribution_modalities=attribution_modalities, attribution=attribution,
        modalities=tuple(str(m) for m in _list(metrics.get("modalities"))),
        missing_modalities=tuple(str(m) for m in _list(metrics.get("missing_modalities"))),
        bundle_name=study.bundle_name or _str(bundle.get("name")),
        bundle_version=study.bundle_version or _str(bundle.get("version")),
        bundle_hash=study.bundle_hash or _bundle_hash(bundle),
        validated=validated is True,
        montage_name=study.montage_name or _str(montage.get("name")),
        montage_version=study.montage_version or _str(montage.get("version")),
        montage_channels={str(m): tuple(str(c) for c in _list(v))
                          for m, v in _dict(montage.get("channels")).items()},
        unmapped=tuple(str(u) for u in _list(montage.get("unmapped"))),
        demographics_encoding=_str(metrics.get("demographics_encoding")),
        demographics_used=metrics.get("demographics_used") if isinstance(metrics.get("demographics_used"),
                                                                         dict) else None,
        device=_str(metrics.get("device")), precision=_str(metrics.get("precision")),
        generated_at=generated_at or datetime.now(UTC).replace(microsecond=0),
        warnings=tuple(warnings),
    )
