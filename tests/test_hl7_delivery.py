"""The outbox and the delivery job against an independent MLLP peer (tests/mllp_peer.py), on SQLite and
PostgreSQL: AA, AE (dead letter), AR then AA, a destination down then up, an ACK slower than the timeout."""

from __future__ import annotations

import time

import hl7
import pytest
from mllp_peer import MllpPeer, PeerAction

from gateway.config import Hl7Config
from gateway.hl7.delivery import Deliverer
from gateway.metrics import Metrics
from gateway.store.models import MessageState, State
from gateway.store.repo import Repo


def _er7(control_id: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|PSG-GATEWAY|SLEEPLAB|EHR|HOSPITAL|20261124120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        "PID|1||MRN1^^^HOSP^MR||DOE^JANE", "OBR|1|A1|A1^PSG|90568-7^Polysomnography panel^LN",
        "OBX|1|NM|PSG-DEATH-HR^death hazard ratio^99PSG|1|2.1||||||F"])


@pytest.fixture
def peer():
    p = MllpPeer().start()
    yield p
    p.stop()


def _queue(repo: Repo, n: int, dest: str) -> list[tuple[int, str]]:
    out = []
    for i in range(n):
        s = repo.register_file(source="t", path=f"/p/{i}.edf", name=f"{i}.edf", sha256=f"{i:064x}",
                               filename_pattern=None, actor="t").study
        s = repo.claim("w", 60)
        for st in (State.DECODED, State.MAPPED, State.INFERRED):
            s = repo.transition(s, st, "w", f"study.{st.lower()}")
        control = f"PSGTEST{i:04d}"
        repo.queue_message(s, State.QUEUED, "w", "study.queued", None, destination=dest, control_id=control,
                           er7=_er7(control), message_state=MessageState.PENDING, correction=False)
        out.append((s.id, control))
    return out


def _deliverer(repo, peer, **kw) -> Deliverer:
    cfg = Hl7Config(enabled=True, host="127.0.0.1", port=peer.port, timeout_seconds=kw.pop("timeout", 2.0),
                    retry_backoff_seconds=kw.pop("backoff", 0.05), retry_backoff_max_seconds=0.2, **kw)
    return Deliverer(repo, cfg, Metrics())


def test_aa_delivers_in_order_and_marks_studies_delivered(repo, peer):
    d = _deliverer(repo, peer)
    queued = _queue(repo, 3, f"127.0.0.1:{peer.port}")
    assert d.drain() == 3
    assert peer.control_ids == [c for _, c in queued]
    for study_id, control in queued:
        assert repo.get(study_id).state == State.DELIVERED
        [m] = repo.messages(study_id=study_id)
        assert m.state == "SENT" and m.ack_code == "AA" and m.attempts == 1 and m.control_id == control
    assert str(peer.messages[0].segment("PID")[3][0][0]) == "MRN1"  # parsed by python-hl7
    d.close()


def test_ae_is_a_dead_letter_and_the_queue_moves_on(repo, peer):
    d = _deliverer(repo, peer)
    (bad, _), (good, _) = _queue(repo, 2, f"127.0.0.1:{peer.port}")
    peer.script.append(PeerAction.ack("AE", text="unknown patient"))
    assert d.drain() == 2
    failed = repo.get(bad)
    assert failed.state == State.FAILED and failed.error_kind == "delivery"
    assert "AE: unknown patient" in failed.last_error
    assert repo.messages(study_id=bad)[0].state == "DEAD"
    assert repo.get(good).state == State.DELIVERED
    # the admin fixed the EHR side: retry the dead letter, same MSH-10
    m = repo.message_requeue(repo.messages(study_id=bad)[0].id, "cli", resend=False)
    assert repo.get(bad).state == State.QUEUED
    assert d.drain() == 1 and repo.get(bad).state == State.DELIVERED
    assert peer.control_ids.count(m.control_id) == 2


