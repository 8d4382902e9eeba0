"""``psg-gateway studies`` and ``db`` commands against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.store.db import head_revision, make_engine, upgrade
from gateway.store.models import State
from gateway.store.repo import Repo

runner = CliRunner()


def _config(tmp_path, db_url):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  var_dir: {tmp_path / 'var'}\n")
    return cfg, {"PSG__DATABASE__URL": db_url}


def test_db_upgrade_and_current(tmp_path, db_url):
    cfg, env = _config(tmp_path, db_url)
    r = runner.invoke(app, ["db", "current", "--config", str(cfg)], env=env)
    assert r.exit_code == 1 and "empty" in r.output and "db upgrade" in r.output
    r = runner.invoke(app, ["db", "upgrade", "--config", str(cfg)], env=env)
    assert r.exit_code == 0 and f"empty -> {head_revision()}" in r.output
    r = runner.invoke(app, ["db", "current", "--config", str(cfg)], env=env)
    assert r.exit_code == 0 and f"database: {head_revision()}" in r.output


def test_studies_list_show_retry_reprocess(tmp_path, db_url):
    cfg, env = _config(tmp_path, db_url)
    engine = make_engine(db_url)
    upgrade(engine)
    repo = Repo(engine)
    s = repo.register_file(source="folder:/in", path="/x/a.edf", name="a.edf", sha256="c" * 64,
                           filename_pattern=None, actor="folder:/in").study
    c = repo.claim("w", 60)
    repo.transition(c, State.FAILED, "w", "study.failed", last_error="unreadable input (format): bad header")

    r = runner.invoke(app, ["studies", "list", "--config", str(cfg), "--json"], env=env)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [(x["key"], x["state"]) for x in rows] == [(s.key, "FAILED")]
    r = runner.invoke(app, ["studies", "list", "--config", str(cfg), "--state", "inferred", "--json"], env=env)
    assert json.loads(r.stdout) == []

    r = runner.invoke(app, ["studies", "show", s.key, "--config", str(cfg), "--json"], env=env)
    doc = json.loads(r.stdout)
    assert doc["last_error"].startswith("unreadable input")
    assert [e["event"] for e in doc["events"]] == ["study.received", "study.ready", "study.failed"]

    r = runner.invoke(app, ["studies", "reprocess", str(s.id), "--config", str(cfg)], env=env)
    assert r.exit_code == 0 and "READY, version 2" in r.output  # a FAILED study is finished too
    r = runner.invoke(app, ["studies", "show", str(s.id), "--config", str(cfg), "--json"], env=env)
    assert json.loads(r.stdout)["state"] == "READY" and json.loads(r.stdout)["version"] == 2

    r = runner.invoke(app, ["studies", "retry", str(s.id), "--config", str(cfg)], env=env)
    assert r.exit_code == 1 and "only FAILED" in r.output
    r = runner.invoke(app, ["studies", "show", "st-nope", "--config", str(cfg)], env=env)
    assert r.exit_code == 1 and "no study" in r.output
    engine.dispose()
