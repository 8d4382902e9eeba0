"""The researchers' export: real stored outputs (the pipeline on short synthetic nights) exported as .npy
files and one Parquet/CSV table, on SQLite and PostgreSQL; resume, skipped studies and unwritable folders."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_env import pipeline_env, spool_file
from pyedflib import highlevel

from gateway.batch import export as export_mod
from gateway.batch.export import ExportError, check_export_dir, export_studies
from gateway.fsutil import atomic_write
from gateway.store.models import State, Study
from gateway.synthetic.night import write_synthetic_night

HOURS = 0.1  # 6 minutes: two 5-minute windows, 12 scored epochs
MODALITIES = ["BAS", "RESP", "EKG", "EMG"]
FIXED = ["source_kind", "state", "duration_s", "modalities", "montage_version", "model_name", "model_hash",
         "model_validated", "age_years", "sex", "demographics_encoding", "tail_tokens", "diagnosis_tokens",
         "ahi3", "ahi4", "odi3", "odi4"]
IDENTIFIERS = ["patient_id", "accession", "study_uid", "recording_start"]


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> list[bytes]:
    """Two synthetic nights; the second carries a scored hypnogram (EDF+ stage annotations)."""
    folder = tmp_path_factory.mktemp("nights")
    plain = write_synthetic_night(folder / "a.edf", hours=HOURS, seed=5).read_bytes()
    night = write_synthetic_night(folder / "b.edf", hours=HOURS, seed=6)
    signals, headers, header = highlevel.read_edf(str(night), digital=True)
    header["annotations"] += [[30.0 * i, 30.0, "Sleep stage W" if i < 4 else "Sleep stage 2"] for i in range(12)]
    highlevel.write_edf(str(folder / "scored.edf"), signals, headers, header, digital=True)
    return [plain, (folder / "scored.edf").read_bytes()]


@pytest.fixture
def processed(db_url, tmp_path, model, nights):
    """A database with two FLAGGED studies (real output folders) and one FAILED study (no outputs)."""
    db, repo, pipe, paths = pipeline_env(db_url, tmp_path, *model)
    for i, data in enumerate([nights[0], b"0       " + b"garbage" * 100, nights[1]]):
        spool_file(paths, "night.edf", data, repo, claim=f"c{i}")
        assert pipe.run_once("w")
    studies = sorted(repo.list(limit=10), key=lambda s: s.id)
    assert [s.state for s in studies] == [State.FLAGGED, State.FAILED, State.FLAGGED]
    yield studies, tmp_path
    db.dispose()


def _hazards(study: Study) -> list[dict[str, str]]:
    with open(Path(study.output_path) / "hazards.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _metrics(study: Study) -> dict:
    return json.loads((Path(study.output_path) / "metrics.json").read_text())


def test_export_writes_npy_files_table_and_outcomes(processed):
    studies, tmp = processed
    good = [s for s in studies if s.state == State.FLAGGED]
    failed = next(s for s in studies if s.state == State.FAILED)
    out = tmp / "export"
    report = export_studies(reversed(studies), out)  # any order in, rows by study id out

    assert report.studies == 2 and report.table == out.resolve() / "studies.parquet" and report.csv is None
    assert report.skipped == [(failed.key, "no stored outputs (state FAILED)")]
    assert report.files_kept == 0 and report.files_written == 2 * (1 + len(MODALITIES))
    for study in good:
        stored, exported = Path(study.output_path), out / "embeddings" / study.key
        assert sorted(p.name for p in exported.iterdir()) == sorted(["night.npy", *(f"{m}.npy" for m in MODALITIES)])
        np.testing.assert_array_equal(np.load(exported / "night.npy"), np.load(stored / "night.npy"))
        assert os.path.samefile(exported / "night.npy", stored / "night.npy")  # one file system: a hard link
        for m in MODALITIES:
            window = np.load(exported / f"{m}.npy")
            assert window.shape == (2, 128)  # the 5-minute sequence, not the tokens
            np.testing.assert_array_equal(window, np.load(stored / "embeddings" / f"{m}_5min.npy"))
    assert not (out / "embeddings" / failed.key).exists()

    table = pd.read_parquet(out / "studies.parquet")
    phecodes = [r["phecode"] for r in _hazards(good[0])]
    sleep_cols = [c for c in table.columns if c.startswith("sleep_")]
    agreement_cols = [c for c in table.columns if c.startswith("agreement_")]
    assert list(table.columns) == ["study_key", *FIXED, *sleep_cols, *agreement_cols, *phecodes]
    assert not set(IDENTIFIERS) & set(table.columns)
    assert list(table.study_key) == [s.key for s in good]
    assert {"sleep_tst_min", "sleep_waso_min", "sleep_stage_min_N2", "sleep_stage_pct_of_tst_REM"} <= set(sleep_cols)
    assert {"agreement_epochs", "agreement_accuracy", "agreement_kappa", "agreement_f1_W"} <= set(agreement_cols)
    assert not any(c.startswith("agreement_confusion") for c in table.columns)  # a matrix is no scalar

    for row, study in zip(table.to_dict("records"), good):
        metrics = _metrics(study)
        assert row["state"] == "FLAGGED" and row["source_kind"] == "file"
        assert row["modalities"] == "BAS|RESP|EKG|EMG" and row["duration_s"] == pytest.approx(360.0)
        assert row["model_name"] == "sleepfm-demo-untrained" and row["model_hash"] == study.bundle_hash
        assert not row["model_validated"] and row["montage_version"] == study.montage_version
        assert row["sex"] == metrics["demographics_used"]["sex"]
        # 6 minutes: one whole window (60 tokens, all the diagnosis head sees) and a 12-token tail
        assert row["demographics_encoding"] == "psg-gateway demo (age-50)/20"
        assert (row["tail_tokens"], row["diagnosis_tokens"]) == (12, 60)
        assert row["sleep_tst_min"] == pytest.approx(metrics["sleep"]["tst_min"])
    # only the scored night has an agreement; the other's cells are null
    by_key = table.set_index("study_key")
    assert pd.isna(by_key.loc[good[0].key, "agreement_kappa"])
    scored = _metrics(good[1])["staging_agreement"]
    assert by_key.loc[good[1].key, "agreement_epochs"] == scored["epochs"] == 12
    assert by_key.loc[good[1].key, "agreement_accuracy"] == pytest.approx(scored["accuracy"])

    # one float32 column per outcome, the stored log hazards
    assert all(table[c].dtype == np.float32 for c in phecodes)
    for study in good:
        stored = np.array([float(r["log_hazard"]) for r in _hazards(study)])
        np.testing.assert_allclose(by_key.loc[study.key, phecodes].to_numpy(dtype=float), stored, rtol=1e-6,
                                   atol=1e-6)
    with open(out / "outcomes.csv", newline="", encoding="utf-8") as f:
        outcomes = list(csv.DictReader(f))
    assert [(o["phecode"], o["phenotype"]) for o in outcomes] == [(r["phecode"], r["phenotype"])
                                                                  for r in _hazards(good[0])]


def test_identifiers_csv_and_tokens(processed):
    studies, tmp = processed
    good = [s for s in studies if s.state == State.FLAGGED]
    out = tmp / "export"
    report = export_studies(studies, out, identifiers=True, csv=True, tokens=True)
    assert report.csv == out.resolve() / "studies.csv"
    assert report.files_written == 2 * (1 + 2 * len(MODALITIES))
    for study in good:
        for m in MODALITIES:
            np.testing.assert_array_equal(np.load(out / "embeddings" / study.key / f"{m}_tokens.npy"),
                                          np.load(Path(study.output_path) / "embeddings" / f"{m}.npy"))

    table = pd.read_parquet(out / "studies.parquet")
    assert list(table.columns[:1 + len(IDENTIFIERS) + len(FIXED)]) == ["study_key", *IDENTIFIERS, *FIXED]
    assert list(table.patient_id) == [s.patient_id for s in good] and all(table.patient_id)
    assert list(table.accession) == [s.accession for s in good]
    assert list(table.recording_start) == [s.recording_start.isoformat() for s in good]

    strings = {c: str for c in table.columns if pd.api.types.is_string_dtype(table[c])}
    from_csv = pd.read_csv(out / "studies.csv", dtype=strings)
    assert list(from_csv.columns) == list(table.columns) and len(from_csv) == len(table)
    for column in table.columns:
        if column in strings:
            assert from_csv[column].tolist() == table[column].tolist(), column
        else:
            np.testing.assert_allclose(from_csv[column].to_numpy(dtype=float), table[column].to_numpy(dtype=float),
                                       rtol=1e-6, err_msg=column)


def test_second_export_keeps_files_and_replaces_a_changed_one(processed):
    studies, tmp = processed
    out = tmp / "export"
    first = export_studies(studies, out)
    again = export_studies(studies, out)
    assert again.files_written == 0 and again.files_kept == first.files_written > 0
    assert again.studies == first.studies == 2
    # a file that differs (an older night re-processed since) is replaced, not kept
    key = studies[0].key
    np.save(out / "embeddings" / key / "night_tmp.npy", np.zeros(3, np.float32))
    os.replace(out / "embeddings" / key / "night_tmp.npy", out / "embeddings" / key / "night.npy")
    third = export_studies(studies, out)
    assert third.files_written == 1
    np.testing.assert_array_equal(np.load(out / "embeddings" / key / "night.npy"),
                                  np.load(Path(studies[0].output_path) / "night.npy"))
    # a study re-processed since (outputs replaced by a rename, same shapes, same size) is exported again
    stored = Path(studies[0].output_path) / "night.npy"
    atomic_write(stored, stored.read_bytes()[:-4] + np.float32(7.0).tobytes())
    fourth = export_studies(studies, out)
    assert fourth.files_written == 1 and np.load(out / "embeddings" / key / "night.npy")[-1] == 7.0
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


def test_another_file_system_gets_copies(processed):
    studies, _ = processed
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(studies[0].output_path).stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to export onto")
    out = Path(tempfile.mkdtemp(dir=shm, prefix="psg-export-test-"))
    try:
        report = export_studies(studies, out, tokens=True)
        assert report.files_written == 2 * (1 + 2 * len(MODALITIES))
        night = out / "embeddings" / studies[0].key / "night.npy"
        stored = Path(studies[0].output_path) / "night.npy"
        assert not os.path.samefile(night, stored)
        np.testing.assert_array_equal(np.load(night), np.load(stored))
        assert export_studies(studies, out, tokens=True).files_kept == report.files_written
    finally:
        shutil.rmtree(out)


def test_readme_example(processed, monkeypatch):
    studies, tmp = processed
    export_studies(studies, tmp / "export")
    monkeypatch.chdir(tmp)
    # --- as in docs/researcher-guide.md, "Export for researchers" ---
    studies_df = pd.read_parquet("export/studies.parquet")
    outcomes = pd.read_csv("export/outcomes.csv", dtype=str)
    key = studies_df.study_key[0]
    night = np.load(f"export/embeddings/{key}/night.npy")
    bas = np.load(f"export/embeddings/{key}/BAS.npy")
    x = np.stack([np.load(f"export/embeddings/{k}/night.npy") for k in studies_df.study_key])
    y = studies_df[outcomes.phecode]
    # ---
    assert night.shape == (512,) and night.dtype == np.float32 and bas.shape == (2, 128)
    assert x.shape == (2, 512) and y.shape == (2, len(outcomes))


def test_outcome_lists_that_differ_and_studies_without_hazards(processed, monkeypatch):
    """Transient Study rows over copies of real output folders: hazards missing, one outcome short, one extra;
    blocks of two rows so the column chunks are exercised too."""
    studies, tmp = processed
    source = Path(studies[0].output_path)
    phecodes = [r["phecode"] for r in _hazards(studies[0])]
    monkeypatch.setattr(export_mod, "_BLOCK_ROWS", 2)

    def copy(name: str, edit) -> str:
        folder = tmp / "copies" / name
        shutil.copytree(source, folder)
        rows = _hazards(studies[0])
        with open(folder / "hazards.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(edit(rows))
        return str(folder)

    no_hazards = tmp / "copies" / "none"
    shutil.copytree(source, no_hazards)
    (no_hazards / "hazards.csv").unlink()
    extra = {"index": "999", "phecode": "999.9", "phenotype": "Not in the first list", "log_hazard": "1.5",
             "hazard_ratio": "4.48"}
    folders = [str(no_hazards), str(source), copy("short", lambda rows: rows[1:]),
               copy("extra", lambda rows: [*rows, extra]), str(no_hazards)]
    rows = [Study(id=10 + i, key=f"{i:032x}", state="FLAGGED", source_kind="file", output_path=folder)
            for i, folder in enumerate(folders)]
    rows.append(Study(id=99, key="f" * 32, state="FLAGGED", source_kind="file", output_path=str(tmp / "gone")))
    report = export_studies(rows, tmp / "export")
    assert report.studies == 5
    assert report.skipped == [("f" * 32, "night.npy missing from its output folder (state FLAGGED)")]

    table = pd.read_parquet(tmp / "export" / "studies.parquet")
    assert list(table.columns[-len(phecodes):]) == phecodes and "999.9" not in table.columns
    values = table[phecodes]
    assert values.iloc[0].isna().all() and values.iloc[4].isna().all()  # no hazards: null
    stored = np.array([float(r["log_hazard"]) for r in _hazards(studies[0])], dtype=np.float32)
    np.testing.assert_array_equal(values.iloc[1].to_numpy(np.float32), stored)
    np.testing.assert_array_equal(values.iloc[3].to_numpy(np.float32), stored)
    assert np.isnan(values.iloc[2][phecodes[0]])  # the outcome this study lacks is NaN
    np.testing.assert_array_equal(values.iloc[2].to_numpy(np.float32)[1:], stored[1:])
    # in Arrow terms: null for the studies without hazards, NaN (a value) for the missing outcome
    arrow = pq.read_table(tmp / "export" / "studies.parquet")
    assert arrow.column(phecodes[0]).null_count == 2 and arrow.column(phecodes[1]).null_count == 2
    assert arrow.schema.field(phecodes[0]).type == pa.float32()


def test_check_export_dir_creates_and_refuses(tmp_path):
    made = check_export_dir(tmp_path / "a" / "b")
    assert made == (tmp_path / "a" / "b").resolve() and made.is_dir() and not any(made.iterdir())

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ExportError, match=r"cannot create export folder .*file\.txt/sub: Not a directory"):
        check_export_dir(blocker / "sub")
    with pytest.raises(ExportError, match=r"file\.txt is a file, not a folder"):
        check_export_dir(blocker)
    with pytest.raises(ExportError, match="is a file"):
        export_studies([], blocker)


def test_check_export_dir_refuses_a_read_only_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: root writes into a 0500 folder, so there is nothing to refuse")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ExportError, match=r"locked is not writable: Permission denied"):
            check_export_dir(locked)
        with pytest.raises(ExportError, match="Permission denied"):
            check_export_dir(locked / "sub")
    finally:
        locked.chmod(0o700)


# ---- identifier columns are never dropped silently ---------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and its modification time (ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_export_with_identifiers_is_not_rewritten_without_them(processed):
    studies, tmp = processed
    out = tmp / "export"
    export_studies(studies, out, identifiers=True, csv=True)
    before = _snapshot(out)
    with pytest.raises(ExportError) as info:
        export_studies(studies, out)
    message = str(info.value)
    assert "\n" not in message and "--export-identifiers" in message and "--drop-identifiers" in message
    assert "patient_id, accession, study_uid, recording_start" in message
    assert _snapshot(out) == before  # refused before anything was written
    # keeping them is no loss: refused neither
    export_studies(studies, out, identifiers=True, csv=True)
    assert "patient_id" in pq.read_schema(out / "studies.parquet").names


def test_drop_identifiers_drops_them_from_the_table_and_a_stale_csv(processed):
    studies, tmp = processed
    out = tmp / "export"
    export_studies(studies, out, identifiers=True, csv=True)
    report = export_studies(studies, out, drop_identifiers=True)
    assert report.studies == 2 and report.csv is None
    assert not set(IDENTIFIERS) & set(pq.read_schema(out / "studies.parquet").names)
    assert not (out / "studies.csv").exists()  # the old CSV held the patient ids the user dropped
    assert export_mod.identifier_columns(out) == []
    export_studies(studies, out)  # nothing left to lose: the next plain export goes through


def test_only_a_csv_with_identifiers_is_enough_to_refuse(processed):
    """An older run wrote studies.csv with identifiers; the Parquet table was rewritten since without them."""
    studies, tmp = processed
    out = tmp / "export"
    export_studies(studies, out)
    (out / "studies.csv").write_text("study_key,patient_id\nabc,P1\n")
    with pytest.raises(ExportError, match=r"identifier columns \(patient_id\)"):
        export_studies(studies, out, csv=True)
    assert (out / "studies.csv").read_text() == "study_key,patient_id\nabc,P1\n"


def _batch_config(tmp_path: Path, db_url: str) -> Path:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"paths": {"var_dir": str(tmp_path / "var")}, "database": {"url": db_url},
                                    "logging": {"format": "json", "level": "warning"},
                                    "pipeline": {"write_report": False}}))
    return path


def test_batch_refuses_to_drop_identifier_columns_then_drops_them_when_asked(processed, db_url, nights):
    """``batch --export DIR`` over an export with patient_id, without --export-identifiers: exit 2 before any
    work, one line naming both flags, the old export byte-identical; with --drop-identifiers it is rewritten
    without them."""
    from typer.testing import CliRunner

    from gateway.cli.main import app

    studies, tmp = processed
    out = tmp / "export"
    export_studies(studies, out, identifiers=True, csv=True)
    before = _snapshot(out)
    archive = tmp / "archive"
    archive.mkdir()
    (archive / "n.edf").write_bytes(nights[0])
    cfg = _batch_config(tmp / "batch", db_url)
    base = ["batch", str(archive), "--config", str(cfg), "--no-progress", "--json", "--export", str(out)]

    r = CliRunner().invoke(app, base)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "--export-identifiers" in errors[0] and "--drop-identifiers" in errors[0]
    assert _snapshot(out) == before
    assert not (tmp / "batch" / "var" / "batch").exists()  # no run was started

    bad = CliRunner().invoke(app, [*base, "--drop-identifiers", "--export-identifiers"])
    assert bad.exit_code == 2 and "--drop-identifiers goes with --export" in bad.output
    assert _snapshot(out) == before

    r = CliRunner().invoke(app, [*base, "--drop-identifiers"])
    assert r.exit_code == 0, r.output
    table = pd.read_parquet(out / "studies.parquet")
    assert len(table) == 1 and not set(IDENTIFIERS) & set(table.columns)
    assert not (out / "studies.csv").exists()
    assert json.loads(r.stdout)["options"]["export_drop_identifiers"] is True
