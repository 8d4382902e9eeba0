"""MLLP client against an independent MLLP listener (tests/mllp_peer.py) that misbehaves on request."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import hl7
import pytest
from mllp_peer import MllpPeer, PeerAction, ack_message

from gateway.hl7.mllp import (
    Ack,
    MllpClient,
    MllpConnectError,
    MllpDestination,
    MllpError,
    MllpProtocolError,
    MllpTimeout,
    frame,
    parse_ack,
)

TIMEOUT = 0.5


def oru(control_id: str, family: str = "Doe") -> str:
    """A minimal valid ORU^R01 v2.5.1 (independent of gateway.hl7.oru)."""
    return "\r".join([
        f"MSH|^~\\&|PSG-GATEWAY|SLEEPLAB|EHR|HOSPITAL|20260304050607||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||MRN0042^^^HOSP-A^MR||{family}^Jane||19500304|F",
        "OBR|1||ACC123|PSG^Polysomnography^99PSG|||20260303221500",
        "OBX|1|NM|93832-4^Total sleep time^LN||401.5|min|||||F",
    ]) + "\r"


@pytest.fixture
def peer():
    with MllpPeer() as p:
        yield p


def dest(port: int, **kw) -> MllpDestination:
    kw.setdefault("timeout_seconds", TIMEOUT)
    return MllpDestination(host="127.0.0.1", port=port, **kw)


@pytest.fixture
def client(peer):
    with MllpClient(dest(peer.port)) as c:
        yield c


# ---- framing and ACK parsing -----------------------------------------------------------------------
def test_frame():
    assert frame("MSH|x\rPID|1\r") == b"\x0bMSH|x\rPID|1\r\x1c\x0d"
    assert frame("NTE|Müller") == b"\x0bNTE|M\xc3\xbcller\x1c\x0d"
    with pytest.raises(ValueError):
        frame("MSH|\x1c")


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_parse_ack_separators(sep):
    raw = ack_message("PSG1", "AA", separator=sep)
    ack = parse_ack(raw)
    assert ack == Ack(code="AA", control_id="PSG1", text=None, raw=raw)
    assert ack.accepted and not ack.rejected_permanently and not ack.retryable


def test_parse_ack_err_text():
    ack = parse_ack(ack_message("PSG1", "AE", err="Unknown patient MRN0042", separator="\n"))
    assert (ack.code, ack.control_id, ack.text) == ("AE", "PSG1", "Unknown patient MRN0042")
    assert ack.rejected_permanently
    # MSA-3 and ERR-8 together; ERR-3 text when there is no ERR-8; escapes decoded
    raw = ("MSH|^~\\&|EHR|H|PSG|L|20260101||ACK|A1|P|2.5.1\rMSA|AE|PSG2|Bad \\F\\ field\r"
           "ERR|||101^Required field missing^HL70357|E\r")
    assert parse_ack(raw).text == "Bad | field; Required field missing"
    # v2.3 ERR-1: segment^sequence^field^code&text
    raw = "MSH|^~\\&|EHR|H|PSG|L|20260101||ACK|A1|P|2.3\rMSA|AR|PSG3\rERR|OBX^1^5^102&Data type error\r"
    ack = parse_ack(raw)
    assert (ack.code, ack.text, ack.retryable) == ("AR", "Data type error", True)


@pytest.mark.parametrize("code,accepted,permanent,retry", [
    ("AA", True, False, False), ("CA", True, False, False),
    ("AE", False, True, False), ("CE", False, True, False),
    ("AR", False, False, True), ("CR", False, False, True),
])
def test_ack_code_properties(code, accepted, permanent, retry):
    ack = parse_ack(f"MSA|{code}|X1")
    assert (ack.accepted, ack.rejected_permanently, ack.retryable) == (accepted, permanent, retry)


@pytest.mark.parametrize("raw", ["", "MSH|^~\\&|EHR\r", "MSA|ZZ|PSG1\r", "garbage"])
def test_parse_ack_unparsable(raw):
    with pytest.raises(MllpProtocolError):
        parse_ack(raw)


def test_send_needs_msh10(client):
    with pytest.raises(ValueError):
        client.send("MSH|^~\\&|PSG|L|EHR|H|20260101||ORU^R01^ORU_R01||P|2.5.1\r")
    with pytest.raises(ValueError):
        client.send("PID|1\r")


# ---- exchanges -------------------------------------------------------------------------------------
def test_aa(peer, client):
    msg = oru("PSG0001", family="Müller")
    ack = client.send(msg)
    assert (ack.code, ack.control_id, ack.accepted) == ("AA", "PSG0001", True)
    assert ack.raw.startswith("MSH|") and "\rMSA|AA|PSG0001" in ack.raw
    assert peer.received == [msg]
    parsed = peer.messages[0]
    assert str(parsed.segment("MSH")[10]) == "PSG0001"
    assert str(parsed.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(parsed.segment("PID")[5][0][0]) == "Müller"


def test_socket_options(peer, client):
    client.send(oru("PSG0001"))
    sock = client._sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


def test_one_connection_for_many_messages(peer, client):
    ids = [f"PSG{i:04d}" for i in range(10)]
    for cid in ids:
        assert client.send(oru(cid)).control_id == cid
    assert peer.control_ids == ids
    assert peer.connections == 1


def test_reconnects_after_peer_closed_idle_connection(peer, client):
    assert client.send(oru("PSG0001")).accepted
    peer.drop_connections()
    time.sleep(0.05)
    assert client.send(oru("PSG0002")).accepted  # no error: the closed connection is noticed before use
    assert peer.connections == 2
    assert peer.control_ids == ["PSG0001", "PSG0002"]


def test_idle_reconnect_seconds(peer):
    with MllpClient(dest(peer.port, idle_reconnect_seconds=0.1)) as client:
        client.send(oru("PSG0001"))
        client.send(oru("PSG0002"))
        assert peer.connections == 1
        time.sleep(0.2)
        client.send(oru("PSG0003"))
        assert peer.connections == 2
        assert peer.wait_for(3)
        assert peer.wait_until(lambda p: p.open_connections == 1)  # the idle one was closed, not leaked


def test_close_then_send_reconnects(peer, client):
    client.send(oru("PSG0001"))
    client.close()
    assert not client.connected
    client.send(oru("PSG0002"))
    assert peer.connections == 2


@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_ack_codes(peer, client, code):
    peer.script.append(PeerAction(code=code, text="see ERR" if code[1] != "A" else None,
                                  err="Unknown patient" if code[1] != "A" else None))
    ack = client.send(oru("PSG0001"))
    assert (ack.code, ack.control_id) == (code, "PSG0001")
    assert ack.accepted == (code in ("AA", "CA"))
    assert ack.rejected_permanently == (code in ("AE", "CE"))
    assert ack.retryable == (code in ("AR", "CR"))
    assert ack.text == (None if code[1] == "A" else "see ERR; Unknown patient")
    assert client.connected  # a negative ACK is an answer, not a broken stream
    assert client.send(oru("PSG0002")).accepted
    assert peer.connections == 1


def test_timeout_then_resend(peer, client):
    peer.script.append(PeerAction(delay=3.0))
    msg = oru("PSG0001")
    t0 = time.monotonic()
    with pytest.raises(MllpTimeout) as info:
        client.send(msg)
    elapsed = time.monotonic() - t0
    assert TIMEOUT - 0.05 <= elapsed < TIMEOUT + 0.4
    assert info.value.retryable
    assert not client.connected
    ack = client.send(msg)  # same message, same MSH-10
    assert (ack.code, ack.control_id) == ("AA", "PSG0001")
    assert peer.control_ids == ["PSG0001", "PSG0001"]
    assert peer.connections == 2


def test_slow_drip_cannot_extend_the_timeout(peer, client):
    peer.script.append(PeerAction(drip=0.05))  # ~100 bytes: 5 s of drip, each byte well within the timeout
    t0 = time.monotonic()
    with pytest.raises(MllpTimeout):
        client.send(oru("PSG0001"))
    assert time.monotonic() - t0 < TIMEOUT + 0.4


def test_ack_byte_by_byte(peer, client):
    peer.script.append(PeerAction(drip=0.0))  # one sendall per byte with TCP_NODELAY: many segments
    with MllpClient(dest(peer.port, timeout_seconds=5.0)) as slow_client:
        ack = slow_client.send(oru("PSG0001"))
    assert (ack.code, ack.control_id) == ("AA", "PSG0001")


def test_bytes_before_start_block_are_ignored(peer, client):
    body = ack_message("PSG0001", "AA").encode()
    peer.script.append(PeerAction(raw=b"\r\n noise \x1c\x0d" + b"\x0b" + body + b"\x1c\x0d"))
    ack = client.send(oru("PSG0001"))
    assert ack.accepted and ack.raw == body.decode()
    assert client.connected


def test_bytes_after_the_ack_drop_the_connection(peer, client):
    body = ack_message("PSG0001", "AA").encode()
    peer.script.append(PeerAction(raw=b"\x0b" + body + b"\x1c\x0d" + b"\x0bMSH|extra"))
    assert client.send(oru("PSG0001")).accepted
    assert not client.connected  # out of sync: the next send reconnects
    assert client.send(oru("PSG0002")).accepted
    assert peer.connections == 2


def test_half_ack_then_close(peer, client):
    peer.script.append(PeerAction.half_ack_then_close())
    with pytest.raises(MllpProtocolError, match="middle of the ACK"):
        client.send(oru("PSG0001"))
    assert not client.connected
    assert client.send(oru("PSG0001")).accepted


def test_hang_up_without_answer(peer, client):
    peer.script.append(PeerAction.hang_up())
    with pytest.raises(MllpProtocolError, match="before the ACK"):
        client.send(oru("PSG0001"))


def test_wrong_control_id(peer, client):
    peer.script.append(PeerAction.wrong_id())
    with pytest.raises(MllpProtocolError, match="NOT-YOUR-MESSAGE"):
        client.send(oru("PSG0001"))
    assert not client.connected
    assert client.send(oru("PSG0002")).control_id == "PSG0002"
    assert peer.connections == 2


def test_unparsable_ack(peer, client):
    peer.script.append(PeerAction(raw=b"\x0bHELLO WORLD\x1c\x0d"))
    with pytest.raises(MllpProtocolError):
        client.send(oru("PSG0001"))
    assert not client.connected


def test_peer_down_then_up(peer, client):
    assert client.send(oru("PSG0001")).accepted
    peer.down()
    t0 = time.monotonic()
    with pytest.raises(MllpConnectError) as info:
        client.send(oru("PSG0002"))
    assert time.monotonic() - t0 < TIMEOUT
    assert info.value.retryable
    with pytest.raises(MllpConnectError):  # still down: refused again, no stale state
        client.send(oru("PSG0002"))
    peer.up()
    assert client.send(oru("PSG0002")).accepted
    assert peer.control_ids == ["PSG0001", "PSG0002"]


def test_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with MllpClient(dest(port)) as client, pytest.raises(MllpConnectError):
        client.send(oru("PSG0001"))


# ---- TLS -------------------------------------------------------------------------------------------
def _self_signed(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")
    return {name: _self_signed(d, name, cn) for name, cn in
            (("server", "localhost"), ("other", "other-ca"), ("client", "psg-gateway"))}


def _server_context(certs, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*map(str, certs["server"]))
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(certs["client"][0]))
    return ctx


def test_tls_verified(certs):
    with MllpPeer(ssl_context=_server_context(certs)) as peer:
        with MllpClient(dest(peer.port, tls=True, ca_file=certs["server"][0])) as client:
            assert client.send(oru("PSG0001")).accepted
            assert client.send(oru("PSG0002")).accepted
        with MllpClient(dest(peer.port, tls=True, ca_file=certs["server"][0],
                             server_hostname="localhost")) as client:
            assert client.send(oru("PSG0003")).accepted
        assert peer.control_ids == ["PSG0001", "PSG0002", "PSG0003"]
        assert peer.connections == 2


def test_tls_reconnects_after_idle_close(certs):
    with MllpPeer(ssl_context=_server_context(certs)) as peer:
        with MllpClient(dest(peer.port, tls=True, ca_file=certs["server"][0])) as client:
            assert client.send(oru("PSG0001")).accepted
            peer.drop_connections()
            time.sleep(0.05)
            assert client.send(oru("PSG0002")).accepted
        assert peer.connections == 2


@pytest.mark.parametrize("kw", [{"ca_file": "other"}, {"ca_file": "server", "server_hostname": "ehr.example.org"}])
def test_tls_verification_failure(certs, kw):
    kw = {**kw, "ca_file": certs[kw["ca_file"]][0]}
    with MllpPeer(ssl_context=_server_context(certs)) as peer:
        with MllpClient(dest(peer.port, tls=True, **kw)) as client:
            with pytest.raises(MllpConnectError, match="certificate verify failed"):
                client.send(oru("PSG0001"))
            assert not client.connected
        assert peer.received == []


def test_tls_verify_off(certs):
    with MllpPeer(ssl_context=_server_context(certs)) as peer, \
            MllpClient(dest(peer.port, tls=True, ca_file=certs["other"][0], verify=False)) as client:
        assert client.send(oru("PSG0001")).accepted


def test_tls_handshake_timeout(peer):
    # the plain peer ignores the ClientHello (no MLLP start block) and never answers
    t0 = time.monotonic()
    with MllpClient(dest(peer.port, tls=True, verify=False)) as client, \
            pytest.raises(MllpConnectError, match="timed out"):
        client.send(oru("PSG0001"))
    assert time.monotonic() - t0 < TIMEOUT + 0.4


def test_tls_bad_client_cert_path(certs, tmp_path):
    with MllpClient(dest(1, tls=True, client_cert=tmp_path / "missing.crt")) as client, \
            pytest.raises(MllpConnectError, match="TLS setup"):
        client.send(oru("PSG0001"))


def test_mutual_tls(certs):
    with MllpPeer(ssl_context=_server_context(certs, require_client_cert=True)) as peer:
        cert, key = certs["client"]
        with MllpClient(dest(peer.port, tls=True, ca_file=certs["server"][0], client_cert=cert,
                             client_key=key)) as client:
            assert client.send(oru("PSG0001")).accepted
        # no client certificate: refused (during the handshake, or with TLS 1.3 at the first read)
        with MllpClient(dest(peer.port, tls=True, ca_file=certs["server"][0])) as client, \
                pytest.raises(MllpError):
            client.send(oru("PSG0002"))
        assert peer.control_ids == ["PSG0001"]
        # TLS 1.3: the client may see the alert before the peer has recorded the failure
        assert peer.wait_until(lambda p: p.tls_errors)


def test_peer_parses_with_python_hl7(peer, client):
    """The listener's records are python-hl7 messages (the independent parser)."""
    client.send(oru("PSG0009"))
    assert isinstance(peer.messages[0], hl7.Message)
