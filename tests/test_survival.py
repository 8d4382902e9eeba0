"""Cox partial likelihood, fit and L2 choice (inference.survival), cross-checked against lifelines and
a direct O(n^2) textbook implementation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index

from inference import survival
from inference.survival import CoxModel, choose_l2, fit_cox, group_folds, neg_log_partial_likelihood
from inference.survival_metrics import harrell_c


def textbook_nll(beta, X, time, event, ties):
    """-log partial likelihood and its gradient straight from the definition, one event time at a time."""
    lp = X @ beta
    ll, grad = 0.0, np.zeros(X.shape[1])
    for t in np.unique(time[event == 1]):
        dead = (time == t) & (event == 1)
        at_risk = (time >= t).astype(float)
        d = int(dead.sum())
        ll += lp[dead].sum()
        grad += X[dead].sum(axis=0)
        for k in range(d):
            f = k / d if ties == "efron" else 0.0
            w = np.exp(lp) * (at_risk - f * dead)
            ll -= np.log(w.sum())
            grad -= (w[:, None] * X).sum(axis=0) / w.sum()
    return -ll, -grad


def tied_data(seed=0, n=200, p=4, decimals=1):
    """Exponential times from a Cox model, ~30 % censored, rounded so that many times are tied."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    lp = X @ np.linspace(0.8, -0.6, p)
    t_event = rng.exponential(1.0 / np.exp(lp))
    t_cens = rng.exponential(2.5, n)
    time = np.maximum(np.round(np.minimum(t_event, t_cens), decimals), 10.0 ** -decimals)
    event = (t_event <= t_cens).astype(int)
    return X, time, event


# ---- the likelihood ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_gradient_matches_finite_differences(ties):
    X, time, event = tied_data(1)
    beta = np.array([0.3, -0.2, 0.5, 0.1])
    _, grad = neg_log_partial_likelihood(beta, X, time, event, ties)
    h = 1e-6
    fd = np.array([(neg_log_partial_likelihood(beta + h * u, X, time, event, ties)[0]
                    - neg_log_partial_likelihood(beta - h * u, X, time, event, ties)[0]) / (2 * h)
                   for u in np.eye(4)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_hessian_vector_product_matches_finite_differences(ties):
    X, time, event = tied_data(2)
    problem = survival._CoxProblem(X, time, event.astype(float), ties)
    beta, v = np.array([0.2, 0.1, -0.4, 0.3]), np.array([1.0, -2.0, 0.5, 0.7])
    _, _, state = problem.evaluate(beta)
    h = 1e-6
    fd = (problem.evaluate(beta + h * v)[1] - problem.evaluate(beta - h * v)[1]) / (2 * h)
    np.testing.assert_allclose(problem.hessp(state, v), fd, rtol=1e-6, atol=1e-6)


def test_efron_equals_breslow_without_ties_and_differs_with_ties():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(150, 3))
    time = rng.permutation(np.arange(1, 151)).astype(float)  # all distinct
    event = (rng.random(150) < 0.7).astype(int)
    beta = np.array([0.4, -0.3, 0.2])
    fe, ge = neg_log_partial_likelihood(beta, X, time, event, "efron")
    fb, gb = neg_log_partial_likelihood(beta, X, time, event, "breslow")
    assert fe == pytest.approx(fb, rel=1e-13)
    np.testing.assert_allclose(ge, gb, rtol=1e-12, atol=1e-12)
    time_tied = np.ceil(time / 10)  # 15 distinct times
    assert neg_log_partial_likelihood(beta, X, time_tied, event, "efron")[0] != pytest.approx(
        neg_log_partial_likelihood(beta, X, time_tied, event, "breslow")[0], rel=1e-6)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_likelihood_matches_textbook_with_ties(ties):
    X, time, event = tied_data(4)
    assert len(np.unique(time[event == 1])) < event.sum()  # the data really has tied event times
    beta = np.array([0.5, -0.4, 0.3, -0.1])
    f, g = neg_log_partial_likelihood(beta, X, time, event, ties)
    f_ref, g_ref = textbook_nll(beta, X, time, event, ties)
    assert f == pytest.approx(f_ref, rel=1e-12)
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-10)


