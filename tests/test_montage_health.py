"""A montage table that breaks on disk while the daemon runs: the last good table stays in use, the failure
is logged once per change of the file, /healthz says ``degraded`` (still HTTP 200) with the reason, /metrics
has ``psg_montage_reload_failing``, and a table that loads again ends it (``montage.recovered``)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from daemon_proc import Daemon
from structlog.testing import capture_logs

from gateway.config import load_config
from gateway.daemon import Daemon as GatewayDaemon
from gateway.http import OpsServer
from gateway.montage.holder import MontageHolder
from gateway.montage.table import MontageTable
from gateway.store.db import make_engine, upgrade
from gateway.store.models import State
from gateway.store.repo import Repo
from gateway.synthetic.night import write_synthetic_night
from inference.bundle import make_demo_bundle

GOOD = "name: site\nformat: 2\nextends: default\nrules: []\n"
GOOD_2 = "name: site\nformat: 2\nextends: default\nrules:\n  - {exact: X1, modality: BAS}\n"
BROKEN_YAML = "name: site\nformat: 2\nrules: [ {exact: X1\n"
BROKEN_SCHEMA = "name: site\nformat: 2\nrules:\n  - {exact: X1, modality: EEG}\n"


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "site" / "site.yaml"
    path.parent.mkdir()
    path.write_text(GOOD)
    return path


# ---- the holder ---------------------------------------------------------------------------------------------


def test_a_broken_table_is_logged_once_per_change_and_the_last_good_one_kept(table):
    holder = MontageHolder(table)
    version = holder.table.version
    assert holder.failure is None
    table.write_text(BROKEN_YAML)
    with capture_logs() as logs:
        assert [holder.check() for _ in range(5)] == [False] * 5  # five checks of one broken file
    [failed] = _events(logs, "montage.reload_failed")
    assert failed["log_level"] == "error" and failed["file_hash"] == _hash(BROKEN_YAML)
    assert failed["kept_version"] == version
    assert holder.table.version == version  # studies keep being mapped with the last good table
    failure = holder.failure
    assert failure is not None and failure.kept_version == version and failure.file_hash == _hash(BROKEN_YAML)
    assert failure.reason.startswith("site.yaml, line ") and "not valid YAML" in failure.reason
    assert str(table.parent) not in failure.reason and failed["error"] == failure.reason
    since = failure.since

    # Saved again unchanged (a new mtime, the same bytes): nothing new to say.
    table.write_text(BROKEN_YAML)
    with capture_logs() as logs:
        holder.check()
    assert not _events(logs, "montage.reload_failed")

    # Another broken edit: said once more, with its own reason; the failure still dates from the first.
    table.write_text(BROKEN_SCHEMA)
    with capture_logs() as logs:
        holder.check()
        holder.check()
    [failed] = _events(logs, "montage.reload_failed")
    assert "unknown modality 'EEG'" in failed["error"] and failed["file_hash"] == _hash(BROKEN_SCHEMA)
    assert holder.failure.since == since and "line 4" in holder.failure.reason
    assert holder.table.version == version


def test_a_good_table_again_ends_the_failure(table):
    holder = MontageHolder(table)
    version = holder.table.version
    table.write_text(BROKEN_SCHEMA)
    holder.check()
    table.write_text(GOOD_2)
    with capture_logs() as logs:
        assert holder.check()  # a new table: swapped in
    [recovered] = _events(logs, "montage.recovered")
    assert recovered["version"] == holder.table.version != version
    assert _events(logs, "montage.reloaded")[0]["previous"] == version
    assert holder.failure is None
    with capture_logs() as logs:
        assert not holder.check()
    assert logs == []  # nothing to say while it loads and has not changed

    # The same broken content as before, in a new failure: logged again.
    table.write_text(BROKEN_SCHEMA)
    with capture_logs() as logs:
        holder.check()
    assert len(_events(logs, "montage.reload_failed")) == 1


def test_reverting_to_the_served_table_recovers_without_a_reload(table):
    holder = MontageHolder(table)
    version = holder.table.version
    table.write_text(BROKEN_YAML)
    holder.check()
    table.write_text(GOOD)
    with capture_logs() as logs:
        assert not holder.check()  # the table in use is the one on disk again
    assert [e["event"] for e in logs] == ["montage.recovered"]
    assert holder.failure is None and holder.table.version == version


def test_a_deleted_table_is_a_failure_too(table):
    holder = MontageHolder(table)
    table.unlink()
    holder.check()
    assert holder.failure is not None and holder.failure.file_hash == "unreadable"
    assert holder.failure.reason == "site.yaml: file not found"
    assert holder.failure.describe().startswith(
        f"montage table on disk does not load: site.yaml: file not found; serving version {holder.table.version} "
        "(failing since ")


def test_the_reason_names_files_not_folders(tmp_path, table):
    base = tmp_path / "bases" / "base.yaml"
    base.parent.mkdir()
    base.write_text(GOOD)
    table.write_text(f"name: site\nformat: 2\nextends: {base}\nrules: []\n")
    holder = MontageHolder(table)
    base.write_text(BROKEN_YAML)  # the table it extends breaks
    holder.check()
    assert holder.failure is not None and "base.yaml" in holder.failure.reason
    assert str(tmp_path) not in holder.failure.reason and "/" not in holder.failure.reason


def test_no_table_file_never_fails():
    holder = MontageHolder(None)
    assert not holder.check() and holder.failure is None


# ---- Daemon.health and the ops endpoint ---------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_is_degraded_with_the_reason_and_still_http_200(tmp_path, table):
    daemon = GatewayDaemon(load_config(None, env={}), configure_logs=False)
    db = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(db)
    daemon.repo = Repo(db)
    daemon.montage = MontageHolder(table)
    daemon.ready = True
    ops = OpsServer("127.0.0.1", 0, daemon.metrics.registry, daemon.health)
    ops.start()
    try:
        code, body = _get(ops.port, "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["problems"] == []

        table.write_text(BROKEN_SCHEMA)
        daemon.montage.check()
        ok, doc = daemon.health()
        assert ok and doc["status"] == "degraded" and doc["montage"] == daemon.montage.table.version
        [problem] = doc["problems"]
        assert problem.startswith("montage table on disk does not load: site.yaml, line 4: unknown modality 'EEG'")
        assert f"serving version {daemon.montage.table.version}" in problem and str(tmp_path) not in problem
        code, body = _get(ops.port, "/healthz")
        assert code == 200 and json.loads(body)["status"] == "degraded"  # it works: probes must not restart it

        daemon.stopping.set()  # the other states keep their meaning (and their 503)
        code, body = _get(ops.port, "/healthz")
        assert code == 503 and json.loads(body)["status"] == "stopping"
        daemon.stopping.clear()
        daemon.ready = False
        code, body = _get(ops.port, "/healthz")
        assert code == 503 and json.loads(body)["status"] == "unavailable"
    finally:
        ops.stop()
        db.dispose()


# ---- the real daemon ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo")


def _health(d: Daemon) -> tuple[int, dict]:
    code, body = d.get("/healthz")
    return code, (json.loads(body) if body else {})


def _gauge(d: Daemon) -> str:
    _, text = d.get("/metrics")
    return next(line for line in text.splitlines() if line.startswith("psg_montage_reload_failing "))


@pytest.mark.slow
def test_daemon_reports_a_broken_table_as_degraded_until_fixed(tmp_path, db_url, bundle, table):
    d = Daemon(tmp_path, db_url, bundle, dicom__enabled=False)
    cfg = yaml.safe_load(d.config.read_text())
    cfg["montage"] = {"table": str(table), "reload_check_seconds": 0.3}
    d.config.write_text(yaml.safe_dump(cfg))
    try:
        d.start()
        code, doc = _health(d)
        version = doc["montage"]
        assert code == 200 and doc["status"] == "ok" and doc["problems"] == []
        assert version == MontageTable.load(table).version and _gauge(d) == "psg_montage_reload_failing 0.0"

        table.write_text(BROKEN_YAML)
        code, doc = d.wait_for(lambda: (h := _health(d))[1].get("status") == "degraded" and h, timeout=30,
                               what="/healthz degraded")
        assert code == 200 and doc["ready"] and doc["montage"] == version
        [problem] = doc["problems"]
        assert problem.startswith("montage table on disk does not load: site.yaml, line ")
        assert f"serving version {version}" in problem and str(tmp_path) not in problem
        assert _gauge(d) == "psg_montage_reload_failing 1.0"

        # Degraded, not down: a study dropped now is processed with the table that was last good.
        src = write_synthetic_night(tmp_path / "src" / "night.edf", hours=0.1, seed=5)
        d.drop.mkdir(exist_ok=True)
        shutil.copy(src, d.drop / "night.edf")
        [study] = d.wait_for(lambda: [s for s in d.repo.list() if s.state == State.FLAGGED], what="FLAGGED")
        assert study.montage_version == version
        assert len([e for e in d.log_events() if e["event"] == "montage.reload_failed"]) == 1  # not every 0.3 s

        table.write_text(GOOD_2)
        code, doc = d.wait_for(lambda: (h := _health(d))[1].get("status") == "ok" and h, timeout=30,
                               what="/healthz ok again")
        assert code == 200 and doc["problems"] == [] and doc["montage"] == MontageTable.load(table).version != version
        assert _gauge(d) == "psg_montage_reload_failing 0.0"
        time.sleep(1.0)  # a few more checks of the good table
        events = [e["event"] for e in d.log_events()]
        assert events.count("montage.recovered") == 1 and events.count("montage.reload_failed") == 1
        assert d.stop() == 0
    finally:
        d.close()
