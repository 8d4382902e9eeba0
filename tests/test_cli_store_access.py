"""``psg-gateway studies replace`` and the store commands' "no implicit database" rule, on a real SQLite
file and a real PostgreSQL schema."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pipeline_env import pipeline_env, spool_file
from sqlalchemy import event
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.cli.store_access import shown_url
from gateway.config import load_config
from gateway.store.db import current_revision, head_revision, make_engine, upgrade
from gateway.store.models import State
from gateway.store.repo import Repo
from gateway.synthetic.night import write_synthetic_night

runner = CliRunner()
CORRUPT = b"0       " + b"garbage" * 100  # not an EDF header: the pipeline fails it at once (permanent)


@pytest.fixture(scope="module")
def night_bytes(tmp_path_factory) -> bytes:
    return write_synthetic_night(tmp_path_factory.mktemp("n") / "n.edf", hours=0.1, seed=7).read_bytes()


@pytest.fixture
def env(db_url, tmp_path, model):
    """(repo, pipeline, paths, CLI arguments for --config, CLI environment) on one database and var folder."""
    var = tmp_path / "var"
    db, repo, pipe, paths = pipeline_env(db_url, var, *model)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  var_dir: {var}\n")
    yield repo, pipe, paths, ["--config", str(cfg)], {"PSG__DATABASE__URL": db_url, "PSG_CONFIG": None}
    db.dispose()


def _failed(repo, pipe, paths, claim: str = "c1"):
    """A file study the pipeline FAILED, its input in quarantine/<key>/ as <key>.edf."""
    study = spool_file(paths, "broken.edf", CORRUPT, repo, claim=claim)
    pipe.run_once("w")
    failed = repo.get(study.id)
    assert failed.state == State.FAILED
    return failed


def _folder_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---- studies replace ------------------------------------------------------------------------------------------
def test_replace_records_the_new_hash_swaps_the_file_and_requeues(env, tmp_path, night_bytes):
    repo, pipe, paths, cfg, cli_env = env
    failed = _failed(repo, pipe, paths)
    q = paths.quarantine / failed.key
    assert f"studies replace {failed.id} FILE" in (q / "REASON.txt").read_text()  # the hint an admin finds
    before = _folder_names(q)
    fixed = tmp_path / "DOE_JOHN_fixed.edf"  # a name with PHI in it: never echoed
    fixed.write_bytes(night_bytes)
    new_sha = hashlib.sha256(night_bytes).hexdigest()

    r = runner.invoke(app, ["studies", "replace", failed.key, str(fixed), *cfg], env=cli_env)
    assert r.exit_code == 0, r.output
    assert "DOE_JOHN" not in r.output and f"study {failed.key}: input replaced" in r.stdout

    study = repo.get(failed.id)
    assert study.state == State.READY and study.attempts == 0 and study.version == failed.version
    assert study.content_hash == new_sha and study.input_path == failed.input_path
    assert Path(study.input_path) == q / f"{failed.key}.edf" and (q / f"{failed.key}.edf").read_bytes() == night_bytes
    assert _folder_names(q) == before  # no temporary file and no kept-aside copy left behind
    replaced, retried = repo.events(study.id)[-2:]
    assert (replaced.event, replaced.actor, replaced.from_state, replaced.to_state) == \
        ("study.input_replaced", "cli", "FAILED", "FAILED")
    assert replaced.detail == {"old_sha256": failed.content_hash[:12], "new_sha256": new_sha[:12],
                               "size": len(night_bytes)}
    assert (retried.event, retried.from_state, retried.to_state) == ("study.retry", "FAILED", "READY")

    # the daemon's next claim processes the new bytes, and the record matches them
    assert pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.FLAGGED, done.last_error
    assert hashlib.sha256(Path(done.input_path).read_bytes()).hexdigest() == done.content_hash == new_sha


def test_replace_refuses_content_another_study_already_has(env, tmp_path, night_bytes):
    repo, pipe, paths, cfg, cli_env = env
    original = spool_file(paths, "night.edf", night_bytes, repo, claim="c0")  # READY: an original
    # an original the pipeline leaves alone (FAILED too: still the original of its content)
    repo.transition(repo.claim("w", 60), State.FAILED, "w", "study.failed", last_error="x")
    failed = _failed(repo, pipe, paths)
    q = paths.quarantine / failed.key
    before = _folder_names(q)
    same = tmp_path / "copy.edf"
    same.write_bytes(night_bytes)

    r = runner.invoke(app, ["studies", "replace", str(failed.id), str(same), *cfg], env=cli_env)
    assert r.exit_code == 1
    assert f"the same content is already study {original.key}" in r.output
    study = repo.get(failed.id)
    assert (study.state, study.content_hash, study.input_path, study.version) == \
        (State.FAILED, failed.content_hash, failed.input_path, failed.version)
    assert (q / f"{failed.key}.edf").read_bytes() == CORRUPT and _folder_names(q) == before
    assert "study.input_replaced" not in [e.event for e in repo.events(study.id)]

    # the repository's own check, for a caller that skipped the CLI's
    with pytest.raises(ValueError, match=f"already study {original.key}"):
        repo.replace_input(failed.id, path=failed.input_path, sha256=original.content_hash, size=1, actor="t")
    assert repo.get(failed.id).content_hash == failed.content_hash


def test_replace_refuses_a_study_that_is_not_failed_and_a_dicom_study(env, tmp_path, night_bytes):
    repo, _, paths, cfg, cli_env = env
    fixed = tmp_path / "fixed.edf"
    fixed.write_bytes(night_bytes)
    ready = spool_file(paths, "a.edf", CORRUPT, repo)
    r = runner.invoke(app, ["studies", "replace", ready.key, str(fixed), *cfg], env=cli_env)
    assert r.exit_code == 1 and "only FAILED studies" in r.output
    assert repo.get(ready.id).content_hash == ready.content_hash
    assert Path(ready.input_path).read_bytes() == CORRUPT

    repo.transition(repo.claim("w", 60), State.FAILED, "w", "study.failed", last_error="x")  # out of the queue
    inst = tmp_path / "i.dcm"
    inst.write_bytes(b"x")
    dicom, _ = repo.register_instance(study_uid="1.2.3", sop_instance_uid="1.2.3.1", sop_class_uid="1.2",
                                      path=str(inst), folder=str(tmp_path), size=1, calling_ae="MOD")
    repo.promote_stable(0)
    dicom = repo.transition(repo.claim("w", 60), State.FAILED, "w", "study.failed", last_error="bad")
    assert dicom.source_kind == "dicom"
    r = runner.invoke(app, ["studies", "replace", dicom.key, str(fixed), *cfg], env=cli_env)
    assert r.exit_code == 1 and "is a DICOM study" in r.output
    assert len(r.output.strip().splitlines()) == 2  # the database line, then the one-line reason
    assert repo.get(dicom.id).state == State.FAILED


def test_replace_refuses_when_retention_removed_the_input(env, tmp_path, night_bytes):
    repo, pipe, paths, cfg, cli_env = env
    failed = _failed(repo, pipe, paths)
    fixed = tmp_path / "fixed.edf"
    fixed.write_bytes(night_bytes)
    (paths.quarantine / failed.key / f"{failed.key}.edf").unlink()
    r = runner.invoke(app, ["studies", "replace", failed.key, str(fixed), *cfg], env=cli_env)
    assert r.exit_code == 1 and "quarantined input" in r.output and "gone" in r.output
    for item in (paths.quarantine / failed.key).iterdir():
        item.unlink()
    (paths.quarantine / failed.key).rmdir()
    r = runner.invoke(app, ["studies", "replace", failed.key, str(fixed), *cfg], env=cli_env)
    assert r.exit_code == 1 and "quarantine folder" in r.output and "gone" in r.output
    assert not (paths.quarantine / failed.key).exists()  # not re-created
    assert repo.get(failed.id).state == State.FAILED


# ---- no implicit databases ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["studies", "list"], ["studies", "show", "1"], ["studies", "retry", "1"],
                                     ["studies", "replace", "1", "f.edf"], ["outbox", "list"],
                                     ["outbox", "release", "--all"], ["hl7", "preview", "1"], ["db", "current"]])
def test_store_commands_refuse_without_a_configuration(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, command, env={"PSG_CONFIG": None, "PSG__DATABASE__URL": None, "PSG_DATABASE_URL": None})
    assert r.exit_code == 2
    assert "--config" in r.output and "PSG_CONFIG" in r.output
    assert list(tmp_path.iterdir()) == []  # no ./var, no psg-gateway.db


def test_a_missing_sqlite_file_is_not_created(tmp_path):
    db = tmp_path / "state" / "gateway.db"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  var_dir: {tmp_path / 'var'}\ndatabase:\n  url: sqlite:///{db}\n")
    for command in (["studies", "list"], ["outbox", "list", "--json"], ["db", "current"]):
        r = runner.invoke(app, [*command, "--config", str(cfg)], env={"PSG_CONFIG": None})
        assert r.exit_code == 1, (command, r.output)
        assert not db.exists() and not db.parent.exists()
    assert "does not exist" in runner.invoke(app, ["studies", "list", "--config", str(cfg)]).output


def test_an_empty_or_older_database_is_refused_not_migrated(tmp_path, db_url):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  var_dir: {tmp_path / 'var'}\n")
    env = {"PSG__DATABASE__URL": db_url, "PSG_CONFIG": None}
    engine = make_engine(db_url)
    with engine.connect():
        pass  # an existing but empty database (SQLite: the file exists now)
    r = runner.invoke(app, ["studies", "list", "--config", str(cfg)], env=env)
    assert r.exit_code == 1 and "no schema yet" in r.output and "db upgrade" in r.output
    assert current_revision(engine) is None

    upgrade(engine, "0001")
    r = runner.invoke(app, ["outbox", "list", "--config", str(cfg)], env=env)
    assert r.exit_code == 1 and f"is at schema 0001, this version expects {head_revision()}" in r.output
    assert current_revision(engine) == "0001"  # left as it was: only `db upgrade` and `run` migrate
    engine.dispose()


def test_a_migrated_database_is_listed_and_named_on_stderr(tmp_path, db_url, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  var_dir: {tmp_path / 'var'}\n")
    engine = make_engine(db_url)
    upgrade(engine)
    study = Repo(engine).register_file(source="t", path="/in/a.edf", name="a.edf", sha256="e" * 64,
                                       filename_pattern=None, actor="t").study
    shown = engine.url.render_as_string(hide_password=True)
    engine.dispose()

    r = runner.invoke(app, ["studies", "list", "--config", str(cfg), "--json"], env={"PSG__DATABASE__URL": db_url})
    assert r.exit_code == 0, r.output
    assert [row["key"] for row in json.loads(r.stdout)] == [study.key]  # stdout is the JSON alone
    assert r.stderr.strip() == f"database: {shown}"

    # PSG_CONFIG instead of --config, from another folder
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["studies", "list"], env={"PSG__DATABASE__URL": db_url, "PSG_CONFIG": str(cfg)})
    assert r.exit_code == 0 and study.key in r.stdout and "database: " in r.stderr


def test_database_url_is_shown_without_its_password():
    assert shown_url("postgresql://gw:s3cret@db.example/psg") == "postgresql+psycopg://gw:***@db.example/psg"
    assert shown_url("sqlite:////srv/psg/gateway.db") == "sqlite:////srv/psg/gateway.db"


def test_load_config_reads_the_file_psg_config_names(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("paths:\n  var_dir: elsewhere\n")
    assert load_config(None, env={"PSG_CONFIG": str(f)}).paths.var_dir == tmp_path / "elsewhere"
    assert load_config(None, env={}).paths.var_dir == Path.cwd() / "var"



def test_a_registration_racing_the_replace_leaves_file_and_record_unchanged(env, tmp_path, night_bytes, monkeypatch):
    """The same content registered between the duplicate checks and the UPDATE: the unique index on the
    originals' content refuses it, the CLI says which study has it, and the quarantined file is put back."""
    repo, pipe, paths, cfg, cli_env = env
    failed = _failed(repo, pipe, paths)
    q = paths.quarantine / failed.key
    before = _folder_names(q)
    fixed = tmp_path / "fixed.edf"
    fixed.write_bytes(night_bytes)
    sha = hashlib.sha256(night_bytes).hexdigest()
    racer: list[str] = []

    def register_first(session, _ctx, _instances) -> None:
        # replace_input's flush, after its own duplicate check: another process registers the content now
        if not racer and any(getattr(o, "content_hash", None) == sha for o in session.dirty):
            racer.append("")
            racer[0] = repo.register_file(source="t", path="/in/b.edf", name="b.edf", sha256=sha,
                                          filename_pattern=None, actor="t").study.key

    monkeypatch.setattr("gateway.operator_actions._original_with", lambda *_: None)  # the CLI's check ran earlier
    event.listen(Session, "before_flush", register_first)
    try:
        r = runner.invoke(app, ["studies", "replace", failed.key, str(fixed), *cfg], env=cli_env)
    finally:
        event.remove(Session, "before_flush", register_first)
    assert racer and racer[0].startswith("st-")
    assert r.exit_code == 1 and f"the same content is already study {racer[0]}" in r.output
    study = repo.get(failed.id)
    assert (study.state, study.content_hash) == (State.FAILED, failed.content_hash)
    assert (q / f"{failed.key}.edf").read_bytes() == CORRUPT and _folder_names(q) == before