def test_efron_likelihood_matches_lifelines():
    X, time, event = tied_data(5, n=300)
    df = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])]).assign(T=time, E=event)
    cph = CoxPHFitter().fit(df, "T", "E", fit_options={"precision": 1e-12})
    f, _ = neg_log_partial_likelihood(cph.params_.to_numpy(), X, time, event, "efron")
    assert -f == pytest.approx(cph.log_likelihood_, rel=1e-11)


def test_risk_sets_span_the_whole_data_set():
    X, time, event = tied_data(6)
    beta = np.array([0.5, -0.4, 0.3, -0.1])
    whole, _ = neg_log_partial_likelihood(beta, X, time, event)
    halves = sum(neg_log_partial_likelihood(beta, X[s], time[s], event[s])[0]
                 for s in (slice(0, 100), slice(100, 200)))
    # batch-local risk sets (the old bug) are smaller, so each log-denominator is smaller
    assert halves < whole - 1.0
    assert whole == pytest.approx(textbook_nll(beta, X, time, event, "efron")[0], rel=1e-12)
    # a censored study with a late time sits in every risk set: adding it changes the likelihood
    late = np.vstack([X, np.full((1, 4), 0.5)])
    more, _ = neg_log_partial_likelihood(beta, late, np.r_[time, time.max() + 1], np.r_[event, 0])
    assert more > whole + 1e-3


# ---- the fit ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lifelines_case():
    """n=400, p=5 on very different scales, times rounded to 0.1 (ties), ~30 % censored."""
    rng = np.random.default_rng(11)
    n = 400
    X = rng.normal(size=(n, 5)) * [1.0, 2.0, 0.5, 3.0, 10.0] + [0.0, 5.0, -1.0, 2.0, 50.0]
    lp = (X - X.mean(axis=0)) @ np.array([0.5, -0.3, 0.8, 0.1, 0.0])
    t_event, t_cens = rng.exponential(1.0 / np.exp(lp)), rng.exponential(2.5, n)
    time = np.maximum(np.round(np.minimum(t_event, t_cens), 1), 0.1)
    event = (t_event <= t_cens).astype(int)
    df = pd.DataFrame(X, columns=[f"x{i}" for i in range(5)]).assign(T=time, E=event)
    cph = CoxPHFitter().fit(df, "T", "E", fit_options={"precision": 1e-12})
    return X, time, event, df, cph


def test_fit_matches_lifelines(lifelines_case):
    X, time, event, df, cph = lifelines_case
    assert 0.2 < 1 - event.mean() < 0.4 and len(np.unique(time)) < 100
    model = fit_cox(X, time, event, feature_names=list(df.columns[:5]))
    assert model.converged and model.n == 400 and model.events == event.sum()
    np.testing.assert_allclose(model.coef, cph.params_.to_numpy(), rtol=1e-6)
    assert model.loglik == pytest.approx(cph.log_likelihood_, rel=1e-10)
    c_ours = harrell_c(time, event, model.linear_predictor(X))
    assert c_ours == pytest.approx(concordance_index(time, -cph.predict_partial_hazard(df), event), abs=1e-12)
    # lifelines' baseline is for covariates at the training mean, as ours (centred lp)
    ref = cph.baseline_cumulative_hazard_.iloc[:, 0].reindex(model.baseline_times).to_numpy()
    np.testing.assert_allclose(model.baseline_cumhaz, ref, rtol=1e-6)
    # at event times (lifelines interpolates between them; ours is the step function)
    times = model.baseline_times[[0, 3, 10, -1]]
    surv = cph.predict_survival_function(df.iloc[:4], times=times).to_numpy()  # (times, subjects)
    ours = np.array([np.exp(-model.cumulative_hazard(X[:4], t)) for t in times])
    np.testing.assert_allclose(ours, surv, rtol=1e-6)


