"""Scoring files (NSRR XML, Profusion XML, EDF+ annotations) and the AHI/ODI counted from them.

The night below (``NSRR_XML``, hand-written in the NSRR annotation schema) is 2 h = 240 epochs::

    0-600 s W | 600-1800 N2 | 1800-2400 Stage 3 | 2400-3000 Stage 4 (N3) | 3000-4200 REM | 4200-4800 W
    4800-5400 N1 | 5400-6600 N2 | 6600-6900 Movement (unscored) | 6900-7200 W

Sleep epochs: 40 N2 + 20 N3 + 20 N3 + 40 REM + 20 N1 + 40 N2 = 180 -> total sleep time 1.5 h.

Events (onset s, duration, SpO2 baseline/nadir -> drop):

* in wake or unscored, left out (5): obstructive apnea 300 (W), desaturation 320 drop 5 (W), hypopnea 4300
  (W), desaturation 4310 drop 6 (W), obstructive apnea 6650 (movement);
* apneas in sleep (3): obstructive 700, central 1000, mixed 2000;
* hypopneas in sleep (5):
  - 1200+20, desaturation at 1230 (10 s after its end) drop 4      -> 3 % yes, 4 % yes
  - 2500+20, desaturation at 2535 (15 s after) drop 3              -> 3 % yes, 4 % no
  - 3200+15, arousal at 3218 (3 s after), no desaturation          -> 3 % yes (arousal), 4 % no
  - 3600+20, desaturation at 3660 (40 s after: outside 30 s) drop 5 -> no, no
  - 5500+20, desaturation 5525 drop 2, arousal 5530 (10 s after: outside 5 s) -> no, no
* desaturations in sleep: 1230 (4), 2535 (3), 3660 (5), 5525 (2), 6000 (3.5) -> >= 3 %: 4, >= 4 %: 2;
* an SpO2 artifact at 1500, ignored.

AHI3 = (3 apneas + 3 hypopneas) / 1.5 h = 4.0; AHI4 = (3 + 1) / 1.5 = 2.667;
ODI3 = 4 / 1.5 = 2.667; ODI4 = 2 / 1.5 = 1.333.
"""

from __future__ import annotations

import json

import numpy as np
import pyedflib
import pytest
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.respiratory import (
    ScoredEvent,
    ScoredNight,
    event_kind_of,
    night_from_annotations,
    respiratory_indices,
)
from gateway.scoring_files import ScoringFileError, parse_scoring_xml, read_scoring

