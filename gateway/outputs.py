"""Writing a study's results as plain files a researcher opens with numpy, pandas or a spreadsheet.

```
OUT/
  embeddings/BAS.npy        (T, 128) float32  one row per 5-s token
  embeddings/BAS_5min.npy   (N, 128) float32  one row per 5-minute window
  ...                                         (one pair per modality present)
  night.npy                 (512,)   float32  BAS|RESP|EKG|EMG window means; NaN for a missing modality
  hypnogram.csv             epoch, onset_s, stage, p_W, p_N1, p_N2, p_N3, p_REM
  metrics.json              sleep metrics, modalities, montage, model bundle, timings
  hazards.csv               index, phecode, phenotype, log_hazard, hazard_ratio, head ("" or a site head)
```
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from inference.results import STAGES, TOKEN_SECONDS, TOKENS_PER_EPOCH, StudyResult

from .fsutil import atomic_write


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
    return [
        [i, i * epoch_s, stage, *(f"{p:.4f}" for p in probs)]
        for i, (stage, probs) in enumerate(zip(result.staging.hypnogram, result.staging.epoch_probs))
    ]


def metrics_document(result: StudyResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything about a study's result that is not an array, as JSON-ready data."""
    doc: dict[str, Any] = {
        "study_key": result.key,
        "tokens": result.n_tokens,
        "duration_encoded_s": result.n_tokens * TOKEN_SECONDS,
        "modalities": result.modalities,
        "missing_modalities": result.missing_modalities,
        "sleep": result.staging.metrics.as_dict() if result.staging else None,
        "demographics_used": result.demographics_used,
        "model_bundle": result.bundle.as_dict(),
        "validated": result.validated,
        "device": result.device,
        "precision": result.precision,
        "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
    }
    if result.site_results:
        doc["site_heads"] = result.site_results
    if not result.validated:
        doc["notice"] = "Model bundle not validated by this site: NOT FOR CLINICAL USE."
    doc.update(extra or {})
    return doc


def write_study_outputs(result: StudyResult, out_dir: Path, extra: dict[str, Any] | None = None) -> list[Path]:
    """Write all output files for one study into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    (out_dir / "embeddings").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(rel: str, data: bytes) -> None:
        path = out_dir / rel
        atomic_write(path, data)
        written.append(path)

    for modality in result.modalities:
        put(f"embeddings/{modality}.npy", _npy_bytes(result.token_embeddings[modality]))
        put(f"embeddings/{modality}_5min.npy", _npy_bytes(result.window_embeddings[modality]))
    put("night.npy", _npy_bytes(result.night_vector))
    if result.staging is not None:
        put("hypnogram.csv", _csv_bytes(["epoch", "onset_s", "stage", *(f"p_{s}" for s in STAGES)],
                                        hypnogram_rows(result)))
    if result.hazards is not None:
        hz = result.hazards
        rows = [[o.index, o.phecode, o.name, f"{lh:.6f}", f"{hr:.6f}", o.head]
                for o, lh, hr in zip(hz.outcomes, hz.log_hazard, hz.hazard_ratio)]
        put("hazards.csv", _csv_bytes(["index", "phecode", "phenotype", "log_hazard", "hazard_ratio", "head"], rows))
    put("metrics.json", (json.dumps(metrics_document(result, extra), indent=2) + "\n").encode("utf-8"))
    return written
