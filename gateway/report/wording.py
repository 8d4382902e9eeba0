"""The report's words and numbers as printed: one place, so that the HTML and the PDF say the same.

Every function takes values from a :class:`~gateway.report.content.StudyReport` and returns display
strings; a missing value reads ``—`` (or says why it is missing).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from .content import STAGES, ChannelQuality, Outcome, StudyReport, finite

__all__ = [
    "BANNER",
    "BAR_MM",
    "DASH",
    "SUBTITLE",
    "TITLE",
    "agreement_line",
    "attribution_note",
    "attribution_rows",
    "banner_detail",
    "clock",
    "footer",
    "generated",
    "identity_rows",
    "model_rows",
    "number",
    "outcome_rows",
    "outcome_status",
    "patient_rows",
    "percentile",
    "quality_modalities",
    "quality_problems",
    "quality_summary",
    "signed",
    "sleep_rows",
    "stage_rows",
]

DASH = "\u2014"
TITLE = "Polysomnography report"
SUBTITLE = "Automated sleep staging and disease-risk estimates (SleepFM-compatible model)"
BANNER = "NOT FOR CLINICAL USE"
BAR_MM = 14.0  # the longest attribution bar in the HTML page

_STATUS = {
    "flagged": "FLAGGED",
    "borderline": "second look",
    "not flagged": "not flagged",
    "inactive": "no threshold yet",
    "withheld": "withheld",
}


def number(v: Any, digits: int = 1, unit: str = "", missing: str = DASH) -> str:
    f = finite(v)
    if f is None:
        return missing
    return f"{f:.{digits}f}{(' ' + unit) if unit else ''}"


def signed(v: Any, digits: int = 3) -> str:
    f = finite(v)
    return DASH if f is None else f"{f:+.{digits}f}".replace("-", "\u2212")


def percentile(v: Any) -> str:
    f = finite(v)
    return DASH if f is None else f"{f:.1f}"


def clock(v: datetime | None, seconds: bool = False) -> str:
    if v is None:
        return DASH
    return v.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _date(v: date | None) -> str:
    return DASH if v is None else v.isoformat()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def patient_rows(r: StudyReport) -> list[tuple[str, str]]:
    """The patient block of the header: who and which study (never in a file name)."""
    p = r.patient
    pid = p.patient_id or DASH
    if p.patient_id and p.issuer:
        pid = f"{p.patient_id} ({p.issuer})"
    return [
        ("Patient", p.display_name or DASH),
        ("Patient ID", pid),
        ("Birth date", _date(p.birth_date)),
        ("Sex", {"M": "male", "F": "female", "O": "other", "U": "unknown"}.get(p.sex or "", p.sex or DASH)),
        ("Study date", clock(r.recording_start)),
        ("Accession", p.accession or DASH),
        ("Recording", f"{_duration(r.duration_s)}" + (f", {r.recording_format}" if r.recording_format else "")),
        ("Study key", r.key),
    ]


def banner_detail(r: StudyReport) -> str:
    name = " ".join(x for x in (r.bundle_name, r.bundle_version) if x) or "the model bundle"
    return f"{name} is not validated by this site: for research and testing only; not to inform patient care."


def agreement_line(r: StudyReport) -> str | None:
    """Kappa and accuracy against the scored hypnogram, or None when the study has none."""
    a = r.agreement
    if a is None:
        return None
    epochs = a.get("epochs") or 0
    if not epochs:
        return "Scored hypnogram present, but no epoch is scored in both: no agreement computed."
    acc = finite(a.get("accuracy"))
    kappa = finite(a.get("kappa"))
    return (f"Agreement with the scored hypnogram over {epochs} epochs: accuracy "
            f"{number(None if acc is None else 100 * acc, 1, '%')}, Cohen\u2019s \u03ba "
            f"{number(kappa, 2, missing='undefined').replace('-', chr(0x2212))}.")


def sleep_rows(r: StudyReport) -> list[tuple[str, str]]:
    s = r.sleep or {}
    return [
        ("Time in bed (TIB)", number(s.get("tib_min"), 1, "min")),
        ("Total sleep time (TST)", number(s.get("tst_min"), 1, "min")),
        ("Sleep efficiency", number(s.get("sleep_efficiency_pct"), 1, "%")),
        ("Sleep onset latency", number(s.get("sleep_onset_latency_min"), 1, "min", missing="no sleep")),
        ("Wake after sleep onset (WASO)", number(s.get("waso_min"), 1, "min")),
        ("REM latency", number(s.get("rem_latency_min"), 1, "min", missing="no REM")),
    ]


def stage_rows(r: StudyReport) -> list[tuple[str, str, str]]:
    """(stage, minutes, % of TST) per stage; wake has no share of sleep."""
    s = r.sleep or {}
    minutes = s.get("stage_min") if isinstance(s.get("stage_min"), dict) else {}
    pct = s.get("stage_pct_of_tst") if isinstance(s.get("stage_pct_of_tst"), dict) else {}
    return [(stage, number(minutes.get(stage), 1), DASH if stage == "W" else number(pct.get(stage), 1))
            for stage in STAGES]


def outcome_status(o: Outcome) -> str:
    return _STATUS.get(o.status, o.status)


def outcome_rows(r: StudyReport) -> list[dict[str, Any]]:
    """The watched-outcomes table as printed; ``css``: flagged / borderline for a marked row."""
    return [{"name": o.phenotype + (f" ({o.phecode})" if o.phecode and o.phecode != o.phenotype else ""),
             "code": o.code, "head": o.head, "log_hazard": signed(o.log_hazard),
             "percentile": percentile(o.percentile),
             "reference_size": DASH if o.reference_size is None else str(o.reference_size),
             "status": outcome_status(o), "css": o.status if o.marked else ""}
            for o in r.outcomes]


def attribution_rows(r: StudyReport) -> list[dict[str, Any]]:
    """The attribution table as printed; ``width``: the bar in mm (the largest change gets BAR_MM)."""
    rows = r.attribution or ()
    scale = max((abs(v) for row in rows for v in row.changes.values()), default=0.0) or 1.0
    return [{"name": row.phenotype, "css": row.status if row.status in ("flagged", "borderline") else "",
             "cells": [{"text": signed(row.changes.get(m)),
                        "width": f"{BAR_MM * abs(row.changes.get(m, 0.0)) / scale:.1f}",
                        "direction": "up" if row.changes.get(m, 0.0) >= 0 else "down"}
                       for m in r.attribution_modalities]}
            for row in rows]


def attribution_note(r: StudyReport) -> str:
    if r.attribution is None:
        return ("Modality attribution was not computed for this study (fewer than two modalities present, or "
                "outputs written before attribution existed).")
    if not r.attribution:
        return "No watched outcome of the bundle's diagnosis head to attribute (site heads are not attributed)."
    return ("Change in each watched outcome's log-hazard that a modality makes: the log-hazard minus the "
            "log-hazard with that modality masked. Positive: the modality raises the estimate.")


def quality_summary(r: StudyReport) -> str:
    q = r.quality
    if q is None:
        return "Signal quality checks were not recorded for this study."
    if q.interpretable:
        return "Signals interpretable."
    return "Signals NOT interpretable: " + ("; ".join(q.reasons) if q.reasons else "see the channels below") + "."


def quality_modalities(r: StudyReport) -> list[str]:
    """One line per modality: usable channels of mapped, and the channel labels."""
    q = r.quality
    if q is None:
        return []
    lines = []
    for m in dict.fromkeys([*q.modalities, *(c.modality for c in q.channels)]):
        usable, total = q.modalities.get(m, (sum(c.usable for c in q.channels if c.modality == m),
                                             sum(1 for c in q.channels if c.modality == m)))
        labels = ", ".join(c.label for c in q.channels if c.modality == m)
        lines.append(f"{m} {usable}/{total} usable" + (f": {labels}" if labels else ""))
    return lines


def quality_problems(r: StudyReport) -> list[ChannelQuality]:
    """The channels with a problem (unusable, or usable with a remark)."""
    return [c for c in r.quality.channels if c.problems or not c.usable] if r.quality else []


def model_rows(r: StudyReport) -> list[tuple[str, str]]:
    demo = r.demographics_used or {}
    age = finite(demo.get("age_years"))
    used = ", ".join(x for x in (f"age {age:.0f} y" if age is not None else "",
                                 f"sex {demo['sex']}" if demo.get("sex") else "") if x) or "none recorded"
    encoding = r.demographics_encoding or "unconfirmed"
    if encoding == "unconfirmed":
        encoding = "UNCONFIRMED: the bundle does not declare how age and sex were encoded in training"
    modalities = ", ".join(r.modalities) or DASH
    if r.missing_modalities:
        modalities += f" (missing: {', '.join(r.missing_modalities)})"
    return [
        ("Model bundle", " ".join(x for x in (r.bundle_name, r.bundle_version) if x) or DASH),
        ("Model hash", r.bundle_hash or DASH),
        ("Validated by this site", "yes" if r.validated else "NO: not for clinical use"),
        ("Montage", " ".join(x for x in (r.montage_name, r.montage_version) if x) or DASH),
        ("Modalities", modalities),
        ("Unmapped channels", ", ".join(r.unmapped) or "none"),
        ("Age/sex encoding", encoding),
        ("Age/sex used", used),
        ("Computed on", " ".join(x for x in (r.device, r.precision) if x) or DASH),
    ]


def identity_rows(r: StudyReport) -> list[tuple[str, str]]:
    return [("Study", f"{r.key}" + (f" (id {r.study_id}, version {r.version})" if r.study_id else "")),
            ("State", r.state or DASH)]


def footer(r: StudyReport) -> tuple[str, str]:
    """The footer's two lines: study, model and montage; age/sex encoding and when it was generated."""
    bundle = " ".join(x for x in (r.bundle_name, r.bundle_version) if x) or DASH
    short = (r.bundle_hash or "")[:12] or DASH
    montage = " ".join(x for x in (r.montage_name, r.montage_version) if x) or DASH
    encoding = r.demographics_encoding or "unconfirmed"
    return (f"Study {r.key} \u00b7 Model {bundle} (hash {short}) \u00b7 Montage {montage}",
            f"Age/sex encoding: {encoding} \u00b7 Generated {generated(r)} UTC \u00b7 psg-gateway")


def generated(r: StudyReport) -> str:
    """When the report was generated, in UTC."""
    at = r.generated_at.astimezone(UTC) if r.generated_at.tzinfo else r.generated_at
    return clock(at, seconds=True)