NSRR_XML = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<PSGAnnotation>
<SoftwareVersion>Compumedics</SoftwareVersion>
<EpochLength>30</EpochLength>
<ScoredEvents>
<ScoredEvent><EventType/><EventConcept>Recording Start Time</EventConcept><Start>0</Start><Duration>7200.0</Duration><ClockTime>00.00.00 22.00.00</ClockTime></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Wake|0</EventConcept><Start>0.0</Start><Duration>600.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 2 sleep|2</EventConcept><Start>600.0</Start><Duration>1200.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 3 sleep|3</EventConcept><Start>1800.0</Start><Duration>600.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 4 sleep|4</EventConcept><Start>2400.0</Start><Duration>600.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>REM sleep|5</EventConcept><Start>3000.0</Start><Duration>1200.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Wake|0</EventConcept><Start>4200.0</Start><Duration>600.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 1 sleep|1</EventConcept><Start>4800.0</Start><Duration>600.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 2 sleep|2</EventConcept><Start>5400.0</Start><Duration>1200.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Movement|6</EventConcept><Start>6600.0</Start><Duration>300.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Wake|0</EventConcept><Start>6900.0</Start><Duration>300.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Obstructive apnea|Obstructive Apnea</EventConcept><Start>300.0</Start><Duration>20.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>SpO2 desaturation|SpO2 desaturation</EventConcept><Start>320.0</Start><Duration>15.0</Duration><SignalLocation>SaO2</SignalLocation><SpO2Nadir>90.0</SpO2Nadir><SpO2Baseline>95.0</SpO2Baseline></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Obstructive apnea|Obstructive Apnea</EventConcept><Start>700.0</Start><Duration>20.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Central apnea|Central Apnea</EventConcept><Start>1000.0</Start><Duration>15.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Hypopnea|Hypopnea</EventConcept><Start>1200.0</Start><Duration>20.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>SpO2 desaturation|SpO2 desaturation</EventConcept><Start>1230.0</Start><Duration>20.0</Duration><SignalLocation>SaO2</SignalLocation><SpO2Nadir>91.0</SpO2Nadir><SpO2Baseline>95.0</SpO2Baseline></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>SpO2 artifact|SpO2 artifact</EventConcept><Start>1500.0</Start><Duration>30.0</Duration><SignalLocation>SaO2</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Mixed apnea|Mixed Apnea</EventConcept><Start>2000.0</Start><Duration>25.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Hypopnea|Hypopnea</EventConcept><Start>2500.0</Start><Duration>20.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>SpO2 desaturation|SpO2 desaturation</EventConcept><Start>2535.0</Start><Duration>15.0</Duration><SignalLocation>SaO2</SignalLocation><SpO2Nadir>93.0</SpO2Nadir><SpO2Baseline>96.0</SpO2Baseline></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Hypopnea|Hypopnea</EventConcept><Start>3200.0</Start><Duration>15.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Arousals|Arousals</EventType><EventConcept>Arousal|Arousal ()</EventConcept><Start>3218.0</Start><Duration>10.0</Duration><SignalLocation>C3</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Hypopnea|Hypopnea</EventConcept><Start>3600.0</Start><Duration>20.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>SpO2 desaturation|SpO2 desaturation</EventConcept><Start>3660.0</Start><Duration>20.0</Duration><SignalLocation>SaO2</SignalLocation><SpO2Nadir>92.0</SpO2Nadir><SpO2Baseline>97.0</SpO2Baseline></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Hypopnea|Hypopnea</EventConcept><Start>4300.0</Start><Duration>20.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>SpO2 desaturation|SpO2 desaturation</EventConcept><Start>4310.0</Start><Duration>20.0</Duration><SignalLocation>SaO2</SignalLocation><SpO2Nadir>90.0</SpO2Nadir><SpO2Baseline>96.0</SpO2Baseline></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Hypopnea|Hypopnea</EventConcept><Start>5500.0</Start><Duration>20.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>SpO2 desaturation|SpO2 desaturation</EventConcept><Start>5525.0</Start><Duration>15.0</Duration><SignalLocation>SaO2</SignalLocation><SpO2Nadir>93.0</SpO2Nadir><SpO2Baseline>95.0</SpO2Baseline></ScoredEvent>
<ScoredEvent><EventType>Arousals|Arousals</EventType><EventConcept>ASDA arousal|Arousal (ASDA)</EventConcept><Start>5530.0</Start><Duration>8.0</Duration><SignalLocation>C3</SignalLocation></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>SpO2 desaturation|SpO2 desaturation</EventConcept><Start>6000.0</Start><Duration>20.0</Duration><SignalLocation>SaO2</SignalLocation><SpO2Nadir>92.0</SpO2Nadir><SpO2Baseline>95.5</SpO2Baseline></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Obstructive apnea|Obstructive Apnea</EventConcept><Start>6650.0</Start><Duration>20.0</Duration><SignalLocation>ABDO RES</SignalLocation></ScoredEvent>
</ScoredEvents>
</PSGAnnotation>
"""

# The same night as (onset, duration, Profusion name / EDF+ label, nadir, drop).
EVENTS = [
    (300, 20, "Obstructive Apnea", None, None), (320, 15, "SpO2 desaturation", 90, 5),
    (700, 20, "Obstructive Apnea", None, None), (1000, 15, "Central Apnea", None, None),
    (1200, 20, "Hypopnea", None, None), (1230, 20, "SpO2 desaturation", 91, 4),
    (1500, 30, "SpO2 artifact", None, None), (2000, 25, "Mixed Apnea", None, None),
    (2500, 20, "Hypopnea", None, None), (2535, 15, "SpO2 desaturation", 93, 3),
    (3200, 15, "Hypopnea", None, None), (3218, 10, "Arousal (ASDA)", None, None),
    (3600, 20, "Hypopnea", None, None), (3660, 20, "SpO2 desaturation", 92, 5),
    (4300, 20, "Hypopnea", None, None), (4310, 20, "SpO2 desaturation", 90, 6),
    (5500, 20, "Hypopnea", None, None), (5525, 15, "SpO2 desaturation", 93, 2),
    (5530, 8, "Arousal (ASDA)", None, None), (6000, 20, "SpO2 desaturation", 92, 3.5),
    (6650, 20, "Obstructive Apnea", None, None),
]
# Profusion codes per 10-min block (20 epochs), 0 W 1-4 sleep stages 5 REM 6 movement
STAGE_CODES = [0, 2, 2, 3, 4, 5, 5, 0, 1, 2, 2]  # 600-s blocks up to 6600 s, then movement and wake
EXPECTED_STAGES = (["W"] * 20 + ["N2"] * 40 + ["N3"] * 40 + ["REM"] * 40 + ["W"] * 20 + ["N1"] * 20
                   + ["N2"] * 40 + [None] * 10 + ["W"] * 10)


def _profusion_xml() -> str:
    codes = [c for c in STAGE_CODES for _ in range(20)] + [6] * 10 + [0] * 10
    events = []
    for onset, duration, name, nadir, drop in EVENTS:
        spo2 = "" if nadir is None else f"<LowestSpO2>{nadir}</LowestSpO2><Desaturation>{drop}</Desaturation>"
        events.append(f"<ScoredEvent><Name>{name}</Name><Start>{onset}</Start><Duration>{duration}</Duration>"
                      f"<Input>ABDO RES</Input>{spo2}</ScoredEvent>")
    stages = "".join(f"<SleepStage>{c}</SleepStage>" for c in codes)
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<CMPStudyConfig><EpochLength>30</EpochLength>'
            f'<ScoredEvents>{"".join(events)}</ScoredEvents><SleepStages>{stages}</SleepStages></CMPStudyConfig>')


def _check_the_night(night: ScoredNight) -> None:
    assert night.stages == EXPECTED_STAGES
    idx = respiratory_indices(night)
    assert idx.total_sleep_time_h == pytest.approx(1.5)
    assert (idx.apneas, idx.hypopneas, idx.hypopneas_3, idx.hypopneas_4) == (3, 5, 3, 1)
    assert (idx.desaturations_3, idx.desaturations_4, idx.events_in_wake) == (4, 2, 5)
    assert idx.ahi3 == pytest.approx(4.0)
    assert idx.ahi4 == pytest.approx(4 / 1.5)
    assert idx.odi3 == pytest.approx(4 / 1.5)
    assert idx.odi4 == pytest.approx(2 / 1.5)
    counts = night.event_counts()
    assert counts == {"obstructive_apnea": 3, "central_apnea": 1, "mixed_apnea": 1, "apnea": 0, "hypopnea": 6,
                      "arousal": 2, "desaturation": 7}


def test_nsrr_xml_round_trip_with_known_ahi(tmp_path):
    path = tmp_path / "shhs1-200001-nsrr.xml"
    path.write_text(NSRR_XML, encoding="utf-8")
    night = read_scoring(path)
    assert night.source == "nsrr"
    _check_the_night(night)
    desat = next(e for e in night.events if e.kind == "desaturation" and e.onset_s == 6000)
    assert (desat.spo2_nadir, desat.spo2_baseline, desat.spo2_drop) == (92.0, 95.5, 3.5)
    assert night.stage_counts() == {"W": 50, "N1": 20, "N2": 80, "N3": 40, "REM": 40, "unscored": 10}


def test_the_same_night_as_profusion_xml_gives_the_same_stages_and_indices(tmp_path):
    path = tmp_path / "night.xml"
    path.write_text(_profusion_xml(), encoding="utf-8")
    night = read_scoring(path)
    assert night.source == "profusion"
    _check_the_night(night)
    nsrr = parse_scoring_xml(NSRR_XML.encode())
    assert respiratory_indices(night) == respiratory_indices(nsrr)


def test_the_same_night_as_edf_plus_annotations(tmp_path):
    path = tmp_path / "night.edf"
    writer = pyedflib.EdfWriter(str(path), 1, file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setSignalHeaders([{"label": "SpO2", "dimension": "%", "sample_frequency": 1,
                                  "physical_min": 0.0, "physical_max": 100.0, "digital_min": -32768,
                                  "digital_max": 32767, "transducer": "", "prefilter": ""}])
        writer.writeSamples([np.full(7200, 95.0)])
        labels = {0: "Sleep stage W", 1: "Sleep stage 1", 2: "Sleep stage 2", 3: "Sleep stage 3",
                  4: "Sleep stage 4", 5: "Sleep stage R", 6: "Movement time"}
        runs = list(zip([i * 600 for i in range(11)], STAGE_CODES, strict=True)) + [(6600, 6)]
        for onset, code in runs:
            writer.writeAnnotation(onset, 600 if onset < 6600 else 300, labels[code])
        writer.writeAnnotation(6900, 300, "Sleep stage W")
        for onset, duration, name, _nadir, drop in EVENTS:
            writer.writeAnnotation(onset, duration, name if drop is None else f"{name} {drop}%")
    finally:
        writer.close()
    night = read_scoring(path)
    assert night.source == "edf+"
    _check_the_night(night)


def test_events_in_wake_are_excluded():
    stages = ["W"] * 4 + ["N2"] * 4  # 2 min of sleep
    events = [ScoredEvent("obstructive_apnea", 10, 20), ScoredEvent("hypopnea", 40, 20, spo2_drop=5),
              ScoredEvent("desaturation", 60, 10, spo2_drop=6), ScoredEvent("obstructive_apnea", 130, 20),
              ScoredEvent("hypopnea", 170, 20, spo2_drop=4), ScoredEvent("central_apnea", 300, 10)]
    idx = respiratory_indices(ScoredNight(stages, events))
    assert (idx.apneas, idx.hypopneas_4, idx.events_in_wake) == (1, 1, 4)  # 300 s is past the hypnogram
    assert idx.ahi4 == pytest.approx(2 / (2 / 60))
    assert idx.odi4 == 0


def test_a_hypopneas_own_drop_counts_and_no_sleep_gives_no_index():
    night = ScoredNight(["N2"] * 2, [ScoredEvent("hypopnea", 0, 15, spo2_drop=3.5)])
    idx = respiratory_indices(night)
    assert (idx.hypopneas_3, idx.hypopneas_4) == (1, 0)
    empty = respiratory_indices(ScoredNight(["W"] * 10, [ScoredEvent("obstructive_apnea", 0, 15)]))
    assert empty.ahi3 is empty.ahi4 is empty.odi3 is empty.odi4 is None


@pytest.mark.parametrize("label, kind", [
    ("Obstructive apnea|Obstructive Apnea", "obstructive_apnea"), ("Central Apnea", "central_apnea"),
    ("Mixed Apnea", "mixed_apnea"), ("Apnea", "apnea"), ("Hypopnea|Hypopnea", "hypopnea"),
    ("Obstructive Hypopnea", "hypopnea"), ("Arousal|Arousal ()", "arousal"), ("ASDA arousal", "arousal"),
    ("SpO2 desaturation|SpO2 desaturation", "desaturation"), ("SpO2 artifact|SpO2 artifact", None),
    ("Sleep stage 2", None), ("Unsure|Unsure", None), ("Lights off", None),
])
def test_event_labels(label, kind):
    assert event_kind_of(label) == kind


def test_edf_annotation_night_reads_stages_and_desaturation_drop():
    from gateway.recording import Annotation

    night = night_from_annotations([Annotation(0, 60, "Sleep stage 2"), Annotation(10, 12, "SpO2 desaturation 4%"),
                                    Annotation(30, None, "SpO2 desaturation")])
    assert night.stages == ["N2", "N2"]
    assert [e.spo2_drop for e in night.events] == [4.0, None]
    assert respiratory_indices(night).desaturations_without_drop == 1


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<PSGAnnotation><ScoredEvents>&lol2;</ScoredEvents></PSGAnnotation>"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY ext SYSTEM "file:///etc/passwd">]><CMPStudyConfig><Name>&ext;</Name></CMPStudyConfig>"""


