"""From a study row and its flag decision to the ORU^R01 text: the glue between the pipeline and
:func:`gateway.hl7.oru.build_oru` (which knows HL7, not our database)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from ..config import Hl7Config
from ..pipeline.flags import FlagDecision
from ..store.models import Study
from .oru import OruAttachment, OruFlag, OruMetric, OruPatient, OruSettings, OruStudy, build_oru

__all__ = ["build_study_message", "new_control_id", "oru_settings", "study_message_parts"]

# Sleep metrics sent as results: LOINC where one exists, a local code otherwise.
_METRICS: tuple[tuple[str, str | None, str, str, str], ...] = (
    # (metrics.json key, LOINC, local code, text, UCUM unit)
    ("tst_min", "93832-4", "PSG-TST", "Total sleep time", "min"),
    ("sleep_efficiency_pct", None, "PSG-SE", "Sleep efficiency", "%"),
    ("sleep_onset_latency_min", None, "PSG-SOL", "Sleep onset latency", "min"),
    ("waso_min", None, "PSG-WASO", "Wake after sleep onset", "min"),
    ("rem_latency_min", None, "PSG-REML", "REM latency", "min"),
)
_STAGE_METRICS: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    # (hypnogram stages summed, LOINC, local code, text)
    (("REM",), "93829-0", "PSG-REM", "REM sleep duration"),
    (("N3",), "93831-6", "PSG-DEEP", "Deep sleep duration"),
    (("N1", "N2"), "93830-8", "PSG-LIGHT", "Light sleep duration"),
)


def new_control_id() -> str:
    """MSH-10: unique per message (20 characters fit every v2 receiver), fixed across its retries."""
    return "PSG" + uuid.uuid4().hex[:17].upper()


def oru_settings(cfg: Hl7Config) -> OruSettings:
    return OruSettings(sending_application=cfg.sending_application, sending_facility=cfg.sending_facility,
                       receiving_application=cfg.receiving_application, receiving_facility=cfg.receiving_facility,
                       mrn_assigning_authority=cfg.mrn_assigning_authority, local_code_system=cfg.local_code_system,
                       phecode_system=cfg.phecode_system, result_status=cfg.result_status,
                       abnormal_flag=cfg.abnormal_flag)


def _split_name(name: str | None) -> tuple[str | None, str | None]:
    """(family, given) from a DICOM PN (``Doe^Jane``), ``Doe, Jane``, or one free-text name."""
    if not name:
        return None, None
    if "^" in name:
        parts = name.split("^")
        return parts[0] or None, (parts[1] if len(parts) > 1 else None) or None
    if "," in name:
        family, given = name.split(",", 1)
        return family.strip() or None, given.strip() or None
    return name.strip() or None, None


def _metrics(sleep: dict[str, Any] | None) -> list[OruMetric]:
    if not sleep:
        return []
    out = []
    for key, loinc, code, text, unit in _METRICS:
        value = sleep.get(key)
        if value is not None:
            out.append(OruMetric(loinc=loinc, local_code=code, text=text, value=round(float(value), 1), units=unit))
    stages = sleep.get("stage_min") or {}
    for names, loinc, code, text in _STAGE_METRICS:
        if all(n in stages for n in names):
            out.append(OruMetric(loinc=loinc, local_code=code, text=text,
                                 value=round(sum(float(stages[n]) for n in names), 1), units="min"))
    return out


def study_message_parts(study: Study, decision: FlagDecision, sleep: dict[str, Any] | None, *,
                        validated: bool, include_metrics: bool = True, site_authority: str | None = None,
                        report_pdf: bytes | None = None
                        ) -> tuple[OruStudy, list[OruFlag], list[OruMetric], list[str]]:
    """The builder's inputs. ``site_authority`` (hl7.mrn_assigning_authority), when set, is the MRN's
    assigning authority on every message: the EHR knows the site's authority, not each modality's issuer.
    ``report_pdf``: the study report's bytes, carried as an ED OBX (the caller passes it only with
    ``hl7.embed_report`` on and the report written)."""
    family, given = _split_name(study.patient_name)
    issuer = site_authority or study.patient_id_issuer
    patient = OruPatient(patient_id=study.patient_id, issuer=issuer, family_name=family,
                         given_name=given, birth_date=study.birth_date, sex=study.sex)
    oru_study = OruStudy(study_key=study.key, study_id=study.id, accession=study.accession,
                         study_uid=study.study_uid, observed_at=study.recording_start, patient=patient,
                         model_name=study.bundle_name or "unknown", model_version=study.bundle_version or "",
                         model_hash=study.bundle_hash, validated=validated,
                         head="SleepFM diagnosis head (CoxPH)",
                         report=None if report_pdf is None else OruAttachment(data=report_pdf))
    # A site head's outcome is the site's own label, not a phecode: no 99PHECODE alternate code.
    flags = [OruFlag(code=f.code, text=f"{f.phenotype} risk (SleepFM)", phecode=None if f.head else f.phecode,
                     hazard_ratio=None if f.hazard_ratio is None else round(f.hazard_ratio, 3),
                     percentile=None if f.percentile is None else round(f.percentile, 1), reason=f.reason,
                     head=f"Site head {f.head} (CoxPH)" if f.head else None)
             for f in decision.flags]
    notes = ([f"Finding: {f.reason}" for f in decision.findings]
             + [f"Second look (not flagged): {b.phenotype}: {b.reason}" for b in decision.borderline]
             + list(decision.notes))
    return oru_study, flags, _metrics(sleep) if include_metrics else [], notes


def build_study_message(study: Study, decision: FlagDecision, sleep: dict[str, Any] | None, cfg: Hl7Config, *,
                        control_id: str, now: datetime, correction: bool, validated: bool,
                        include_metrics: bool = True, report_pdf: bytes | None = None) -> str:
    """The validated ER7 text of the study's ORU^R01; with ``report_pdf``, the report as an ED OBX last."""
    oru_study, flags, metrics, notes = study_message_parts(study, decision, sleep, validated=validated,
                                                           include_metrics=include_metrics,
                                                           site_authority=cfg.mrn_assigning_authority,
                                                           report_pdf=report_pdf)
    return build_oru(oru_study, flags, metrics, oru_settings(cfg), control_id=control_id, now=now,
                     correction=correction, notes=notes)
