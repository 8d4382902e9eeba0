"""Discrimination and calibration of survival risk scores: arrays in, numbers out.

``harrell_c`` follows ``lifelines.utils.concordance_index`` (given ``-risk``), ``uno_c`` follows
``sksurv.metrics.concordance_index_ipcw`` and ``td_auc`` follows ``sksurv.metrics.cumulative_dynamic_auc``;
the tests check each against its library. Everything here is vectorised: the C-indices count pairs in
O(n sqrt(n)) without a Python loop over subjects, so that a bootstrap of a 20,000-study evaluation
stays in seconds.

Conventions: ``time`` >= 0, ``event`` 1 for an observed event and 0 for censoring, ``risk`` higher for an
earlier expected event (e.g. the Cox linear predictor).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import norm

__all__ = ["bootstrap_ci", "calibration_by_decile", "harrell_c", "km_risk_at", "td_auc", "uno_c"]

# Pairwise-count tables are kept to about this many cells (int64: ~32 MB).
_TABLE_CELLS = 4_000_000
# Queries are answered in chunks so that the per-chunk (queries x block) matrix stays this small.
_CHUNK_CELLS = 2_000_000


# ---- validation --------------------------------------------------------------------------------------------
def _vector(name: str, x: ArrayLike, n: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        a = a.reshape(-1) if a.ndim == 2 and 1 in a.shape else a
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {np.shape(x)}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} values, expected {n} (one per study)")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values (NaN or infinite)")
    return a


def _survival(time: ArrayLike, event: ArrayLike, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    t = _vector(f"{name}time", time)
    e = _vector(f"{name}event", event, t.shape[0])
    if t.shape[0] == 0:
        raise ValueError(f"{name}time is empty")
    if np.any(t < 0):
        raise ValueError(f"{name}time has negative values")
    if not np.all((e == 0) | (e == 1)):
        raise ValueError(f"{name}event must be 0 (censored) or 1 (event)")
    return t, e.astype(bool)


# ---- pair counting -----------------------------------------------------------------------------------------
def _suffix_counts_below(rank: np.ndarray, n_ranks: int, start: np.ndarray, below: np.ndarray) -> np.ndarray:
    """For each query q: #{j >= start[q] : rank[j] < below[q]} (positions in a fixed order).

    Square-root decomposition: a table of per-block suffix counts by rank answers the whole blocks, a
    small (queries x block) comparison the partial block; no Python loop over subjects.
    """
    n = rank.shape[0]
    n_blocks = int(max(1, min(np.ceil(np.sqrt(n)), _TABLE_CELLS // (n_ranks + 1))))
    size = int(np.ceil(n / n_blocks))
    block = np.arange(n) // size
    # table[b, k] = #{j in blocks >= b : rank[j] < k}; row n_blocks is all zeros (an empty suffix)
    table = np.bincount(block * (n_ranks + 1) + rank + 1, minlength=(n_blocks + 1) * (n_ranks + 1))
    table = table.reshape(n_blocks + 1, n_ranks + 1)
    table = np.cumsum(table[::-1], axis=0)[::-1]
    table = np.cumsum(table, axis=1)
    first_full = -(-start // size)  # first block lying wholly inside the suffix
    out = table[np.minimum(first_full, n_blocks), below].astype(np.int64)
    partial_end = np.minimum(first_full * size, n)
    offsets = np.arange(size)
    chunk = max(1, _CHUNK_CELLS // size)
    for lo in range(0, start.shape[0], chunk):
        s, e, b = start[lo:lo + chunk, None], partial_end[lo:lo + chunk, None], below[lo:lo + chunk, None]
        pos = s + offsets
        inside = pos < e
        r = rank[np.minimum(pos, n - 1)]
        out[lo:lo + chunk] += np.count_nonzero(inside & (r < b), axis=1)
    return out


def _concordance_counts(t: np.ndarray, e: np.ndarray, risk: np.ndarray, tied_tol: float
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row of each event, comparable pairs, concordant pairs, tied pairs) per event.

    Event i is comparable with every j whose time is later, and with every censored j at the same time
    (censoring at t is taken to follow an event at t); two events at the same time are not comparable.
    That is lifelines' and scikit-survival's rule. Concordant: risk_i > risk_j beyond ``tied_tol``; tied:
    |risk_i - risk_j| <= tied_tol.
    """
    n = t.shape[0]
    # Time ascending, events before censored at the same time: each event's comparable set is then
    # exactly the suffix that starts after the events at its time.
    order = np.lexsort((~e, t))
    ts, es, rs = t[order], e[order], risk[order]
    ev = np.flatnonzero(es)
    t_ev = ts[ev]
    start = np.searchsorted(ts, t_ev, side="left") + (
        np.searchsorted(t_ev, t_ev, side="right") - np.searchsorted(t_ev, t_ev, side="left"))
    values, rank = np.unique(rs, return_inverse=True)
    rank = rank.reshape(-1)
    r_ev = rs[ev]
    below_lo = np.searchsorted(values, r_ev - tied_tol, side="left")  # risk_j < risk_i - tol
    below_hi = np.searchsorted(values, r_ev + tied_tol, side="right")  # risk_j <= risk_i + tol
    counts = _suffix_counts_below(rank, values.shape[0], np.concatenate([start, start]),
                                  np.concatenate([below_lo, below_hi]))
    concordant, up_to_tied = counts[:ev.shape[0]], counts[ev.shape[0]:]
    return order[ev], (n - start).astype(np.int64), concordant, up_to_tied - concordant