@pytest.mark.parametrize("data, message", [
    (BOMB, "DOCTYPE declaration"),
    (EXTERNAL, "DOCTYPE declaration"),
    ("\ufeff<!doctype x><PSGAnnotation/>".encode("utf-16"), "DOCTYPE declaration"),
    (b"<PSGAnnotation><ScoredEvents>", "not well-formed XML"),
    (b"<Something/>", "not an NSRR (PSGAnnotation) or Profusion"),
    ((b"<PSGAnnotation><ScoredEvents><ScoredEvent><EventConcept>Hypopnea|Hypopnea</EventConcept>"
      b"<Start>abc</Start></ScoredEvent></ScoredEvents></PSGAnnotation>"), "<Start> is not a number"),
])
def test_malformed_and_entity_files_are_refused_in_one_line(tmp_path, data, message):
    path = tmp_path / "bad.xml"
    path.write_bytes(data)
    with pytest.raises(ScoringFileError) as info:
        read_scoring(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


runner = CliRunner()


def test_cli_scoring_show(tmp_path):
    path = tmp_path / "night-nsrr.xml"
    path.write_text(NSRR_XML, encoding="utf-8")
    result = runner.invoke(app, ["scoring", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["source"] == "nsrr" and shown["epochs"] == 240
    assert shown["stages"]["N3"] == 40 and shown["events"]["hypopnea"] == 6
    assert shown["indices"]["ahi3"] == pytest.approx(4.0)
    assert shown["indices"]["odi4"] == pytest.approx(2 / 1.5)
    text = runner.invoke(app, ["scoring", "show", str(path)])
    assert text.exit_code == 0
    assert "AHI3 4.0  AHI4 2.7  ODI3 2.7  ODI4 1.3" in text.stdout
    bad = tmp_path / "bomb.xml"
    bad.write_bytes(BOMB)
    refused = runner.invoke(app, ["scoring", "show", str(bad)])
    assert refused.exit_code == 2
    assert "refused" in refused.output and "DOCTYPE" in refused.output
