"""Sleep apnea heads on SleepFM embeddings: presence (AHI >= 5) and severity (normal/mild/moderate/severe).

The public SleepFM release has no apnea head; a site fits its own on its exported embeddings and its
scored AHI (``psg-gateway heads fit apnea``). Both classifiers are linear logistic models on
standardised features: the 512-d night vector and, optionally, summary statistics of the RESP and EKG
token embeddings (how much and how fast they move through the night). By default they act on one
L2-regularised (ridge) score of log(AHI + 1), which uses the whole continuous AHI rather than its
dichotomies; ``method="logistic"`` fits them directly on the features instead (see :func:`fit_apnea`).

Fitting uses scikit-learn; the fitted :class:`ApneaModel` is plain numpy (centre, scale, coefficients),
so applying it needs neither scikit-learn nor pickles and round-trips through JSON exactly.

Missing values: a feature that is NaN (a modality absent from the night, or its token statistics)
takes the training mean, which is also the standardisation centre, so it contributes nothing to the
linear predictors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .results import MODALITIES
from .splits import group_folds

__all__ = [
    "SEVERITY", "SEVERITY_CUTS", "TOKEN_STAT_MODALITIES", "ApneaModel", "apnea_feature_names", "apnea_features",
    "evaluate_apnea", "fit_apnea", "group_folds", "severity_of", "token_statistics",
]

SEVERITY: tuple[str, ...] = ("normal", "mild", "moderate", "severe")
SEVERITY_CUTS: tuple[float, ...] = (5.0, 15.0, 30.0)  # AHI (events/h) at which mild, moderate, severe begin
PRESENCE_CUT = SEVERITY_CUTS[0]
TOKEN_STAT_MODALITIES: tuple[str, ...] = ("RESP", "EKG")
EMBED_DIM = 128
NIGHT_DIM = EMBED_DIM * len(MODALITIES)

# Solver settings of both classifiers (lbfgs; the severity one is multinomial because it has > 2 classes).
MAX_ITER = 2000
TOL = 1e-6
ABSENT_CLASS_INTERCEPT = -1e4  # a severity class absent from training: probability exp(-1e4) = 0, JSON-safe
STAGE2_C = 1.0  # ahi_score method: the classifiers on the standardised 1-D score (barely regularised)
METHODS = ("ahi_score", "logistic")


# ---- labels -----------------------------------------------------------------------------------------------
def _check_ahi(ahi: Any) -> np.ndarray:
    a = np.asarray(ahi, dtype=np.float64)
    if a.ndim != 1:
        a = a.reshape(-1)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"AHI must be finite: {int(bad.sum())} value(s) are NaN or infinite "
                         f"(first at position {int(np.flatnonzero(bad)[0])})")
    neg = a < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ValueError(f"AHI must be >= 0 events/h: {int(neg.sum())} negative value(s) (first {a[i]:g} "
                         f"at position {i})")
    return a


def severity_of(ahi: np.ndarray) -> np.ndarray:
    """Severity class index per AHI (events/h) in :data:`SEVERITY` order.

    ``< 5`` normal (0), ``5 <= AHI < 15`` mild (1), ``15 <= AHI < 30`` moderate (2), ``>= 30`` severe (3):
    a boundary value belongs to the higher class. Raises ``ValueError`` for a negative or non-finite AHI.

    Parameters
    ----------
    ahi : array_like
        Apnea-hypopnea indices in events per hour.

    Returns
    -------
    numpy.ndarray
        Class indices (int64), one per value (flattened).

    Raises
    ------
    ValueError
        A negative, NaN or infinite AHI.

    Examples
    --------
    >>> severity_of([0.0, 5.0, 14.9, 15.0, 30.0])
    array([0, 1, 1, 2, 3])
    """
    a = _check_ahi(ahi)
    return np.searchsorted(np.asarray(SEVERITY_CUTS), a, side="right").astype(np.int64)


# ---- features ---------------------------------------------------------------------------------------------
def token_statistics(tokens: Mapping[str, np.ndarray] | None,
                     modalities: Sequence[str] = TOKEN_STAT_MODALITIES) -> np.ndarray:
    """Summary statistics of a night's 5-s token embeddings, ``256 * len(modalities)`` values (float64).

    Per modality, in ``modalities`` order: the standard deviation over time of each of the 128 embedding
    dimensions (how much the signal's representation varies over the night), then the mean absolute
    first difference of each dimension between consecutive tokens (how fast it changes from one 5-s
    token to the next: breathing events are short, repeated disturbances). A modality absent from
    ``tokens`` (or ``tokens`` None, or fewer than two tokens) gives a block of 256 NaN, imputed later
    like any missing feature. Token rows that are not finite are left out.

    Parameters
    ----------
    tokens : mapping of str to numpy.ndarray, or None
        Token embeddings ``(T, 128)`` by modality, as in ``StudyResult.token_embeddings``.
    modalities : sequence of str, default ("RESP", "EKG")
        The modalities summarised, in order.

    Returns
    -------
    numpy.ndarray
        ``(256 * len(modalities),)`` float64.

    Raises
    ------
    ValueError
        A modality's array that is not ``(tokens, 128)``.
    """
    out = np.full(2 * EMBED_DIM * len(modalities), np.nan, dtype=np.float64)
    for k, m in enumerate(modalities):
        arr = None if tokens is None else tokens.get(m)
        if arr is None:
            continue
        x = np.asarray(arr, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != EMBED_DIM:
            raise ValueError(f"{m} token embeddings must be (tokens, {EMBED_DIM}), got shape {x.shape}")
        x = x[np.isfinite(x).all(axis=1)]
        if x.shape[0] < 2:
            continue
        base = 2 * EMBED_DIM * k
        out[base : base + EMBED_DIM] = x.std(axis=0)
        out[base + EMBED_DIM : base + 2 * EMBED_DIM] = np.abs(np.diff(x, axis=0)).mean(axis=0)
    return out


def apnea_feature_names(use_token_stats: bool = True,
                        modalities: Sequence[str] = TOKEN_STAT_MODALITIES) -> tuple[str, ...]:
    """Column names of :func:`apnea_features`: ``BAS_0..EMG_127`` then ``RESP_std_0``, ``RESP_absdiff_0``...

    Parameters
    ----------
    use_token_stats : bool, default True
        Include the token-statistic columns.
    modalities : sequence of str, default ("RESP", "EKG")
        The modalities whose token statistics are included.

    Returns
    -------
    tuple of str
        512 night-vector names, then per modality 128 ``_std_`` and 128 ``_absdiff_`` names.
    """
    names = [f"{m}_{i}" for m in MODALITIES for i in range(EMBED_DIM)]
    if use_token_stats:
        for m in modalities:
            names += [f"{m}_std_{i}" for i in range(EMBED_DIM)]
            names += [f"{m}_absdiff_{i}" for i in range(EMBED_DIM)]
    return tuple(names)


def apnea_features(night: np.ndarray, tokens: Mapping[str, np.ndarray] | None,
                   use_token_stats: bool = True) -> np.ndarray:
    """One night's features (float64): the 512-d night vector (NaN for a missing modality), followed,
    with ``use_token_stats``, by :func:`token_statistics` of the RESP and EKG tokens (512 more values).

    Parameters
    ----------
    night : numpy.ndarray
        The 512-d night vector (``StudyResult.night_vector``).
    tokens : mapping of str to numpy.ndarray, or None
        Token embeddings by modality; only RESP and EKG are read.
    use_token_stats : bool, default True
        Append the token statistics.

    Returns
    -------
    numpy.ndarray
        ``(512,)`` or ``(1024,)`` float64, NaN where a modality is missing (a copy).

    Raises
    ------
    ValueError
        A night vector that does not have 512 values, or token arrays of the wrong shape.
    """
    x = np.asarray(night, dtype=np.float64).reshape(-1)
    if x.size != NIGHT_DIM:
        raise ValueError(f"the night vector must have {NIGHT_DIM} values, got {x.size}")
    if not use_token_stats:
        return x.copy()
    return np.concatenate([x, token_statistics(tokens)])


# ---- the deployable model ---------------------------------------------------------------------------------
def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fill_missing(x: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Non-finite entries (NaN: a missing modality) replaced by ``fill`` column by column."""
    out = np.array(x, dtype=np.float64, copy=True)
    rows, cols = np.nonzero(~np.isfinite(out))
    out[rows, cols] = fill[cols]
    return out


@dataclass(frozen=True)
class ApneaModel:
    """Fitted apnea classifiers as plain numpy parameters (``p`` features).

    ``predict`` imputes non-finite features with ``impute`` (the training means), standardises with
    ``(x - center) / scale`` and applies a logistic presence model (P(AHI >= 5)) and a multinomial
    (softmax) severity model over :data:`SEVERITY`. ``l2_presence`` / ``l2_severity`` are the L2
    penalties chosen by cross-validation, ``1 / C``: for ``method="ahi_score"`` the ridge penalty
    ``alpha`` of the AHI score (objective ``||y - Zw||^2 + alpha ||w||^2``), for ``"logistic"``
    scikit-learn's convention (summed log-loss + ``||w||^2 / (2 C)``).

    Parameters
    ----------
    center, scale, impute : numpy.ndarray
        ``(p,)`` standardisation centre and scale, and the values that replace missing features
        (the training means; equal to ``center`` for a fitted model).
    presence_coef : numpy.ndarray
        ``(p,)`` logistic coefficients of P(AHI >= 5) on the standardised features.
    presence_intercept : float
        Its intercept.
    severity_coef : numpy.ndarray
        ``(4, p)`` softmax coefficients, one row per class of :data:`SEVERITY`.
    severity_intercept : numpy.ndarray
        ``(4,)`` intercepts (``-1e4`` for a class absent from training).
    l2_presence, l2_severity : float
        The penalties chosen by cross-validation (``1 / C``).
    feature_names : tuple of str
        Names of the ``p`` features.
    n_train : int
        Training studies.
    method : str
        How it was fitted, ``"ahi_score"`` or ``"logistic"`` (``"unknown"`` when a dict did not say).
    """

    center: np.ndarray  # (p,)
    scale: np.ndarray  # (p,)
    impute: np.ndarray  # (p,)
    presence_coef: np.ndarray  # (p,)
    presence_intercept: float
    severity_coef: np.ndarray  # (4, p)
    severity_intercept: np.ndarray  # (4,)
    l2_presence: float
    l2_severity: float
    feature_names: tuple[str, ...] = ()
    n_train: int = 0
    method: str = "ahi_score"  # how it was fitted (see fit_apnea); prediction is the same for every method

    @property
    def n_features(self) -> int:
        """Number of features ``p`` the model takes."""
        return int(self.center.shape[0])

    def standardize(self, X: np.ndarray) -> np.ndarray:
        """``(n, p)`` features -> imputed, standardised ``(n, p)`` (what the coefficients apply to).

        Parameters
        ----------
        X : numpy.ndarray
            ``(n, p)`` features or one ``(p,)`` row; NaN where missing.

        Returns
        -------
        numpy.ndarray
            ``(n, p)`` float64.

        Raises
        ------
        ValueError
            Rows without ``p`` features.
        """
        x = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features per row, got shape {np.shape(X)}")
        return (_fill_missing(x, self.impute) - self.center) / self.scale

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(P(presence) (n,), severity probabilities (n, 4) in SEVERITY order)`` for ``(n, p)`` rows.

        Parameters
        ----------
        X : numpy.ndarray
            ``(n, p)`` features (e.g. rows of :func:`apnea_features`) or one row; NaN where missing.

        Returns
        -------
        presence : numpy.ndarray
            ``(n,)`` probability that AHI >= 5.
        severity : numpy.ndarray
            ``(n, 4)`` class probabilities in :data:`SEVERITY` order; rows sum to 1.

        Raises
        ------
        ValueError
            Rows without ``p`` features.
        """
        z = self.standardize(X)
        presence = _sigmoid(z @ self.presence_coef + self.presence_intercept)
        severity = _softmax(z @ self.severity_coef.T + self.severity_intercept)
        return presence, severity

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (plain lists and floats; no NaN or infinity).

        Returns
        -------
        dict
            Every field, plus ``classes`` and ``presence_threshold_ahi`` for readers of the file;
            :meth:`from_dict` reads it back.
        """
        return {
            "center": self.center.tolist(), "scale": self.scale.tolist(), "impute": self.impute.tolist(),
            "presence_coef": self.presence_coef.tolist(), "presence_intercept": float(self.presence_intercept),
            "severity_coef": self.severity_coef.tolist(), "severity_intercept": self.severity_intercept.tolist(),
            "l2_presence": float(self.l2_presence), "l2_severity": float(self.l2_severity),
            "feature_names": list(self.feature_names), "n_train": int(self.n_train), "method": self.method,
            "classes": list(SEVERITY), "presence_threshold_ahi": PRESENCE_CUT,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ApneaModel:
        """The model back from :meth:`to_dict`.

        Parameters
        ----------
        d : mapping
            As :meth:`to_dict` writes it; ``feature_names``, ``n_train`` and ``method`` may be absent.

        Returns
        -------
        ApneaModel
            The model.

        Raises
        ------
        ValueError
            A missing or malformed field, or arrays of inconsistent shapes.
        """
        try:
            center = np.asarray(d["center"], dtype=np.float64)
            model = cls(
                center=center, scale=np.asarray(d["scale"], dtype=np.float64),
                impute=np.asarray(d["impute"], dtype=np.float64),
                presence_coef=np.asarray(d["presence_coef"], dtype=np.float64),
                presence_intercept=float(d["presence_intercept"]),
                severity_coef=np.asarray(d["severity_coef"], dtype=np.float64).reshape(len(SEVERITY), -1),
                severity_intercept=np.asarray(d["severity_intercept"], dtype=np.float64),
                l2_presence=float(d["l2_presence"]), l2_severity=float(d["l2_severity"]),
                feature_names=tuple(d.get("feature_names", ())), n_train=int(d.get("n_train", 0)),
                method=str(d.get("method", "unknown")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an apnea model: {exc}") from exc
        p = center.shape[0]
        shapes = {"scale": model.scale.shape, "impute": model.impute.shape,
                  "presence_coef": model.presence_coef.shape, "severity_coef": model.severity_coef.shape,
                  "severity_intercept": model.severity_intercept.shape}
        expected = {"scale": (p,), "impute": (p,), "presence_coef": (p,), "severity_coef": (len(SEVERITY), p),
                    "severity_intercept": (len(SEVERITY),)}
        wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in shapes if shapes[k] != expected[k]]
        if wrong or center.ndim != 1:
            raise ValueError("not an apnea model: inconsistent shapes: " + ", ".join(wrong or ["center"]))
        return model


# ---- fitting ----------------------------------------------------------------------------------------------
def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training means, standard deviations) per column; an all-missing column has mean 0, a constant
    column scale 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mean = np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    filled = _fill_missing(x, mean)
    sd = filled.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return mean, sd


def _classifier(C: float, balanced: bool):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=float(C), solver="lbfgs", max_iter=MAX_ITER, tol=TOL,
                              class_weight="balanced" if balanced else None)


def _fit_quiet(clf, z: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(z, y)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (scikit-learn's definition)."""
    present = np.unique(y)
    return float(np.mean([np.mean(pred[y == c] == c) for c in present]))


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half); NaN with a single class."""
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _json_num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _choose(grid: Sequence[float], scores: np.ndarray) -> tuple[int, list[dict[str, Any]], bool]:
    """Best grid index by mean fold score (ties: the smaller C, i.e. the stronger penalty)."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all folds undefined for one C
        means = np.nanmean(scores, axis=1)
        sds = np.nanstd(scores, axis=1, ddof=1) if scores.shape[1] > 1 else np.full(len(grid), np.nan)
    for C, m, s, row in zip(grid, means, sds, scores):
        rows.append({"C": float(C), "l2": 1.0 / float(C), "mean": _json_num(m), "sd": _json_num(s),
                     "folds_scored": int(np.isfinite(row).sum())})
    if not np.isfinite(means).any():
        return int(np.argmin(np.abs(np.log(np.asarray(grid, dtype=float))))), rows, False
    best = int(np.nanargmax(np.where(np.isfinite(means), means, -np.inf)))
    ties = [i for i in range(len(grid)) if np.isfinite(means[i]) and means[i] >= means[best] - 1e-12]
    best = min(ties, key=lambda i: grid[i])
    return best, rows, True


def _fill_standardize(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return (_fill_missing(x, mean) - mean) / sd


def _ridge(alpha: float):
    from sklearn.linear_model import Ridge

    return Ridge(alpha=float(alpha), solver="cholesky")


def _stage2(score: np.ndarray, y: np.ndarray, balanced: bool):
    """The classifier on the (standardised) AHI score: a 1-D logistic regression."""
    return _fit_quiet(_classifier(STAGE2_C, balanced), score.reshape(-1, 1), y)


def _oof_scores(z_folds, y_log: np.ndarray, n: int, alpha: float, fold_rows) -> np.ndarray:
    """Out-of-fold ridge predictions of log(AHI + 1) (each row predicted by the model without its fold)."""
    oof = np.empty(n)
    for (zt, zv), val in zip(z_folds, fold_rows):
        train = np.setdiff1d(np.arange(n), val)
        oof[val] = _ridge(alpha).fit(zt, y_log[train]).predict(zv)
    return oof


def _standardized(score: np.ndarray) -> tuple[float, float]:
    m, s = float(np.mean(score)), float(np.std(score))
    return m, (s if s > 1e-12 else 1.0)


def _severity_matrix(clf, p: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A fitted scikit-learn classifier over the present severity classes as (4, p) softmax coefficients
    and (4,) intercepts; an absent class gets zero coefficients and a -1e4 intercept."""
    coef = np.zeros((len(SEVERITY), p))
    icpt = np.full(len(SEVERITY), ABSENT_CLASS_INTERCEPT)
    classes = [int(c) for c in clf.classes_]
    if len(classes) == 2:
        # scikit-learn stores a binary problem as one logit for the second class; as a softmax over
        # two classes that is logits (-z/2, z/2).
        half_c, half_b = clf.coef_[0] / 2.0, float(clf.intercept_[0]) / 2.0
        coef[classes[0]], icpt[classes[0]] = -half_c, -half_b
        coef[classes[1]], icpt[classes[1]] = half_c, half_b
    else:
        for row, c in enumerate(classes):
            coef[c], icpt[c] = clf.coef_[row], float(clf.intercept_[row])
    return coef, icpt, classes


def fit_apnea(X: np.ndarray, ahi: np.ndarray, groups: Sequence[Any], *, seed: int = 0,
              grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0), folds: int = 5,
              method: str = "ahi_score",
              feature_names: Sequence[str] | None = None) -> tuple[ApneaModel, dict[str, Any]]:
    """Fit the presence and severity classifiers on ``(n, p)`` features, AHI and patient groups.

    Non-finite features are imputed with the training means, then every column is standardised. For each
    classifier the inverse regularisation ``C`` (L2 penalty ``1 / C``) is chosen from ``grid`` by grouped
    K-fold cross-validation (:func:`group_folds`: a patient's nights are never split across folds;
    imputation and standardisation are refitted inside each fold), by the mean fold AUROC for presence
    (AHI >= 5) and the mean fold balanced accuracy for severity; ties go to the smaller ``C``.

    ``method``:

    * ``"ahi_score"`` (default): a ridge regression (penalty ``1 / C``) of ``log(AHI + 1)`` on the
      standardised features gives one score per night, and the classifiers are logistic regressions
      on that score (standardised; presence binary, severity multinomial with
      ``class_weight='balanced'``; ``C = 1``) fitted on *out-of-fold* scores, so their slopes are those
      of unseen nights. The AHI is continuous: regressing on it, not on its dichotomies, uses all of it,
      which matters when studies are few for 512+ features. The composition is still one linear
      logistic (presence) and one linear softmax (severity) model on the features; it is what
      :class:`ApneaModel` stores.
    * ``"logistic"``: scikit-learn ``LogisticRegression`` (lbfgs, L2; severity multinomial with
      ``class_weight='balanced'``) directly on the standardised features, refitted on all rows with
      the chosen ``C`` and copied into :class:`ApneaModel`.

    A severity class absent from the training rows gets zero coefficients and intercept ``-1e4``
    (probability 0). Returns ``(model, cv report)``; the report (JSON-safe) holds one row per ``C``
    with the mean and SD of the fold scores of each classifier, the chosen values and, for
    ``ahi_score``, the score classifiers' parameters.

    Parameters
    ----------
    X : numpy.ndarray
        ``(n, p)`` features (rows of :func:`apnea_features`); NaN marks a missing feature.
    ahi : numpy.ndarray
        ``(n,)`` scored AHI in events per hour, finite and >= 0.
    groups : sequence
        ``(n,)`` patient ids: a patient's nights are never split across folds.
    seed : int, default 0
        Seed of the fold assignment.
    grid : sequence of float, default (1e-3, 1e-2, 1e-1, 1.0, 10.0)
        Candidate values of ``C``, positive and finite.
    folds : int, default 5
        Cross-validation folds, at least 2.
    method : {"ahi_score", "logistic"}, default "ahi_score"
        How the classifiers are fitted (above).
    feature_names : sequence of str, optional
        One name per column; by default :func:`apnea_feature_names` when ``p`` is 512 or 1024,
        else ``x0, x1, ...``.

    Returns
    -------
    model : ApneaModel
        The fitted classifiers.
    report : dict
        The cross-validation report (JSON-safe).

    Raises
    ------
    ValueError
        An unknown ``method``, malformed or infinite features, lengths that differ, no study, an
        invalid AHI, ``grid`` or ``folds``, feature names of the wrong length, or training data
        with a single presence class or a single severity class.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    x = np.asarray(X, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"X must be (studies, features), got shape {x.shape}")
    n, p = x.shape
    g = np.asarray(groups, dtype=object).reshape(-1)
    a = np.asarray(ahi, dtype=np.float64).reshape(-1)
    if not (len(a) == n == len(g)):
        raise ValueError(f"lengths differ: X has {n} rows, ahi {len(a)} values, groups {len(g)} values")
    if n == 0:
        raise ValueError("no training studies")
    a = _check_ahi(a)
    if np.isinf(x).any():
        raise ValueError("X holds infinite values (NaN marks a missing feature; infinity is an error)")
    grid = tuple(float(c) for c in grid)
    if not grid or any(not (math.isfinite(c) and c > 0) for c in grid):
        raise ValueError(f"grid must hold positive, finite values of C; got {grid}")
    if int(folds) < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    names = tuple(feature_names) if feature_names is not None else (
        apnea_feature_names(True) if p == 2 * NIGHT_DIM else apnea_feature_names(False) if p == NIGHT_DIM
        else tuple(f"x{i}" for i in range(p)))
    if len(names) != p:
        raise ValueError(f"{len(names)} feature names for {p} features")
    presence = (a >= PRESENCE_CUT).astype(np.int64)
    severity = severity_of(a)
    y_log = np.log1p(a)
    n_pos = int(presence.sum())
    if n_pos in (0, n):
        only = "AHI >= 5 (apnea)" if n_pos == n else "AHI < 5 (no apnea)"
        raise ValueError(f"presence classifier: every training study has {only}; both classes are needed")
    present_classes = np.unique(severity)
    if len(present_classes) < 2:
        raise ValueError(f"severity classifier: every training study is '{SEVERITY[int(present_classes[0])]}'; "
                         "at least two severity classes are needed")

    fold_rows = group_folds(g, folds, seed)
    z_folds = []
    for val in fold_rows:
        train = np.setdiff1d(np.arange(n), val)
        mean, sd = _standardizer(x[train])
        z_folds.append((_fill_standardize(x[train], mean, sd), _fill_standardize(x[val], mean, sd)))
    pres_scores = np.full((len(grid), len(fold_rows)), np.nan)
    sev_scores = np.full((len(grid), len(fold_rows)), np.nan)
    oof_by_c: list[np.ndarray] = []
    for i, C in enumerate(grid):
        if method == "ahi_score":
            oof = _oof_scores(z_folds, y_log, n, 1.0 / C, fold_rows)
            oof_by_c.append(oof)
            m, s = _standardized(oof)
            for f, val in enumerate(fold_rows):
                # The score classifiers are cross-fitted too: fitted on the other folds' out-of-fold scores.
                train = np.setdiff1d(np.arange(n), val)
                sv = (oof[val] - m) / s
                if len(np.unique(presence[train])) == 2:
                    clf = _stage2((oof[train] - m) / s, presence[train], balanced=False)
                    pres_scores[i, f] = _auroc(presence[val], clf.decision_function(sv.reshape(-1, 1)))
                if len(np.unique(severity[train])) >= 2:
                    clf = _stage2((oof[train] - m) / s, severity[train], balanced=True)
                    sev_scores[i, f] = _balanced_accuracy(severity[val], clf.predict(sv.reshape(-1, 1)))
            continue
        for f, ((zt, zv), val) in enumerate(zip(z_folds, fold_rows)):
            train = np.setdiff1d(np.arange(n), val)
            if len(np.unique(presence[train])) == 2:
                clf = _fit_quiet(_classifier(C, balanced=False), zt, presence[train])
                pres_scores[i, f] = _auroc(presence[val], clf.decision_function(zv))
            if len(np.unique(severity[train])) >= 2:
                clf = _fit_quiet(_classifier(C, balanced=True), zt, severity[train])
                sev_scores[i, f] = _balanced_accuracy(severity[val], clf.predict(zv))
    best_p, rows_p, cv_p = _choose(grid, pres_scores)
    best_s, rows_s, cv_s = _choose(grid, sev_scores)

    mean, sd = _standardizer(x)
    z = _fill_standardize(x, mean, sd)
    presence_report: dict[str, Any] = {}
    severity_report: dict[str, Any] = {}
    if method == "logistic":
        pres = _fit_quiet(_classifier(grid[best_p], balanced=False), z, presence)
        sev = _fit_quiet(_classifier(grid[best_s], balanced=True), z, severity)
        pres_coef, pres_icpt = np.asarray(pres.coef_[0], dtype=np.float64).copy(), float(pres.intercept_[0])
        sev_coef, sev_icpt, classes = _severity_matrix(sev, p)
        presence_report["converged"] = bool(int(np.max(pres.n_iter_)) < MAX_ITER)
        severity_report["converged"] = bool(int(np.max(sev.n_iter_)) < MAX_ITER)
    else:
        # presence: logit = a * (score - m) / s + b, score = z @ beta + beta0
        ridge = _ridge(1.0 / grid[best_p]).fit(z, y_log)
        m, s = _standardized(oof_by_c[best_p])
        pres = _stage2((oof_by_c[best_p] - m) / s, presence, balanced=False)
        slope, b = float(pres.coef_[0, 0]), float(pres.intercept_[0])
        pres_coef = (slope / s) * ridge.coef_
        pres_icpt = slope * (float(ridge.intercept_) - m) / s + b
        presence_report["score_model"] = {"ridge_alpha": 1.0 / grid[best_p], "score_mean": m, "score_sd": s,
                                          "coef": slope, "intercept": b}
        ridge_s = _ridge(1.0 / grid[best_s]).fit(z, y_log)
        m_s, s_s = _standardized(oof_by_c[best_s])
        sev = _stage2((oof_by_c[best_s] - m_s) / s_s, severity, balanced=True)
        slopes, icpts, classes = _severity_matrix(sev, 1)
        sev_coef = np.outer(slopes[:, 0] / s_s, ridge_s.coef_)
        sev_icpt = slopes[:, 0] * (float(ridge_s.intercept_) - m_s) / s_s + icpts
        severity_report["score_model"] = {"ridge_alpha": 1.0 / grid[best_s], "score_mean": m_s,
                                          "score_sd": s_s, "coef": slopes[:, 0].tolist(),
                                          "intercept": icpts.tolist()}
    model = ApneaModel(
        center=mean, scale=sd, impute=mean.copy(),
        presence_coef=np.asarray(pres_coef, dtype=np.float64), presence_intercept=float(pres_icpt),
        severity_coef=np.asarray(sev_coef, dtype=np.float64), severity_intercept=np.asarray(sev_icpt, dtype=float),
        l2_presence=1.0 / grid[best_p], l2_severity=1.0 / grid[best_s],
        feature_names=names, n_train=n, method=method,
    )
    undetermined = "default (no fold could be scored)"
    report = {
        "method": method, "folds": len(fold_rows), "seed": int(seed), "n": n,
        "n_groups": len(np.unique(g.astype(str))),
        "presence": {"criterion": "auroc", "grid": rows_p, "chosen_C": grid[best_p],
                     "chosen_by": "cv" if cv_p else undetermined, **presence_report},
        "severity": {"criterion": "balanced_accuracy", "grid": rows_s, "chosen_C": grid[best_s],
                     "chosen_by": "cv" if cv_s else undetermined,
                     "classes_absent": [SEVERITY[c] for c in range(len(SEVERITY)) if c not in classes],
                     **severity_report},
        "class_counts": {"presence": {"no": n - n_pos, "yes": n_pos},
                         "severity": {SEVERITY[c]: int((severity == c).sum()) for c in range(len(SEVERITY))}},
    }
    return model, report


# ---- evaluation -------------------------------------------------------------------------------------------
def evaluate_apnea(model: ApneaModel, X: np.ndarray, ahi: np.ndarray) -> dict[str, Any]:
    """Scores of ``model`` on ``(n, p)`` features with their true AHI (JSON-safe).

    ``presence``: accuracy and balanced accuracy at P >= 0.5, AUROC (None with a single class), class
    counts. ``severity``: accuracy, balanced accuracy (mean recall over the classes present), the 4x4
    confusion matrix (rows: true class, columns: predicted, both in SEVERITY order), counts per class.

    Parameters
    ----------
    model : ApneaModel
        The fitted classifiers.
    X : numpy.ndarray
        ``(n, p)`` features.
    ahi : numpy.ndarray
        ``(n,)`` true AHI in events per hour.

    Returns
    -------
    dict
        ``n``, ``presence`` and ``severity`` as above.

    Raises
    ------
    ValueError
        Lengths that differ, no study, an invalid AHI, or rows without ``p`` features.
    """
    x = np.atleast_2d(np.asarray(X, dtype=np.float64))
    a = np.asarray(ahi, dtype=np.float64).reshape(-1)
    if x.shape[0] != len(a):
        raise ValueError(f"lengths differ: X has {x.shape[0]} rows, ahi {len(a)} values")
    if len(a) == 0:
        raise ValueError("no studies to evaluate")
    truth_sev = severity_of(a)
    truth_pres = (a >= PRESENCE_CUT).astype(np.int64)
    presence, severity = model.predict(x)
    pred_pres = (presence >= 0.5).astype(np.int64)
    pred_sev = severity.argmax(axis=1)
    confusion = np.zeros((len(SEVERITY), len(SEVERITY)), dtype=np.int64)
    np.add.at(confusion, (truth_sev, pred_sev), 1)
    return {
        "n": len(a),
        "presence": {"accuracy": float(np.mean(pred_pres == truth_pres)),
                     "balanced_accuracy": _balanced_accuracy(truth_pres, pred_pres),
                     "auroc": _json_num(_auroc(truth_pres, presence)),
                     "counts": {"no": int((truth_pres == 0).sum()), "yes": int(truth_pres.sum())}},
        "severity": {"accuracy": float(np.mean(pred_sev == truth_sev)),
                     "balanced_accuracy": _balanced_accuracy(truth_sev, pred_sev),
                     "classes": list(SEVERITY), "confusion_matrix": confusion.tolist(),
                     "counts": {c: int((truth_sev == i).sum()) for i, c in enumerate(SEVERITY)}},
    }