def test_penalised_fit_matches_lifelines(lifelines_case):
    X, time, event, df, _ = lifelines_case
    for l2 in (0.05, 1.0):
        cph = CoxPHFitter(penalizer=l2).fit(df, "T", "E", fit_options={"precision": 1e-12})
        model = fit_cox(X, time, event, l2=l2)
        assert model.converged and model.l2 == l2
        np.testing.assert_allclose(model.coef, cph.params_.to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(model.scale, df.iloc[:, :5].std().to_numpy(), rtol=1e-12)


def test_l2_penalises_standardised_coefficients():
    X, time, event = tied_data(7, n=300)
    model = fit_cox(X, time, event, l2=0.5)
    rescaled = X * np.array([1000.0, 1.0, 0.01, 1.0])
    model2 = fit_cox(rescaled, time, event, l2=0.5)
    # the penalty acts on standardised features: rescaling a column only rescales its coefficient
    np.testing.assert_allclose(model2.coef * np.array([1000.0, 1.0, 0.01, 1.0]), model.coef, rtol=1e-6)
    # and the optimum is stationary for NLL / n + 0.5 * l2 * ||beta_std||^2
    beta_std = model.coef * model.scale
    _, grad = neg_log_partial_likelihood(beta_std, (X - model.center) / model.scale, time, event)
    np.testing.assert_allclose(grad / len(time) + 0.5 * beta_std, 0.0, atol=1e-7)
    # shrinkage: the penalised coefficients are smaller than the unpenalised ones
    assert np.linalg.norm(model.coef) < np.linalg.norm(fit_cox(X, time, event).coef)


def test_constant_column_gets_scale_one_and_zero_coefficient():
    X, time, event = tied_data(8)
    Xc = np.column_stack([X, np.full(len(time), 3.7)])
    model = fit_cox(Xc, time, event, l2=0.01)
    assert model.scale[-1] == 1.0 and model.center[-1] == 3.7 and model.coef[-1] == 0.0
    np.testing.assert_allclose(model.coef[:-1], fit_cox(X, time, event, l2=0.01).coef, rtol=1e-8)


def test_planted_signal_recovered_with_grouped_cv():
    rng = np.random.default_rng(2024)
    p = 64
    beta = np.zeros(p)
    beta[[0, 10, 40]] = [0.9, -0.7, 0.5]

    def simulate(n_patients, max_studies):
        patient = np.repeat(np.arange(n_patients), rng.integers(1, max_studies + 1, n_patients))
        # nights of one patient resemble each other: grouping matters for the folds
        X = 0.6 * rng.normal(size=(n_patients, p))[patient] + 0.8 * rng.normal(size=(len(patient), p))
        lp = X @ beta
        t_event = rng.exponential(1.0 / (0.1 * np.exp(lp)))
        t_cens = rng.exponential(25.0, len(lp))
        return X, np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int), patient, lp

    X, time, event, patient, _ = simulate(1000, 2)
    assert 0.2 < 1 - event.mean() < 0.4
    l2, rows = choose_l2(X, time, event, patient)
    assert [r["l2"] for r in rows] == list(survival.DEFAULT_GRID) and all(r["folds"] == 5 for r in rows)
    model = fit_cox(X, time, event, l2=l2)
    assert np.corrcoef(model.coef, beta)[0, 1] > 0.9
    Xt, tt, et, _, lp_true = simulate(3000, 1)
    c_model = harrell_c(tt, et, model.linear_predictor(Xt))
    c_true = harrell_c(tt, et, lp_true)
    assert abs(c_model - c_true) < 0.03 and c_model > 0.65


