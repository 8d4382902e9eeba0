"""What docs/integration-guide.md promises about delivery, on SQLite and PostgreSQL with an independent MLLP peer:
every ORU the EHR receives is an attempt in our records (recorded before the first byte leaves); an
attempt a crash left in flight is marked INTERRUPTED, recorded as a possible duplicate and resent with
the same MSH-10; one deliverer per destination across processes sharing the database (a lease that
fences every attempt); migrations run by one process at a time."""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import pytest
from mllp_peer import MllpPeer, PeerAction
from sqlalchemy import update
from test_hl7_delivery import _queue

from gateway.config import Hl7Config
from gateway.hl7.delivery import Deliverer
from gateway.metrics import Metrics
from gateway.store.db import current_revision, head_revision, make_engine, upgrade
from gateway.store.models import DeliveryLease, State
from gateway.store.repo import Repo, utcnow


@pytest.fixture
def peer():
    p = MllpPeer().start()
    yield p
    p.stop()


def _deliverer(repo: Repo, peer: MllpPeer, holder: str, **kw) -> Deliverer:
    cfg = Hl7Config(enabled=True, host="127.0.0.1", port=peer.port, timeout_seconds=kw.pop("timeout", 2.0),
                    retry_backoff_seconds=0.05, retry_backoff_max_seconds=0.1, **kw)
    return Deliverer(repo, cfg, Metrics(), holder=holder)


def _outcomes(repo: Repo, study_id: int) -> list[str]:
    [m] = repo.messages(study_id=study_id)
    return [a.outcome for a in repo.attempts(m.id)]


def test_every_try_that_may_reach_the_ehr_is_recorded_before_it_leaves(repo, peer):
    d = _deliverer(repo, peer, "node-a:1")
    (s1, c1), (s2, c2) = _queue(repo, 2, f"127.0.0.1:{peer.port}")
    seen_in_flight: list[list[str]] = []
    peer.script.extend([PeerAction.ack("AR"), PeerAction(), PeerAction()])
    original = d._client_or_new

    def spy():
        client = original()
        send = client.send

        def recorded_then_send(er7):
            # At the moment the bytes are about to leave, the attempt is already committed IN_FLIGHT.
            [m] = [m for m in repo.messages() if m.control_id in er7]
            seen_in_flight.append([a.outcome for a in repo.attempts(m.id)])
            return send(er7)

        client.send = recorded_then_send
        return client

    d._client_or_new = spy
    while repo.next_message(d.cfg.destination) is not None or repo.messages(state="PENDING"):
        d.drain()
    assert seen_in_flight[0] == ["IN_FLIGHT"] and seen_in_flight[1] == ["NAKED", "IN_FLIGHT"]
    assert _outcomes(repo, s1) == ["NAKED", "ACKED"] and _outcomes(repo, s2) == ["ACKED"]
    assert peer.control_ids == [c1, c1, c2]
    [m1] = repo.messages(study_id=s1)
    assert m1.attempts == 2 and m1.state == "SENT"
    d.close()


