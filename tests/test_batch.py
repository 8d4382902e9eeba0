"""``psg-gateway batch``: a whole archive through the daemon's pipeline, on SQLite and PostgreSQL.

The command is driven as a user runs it: ``typer``'s CliRunner in this process for most tests (fast:
the model stays warm), the installed ``psg-gateway`` in its own process for ``kill -9`` and Ctrl-C.
Inputs are short synthetic nights (EDF) and a synthetic DICOM waveform study, written per test.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from peers import free_port
from pyedflib import highlevel
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from gateway.batch.work import hash_file
from gateway.cli.main import app
from gateway.config import PipelineConfig, load_config
from gateway.metrics import Metrics
from gateway.montage.holder import MontageHolder
from gateway.pipeline.flags import watched_hazards
from gateway.pipeline.outputs import read_hazards
from gateway.pipeline.runner import Pipeline
from gateway.readers.edf_header import read_header
from gateway.store.batch_repo import BatchRepo
from gateway.store.db import make_engine, upgrade
from gateway.store.models import (
    PIPELINE_DONE,
    ArchiveFile,
    BatchRun,
    Event,
    Message,
    MessageState,
    Output,
    ReferenceHazard,
    State,
    Study,
)
from gateway.store.repo import Repo
from gateway.synthetic.dicom_study import write_psg_study
from gateway.synthetic.night import DEFAULT_BENCH_CHANNELS, SyntheticChannel, write_synthetic_night
from inference.bundle import ensure_demo_bundle, load_bundle
from inference.engine import Engine, EngineOptions

pytestmark = pytest.mark.e2e

HOURS = 0.1  # 6 minutes: two 5-minute windows per modality; a study takes well under a second
NODE = "testnode"
EXE = Path(sys.executable).with_name("psg-gateway")
ALL_MODALITIES = {"BAS", "RESP", "EKG", "EMG"}
cli = CliRunner()


# ---- configuration, the command, the database ---------------------------------------------------------------
def _config(tmp_path: Path, db_url: str, **sections: dict) -> Path:
    doc: dict = {"paths": {"var_dir": str(tmp_path / "var")}, "database": {"url": db_url},
                 "service": {"node_name": NODE}, "logging": {"format": "json", "level": "info"},
                 "batch": {"progress_interval_seconds": 0.05},
                 "pipeline": {"write_report": False}}  # reports are tested in test_report
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _batch(cfg: Path, *args: object):
    """``psg-gateway batch ARGS --config CFG --no-progress --json`` in this process."""
    return cli.invoke(app, ["batch", *map(str, args), "--config", str(cfg), "--no-progress", "--json"])


def _doc(result) -> dict:
    """The summary (or dry-run plan) the command printed as JSON on stdout."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{result.exception!r}\n{result.output[-3000:]}")
    return json.loads(result.stdout)


