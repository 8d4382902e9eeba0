"""What a site should know before trusting a head's numbers: the warnings ``heads fit`` and ``heads evaluate``
print on the terminal, and why a metric reads ``n/a``.

Small samples are the rule at a single site, and they fail quietly: a held-out set of one class has no
AUROC, one without events no C-index, a dozen held-out studies give intervals as wide as the scale, and a
Cox or logistic fit with fewer than 10 events per feature leans on its penalty rather than on the data.
An export without patient ids makes every split and bootstrap resample nights, not patients. None of this
stops a fit (a site may still want the head); each is said once, in one line, naming no study or patient.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .data import ExportData

__all__ = ["MIN_EVENTS_PER_FEATURE", "MIN_HELD_OUT", "NA", "NO_PATIENTS", "apnea_auroc_reason", "apnea_one_class",
           "checksum_warning", "concordance_reason", "events_per_feature_warning", "export_warnings",
           "fmt_metric", "held_out_warnings", "recorded_table_sha256"]

NA = "n/a"
MIN_EVENTS_PER_FEATURE = 10  # the usual rule of thumb for regression models
MIN_HELD_OUT = 20  # below this, held-out metrics and their intervals say little

NO_PATIENTS = ("the export has no patient ids (no patient_id column; batch --export-identifiers writes it): "
               "splits and bootstrap resample studies, not patients: a patient with several nights can be in "
               "training and held-out")


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_metric(value: Any, reason: str | None = None, digits: int = 3) -> str:
    """``0.712``, or ``n/a (reason)`` for a metric that is None or NaN (undefined on this data)."""
    f = _finite(value)
    if f is not None:
        return f"{f:.{digits}f}"
    return f"{NA} ({reason})" if reason else NA


def export_warnings(data: ExportData) -> list[str]:
    """Warnings about the export itself, shown before a fit or an evaluation starts."""
    return [] if data.has_patients else [NO_PATIENTS]


def recorded_table_sha256(head: Path) -> str | None:
    """The SHA-256 of studies.parquet that the head's manifest.json records (None: no readable record)."""
    try:
        manifest = json.loads((Path(head) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    data = manifest.get("data") if isinstance(manifest, dict) else None
    value = data.get("studies_parquet_sha256") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def checksum_warning(head: Path, data: ExportData, split: str) -> str | None:
    """A warning when the export's table is not the one the head was fitted on (``--split test`` only).

    With ``--split test`` the held-out studies are those the fit set aside, looked up by key in this
    export: a changed table (re-processed studies, other rows) means other embeddings than the fit held
    out, or studies the fit trained on counted as new. With ``--split all`` (an external data set) another
    table is expected.
    """
    if split != "test":
        return None
    recorded = recorded_table_sha256(head)
    if recorded is None:
        return ("the head's manifest.json records no checksum of its export: cannot tell whether this export is "
                "the one the fit held studies out of")
    if recorded == data.table_sha256:
        return None
    return (f"this export's studies.parquet (SHA-256 {data.table_sha256[:12]}) is not the one the head was "
            f"fitted on ({recorded[:12]}): the held-out studies may have other embeddings than at the fit, or "
            "be missing")


def events_per_feature_warning(what: str, events: int, features: int, unit: str = "events") -> str | None:
    """A warning for fewer than :data:`MIN_EVENTS_PER_FEATURE` events per feature (Cox events, or the
    studies of the smaller class of a logistic fit: ``unit`` names them)."""
    if features <= 0:
        return None
    per = events / features
    if per >= MIN_EVENTS_PER_FEATURE:
        return None
    return (f"{what}: {events} {unit} for {features} features ({per:.2g} per feature, below "
            f"{MIN_EVENTS_PER_FEATURE}): the fit leans on its L2 penalty; judge it by the held-out numbers")


def held_out_warnings(what: str, n: int, *, one_class: str | None = None, undefined: str = "",
                      noun: str = "held-out") -> list[str]:
    """Warnings for a held-out (or evaluated) set: fewer than :data:`MIN_HELD_OUT` studies; one class only
    (``one_class`` says which, ``undefined`` what that leaves undefined)."""
    out = []
    if n == 0:
        out.append(f"{what}: no {noun} study: there are no {noun} numbers")
    elif n < MIN_HELD_OUT:
        out.append(f"{what}: only {n} {noun} studies (fewer than {MIN_HELD_OUT}): the {noun} numbers and their "
                   "intervals say little")
    if n and one_class:
        out.append(f"{what}: the {noun} studies are of one class ({one_class})" + (f": {undefined}" if undefined
                                                                                    else ""))
    return out


def apnea_auroc_reason(counts: dict[str, Any] | None) -> str:
    """Why an apnea presence AUROC is undefined, from the class counts (``{"no": n0, "yes": n1}``)."""
    counts = counts or {}
    no, yes = int(counts.get("no") or 0), int(counts.get("yes") or 0)
    if no + yes == 0:
        return "no study"
    if yes == 0:
        return "one class only: every study has AHI < 5"
    if no == 0:
        return "one class only: every study has AHI >= 5"
    return "could not be computed"


def apnea_one_class(counts: dict[str, Any] | None) -> str | None:
    """``"every study has AHI >= 5"`` (or ``< 5``) when only one presence class is there, else None."""
    counts = counts or {}
    no, yes = int(counts.get("no") or 0), int(counts.get("yes") or 0)
    if no + yes and not (no and yes):
        return "every study has AHI >= 5" if yes else "every study has AHI < 5"
    return None


def concordance_reason(studies: int, events: int) -> str:
    """Why a C-index is undefined: no study, no event (nothing to order), or no comparable pair."""
    if studies == 0:
        return "no study"
    if events == 0:
        return "no event among these studies"
    return "no comparable pair"