# ---- choosing L2 -------------------------------------------------------------------------------------------
def test_group_folds_keep_each_group_in_one_fold():
    rng = np.random.default_rng(5)
    groups = np.array([f"P{g:03d}" for g in rng.integers(0, 120, 500)], dtype=object)
    folds = group_folds(groups, 5, seed=3)
    rows = np.concatenate(folds)
    assert len(folds) == 5 and np.array_equal(np.sort(rows), np.arange(500))  # a partition of the rows
    fold_of_group = {}
    for k, f in enumerate(folds):
        for g in set(groups[f]):
            assert fold_of_group.setdefault(g, k) == k
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 20  # dealt to the emptiest fold: balanced rows
    assert all(np.array_equal(a, b) for a, b in zip(folds, group_folds(groups, 5, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, group_folds(groups, 5, seed=4)))
    assert len(group_folds(["a", "a", "b", "c"], 5)) == 3  # fewer groups than folds: one fold per group


def test_choose_l2_trains_on_whole_groups(monkeypatch):
    X, time, event = tied_data(9, n=240, decimals=6)
    time = time + np.arange(240) * 1e-9  # distinct times identify the rows a fit was given
    groups = np.arange(240) // 4  # 60 patients of 4 studies
    seen = []

    class Recording(survival._CoxProblem):
        def __init__(self, xs, t, e, ties):
            seen.append(np.searchsorted(np.sort(time), t))
            super().__init__(xs, t, e, ties)

    monkeypatch.setattr(survival, "_CoxProblem", Recording)
    order = np.argsort(time)
    choose_l2(X, time, event, groups, grid=(0.1, 1.0), folds=4)
    assert len(seen) == 4
    held_out = []
    for rows_sorted in seen:
        rows = order[rows_sorted]
        counts = np.bincount(groups[rows], minlength=60)
        assert set(counts) <= {0, 4}  # every patient wholly in or wholly out of the training side
        held_out.append(set(np.flatnonzero(counts == 0)))
    assert set().union(*held_out) == set(range(60)) and sum(map(len, held_out)) == 60


def test_choose_l2_breaks_ties_towards_the_larger_penalty():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(300, 1))
    t_event = rng.exponential(1.0 / np.exp(0.8 * x[:, 0]))
    t_cens = rng.exponential(3.0, 300)
    time, event = np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)
    # one feature: every l2 keeps the sign, so the held-out ranking, hence C, is the same for all
    l2, rows = choose_l2(x, time, event, np.arange(300), grid=(1e-3, 0.1, 10.0))
    assert l2 == 10.0
    assert len({r["c_index_mean"] for r in rows}) == 1
    assert all(r["folds"] == 5 and 0.0 < r["c_index_sd"] < 0.1 and r["c_index_mean"] > 0.6 for r in rows)


def test_choose_l2_prefers_a_penalty_when_features_are_noise():
    rng = np.random.default_rng(12)
    n, p = 150, 60
    X = rng.normal(size=(n, p))
    t_event = rng.exponential(1.0 / np.exp(0.7 * X[:, 0]), n)
    t_cens = rng.exponential(3.0, n)
    time, event = np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)
    l2, rows = choose_l2(X, time, event, np.arange(n))
    by_l2 = {r["l2"]: r["c_index_mean"] for r in rows}
    assert l2 >= 0.1 and by_l2[l2] > by_l2[1e-4]