def _log_events(text: str, event: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [x for x in lines if event is None or x.get("event") == event]


def _flat(text: str) -> str:
    """Rich wraps (and folds long words of) error messages at the console width: compare without whitespace."""
    return "".join(text.split())


@pytest.fixture
def repo(db_url):
    engine = make_engine(db_url)
    yield Repo(engine)
    engine.dispose()


def _studies(repo: Repo) -> list[Study]:
    with repo.sessions() as s:
        return list(s.scalars(select(Study).order_by(Study.id)))


def _runs(repo: Repo) -> list[BatchRun]:
    with repo.sessions() as s:
        return list(s.scalars(select(BatchRun).order_by(BatchRun.id)))


def _count(repo: Repo, model) -> int:
    upgrade(repo.engine)  # a run stopped before its preflight reached the database leaves it empty
    with repo.sessions() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def _inferred(repo: Repo) -> Counter[tuple[int, int]]:
    """(study id, version) -> how many ``study.inferred`` events: the model ran that many times."""
    with repo.sessions() as s:
        rows = s.execute(select(Event.study_id, Event.version).where(Event.event == "study.inferred")).all()
    return Counter((sid, version) for sid, version in rows)


def _finished(repo: Repo) -> int:
    """Studies whose worker part is over (polled while another process runs the batch)."""
    try:
        with repo.sessions() as s:
            return s.scalar(select(func.count()).select_from(Study).where(
                Study.state.in_([str(x) for x in PIPELINE_DONE]))) or 0
    except DBAPIError:  # the batch has not created the tables yet
        return 0


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: (size, mtime_ns, sha256)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        out[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns,
                                                  hashlib.sha256(path.read_bytes()).hexdigest())
    return out


# ---- archives -------------------------------------------------------------------------------------------------
CORRUPT = b"0       " + b"x" * 100  # starts like an EDF header, 108 bytes long


def _nights(folder: Path, seeds, prefix: str = "night") -> list[Path]:
    return [write_synthetic_night(folder / f"{prefix}-{seed}.edf", hours=HOURS, seed=seed) for seed in seeds]


def _night_with_header(path: Path, seed: int, **header: str) -> Path:
    """A synthetic night whose EDF+ header carries the given patient fields (patientname, patientcode...)."""
    base = write_synthetic_night(path.with_suffix(".base.edf"), hours=HOURS, seed=seed)
    signals, headers, main = highlevel.read_edf(str(base), digital=True)
    main.update(header)
    highlevel.write_edf(str(path), signals, headers, main, digital=True)
    base.unlink()
    return path


@dataclass
class Mixed:
    root: Path
    phi_file: Path
    sidecar: dict
    header_only: list[str]  # identifiers only the header holds (the sidecar overrides them)


def _mixed_archive(root: Path) -> Mixed:
    """3 EDF nights (one with identifiers in its header, its file name and a sidecar), a corrupt EDF,
    a DICOM study of 3 instances in a subfolder, and a text file."""
    site = root / "site"
    _nights(site, (10, 11))
    phi = _night_with_header(site / "Quixote_Dulcinea_MRN9071731.edf", 12,
                             patientname="Quixote_Dulcinea", patientcode="HDR-447120")
    sidecar = {"patient_id": "MRN9071731", "accession": "ACC5550123"}
    phi.with_suffix(".json").write_text(json.dumps(sidecar))
    (site / "corrupt.edf").write_bytes(CORRUPT)
    (site / "notes.txt").write_text("scored by hand, see the paper chart\n")
    write_psg_study(root / "dicom" / "study-1", hours=HOURS, seed=3)
    return Mixed(root, phi, sidecar, ["HDR-447120", "Quixote", "Dulcinea"])


# ---- 1-2, 10-12: a mixed archive ---------------------------------------------------------------------------
def test_mixed_archive_processes_every_study_once_and_reports_the_corrupt_file(tmp_path, db_url, repo):
    arch = _mixed_archive(tmp_path / "archive")
    before = _snapshot(arch.root)
    r = _batch(_config(tmp_path, db_url), arch.root)
    doc = _doc(r)
    assert r.exit_code == 1, r.output  # finished, with a failure
    assert doc["status"] == "finished"
    assert doc["studies"] == {"found": 5, "processed": 4, "failed": 1}  # the DICOM study counted once
    assert doc["processed_by_state"] == {"FLAGGED": 4}  # hl7 disabled: flags stored, nothing to send
    assert doc["skipped_files"] == {"not a PSG file": 2}  # the sidecar and the text file
    [group] = doc["failures_by_reason"]
    assert group["reason"].startswith("unreadable input") and group["count"] == 1
    assert [f["file"] for f in group["studies"]] == ["site/corrupt.edf"]

    studies = _studies(repo)
    assert Counter(s.state for s in studies) == {State.FLAGGED: 4, State.FAILED: 1}
    assert {s.batch_run_id for s in studies} == {doc["run"]}
    [failed] = [s for s in studies if s.state == State.FAILED]
    assert failed.key == group["studies"][0]["study_key"] and failed.last_error == group["reason"]
    [dicom] = [s for s in studies if s.source_kind == "dicom"]
    assert dicom.state == State.FLAGGED and len(repo.instances_of(dicom.id)) == 3
    [phi] = [s for s in studies if s.input_name == arch.phi_file.name]
    assert (phi.patient_id, phi.accession) == (arch.sidecar["patient_id"], arch.sidecar["accession"])

    var = tmp_path / "var"
    for study in studies:
        if study.state == State.FLAGGED:
            out = Path(study.output_path)
            assert out == var / "outputs" / study.key
            assert np.load(out / "night.npy").shape == (512,)
            assert (out / "hazards.csv").is_file() and (out / "metrics.json").is_file()
            # the same stage times as the daemon and infer write: the worker's part joined to the engine's
            timings = json.loads((out / "metrics.json").read_text())["timings_s"]
            assert {"read", "preprocess", "encode", "heads"} <= set(timings), timings
    assert (var / "quarantine" / failed.key / "REASON.txt").is_file()
    assert _snapshot(arch.root) == before  # nothing moved, changed or added in the archive

    summary = var / "batch" / f"run-{doc['run']}" / "summary.json"
    for path in (summary, summary.with_suffix(".txt")):
        assert path.is_file() and path.stat().st_mode & 0o777 == 0o600, path
    assert json.loads(summary.read_text()) == doc
    assert "site/corrupt.edf" in summary.with_suffix(".txt").read_text()
    [run] = _runs(repo)
    assert (run.id, run.status, run.host) == (doc["run"], "finished", NODE)
    assert run.finished_at is not None and run.summary["studies"] == doc["studies"]


def test_the_engine_in_its_own_thread_gives_the_same_results(tmp_path, monkeypatch):
    """As on CUDA: the engine runs in its own thread with a second call queued while the runner records
    the finished studies; every study ends as it does with the engine in the runner's thread."""
    import functools
    import threading

    import gateway.batch.runner as runner_module
    from inference.engine import Engine

    root = tmp_path / "archive"
    _nights(root, (60, 61, 62))
    ran_in: list[str] = []
    run_many = Engine.run_many

    def recorded(self, *args, **kwargs):
        ran_in.append(threading.current_thread().name)
        return run_many(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "run_many", recorded)
    outputs = {}
    original = runner_module.LocalBackend
    for mode in (False, True):
        work = tmp_path / f"own-thread-{mode}"
        work.mkdir()
        monkeypatch.setattr(runner_module, "LocalBackend",
                            functools.partial(original, engine_thread=mode))
        ran_in.clear()
        r = _batch(_config(work, f"sqlite:///{work / 'gateway.db'}", batch={"nights_per_call": 2}), root,
                   "--workers", "1")
        doc = _doc(r)
        assert r.exit_code == 0, r.output
        assert doc["studies"] == {"found": 3, "processed": 3} and doc["processed_by_state"] == {"FLAGGED": 3}
        assert ran_in and all(name.startswith("psg-engine") == mode for name in ran_in), ran_in
        store = make_engine(f"sqlite:///{work / 'gateway.db'}")
        try:  # by input file: study keys are random
            outputs[mode] = {s.input_name: np.load(Path(s.output_path) / "night.npy") for s in _studies(Repo(store))}
        finally:
            store.dispose()
    assert len(outputs[True]) == 3 and outputs[True].keys() == outputs[False].keys()
    for key, night in outputs[False].items():
        np.testing.assert_array_equal(outputs[True][key], night)


def test_second_run_on_the_same_archive_processes_nothing_again(tmp_path, db_url, repo, monkeypatch):
    arch = _mixed_archive(tmp_path / "archive")
    cfg = _config(tmp_path, db_url)
    first = _doc(_batch(cfg, arch.root, "--workers", "0"))
    assert first["studies"]["processed"] == 4
    before = {s.id: (s.state, s.version, s.output_path) for s in _studies(repo)}
    inferred = _inferred(repo)
    outputs = _count(repo, Output)
    # Every EDF file's hash is cached under its path, size and mtime (the DICOM study is known by UIDs).
    with repo.sessions() as s:
        cached = {Path(a.path).name: a.sha256 for a in s.scalars(select(ArchiveFile))}
    assert cached == {p.name: hash_file(str(p)).sha256 for p in (arch.root / "site").glob("*.edf")}

    def no_hashing(path):
        raise AssertionError(f"an unchanged archive file was read again: {path}")

    monkeypatch.setattr("gateway.batch.backends.hash_file", no_hashing)
    r = _batch(cfg, arch.root, "--workers", "0")
    doc = _doc(r)
    assert r.exit_code == 0, r.output
    assert doc["studies"] == {"found": 5, "already_done": 4, "failed_before": 1}
    assert {s.id: (s.state, s.version, s.output_path) for s in _studies(repo)} == before  # no new rows or versions
    assert _inferred(repo) == inferred and _count(repo, Output) == outputs
    assert [run.status for run in _runs(repo)] == ["finished", "finished"]


def test_export_writes_one_row_per_processed_study_and_loadable_embeddings(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, (20, 21))
    (root / "corrupt.edf").write_bytes(CORRUPT)
    export = tmp_path / "export"
    r = _batch(_config(tmp_path, db_url), root, "--export", export, "--export-csv")
    doc = _doc(r)
    assert r.exit_code == 1, r.output
    done = {s.key: s for s in _studies(repo) if s.state == State.FLAGGED}
    [failed] = [s.key for s in _studies(repo) if s.state == State.FAILED]
    assert len(done) == 2 and doc["export"]["studies"] == 2

    table = pd.read_parquet(export / "studies.parquet")
    assert sorted(table["study_key"]) == sorted(done) and failed not in set(table["study_key"])
    assert "patient_id" not in table.columns  # identifiers only with --export-identifiers
    assert sorted(pd.read_csv(export / "studies.csv")["study_key"]) == sorted(done)
    for key, study in done.items():
        night = np.load(export / "embeddings" / key / "night.npy")
        assert night.shape == (512,) and night.dtype == np.float32
        np.testing.assert_array_equal(night, np.load(Path(study.output_path) / "night.npy"))
    assert not (export / "embeddings" / failed).exists()


def test_a_failed_export_still_ends_the_run_with_its_summary(tmp_path, db_url, repo, monkeypatch):
    """The export comes after every study is stored: when it fails (here a table-column clash, which a
    real archive would need a site label such as 'sex' to produce), the run ends with its summary."""
    from gateway.batch import runner as runner_mod
    from gateway.batch.export import ExportError

    def clash(*_a, **_k):
        raise ExportError("outcome phecodes ['sex'] clash with table columns of the same name")

    monkeypatch.setattr(runner_mod, "export_studies", clash)
    root = tmp_path / "archive"
    _nights(root, (24,))
    r = _batch(_config(tmp_path, db_url), root, "--export", tmp_path / "export")
    doc = _doc(r)
    assert r.exit_code == 1, r.output
    assert doc["studies"]["processed"] == 1 and "clash" in doc["export_error"] and "export" not in doc
    assert [s.state for s in _studies(repo)] == [State.FLAGGED]


def test_processed_studies_seed_the_reference_distribution(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, (22, 23))
    cfg = _config(tmp_path, db_url)
    assert _batch(cfg, root).exit_code == 0
    flags = load_config(cfg).flags
    with repo.sessions() as s:
        rows = list(s.scalars(select(ReferenceHazard)))
    studies = _studies(repo)
    assert {r.study_id for r in rows} == {s.id for s in studies} and len(studies) == 2
    for study in studies:
        mine = {r.label: r.log_hazard for r in rows if r.study_id == study.id}
        expected = watched_hazards(flags, read_hazards(Path(study.output_path)))
        assert mine and mine == pytest.approx(expected)
        assert {r.model_hash for r in rows if r.study_id == study.id} == {study.bundle_hash}
        assert study.bundle_hash


def test_progress_lines_count_the_run_and_no_log_line_carries_identifiers(tmp_path, db_url, repo):
    arch = _mixed_archive(tmp_path / "archive")
    r = _batch(_config(tmp_path, db_url), arch.root, "--threads", 1)
    assert r.exit_code == 1, r.output
    [threads] = _log_events(r.stderr, "engine.threads")  # the engine's threads and why, once
    assert (threads["threads"], threads["reason"]) == (1, "--threads 1") and threads["physical_cores"] >= 1
    progress = _log_events(r.stderr, "batch.progress")
    assert len(progress) >= 2 and {p["total"] for p in progress} == {5}
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert (progress[-1]["done"], progress[-1]["processed"], progress[-1]["failed"]) == (5, 4, 1)
    assert any(e["event"] == "study.inferred" for e in _log_events(r.stderr))  # per-study lines were logged

    identifiers = set(arch.header_only) | {arch.phi_file.stem}
    for study in _studies(repo):
        identifiers |= {v for v in (study.patient_id, study.patient_name, study.accession) if v}
        if study.birth_date:
            identifiers.add(study.birth_date.isoformat())
    assert {arch.sidecar["patient_id"], arch.sidecar["accession"]} <= identifiers
    assert len(identifiers) >= 8  # the EDF's and the DICOM study's identifiers were decoded and stored
    for value in identifiers:
        assert value not in r.stderr, f"identifier {value!r} in a log line"
        if value != arch.phi_file.stem:  # file names may be in the summary, identifiers may not
            assert value not in r.stdout, f"identifier {value!r} in the summary"


# ---- 3: the daemon's studies ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon_model():
    bundle = load_bundle(ensure_demo_bundle())
    return bundle, Engine(bundle, EngineOptions(device="cpu"))


def _daemon_study(repo: Repo, cfg_path: Path, source: Path, claim: str) -> Study:
    """Register ``source``'s bytes as the daemon's drop folder does (a copy in the spool, no batch run)."""
    paths = load_config(cfg_path).paths
    folder = paths.spool / "incoming" / claim
    folder.mkdir(parents=True)
    data = source.read_bytes()
    (folder / source.name).write_bytes(data)
    (folder / "claim.json").write_text("{}")
    return repo.register_file(source="folder:/drop", path=str(folder / source.name), name=source.name,
                              sha256=hashlib.sha256(data).hexdigest(), filename_pattern=None,
                              actor="folder:/drop").study


def _daemon_setup(tmp_path, db_url, repo, daemon_model) -> tuple[Path, Path, Study, Study]:
    """An archive of two nights; the daemon finished the first one and the second waits for its worker."""
    root = tmp_path / "archive"
    done_night, waiting_night = _nights(root, (24, 25))
    cfg = _config(tmp_path, db_url)
    upgrade(repo.engine)
    paths = load_config(cfg).paths
    for p in (paths.outputs, paths.processed, paths.quarantine):
        p.mkdir(parents=True, exist_ok=True)
    bundle, engine = daemon_model
    pipeline = Pipeline(repo, bundle, MontageHolder(None), paths, PipelineConfig(), Metrics(), engine=engine)
    done = _daemon_study(repo, cfg, done_night, "c1")
    assert pipeline.run_once(f"{NODE}:w0")
    waiting = _daemon_study(repo, cfg, waiting_night, "c2")
    done = repo.get(done.id)
    assert (done.state, waiting.state) == (State.FLAGGED, State.READY)
    return cfg, root, done, waiting


def test_studies_of_the_daemon_in_the_archive_are_not_processed_by_the_batch(tmp_path, db_url, repo, daemon_model):
    cfg, root, done, waiting = _daemon_setup(tmp_path, db_url, repo, daemon_model)
    inferred = _inferred(repo)
    r = _batch(cfg, root)
    doc = _doc(r)
    assert r.exit_code == 0, r.output
    assert "processed" not in doc["studies"] and doc["studies"]["found"] == 2
    assert _inferred(repo) == inferred == Counter({(done.id, 1): 1})  # the model ran once, in the daemon
    after_done, after_waiting = repo.get(done.id), repo.get(waiting.id)
    assert (after_done.state, after_done.version, after_done.batch_run_id) == (State.FLAGGED, 1, None)
    # the waiting one is still the daemon's: not adopted, not claimed
    assert (after_waiting.state, after_waiting.batch_run_id, after_waiting.claimed_by) == (State.READY, None, None)
    assert repo.claim(f"{NODE}:w0", 60).id == waiting.id


def test_summary_counts_daemon_studies_as_already_processed_or_with_the_daemon(tmp_path, db_url, repo,
                                                                                daemon_model):
    cfg, root, _done, _waiting = _daemon_setup(tmp_path, db_url, repo, daemon_model)
    doc = _doc(_batch(cfg, root))
    assert doc["studies"] == {"found": 2, "already_done": 1, "daemon": 1}


def test_daemon_workers_never_claim_a_batch_study(db_url, repo):
    upgrade(repo.engine)
    brepo = BatchRepo(repo)
    run_id = brepo.start_run(NODE, {})
    mine = repo.register_file(source="archive:/a", path="/a/n.edf", name="n.edf", sha256="a" * 64,
                              filename_pattern=None, actor=f"batch:{NODE}:1", batch_run_id=run_id,
                              stamp=(10, 20)).study
    assert mine.state == State.READY and mine.batch_run_id == run_id
    assert repo.claim(f"{NODE}:w0", 60) is None
    theirs = _register_plain(repo, "b" * 64)
    assert repo.claim(f"{NODE}:w0", 60).id == theirs.id  # the daemon's own study is claimable
    assert repo.claim(f"{NODE}:w1", 60) is None
    taken = brepo.claim_study(mine, f"batch:{NODE}:{os.getpid()}", 60)
    assert taken is not None and taken.claimed_by == f"batch:{NODE}:{os.getpid()}"


def _register_plain(repo: Repo, sha: str) -> Study:
    return repo.register_file(source="folder:/drop", path=f"/drop/{sha[:4]}.edf", name="x.edf", sha256=sha,
                              filename_pattern=None, actor="folder:/drop").study


# ---- 4: resume --------------------------------------------------------------------------------------------
def test_limit_then_rerun_processes_the_rest_each_study_exactly_once(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, (30, 31, 32, 33))
    cfg = _config(tmp_path, db_url)
    r = _batch(cfg, root, "--limit", "2")
    assert r.exit_code == 0, r.output
    assert _doc(r)["studies"] == {"found": 4, "processed": 2, "not_reached": 2}
    first = {s.id for s in _studies(repo) if s.state == State.FLAGGED}
    assert len(first) == 2

    r = _batch(cfg, root)
    assert r.exit_code == 0, r.output
    assert _doc(r)["studies"] == {"found": 4, "processed": 2, "already_done": 2}
    studies = _studies(repo)
    assert len(studies) == 4 and {s.state for s in studies} == {State.FLAGGED}
    assert {s.input_name for s in studies} == {p.name for p in root.iterdir()}
    assert _inferred(repo) == Counter({(s.id, 1): 1 for s in studies})  # each night inferred once


def test_study_claimed_by_a_dead_batch_process_is_taken_over_at_once(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    crashed_night, _other = _nights(root, (34, 35))
    cfg = _config(tmp_path, db_url)
    upgrade(repo.engine)
    brepo = BatchRepo(repo)
    old_run = brepo.start_run(NODE, {"archives": [str(root)]})
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_worker = f"batch:{NODE}:{gone.pid}"
    hashed = hash_file(str(crashed_night))
    study = repo.register_file(source=f"archive:{root}", path=str(crashed_night), name=crashed_night.name,
                               sha256=hashed.sha256, filename_pattern=None, actor=dead_worker,
                               batch_run_id=old_run, stamp=(hashed.size, hashed.mtime_ns)).study
    study = brepo.claim_study(study, dead_worker, lease_seconds=3600)
    study = repo.transition(study, State.DECODED, dead_worker, "study.decoded", {})
    assert study.claimed_by == dead_worker and study.lease_until is not None  # a live lease, for an hour

    r = _batch(cfg, root)
    doc = _doc(r)
    assert r.exit_code == 0, r.output
    assert doc["studies"] == {"found": 2, "processed": 2}
    [started] = _log_events(r.stderr, "batch.started")
    assert started["leases_freed"] == 1
    after = repo.get(study.id)
    assert (after.state, after.claimed_by, after.lease_until) == (State.FLAGGED, None, None)
    assert after.batch_run_id == doc["run"] != old_run  # adopted by the new run
    events = Counter(e.event for e in repo.events(study.id))
    # resumed from DECODED: not decoded a second time, mapped and inferred once
    assert (events["study.decoded"], events["study.mapped"], events["study.inferred"]) == (1, 1, 1)


def test_restart_processes_the_archive_again_as_new_versions(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, (36,))
    (root / "corrupt.edf").write_bytes(CORRUPT)
    cfg = _config(tmp_path, db_url)
    assert _batch(cfg, root).exit_code == 1
    r = _batch(cfg, root, "--restart")
    assert _doc(r)["studies"] == {"found": 2, "processed": 1, "failed": 1}
    [good] = [s for s in _studies(repo) if s.state == State.FLAGGED]
    assert good.version == 2
    assert _inferred(repo) == Counter({(good.id, 1): 1, (good.id, 2): 1})


# ---- 5-6: a real kill and Ctrl-C ----------------------------------------------------------------------------------
def _start(cfg: Path, root: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSG__")}
    with open(log, "ab") as stderr:  # the child has its own copy of the descriptor
        return subprocess.Popen([str(EXE), "batch", str(root), "--config", str(cfg), "--no-progress", *args],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def _wait_for(check: Callable[[], bool], proc: subprocess.Popen | None, log: Path | None,
              timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"batch exited {proc.returncode} first:\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie stays until the container's init reaps it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")


def _end_orphans(pids: list[int]) -> None:
    """Workers the killed batch left behind (processes this test started): stop them. Only the pool's
    workers are killed; multiprocessing's resource tracker then sees its pipe close, unlinks the
    pool's semaphores (``/dev/shm/sem.mp-*``) and exits by itself (killed only if it does not)."""

    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes() if _running(pid) else b""
        except OSError:
            return b""

    workers = [p for p in pids if b"multiprocessing.spawn" in cmdline(p)]
    trackers = [p for p in pids if b"resource_tracker" in cmdline(p)]
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(_running(p) for p in trackers) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in trackers:
        try:
            if b"resource_tracker" in cmdline(pid):
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_kill_9_mid_run_then_a_rerun_infers_every_study_exactly_once(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, range(40, 50))
    cfg = _config(tmp_path, db_url)
    log = tmp_path / "batch.log"
    proc = _start(cfg, root, log, "--workers", "1")  # a worker process and spill files, as on a bigger machine
    orphans: list[int] = []
    try:
        _wait_for(lambda: _finished(repo) >= 1, proc, log)
        orphans = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        done_before = _finished(repo)
        assert 1 <= done_before < 10, "killed mid-run"
        r = _batch(cfg, root, "--workers", "1")
        doc = _doc(r)
        assert r.exit_code == 0, r.output
        assert doc["studies"] == {"found": 10, "processed": 10 - done_before, "already_done": done_before}
        studies = _studies(repo)
        assert len(studies) == 10 and {(s.state, s.claimed_by) for s in studies} == {(State.FLAGGED, None)}
        assert _inferred(repo) == Counter({(s.id, s.version): 1 for s in studies})
        spill = tmp_path / "var" / "batch" / "spill"
        assert not list(spill.glob("*.signals")) if spill.exists() else True
        assert not Path(f"/dev/shm/psg-batch-{os.getpid()}").exists()  # the re-run removed its own spill folder
    finally:
        _end_orphans(orphans)
        shutil.rmtree(f"/dev/shm/psg-batch-{proc.pid}", ignore_errors=True)


@pytest.mark.slow
def test_worker_processes_exit_when_the_batch_is_killed(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, range(50, 54))
    log = tmp_path / "batch.log"
    proc = _start(_config(tmp_path, db_url), root, log, "--workers", "1")
    workers: list[int] = []
    try:
        _wait_for(lambda: _finished(repo) >= 1, proc, log)
        workers = _children(proc.pid)
        assert workers, "the batch started worker processes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(_running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if _running(p)], "orphaned batch workers still running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _end_orphans(workers)
        shutil.rmtree(f"/dev/shm/psg-batch-{proc.pid}", ignore_errors=True)


def _shm_has_room() -> bool:
    shm = Path("/dev/shm")
    return shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 2 << 30


@pytest.mark.skipif(not _shm_has_room(), reason="/dev/shm is not used for spill files here")
def test_a_rerun_removes_the_spill_files_of_a_killed_batch(tmp_path, db_url):
    root = tmp_path / "archive"
    _nights(root, (54,))
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = Path(f"/dev/shm/psg-batch-{gone.pid}")
    stale.mkdir(exist_ok=True)
    (stale / f"st-000000000000.{gone.pid + 1}.signals").write_bytes(b"\0" * 4096)
    try:
        r = _batch(_config(tmp_path, db_url), root, "--workers", "1")
        assert r.exit_code == 0, r.output
        assert not Path(f"/dev/shm/psg-batch-{os.getpid()}").exists()
        assert not stale.exists(), "spill folder of a dead batch left in /dev/shm"
    finally:
        shutil.rmtree(stale, ignore_errors=True)


@pytest.mark.slow
def test_ctrl_c_stops_in_order_and_a_rerun_finishes_the_rest(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, range(60, 70))
    cfg = _config(tmp_path, db_url)
    log = tmp_path / "batch.log"
    proc = _start(cfg, root, log)
    try:
        _wait_for(lambda: _finished(repo) >= 1, proc, log)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # stuck: where every thread waits (gateway.cli's SIGUSR2 dump)
            proc.send_signal(signal.SIGUSR2)
            time.sleep(2)
            pytest.fail(f"the batch did not stop within 120 s of Ctrl-C:\n{log.read_text()[-6000:]}")
        assert code == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done_before = _finished(repo)
    assert 1 <= done_before < 10, "interrupted mid-run"
    [run] = _runs(repo)
    assert run.status == "interrupted" and run.finished_at is not None
    assert run.summary["studies"]["interrupted"] >= 1
    summary = json.loads((tmp_path / "var" / "batch" / f"run-{run.id}" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert [s.key for s in _studies(repo) if s.claimed_by is not None] == []  # every claim given back

    r = _batch(cfg, root)
    assert r.exit_code == 0, r.output
    assert _doc(r)["studies"] == {"found": 10, "processed": 10 - done_before, "already_done": done_before}
    studies = _studies(repo)
    assert len(studies) == 10 and {s.state for s in studies} == {State.FLAGGED}
    assert _inferred(repo) == Counter({(s.id, 1): 1 for s in studies})


# ---- 7: filters and the dry run -------------------------------------------------------------------------------
def test_since_include_and_exclude_choose_what_the_dry_run_lists(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    kept = _nights(root / "a", (10, 14, 18))  # recorded on three different days (from the seed)
    _nights(root / "test", (12,))
    write_psg_study(root / "dicom", hours=HOURS, seed=3)
    (root / "notes.txt").write_text("x")
    for name, when in (("old-broken.edf", datetime(2001, 5, 1, tzinfo=UTC)), ("new-broken.edf", datetime.now(UTC))):
        (root / "junk" / name).parent.mkdir(exist_ok=True)
        (root / "junk" / name).write_bytes(CORRUPT)  # no readable start date: the file's mtime counts
        os.utime(root / "junk" / name, (when.timestamp(), when.timestamp()))
    recorded = {p.relative_to(root).as_posix(): read_header(p).start.date() for p in kept}
    assert len(set(recorded.values())) == 3
    since = sorted(recorded.values())[1]
    cfg = _config(tmp_path, db_url)

    r = _batch(cfg, root, "--dry-run", "--since", since, "--include", "*.edf", "--exclude", "test/*")
    plan = _doc(r)
    assert r.exit_code == 0, r.output
    assert {row["name"] for row in plan["studies"]} == \
        {name for name, day in recorded.items() if day >= since} | {"junk/new-broken.edf"}
    assert plan["skipped_files"] == {"not included (--include)": 4, "excluded (--exclude)": 1,
                                     "recorded before --since": 2}

    study_date = datetime.strptime(pydicom.dcmread(root / "dicom" / "eeg.dcm", stop_before_pixels=True).StudyDate,
                                   "%Y%m%d").date()
    plan = _doc(_batch(cfg, root, "--dry-run", "--include", "dicom/*", "--since", study_date))
    assert [(row["kind"], row["recorded"]) for row in plan["studies"]] == [("DICOM", study_date.isoformat())]
    plan = _doc(_batch(cfg, root, "--dry-run", "--include", "dicom/*", "--since", study_date + timedelta(days=1)))
    assert plan["studies"] == [] and plan["skipped_files"]["recorded before --since"] == 3
    assert _count(repo, Study) == 0 and _count(repo, BatchRun) == 0


def test_dry_run_shows_status_and_montage_coverage_and_registers_nothing(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    write_synthetic_night(root / "n1.edf", hours=HOURS, seed=70)
    write_synthetic_night(root / "odd.edf", hours=HOURS, seed=71,
                          channels=[*DEFAULT_BENCH_CHANNELS[:3], SyntheticChannel("Mystery7", 32, "flow")])
    write_synthetic_night(root / "blank.edf", hours=HOURS, seed=72,
                          channels=[SyntheticChannel("Mystery8", 32, "flow"), SyntheticChannel("Mystery9", 32, "flow")])
    (root / "corrupt.edf").write_bytes(CORRUPT)
    write_psg_study(root / "dicom", hours=HOURS, seed=3)
    cfg = _config(tmp_path, db_url)

    r = _batch(cfg, root, "--dry-run", "--limit", "2")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in _doc(r)["studies"]}
    assert list(rows) == ["blank.edf", "corrupt.edf", "n1.edf", "odd.edf", "dicom/ (3 DICOM objects)"]  # path order
    assert [row["status"] for row in rows.values()] == ["new", "new"] + ["not reached (--limit)"] * 3
    n1 = rows["n1.edf"]
    assert (n1["kind"], n1["duration_h"], n1["unmapped"], n1["problem"]) == ("EDF/BDF", HOURS, [], None)
    assert set(n1["modalities"]) == ALL_MODALITIES and min(n1["modalities"].values()) >= 1
    assert (rows["odd.edf"]["modalities"], rows["odd.edf"]["unmapped"]) == ({"BAS": 3}, ["Mystery7"])
    blank = rows["blank.edf"]
    assert (blank["modalities"], blank["unmapped"]) == ({}, ["Mystery8", "Mystery9"])
    assert "no channel maps" in blank["problem"]
    assert rows["corrupt.edf"]["problem"].startswith("unreadable")
    dicom = rows["dicom/ (3 DICOM objects)"]
    assert dicom["kind"] == "DICOM" and set(dicom["modalities"]) == ALL_MODALITIES
    assert _count(repo, Study) == 0 and _count(repo, BatchRun) == 0 and _count(repo, ArchiveFile) == 0

    r = _batch(cfg, root)
    run = _doc(r)
    assert r.exit_code == 1 and run["studies"]["processed"] == 3 and run["studies"]["failed"] == 2
    assert run["unmapped_labels"].get("Mystery7") == 1
    reasons = {f["file"]: g["reason"] for g in run["failures_by_reason"] for f in g["studies"]}
    assert "Mystery8" in reasons["blank.edf"] and reasons["corrupt.edf"].startswith("unreadable input")
    plan = _doc(_batch(cfg, root, "--dry-run"))
    by_key = {s.key: s for s in _studies(repo)}
    for row in plan["studies"]:
        study = by_key[row["study_key"]]
        assert row["status"] == ("failed before" if study.state == State.FAILED else "already processed"), row
    assert {s.state for s in by_key.values()} == {State.FLAGGED, State.FAILED}
    assert len(_runs(repo)) == 1  # the dry runs recorded no run


# ---- 8: held messages -----------------------------------------------------------------------------------------
def _hl7_config(tmp_path: Path, db_url: str) -> Path:
    return _config(tmp_path, db_url, hl7={"enabled": True, "host": "127.0.0.1", "port": free_port()},
                   flags={"send_mode": "always"})


def _messages(repo: Repo) -> list[Message]:
    with repo.sessions() as s:
        return list(s.scalars(select(Message).order_by(Message.id)))


def test_batch_holds_messages_until_they_are_released(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, (80, 81))
    cfg = _hl7_config(tmp_path, db_url)
    r = _batch(cfg, root)
    assert r.exit_code == 0, r.output
    assert _doc(r)["processed_by_state"] == {"HELD": 2}
    studies = _studies(repo)
    assert {s.state for s in studies} == {State.HELD}
    msgs = _messages(repo)
    assert sorted((m.study_id, m.study_version) for m in msgs) == sorted((s.id, s.version) for s in studies)
    assert {m.state for m in msgs} == {MessageState.HELD} and all(m.message.startswith("MSH|") for m in msgs)

    r = cli.invoke(app, ["outbox", "release", "--all", "--config", str(cfg)])
    assert r.exit_code == 0 and "released 2" in r.output, r.output
    assert {m.state for m in _messages(repo)} == {MessageState.PENDING}
    assert {s.state for s in _studies(repo)} == {State.QUEUED}
    assert repo.message_release(None, "test") == []  # nothing held any more


def test_repo_release_of_held_messages_queues_their_studies(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, (82,))
    assert _batch(_hl7_config(tmp_path, db_url), root).exit_code == 0
    [msg] = _messages(repo)
    assert repo.message_release(None, "admin") == [msg.id]
    [study] = _studies(repo)
    assert (study.state, _messages(repo)[0].state) == (State.QUEUED, MessageState.PENDING)
    assert [e.event for e in repo.events(study.id)][-1] == "message.release"


def test_send_queues_messages_like_the_daemon(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, (83, 84))
    r = _batch(_hl7_config(tmp_path, db_url), root, "--send")
    assert r.exit_code == 0, r.output
    assert _doc(r)["processed_by_state"] == {"QUEUED": 2}
    assert {s.state for s in _studies(repo)} == {State.QUEUED}
    msgs = _messages(repo)
    assert len(msgs) == 2 and {m.state for m in msgs} == {MessageState.PENDING}


def test_rerun_after_send_counts_queued_studies_as_already_processed(tmp_path, db_url, repo):
    root = tmp_path / "archive"
    _nights(root, (85, 86))
    cfg = _hl7_config(tmp_path, db_url)
    assert _batch(cfg, root, "--send").exit_code == 0
    plan = _doc(_batch(cfg, root, "--dry-run"))
    doc = _doc(_batch(cfg, root))
    assert doc["studies"] == {"found": 2, "already_done": 2}
    assert [row["status"] for row in plan["studies"]] == ["already processed"] * 2


# ---- 9: problems found before any work ------------------------------------------------------------------------
def _assert_stopped_before_work(r, repo: Repo, *phrases: str) -> None:
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    for phrase in phrases:
        assert _flat(phrase) in _flat(r.stderr), r.stderr
    if repo is not None:
        assert _count(repo, Study) == 0 and _count(repo, BatchRun) == 0


def test_missing_archive_path_stops_before_any_work(tmp_path, db_url, repo):
    _nights(tmp_path / "archive", (90,))
    missing = tmp_path / "no-such-archive"
    r = _batch(_config(tmp_path, db_url), tmp_path / "archive", missing)
    _assert_stopped_before_work(r, repo, "archive path not found", str(missing))


def test_export_folder_under_a_regular_file_stops_before_any_work(tmp_path, db_url, repo):
    _nights(tmp_path / "archive", (90,))
    (tmp_path / "plain").write_text("a file, not a folder")
    r = _batch(_config(tmp_path, db_url), tmp_path / "archive", "--export", tmp_path / "plain" / "export")
    _assert_stopped_before_work(r, repo, "export folder", str(tmp_path / "plain" / "export"))


def test_a_second_batch_on_the_same_var_folder_stops_before_any_work(tmp_path, db_url, repo):
    _nights(tmp_path / "archive", (90,))
    var = tmp_path / "var"
    var.mkdir()
    with open(var / "batch.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running batch holds
        r = _batch(_config(tmp_path, db_url), tmp_path / "archive")
    _assert_stopped_before_work(r, repo, "another batch is running")


def test_unreachable_database_stops_before_any_work(tmp_path):
    _nights(tmp_path / "archive", (90,))
    r = _batch(_config(tmp_path, "postgresql://postgres@127.0.0.1:1/x"), tmp_path / "archive")
    _assert_stopped_before_work(r, None, "database", "unavailable", "127.0.0.1:1")
    assert not (tmp_path / "var" / "batch").exists()  # no summary: no run


def test_sqlite_database_that_cannot_be_created_stops_before_any_work(tmp_path):
    _nights(tmp_path / "archive", (90,))
    (tmp_path / "plain").write_text("a file, not a folder")
    r = _batch(_config(tmp_path, f"sqlite:///{tmp_path / 'plain' / 'db' / 'gateway.db'}"), tmp_path / "archive")
    _assert_stopped_before_work(r, None, "database", "unavailable")
