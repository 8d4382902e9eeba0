"""The repository on SQLite and PostgreSQL: schema, registration, dedupe, claims, guarded transitions."""

from __future__ import annotations

import threading
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.store.db import current_revision, head_revision, make_engine, upgrade
from gateway.store.models import Base, State
from gateway.store.repo import Repo, StudyChanged


def _file(repo: Repo, sha: str = "a" * 64, path: str = "/spool/incoming/c1/night.edf"):
    return repo.register_file(source="folder:/in", path=path, name="night.edf", sha256=sha,
                              filename_pattern=None, actor="folder:/in")


def _instance(repo: Repo, sop: str, study_uid: str = "1.2.3"):
    return repo.register_instance(study_uid=study_uid, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.9.7.4",
                                  path=f"/spool/dicom/x/{sop}.dcm", folder="/spool/dicom/x", size=10,
                                  calling_ae="PSGSENDER")


def test_migration_matches_models_and_is_idempotent(db_url: str) -> None:
    engine = make_engine(db_url)
    assert current_revision(engine) is None
    upgrade(engine)
    upgrade(engine)  # every daemon start does this
    assert current_revision(engine) == head_revision() == "0005"
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []
    engine.dispose()


def test_file_registration_and_content_dedupe(repo: Repo) -> None:
    first = _file(repo)
    assert not first.duplicate and first.study.state == State.READY and first.study.key.startswith("st-")
    second = _file(repo, path="/spool/incoming/c2/copy.edf")
    assert second.duplicate and second.study.state == State.DUPLICATE
    assert second.study.duplicate_of == first.study.id
    assert [e.event for e in repo.events(first.study.id)] == ["study.received", "study.ready"]
    assert [e.event for e in repo.events(second.study.id)] == ["study.received", "study.duplicate"]
    other = _file(repo, sha="b" * 64, path="/spool/incoming/c3/other.edf")
    assert not other.duplicate


def test_instances_collect_into_one_study_until_stable(repo: Repo) -> None:
    s1, stored1 = _instance(repo, "1.1")
    s2, stored2 = _instance(repo, "1.2")
    again, stored_again = _instance(repo, "1.1")
    assert stored1 and stored2 and not stored_again
    assert s1.id == s2.id == again.id and s1.state == State.RECEIVED
    assert repo.known_instance("1.1") and not repo.known_instance("9.9")
    assert repo.promote_stable(3600) == []  # not stable yet
    promoted = repo.promote_stable(0)
    assert [p.id for p in promoted] == [s1.id]
    assert repo.get(s1.id).state == State.READY
    assert len(repo.instances_of(s1.id)) == 2


def test_late_instance_reopens_a_finished_study_as_new_version(repo: Repo) -> None:
    study, _ = _instance(repo, "2.1")
    repo.promote_stable(0)
    claimed = repo.claim("node:1:w0", 60)
    for state in (State.DECODED, State.MAPPED, State.INFERRED):
        claimed = repo.transition(claimed, state, "node:1:w0", f"study.{state.lower()}")
    late, stored = _instance(repo, "2.2")
    assert stored and late.id == study.id and late.version == 2 and late.state == State.RECEIVED
    assert repo.events(study.id)[-1].event == "study.reopened"
    assert len(repo.instances_of(study.id)) == 2


def test_late_instance_makes_an_in_flight_worker_stop(repo: Repo) -> None:
    _instance(repo, "3.1")
    repo.promote_stable(0)
    claimed = repo.claim("node:1:w0", 60)
    claimed = repo.transition(claimed, State.DECODED, "node:1:w0", "study.decoded")
    _instance(repo, "3.2")  # arrives while the worker maps
    with pytest.raises(StudyChanged):
        repo.transition(claimed, State.MAPPED, "node:1:w0", "study.mapped")


def test_claim_lease_and_release(repo: Repo) -> None:
    study = _file(repo).study
    got = repo.claim("node:1:w0", 60)
    assert got.id == study.id and got.claimed_by == "node:1:w0" and got.attempts == 1
    assert repo.claim("node:1:w1", 60) is None  # leased
    assert repo.release_leases("node:") == 1
    again = repo.claim("node:2:w0", 0.2)
    assert again.id == study.id and again.attempts == 2
    time.sleep(0.3)  # lease ran out: another worker may take it
    assert repo.claim("node:3:w0", 60).id == study.id


def test_concurrent_claimers_never_get_the_same_study(repo: Repo) -> None:
    for i in range(12):
        _file(repo, sha=f"{i:064x}", path=f"/spool/incoming/c{i}/n.edf")
    got: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while (s := repo.claim(f"node:1:w{n}", 60)) is not None:
            with lock:
                got.append(s.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(set(got)) and len(got) == 12


def test_retry_schedule_hides_study_until_due(repo: Repo) -> None:
    _file(repo)
    s = repo.claim("node:1:w0", 60)
    s = repo.schedule_retry(s, "database unavailable", 3600, "node:1:w0")
    assert s.state == State.READY and s.error_kind == "transient" and s.claimed_by is None
    assert repo.claim("node:1:w0", 60) is None


def test_retry_and_reprocess_rules(repo: Repo) -> None:
    s = _file(repo).study
    with pytest.raises(ValueError, match="only FAILED"):
        repo.retry(s.id, "cli")
    with pytest.raises(ValueError, match="only finished"):
        repo.reprocess(s.id, "cli")
    c = repo.claim("w", 60)
    failed = repo.transition(c, State.FAILED, "w", "study.failed", last_error="bad file")
    assert repo.retry(failed.id, "cli").state == State.READY
    c = repo.claim("w", 60)
    done = repo.transition(c, State.DECODED, "w", "study.decoded")
    done = repo.transition(done, State.MAPPED, "w", "study.mapped")
    done = repo.transition(done, State.INFERRED, "w", "study.inferred")
    done = repo.transition(done, State.FLAGGED, "w", "study.flagged")
    again = repo.reprocess(done.id, "cli")
    assert again.state == State.READY and again.version == 2 and again.attempts == 0
    assert repo.events(s.id)[-1].actor == "cli"
    assert repo.counts_by_state() == {"READY": 1}


def test_upgrade_from_0001_keeps_existing_studies(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO studies (key, state, version, source, source_kind, attempts, received_at, "
                          "updated_at) VALUES ('st-old', 'INFERRED', 1, 'cli', 'file', 0, :t, :t)"),
                     {"t": "2026-01-01 00:00:00"})
    upgrade(engine)
    study = Repo(engine).get("st-old")
    assert study.state == "INFERRED" and study.flags is None and study.patient_name is None
    engine.dispose()


def test_outputs_of_a_rerun_version_replace_the_crashed_record(repo: Repo) -> None:
    study = _file(repo).study
    repo.add_outputs(study, [("night.npy", 10), ("metrics.json", 5)])
    repo.add_outputs(study, [("night.npy", 11), ("metrics.json", 6)])  # the same version ran again
    assert sorted((o.name, o.size) for o in repo.outputs(study.id)) == [("metrics.json", 6), ("night.npy", 11)]