# ---- the model object --------------------------------------------------------------------------------------
def test_model_round_trip_and_predictions(lifelines_case):
    X, time, event, _, _ = lifelines_case
    model = fit_cox(X, time, event, l2=0.01, ties="breslow", feature_names=[f"f{i}" for i in range(5)])
    back = CoxModel.from_dict(json.loads(json.dumps(model.to_dict(), allow_nan=False)))
    for name in ("coef", "center", "scale", "baseline_times", "baseline_cumhaz"):
        value = getattr(back, name)
        assert np.array_equal(value, getattr(model, name)) and value.dtype == np.float64
    assert (back.l2, back.ties, back.feature_names, back.n, back.events, back.converged, back.iterations,
            back.loglik) == (0.01, "breslow", model.feature_names, 400, model.events, True, model.iterations,
                             model.loglik)
    lp = model.linear_predictor(X)
    np.testing.assert_allclose(lp, (X - model.center) @ model.coef)
    np.testing.assert_allclose(model.linear_predictor(X[0]), lp[:1])  # one study as a 1-D vector
    t0, t1 = model.baseline_times[:2]
    assert np.all(model.risk_at(X, t0 - 1e-9) == 0.0)  # before the first event time
    np.testing.assert_allclose(model.risk_at(X, (t0 + t1) / 2), model.risk_at(X, t0))  # a step function
    np.testing.assert_allclose(model.risk_at(X, t1), 1 - np.exp(-model.baseline_cumhaz[1] * np.exp(lp)))
    late = model.risk_at(X, 1e6)
    assert np.all((late > model.risk_at(X, t1)) & (late <= 1.0))
    with pytest.raises(ValueError, match="5 features"):
        model.linear_predictor(X[:, :4])
    with pytest.raises(ValueError):
        CoxModel.from_dict({**model.to_dict(), "center": [0.0]})


# ---- clear errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda X, t, e: (X, np.r_[-1.0, t[1:]], e), "negative"),
    (lambda X, t, e: (np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), t, e), "non-finite"),
    (lambda X, t, e: (X, np.r_[np.inf, t[1:]], e), "non-finite"),
    (lambda X, t, e: (X, t, np.zeros_like(e)), "no events: a Cox model cannot be fitted"),
    (lambda X, t, e: (X, t, np.r_[2, e[1:]]), "0 .censored. or 1"),
    (lambda X, t, e: (X, t[:-1], e), "one value per row"),
    (lambda X, t, e: (X[:, 0], t, e), "2-D"),
])
def test_fit_rejects_bad_inputs(change, message):
    X, time, event = tied_data(13, n=50)
    with pytest.raises(ValueError, match=message):
        fit_cox(*change(X, time, event))


def test_other_argument_errors():
    X, time, event = tied_data(14, n=50)
    with pytest.raises(ValueError, match="ties"):
        fit_cox(X, time, event, ties="exact")
    with pytest.raises(ValueError, match="l2"):
        fit_cox(X, time, event, l2=-1.0)
    with pytest.raises(ValueError, match="feature names"):
        fit_cox(X, time, event, feature_names=["a"])
    with pytest.raises(ValueError, match="beta has"):
        neg_log_partial_likelihood(np.zeros(3), X, time, event)
    with pytest.raises(ValueError, match="groups"):
        choose_l2(X, time, event, np.arange(49))
    with pytest.raises(ValueError, match="no events"):
        choose_l2(X, time, np.zeros(50), np.arange(50))


def test_large_fit_smoke():
    """20,000 studies x 514 features (512 night values + age + sex) with l2 = 1."""
    rng = np.random.default_rng(0)
    n, p = 20_000, 514
    X = rng.normal(size=(n, p))
    X[:, -2] = rng.uniform(25, 80, n)
    X[:, -1] = rng.integers(0, 2, n)
    lp = X[:, :3] @ np.array([0.5, -0.7, 1.0]) + 0.02 * (X[:, -2] - 50)
    t_event, t_cens = rng.exponential(1.0 / np.exp(lp)), rng.exponential(2.0, n)
    time, event = np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)
    model = fit_cox(X, time, event, l2=1.0)
    assert model.converged and model.coef.shape == (p,) and np.all(np.isfinite(model.coef))
    assert np.all(np.sign(model.coef[:3]) == [1, -1, 1])
    assert len(model.baseline_times) == len(np.unique(time[event == 1]))
