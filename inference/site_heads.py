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
    """M -> 1, F -> 0, anything else unknown (NaN, imputed later).

    Parameters
    ----------
    sex : str or None
        Only the first letter, upper-cased after stripping spaces, is read.

    Returns
    -------
    float
        1.0, 0.0 or NaN.
    """
    s = (sex or "").strip().upper()[:1]
    return 1.0 if s == "M" else 0.0 if s == "F" else float("nan")


def feature_names(demographics: bool) -> tuple[str, ...]:
    """Column names of :func:`cox_features`.

    Parameters
    ----------
    demographics : bool
        Whether ``age_years`` and ``sex_male`` follow the night vector.

    Returns
    -------
    tuple of str
        ``BAS_0 .. EMG_127`` (512 names), then ``age_years``, ``sex_male`` with ``demographics``.
    """
    names = tuple(f"{m}_{i}" for m in MODALITIES for i in range(EMBED_DIM))
    return names + (("age_years", "sex_male") if demographics else ())


def modality_columns(modality: str) -> slice:
    """The night-vector columns of one modality (for masking it in an ablation).

    Parameters
    ----------
    modality : str
        One of ``BAS``, ``RESP``, ``EKG``, ``EMG``.

    Returns
    -------
    slice
        Its 128 columns.

    Raises
    ------
    ValueError
        An unknown modality.
    """
    i = MODALITIES.index(modality)
    return slice(i * EMBED_DIM, (i + 1) * EMBED_DIM)


def cox_features(night: np.ndarray, age: np.ndarray | None = None, sex: np.ndarray | None = None,
                 demographics: bool = False) -> np.ndarray:
    """(n, 512) night vectors (+ age in years and sex as 1/0) as float64; NaN where unknown.

    Parameters
    ----------
    night : numpy.ndarray
        ``(n, 512)`` night vectors, or one ``(512,)``.
    age : numpy.ndarray, optional
        ``(n,)`` ages in years (NaN where unknown); ``None``: all unknown.
    sex : numpy.ndarray, optional
        ``(n,)`` sexes: strings (read by :func:`sex_code`) or float codes; ``None``: all unknown.
    demographics : bool, default False
        Append the age and sex columns; without it ``age`` and ``sex`` are ignored.

    Returns
    -------
    numpy.ndarray
        ``(n, 512)`` or ``(n, 514)`` float64.

    Raises
    ------
    ValueError
        Night vectors without 512 values.
    """
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
    """NaN replaced column by column with ``fill`` (the training means).

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, p)`` features.
    fill : numpy.ndarray
        ``(p,)`` values for the non-finite entries of each column (e.g. ``CoxModel.center``).

    Returns
    -------
    numpy.ndarray
        A float64 copy of ``x`` with every non-finite entry replaced.
    """
    out = np.array(x, dtype=np.float64, copy=True)
    rows, cols = np.nonzero(~np.isfinite(out))
    out[rows, cols] = np.asarray(fill, dtype=np.float64)[cols]
    return out


@dataclass(frozen=True)
class SiteHead:
    """A deployed head: its identity, what it was fitted on, and its models.

    Parameters
    ----------
    name : str
        The head's name.
    kind : {"cox", "apnea"}
        What it predicts.
    checksum : str
        SHA-256 of its ``head.json``.
    base_model_hash : str or None
        The model hash of the bundle whose embeddings it was fitted on (``base_model.hash`` in
        ``head.json``); ``None`` when not recorded.
    demo_weights : bool
        Whether it was fitted on the untrained demo bundle's embeddings.
    demographics : bool
        Whether its Cox features include age and sex.
    cox : mapping of str to CoxModel, optional
        Outcome label to model (a Cox head).
    apnea : ApneaModel, optional
        The classifiers (an apnea head).
    token_statistics : bool
        Whether its apnea features include the RESP and EKG token statistics.
    """

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
    """(outcome label, log-hazard relative to the training mean) for one night.

    Parameters
    ----------
    head : SiteHead
        A head with ``cox`` models.
    night : numpy.ndarray
        The ``(512,)`` night vector.
    age : float or None
        Age in years (used when the head has ``demographics``).
    sex : str or None
        Sex (used when the head has ``demographics``).

    Returns
    -------
    list of tuple
        ``(label, log-hazard)`` per outcome, in the head's order; missing features take the
        training means.
    """
    assert head.cox is not None
    x = cox_features(night, None if age is None else np.array([age]), np.array([sex], dtype=object),
                     head.demographics)
    out = []
    for label, model in head.cox.items():
        lp = model.linear_predictor(impute(x, model.center))
        out.append((label, float(lp[0])))
    return out


def apply_apnea(head: SiteHead, night: np.ndarray, tokens: Mapping[str, np.ndarray] | None) -> dict:
    """Presence probability and severity of sleep apnea for one night.

    Parameters
    ----------
    head : SiteHead
        A head with an ``apnea`` model.
    night : numpy.ndarray
        The ``(512,)`` night vector.
    tokens : mapping of str to numpy.ndarray, or None
        The night's token embeddings by modality (read when the head uses token statistics).

    Returns
    -------
    dict
        ``head`` (its :attr:`SiteHead.ident`), ``presence_probability``, ``severity`` (the most
        probable class) and ``severity_probabilities`` per class, probabilities rounded to 4 digits.
    """
    assert head.apnea is not None
    x = apnea_features(night, tokens, use_token_stats=head.token_statistics)
    presence, severity = head.apnea.predict(np.atleast_2d(x))
    probs = severity[0]
    return {"head": head.ident, "presence_probability": round(float(presence[0]), 4),
            "severity": SEVERITY[int(np.argmax(probs))],
            "severity_probabilities": {c: round(float(p), 4) for c, p in zip(SEVERITY, probs)}}
