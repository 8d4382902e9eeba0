"""The flag policy: percentile thresholds (inactive below the minimum reference), absolute log-hazard
thresholds only for calibrated outcomes, risk flags withheld for poor signals or a missing modality,
the second-look band, sleep findings."""

from __future__ import annotations

import math

import pytest

from gateway.config import FlagOutcome, FlagsConfig, SleepFinding
from gateway.pipeline.flags import (
    absolute_thresholds_refused,
    evaluate,
    outcome_code,
    watched_hazards,
    withheld_reasons,
)
from gateway.pipeline.outputs import HazardRow

ROWS = [HazardRow(1041, "death", "death", math.log(2.5)),
        HazardRow(1043, "Heart Failure", "Heart Failure", math.log(0.8)),
        HazardRow(458, "428.0", "Congestive heart failure; nonhypertensive", math.log(1.5))]
SLEEP = {"tst_min": 250.0, "sleep_efficiency_pct": 62.0, "sleep_onset_latency_min": 12.0, "waso_min": 80.0,
         "rem_latency_min": None}


def no_reference(label, value):
    return None


def test_absolute_log_hazard_threshold_flags_calibrated_outcomes_only():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", log_hazard=math.log(2.0), percentile=None),
                                FlagOutcome(label="heart failure", log_hazard=-5.0, percentile=None)])
    d = evaluate(cfg, ROWS, SLEEP, no_reference, calibrated={"death", "Heart Failure"})
    assert [f.label for f in d.flags] == ["death", "heart failure"]
    f = d.flags[0]
    assert f.code == "PSG-DEATH" and f.hazard_ratio == pytest.approx(2.5) and f.percentile is None
    assert f.reason == "log-hazard 0.92 >= 0.693147 (calibrated)"
    assert d.flagged and d.notes == []
    # Not declared calibrated: the threshold never applies and no hazard ratio is reported.
    d = evaluate(cfg, ROWS, SLEEP, no_reference, calibrated={"death"})
    assert [f.label for f in d.flags] == ["death"]
    assert [o.status for o in d.outcomes] == ["flagged", "not flagged"]


def test_a_percentile_flag_reports_no_hazard_ratio_unless_calibrated():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=90)], percentile_min_reference=10)
    assert evaluate(cfg, ROWS, SLEEP, lambda label, v: (99.0, 40)).flags[0].hazard_ratio is None
    flag = evaluate(cfg, ROWS, SLEEP, lambda label, v: (99.0, 40), calibrated={"death"}).flags[0]
    assert flag.hazard_ratio == pytest.approx(2.5)


def test_hazard_ratio_thresholds_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="hazard_ratio is no longer accepted: the diagnosis head's exp"):
        FlagOutcome.model_validate({"label": "death", "hazard_ratio": 2.0})


def test_absolute_thresholds_are_refused_for_outcomes_the_bundle_does_not_declare_calibrated():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", log_hazard=1.0),
                                FlagOutcome(label="Heart Failure", log_hazard=1.0, percentile=None),
                                FlagOutcome(label="Stroke")])
    outcomes = [("death", "death"), ("428.2", "Heart Failure"), ("433", "Stroke")]
    refused = absolute_thresholds_refused(cfg, outcomes, calibrated={"death"})
    assert refused == [("flags.outcomes 'Heart Failure': log_hazard needs an outcome the model bundle declares "
                        "calibrated (bundle.json calibrated_outcomes); this bundle does not")]
    assert absolute_thresholds_refused(cfg, outcomes, calibrated={"death", "428.2"}) == []


def test_watched_outcomes_list_every_outcome_with_percentile_and_status():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=95, second_look_percentile=90),
                                FlagOutcome(label="Heart Failure", percentile=95)], percentile_min_reference=10)
    values = {"death": (93.0, 20), "Heart Failure": (40.0, 20)}
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: values[label])
    assert [(o.label, o.percentile, o.reference_size, o.status) for o in d.outcomes] == [
        ("death", 93.0, 20, "borderline"), ("Heart Failure", 40.0, 20, "not flagged")]
    doc = d.as_dict()
    assert doc["outcomes"][0]["status"] == "borderline" and doc["risk_flags"] == {
        "suppressed": False, "reasons": [], "kinds": []}


def test_risk_flags_are_withheld_for_uninterpretable_signals_or_a_missing_modality():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=50, second_look_percentile=10)],
                      percentile_min_reference=1, sleep_findings=[SleepFinding(metric="sleep_efficiency_pct",
                                                                               below=70)])
    good = {"quality": {"interpretable": True, "reasons": []}, "missing_modalities": []}
    assert withheld_reasons(cfg, good) == {}
    bad = {"quality": {"interpretable": False, "reasons": ["EKG: no usable channel (ECG: flat)"]},
           "missing_modalities": ["EMG"]}
    reasons = withheld_reasons(cfg, bad)
    assert reasons == {"quality": "signals not interpretable: EKG: no usable channel (ECG: flat)",
                       "modality": "modality missing (EMG): the heads were trained on studies that had it"}
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: (99.0, 40), withheld=reasons)
    assert d.flags == [] and d.borderline == [] and [o.status for o in d.outcomes] == ["withheld"]
    assert d.notes[0].startswith("no risk flags for this study: signals not interpretable: EKG")
    assert [f.metric for f in d.findings] == ["sleep_efficiency_pct"]  # the hypnogram's findings still stand
    assert d.as_dict()["risk_flags"]["kinds"] == ["quality", "modality"]
    # a site whose bundle was trained without EMG says so
    assert withheld_reasons(FlagsConfig(require_modalities=["BAS", "RESP", "EKG"]),
                            {"missing_modalities": ["EMG"]}) == {}


def test_percentile_inactive_until_reference_is_large_enough():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=90)], percentile_min_reference=100)
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: (99.0, 40))
    assert d.flags == [] and not d.flagged
    expected = ("percentile thresholds inactive: the site reference holds 40 studies for this model, 100 needed; "
                "no percentile flag is raised until then")
    assert d.notes == [expected]
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: (99.0, 150))
    assert [f.percentile for f in d.flags] == [99.0]
    assert "percentile 99.0 >= 90 (site reference of 150 studies)" in d.flags[0].reason
    d = evaluate(cfg, ROWS, SLEEP, lambda label, v: (50.0, 150))
    assert d.flags == []


def test_phecode_labels_and_unknown_outcomes():
    cfg = FlagsConfig(outcomes=[FlagOutcome(label="428.0", log_hazard=0.1, code="HF428", percentile=None),
                                FlagOutcome(label="Not an outcome", log_hazard=0.0, percentile=None)])
    d = evaluate(cfg, ROWS, None, no_reference, calibrated={"428.0"})
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
    assert all(o.percentile == 95.0 and o.log_hazard is None for o in cfg.outcomes)
    assert cfg.require_modalities == ["BAS", "RESP", "EKG", "EMG"]
    assert watched_hazards(cfg, ROWS) == {"death": pytest.approx(math.log(2.5)),
                                          "Heart Failure": pytest.approx(math.log(0.8))}
    assert outcome_code(FlagOutcome(label="Atrial Fibrillation and Flutter")) == "PSG-ATRIAL-FIBRILLATI"[:20]


def test_outcome_needs_a_threshold():
    with pytest.raises(ValueError, match="set percentile or log_hazard"):
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
                                  {"second_look_percentile": 90, "percentile": None, "log_hazard": 2.0}])
def test_a_second_look_band_must_lie_below_a_percentile_threshold(band):
    with pytest.raises(ValueError, match="second_look_percentile must be below percentile"):
        FlagOutcome(label="death", **band)
