"""Survival metrics (inference.survival_metrics) against lifelines and scikit-survival."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from lifelines.utils import concordance_index
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.util import Surv

from inference.survival_metrics import (
    bootstrap_ci,
    calibration_by_decile,
    harrell_c,
    km_risk_at,
    td_auc,
    uno_c,
)


def random_survival(rng, n, time_decimals=1, risk_decimals=1, censoring=0.35):
    """Times and risks rounded so that both have many ties."""
    time = np.round(rng.exponential(1.0, n), time_decimals) + 0.1
    event = (rng.random(n) > censoring).astype(int)
    risk = np.round(rng.normal(size=n) - 0.5 * np.log(time), risk_decimals)
    return time, event, risk


# ---- Harrell -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, n", [(0, 2), (1, 7), (2, 60), (3, 400), (4, 3000)])
def test_harrell_equals_lifelines(seed, n):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        time, event, risk = random_survival(rng, n, time_decimals=int(rng.integers(0, 3)),
                                            risk_decimals=int(rng.integers(0, 3)))
        event[0] = 1
        try:
            ref = concordance_index(time, -risk, event)
        except ZeroDivisionError:  # no admissible pair
            ref = float("nan")
        ours = harrell_c(time, event, risk)
        assert ours == pytest.approx(ref, abs=1e-14, nan_ok=True)


def test_harrell_hand_cases():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 1])
    assert harrell_c(time, event, np.array([4.0, 3.0, 2.0, 1.0])) == 1.0
    assert harrell_c(time, event, np.array([1.0, 2.0, 3.0, 4.0])) == 0.0
    assert harrell_c(time, event, np.zeros(4)) == 0.5  # risk ties count 1/2
    # tied times: two events are not comparable; an event and a censored study at the same time are
    assert np.isnan(harrell_c([2.0, 2.0], [1, 1], [1.0, 0.0]))
    assert harrell_c([2.0, 2.0], [1, 0], [1.0, 0.0]) == 1.0
    assert harrell_c([2.0, 2.0], [0, 1], [1.0, 0.0]) == 0.0
    # a censored study is not comparable with a later one
    assert np.isnan(harrell_c([1.0, 2.0], [0, 1], [1.0, 0.0]))
    assert np.isnan(harrell_c([1.0, 2.0, 3.0], [0, 0, 0], [1.0, 2.0, 3.0]))


# ---- Uno and time-dependent AUC ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_uno_equals_sksurv(seed):
    rng = np.random.default_rng(100 + seed)
    time, event, risk = random_survival(rng, 300)
    train_time, train_event, _ = random_survival(rng, 500)
    train_time[np.argmax(train_time)] = time.max() + 1  # training follow-up covers the test set
    y_train = Surv.from_arrays(train_event.astype(bool), train_time)
    y_test = Surv.from_arrays(event.astype(bool), time)
    for tau in (None, float(np.quantile(time, 0.6)), float(np.quantile(time, 0.9))):
        ref = concordance_index_ipcw(y_train, y_test, risk, tau=tau)[0]
        assert uno_c(time, event, risk, train_time, train_event, tau) == pytest.approx(ref, abs=1e-10)
    # truncation matters here: the check above is not vacuous
    assert uno_c(time, event, risk, train_time, train_event) != pytest.approx(
        uno_c(time, event, risk, train_time, train_event, float(np.quantile(time, 0.6))), abs=1e-6)


def test_uno_needs_training_follow_up():
    time, event, risk = np.array([1.0, 2.0, 5.0]), np.array([1, 1, 1]), np.array([3.0, 2.0, 1.0])
    train_time, train_event = np.array([1.0, 2.0, 3.0]), np.array([1, 0, 1])
    y_train = Surv.from_arrays(train_event.astype(bool), train_time)
    y_test = Surv.from_arrays(event.astype(bool), time)
    with pytest.raises(ValueError, match="largest observed time"):
        concordance_index_ipcw(y_train, y_test, risk)
    with pytest.raises(ValueError, match="largest observed time"):
        uno_c(time, event, risk, train_time, train_event)
    # with tau the late event is out of the comparison and the estimate exists
    ref = concordance_index_ipcw(y_train, y_test, risk, tau=4.0)[0]
    assert uno_c(time, event, risk, train_time, train_event, tau=4.0) == ref == 1.0
    # a censoring distribution that drops to zero cannot weight an event there
    with pytest.raises(ValueError, match="censoring survival function is zero"):
        uno_c(time, event, risk, np.array([1.0, 2.0, 3.0]), np.array([1, 0, 0]))


@pytest.mark.parametrize("seed", range(4))
def test_td_auc_equals_sksurv(seed):
    rng = np.random.default_rng(200 + seed)
    time, event, risk = random_survival(rng, 400, time_decimals=2, risk_decimals=1)
    train_time, train_event, _ = random_survival(rng, 600)
    train_time[np.argmax(train_time)] = time.max() + 1
    horizons = np.quantile(time[event == 1], [0.1, 0.25, 0.5, 0.75, 0.9])
    ref, _ = cumulative_dynamic_auc(Surv.from_arrays(train_event.astype(bool), train_time),
                                    Surv.from_arrays(event.astype(bool), time), risk, horizons)
    ours = td_auc(time, event, risk, horizons, train_time, train_event)
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    assert len(set(np.round(ours, 6))) > 1  # the horizons give different AUCs
    # one horizon at a time, and in any order, gives the same values
    np.testing.assert_allclose([td_auc(time, event, risk, [h], train_time, train_event)[0]
                                for h in horizons[::-1]], ours[::-1], atol=1e-12)


def test_td_auc_horizon_outside_follow_up_is_an_error():
    time, event = np.array([1.0, 2.0, 3.0]), np.array([1, 0, 1])
    with pytest.raises(ValueError, match="within follow-up"):
        td_auc(time, event, np.array([1.0, 2.0, 3.0]), [3.0], time, event)
    with pytest.raises(ValueError, match="within follow-up"):
        td_auc(time, event, np.array([1.0, 2.0, 3.0]), [0.5], time, event)


# ---- Kaplan-Meier and calibration --------------------------------------------------------------------------
def test_km_risk_equals_lifelines():
    rng = np.random.default_rng(7)
    time, event, _ = random_survival(rng, 300)
    kmf = KaplanMeierFitter().fit(time, event)
    for t in (0.0, 0.15, 0.5, 1.0, 1.55, 3.0, time.max(), time.max() + 5):
        ref = 1.0 - float(kmf.survival_function_at_times(t).iloc[0])
        assert km_risk_at(time, event, t) == pytest.approx(ref, abs=1e-12)


def test_calibration_on_perfectly_calibrated_data():
    rng = np.random.default_rng(8)
    n, horizon = 6000, 2.0
    lp = rng.normal(size=n)
    rate = 0.15 * np.exp(lp)
    t_event, t_cens = rng.exponential(1.0 / rate), rng.uniform(0.5, 6.0, n)
    time, event = np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)
    predicted = 1.0 - np.exp(-rate * horizon)  # the true risk by the horizon
    bins = calibration_by_decile(time, event, predicted, horizon)
    assert len(bins) == 10 and sum(b["n"] for b in bins) == n and {b["n"] for b in bins} == {600}
    assert [b["mean_predicted"] for b in bins] == sorted(b["mean_predicted"] for b in bins)
    inside = [b["observed_low"] <= b["mean_predicted"] <= b["observed_high"] for b in bins]
    assert sum(inside) >= 9
    assert all(abs(b["observed"] - b["mean_predicted"]) < 0.05 for b in bins)
    assert all(0.0 <= b["observed_low"] <= b["observed"] <= b["observed_high"] <= 1.0 for b in bins)
    # halving the predictions is detected
    halved = calibration_by_decile(time, event, predicted / 2, horizon)
    assert sum(b["observed_low"] <= b["mean_predicted"] <= b["observed_high"] for b in halved) <= 2


def test_calibration_ci_is_greenwood():
    # without censoring KM is the proportion and Greenwood's variance is p (1 - p) / n
    time = np.arange(1.0, 101.0)
    event = np.ones(100, dtype=int)
    (b,) = calibration_by_decile(time, event, np.full(100, 0.3), 30.5, bins=1)
    se = np.sqrt(0.3 * 0.7 / 100)
    assert b["observed"] == pytest.approx(0.3)
    assert b["observed_low"] == pytest.approx(0.3 - 1.959963984540054 * se)
    assert b["observed_high"] == pytest.approx(0.3 + 1.959963984540054 * se)
    # all events before the horizon: observed risk 1 with a degenerate CI, clipped to [0, 1]
    (b,) = calibration_by_decile(time, event, np.full(100, 0.9), 200.0, bins=1)
    assert (b["observed"], b["observed_low"], b["observed_high"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="bins"):
        calibration_by_decile(time[:5], event[:5], np.full(5, 0.1), 2.0)


# ---- bootstrap ---------------------------------------------------------------------------------------------
def test_bootstrap_covers_a_mean():
    rng = np.random.default_rng(9)
    x = rng.normal(3.0, 2.0, 400)
    lo, hi, valid = bootstrap_ci(lambda ix: x[ix].mean(), len(x), n_boot=400, seed=1)
    assert valid == 400 and lo < 3.0 < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(400), rel=0.2)
    assert bootstrap_ci(lambda ix: x[ix].mean(), len(x), n_boot=400, seed=1) == (lo, hi, valid)


def test_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(10)
    groups = np.array([f"P{g}" for g in rng.integers(0, 40, 150)], dtype=object)
    names, size = np.unique(groups, return_counts=True)
    seen = []

    def statistic(ix):
        seen.append(ix)
        return float(len(ix))

    _, _, valid = bootstrap_ci(statistic, len(groups), groups=groups, n_boot=50, seed=2)
    assert valid == 50 and len(seen) == 50
    for ix in seen:
        rows_per_group = {g: 0 for g in names}
        for row in ix:
            rows_per_group[groups[row]] += 1
        drawn = np.array([rows_per_group[g] for g in names]) / size
        assert np.all(drawn == np.round(drawn))  # each group drawn k times contributes k x all its rows
        assert drawn.sum() == len(names)  # as many groups as there are
        counts = np.bincount(ix, minlength=len(groups))
        for g, k in zip(names, drawn):
            assert np.all(counts[groups == g] == k)
    assert any(len(set(groups[ix])) < len(names) for ix in seen)  # it does resample


def test_bootstrap_drops_nan_replicates():
    calls = []

    def statistic(ix):
        calls.append(1)
        return float("nan") if len(calls) % 3 == 0 else float(ix.mean())

    lo, hi, valid = bootstrap_ci(statistic, 50, n_boot=30, seed=0)
    assert valid == 20 and np.isfinite(lo) and lo <= hi
    assert bootstrap_ci(lambda ix: float("nan"), 10, n_boot=5)[2] == 0


# ---- clear errors ------------------------------------------------------------------------------------------
def test_metric_input_errors():
    t, e, r = np.array([1.0, 2.0, 3.0]), np.array([1, 0, 1]), np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="expected 3"):
        harrell_c(t, e[:2], r)
    with pytest.raises(ValueError, match="non-finite"):
        harrell_c(t, e, np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match="negative"):
        harrell_c(np.array([-1.0, 2.0, 3.0]), e, r)
    with pytest.raises(ValueError, match="0 .censored. or 1"):
        harrell_c(t, np.array([1, 2, 0]), r)
    with pytest.raises(ValueError, match="expected 3"):
        uno_c(t, e, r[:2], t, e)
    with pytest.raises(ValueError, match="train_time"):
        td_auc(t, e, r, [1.5], np.array([1.0, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(lambda ix: 0.0, 3, groups=["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here warns (no 0/0 in a degenerate bootstrap)
        assert np.isnan(uno_c(t, np.zeros(3), r, t, e))