def harrell_c(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> float:
    """Harrell's C: the share of comparable pairs ordered by risk, risk ties counting 1/2 (NaN without pairs).

    Equal to ``lifelines.utils.concordance_index(time, -risk, event)`` (exact risk ties, lifelines' rule
    for tied times).

    A pair is comparable when the study with the earlier time had an event; a censored study at the
    same time as an event counts as later; two events at the same time are not comparable.

    Parameters
    ----------
    time : array_like
        ``(n,)`` follow-up times, finite and >= 0.
    event : array_like
        ``(n,)`` 1 for an observed event, 0 for censoring.
    risk : array_like
        ``(n,)`` risk scores, higher for an earlier expected event (e.g. the Cox linear predictor).

    Returns
    -------
    float
        The C-index in [0, 1]; NaN when there is no comparable pair.

    Raises
    ------
    ValueError
        Arrays of different lengths or not one-dimensional, non-finite values, negative times, or
        events other than 0/1.

    References
    ----------
    .. [1] Harrell, F. E., Califf, R. M., Pryor, D. B., Lee, K. L., & Rosati, R. A. (1982).
       Evaluating the yield of medical tests. *JAMA*, 247(18), 2543-2546.
    .. [2] ``lifelines.utils.concordance_index``, against which the tests check it.

    Examples
    --------
    >>> harrell_c([1, 2, 3], [1, 1, 0], [3.0, 2.0, 1.0])
    1.0
    >>> harrell_c([1, 2, 3], [1, 1, 0], [0.0, 0.0, 0.0])
    0.5
    """
    t, e = _survival(time, event)
    r = _vector("risk", risk, t.shape[0])
    _, pairs, concordant, tied = _concordance_counts(t, e, r, 0.0)
    total = int(pairs.sum())
    if total == 0:
        return float("nan")
    return float((concordant.sum() + 0.5 * tied.sum()) / total)


# ---- censoring distribution (IPCW) -------------------------------------------------------------------------
def _censoring_km(train_t: np.ndarray, train_e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier of the censoring distribution G at the distinct training times (right-continuous).

    At a tied time events come first (scikit-survival's convention): a study censored at t was still at
    risk of being censored after the events at t.
    """
    times, inverse, total = np.unique(train_t, return_inverse=True, return_counts=True)
    events = np.bincount(inverse.reshape(-1), weights=train_e.astype(np.float64), minlength=times.shape[0])
    censored = total - events
    at_risk = train_t.shape[0] - np.concatenate([[0], np.cumsum(total)[:-1]]) - events
    factor = 1.0 - np.divide(censored, at_risk, out=np.zeros_like(censored), where=censored > 0)
    return times, np.cumprod(factor)


def _ipcw(t: np.ndarray, e: np.ndarray, train_t: np.ndarray, train_e: np.ndarray) -> np.ndarray:
    """1 / G(t_i) for events, 0 for censored studies (scikit-survival's ``predict_ipcw``)."""
    if not train_e.any():
        raise ValueError("all training studies are censored: the censoring distribution cannot be estimated")
    times, g = _censoring_km(train_t, train_e)
    if train_e.all():
        g = np.ones_like(g)  # no censoring at all: G is 1 (sksurv special-cases this the same way)
    te = t[e]
    if g[-1] > 0 and np.any(te > times[-1]):
        raise ValueError(f"time must be smaller than largest observed time point: {times[-1]} "
                         "(test events after the training follow-up; use tau)")
    idx = np.searchsorted(times, te, side="right") - 1
    g_at = np.where(idx >= 0, g[np.maximum(idx, 0)], 1.0)
    g_at = np.where(te > times[-1], 0.0, g_at)
    if np.any(g_at == 0.0):
        raise ValueError("censoring survival function is zero at one or more time points")
    out = np.zeros(t.shape[0])
    out[e] = 1.0 / g_at
    return out


def uno_c(time: ArrayLike, event: ArrayLike, risk: ArrayLike, train_time: ArrayLike, train_event: ArrayLike,
          tau: float | None = None, *, tied_tol: float = 1e-8) -> float:
    """Uno's IPCW C-index, censoring distribution by Kaplan-Meier on the training data (NaN without pairs).

    As ``sksurv.metrics.concordance_index_ipcw(train, test, risk, tau, tied_tol)``: each comparable pair
    with the earlier event i is weighted 1 / G(t_i)^2, events at or after ``tau`` get weight 0, and risks
    within ``tied_tol`` count as ties.

    Parameters
    ----------
    time : array_like
        ``(n,)`` follow-up times, finite and >= 0.
    event : array_like
        ``(n,)`` 1 for an observed event, 0 for censoring.
    risk : array_like
        ``(n,)`` risk scores, higher for an earlier expected event.
    train_time, train_event : array_like
        The training data's times and events, from which the censoring distribution G is estimated.
    tau : float, optional
        Truncation time: only events before ``tau`` are weighted. Needed when test events lie past
        the training follow-up.
    tied_tol : float, default 1e-8
        Risks closer than this count as tied (one half).

    Returns
    -------
    float
        The C-index in [0, 1]; NaN when no event is weighted or there is no comparable pair.

    Raises
    ------
    ValueError
        Malformed inputs (as :func:`harrell_c`), a non-finite ``tau``, training data without an event,
        test events after the training follow-up, or G zero at a test event time.

    References
    ----------
    .. [1] Uno, H., Cai, T., Pencina, M. J., D'Agostino, R. B., & Wei, L. J. (2011). On the
       C-statistics for evaluating overall adequacy of risk prediction procedures with censored
       survival data. *Statistics in Medicine*, 30(10), 1105-1117.
    .. [2] Kaplan, E. L., & Meier, P. (1958). Nonparametric estimation from incomplete
       observations. *Journal of the American Statistical Association*, 53(282), 457-481.
    .. [3] ``sksurv.metrics.concordance_index_ipcw``, against which the tests check it.
    """
    t, e = _survival(time, event)
    r = _vector("risk", risk, t.shape[0])
    tt, te = _survival(train_time, train_event, "train_")
    if tau is not None and not np.isfinite(tau):
        raise ValueError("tau must be finite")
    weighted = e if tau is None else e & (t < tau)
    if not weighted.any():
        return float("nan")
    w = _ipcw(t, weighted, tt, te) ** 2
    rows, pairs, concordant, tied = _concordance_counts(t, e, r, float(tied_tol))
    wi = w[rows]
    den = float(np.sum(wi * pairs))
    if den == 0.0:
        return float("nan")
    return float(np.sum(wi * (concordant + 0.5 * tied)) / den)


def td_auc(time: ArrayLike, event: ArrayLike, risk: ArrayLike, horizons: ArrayLike, train_time: ArrayLike,
           train_event: ArrayLike, *, tied_tol: float = 1e-8) -> np.ndarray:
    """Cumulative/dynamic AUC(t) with IPCW, one value per horizon (in the order given).

    As ``sksurv.metrics.cumulative_dynamic_auc``: cases are events by t weighted 1/G(t_i), controls are
    studies still event-free after t; each horizon must lie in [min(time), max(time)). NaN for a horizon
    without a case or a control.

    Parameters
    ----------
    time : array_like
        ``(n,)`` follow-up times, finite and >= 0.
    event : array_like
        ``(n,)`` 1 for an observed event, 0 for censoring.
    risk : array_like
        ``(n,)`` risk scores, higher for an earlier expected event.
    horizons : array_like
        Times t at which AUC(t) is computed (a scalar or a 1-D array).
    train_time, train_event : array_like
        The training data's times and events, for the censoring distribution G (Kaplan-Meier).
    tied_tol : float, default 1e-8
        Risks closer than this form one threshold.

    Returns
    -------
    numpy.ndarray
        One AUC per horizon, in the order given.

    Raises
    ------
    ValueError
        Malformed inputs, a horizon outside ``[min(time), max(time))``, training data without an
        event, test events after the training follow-up, or G zero at a test event time.

    References
    ----------
    .. [1] Uno, H., Cai, T., Tian, L., & Wei, L. J. (2007). Evaluating prediction rules for t-year
       survivors with censored regression models. *Journal of the American Statistical
       Association*, 102(478), 527-537.
    .. [2] Hung, H., & Chiang, C.-T. (2010). Estimation methods for time-dependent AUC models with
       survival data. *Canadian Journal of Statistics*, 38(1), 8-26.
    .. [3] ``sksurv.metrics.cumulative_dynamic_auc``, against which the tests check it.
    """
    t, e = _survival(time, event)
    r = _vector("risk", risk, t.shape[0])
    tt, te = _survival(train_time, train_event, "train_")
    h = _vector("horizons", np.atleast_1d(np.asarray(horizons, dtype=np.float64)))
    if h.shape[0] == 0:
        return np.zeros(0)
    if h.max() >= t.max() or h.min() < t.min():
        raise ValueError(f"all horizons must be within follow-up time of test data: [{t.min()}; {t.max()}[")
    ipcw = _ipcw(t, e, tt, te)
    order = np.argsort(-r, kind="stable")
    ts, es, rs, ws = t[order], e[order], r[order], ipcw[order]
    # Threshold points: only the last of each run of (tolerance-)tied risks, as sksurv does.
    tied_next = np.abs(np.diff(rs)) <= tied_tol
    keep = ~np.concatenate([tied_next, [False]])
    case = (ts[:, None] <= h[None, :]) & es[:, None]
    control = ts[:, None] > h[None, :]
    tp = np.cumsum(case * ws[:, None], axis=0)[keep]
    fp = np.cumsum(control, axis=0)[keep].astype(np.float64)
    out = np.full(h.shape[0], np.nan)
    for k in range(h.shape[0]):
        total_tp, total_fp = tp[-1, k], fp[-1, k]
        if total_tp > 0 and total_fp > 0:
            out[k] = np.trapezoid(np.r_[0.0, tp[:, k] / total_tp], np.r_[0.0, fp[:, k] / total_fp])
    return out


# ---- Kaplan-Meier and calibration --------------------------------------------------------------------------
def _km(t: np.ndarray, e: np.ndarray, at: float) -> tuple[float, float]:
    """(Kaplan-Meier survival at ``at``, its Greenwood standard error)."""
    times, inverse, total = np.unique(t, return_inverse=True, return_counts=True)
    d = np.bincount(inverse.reshape(-1), weights=e.astype(np.float64), minlength=times.shape[0])
    r = t.shape[0] - np.concatenate([[0], np.cumsum(total)[:-1]]).astype(np.float64)
    use = (times <= at) & (d > 0)
    d, r = d[use], r[use]
    s = float(np.prod(1.0 - d / r))
    if s == 0.0:
        return 0.0, 0.0  # everyone at risk had the event: the estimate is certain (Greenwood: 0 * inf)
    return s, s * float(np.sqrt(np.sum(d / (r * (r - d)))))


def km_risk_at(time: ArrayLike, event: ArrayLike, t: float) -> float:
    """1 - Kaplan-Meier survival at ``t`` (constant after the last observed time).

    Parameters
    ----------
    time : array_like
        ``(n,)`` follow-up times, finite and >= 0.
    event : array_like
        ``(n,)`` 1 for an observed event, 0 for censoring.
    t : float
        The time, finite.

    Returns
    -------
    float
        The observed risk by ``t`` in [0, 1].

    Raises
    ------
    ValueError
        Malformed inputs, or a non-finite ``t``.

    References
    ----------
    .. [1] Kaplan, E. L., & Meier, P. (1958). Nonparametric estimation from incomplete
       observations. *Journal of the American Statistical Association*, 53(282), 457-481.
    """
    tt, e = _survival(time, event)
    if not np.isfinite(t):
        raise ValueError("t must be finite")
    return 1.0 - _km(tt, e, float(t))[0]


def calibration_by_decile(time: ArrayLike, event: ArrayLike, predicted_risk: ArrayLike, horizon: float,
                          bins: int = 10) -> list[dict]:
    """Per bin of predicted risk: n, events, mean predicted risk, Kaplan-Meier observed risk by ``horizon``.

    Bins are equal-count groups of the studies ordered by predicted risk (ties in rank order), so every
    bin has n // bins or n // bins + 1 studies. ``observed_low``/``observed_high`` is the Greenwood 95 % CI
    of the observed risk, clipped to [0, 1].

    Parameters
    ----------
    time : array_like
        ``(n,)`` follow-up times, finite and >= 0.
    event : array_like
        ``(n,)`` 1 for an observed event, 0 for censoring.
    predicted_risk : array_like
        ``(n,)`` each study's predicted probability of the event by ``horizon`` (e.g.
        :meth:`inference.survival.CoxModel.risk_at`).
    horizon : float
        The time at which risk is compared, finite and >= 0.
    bins : int, default 10
        Number of bins, at most ``n``.

    Returns
    -------
    list of dict
        One per bin, lowest predicted risk first: ``n``, ``events``, ``mean_predicted``,
        ``observed``, ``observed_low``, ``observed_high``.

    Raises
    ------
    ValueError
        Malformed inputs, an invalid ``horizon`` or ``bins``, or fewer studies than bins.

    References
    ----------
    .. [1] Kaplan, E. L., & Meier, P. (1958). Nonparametric estimation from incomplete
       observations. *Journal of the American Statistical Association*, 53(282), 457-481.
    .. [2] Greenwood, M. (1926). The natural duration of cancer. *Reports on Public Health and
       Medical Subjects*, 33. London: HMSO.
    """
    t, e = _survival(time, event)
    p = _vector("predicted_risk", predicted_risk, t.shape[0])
    if not np.isfinite(horizon) or horizon < 0:
        raise ValueError("horizon must be a finite time >= 0")
    if int(bins) != bins or bins < 1:
        raise ValueError("bins must be a positive integer")
    if t.shape[0] < bins:
        raise ValueError(f"{t.shape[0]} studies cannot fill {bins} bins")
    z = float(norm.ppf(0.975))
    out = []
    for rows in np.array_split(np.argsort(p, kind="stable"), int(bins)):
        s, se = _km(t[rows], e[rows], float(horizon))
        observed = 1.0 - s
        out.append({"n": int(rows.shape[0]), "events": int(e[rows].sum()),
                    "mean_predicted": float(p[rows].mean()), "observed": observed,
                    "observed_low": float(np.clip(observed - z * se, 0.0, 1.0)),
                    "observed_high": float(np.clip(observed + z * se, 0.0, 1.0))})
    return out


# ---- bootstrap ---------------------------------------------------------------------------------------------
def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, *,
                 groups: ArrayLike | None = None, n_boot: int = 200, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, int]:
    """Percentile bootstrap CI (low, high, valid replicates) of ``statistic(rows)``; whole groups resampled.

    Each replicate hands ``statistic`` an index array: n rows drawn with replacement, or, with ``groups``
    (one label per row, e.g. the patient), as many groups as there are drawn with replacement and all
    rows of each drawn group. Replicates where the statistic is NaN are dropped; (NaN, NaN, 0) if none is
    left.

    Parameters
    ----------
    statistic : callable
        ``statistic(rows) -> float`` for an integer index array into the data.
    n : int
        Rows in the data.
    groups : array_like, optional
        ``(n,)`` group labels (e.g. patient ids) for a cluster bootstrap; ``None`` resamples rows.
    n_boot : int, default 200
        Replicates.
    seed : int, default 0
        Seed of the resampling.
    alpha : float, default 0.05
        The interval covers ``1 - alpha`` (quantiles ``alpha / 2`` and ``1 - alpha / 2``).

    Returns
    -------
    low, high : float
        The percentile interval.
    valid : int
        Replicates with a finite statistic.

    Raises
    ------
    ValueError
        ``n`` or ``n_boot`` not a positive integer, ``alpha`` outside (0, 1), or ``groups`` of the
        wrong length.

    References
    ----------
    .. [1] Efron, B., & Tibshirani, R. J. (1993). *An Introduction to the Bootstrap*. Chapman &
       Hall.
    """
    if int(n) != n or n < 1:
        raise ValueError("n must be a positive integer")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError("n_boot must be a positive integer")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    n, n_boot = int(n), int(n_boot)
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.shape[0] != n:
            raise ValueError(f"groups has {g.shape[0]} labels, expected {n} (one per row)")
        # object labels (patient ids from a table) are compared as text: np.unique cannot order mixed types
        _, code = np.unique(g.astype(str) if g.dtype == object else g, return_inverse=True)
        code = code.reshape(-1)
        n_groups = int(code.max()) + 1
        members = np.argsort(code, kind="stable")  # rows of group k: members[first[k]:first[k] + size[k]]
        size = np.bincount(code, minlength=n_groups)
        first = np.concatenate([[0], np.cumsum(size)[:-1]])
    values = []
    for _ in range(n_boot):
        if groups is None:
            ix = rng.integers(0, n, n)
        else:
            drawn = rng.integers(0, n_groups, n_groups)
            lengths = size[drawn]
            # all rows of each drawn group, back to back, without a Python loop over groups
            within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            ix = members[np.repeat(first[drawn], lengths) + within]
        values.append(float(statistic(ix)))
    v = np.asarray(values)
    v = v[np.isfinite(v)]
    if v.shape[0] == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi), int(v.shape[0])
