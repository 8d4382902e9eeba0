"""Reference hypnogram from stage annotations, and agreement (accuracy, Cohen's kappa, confusion, F1)."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.pipeline.scoring import UNSCORED, Agreement, agreement, reference_hypnogram, stage_of
from gateway.readers.edf import read_edf
from gateway.recording import Annotation


@pytest.mark.parametrize(("text", "stage"), [
    ("Sleep stage W", "W"), ("Sleep stage 1", "N1"), ("Sleep stage 2", "N2"), ("Sleep stage 3", "N3"),
    ("Sleep stage 4", "N3"), ("Sleep stage R", "REM"), ("Sleep stage N1", "N1"), ("Sleep stage N2", "N2"),
    ("Sleep stage N3", "N3"), ("sleep stage rem", "REM"), ("Stage 1", "N1"), ("Stage 4", "N3"),
    ("Stage W", "W"), ("Stage REM", "REM"), ("Stage N2", "N2"), ("stage_r", "REM"), ("W", "W"), ("Wake", "W"),
    ("AWAKE", "W"), ("N1", "N1"), ("n3", "N3"), ("NREM2", "N2"), ("REM", "REM"), ("R", "REM"),
    ("SLEEP-S0", "W"), ("SLEEP-S1", "N1"), ("SLEEP-S2", "N2"), ("SLEEP-S3", "N3"), ("SLEEP-S4", "N3"),
    ("SLEEP-REM", "REM"), ("REM sleep", "REM"), (" Stage: 2 ", "N2"),
    ("Sleep stage ?", UNSCORED), ("?", UNSCORED), ("Movement time", UNSCORED), ("SLEEP-MT", UNSCORED),
    ("Unscored", UNSCORED), ("SLEEP-UNSCORED", UNSCORED), ("unknown", UNSCORED),
    ("Lights off", None), ("Arousal", None), ("Sleep spindle", None), ("2", None), ("", None),
    ("Stage", None), ("Obstructive Apnea", None), ("REMARK", None),
])
def test_stage_spellings(text, stage):
    assert stage_of(text) is stage if stage in (None, UNSCORED) else stage_of(text) == stage


def test_runs_with_durations_fill_their_epochs():
    annotations = [
        Annotation(0.0, 90.0, "Sleep stage W"),
        Annotation(45.0, None, "Lights off"),  # not a stage
        Annotation(90.0, 60.0, "Sleep stage 1"),
        Annotation(150.0, 30.0, "Movement time"),
        Annotation(180.0, 60.0, "Sleep stage 4"),
        Annotation(240.0, None, "R"),  # no duration: one epoch
    ]
    assert reference_hypnogram(annotations) == ["W", "W", "W", "N1", "N1", None, "N3", "N3", "REM"]
    assert reference_hypnogram(annotations, n_epochs=4) == ["W", "W", "W", "N1"]
    assert reference_hypnogram(annotations, n_epochs=11) == ["W", "W", "W", "N1", "N1", None, "N3", "N3", "REM",
                                                             None, None]


def test_unaligned_annotations_land_on_the_epochs_they_mostly_cover():
    annotations = [Annotation(10.0, 30.0, "N2"), Annotation(40.0, 30.0, "N3"), Annotation(95.0, 0.0, "W")]
    # epoch midpoints 15, 45, 75, 105: N2 covers 15, N3 covers 45, W (one epoch from 95) covers 105
    assert reference_hypnogram(annotations) == ["N2", "N3", None, "W"]


def test_later_annotation_overrides_and_order_does_not_matter_otherwise():
    annotations = [Annotation(60.0, 30.0, "N2"), Annotation(0.0, 90.0, "W"), Annotation(30.0, 30.0, "REM")]
    assert reference_hypnogram(annotations) == ["W", "REM", "W"]


def test_no_stage_annotations_is_none():
    assert reference_hypnogram([]) is None
    assert reference_hypnogram([Annotation(0.0, None, "Lights off"), Annotation(10.0, 3.0, "Arousal")]) is None


def test_sleep_edf_hypnogram_counts(reference_dir):
    recording = read_edf(reference_dir / "real" / "SC4001EC-Hypnogram.edf")
    hypnogram = reference_hypnogram(recording.annotations)
    seconds: Counter[str] = Counter()
    for a in recording.annotations:
        seconds[a.text] += a.duration_s
    assert len(hypnogram) == sum(seconds.values()) / 30 == 2880  # 24 h of 30-s epochs
    counts = Counter(hypnogram)
    assert counts["W"] == seconds["Sleep stage W"] / 30 == 1997
    assert counts["N1"] == seconds["Sleep stage 1"] / 30 == 58
    assert counts["N2"] == seconds["Sleep stage 2"] / 30 == 250
    assert counts["N3"] == (seconds["Sleep stage 3"] + seconds["Sleep stage 4"]) / 30 == 220
    assert counts["REM"] == seconds["Sleep stage R"] / 30 == 125
    assert counts[None] == seconds["Sleep stage ?"] / 30 == 230
    assert hypnogram[0] == "W" and hypnogram[-1] is None
    # the night against itself
    perfect = agreement([s or "W" for s in hypnogram], hypnogram)
    assert perfect.epochs == 2880 - 230 and perfect.accuracy == 1.0 and perfect.kappa == pytest.approx(1.0)


def test_kappa_by_hand():
    reference = ["W", "W", "N1", "N2", "N2", "N3", "REM", "REM", "N2", "W", None, "N2"]
    predicted = ["W", "N1", "N1", "N2", "N3", "N3", "R", "N2", "N2", "W", "W", None]
    result = agreement(predicted, reference)
    # 10 epochs compared (the last two have a None on one side). Confusion, reference -> predicted:
    #   W: W 2, N1 1 | N1: N1 1 | N2: N2 2, N3 1 | N3: N3 1 | REM: REM 1, N2 1
    # observed agreement 7/10; row sums W3 N1 1 N2 3 N3 1 REM 2, column sums W2 N1 2 N2 3 N3 2 REM 1;
    # expected agreement (3*2 + 1*2 + 3*3 + 1*2 + 2*1) / 100 = 0.21; kappa = (0.7 - 0.21) / (1 - 0.21)
    assert result.epochs == 10
    assert result.accuracy == pytest.approx(0.7)
    assert result.kappa == pytest.approx(0.49 / 0.79)
    assert result.confusion["W"] == {"W": 2, "N1": 1, "N2": 0, "N3": 0, "REM": 0}
    assert result.confusion["REM"] == {"W": 0, "N1": 0, "N2": 1, "N3": 0, "REM": 1}
    assert result.confusion["N2"]["N3"] == 1 and result.confusion["N1"]["N1"] == 1
    assert sum(sum(row.values()) for row in result.confusion.values()) == 10
    # F1 = 2 TP / (row + column)
    assert result.f1 == pytest.approx({"W": 4 / 5, "N1": 2 / 3, "N2": 4 / 6, "N3": 2 / 3, "REM": 2 / 3})


def test_agreement_edge_cases():
    empty = agreement([], [])
    assert empty == Agreement(0, None, None, empty.confusion, {s: None for s in ("W", "N1", "N2", "N3", "REM")})
    single = agreement(["W", "W"], ["W", "W"])  # kappa undefined: one class on both sides
    assert single.accuracy == 1.0 and single.kappa is None and single.f1["W"] == 1.0 and single.f1["N1"] is None
    shorter = agreement(["W", "N2", "N2", "N2"], ["W", "N2"])  # compared up to the shorter one
    assert shorter.epochs == 2 and shorter.kappa == pytest.approx(1.0)
    opposite = agreement(["W", "N2"], ["N2", "W"])
    assert opposite.accuracy == 0.0 and opposite.kappa == pytest.approx(-1.0)
    assert set(opposite.to_dict()) == {"epochs", "accuracy", "kappa", "confusion", "f1"}