def test_ar_then_aa_is_delivered_once(repo, peer):
    d = _deliverer(repo, peer)
    [(study_id, control)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
    peer.script.append(PeerAction.ack("AR", text="busy"))
    assert d.drain() == 0  # AR: backoff, the queue holds
    m = repo.messages(study_id=study_id)[0]
    assert m.state == "PENDING" and m.attempts == 1 and m.last_error == "AR: busy"
    time.sleep(0.1)
    assert d.drain() == 1
    assert repo.get(study_id).state == State.DELIVERED
    assert peer.control_ids == [control, control]
    assert [e.event for e in repo.events(study_id)].count("study.delivered") == 1


def test_destination_down_then_up_delivers_everything_in_order(repo, peer):
    d = _deliverer(repo, peer)
    queued = _queue(repo, 4, f"127.0.0.1:{peer.port}")
    peer.down()
    for _ in range(3):
        assert d.drain() == 0
        time.sleep(0.25)
    first = repo.messages(study_id=queued[0][0])[0]
    assert first.attempts >= 2 and "MllpConnectError" in first.last_error
    assert all(repo.messages(study_id=s)[0].attempts == 0 for s, _ in queued[1:])  # held behind the first
    peer.up()
    time.sleep(0.25)
    assert d.drain() == 4
    assert peer.control_ids == [c for _, c in queued]
    assert all(repo.get(s).state == State.DELIVERED for s, _ in queued)


def test_ack_slower_than_timeout_is_retried_with_the_same_control_id(repo, peer):
    d = _deliverer(repo, peer, timeout=0.3)
    [(study_id, control)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
    peer.script.append(PeerAction.ack("AA", delay=1.0))
    assert d.drain() == 0
    assert "MllpTimeout" in repo.messages(study_id=study_id)[0].last_error
    time.sleep(0.1)
    deadline = time.monotonic() + 5
    while repo.get(study_id).state != State.DELIVERED and time.monotonic() < deadline:
        d.drain()
        time.sleep(0.05)
    assert repo.get(study_id).state == State.DELIVERED
    assert set(peer.control_ids) == {control} and len(peer.control_ids) >= 2


def test_max_attempts_turns_retries_into_a_dead_letter(repo, peer):
    d = _deliverer(repo, peer, max_attempts=2)
    [(study_id, _)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
    peer.script.extend([PeerAction.ack("AR"), PeerAction.ack("AR")])
    d.drain()
    time.sleep(0.1)
    d.drain()
    m = repo.messages(study_id=study_id)[0]
    assert m.state == "DEAD" and "gave up after 2 attempts" in m.last_error
    assert repo.get(study_id).state == State.FAILED


def test_unframeable_message_is_a_dead_letter_not_a_crash(repo, peer):
    d = _deliverer(repo, peer)
    [(study_id, _)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
    with repo.sessions.begin() as s:
        from gateway.store.models import Message

        s.query(Message).update({"message": "not hl7 at all"})
    assert d.drain() == 1
    assert repo.messages(study_id=study_id)[0].state == "DEAD"
    assert peer.received == []


def test_resend_of_a_delivered_message(repo, peer):
    d = _deliverer(repo, peer)
    [(study_id, control)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
    d.drain()
    msg = repo.messages(study_id=study_id)[0]
    with pytest.raises(ValueError, match="retry takes DEAD"):
        repo.message_requeue(msg.id, "cli", resend=False)
    repo.message_requeue(msg.id, "cli", resend=True)
    assert d.drain() == 1
    assert peer.control_ids == [control, control] and repo.get(study_id).state == State.DELIVERED
    assert hl7.parse(peer.received[1]).segment("MSH")[10][0] == control


def test_every_event_of_a_try_names_its_message_through_the_bound_context(repo, peer):
    """The delivery job binds message_id/study_id/control_id once per try (structlog contextvars); each
    event carries them although no call passes them, and nothing of them is left bound afterwards."""
    import io
    import json
    import logging

    import structlog

    from gateway.logging import configure_logging

    saved, handlers, buf = structlog.get_config(), list(logging.getLogger().handlers), io.StringIO()
    configure_logging("debug", json=True, stream=buf)
    try:
        d = _deliverer(repo, peer)
        [(study_id, control)] = _queue(repo, 1, f"127.0.0.1:{peer.port}")
        peer.script.extend([PeerAction.ack("AR", text="busy"), PeerAction.ack("AE", text="unknown patient")])
        d.drain()
        time.sleep(0.1)
        d.drain()
        d.close()
    finally:
        structlog.configure(**saved)
        for h in [h for h in logging.getLogger().handlers if h not in handlers]:
            logging.getLogger().removeHandler(h)
    events = {e["event"]: e for e in map(json.loads, buf.getvalue().splitlines())}
    message_id = repo.messages(study_id=study_id)[0].id
    for name in ("message.retry_scheduled", "message.dead_letter"):
        assert (events[name]["message_id"], events[name]["study_id"], events[name]["control_id"]) == (
            message_id, study_id, control)
    assert structlog.contextvars.get_contextvars() == {}
