"""The DICOM receiver's pynetdicom fast paths (gateway/sources/dicom/fastpaths.py) on their own, and the
``dicom.fast_paths`` switch in the configuration.

The pins: a hash of every pynetdicom function the fast paths mirror or hook, compared with the installed
pynetdicom. The encoders and the PDU decoder: byte-identical with what pynetdicom and pydicom produce.
The receiver with the fast paths on and off is tested against real peers in test_dicom_scp.py.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import socket

import pydicom
import pytest
import yaml
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, association, dimse_messages, transport
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import P_DATA_TF
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.config import ConfigError, DicomConfig, GatewayConfig, load_config
from gateway.sources.dicom import fastpaths
from gateway.sources.dicom.receiver import _UserQueue
from gateway.synthetic.dicom_study import SLEEP_EEG

TS = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
runner = CliRunner()


# ---- the pins -------------------------------------------------------------------------------------------------


def _pinned_object(path: str):
    module, *names = path.split(".")
    obj = importlib.import_module(f"pynetdicom.{module}")
    for name in names:
        obj = getattr(obj, name)
    return obj


def test_fast_paths_match_installed_pynetdicom():
    # A pynetdicom upgrade that changes any pinned function fails here: re-read the new code, update the
    # fast path that mirrors it, then fastpaths.PINNED_SOURCES (and SUPPORTED_PYNETDICOM for a new minor).
    assert fastpaths.ACTIVE, "fast paths disabled for this pynetdicom version"
    got = {path: hashlib.sha256(inspect.getsource(_pinned_object(path)).encode()).hexdigest()[:16]
           for path in fastpaths.PINNED_SOURCES}
    assert got == fastpaths.PINNED_SOURCES
    # the module-level names the chunked receive looks up, and the attributes the fast paths replace or use
    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        assert hasattr(dimse_messages, name)
    assoc = association.Association(AE(), "acceptor")
    for obj, attrs in ((assoc.dul, ("to_provider_queue", "to_user_queue", "_recv_pdu", "event_queue",
                                    "_run_loop_delay", "_kill_thread", "artim_timer", "_idle_timer",
                                    "_read_pdu_data", "_decode_pdu", "_process_recv_primitive",
                                    "_is_transport_event", "state_machine")),
                       (assoc.dimse, ("msg_queue", "send_msg", "maximum_pdu_size", "get_msg")),
                       (assoc, ("_dul_ready", "_reactor_checkpoint", "_is_paused", "_kill", "_run_reactor",
                                "_serve_request"))):
        for attr in attrs:
            assert hasattr(obj, attr), attr


def test_supported_versions_decide_active(monkeypatch):
    assert fastpaths.SUPPORTED_PYNETDICOM == ("3.0",)
    monkeypatch.setattr(fastpaths, "ACTIVE", False)
    assoc = association.Association(AE(), "acceptor")
    assert fastpaths.install(assoc) is False  # another pynetdicom: its own code runs
    assert "run" not in vars(assoc.dul) and "_run_reactor" not in vars(assoc)


# ---- install ----------------------------------------------------------------------------------------------------


def test_install_replaces_on_one_acceptor_only():
    requestor = association.Association(AE(), "requestor")
    assert fastpaths.install(requestor) is False
    assoc = association.Association(AE(), "acceptor")
    user_queue = assoc.dul.to_user_queue = _UserQueue()  # as the receiver does, before install
    assert fastpaths.install(assoc, early_writeback=True) is True
    waker = assoc._psg_waker
    try:
        assert assoc.dul._psg_waker is waker and assoc._psg_early_writeback is True
        assert {"run", "_read_pdu_data"} <= set(vars(assoc.dul))
        assert "send_msg" in vars(assoc.dimse) and "_run_reactor" in vars(assoc)
        other = association.Association(AE(), "acceptor")  # untouched
        assert "run" not in vars(other.dul) and "send_msg" not in vars(other.dimse)
        # every put wakes the reactor that reads the queue; the receiver's request queue keeps its behaviour
        assoc.dimse.msg_queue.put((1, None))
        assert waker.assoc_event.is_set()
        waker.assoc_event.clear()
        assert user_queue.wake_unrequested() is True
        assert waker.assoc_event.is_set() and user_queue.get_nowait() is None
        assert assoc.dul.to_user_queue is user_queue
    finally:
        waker.close()


def test_recv_exact_only_once_established(monkeypatch):
    a, b = socket.socketpair()
    try:
        assoc = association.Association(AE(), "acceptor")
        sock = transport.AssociationSocket(assoc, client_socket=a)
        assoc.set_socket(sock)
        assert fastpaths.install(assoc) is True
        original: list[int] = []
        recv = fastpaths._ORIGINAL_RECV
        monkeypatch.setattr(fastpaths, "_ORIGINAL_RECV", lambda self, n: original.append(n) or recv(self, n))
        b.sendall(b"abcdef")
        assert sock.recv(6) == b"abcdef" and original == [6]  # not yet admitted: pynetdicom's reads
        assoc.is_established = True
        b.sendall(b"x" * 70000)
        assert sock.recv(70000) == b"x" * 70000 and original == [6]
        b.sendall(b"tail")
        b.close()
        assert sock.recv(10) == b"tail"  # fewer only when the peer closed, as pynetdicom
    finally:
        assoc._psg_waker.close()
        a.close()
        b.close()


# ---- byte-identical encoders and the copy-free decoder --------------------------------------------------------


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000])
@pytest.mark.parametrize("uid", ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.12345678901234567890"])
def test_store_response_encoded_like_pynetdicom(status, uid):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 65535
    rsp.AffectedSOPClassUID = SLEEP_EEG
    rsp.AffectedSOPInstanceUID = uid
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = msg.encode_msg(1, 16384)
    assert pdata.presentation_data_value_list[0][1] == b"\x03" + fastpaths._encode_store_rsp(rsp)
    rsp.ErrorComment = "detail"
    assert fastpaths._encode_store_rsp(rsp) is None  # anything unusual goes through pynetdicom


@pytest.mark.parametrize("ts", TS)
@pytest.mark.parametrize("uid", ["1.2.3", "1.2.34"])
def test_file_meta_encoded_like_pydicom(ts, uid):
    kw = {"sop_class_uid": pydicom.uid.UID(SLEEP_EEG), "sop_instance_uid": pydicom.uid.UID(uid),
          "transfer_syntax": ts}
    buf = io.BytesIO()
    write_file_meta_info(buf, create_file_meta(**kw))
    assert buf.getvalue() == fastpaths._encode_file_meta(**kw)


def test_file_meta_hooks_act_only_for_fast_associations():
    # outside a DUL thread of an association with the fast paths: pynetdicom's and pydicom's own
    kw = {"sop_class_uid": pydicom.uid.UID(SLEEP_EEG), "sop_instance_uid": pydicom.uid.UID("1.2.3"),
          "transfer_syntax": ExplicitVRLittleEndian}
    meta = fastpaths._create_file_meta(**kw)
    assert isinstance(meta, pydicom.Dataset)
    buf = io.BytesIO()
    fastpaths._write_file_meta_info(buf, meta)
    assert buf.getvalue() == fastpaths._encode_file_meta(**kw)


def test_p_data_decoded_like_pynetdicom():
    pdvs = [(1, b"\x03" + b"c" * 9), (3, b"\x00" + bytes(range(256)) * 40), (5, b"\x02")]
    body = b"".join((len(d) + 1).to_bytes(4, "big") + bytes([c]) + d
                    for c, d in pdvs)
    reference = P_DATA_TF()
    reference.decode(b"\x04\x00" + len(body).to_bytes(4, "big") + body)
    fast = fastpaths._decode_p_data_tf(bytearray(body))
    assert [(i.presentation_context_id, bytes(i.presentation_data_value))
            for i in fast.presentation_data_value_items] == \
        [(i.presentation_context_id, i.presentation_data_value) for i in reference.presentation_data_value_items]
    assert [(c, bytes(d)) for c, d in fast.to_primitive().presentation_data_value_list] == pdvs
    for broken in (body[:-1], body + b"\x00\x00", b"\x00\x00\x00\x00\x01"):
        with pytest.raises(ValueError):
            fastpaths._decode_p_data_tf(bytearray(broken))


# ---- dicom.fast_paths in the configuration ------------------------------------------------------------------


def test_fast_paths_key_defaults_on_and_reads_booleans(tmp_path):
    assert DicomConfig().fast_paths is True and GatewayConfig().dicom.fast_paths is True
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"dicom": {"fast_paths": False}}))
    assert load_config(f, env={}).dicom.fast_paths is False
    f.write_text("dicom:\n  port: 11112\n")
    assert load_config(f, env={"PSG__DICOM__FAST_PATHS": "false"}).dicom.fast_paths is False


@pytest.mark.parametrize(("doc", "problem"), [
    ({"dicom": {"fast_paths": "maybe"}}, "dicom.fast_paths: Input should be a valid boolean"),
    ({"dicom": {"fast_paths": [True]}}, "dicom.fast_paths: Input should be a valid boolean"),
    ({"dicom": {"fastpaths": False}}, "dicom.fastpaths: Extra inputs are not permitted"),
])
def test_fast_paths_key_rejects_what_is_not_a_boolean(tmp_path, doc, problem):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as exc:
        load_config(f, env={})
    assert any(p.startswith(problem) for p in exc.value.problems), exc.value.problems


def test_config_check_accepts_and_rejects_fast_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("PSG_CONFIG", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text("paths:\n  var_dir: v\ndicom:\n  fast_paths: false\n")
    r = runner.invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 0 and "ok" in r.output, r.output
    f.write_text("paths:\n  var_dir: v\ndicom:\n  fast_paths: sometimes\n")
    r = runner.invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 1 and "dicom.fast_paths" in r.output, r.output
