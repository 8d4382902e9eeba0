"""Re-fitting the staging head on a site's scored nights (inference/staging_refit.py).

Synthetic token embeddings in which the stage is linearly decodable (a random direction per stage in the
BAS space), 24 half-hour nights of 12 patients: the untrained demo head stages them badly; after the
re-fit the validation agreement is high. Also: the caller's head is untouched, the same seed gives the
same weights, unscored epochs take no part, missing modalities work, the split keeps patients whole,
and epoch probabilities are the engine's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.bundle import load_bundle, make_demo_bundle
from inference.engine import Engine
from inference.hypnogram import epoch_probabilities
from inference.models import HeadConfig, StagingHead
from inference.results import MODALITIES, STAGES
from inference.staging_refit import (
    RefitReport,
    StagingExample,
    predict_epochs,
    refit_staging,
    split_by_group,
    staging_scores,
)

pytestmark = pytest.mark.slow

EPOCHS_PER_NIGHT = 60  # 0.5 h: 360 tokens
# Plausible transitions between runs of one stage (W, N1, N2, N3, REM).
NEXT = {0: [1, 1, 2], 1: [2, 2, 0], 2: [3, 4, 1, 0], 3: [2, 2, 4], 4: [2, 1, 0]}


def _stages(rng: np.random.Generator, n: int) -> np.ndarray:
    out, stage = [], 0
    while len(out) < n:
        out += [stage] * int(rng.integers(3, 16))
        stage = int(rng.choice(NEXT[stage]))
    return np.asarray(out[:n], dtype=np.int64)


def _night(rng: np.random.Generator, directions: np.ndarray, stages: np.ndarray, modalities=("BAS", "RESP")):
    tokens = {m: rng.normal(scale=0.5, size=(stages.size * 6, 128)).astype(np.float32) for m in modalities}
    tokens["BAS"] += (np.repeat(directions[stages], 6, axis=0) * 2.0).astype(np.float32)
    return tokens


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> StagingHead:
    bundle = load_bundle(make_demo_bundle(tmp_path_factory.mktemp("bundle") / "b"))
    assert bundle.staging is not None
    return bundle.staging


@pytest.fixture(scope="module")
def nights() -> list[StagingExample]:
    rng = np.random.default_rng(11)
    directions = rng.normal(size=(len(STAGES), 128))
    out = []
    for i in range(24):
        stages = _stages(rng, EPOCHS_PER_NIGHT)
        # every third night without RESP: the modality mask handles it
        modalities = ("BAS",) if i % 3 == 2 else ("BAS", "RESP")
        out.append(StagingExample(_night(rng, directions, stages, modalities), stages, group=f"P{i // 2}"))
    return out


@pytest.fixture(scope="module")
def refit(head, nights):
    state = {k: v.clone() for k, v in head.state_dict().items()}
    train, val = split_by_group([n.group for n in nights], val_fraction=0.25, seed=0)
    new, report = refit_staging(head, [nights[i] for i in train], [nights[i] for i in val],
                                epochs=2, lr=1e-3, seed=0)
    return state, new, report, (train, val)


def test_refit_turns_a_miscalibrated_head_into_a_good_one(refit):
    _, new, report, (train, val) = refit
    assert isinstance(report, RefitReport)
    assert report.train_studies == len(train) == 18 and report.val_studies == len(val) == 6
    before, after = report.before, report.after
    assert before["accuracy"] < 0.5 and before["cohen_kappa"] < 0.2  # the untrained start
    assert after["cohen_kappa"] > 0.6 and after["cohen_kappa"] > before["cohen_kappa"] + 0.3
    assert after["accuracy"] > 0.8 and after["macro_f1"] > before["macro_f1"] + 0.3
    for scores in (before, after):
        assert scores["n_epochs_scored"] == 6 * EPOCHS_PER_NIGHT
        assert np.asarray(scores["confusion"]).shape == (5, 5)
        assert np.sum(scores["confusion"]) == scores["n_epochs_scored"]
        assert set(scores["per_stage_f1"]) == set(STAGES)
    assert 1 <= report.best_epoch <= report.epochs_run <= 2
    assert len(report.history) == report.epochs_run
    assert {"epoch", "train_loss", "val_macro_f1", "val_cohen_kappa", "val_accuracy"} <= set(report.history[0])
    assert report.history[report.best_epoch - 1]["val_macro_f1"] == after["macro_f1"]
    assert report.class_weights is not None and len(report.class_weights) == 5
    assert not new.training
    assert new.lstm.weight_ih_l0.dtype == torch.float32


def test_early_stopping_keeps_the_starting_weights_when_nothing_beats_them(refit, nights):
    _, new, report, (train, val) = refit
    assert report.after["macro_f1"] == 1.0  # nothing can beat a perfect start
    again, rep = refit_staging(new, [nights[i] for i in train[:3]], [nights[i] for i in val], epochs=5,
                               lr=1e-3, patience=1)
    assert rep.epochs_run == 1 and rep.best_epoch == 0 and rep.after == rep.before
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new.state_dict().items())


def test_the_callers_head_is_never_modified(head, refit):
    state, new, _, _ = refit
    assert not head.training  # as loaded
    after = head.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert any(not torch.equal(state[k], new.state_dict()[k]) for k in state)


def test_returned_weights_reproduce_the_reported_scores(refit, nights):
    _, new, report, (_, val) = refit
    truth = np.concatenate([nights[i].labels for i in val])
    pred = np.concatenate([predict_epochs(new, nights[i].tokens).argmax(axis=1) for i in val])
    assert staging_scores(truth, pred) == report.after


def test_same_seed_same_weights_and_rng_untouched(head, nights):
    train, val = nights[:4], nights[20:22]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, ra = refit_staging(head, train, val, epochs=1, lr=1e-3, seed=7)
    after_rng = torch.rand(3)  # the caller's RNG stream continues as if nothing had run
    assert torch.equal(after_rng, expected_next)
    b, rb = refit_staging(head, train, val, epochs=1, lr=1e-3, seed=7)
    c, _ = refit_staging(head, train, val, epochs=1, lr=1e-3, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra.history[0]["train_loss"] == rb.history[0]["train_loss"]
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_unscored_epochs_take_no_part(head, nights):
    unscored = [StagingExample(n.tokens, np.full(EPOCHS_PER_NIGHT, -1), n.group) for n in nights[:3]]
    with pytest.raises(ValueError, match="no scored epochs in the training studies"):
        refit_staging(head, unscored, nights[20:22], epochs=1)
    with pytest.raises(ValueError, match="no scored epochs in the validation studies"):
        refit_staging(head, nights[:2], unscored, epochs=1)
    # an unscored night among scored ones changes nothing: same weights, same loss
    a, ra = refit_staging(head, nights[:3], nights[20:22], epochs=1, lr=1e-3, seed=1)
    b, rb = refit_staging(head, [nights[0], unscored[2], nights[1], nights[2]], nights[20:22], epochs=1,
                          lr=1e-3, seed=1)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in (ra.history[0], rb.history[0])]
    assert strip[0] == strip[1]  # same training loss and validation scores
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert rb.train_epochs_scored == ra.train_epochs_scored == 3 * EPOCHS_PER_NIGHT


def test_labels_are_checked(head, nights):
    bad = StagingExample(nights[0].tokens, np.full(EPOCHS_PER_NIGHT, 5), "P0")
    with pytest.raises(ValueError, match=r"labels must be -1 \(unscored\) or 0..4"):
        refit_staging(head, [bad], nights[20:22], epochs=1)
    with pytest.raises(ValueError, match="unknown modalities"):
        refit_staging(head, [StagingExample({"EEG": nights[0].tokens["BAS"]}, nights[0].labels)], nights[20:22])
    with pytest.raises(ValueError, match="no validation studies"):
        refit_staging(head, nights[:2], [])
    uneven = StagingExample({"BAS": nights[0].tokens["BAS"], "RESP": nights[0].tokens["BAS"][:-6]}, nights[0].labels)
    with pytest.raises(ValueError, match="differ in token count"):
        refit_staging(head, [uneven], nights[20:22])


def test_split_by_group_keeps_patients_whole():
    rng = np.random.default_rng(3)
    groups = [f"P{g}" for g in rng.integers(0, 30, size=100)]
    train, val = split_by_group(groups, val_fraction=0.2, seed=5)
    assert sorted(train + val) == list(range(100))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert len({groups[i] for i in val}) == round(0.2 * len(set(groups)))
    assert split_by_group(groups, 0.2, seed=5) == (train, val)
    assert split_by_group(groups, 0.2, seed=6) != (train, val)
    # the split depends on the patients, not on the order of the rows
    order = rng.permutation(100)
    _, v2 = split_by_group([groups[i] for i in order], 0.2, seed=5)
    assert {groups[order[i]] for i in v2} == {groups[i] for i in val}
    assert split_by_group(["a", "b"], 0.9) == ([0], [1]) or split_by_group(["a", "b"], 0.9) == ([1], [0])
    with pytest.raises(ValueError, match="at least 2 patients"):
        split_by_group(["a", "a"], 0.2)
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_group(["a", "b"], 1.0)


def test_predict_epochs_matches_the_engine_including_segments(tmp_path_factory):
    """predict_epochs is the engine's staging: same numbers, long nights cut in the same segments."""
    bundle = load_bundle(make_demo_bundle(tmp_path_factory.mktemp("bundle") / "b"))
    torch.manual_seed(0)
    short = StagingHead(HeadConfig(max_seq_length=100)).eval()  # 250 tokens -> 3 segments
    rng = np.random.default_rng(0)
    tokens = {"BAS": rng.normal(size=(250, 128)).astype(np.float32),
              "EKG": rng.normal(size=(250, 128)).astype(np.float32)}
    stacked = torch.zeros(1, 4, 250, 128)
    stacked[0, 0], stacked[0, 2] = torch.from_numpy(tokens["BAS"]), torch.from_numpy(tokens["EKG"])
    mask = torch.tensor([[m not in tokens for m in MODALITIES]])
    for staging in (bundle.staging, short):
        bundle.staging = staging
        engine = Engine(bundle)
        with torch.inference_mode():
            expected = epoch_probabilities(engine._stage(stacked, mask))
        got = predict_epochs(staging, tokens)
        assert got.shape == (41, 5)  # 250 tokens: 41 whole epochs
        np.testing.assert_allclose(got, expected, atol=1e-6)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    short.train()
    predict_epochs(short, tokens)
    assert short.training  # mode restored


def test_staging_scores():
    truth = np.array([0, 0, 1, 2, 2, 2, 4, 4])
    perfect = staging_scores(truth, truth)
    assert perfect["accuracy"] == 1.0 and perfect["cohen_kappa"] == pytest.approx(1.0)
    assert perfect["macro_f1"] == 1.0 and perfect["per_stage_f1"]["N3"] is None  # N3 never scored
    all_wake = staging_scores(truth, np.zeros_like(truth))
    assert all_wake["cohen_kappa"] == pytest.approx(0.0) and all_wake["accuracy"] == 0.25
    assert all_wake["confusion"][2][0] == 3 and all_wake["n_epochs_scored"] == 8
    from sklearn.metrics import cohen_kappa_score, f1_score

    pred = np.array([0, 1, 1, 2, 3, 2, 4, 2])
    s = staging_scores(truth, pred)
    assert s["cohen_kappa"] == pytest.approx(cohen_kappa_score(truth, pred))
    assert s["macro_f1"] == pytest.approx(f1_score(truth, pred, labels=[0, 1, 2, 4], average="macro"))
