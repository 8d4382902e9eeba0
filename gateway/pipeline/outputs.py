"""A study's result files: written here, and read back here (the flag step, the export), so their
format lives in one module. Plain files a researcher opens with numpy, pandas or a spreadsheet.

```
OUT/
  embeddings/BAS.npy        (T, 128) float32  one row per 5-s token
  embeddings/BAS_5min.npy   (N, 128) float32  one row per 5-minute window
  ...                                         (one pair per modality present)
  night.npy                 (512,)   float32  BAS|RESP|EKG|EMG means of the whole windows; NaN: missing
  hypnogram.csv             epoch, onset_s, stage, p_W, p_N1, p_N2, p_N3, p_REM, tail
  metrics.json              sleep metrics, modalities, windows (tail), diagnosis input, demographics
                            encoding, montage, model bundle, timings
  hazards.csv               index, phecode, phenotype, log_hazard, hazard_ratio, head ("" or a site head)
  attribution.csv           index, phecode, phenotype, then per modality present the change in log_hazard
                            it makes (log_hazard - log_hazard with it masked; the bundle's head only,
                            written when two or more modalities were present)
```
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.results import STAGES, TOKEN_SECONDS, TOKENS_PER_EPOCH, TOKENS_PER_WINDOW, StudyResult

from ..fsutil import atomic_write, durable_mkdir

__all__ = [
    "ATTRIBUTION_FILE",
    "HAZARDS_FILE",
    "HYPNOGRAM_FILE",
    "METRICS_FILE",
    "NIGHT_FILE",
    "HazardRow",
    "HypnogramEpoch",
    "hypnogram_rows",
    "metrics_document",
    "read_attribution",
    "read_hazards",
    "read_hypnogram",
    "read_metrics",
    "windows_document",
    "write_study_outputs",
]

HAZARDS_FILE = "hazards.csv"
ATTRIBUTION_FILE = "attribution.csv"
HYPNOGRAM_FILE = "hypnogram.csv"
METRICS_FILE = "metrics.json"
NIGHT_FILE = "night.npy"
HAZARD_COLUMNS = ("index", "phecode", "phenotype", "log_hazard", "hazard_ratio", "head")
HYPNOGRAM_COLUMNS = ("epoch", "onset_s", "stage", *(f"p_{s}" for s in STAGES), "tail")


@dataclass(frozen=True)
class HazardRow:
    """One row of ``hazards.csv`` as read back."""

    index: int
    phecode: str
    phenotype: str
    log_hazard: float
    head: str = ""  # "" for the bundle's diagnosis head, else the site head's name@checksum

    @property
    def hazard_ratio(self) -> float:
        return math.exp(self.log_hazard)


@dataclass(frozen=True)
class HypnogramEpoch:
    """One row of ``hypnogram.csv`` as read back (the stage probabilities left in the file)."""

    epoch: int
    onset_s: float
    stage: str
    tail: bool  # staged as part of the tail past the last whole 5-minute window


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def hypnogram_rows(result: StudyResult) -> list[list[Any]]:
    if result.staging is None:
        return []
    epoch_s = TOKEN_SECONDS * TOKENS_PER_EPOCH
    staging = result.staging
    # tail = 1: the epoch lies past the last whole 5-minute window and was staged as its own segment.
    return [
        [i, i * epoch_s, stage, *(f"{p:.4f}" for p in probs), int(staging.is_tail(i))]
        for i, (stage, probs) in enumerate(zip(staging.hypnogram, staging.epoch_probs))
    ]


def windows_document(result: StudyResult) -> dict[str, Any]:
    """Which tokens came from the release's whole 5-minute windows and which from the tail."""
    tail_start = result.n_tokens - result.tail_tokens
    whole = tail_start // TOKENS_PER_WINDOW
    n_windows = len(next(iter(result.window_embeddings.values()))) if result.window_embeddings else 0
    return {
        "whole_windows": whole,
        "tail_start_token": tail_start,
        "tail_tokens": result.n_tokens - tail_start,
        # the extra window aligned to the end of the night (its last tail_tokens tokens are the tail's)
        "tail_window_index": n_windows - 1 if result.n_tokens > tail_start else None,
    }


