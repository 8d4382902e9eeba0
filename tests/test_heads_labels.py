"""``psg-gateway heads labels build``: outcome labels from ICD codes through the Phecode Map 1.2, on a
small table whose every row is checked by hand (prevalent case, earliest code, ICD-9 and ICD-10 to one
phecode, exclusion range, censoring at last follow-up and at the horizon), malformed inputs refused
with their line, and the output read by ``heads fit cox --labels``."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.heads import labels as lb
from gateway.heads.data import LabelsError, load_export, read_survival_labels

runner = CliRunner()

# The public files' layouts (phewascatalog.org, Phecode Map 1.2), a few made-up-but-plausible rows.
ICD9_MAP = [["ICD9", "ICD9 String", "PheCode", "Phenotype", "Excl. Phecodes", "Excl. Phenotypes", "Rollup",
             "Leaf", "Ignore Bool"],
            ["327.23", "Obstructive sleep apnea", "327.3", "Sleep apnea", "327-327.99", "sleep disorders",
             "1", "1", "FALSE"],
            ["401.9", "Essential hypertension", "401.1", "Essential hypertension", "401-405.99",
             "hypertension", "1", "1", "FALSE"],
            ["V01.0", "Contact with cholera", "", "", "", "", "", "", "TRUE"]]  # no phecode: skipped
ICD10_MAP = [["icd10cm", "icd10cm_str", "phecode", "phecode_str", "exclude_range", "exclude_name"],
             ["G47.33", "Obstructive sleep apnea", "327.3", "Sleep apnea", "327-327.99", "sleep disorders"],
             ["I10", "Essential hypertension", "401.1", "Essential hypertension", "401-405.99", "hypertension"],
             ["I42.0", "Dilated cardiomyopathy", "425.1", "Primary/intrinsic cardiomyopathies",
              "425-429.99", "cardiomyopathy; heart failure"],
             ["I50.9", "Heart failure, unspecified", "428.2", "Heart failure NOS", "425-429.99",
              "cardiomyopathy; heart failure"]]
DX = [["patient_id", "code", "code_system", "date"],
      ["P1", "I50.9", "ICD10CM", "2019-05-01"],     # heart failure before the study: prevalent
      ["P1", "32723", "ICD9CM", "2020-03-01"],      # sleep apnea, ICD-9 without its dot ...
      ["P1", "G47.33", "ICD10CM", "2020-02-01"],    # ... and ICD-10, earlier: this one wins (22 days)
      ["P2", "I10", "ICD10CM", "2021-01-01"],       # hypertension, ICD-10 later ...
      ["P2", "401.9", "ICD-9-CM", "2020-03-01"],    # ... ICD-9 earlier: 60 days
      ["P2", "I42.0", "ICD10CM", "2020-06-01"],     # cardiomyopathy (152 days): in heart failure's range
      ["P3", "I50.9", "ICD10CM", "2021-06-01"],     # heart failure after study 3, before study 4
      ["P9", "I10", "ICD10CM", "2020-01-01"],       # not in the export
      ["P3", "Z99.89", "ICD10CM", "2020-05-05"]]    # in no map
FOLLOW_UP = [["patient_id", "last_followup_date"], ["P1", "2020-12-31"], ["P2", "2022-01-01"]]  # P3: last dx
STUDIES = [("s1", "P1", datetime(2020, 1, 10, 22, 15)), ("s2", "P2", datetime(2020, 1, 1, 21, 0)),
           ("s3", "P3", datetime(2020, 1, 1, 23, 0)), ("s4", "P3", datetime(2021, 7, 1, 22, 0)),
           ("s5", None, datetime(2020, 1, 1, 22, 0))]


def _csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _export(folder: Path, studies, night: np.ndarray | None = None) -> Path:
    """An export as ``batch --export --export-identifiers`` writes it (the columns used here)."""
    night = np.random.default_rng(0).normal(size=(len(studies), 512)) if night is None else night
    for i, (key, _, _) in enumerate(studies):
        (folder / "embeddings" / key).mkdir(parents=True)
        np.save(folder / "embeddings" / key / "night.npy", night[i].astype(np.float32))
    pq.write_table(pa.table({
        "study_key": [s[0] for s in studies], "patient_id": [s[1] for s in studies],
        "accession": [None] * len(studies), "study_uid": [None] * len(studies),
        "recording_start": [s[2].isoformat() for s in studies], "model_hash": ["x"] * len(studies),
        "model_validated": [False] * len(studies)}), folder / "studies.parquet")
    return folder


@pytest.fixture
def files(tmp_path):
    return {"map9": _csv(tmp_path / "phecode_icd9_rolled.csv", ICD9_MAP),
            "map10": _csv(tmp_path / "Phecode_map_v1_2_icd10cm_beta.csv", ICD10_MAP),
            "dx": _csv(tmp_path / "dx.csv", DX), "fu": _csv(tmp_path / "fu.csv", FOLLOW_UP),
            "export": _export(tmp_path / "export", STUDIES)}


def _build(files, **kw):
    pmap = lb.read_phecode_map([files["map9"], files["map10"]])
    dx = lb.read_diagnoses(files["dx"], pmap)
    rows, report = lb.build_labels(lb.read_export_studies(files["export"]), dx, pmap,
                                   follow_up=lb.read_follow_up(files["fu"]), **kw)
    return {(k, p): (t, e) for k, p, t, e in rows}, {c["phecode"]: c for c in report["outcomes"]}, report


def test_hand_checked_table_without_horizon(files):
    rows, counts, report = _build(files)
    # s1 (2020-01-10, P1, censored 2020-12-31 = 356 days); s2 (2020-01-01, P2, 2022-01-01 = 731 days);
    # s3 (2020-01-01, P3: no follow-up row, censored at the latest diagnosis 2021-06-01 = 517 days);
    # s4 (2021-07-01, P3): follow-up ends before the study; s5: no patient id.
    assert rows == {
        ("s1", "327.3"): (22, 1),    # earliest of the ICD-10 (02-01) and the ICD-9 (03-01) code
        ("s1", "401.1"): (356, 0),
        # s1 425.1: P1's prevalent heart failure (428.2) is in cardiomyopathy's range: not a control
        # s1 428.2: prevalent (2019-05-01)
        ("s2", "327.3"): (731, 0),
        ("s2", "401.1"): (60, 1),    # ICD-9 401.9 on 2020-03-01 beats ICD-10 I10 on 2021-01-01
        ("s2", "425.1"): (152, 1),
        # s2 428.2: cardiomyopathy 425.1 in heart failure's range: not a control
        ("s3", "327.3"): (517, 0),
        ("s3", "401.1"): (517, 0),
        # s3 425.1: heart failure in its range
        ("s3", "428.2"): (517, 1),
    }
    assert counts["428.2"] == {"phecode": "428.2", "phenotype": "Heart failure NOS", "cases": 1, "controls": 0,
                               "censored_at_followup": 0, "censored_at_horizon": 0, "diagnosed_after_censoring": 0,
                               "excluded_prevalent": 2, "excluded_range": 1, "excluded_no_followup": 0}
    assert counts["425.1"]["excluded_range"] == 2 and counts["425.1"]["cases"] == 1
    assert counts["327.3"]["excluded_no_followup"] == 1 and counts["327.3"]["censored_at_followup"] == 2
    assert report["studies_without_patient_or_date"] == 1
    assert report["diagnoses"]["unmapped_rows"] == 1 and report["diagnoses"]["patients_not_in_export"] == 1
    assert [m["format"] for m in report["maps"]] == ["icd9", "icd10cm"]


def test_hand_checked_table_with_horizon(files):
    rows, counts, _ = _build(files, horizon_days=400)
    # s1: 2020-01-10 + 400 d = 2021-02-13, after the last follow-up: 356 as before.
    # s2, s3: 2020-01-01 + 400 d = 2021-02-04, before their last follow-up: censored at 400 days.
    assert rows == {
        ("s1", "327.3"): (22, 1), ("s1", "401.1"): (356, 0),
        ("s2", "327.3"): (400, 0), ("s2", "401.1"): (60, 1), ("s2", "425.1"): (152, 1),
        ("s3", "327.3"): (400, 0), ("s3", "401.1"): (400, 0),
        ("s3", "425.1"): (400, 0),   # heart failure (2021-06-01) is after censoring: no longer excludes
        ("s3", "428.2"): (400, 0),   # diagnosed after the horizon: a censored control
    }
    assert counts["428.2"]["diagnosed_after_censoring"] == 1 and counts["428.2"]["censored_at_horizon"] == 1
    assert counts["327.3"]["censored_at_horizon"] == 2 and counts["327.3"]["censored_at_followup"] == 0


def test_outcome_choice_and_phecode_forms(files):
    pmap = lb.read_phecode_map([files["map9"], files["map10"]])
    dx = lb.read_diagnoses(files["dx"], pmap)
    studies = lb.read_export_studies(files["export"])
    rows, report = lb.build_labels(studies, dx, pmap, outcomes=["428.20", "0428.2"])
    assert {r[1] for r in rows} == {"428.2"} and len(report["outcomes"]) == 1
    with pytest.raises(LabelsError, match="'999' is not a phecode of the map"):
        lb.build_labels(studies, dx, pmap, outcomes=["999"])
    assert lb.canonical_phecode("008.50") == "8.5" and lb.normalise_code(" g47.33 ") == "G4733"
    assert pmap.codes[("ICD9CM", "32723")] == {"327.3"} and ("ICD9CM", "V010") not in pmap.codes


@pytest.mark.parametrize(("which", "row", "line", "message"), [
    ("map10", ["I50.9", "Heart failure", "HF", "Heart failure NOS", "425-429.99", ""], 6, "phecode 'HF'"),
    ("map10", ["I50.9", "Heart failure", "428.2", "Heart failure NOS", "425 to 429", ""], 6, "exclude_range"),
    ("map10", ["I5!", "Heart failure", "428.2", "Heart failure NOS", "425-429.99", ""], 6, "not an ICD code"),
    ("dx", ["P1", "I50.9", "ICD10", "2020-01-01"], 11, "code_system 'ICD10'"),
    ("dx", ["P1", "I50.9", "ICD10CM", "01/02/2020"], 11, "date '01/02/2020'"),
    ("dx", ["", "I50.9", "ICD10CM", "2020-01-01"], 11, "empty patient_id"),
    ("fu", ["P3", "soon"], 4, "last_followup_date 'soon'"),
    ("fu", ["P1", "2021-01-01"], 4, "a second row for patient 'P1'"),
])
def test_malformed_files_refused_with_their_line(files, which, row, line, message):
    source = {"map10": ICD10_MAP, "dx": DX, "fu": FOLLOW_UP}[which]
    _csv(files[which], [*source, row])
    with pytest.raises(LabelsError) as info:
        _build(files)
    assert info.value.source == str(files[which])
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"line {line}: ")
    assert message in info.value.problems[0]


def test_wrong_headers_refused(files, tmp_path):
    who = _csv(tmp_path / "icd10_who.csv", [["ICD10", "PheCode", "Excl. Phecodes"], ["I10", "401.1", ""]])
    with pytest.raises(LabelsError, match="ICD-10 \\(WHO\\)"):
        lb.read_phecode_map([who])
    other = _csv(tmp_path / "other.csv", [["code", "value"], ["I10", "1"]])
    with pytest.raises(LabelsError, match="not a phecode map"):
        lb.read_phecode_map([other])
    _csv(files["dx"], [["patient", "code", "code_system", "date"]])
    pmap = lb.read_phecode_map([files["map10"]])
    with pytest.raises(LabelsError, match="line 1: missing column\\(s\\) patient_id"):
        lb.read_diagnoses(files["dx"], pmap)
    bare = tmp_path / "bare"
    bare.mkdir()
    pq.write_table(pa.table({"study_key": ["a"], "model_hash": ["x"]}), bare / "studies.parquet")
    with pytest.raises(LabelsError, match="--export-identifiers"):
        lb.read_export_studies(bare)


def test_definitions_supply_exclusion_ranges(files, tmp_path):
    """An unrolled map (no ranges) with the definitions file gives the same ranges as the rolled map."""
    unrolled = _csv(tmp_path / "phecode_icd9_map_unrolled.csv", [["icd9", "phecode"], ["428.0", "428.2"],
                                                                  ["425.4", "425.1"]])
    definitions = _csv(tmp_path / "phecode_definitions1.2.csv", [
        ["phecode", "phenotype", "phecode_exclude_range", "sex", "rollup", "leaf", "category_number", "category"],
        ["425.1", "Primary/intrinsic cardiomyopathies", "425-429.99", "", "1", "1", "6", "circulatory system"],
        ["428.2", "Heart failure NOS", "425-429.99", "", "1", "1", "6", "circulatory system"]])
    pmap = lb.read_phecode_map([unrolled, definitions])
    assert pmap.in_range("428.2", "425.1") and not pmap.in_range("428.2", "428.2")
    assert not pmap.in_range("428.2", "401.1") and pmap.names["428.2"] == "Heart failure NOS"


def test_cli_end_to_end_read_by_fit_cox(files, tmp_path):
    out = tmp_path / "labels.csv"
    args = ["heads", "labels", "build", "--diagnoses", str(files["dx"]), "--export", str(files["export"]),
            "--map", str(files["map9"]), "--map", str(files["map10"]), "--follow-up", str(files["fu"]),
            "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "428.2 Heart failure NOS: 1 cases, 0 controls" in r.output and "2 prevalent, 1 by exclusion range" in r.output
    assert "1 of 9 diagnosis rows" in r.output and "labels: " in r.output
    with open(out, newline="") as fh:
        written = list(csv.reader(fh))
    assert written[0] == ["study_key", "label", "time_to_event", "event"] and len(written) == 9  # 8 label rows
    report = json.loads((tmp_path / "labels.report.json").read_text())
    # study keys with diagnoses: private files (the CLI runs under the default umask of the test process)
    assert {oct(p.stat().st_mode & 0o777) for p in (out, tmp_path / "labels.report.json")} == {"0o600"}
    assert {c["phecode"] for c in report["outcomes"]} == {"327.3", "401.1", "425.1", "428.2"}
    # the labels file is what heads fit cox --labels reads
    survival = read_survival_labels(out, load_export(files["export"]))
    _, time, event = survival.by_label["327.3"]
    assert list(time) == [22, 731, 517] and list(event) == [1, 0, 0]

    # a malformed DX file: one line naming the file and the line, exit 2
    _csv(files["dx"], [*DX, ["P1", "I50.9", "ICD10CM", "yesterday"]])
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert f"error: {files['dx']}: line 11: date 'yesterday' is not a date" in " ".join(r.output.split())


@pytest.mark.slow
def test_built_labels_chain_into_fit_cox(tmp_path):
    """Labels built for 80 patients fit a Cox head with ``heads fit cox --labels`` unchanged."""
    rng = np.random.default_rng(3)
    studies = [(f"k{i:03d}", f"P{i:03d}", datetime(2018, 1, 1 + i % 28, 22, 0)) for i in range(80)]
    dx, fu = [DX[0]], [FOLLOW_UP[0]]
    for _, pid, start in studies:
        fu.append([pid, "2023-12-31"])
        if rng.random() < 0.5:
            dx.append([pid, "I50.9", "ICD10CM", f"{2018 + rng.integers(1, 5)}-{rng.integers(1, 13):02d}-15"])
    export = _export(tmp_path / "export", studies)
    for name, rows in (("map.csv", ICD10_MAP), ("dx.csv", dx), ("fu.csv", fu)):
        _csv(tmp_path / name, rows)
    r = runner.invoke(app, ["heads", "labels", "build", "--diagnoses", str(tmp_path / "dx.csv"), "--export",
                            str(export), "--map", str(tmp_path / "map.csv"), "--follow-up", str(tmp_path / "fu.csv"),
                            "--outcome", "428.2", "--out", str(tmp_path / "labels.csv")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["heads", "fit", "cox", "--export", str(export), "--labels", str(tmp_path / "labels.csv"),
                            "--out", str(tmp_path / "head"), "--folds", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "head" / "head.json").read_text())["outcomes"][0]["label"] == "428.2"
