"""``psg-gateway batch --ray``: the same archive on a local Ray instance, with the local backend's
outcomes, dedupe and resume (SQLite and PostgreSQL). Needs the ``[ray]`` extra: ``make test``
installs it; skipped without it unless ``PSG_REQUIRE_RAY=1`` (CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from gateway.batch.runner import BatchOptions, BatchRunner
from gateway.config import load_config
from gateway.store.models import State
from gateway.synthetic.night import write_synthetic_night

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("PSG_REQUIRE_RAY", "") not in ("", "0", "false", "no"):
            pytest.fail("PSG_REQUIRE_RAY=1 but Ray is not installed (pip install 'psg-gateway[ray]')")
        pytest.skip("Ray is not installed (the [ray] extra)")
    return ray


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (the backend reuses an initialised Ray, as on a cluster)."""
    ray = _ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    for i in range(3):
        write_synthetic_night(root / "site" / f"night{i}.edf", hours=0.1, seed=10 + i)
    (root / "site" / "broken.edf").write_bytes(b"0       " + b"x" * 100)
    return root


def _run(cfg_path: Path, archive: Path, **kw) -> tuple[BatchRunner, object]:
    runner = BatchRunner(load_config(cfg_path), BatchOptions(archives=[archive], progress=False, **kw))
    try:
        runner.preflight()
        return runner, runner.run()
    finally:
        runner.close()


def _config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"paths": {"var_dir": str(tmp_path / "var")}, "database": {"url": db_url},
                                    "pipeline": {"write_report": False}}))
    return path


def test_ray_batch_processes_the_archive_like_the_local_backend(ray_local, archive, tmp_path, db_url):
    cfg = _config(tmp_path, db_url)
    runner, outcome = _run(cfg, archive, ray="auto")
    studies = outcome.summary["studies"]
    assert outcome.status == "finished" and outcome.exit_code == 1  # the broken file failed
    assert studies["processed"] == 3 and studies["failed"] == 1
    assert outcome.summary["processed_by_state"] == {"FLAGGED": 3}
    failed = outcome.summary["failures_by_reason"][0]
    assert failed["reason"].startswith("unreadable input") and failed["studies"][0]["file"] == "site/broken.edf"
    rows = runner.repo.list(limit=10)
    done = [s for s in rows if s.state == State.FLAGGED]
    assert len(done) == 3 and all(s.batch_run_id == outcome.run_id for s in done)
    for study in done:  # the outputs written by this process from the actors' results
        assert (Path(study.output_path) / "night.npy").is_file()
        assert (Path(study.output_path) / "hazards.csv").is_file()
    assert ray_local.is_initialized()  # an instance the backend did not start is left running

    # The local backend on the same database: nothing left to do (same dedupe, same cache).
    _runner, again = _run(cfg, archive)
    assert again.summary["studies"] == {"found": 4, "already_done": 3, "failed_before": 1}


def test_ray_batch_resumes_where_a_limited_run_stopped(ray_local, archive, tmp_path, db_url):
    cfg = _config(tmp_path, db_url)
    _r, first = _run(cfg, archive, ray="auto", limit=2)
    assert first.summary["studies"]["processed"] + first.summary["studies"].get("failed", 0) == 2
    _r, second = _run(cfg, archive, ray="auto")
    s = second.summary["studies"]
    assert s.get("processed", 0) + s.get("failed", 0) == 2
    assert s.get("already_done", 0) + s.get("failed_before", 0) == 2
    runner, _ = _run(cfg, archive, ray="auto")
    events = {}
    with runner.repo.sessions() as session:
        from sqlalchemy import func, select

        from gateway.store.models import Event

        for study_id, n in session.execute(select(Event.study_id, func.count()).where(Event.event == "study.inferred")
                                           .group_by(Event.study_id)):
            events[study_id] = n
    assert sorted(events.values()) == [1, 1, 1]  # each night inferred exactly once over three runs
