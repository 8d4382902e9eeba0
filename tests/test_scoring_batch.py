"""Scoring files beside an archive's EDFs: the batch picks them up (``X-nsrr.xml``, ``X-profusion.xml``,
``X.xml``, ``X.edf.xml``), scores the staging agreement with their hypnogram, records the respiratory
indices in metrics.json and exports them as ``ahi3``/``ahi4``/``odi3``/``odi4``; ``heads fit apnea
--ahi-from-scoring`` fits on those columns.

The hand-written NSRR night (12 epochs, the length of the synthetic 0.1-h recording)::

    epochs 0-1 W | 2-7 N2 | 8-10 REM | 11 N1    -> 10 sleep epochs, total sleep time 300 s = 1/12 h

Events: an obstructive apnea at 10 s (wake: left out), an obstructive apnea at 70 s, a hypopnea at 130 s
with its own 4 % drop (3 % and 4 % rules), a hypopnea at 250 s with an arousal 2 s after its end (3 %
rule only), a desaturation of 3 % at 200 s. AHI3 = 3 x 12 = 36, AHI4 = 2 x 12 = 24, ODI3 = 12, ODI4 = 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from sqlalchemy import select
from test_heads_cli import write_export
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.respiratory import respiratory_indices
from gateway.scoring_files import read_scoring
from gateway.sources.archive import discover, scoring_beside
from gateway.store.db import make_engine
from gateway.store.models import State, Study
from gateway.store.repo import Repo
from gateway.synthetic.night import write_synthetic_night

pytestmark = pytest.mark.e2e

HOURS = 0.1  # 6 minutes: 12 scored epochs
cli = CliRunner()

STAGES = [("Wake|0", 0, 60), ("Stage 2 sleep|2", 60, 180), ("REM sleep|5", 240, 90), ("Stage 1 sleep|1", 330, 30)]
EVENTS = [
    ("Obstructive apnea|Obstructive Apnea", 10, 15, ""),
    ("Obstructive apnea|Obstructive Apnea", 70, 15, ""),
    ("Hypopnea|Hypopnea", 130, 20, "<SpO2Nadir>92</SpO2Nadir><SpO2Baseline>96</SpO2Baseline>"),
    ("SpO2 desaturation|SpO2 desaturation", 200, 15, "<SpO2Nadir>92</SpO2Nadir><SpO2Baseline>95</SpO2Baseline>"),
    ("Hypopnea|Hypopnea", 250, 15, ""),
    ("Arousal|Arousal ()", 267, 5, ""),
]


def nsrr_xml() -> str:
    stages = "".join(f"<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>{c}</EventConcept>"
                     f"<Start>{s}</Start><Duration>{d}</Duration></ScoredEvent>\n" for c, s, d in STAGES)
    events = "".join(f"<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>{c}</EventConcept>"
                     f"<Start>{s}</Start><Duration>{d}</Duration>{extra}</ScoredEvent>\n"
                     for c, s, d, extra in EVENTS)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<PSGAnnotation><EpochLength>30</EpochLength>\n'
            f"<ScoredEvents>\n{stages}{events}</ScoredEvents></PSGAnnotation>\n")


def _config(tmp_path: Path, db_url: str) -> Path:
    doc = {"paths": {"var_dir": str(tmp_path / "var")}, "database": {"url": db_url},
           "service": {"node_name": "testnode"}, "logging": {"format": "json", "level": "info"},
           "pipeline": {"write_report": False}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _studies(db_url: str) -> dict[str, Study]:
    engine = make_engine(db_url)
    try:
        with Repo(engine).sessions() as s:
            return {Path(st.input_path or "").name: st for st in s.scalars(select(Study))}
    finally:
        engine.dispose()


def _metrics(study: Study) -> dict:
    return json.loads((Path(study.output_path or "") / "metrics.json").read_text())


def test_scoring_files_are_found_beside_their_recordings(tmp_path):
    (tmp_path / "a.edf").write_bytes(b"")
    (tmp_path / "a.xml").write_text("x")
    (tmp_path / "a-nsrr.xml").write_text("x")  # preferred over a.xml
    (tmp_path / "B.EDF").write_bytes(b"")
    (tmp_path / "B.EDF.XML").write_text("x")  # Compumedics' own export name, any case
    (tmp_path / "c.edf").write_bytes(b"")
    (tmp_path / "c-profusion.xml").write_text("x")
    (tmp_path / "d.edf").write_bytes(b"")
    (tmp_path / "other.xml").write_text("x")
    assert scoring_beside(tmp_path / "a.edf") == tmp_path / "a-nsrr.xml"
    assert scoring_beside(tmp_path / "B.EDF") == tmp_path / "B.EDF.XML"
    assert scoring_beside(tmp_path / "c.edf") == tmp_path / "c-profusion.xml"
    assert scoring_beside(tmp_path / "d.edf") is None
    found = {item.name: item.scoring for item in discover([tmp_path]).items}
    assert found == {"a.edf": tmp_path / "a-nsrr.xml", "B.EDF": tmp_path / "B.EDF.XML",
                     "c.edf": tmp_path / "c-profusion.xml", "d.edf": None}


def test_batch_reads_scoring_files_into_agreement_metrics_and_export(tmp_path, db_url):
    root = tmp_path / "archive"
    root.mkdir()
    write_synthetic_night(root / "scored.edf", hours=HOURS, seed=31)
    write_synthetic_night(root / "plain.edf", hours=HOURS, seed=32)
    write_synthetic_night(root / "broken.edf", hours=HOURS, seed=33)
    xml = root / "scored-nsrr.xml"
    xml.write_text(nsrr_xml())
    (root / "broken.xml").write_text("<PSGAnnotation><ScoredEvents><ScoredEvent>")  # not well-formed
    export = tmp_path / "export"
    r = cli.invoke(app, ["batch", str(root), "--config", str(_config(tmp_path, db_url)), "--no-progress", "--json",
                         "--export", str(export)])
    assert r.exit_code == 0, r.output
    studies = _studies(db_url)
    assert {name: s.state for name, s in studies.items()} == {n: State.FLAGGED for n in
                                                                ("scored.edf", "plain.edf", "broken.edf")}

    # metrics.json: the indices respiratory_indices counts on the very file, and the agreement on its stages
    expected = respiratory_indices(read_scoring(xml))
    assert (expected.ahi3, expected.ahi4, expected.odi3, expected.odi4) == pytest.approx((36.0, 24.0, 12.0, 0.0))
    scored = _metrics(studies["scored.edf"])
    resp = scored["respiratory"]
    assert (resp["ahi3"], resp["ahi4"], resp["odi3"], resp["odi4"]) == pytest.approx(
        (expected.ahi3, expected.ahi4, expected.odi3, expected.odi4))
    assert resp["tst_h"] == pytest.approx(1 / 12) and resp["source"] == "X-nsrr.xml" and resp["format"] == "nsrr"
    assert resp["events"]["obstructive_apnea"] == 2 and resp["events"]["hypopnea"] == 2
    assert resp["counted"]["events_in_wake"] == 1
    agreement = scored["staging_agreement"]
    assert agreement["scored"] == ["W", "W", "N2", "N2", "N2", "N2", "N2", "N2", "REM", "REM", "REM", "N1"]
    assert agreement["epochs"] == 12

    plain = _metrics(studies["plain.edf"])
    assert "respiratory" not in plain and plain["staging_agreement"] is None

    broken = _metrics(studies["broken.edf"])  # processed all the same, with a warning naming the file's form
    assert "respiratory" not in broken and broken["staging_agreement"] is None
    [warning] = [w for w in broken["recording"]["warnings"] if w.startswith("scoring file not used")]
    assert "X.xml: not well-formed XML" in warning and str(root) not in warning

    table = pd.read_parquet(export / "studies.parquet").set_index("study_key")
    for column in ("ahi3", "ahi4", "odi3", "odi4"):
        assert table[column].dtype == np.float64
    row = table.loc[studies["scored.edf"].key]
    assert (row["ahi3"], row["ahi4"], row["odi3"], row["odi4"]) == pytest.approx((36.0, 24.0, 12.0, 0.0))
    for name in ("plain.edf", "broken.edf"):
        assert table.loc[studies[name].key, ["ahi3", "ahi4", "odi3", "odi4"]].isna().all()
    assert table.loc[studies["scored.edf"].key, "agreement_epochs"] == 12

    # One study with an AHI (one class): the labels are read, the fit refuses with its usual clear error.
    r = cli.invoke(app, ["heads", "fit", "apnea", "--export", str(export), "--ahi-from-scoring",
                         "--out", str(tmp_path / "head")])
    assert r.exit_code == 2, r.output
    assert "AHI (3 % rule) from the export's scoring files: 1 of 3 studies" in r.output


def _export_with_ahi(folder: Path, n: int = 400) -> tuple[list[str], np.ndarray]:
    """A synthetic export whose AHI follows the night vectors; every fifth study without scoring (null)."""
    rng = np.random.default_rng(11)
    night = rng.normal(size=(n, 512))
    u = rng.normal(size=512)
    u /= np.linalg.norm(u)
    ahi = np.clip(np.exp(2.0 + 1.3 * (night @ u) + rng.normal(scale=0.3, size=n)) - 1, 0, None)
    keys = write_export(folder, night, [f"P{i // 2}" for i in range(n)])
    table = pq.read_table(folder / "studies.parquet")
    has = np.arange(n) % 5 != 0
    for name, values in (("ahi3", ahi), ("ahi4", ahi * 0.7)):
        table = table.append_column(name, pa.array([float(v) if h else None for v, h in zip(values, has)],
                                                   type=pa.float64()))
    pq.write_table(table, folder / "studies.parquet")
    return keys, ahi


def test_fit_apnea_from_the_exports_ahi_columns(tmp_path):
    export = tmp_path / "export"
    _export_with_ahi(export)
    head = tmp_path / "apnea"
    r = cli.invoke(app, ["heads", "fit", "apnea", "--export", str(export), "--ahi-from-scoring", "--ahi-rule", "4",
                         "--out", str(head)])
    assert r.exit_code == 0, r.output
    assert "AHI (4 % rule) from the export's scoring files: 320 of 400 studies" in r.output
    doc = json.loads((head / "head.json").read_text())
    assert doc["kind"] == "apnea" and doc["test"]["presence"]["auroc"] > 0.8
    assert doc["test"]["n"] < 320 * 0.35  # only the studies with an AHI were split
    r = cli.invoke(app, ["heads", "evaluate", str(head), "--export", str(export), "--ahi-from-scoring",
                         "--ahi-rule", "4", "--report", str(tmp_path / "rep"), "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "rep" / "evaluation.json").read_text())
    assert ev["apnea"]["presence"]["auroc"]["value"] > 0.8
    assert ev["data"]["labels"].endswith("studies.parquet#ahi4")


def test_fit_apnea_label_source_errors(tmp_path):
    export = tmp_path / "export"
    _export_with_ahi(export, n=40)
    out = ["--out", str(tmp_path / "apnea")]
    ahi_csv = tmp_path / "ahi.csv"
    ahi_csv.write_text("study_key,ahi\n")
    for args in ([], ["--ahi", str(ahi_csv), "--ahi-from-scoring"]):
        r = cli.invoke(app, ["heads", "fit", "apnea", "--export", str(export), *args, *out])
        assert r.exit_code == 2 and "give either --ahi CSV or --ahi-from-scoring" in r.output
    r = cli.invoke(app, ["heads", "fit", "apnea", "--export", str(export), "--ahi-from-scoring", "--ahi-rule", "5",
                         *out])
    assert r.exit_code == 2
    bare = tmp_path / "bare"
    write_export(bare, np.zeros((4, 512)), None)  # an export written before the AHI columns
    r = cli.invoke(app, ["heads", "fit", "apnea", "--export", str(bare), "--ahi-from-scoring", *out])
    assert r.exit_code == 2 and "no ahi3 column" in r.output