def test_a_refused_connection_is_a_try_but_not_an_attempt(repo, peer):
    d = _deliverer(repo, peer, "node-a:1")
    [(study_id, control)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
    peer.down()
    assert d.drain() == 0
    [m] = repo.messages(study_id=study_id)
    assert m.attempts == 1 and repo.attempts(m.id) == [] and "connect" in m.last_error.lower()
    assert d.metrics.hl7_messages.labels("not_connected")._value.get() == 1
    peer.up()
    with repo.sessions.begin() as s:  # the backoff is over
        s.execute(update(type(m)).values(next_attempt_at=None))
    assert d.drain() == 1
    assert _outcomes(repo, study_id) == ["ACKED"] and peer.control_ids == [control]
    d.close()


def test_an_attempt_left_in_flight_is_interrupted_and_resent_with_the_same_control_id(repo, peer):
    [(study_id, control)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
    dest = f"127.0.0.1:{peer.port}"
    # A daemon (pid 1 of another node) recorded its attempt and died: the EHR may have the message.
    assert repo.hold_delivery(dest, "node-x:1", 60) == []
    [msg] = repo.messages(study_id=study_id)
    assert repo.begin_attempt(msg, "node-x:1", 60).outcome == "IN_FLIGHT"
    with repo.sessions.begin() as s:  # its lease runs out
        s.execute(update(DeliveryLease).values(lease_until=utcnow() - timedelta(seconds=1)))

    d = _deliverer(repo, peer, "node-a:2")
    assert d.drain() == 1
    assert _outcomes(repo, study_id) == ["INTERRUPTED", "ACKED"]
    assert peer.control_ids == [control]  # the resend carries the same MSH-10
    events = [e for e in repo.events(study_id) if e.event == "message.possible_duplicate"]
    assert len(events) == 1 and events[0].detail["previous_holder"] == "node-x:1"
    assert d.metrics.hl7_possible_duplicates._value.get() == 1
    [msg] = repo.messages(study_id=study_id)
    assert msg.state == "SENT" and msg.attempts == 2
    d.close()


def test_a_live_lease_keeps_other_deliverers_out_until_it_expires_or_is_released(repo, peer):
    queued = _queue(repo, 4, f"127.0.0.1:{peer.port}")
    a = _deliverer(repo, peer, "node-a:1")
    b = _deliverer(repo, peer, "node-b:1")
    assert a.drain(limit=1) == 1
    assert b.drain() == 0 and repo.delivery_holder(a.cfg.destination) == "node-a:1"
    with repo.sessions.begin() as s:  # node-a stops renewing: its lease expires
        s.execute(update(DeliveryLease).values(lease_until=utcnow() - timedelta(seconds=1)))
    assert b.drain(limit=2) == 2 and repo.delivery_holder(b.cfg.destination) == "node-b:1"
    # node-a still believes it holds the lease: the fence refuses its attempt, nothing is sent.
    [msg] = repo.messages(state="PENDING")
    assert a.drain() == 0 and repo.attempts(msg.id) == []
    b.release()
    assert a.drain() == 1
    assert peer.control_ids == [c for _, c in queued]
    a.close()
    b.close()


def test_a_restarted_daemon_takes_its_dead_predecessors_lease_at_once(repo, peer):
    [(_, control)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
    dest = f"127.0.0.1:{peer.port}"
    dead_pid = _dead_pid()
    assert repo.hold_delivery(dest, f"node-a:{dead_pid}", 60) == []
    other_node = _deliverer(repo, peer, f"node-b:{os.getpid()}")
    assert other_node.drain() == 0  # another node waits the lease out
    same_node = _deliverer(repo, peer, f"node-a:{os.getpid()}")
    assert same_node.drain() == 1 and peer.control_ids == [control]
    other_node.close()
    same_node.close()


@pytest.mark.parametrize("n_deliverers", [3])
def test_concurrent_deliverers_send_each_message_once_and_in_order(repo, peer, n_deliverers):
    queued = _queue(repo, 12, f"127.0.0.1:{peer.port}")
    peer.script.extend(PeerAction(delay=0.02) for _ in range(12))
    deliverers = [_deliverer(repo, peer, f"node-{i}:{i + 1}") for i in range(n_deliverers)]
    stop = threading.Event()

    def loop(d: Deliverer) -> None:
        while not stop.is_set():
            d.drain(stop)
            stop.wait(0.01)

    threads = [threading.Thread(target=loop, args=(d,)) for d in deliverers]
    for t in threads:
        t.start()
    peer.wait_for(12, timeout=30)
    stop.set()
    for t in threads:
        t.join()
    assert peer.control_ids == [c for _, c in queued]
    for study_id, _ in queued:
        assert repo.get(study_id).state == State.DELIVERED and _outcomes(repo, study_id) == ["ACKED"]
    for d in deliverers:
        d.close()


def test_the_lease_must_outlast_a_send():
    with pytest.raises(ValueError, match="delivery_lease_seconds"):
        Hl7Config(timeout_seconds=30, delivery_lease_seconds=35)


def test_concurrent_migrations_of_a_fresh_database_all_succeed(db_url):
    engines = [make_engine(db_url) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(engines))

    def migrate(engine) -> None:
        barrier.wait()
        try:
            upgrade(engine)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert current_revision(engines[0]) == head_revision()
    for e in engines:
        e.dispose()


def test_downtime_does_not_count_toward_a_dicom_studys_stable_age(repo):
    study, _ = repo.register_instance(study_uid="1.2.3", sop_instance_uid="1.2.3.1",
                                      sop_class_uid="1.2.840.10008.5.1.4.1.1.9.7.4", path="/spool/x/1.dcm",
                                      folder="/spool/x", size=10, calling_ae="MODALITY")
    from gateway.store.models import Study

    with repo.sessions.begin() as s:  # the daemon died right after this instance, an hour ago
        s.execute(update(Study).values(last_instance_at=utcnow() - timedelta(hours=1)))
    assert repo.restart_stable_clocks(actor="node:1") == 1
    assert repo.promote_stable(60) == []  # a fresh stable age: the sender gets its chance to finish
    assert repo.get(study.id).state == State.RECEIVED
    assert "study.stable_clock_restarted" in [e.event for e in repo.events(study.id)]
    assert [s.id for s in repo.promote_stable(0)] == [study.id]


def _dead_pid() -> int:
    """A pid that no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_destination_health_shows_a_down_ehr_and_dead_letters(repo, peer):
    from gateway.config import GatewayConfig
    from gateway.daemon import Daemon
    from gateway.store.models import Message

    cfg = GatewayConfig(hl7={"enabled": True, "host": "127.0.0.1", "port": peer.port, "timeout_seconds": 2,
                             "retry_backoff_seconds": 0.05, "degraded_after_seconds": 600})
    daemon = Daemon(cfg, configure_logs=False)
    daemon.repo = repo
    daemon.deliverer = Deliverer(repo, cfg.hl7, Metrics(), holder="node-a:1")
    _queue(repo, 2, cfg.hl7.destination)
    problems: list[str] = []
    doc = daemon._destination_health(repo.outbox_counts(), problems)
    assert problems == [] and doc["pending"] == 2 and doc["last_error"] is None and not doc["connected"]

    peer.script.append(PeerAction.ack("AE", text="unknown patient"))
    assert daemon.deliverer.drain(limit=1) == 1  # the first becomes a dead letter
    peer.down()
    assert daemon.deliverer.drain() == 0  # the second waits: the EHR is down
    with repo.sessions.begin() as s:  # ... since an hour ago
        s.execute(update(Message).where(Message.state == "PENDING")
                  .values(created_at=utcnow() - timedelta(hours=1)))
    doc = daemon._destination_health(repo.outbox_counts(), problems)
    assert doc["last_error"] == "MllpConnectError" and doc["dead_letters"] == 1 and doc["pending"] == 1
    assert 3590 < doc["oldest_pending_age_s"] < 3700 and doc["delivering_here"]
    assert len(problems) == 2 and "waited 60 min" in problems[0] and "1 dead letter" in problems[1]
    assert "unknown patient" not in " ".join(problems)  # an ACK's text can quote PHI: kinds only
    daemon.deliverer.close()