def metrics_document(result: StudyResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything about a study's result that is not an array, as JSON-ready data."""
    doc: dict[str, Any] = {
        "study_key": result.key,
        "tokens": result.n_tokens,
        "duration_encoded_s": result.n_tokens * TOKEN_SECONDS,
        "modalities": result.modalities,
        "missing_modalities": result.missing_modalities,
        "sleep": result.staging.metrics.as_dict() if result.staging else None,
        "windows": windows_document(result),
        "diagnosis_input": {
            "tokens_used": result.diagnosis_tokens,
            # the release feeds its diagnosis head the first 6480 tokens (9 h) of the whole windows
            "cut": result.hazards is not None
            and result.diagnosis_tokens < result.n_tokens - result.tail_tokens,
        },
        "demographics_used": result.demographics_used,
        "demographics_encoding": result.demographics_encoding,
        "model_bundle": result.bundle.as_dict(),
        "validated": result.validated,
        "device": result.device,
        "precision": result.precision,
        "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
    }
    if result.hazards is not None and result.hazards.attribution:
        doc["attribution"] = {"file": ATTRIBUTION_FILE, "modalities": list(result.hazards.attribution),
                              "method": "the diagnosis head with one modality masked at a time; the change "
                                        "in log-hazard the modality makes"}
    if result.site_results:
        doc["site_heads"] = result.site_results
    if not result.validated:
        doc["notice"] = "Model bundle not validated by this site: NOT FOR CLINICAL USE."
    doc.update(extra or {})
    return doc


def write_study_outputs(result: StudyResult, out_dir: Path, extra: dict[str, Any] | None = None) -> list[Path]:
    """Write all output files for one study into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    durable_mkdir(out_dir / "embeddings")
    written: list[Path] = []

    def put(rel: str, data: bytes) -> None:
        path = out_dir / rel
        atomic_write(path, data)
        written.append(path)

    for modality in result.modalities:
        put(f"embeddings/{modality}.npy", _npy_bytes(result.token_embeddings[modality]))
        put(f"embeddings/{modality}_5min.npy", _npy_bytes(result.window_embeddings[modality]))
    put(NIGHT_FILE, _npy_bytes(result.night_vector))
    if result.staging is not None:
        put(HYPNOGRAM_FILE, _csv_bytes(list(HYPNOGRAM_COLUMNS), hypnogram_rows(result)))
    if result.hazards is not None:
        hz = result.hazards
        rows = [[o.index, o.phecode, o.name, f"{lh:.6f}", f"{hr:.6f}", o.head]
                for o, lh, hr in zip(hz.outcomes, hz.log_hazard, hz.hazard_ratio)]
        put(HAZARDS_FILE, _csv_bytes(list(HAZARD_COLUMNS), rows))
        if hz.attribution:
            modalities = list(hz.attribution)
            rows = [[o.index, o.phecode, o.name, *(f"{hz.attribution[m][i]:.6f}" for m in modalities)]
                    for i, o in enumerate(hz.outcomes[: len(hz.attribution[modalities[0]])])]
            put(ATTRIBUTION_FILE, _csv_bytes(["index", "phecode", "phenotype", *modalities], rows))
    put(METRICS_FILE, (json.dumps(metrics_document(result, extra), indent=2) + "\n").encode("utf-8"))
    return written


def read_hazards(out_dir: Path) -> list[HazardRow] | None:
    """The hazards a study's outputs hold; None when it has none (no diagnosis head, or not written)."""
    path = Path(out_dir) / HAZARDS_FILE
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return [HazardRow(int(r["index"]), r["phecode"], r["phenotype"], float(r["log_hazard"]), r.get("head") or "")
                for r in csv.DictReader(f)]


def read_metrics(out_dir: Path) -> dict[str, Any] | None:
    """A study's metrics.json (its sleep metrics under ``sleep``, the age/sex encoding ...); None when absent."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_attribution(out_dir: Path) -> dict[str, dict[str, float]] | None:
    """``{phecode: {modality: change in log-hazard}}`` from a study's attribution.csv; None when absent."""
    path = Path(out_dir) / ATTRIBUTION_FILE
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        modalities = [c for c in reader.fieldnames or [] if c not in ("index", "phecode", "phenotype")]
        return {r["phecode"]: {m: float(r[m]) for m in modalities} for r in reader}


def read_hypnogram(out_dir: Path) -> list[HypnogramEpoch] | None:
    """The model's hypnogram from a study's hypnogram.csv, one row per 30-s epoch; None when absent."""
    path = Path(out_dir) / HYPNOGRAM_FILE
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return [HypnogramEpoch(int(r["epoch"]), float(r["onset_s"]), r["stage"], r.get("tail") == "1")
                for r in csv.DictReader(f)]
