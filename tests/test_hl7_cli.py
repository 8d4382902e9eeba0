"""``psg-gateway hl7 test-destination|preview|listen`` and ``outbox list|show|retry|resend``."""

from __future__ import annotations

import json

import hl7
from mllp_peer import MllpPeer, PeerAction
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.hl7.listener import FileMllpListener
from gateway.hl7.mllp import MllpClient, MllpDestination
from gateway.store.db import make_engine, upgrade
from gateway.store.models import MessageState, State
from gateway.store.repo import Repo

runner = CliRunner()


def _cfg(tmp_path, port: int):
    f = tmp_path / "c.yaml"
    f.write_text(f"paths:\n  var_dir: {tmp_path / 'var'}\nhl7:\n  enabled: true\n  port: {port}\n"
                 "  timeout_seconds: 2\n")
    return f


def test_test_destination_prints_the_ack(tmp_path):
    with MllpPeer() as peer:
        r = runner.invoke(app, ["hl7", "test-destination", "--config", str(_cfg(tmp_path, peer.port))])
        assert r.exit_code == 0, r.output
        assert "ACK AA" in r.output
        [msg] = peer.messages
        assert str(msg.segment("MSH")[11]) == "T" and str(msg.segment("PID")[3][0][0]) == "TEST0000"
        peer.script.append(PeerAction.ack("AE", text="no such patient"))
        r = runner.invoke(app, ["hl7", "test-destination", "--config", str(_cfg(tmp_path, peer.port))])
        assert r.exit_code == 1 and "ACK AE (no such patient)" in r.output
        peer.down()
        r = runner.invoke(app, ["hl7", "test-destination", "--config", str(_cfg(tmp_path, peer.port))])
        assert r.exit_code == 1 and "MllpConnectError" in r.output


def test_outbox_commands_and_preview(tmp_path, db_url):
    cfg = _cfg(tmp_path, 2575)
    env = {"PSG__DATABASE__URL": db_url}
    engine = make_engine(db_url)
    upgrade(engine)
    repo = Repo(engine)
    s = repo.register_file(source="t", path="/p/a.edf", name="a.edf", sha256="d" * 64, filename_pattern=None,
                           actor="t").study
    s = repo.claim("w", 60)
    for st in (State.DECODED, State.MAPPED):
        s = repo.transition(s, st, "w", f"study.{st.lower()}")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "hazards.csv").write_text("index,phecode,phenotype,log_hazard,hazard_ratio\n"
                                         "1041,death,death,0.9,2.46\n")
    (out_dir / "metrics.json").write_text(json.dumps({"sleep": {"tst_min": 400.0, "stage_min": {}},
                                                      "model_bundle": {"calibrated_outcomes": ["death"]}}))
    s = repo.transition(s, State.INFERRED, "w", "study.inferred", output_path=str(out_dir), patient_id="MRN9",
                        bundle_name="sleepfm", bundle_version="1", bundle_validated=True)
    er7 = ("MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|PSGCLI0001|P|2.5.1\rPID|1||MRN9")
    s, m = repo.queue_message(s, State.QUEUED, "w", "study.queued", None, destination="127.0.0.1:2575",
                              control_id="PSGCLI0001", er7=er7, message_state=MessageState.PENDING,
                              correction=False)
    r = runner.invoke(app, ["outbox", "list", "--config", str(cfg), "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert [(x["id"], x["state"], x["control_id"]) for x in json.loads(r.stdout)] == [(m.id, "PENDING", "PSGCLI0001")]
    r = runner.invoke(app, ["outbox", "show", str(m.id), "--config", str(cfg), "--json"], env=env)
    assert json.loads(r.stdout)["message"] == er7 and json.loads(r.stdout)["attempts_recorded"] == []
    # an attempt recorded before its bytes left, and not finished: show lists it (what the EHR may hold)
    assert repo.hold_delivery("127.0.0.1:2575", "node-t:1", 60) == []
    repo.message_retry_later(m, repo.begin_attempt(m, "node-t:1", 60), "MllpTimeout: no ACK", 0.0)
    r = runner.invoke(app, ["outbox", "show", str(m.id), "--config", str(cfg), "--json"], env=env)
    [attempt] = json.loads(r.stdout)["attempts_recorded"]
    assert (attempt["attempt"], attempt["outcome"], attempt["holder"]) == (1, "ERROR", "node-t:1")
    r = runner.invoke(app, ["outbox", "show", str(m.id), "--config", str(cfg)], env=env)
    assert "attempt 1: ERROR" in r.stdout and "node-t:1" in r.stdout
    r = runner.invoke(app, ["outbox", "retry", str(m.id), "--config", str(cfg)], env=env)
    assert r.exit_code == 1 and "retry takes DEAD" in r.output
    repo.message_dead(m, None, "AE: bad", "AE", actor="t")
    r = runner.invoke(app, ["outbox", "retry", str(m.id), "--config", str(cfg)], env=env)
    assert r.exit_code == 0 and "PENDING" in r.output and repo.get(s.id).state == State.QUEUED

    # preview: flags re-evaluated from the stored outputs with the config's policy (default: percentile,
    # inactive without a reference), nothing stored
    cfg.write_text(cfg.read_text() + "flags:\n  outcomes:\n    - {label: death, log_hazard: 0.5, percentile: null}\n")
    r = runner.invoke(app, ["hl7", "preview", s.key, "--config", str(cfg)], env=env)
    assert r.exit_code == 0, r.output
    parsed = hl7.parse(r.output.strip().replace("\n", "\r").split("MSH", 1)[1].join(["MSH", ""]))
    assert str(parsed.segment("MSH")[10]) == "PREVIEW" and str(parsed.segment("PID")[3][0][0]) == "MRN9"
    assert any(str(x[3]).startswith("PSG-DEATH") for x in parsed.segments("OBX"))
    assert any(str(x[3]).startswith("PSG-DEATH-HR") for x in parsed.segments("OBX"))  # declared calibrated
    assert len(repo.messages(study_id=s.id)) == 1
    engine.dispose()


def test_listener_stores_messages_and_acks(tmp_path):
    listener = FileMllpListener("127.0.0.1", 0, tmp_path / "inbox").start()
    try:
        with MllpClient(MllpDestination("127.0.0.1", listener.port, timeout_seconds=2)) as client:
            sent = "MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|CTRL/1|P|2.5.1\rPID|1||X\u00e9"
            ack = client.send(sent)
        assert ack.accepted and ack.control_id == "CTRL/1"
        stored = (tmp_path / "inbox" / "CTRL_1.hl7").read_bytes()
        # ER7 as received, byte for byte (the MLLP framing stripped): CR between segments, no LF
        assert stored == sent.encode("utf-8") and b"\n" not in stored
        parsed = hl7.parse(stored.decode("utf-8"))
        assert str(parsed.segment("PID")[3]) == "X\u00e9" and str(parsed.segment("MSH")[10]) == "CTRL/1"
    finally:
        listener.stop()
