"""A site's own heads, fitted on its exported embeddings (``psg-gateway heads fit``), applied per night.

A head is plain numbers (no pickles): Cox coefficients per outcome on the night vector (optionally
plus age and sex), or the apnea classifiers' coefficients. The features are built here, once, for
fitting and for applying, so a deployed head sees exactly what it was fitted on. A feature that is
missing (a modality absent from the night, an unknown age or sex) takes the training mean, which is
the centre the models are centred on, so it contributes nothing to the linear predictor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .apnea import SEVERITY, ApneaModel, apnea_features
from .results import MODALITIES
from .survival import CoxModel

__all__ = ["NIGHT_DIM", "SiteHead", "apply_apnea", "apply_cox", "cox_features", "feature_names", "impute",
           "modality_columns", "sex_code"]

EMBED_DIM = 128
NIGHT_DIM = EMBED_DIM * len(MODALITIES)


def sex_code(sex: str | None) -> float:
    """M -> 1, F -> 0, anything else unknown (NaN, imputed later)."""
    s = (sex or "").strip().upper()[:1]
    return 1.0 if s == "M" else 0.0 if s == "F" else float("nan")


def feature_names(demographics: bool) -> tuple[str, ...]:
    names = tuple(f"{m}_{i}" for m in MODALITIES for i in range(EMBED_DIM))
    return names + (("age_years", "sex_male") if demographics else ())


def modality_columns(modality: str) -> slice:
    """The night-vector columns of one modality (for masking it in an ablation)."""
    i = MODALITIES.index(modality)
    return slice(i * EMBED_DIM, (i + 1) * EMBED_DIM)


def cox_features(night: np.ndarray, age: np.ndarray | None = None, sex: np.ndarray | None = None,
                 demographics: bool = False) -> np.ndarray:
    """(n, 512) night vectors (+ age in years and sex as 1/0) as float64; NaN where unknown."""
    x = np.atleast_2d(np.asarray(night, dtype=np.float64))
    if x.shape[1] != NIGHT_DIM:
        raise ValueError(f"night vectors must have {NIGHT_DIM} values, got {x.shape[1]}")
    if not demographics:
        return x
    n = x.shape[0]
    a = np.full(n, np.nan) if age is None else np.asarray(age, dtype=np.float64).reshape(n)
    s = np.full(n, np.nan) if sex is None else np.asarray(
        [v if isinstance(v, float) else sex_code(v) for v in np.asarray(sex, dtype=object).reshape(n)], dtype=np.float64)
    return np.column_stack([x, a, s])


def impute(x: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """NaN replaced column by column with ``fill`` (the training means)."""
    out = np.array(x, dtype=np.float64, copy=True)
    rows, cols = np.nonzero(~np.isfinite(out))
    out[rows, cols] = np.asarray(fill, dtype=np.float64)[cols]
    return out


@dataclass(frozen=True)
class SiteHead:
    """A deployed head: its identity, what it was fitted on, and its models."""

    name: str
    kind: str  # cox | apnea
    checksum: str  # SHA-256 of head.json
    base_model_hash: str | None
    demo_weights: bool
    demographics: bool = False
    cox: Mapping[str, CoxModel] | None = None  # outcome label -> model
    apnea: ApneaModel | None = None
    token_statistics: bool = False

    @property
    def ident(self) -> str:
        """How results and messages name the head: ``name@checksum`` (12 hex digits)."""
        return f"{self.name}@{self.checksum[:12]}"


def apply_cox(head: SiteHead, night: np.ndarray, age: float | None, sex: str | None) -> list[tuple[str, float]]:
    """(outcome label, log-hazard relative to the training mean) for one night."""
    assert head.cox is not None
    x = cox_features(night, None if age is None else np.array([age]), np.array([sex], dtype=object),
                     head.demographics)
    out = []
    for label, model in head.cox.items():
        lp = model.linear_predictor(impute(x, model.center))
        out.append((label, float(lp[0])))
    return out


def apply_apnea(head: SiteHead, night: np.ndarray, tokens: Mapping[str, np.ndarray] | None) -> dict:
    """Presence probability and severity of sleep apnea for one night."""
    assert head.apnea is not None
    x = apnea_features(night, tokens, use_token_stats=head.token_statistics)
    presence, severity = head.apnea.predict(np.atleast_2d(x))
    probs = severity[0]
    return {"head": head.ident, "presence_probability": round(float(presence[0]), 4),
            "severity": SEVERITY[int(np.argmax(probs))],
            "severity_probabilities": {c: round(float(p), 4) for c, p in zip(SEVERITY, probs)}}
