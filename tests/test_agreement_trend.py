"""The scorer of a recording (sidecar > EDF+ technician / DICOM Operators' Name) and model-versus-scorer
agreement per scorer over time, with drift alerts (gateway/pipeline/agreement_trend.py)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pipeline_env import pipeline_env, spool_file
from pyedflib import highlevel

from gateway.pipeline.agreement_trend import (
    AgreementRow,
    agreement_by_scorer,
    agreement_rows,
)
from gateway.pipeline.scoring import STAGES, agreement
from gateway.pipeline.steps import decode_inputs
from gateway.readers.edf_header import technician
from gateway.synthetic.dicom_study import write_psg_study
from gateway.synthetic.night import write_synthetic_night

HOURS = 0.1  # 12 epochs
DAY0 = datetime(2025, 1, 6, 22, 0)


@pytest.fixture(scope="module")
def night_bytes(tmp_path_factory) -> bytes:
    return write_synthetic_night(tmp_path_factory.mktemp("n") / "n.edf", hours=0.02, seed=3).read_bytes()


def _with_technician(night_bytes: bytes, value: str) -> bytes:
    """The EDF+ with the technician subfield of its 'local recording identification' replaced."""
    data = bytearray(night_bytes)
    parts = data[88:168].decode("latin-1").split()
    assert parts[0] == "Startdate" and parts[3] == "X"  # the synthetic night leaves it unknown
    parts[3] = value
    data[88:168] = " ".join(parts).encode("latin-1").ljust(80)
    return bytes(data)


def _edf(tmp_path: Path, data: bytes, sidecar: dict | None = None) -> Path:
    path = tmp_path / "night.edf"
    path.write_bytes(data)
    if sidecar is not None:
        (tmp_path / "night.edf.json").write_text(json.dumps(sidecar))
    return path


# ---- where the scorer comes from --------------------------------------------------------------------------------
def test_technician_subfield_of_the_edfplus_recording_field():
    assert technician("Startdate 02-MAR-2002 PSG-1234/2002 J_Smith Nihon_Kohden") == "J Smith"
    assert technician("Startdate 02-MAR-2002 X X X") is None
    assert technician("Startdate 02-MAR-2002 X") is None  # no technician subfield
    assert technician("some free text from a plain EDF writer") is None  # not the EDF+ layout


def test_edf_header_technician_is_the_scorer(tmp_path, night_bytes):
    recording = decode_inputs([_edf(tmp_path, _with_technician(night_bytes, "J_Smith"))])
    assert recording.identifiers.scorer == "J Smith"
    assert "J Smith" not in repr(recording.identifiers) and "J Smith" not in repr(recording)
    unknown = decode_inputs([_edf(tmp_path, night_bytes)])
    assert unknown.identifiers.scorer is None  # the header's X: unknown


def test_sidecar_scorer_wins_over_the_header(tmp_path, night_bytes):
    data = _with_technician(night_bytes, "J_Smith")
    assert decode_inputs([_edf(tmp_path, data, {"scorer": "K. Jones"})]).identifiers.scorer == "K. Jones"
    # null supplies nothing: the header's technician stays; "X" states that the scorer is unknown
    assert decode_inputs([_edf(tmp_path, data, {"scorer": None})]).identifiers.scorer == "J Smith"
    assert decode_inputs([_edf(tmp_path, data, {"scorer": "x"})]).identifiers.scorer is None
    # the scorer is a staff name: cut (with a warning), never refused; control characters removed
    long = decode_inputs([_edf(tmp_path, data, {"scorer": "Tech\r\nNight " + "y" * 100})])
    assert long.identifiers.scorer == ("Tech Night " + "y" * 100)[:64]
    assert "control characters removed from the scorer" in long.warnings
    assert "scorer longer than 64 characters: truncated" in long.warnings


def test_dicom_operators_name_is_the_scorer_and_a_sidecar_wins(tmp_path):
    folder = tmp_path / "study"
    write_psg_study(folder, hours=0.02, seed=4, operator="Smith^Jane")
    assert decode_inputs([folder]).identifiers.scorer == "Smith^Jane"
    (tmp_path / "study.json").write_text(json.dumps({"scorer": "Night team B"}))
    assert decode_inputs([folder]).identifiers.scorer == "Night team B"
    without = tmp_path / "plain"
    write_psg_study(without, hours=0.02, seed=4)
    assert decode_inputs([without]).identifiers.scorer is None


# ---- agreement per scorer, by hand ------------------------------------------------------------------------------
def _row(key: str, scorer: str | None, day: int, kappa: float | None) -> AgreementRow:
    return AgreementRow(study_key=key, scorer=scorer, when=DAY0 + timedelta(days=day), kappa=kappa, epochs=100)


# A keeps agreeing; B drifts (0.8, 0.6, 0.5, 0.4); C is steady below A; E is low but has 2 studies only;
# one study has no known scorer. Lab mean: (4*0.8 + 2.3 + 3*0.7 + 0.6 + 2*0.3) / 14 = 8.8 / 14.
TABLE = [
    _row("a1", "A", 0, 0.8), _row("a2", "A", 2, 0.8), _row("a3", "A", 4, 0.8), _row("a4", "A", 6, 0.8),
    _row("b1", "B", 1, 0.8), _row("b2", "B", 3, 0.6), _row("b3", "B", 5, 0.5), _row("b4", "b ", 7, 0.4),
    _row("c1", "C", 1, 0.7), _row("c2", "C", 3, 0.7), _row("c3", "C", 5, 0.7),
    _row("u1", None, 2, 0.6),
    _row("e1", "E", 8, 0.3), _row("e2", "E", 9, 0.3),
]
LAB = 8.8 / 14


def test_one_drifting_scorer_raises_the_alert_with_its_numbers():
    rows = TABLE[:]
    random.Random(7).shuffle(rows)  # any order in, time order out
    trend = agreement_by_scorer(rows, window=3, drop=0.1)
    assert trend.lab.studies == 14 and trend.lab.mean_kappa == pytest.approx(LAB)
    assert [s.scorer for s in trend.scorers] == ["A", "B", "C", "E", None]
    b = trend.scorer("B")
    assert b is trend.scorer("  b") and b.studies == 4 and b.mean_kappa == pytest.approx(2.3 / 4)
    assert [p.study_key for p in b.series] == ["b1", "b2", "b3", "b4"]
    assert [p.rolling_kappa for p in b.series] == pytest.approx([0.8, 0.7, 1.9 / 3, 0.5])
    assert [p.window_studies for p in b.series] == [1, 2, 3, 3]
    assert b.first == DAY0 + timedelta(days=1) and b.last == DAY0 + timedelta(days=7)

    assert [a.scorer for a in trend.alerts] == ["B"]
    alert = trend.alerts[0]
    assert alert is b.alert
    assert alert.rolling_kappa == pytest.approx(0.5) and alert.lab_kappa == pytest.approx(LAB)
    assert alert.difference == pytest.approx(LAB - 0.5)  # 0.1286 > 0.1
    assert (alert.window, alert.window_studies, alert.drop) == (3, 3, 0.1)
    assert alert.since == DAY0 + timedelta(days=3) and alert.until == DAY0 + timedelta(days=7)
    assert alert.message == "scorer B: rolling kappa 0.50 over the last 3 studies is 0.13 below the lab's 0.63 " \
                            "(alert above 0.10)"
    # the others: A and C above or near the lab; E too few studies for a full window; the unknown scorer
    # is never alerted
    for name, mean in (("A", 0.8), ("C", 0.7), ("E", 0.3), (None, 0.6)):
        entry = trend.scorer(name)
        assert entry.alert is None and entry.mean_kappa == pytest.approx(mean), name
    assert trend.scorer("E").rolling_kappa == pytest.approx(0.3)


def test_min_studies_window_and_drop_decide_who_is_alerted():
    trend = agreement_by_scorer(TABLE, window=3, drop=0.1, min_studies=2)
    assert [a.scorer for a in trend.alerts] == ["E", "B"]  # largest difference first
    assert trend.alerts[0].window_studies == 2
    assert agreement_by_scorer(TABLE, window=3, drop=0.13).alerts == ()  # 0.1286 is not more than 0.13
    # a window of 4: B's rolling kappa is its mean, 0.575, 0.054 below the lab: no alert
    assert agreement_by_scorer(TABLE, window=4, drop=0.1).alerts == ()
    assert agreement_by_scorer(TABLE).window == 20 and agreement_by_scorer(TABLE).drop == 0.1
    for bad in ({"window": 0}, {"drop": -0.1}, {"drop": float("nan")}, {"min_studies": 0}):
        with pytest.raises(ValueError):
            agreement_by_scorer(TABLE, **bad)


def test_undefined_kappa_counts_as_a_study_but_not_in_the_means():
    rows = [_row("x1", "X1", 0, 0.5), _row("x2", "X1", 1, None), _row("x3", "X1", 2, 0.7)]
    s = agreement_by_scorer(rows, window=2).scorers[0]
    assert (s.studies, s.kappa_studies, s.epochs) == (3, 2, 300)
    assert s.mean_kappa == pytest.approx(0.6) and [p.study_key for p in s.series] == ["x1", "x3"]


def test_per_stage_agreement_pools_the_confusion_matrices():
    # study 1: 10 epochs scored W, the model says N2 for 2 of them; 10 N2 agreed
    # study 2: 5 W agreed; 15 scored N2, the model says W for 5 of them
    one = agreement(["W"] * 8 + ["N2"] * 12, ["W"] * 10 + ["N2"] * 10)
    two = agreement(["W"] * 10 + ["N2"] * 10, ["W"] * 5 + ["N2"] * 15)
    rows = [AgreementRow.from_metrics("s1", "A", DAY0, {**one.to_dict(), "scored": ["W"] * 20}),
            AgreementRow.from_metrics("s2", "A", DAY0 + timedelta(days=1), two.to_dict())]
    assert rows[0].epochs == 20 and rows[0].kappa == pytest.approx(one.kappa)
    stages = agreement_by_scorer(rows).scorer("A").per_stage
    assert list(stages) == list(STAGES)
    # F1: the mean of the studies' (16/18 and 10/15 for W; 20/22 and 20/25 for N2)
    assert stages["W"].f1 == pytest.approx((16 / 18 + 10 / 15) / 2) and stages["W"].f1_studies == 2
    assert stages["N2"].f1 == pytest.approx((20 / 22 + 20 / 25) / 2)
    # kappa of W against the rest over the 40 pooled epochs: 13 both, 15 scored W, 18 predicted W, 20 neither:
    # observed 33/40, expected (15*18 + 25*22)/1600 = 0.5125, kappa 0.3125/0.4875 = 25/39
    assert stages["W"].kappa == pytest.approx(25 / 39) and stages["W"].scored_epochs == 15
    assert stages["N2"].kappa == pytest.approx(25 / 39) and stages["N2"].scored_epochs == 25
    assert stages["N1"].kappa is None and stages["N1"].f1 is None and stages["N1"].scored_epochs == 0


def test_empty_input():
    trend = agreement_by_scorer([])
    assert trend.scorers == () and trend.alerts == () and trend.scorer("A") is None
    assert (trend.lab.studies, trend.lab.kappa_studies, trend.lab.epochs, trend.lab.mean_kappa) == (0, 0, 0, None)
    assert all(s.f1 is None and s.kappa is None for s in trend.lab.per_stage.values())


# ---- through the real pipeline ----------------------------------------------------------------------------------
_ANNOTATION = {"W": "Sleep stage W", "N1": "Sleep stage 1", "N2": "Sleep stage 2", "N3": "Sleep stage 3",
               "REM": "Sleep stage R"}


def _scored_night(folder: Path, seed: int, technician_field: str | None) -> bytes:
    night = write_synthetic_night(folder / f"n{seed}.edf", hours=HOURS, seed=seed)
    signals, headers, header = highlevel.read_edf(str(night), digital=True)
    stages = ["W", "N1", "N2", "N2", "N3", "N3", "N2", "REM", "REM", "N2", "W", "N2"]
    header["annotations"] += [[30.0 * i, 30.0, _ANNOTATION[s]] for i, s in enumerate(stages)]
    if technician_field is not None:
        header["technician"] = technician_field
    out = folder / f"scored{seed}.edf"
    highlevel.write_edf(str(out), signals, headers, header, digital=True)
    return out.read_bytes()


def test_the_scorer_reaches_the_study_and_the_agreement_rows(db_url, tmp_path, model):
    db, repo, pipe, paths = pipeline_env(db_url, tmp_path / "var", *model)
    try:
        scored = spool_file(paths, "a.edf", _scored_night(tmp_path, 21, "J_Smith"), repo, claim="c1")
        plain = spool_file(paths, "b.edf", write_synthetic_night(tmp_path / "p.edf", hours=HOURS, seed=22)
                           .read_bytes(), repo, claim="c2")
        assert pipe.run_once("w") and pipe.run_once("w")
        done = repo.get(scored.id)
        assert done.output_path, done.last_error
        assert done.scorer == "J Smith" and repo.get(plain.id).scorer is None
        # the scorer is not in the events' details (what the logs carry too)
        assert all("Smith" not in json.dumps(e.detail or {}) for e in repo.events(done.id))

        rows = agreement_rows(repo)
        assert [(r.study_key, r.scorer, r.epochs) for r in rows] == [(done.key, "J Smith", 12)]
        metrics = json.loads((Path(done.output_path) / "metrics.json").read_text())["staging_agreement"]
        assert rows[0].kappa == metrics["kappa"] and rows[0].f1 == metrics["f1"]
        assert rows[0].when is not None and rows[0].when.replace(tzinfo=None) == done.recording_start.replace(
            tzinfo=None)
        assert agreement_rows(repo, since=datetime.now(UTC) + timedelta(days=1)) == []
        assert len(agreement_rows(repo, since=datetime(2000, 1, 1))) == 1
        trend = agreement_by_scorer(rows, window=5)
        assert [s.scorer for s in trend.scorers] == ["J Smith"] and trend.alerts == ()
    finally:
        db.dispose()
