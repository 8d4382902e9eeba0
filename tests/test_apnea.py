"""Apnea heads (inference/apnea.py): severity classes, token statistics, grouped cross-validation, a planted
signal recovered on an independent test set, and the plain-numpy model checked against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.linear_model import LogisticRegression, Ridge

from inference.apnea import (
    MAX_ITER,
    SEVERITY,
    STAGE2_C,
    TOL,
    ApneaModel,
    apnea_feature_names,
    apnea_features,
    evaluate_apnea,
    fit_apnea,
    group_folds,
    severity_of,
    token_statistics,
)


def test_severity_boundaries_belong_to_the_higher_class():
    ahi = np.array([0.0, 4.99, 5.0, 14.99, 15.0, 29.99, 30.0, 120.0])
    assert severity_of(ahi).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [SEVERITY[i] for i in severity_of([4.99, 5, 15, 30])] == ["normal", "mild", "moderate", "severe"]


@pytest.mark.parametrize("bad", [[-0.1], [np.nan], [np.inf]])
def test_severity_refuses_negative_or_non_finite_ahi(bad):
    with pytest.raises(ValueError, match="AHI must be"):
        severity_of(np.array([3.0, *bad]))


def _planted(rng: np.random.Generator, u: np.ndarray, n: int, prefix: str, coef: float = 1.2):
    """Night vectors ~ N(0, 1); log(AHI + 1) = 2 + coef * (x . u) + noise; patients with 1-3 nights."""
    x = rng.normal(size=(n, u.size))
    ahi = np.clip(np.exp(2.0 + coef * (x @ u) + rng.normal(scale=0.3, size=n)) - 1.0, 0.0, None)
    groups, patient = [], 0
    while len(groups) < n:
        groups += [f"{prefix}{patient}"] * int(rng.integers(1, 4))
        patient += 1
    return x, ahi, np.asarray(groups[:n], dtype=object)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    u = rng.normal(size=512)
    u /= np.linalg.norm(u)
    train = _planted(rng, u, 600, "P")
    test = _planted(rng, u, 600, "Q")  # independent patients and nights
    return train, test


@pytest.fixture(scope="module")
def fitted(planted):
    (x, ahi, groups), _ = planted
    return fit_apnea(x, ahi, groups, seed=0)


def test_planted_signal_is_found_on_an_independent_test_set(planted, fitted):
    _, (xt, at, _) = planted
    model, cv = fitted
    report = evaluate_apnea(model, xt, at)
    assert report["n"] == 600
    assert report["presence"]["auroc"] > 0.85
    assert report["severity"]["balanced_accuracy"] > 0.5  # chance is 0.25
    confusion = np.asarray(report["severity"]["confusion_matrix"])
    assert confusion.shape == (4, 4) and confusion.sum() == 600
    assert confusion.sum(axis=1).tolist() == [report["severity"]["counts"][c] for c in SEVERITY]
    assert np.trace(confusion) / 600 == pytest.approx(report["severity"]["accuracy"])
    # the cross-validation report: one row per C, mean and SD, a chosen value from the grid
    for part in ("presence", "severity"):
        assert [row["C"] for row in cv[part]["grid"]] == [1e-3, 1e-2, 1e-1, 1.0, 10.0]
        assert all(row["mean"] is not None and row["sd"] is not None for row in cv[part]["grid"])
        assert cv[part]["chosen_C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
        best = max(row["mean"] for row in cv[part]["grid"])
        assert next(r for r in cv[part]["grid"] if r["C"] == cv[part]["chosen_C"])["mean"] == best
    assert model.l2_presence == pytest.approx(1.0 / cv["presence"]["chosen_C"])
    json.dumps(cv, allow_nan=False)  # strict JSON


def test_numpy_model_equals_scikit_learn_on_the_same_standardised_data(planted, fitted):
    """The default (ahi_score) model is rebuilt from scikit-learn alone: the ridge score of log(AHI + 1)
    at the chosen penalty, and the logistic regressions on the out-of-fold scores (grouped folds)."""
    (x, ahi, groups), (xt, _, _) = planted
    model, cv = fitted
    z, zt = model.standardize(x), model.standardize(xt)
    assert np.allclose(z.mean(axis=0), 0, atol=1e-9) and np.allclose(z.std(axis=0), 1, atol=1e-9)
    y = np.log1p(ahi)
    folds = group_folds(groups, 5, 0)

    def oof(alpha):
        out = np.empty(len(y))
        for val in folds:
            train = np.setdiff1d(np.arange(len(y)), val)
            xs = x[train]
            m, s = xs.mean(axis=0), xs.std(axis=0)
            out[val] = Ridge(alpha=alpha).fit((xs - m) / s, y[train]).predict((x[val] - m) / s)
        return (out - out.mean()) / out.std()

    ridge = Ridge(alpha=model.l2_presence).fit(z, y)
    clf = LogisticRegression(C=STAGE2_C, max_iter=MAX_ITER, tol=TOL).fit(oof(model.l2_presence)[:, None],
                                                                         ahi >= 5)
    sm = cv["presence"]["score_model"]
    expected = clf.predict_proba(((ridge.predict(zt) - sm["score_mean"]) / sm["score_sd"])[:, None])[:, 1]
    presence, severity = model.predict(xt)
    np.testing.assert_allclose(presence, expected, atol=1e-6)

    ridge = Ridge(alpha=model.l2_severity).fit(z, y)
    clf = LogisticRegression(C=STAGE2_C, max_iter=MAX_ITER, tol=TOL, class_weight="balanced").fit(
        oof(model.l2_severity)[:, None], severity_of(ahi))
    sm = cv["severity"]["score_model"]
    expected = clf.predict_proba(((ridge.predict(zt) - sm["score_mean"]) / sm["score_sd"])[:, None])
    np.testing.assert_allclose(severity, expected, atol=1e-6)
    np.testing.assert_allclose(severity.sum(axis=1), 1.0, atol=1e-12)


def test_logistic_method_equals_scikit_learn_predict_proba():
    rng = np.random.default_rng(1)
    u = rng.normal(size=64)
    u /= np.linalg.norm(u)
    x, ahi, groups = _planted(rng, u, 240, "P", coef=1.5)
    x[:20, :16] = np.nan  # a missing modality block: imputed with the training means
    xt, _, _ = _planted(rng, u, 100, "Q", coef=1.5)
    model, cv = fit_apnea(x, ahi, groups, method="logistic", grid=(1e-2, 1e-1, 1.0), folds=3)
    assert model.method == "logistic" and cv["method"] == "logistic"
    means = np.nanmean(x, axis=0)
    filled = np.where(np.isnan(x), means, x)
    z = (filled - filled.mean(axis=0)) / filled.std(axis=0)
    assert np.allclose(model.standardize(x), z, atol=1e-12)
    zt = (xt - filled.mean(axis=0)) / filled.std(axis=0)
    presence, severity = model.predict(xt)
    clf = LogisticRegression(C=1.0 / model.l2_presence, max_iter=MAX_ITER, tol=TOL).fit(z, ahi >= 5)
    np.testing.assert_allclose(presence, clf.predict_proba(zt)[:, 1], atol=1e-6)
    clf = LogisticRegression(C=1.0 / model.l2_severity, max_iter=MAX_ITER, tol=TOL,
                             class_weight="balanced").fit(z, severity_of(ahi))
    assert clf.classes_.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(severity, clf.predict_proba(zt), atol=1e-6)


def test_dict_round_trip_is_exact_and_json_safe(fitted, planted):
    model, _ = fitted
    _, (xt, _, _) = planted
    text = json.dumps(model.to_dict(), allow_nan=False)
    again = ApneaModel.from_dict(json.loads(text))
    for a, b in zip(model.predict(xt), again.predict(xt)):
        np.testing.assert_array_equal(a, b)
    assert again.feature_names == apnea_feature_names(False) and again.n_train == 600
    assert again.l2_presence == model.l2_presence and again.method == model.method
    with pytest.raises(ValueError, match="not an apnea model"):
        ApneaModel.from_dict({**model.to_dict(), "scale": [1.0, 2.0]})
    with pytest.raises(ValueError, match="not an apnea model"):
        ApneaModel.from_dict({"center": [0.0]})


def test_grouped_folds_never_split_a_patient():
    rng = np.random.default_rng(4)
    groups = np.asarray([f"P{i}" for i in rng.integers(0, 40, size=150)], dtype=object)
    folds = group_folds(groups, 5, seed=3)
    assert len(folds) == 5
    assert sorted(np.concatenate(folds).tolist()) == list(range(150))  # each row validated exactly once
    seen: dict[str, int] = {}
    for f, rows in enumerate(folds):
        for g in set(groups[rows]):
            assert seen.setdefault(g, f) == f, f"patient {g} in folds {seen[g]} and {f}"
    sizes = [len(r) for r in folds]
    assert max(sizes) - min(sizes) <= 12  # balanced by rows
    assert [r.tolist() for r in group_folds(groups, 5, seed=3)] == [r.tolist() for r in folds]  # seeded
    assert [r.tolist() for r in group_folds(groups, 5, seed=4)] != [r.tolist() for r in folds]
    assert len(group_folds(["a", "a", "b", "c"], 5)) == 3  # no more folds than patients
    with pytest.raises(ValueError, match="at least 2 patients"):
        group_folds(["a", "a", "a"], 5)


def test_token_statistics_shapes_values_and_missing_modality():
    rng = np.random.default_rng(2)
    resp = rng.normal(size=(50, 128)).astype(np.float32)
    stats = token_statistics({"RESP": resp, "BAS": rng.normal(size=(50, 128))})
    assert stats.shape == (512,) and stats.dtype == np.float64
    np.testing.assert_allclose(stats[:128], resp.astype(np.float64).std(axis=0))
    np.testing.assert_allclose(stats[128:256], np.abs(np.diff(resp.astype(np.float64), axis=0)).mean(axis=0))
    assert np.isnan(stats[256:]).all()  # EKG missing: a NaN block
    assert np.isnan(token_statistics(None)).all() and token_statistics(None).shape == (512,)
    assert token_statistics({"EKG": resp}, modalities=("EKG",)).shape == (256,)
    with pytest.raises(ValueError, match=r"RESP token embeddings must be \(tokens, 128\)"):
        token_statistics({"RESP": np.zeros((10, 64))})

    night = rng.normal(size=512).astype(np.float32)
    night[128:256] = np.nan  # RESP missing from the night
    feats = apnea_features(night, {"RESP": resp, "EKG": resp})
    assert feats.shape == (1024,) and len(apnea_feature_names(True)) == 1024
    assert np.isnan(feats[128:256]).all() and np.isfinite(feats[512:]).all()
    assert apnea_features(night, None, use_token_stats=False).shape == (512,)
    assert np.isnan(apnea_features(night, None)[512:]).all()
    with pytest.raises(ValueError, match="512 values"):
        apnea_features(np.zeros(100), None)


def test_missing_features_take_the_training_mean(fitted, planted):
    model, _ = fitted
    _, (xt, _, _) = planted
    row = xt[:1].copy()
    row[0, 256:384] = np.nan
    filled = row.copy()
    filled[0, 256:384] = model.impute[256:384]
    for a, b in zip(model.predict(row), model.predict(filled)):
        np.testing.assert_allclose(a, b)
    # at the training mean a feature adds nothing to the linear predictor
    assert np.allclose(model.standardize(row)[0, 256:384], 0.0)
    p, _ = model.predict(np.tile(model.center, (1, 1)))
    assert p[0] == pytest.approx(expit(model.presence_intercept))
    _, s = model.predict(model.center[None])
    np.testing.assert_allclose(s[0], softmax(model.severity_intercept))


def test_clear_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    ahi = rng.uniform(0, 40, size=30)
    groups = [f"P{i // 2}" for i in range(30)]
    with pytest.raises(ValueError, match="lengths differ"):
        fit_apnea(x, ahi[:-1], groups)
    with pytest.raises(ValueError, match="lengths differ"):
        fit_apnea(x, ahi, groups[:-1])
    with pytest.raises(ValueError, match="negative"):
        fit_apnea(x, np.r_[ahi[:-1], -1.0], groups)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_apnea(x, np.r_[ahi[:-1], np.nan], groups)
    with pytest.raises(ValueError, match="every training study has AHI >= 5"):
        fit_apnea(x, ahi + 5.0, groups)
    with pytest.raises(ValueError, match="every training study has AHI < 5"):
        fit_apnea(x, ahi % 5.0, groups)
    with pytest.raises(ValueError, match="at least 2 patients"):
        fit_apnea(x, ahi, ["same"] * 30)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_apnea(x, ahi, groups, method="svm")
    with pytest.raises(ValueError, match="positive, finite values of C"):
        fit_apnea(x, ahi, groups, grid=(0.0, 1.0))
    model, _ = fit_apnea(x, ahi, groups, folds=3)
    with pytest.raises(ValueError, match="expected 8 features per row"):
        model.predict(np.zeros((2, 9)))
    with pytest.raises(ValueError, match="lengths differ"):
        evaluate_apnea(model, x, ahi[:3])


def test_a_severity_class_absent_from_training_gets_probability_zero():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(80, 6))
    ahi = np.clip(np.exp(1.8 + 0.8 * x[:, 0]) - 1, 0, 29.0)  # nobody severe
    model, cv = fit_apnea(x, ahi, [f"P{i}" for i in range(80)], folds=4)
    assert cv["severity"]["classes_absent"] == ["severe"]
    _, severity = model.predict(rng.normal(size=(10, 6)))
    assert np.all(severity[:, 3] == 0.0) and np.allclose(severity.sum(axis=1), 1.0)
    json.dumps(model.to_dict(), allow_nan=False)
    report = evaluate_apnea(model, x, ahi)
    assert report["severity"]["counts"]["severe"] == 0 and report["presence"]["auroc"] > 0.8
