"""The flag policy: absolute and percentile thresholds, inactive percentiles, sleep findings."""

from __future__ import annotations

import math

import pytest

from gateway.config import FlagOutcome, FlagsConfig, SleepFinding
from gateway.pipeline.flags import evaluate, outcome_code, watched_hazards
from gateway.pipeline.outputs import HazardRow

ROWS = [HazardRow(1041, "death", "death", math.log(2.5)),
        HazardRow(1043, "Heart Failure", "Heart Failure", math.log(0.8)),
        HazardRow(458, "428.0", "Congestive heart failure; nonhypertensive", math.log(1.5))]
SLEEP = {"tst_min": 250.0, "sleep_efficiency_pct": 62.0, "sleep_onset_latency_min": 12.0, "waso_min": 80.0,
         "rem_latency_min": None}


def no_reference(label, value):
    return None


def test_absolute_threshold_flags_with_reason():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", hazard_ratio=2.0, percentile=None),
                                FlagOutcome(label="heart failure", hazard_ratio=2.0, percentile=None)])
    d = evaluate(cfg, ROWS, SLEEP, no_reference)
    assert [f.label for f in d.flags] == ["death"]
    f = d.flags[0]
    assert f.code == "PSG-DEATH" and f.hazard_ratio == pytest.approx(2.5) and f.percentile is None
    assert f.reason == "hazard ratio 2.50 >= 2"
    assert d.flagged and d.notes == []


def test_percentile_inactive_until_reference_is_large_enough():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=90)], percentile_min_reference=100)
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: (99.0, 40))
    assert d.flags == [] and not d.flagged
    expected = "percentile thresholds inactive: the site reference holds 40 studies for this model, 100 needed"
    assert d.notes == [expected]
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: (99.0, 150))
    assert [f.percentile for f in d.flags] == [99.0]
    assert "percentile 99.0 >= 90 (site reference of 150 studies)" in d.flags[0].reason
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: (50.0, 150))
    assert d.flags == []


def test_phecode_labels_and_unknown_outcomes():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="428.0", hazard_ratio=1.2, code="HF428", percentile=None),
                                FlagOutcome(label="Not an outcome", hazard_ratio=1.0, percentile=None)])
    d = evaluate(cfg, ROWS, None, no_reference)
    assert [(f.code, f.phecode) for f in d.flags] == [("HF428", "428.0")]
    assert d.notes == ["outcome 'Not an outcome' is not in this model's diagnosis head or site heads"]


def test_sleep_findings():
    cfg = FlagsConfig(outcomes=[], sleep_findings=[SleepFinding(metric="sleep_efficiency_pct", below=70),
                                                   SleepFinding(metric="tst_min", below=200, text="Short sleep"),
                                                   SleepFinding(metric="rem_latency_min", above=120)])
    d = evaluate(cfg, ROWS, SLEEP, no_reference)
    assert [f.reason for f in d.findings] == ["Sleep efficiency 62.0 < 70"]
    assert d.flagged and d.flags == []


def test_no_diagnosis_head_is_noted():
    d = evaluate(FlagsConfig(), None, SLEEP, no_reference)
    assert d.flags == [] and d.notes == ["no diagnosis head in the model bundle: no risk flags"]


def test_default_policy_and_watched_values():
    cfg = FlagsConfig()
    assert [o.label for o in cfg.outcomes][:2] == ["death", "Dementia"]
    assert all(o.percentile == 95.0 and o.hazard_ratio is None for o in cfg.outcomes)
    assert watched_hazards(cfg, ROWS) == {"death": pytest.approx(math.log(2.5)),
                                          "Heart Failure": pytest.approx(math.log(0.8))}
    assert outcome_code(FlagOutcome(label="Atrial Fibrillation and Flutter")) == "PSG-ATRIAL-FIBRILLATI"[:20]


def test_outcome_needs_a_threshold():
    with pytest.raises(ValueError, match="set hazard_ratio or percentile"):
        FlagOutcome(label="death", percentile=None)


def test_second_look_band_marks_borderline_studies_without_flagging_them():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=95, second_look_percentile=90)],
                      percentile_min_reference=10)
    for percentile, flagged, borderline in ((96.0, True, False), (92.5, False, True), (90.0, False, True),
                                            (89.9, False, False)):
        d = evaluate(cfg, ROWS, SLEEP, lambda label, v, p=percentile: (p, 50))
        assert bool(d.flags) is flagged and bool(d.borderline) is borderline, percentile
        assert not d.flagged or flagged  # a borderline outcome alone sends nothing in flagged_only mode
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: (92.5, 50))
    [b] = d.borderline
    assert (b.label, b.code, b.percentile, b.reference_size) == ("death", "PSG-DEATH", 92.5, 50)
    assert b.reason == "percentile 92.5 in the second-look band 90 to 95 (site reference of 50 studies)"
    assert d.as_dict()["borderline"][0]["code"] == "PSG-DEATH"
    # below the minimum reference, no band either: percentiles are not computed at all
    assert evaluate(cfg, ROWS, SLEEP, lambda label, v: (92.5, 5)).borderline == []


@pytest.mark.parametrize("band", [{"second_look_percentile": 95}, {"second_look_percentile": 97},
                                  {"second_look_percentile": 90, "percentile": None, "hazard_ratio": 2.0}])
def test_a_second_look_band_must_lie_below_a_percentile_threshold(band):
    with pytest.raises(ValueError, match="second_look_percentile must be below percentile"):
        FlagOutcome(label="death", **band)
