"""The DICOM receiver (Storage SCP) against real peers: DCMTK storescu/echoscu and pynetdicom.

DCMTK tests skip when the tools are missing, unless ``PSG_REQUIRE_DCMTK=1`` (CI), where they fail.
The fast paths' own unit tests (pins, encoders) are in test_dicom_fastpaths.py; here, the receiver with
them on (the default) and off.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import DCMTK_ENV, dcmtk
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from gateway.config import DicomCaller, DicomConfig, TlsConfig
from gateway.metrics import Metrics
from gateway.sources.base import Source
from gateway.sources.dicom import fastpaths
from gateway.sources.dicom import receiver as receiver_module
from gateway.sources.dicom.receiver import (
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    DicomReceiver,
    ReceivedInstance,
    spool_path_for,
)
from gateway.synthetic.dicom_study import (
    GENERAL_ECG,
    MULTICHANNEL_RESPIRATORY,
    SLEEP_EEG,
    WaveformChannel,
    WaveformGroup,
    make_waveform_dataset,
    write_psg_study,
)

TS = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
SOP_CLASSES = (SLEEP_EEG, MULTICHANNEL_RESPIRATORY, GENERAL_ECG)


class MemorySink:
    """A fake :class:`~gateway.sources.base.Intake` (the DICOM half of it)."""

    def __init__(self) -> None:
        self.instances: dict[str, ReceivedInstance] = {}
        self.fail = False
        self.lock = threading.Lock()
        self.promoted: set[str] = set()
        self.stable_ages: list[float] = []

    def known_instance(self, sop_instance_uid: str) -> bool:
        with self.lock:
            return sop_instance_uid in self.instances

    def instance_received(self, instance: ReceivedInstance) -> None:
        if self.fail:
            raise RuntimeError("database is down")
        assert instance.path.is_file()
        with self.lock:
            self.instances[instance.sop_instance_uid] = instance

    def promote_stable(self, stable_age_seconds: float) -> int:
        """Every study not promoted yet is stable (the age is recorded, not waited for)."""
        with self.lock:
            self.stable_ages.append(stable_age_seconds)
            ready = {i.study_uid for i in self.instances.values()} - self.promoted
            self.promoted |= ready
            return len(ready)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_psg_study(tmp_path_factory.mktemp("study"), hours=0.05, seed=7)


def _cfg(**kw) -> DicomConfig:
    kw.setdefault("port", 0)
    kw.setdefault("network_timeout_seconds", 10.0)
    return DicomConfig(**kw)


@pytest.fixture
def make_receiver(tmp_path: Path):
    started: list[DicomReceiver] = []

    def make(cfg: DicomConfig | None = None, sink: MemorySink | None = None, spool: Path | None = None):
        sink = sink or MemorySink()
        metrics = Metrics()
        receiver = DicomReceiver(cfg or _cfg(), spool or tmp_path / "spool", sink, metrics)
        receiver.start()
        started.append(receiver)
        return receiver, sink, metrics

    yield make
    for receiver in started:
        receiver.stop(timeout=2.0)


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def _spooled(spool: Path) -> list[Path]:
    return sorted(p for p in (spool / "dicom").rglob("*") if p.is_file())


def _storescu(port: int, files: list[Path], *extra: str, aet: str = "MODALITY",
              aec: str = "PSGGATEWAY") -> subprocess.CompletedProcess:
    # -R: propose only the SOP classes of the files (the default list is full at 128 contexts and lacks
    # Sleep EEG, so storescu would then fail with "no presentation context").
    return subprocess.run([dcmtk("storescu"), "-R", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
                           *map(str, files)], check=False, env=DCMTK_ENV, capture_output=True, text=True, timeout=30)


def _scu(ae_title: str = "PYSCU") -> AE:
    ae = AE(ae_title=ae_title)
    for uid in SOP_CLASSES:
        ae.add_requested_context(uid, TS)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    return ae


def _send(port: int, files: list[Path], ae_title: str = "PYSCU", called: str = "PSGGATEWAY",
          **kw) -> list[int]:
    assoc = _scu(ae_title).associate("127.0.0.1", port, ae_title=called, **kw)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def _wait(predicate, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---- storing ----------------------------------------------------------------------------------------------


def test_storescu_study_stored_then_duplicates(make_receiver, study, tmp_path):
    receiver, sink, metrics = make_receiver()
    result = _storescu(receiver.port, study)
    assert result.returncode == 0, result.stderr

    assert len(sink.instances) == 3
    expected = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in study}
    for uid, inst in sink.instances.items():
        src = expected[uid]
        assert inst.study_uid == src.StudyInstanceUID
        assert inst.series_uid == src.SeriesInstanceUID
        assert inst.sop_class_uid == src.SOPClassUID
        assert inst.calling_ae == "MODALITY" and inst.peer_host == "127.0.0.1"
        assert inst.path == spool_path_for(tmp_path / "spool", src.StudyInstanceUID, uid)
        assert inst.size == inst.path.stat().st_size
        ds = pydicom.dcmread(inst.path)
        assert ds.preamble is not None and ds.file_meta.TransferSyntaxUID
        assert ds.SOPInstanceUID == uid and ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.WaveformSequence[0].WaveformData == src.WaveformSequence[0].WaveformData
        assert ds.PatientID == src.PatientID
    # no identifier in any path, nothing left over
    assert len(_spooled(tmp_path / "spool")) == 3
    assert all("1.2." not in str(p.relative_to(tmp_path)) for p in _spooled(tmp_path / "spool"))
    assert _metric(metrics, "psg_dicom_instances_total", result="stored") == 3
    assert _metric(metrics, "psg_dicom_received_bytes_total") == sum(i.size for i in sink.instances.values())

    again = _storescu(receiver.port, study)
    assert again.returncode == 0, again.stderr
    assert len(sink.instances) == 3 and len(_spooled(tmp_path / "spool")) == 3
    assert _metric(metrics, "psg_dicom_instances_total", result="duplicate") == 3
    assert _metric(metrics, "psg_dicom_associations_total", result="accepted") == 2
    assert _wait(lambda: receiver.active_associations == 0)
    assert _metric(metrics, "psg_dicom_active_associations") == 0


def test_pynetdicom_sender_study_stored(make_receiver, study, tmp_path, monkeypatch):
    # pynetdicom's temporary files go to the spool's own incoming folder, never the system temp folder.
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    receiver, sink, _ = make_receiver()
    assert _send(receiver.port, study) == [0, 0, 0]
    assert {i.sop_class_uid for i in sink.instances.values()} == set(SOP_CLASSES)
    for inst in sink.instances.values():
        assert pydicom.dcmread(inst.path).StudyInstanceUID == inst.study_uid
    assert list(system_tmp.iterdir()) == []
    assert list((tmp_path / "spool" / "dicom" / ".incoming").iterdir()) == []


def test_big_endian_and_implicit_transfer_syntaxes(make_receiver, study):
    receiver, sink, _ = make_receiver()
    for ts in (ExplicitVRBigEndian, ImplicitVRLittleEndian):
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(SLEEP_EEG, ts)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
        assert assoc.is_established
        ds = make_waveform_dataset(SLEEP_EEG, [WaveformGroup(256, [WaveformChannel("C3-M2", np.zeros(512))])],
                                   transfer_syntax=ts)
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        stored = sink.instances[ds.SOPInstanceUID]
        back = pydicom.dcmread(stored.path)
        assert back.file_meta.TransferSyntaxUID == ts
        assert back.StudyInstanceUID == ds.StudyInstanceUID
        assert back.WaveformSequence[0].WaveformData == ds.WaveformSequence[0].WaveformData


def test_echoscu(make_receiver):
    receiver, _, _ = make_receiver()
    result = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "PSGGATEWAY", "127.0.0.1",
                             str(receiver.port)], check=False, env=DCMTK_ENV, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr


def test_pynetdicom_echo(make_receiver):
    receiver, _, _ = make_receiver()
    assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


# ---- association security -----------------------------------------------------------------------------------


def test_unknown_calling_ae_rejected(make_receiver, study, tmp_path):
    receiver, sink, metrics = make_receiver(_cfg(allowed_callers=[DicomCaller(ae_title="GOODPACS")]))
    result = _storescu(receiver.port, study, aet="INTRUDER")
    assert result.returncode != 0
    assoc = _scu("INTRUDER").associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    assert assoc.is_rejected
    assert sink.instances == {} and _spooled(tmp_path / "spool") == []
    assert _metric(metrics, "psg_dicom_associations_total", result="rejected") == 2
    assert _metric(metrics, "psg_dicom_associations_total", result="accepted") == 0
    # the allowed caller is accepted
    assert _send(receiver.port, study[:1], ae_title="GOODPACS") == [0]


def test_wrong_called_ae_rejected(make_receiver, study, tmp_path):
    receiver, sink, metrics = make_receiver()
    assert _storescu(receiver.port, study, aec="OTHERAE").returncode != 0
    assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="OTHERAE")
    assert assoc.is_rejected
    assert sink.instances == {} and _spooled(tmp_path / "spool") == []
    assert _metric(metrics, "psg_dicom_associations_total", result="rejected") == 2


def test_called_ae_not_checked_when_disabled(make_receiver, study):
    receiver, sink, _ = make_receiver(_cfg(require_called_ae=False))
    assert _send(receiver.port, study[:1], called="ANYTHING") == [0]
    assert len(sink.instances) == 1


def test_caller_host_must_match(make_receiver, study, tmp_path):
    receiver, sink, metrics = make_receiver(_cfg(allowed_callers=[DicomCaller(ae_title="PYSCU",
                                                                              host="10.9.9.9")]))
    assoc = _scu("PYSCU").associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    assert assoc.is_rejected
    assert _metric(metrics, "psg_dicom_associations_total", result="rejected") == 1
    assert sink.instances == {} and _spooled(tmp_path / "spool") == []

    ok, _, _ = make_receiver(_cfg(allowed_callers=[DicomCaller(ae_title="PYSCU", host="10.9.9.9"),
                                                         DicomCaller(ae_title="PYSCU", host="127.0.0.1")]))
    assert _send(ok.port, study[:1]) == [0]


def test_max_associations(make_receiver):
    receiver, _, metrics = make_receiver(_cfg(max_associations=1))
    first = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    assert first.is_established
    assert _wait(lambda: receiver.active_associations == 1)
    second = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    assert second.is_rejected
    first.release()
    assert _metric(metrics, "psg_dicom_associations_total", result="rejected") == 1
    assert _wait(lambda: receiver.active_associations == 0)


# ---- connections that never associate (issue 15: the port cannot be starved) ---------------------------------


def _silent(port: int, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``n`` TCP connections that never send anything (a port scan, a broken client, an attacker)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closed ``sock`` within ``timeout`` s (recv returns b"" or the connection resets)."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def _threads(receiver: DicomReceiver) -> int:
    """pynetdicom's association threads of this receiver (what its own limit used to count)."""
    return len(receiver._server.active_associations)


def test_silent_connections_hold_no_association_slot(make_receiver):
    # The incident: 3 slots, connections that never send an A-ASSOCIATE-RQ; here 5 of them.
    receiver, _, metrics = make_receiver(_cfg(max_associations=3, max_pending_per_host=10, acse_timeout_seconds=8.0,
                                              allowed_callers=[DicomCaller(ae_title="PYSCU")]))
    silent = _silent(receiver.port, 5)
    try:
        assert _wait(lambda: receiver.pending_connections == 5)
        assert _wait(lambda: _threads(receiver) == 5)
        start = time.monotonic()
        assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - start < 4.0
        assert receiver.pending_connections == 5  # at once: the silent ones were not in the way
        assert _metric(metrics, "psg_dicom_pending_connections") == 5
        # the 3 slots go to callers that associate; a 4th is rejected (transient), the silent ones still there
        held = [_scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY") for _ in range(3)]
        try:
            assert all(a.is_established for a in held)
            assert _wait(lambda: receiver.active_associations == 3)
            extra = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
            assert extra.is_rejected
            assert _metric(metrics, "psg_dicom_associations_total", result="rejected") == 1
        finally:
            for a in held:
                a.release()
        assert _wait(lambda: receiver.active_associations == 0)
        again = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")  # slots freed on close
        assert again.is_established
        again.release()
    finally:
        for s in silent:
            s.close()
    assert _wait(lambda: receiver.pending_connections == 0)


def test_echoscu_past_silent_connections(make_receiver):
    echoscu = dcmtk("echoscu")
    receiver, _, _ = make_receiver(_cfg(max_associations=1, max_pending_per_host=10, acse_timeout_seconds=8.0))
    silent = _silent(receiver.port, 3)
    try:
        assert _wait(lambda: receiver.pending_connections == 3)
        result = subprocess.run([echoscu, "-aet", "MODALITY", "-aec", "PSGGATEWAY", "127.0.0.1", str(receiver.port)],
                                check=False, env=DCMTK_ENV, capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        assert receiver.pending_connections == 3
    finally:
        for s in silent:
            s.close()


def test_silent_connections_closed_after_acse_timeout(make_receiver):
    receiver, _, metrics = make_receiver(_cfg(acse_timeout_seconds=1.0))
    socks = _silent(receiver.port, 3)
    # half an A-ASSOCIATE-RQ: pynetdicom's reader blocks in recv, which its own timers cannot end
    half = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
    half.sendall(b"\x01\x00" + (200).to_bytes(4, "big") + b"\x00\x01")
    socks.append(half)
    start = time.monotonic()
    try:
        assert _wait(lambda: receiver.pending_connections == 4)
        assert all(_closed_by_server(s, 6.0) for s in socks)
        assert 0.8 <= time.monotonic() - start < 5.0
        assert _wait(lambda: receiver.pending_connections == 0)
        assert _metric(metrics, "psg_dicom_connections_closed_total", reason="acse_timeout") == 4
        assert _metric(metrics, "psg_dicom_pending_connections") == 0
        assert _wait(lambda: _threads(receiver) == 0)  # their association threads ended too
    finally:
        for s in socks:
            s.close()


def test_tls_silent_connections_closed_after_acse_timeout(make_receiver, certs):
    cert, key = certs["server"]
    receiver, _, metrics = make_receiver(_cfg(acse_timeout_seconds=1.0, network_timeout_seconds=30.0,
                                              tls=TlsConfig(enabled=True, cert_file=cert, key_file=key)))
    socks = _silent(receiver.port, 2)
    socks[1].sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello that never ends: the handshake blocks
    try:
        assert _wait(lambda: receiver.pending_connections == 2)
        start = time.monotonic()
        assert all(_closed_by_server(s, 6.0) for s in socks)
        assert time.monotonic() - start < 5.0  # not the 30 s network timeout of the handshake
        assert _wait(lambda: receiver.pending_connections == 0)
        assert _metric(metrics, "psg_dicom_connections_closed_total", reason="acse_timeout") == 2
        assert _wait(lambda: _threads(receiver) == 0)
        # and the port works
        assert _send(receiver.port, [], tls_args=(_client_ctx(cert), "localhost")) == []
    finally:
        for s in socks:
            s.close()


def test_per_host_cap_closes_extra_pending_connections_at_once(make_receiver):
    receiver, _, metrics = make_receiver(_cfg(max_pending_per_host=2, acse_timeout_seconds=10.0))
    socks = _silent(receiver.port, 3, source="127.0.0.2")
    try:
        start = time.monotonic()
        assert _closed_by_server(socks[2], 3.0)
        assert time.monotonic() - start < 3.0
        assert not any(_closed_by_server(s, 0.2) for s in socks[:2])
        assert receiver.pending_connections == 2
        assert _metric(metrics, "psg_dicom_connections_closed_total", reason="per_host_cap") == 1
        assert _threads(receiver) == 2  # refused in the accept loop: no thread for it
        # another host is not affected
        assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        # once one of its pending connections is gone, the host may connect again
        socks[0].close()
        assert _wait(lambda: receiver.pending_connections == 1)
        socks.extend(_silent(receiver.port, 1, source="127.0.0.2"))
        assert _wait(lambda: receiver.pending_connections == 2)
        assert not _closed_by_server(socks[-1], 0.2)
    finally:
        for s in socks:
            s.close()


def test_peer_closed_connection_released_at_once(make_receiver):
    receiver, _, metrics = make_receiver(_cfg(acse_timeout_seconds=10.0))
    socks = _silent(receiver.port, 2)
    try:
        assert _wait(lambda: receiver.pending_connections == 2)
        assert _wait(lambda: _threads(receiver) == 2)
        socks[0].close()
        start = time.monotonic()
        assert _wait(lambda: receiver.pending_connections == 1, 2.0)
        assert time.monotonic() - start < 2.0  # not the 10 s ACSE timeout
        assert _metric(metrics, "psg_dicom_connections_closed_total", reason="peer_closed") == 1
        assert _metric(metrics, "psg_dicom_pending_connections") == 1
        assert _wait(lambda: _threads(receiver) == 1, 2.0)  # its association thread ended as well
        # something that is not DICOM: pynetdicom answers A-ABORT and the connection is released (at
        # once, or when the peer closes: whichever comes first; which one is a race, not a promise)
        http = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
        socks.append(http)
        http.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert http.recv(1) == b"\x07"  # an A-ABORT PDU
        http.close()
        assert _wait(lambda: receiver.pending_connections == 1, 2.0)
        assert _metric(metrics, "psg_dicom_connections_closed_total", reason="invalid_pdu") == 1
    finally:
        for s in socks:
            s.close()
    assert _wait(lambda: receiver.pending_connections == 0, 2.0)


def test_counts_for_health(make_receiver):
    receiver, _, metrics = make_receiver(_cfg(acse_timeout_seconds=10.0))
    assert (receiver.active_associations, receiver.pending_connections) == (0, 0)
    socks = _silent(receiver.port, 2)
    assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    try:
        assert assoc.is_established
        assert _wait(lambda: (receiver.active_associations, receiver.pending_connections) == (1, 2))
        assert _metric(metrics, "psg_dicom_active_associations") == 1
        assert _metric(metrics, "psg_dicom_pending_connections") == 2
    finally:
        assoc.release()
        for s in socks:
            s.close()
    assert _wait(lambda: (receiver.active_associations, receiver.pending_connections) == (0, 0))
    assert _metric(metrics, "psg_dicom_pending_connections") == 0
    assert _metric(metrics, "psg_dicom_connections_closed_total", reason="peer_closed") == 2


def test_stop_ends_pending_connections(make_receiver):
    receiver, _, _ = make_receiver(_cfg(acse_timeout_seconds=30.0))
    socks = _silent(receiver.port, 2)
    try:
        assert _wait(lambda: receiver.pending_connections == 2)
        server = receiver._server
        start = time.monotonic()
        receiver.stop(timeout=1.0)
        assert time.monotonic() - start < 5.0
        assert all(_closed_by_server(s, 2.0) for s in socks)
        assert _wait(lambda: not server.active_associations)
        assert receiver.pending_connections == 0
    finally:
        for s in socks:
            s.close()


def test_request_waiting_peeks_without_consuming():
    from gateway.sources.dicom.receiver import _request_waiting

    a, b = socket.socketpair()
    try:
        assert not _request_waiting(a)
        body = bytes(range(68))
        pdu = b"\x01\x00" + len(body).to_bytes(4, "big") + body
        b.sendall(pdu[:10])
        assert _wait(lambda: _request_waiting(a), 0.3) is False  # half a request
        b.sendall(pdu[10:])
        assert _wait(lambda: _request_waiting(a))
        assert a.recv(len(pdu), socket.MSG_WAITALL) == pdu  # nothing was consumed
        b.sendall(b"\x04\x00\x00\x00\x00\x00")  # a whole PDU, but not an A-ASSOCIATE-RQ
        assert _wait(lambda: _request_waiting(a), 0.3) is False
    finally:
        a.close()
        b.close()


# ---- failures -----------------------------------------------------------------------------------------------


def test_sink_failure_answers_out_of_resources(make_receiver, study, tmp_path):
    sink = MemorySink()
    sink.fail = True
    receiver, _, metrics = make_receiver(sink=sink)
    assert _send(receiver.port, study[:1]) == [STATUS_OUT_OF_RESOURCES]
    assert _spooled(tmp_path / "spool") == []
    assert _metric(metrics, "psg_dicom_instances_total", result="failed") == 1
    sink.fail = False
    assert _send(receiver.port, study[:1]) == [0]
    assert len(sink.instances) == 1 and len(_spooled(tmp_path / "spool")) == 1


def test_known_instance_failure_answers_out_of_resources(make_receiver, study, tmp_path):
    sink = MemorySink()
    receiver, _, _ = make_receiver(sink=sink)

    def broken(uid: str) -> bool:
        raise OSError("database unreachable")

    sink.known_instance = broken  # type: ignore[method-assign]
    assert _send(receiver.port, study[:1]) == [STATUS_OUT_OF_RESOURCES]
    assert _spooled(tmp_path / "spool") == []


def test_missing_study_uid_refused(make_receiver, tmp_path):
    receiver, sink, metrics = make_receiver()
    ds = make_waveform_dataset(SLEEP_EEG, [WaveformGroup(256, [WaveformChannel("C3-M2", np.zeros(512))])])
    del ds.StudyInstanceUID
    assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    assert assoc.is_established
    status = assoc.send_c_store(ds).Status
    assoc.release()
    assert status == STATUS_DATASET_MISMATCH
    assert sink.instances == {} and _spooled(tmp_path / "spool") == []
    assert _metric(metrics, "psg_dicom_instances_total", result="refused") == 1


# ---- TLS ----------------------------------------------------------------------------------------------------


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("certs")
    return {"server": _self_signed(folder, "server"), "client": _self_signed(folder, "client")}


def _client_ctx(server_cert: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return ctx


def test_tls(make_receiver, study, certs, tmp_path):
    cert, key = certs["server"]
    receiver, sink, _ = make_receiver(_cfg(tls=TlsConfig(enabled=True, cert_file=cert, key_file=key)))
    # plain TCP to the TLS port: no association, and the server is not stalled by it
    plain = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    assert not plain.is_established
    idle = socket.create_connection(("127.0.0.1", receiver.port))  # connects, never says anything
    try:
        assert _send(receiver.port, study, tls_args=(_client_ctx(cert), "localhost")) == [0, 0, 0]
    finally:
        idle.close()
    assert len(sink.instances) == 3

    # DCMTK over TLS (anonymous client, server certificate checked)
    storescu = dcmtk("storescu")
    result = subprocess.run([storescu, "-R", "+tla", "+cf", str(cert), "-aet", "MODALITY", "-aec", "PSGGATEWAY",
                             "127.0.0.1", str(receiver.port), *map(str, study)], check=False, env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_mutual_tls(make_receiver, study, certs):
    cert, key = certs["server"]
    client_cert, _ = certs["client"]
    receiver, sink, _ = make_receiver(_cfg(tls=TlsConfig(enabled=True, cert_file=cert, key_file=key,
                                                         ca_file=client_cert, require_client_cert=True)))
    anonymous = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY",
                                 tls_args=(_client_ctx(cert), "localhost"))
    assert not anonymous.is_established
    assert sink.instances == {}
    statuses = _send(receiver.port, study[:1], tls_args=(_client_ctx(cert, certs["client"]), "localhost"))
    assert statuses == [0] and len(sink.instances) == 1


# ---- stop ---------------------------------------------------------------------------------------------------


def test_stop_closes_port(make_receiver, study):
    receiver, _, _ = make_receiver()
    port = receiver.port
    assert _send(port, study[:1]) == [0]
    receiver.stop(timeout=1.0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_stop_aborts_lingering_association(make_receiver):
    receiver, _, metrics = make_receiver()
    assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    assert assoc.is_established
    assert _wait(lambda: receiver.active_associations == 1)
    start = time.monotonic()
    receiver.stop(timeout=0.5)
    assert time.monotonic() - start < 5
    assert _wait(lambda: not assoc.is_established)
    assert _wait(lambda: receiver.active_associations == 0)
    assert _metric(metrics, "psg_dicom_associations_total", result="aborted") == 1


# ---- fast paths on (the default) and off -----------------------------------------------------------------


def test_fast_paths_used_by_our_associations(make_receiver, study, monkeypatch):
    waits, fallbacks, syncs = [], [], []
    wait_dul = fastpaths._Waker.wait_dul
    monkeypatch.setattr(fastpaths._Waker, "wait_dul", lambda self, t: waits.append(1) or wait_dul(self, t))
    monkeypatch.setattr(fastpaths, "_ORIGINAL_SEND_MSG", lambda *a: fallbacks.append(a[1]))
    monkeypatch.setattr(fastpaths, "_WRITEBACK_STEP", 4096)
    fdatasync = fastpaths._fdatasync
    monkeypatch.setattr(fastpaths, "_fdatasync", lambda fd: syncs.append(fd) or fdatasync(fd))
    receiver, sink, _ = make_receiver(_cfg(fsync=True))
    result = _storescu(receiver.port, study)
    assert result.returncode == 0, result.stderr
    assert len(sink.instances) == 3
    assert waits and not fallbacks  # event-driven DUL; C-STORE responses encoded directly
    assert _wait(lambda: bool(syncs))  # early writeback ran (helper thread)
    for inst in sink.instances.values():
        src = pydicom.dcmread(next(f for f in study if pydicom.dcmread(f).SOPInstanceUID == inst.sop_instance_uid))
        ds = pydicom.dcmread(inst.path)
        assert ds.WaveformSequence[0].WaveformData == src.WaveformSequence[0].WaveformData
        assert ds.file_meta.MediaStorageSOPInstanceUID == inst.sop_instance_uid


def test_without_fast_paths_the_same_files(make_receiver, study, tmp_path, monkeypatch):
    """``dicom.fast_paths: false``: plain pynetdicom, and the spool gets the same files, privately, fsynced."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    installed: list[bool] = []
    install = fastpaths.install
    monkeypatch.setattr(fastpaths, "install", lambda *a, **k: installed.append(install(*a, **k)) or installed[-1])
    waits: list[int] = []
    wait_dul = fastpaths._Waker.wait_dul
    monkeypatch.setattr(fastpaths._Waker, "wait_dul", lambda self, t: waits.append(1) or wait_dul(self, t))
    fsyncs: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(receiver_module.os, "fsync", lambda fd: fsyncs.append(fd) or fsync(fd))

    spooled: dict[bool, dict[str, tuple[bytes, int]]] = {}
    synced: dict[bool, int] = {}
    for fast in (True, False):
        installed.clear()
        waits.clear()
        fsyncs.clear()
        spool = tmp_path / f"spool-{'fast' if fast else 'plain'}"
        receiver, sink, metrics = make_receiver(_cfg(fast_paths=fast, fsync=True), spool=spool)
        result = _storescu(receiver.port, study)
        assert result.returncode == 0, result.stderr
        assert _send(receiver.port, study[:1]) == [0]  # a duplicate, from pynetdicom
        assert _metric(metrics, "psg_dicom_instances_total", result="stored") == 3
        assert _metric(metrics, "psg_dicom_instances_total", result="duplicate") == 1
        assert (installed and all(installed) and waits) if fast else (not installed and not waits)
        for inst in sink.instances.values():
            assert inst.path == spool_path_for(spool, inst.study_uid, inst.sop_instance_uid)
        spooled[fast] = {str(p.relative_to(spool)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
                         for p in _spooled(spool)}
        synced[fast] = len(fsyncs)
        assert list((spool / "dicom" / ".incoming").iterdir()) == []
    assert len(spooled[False]) == 3
    assert spooled[False] == spooled[True]  # same names, same bytes, same modes
    assert {mode for _, mode in spooled[False].values()} == {0o600}
    assert synced[False] == synced[True] >= 6  # each file and its folder, with or without the fast paths
    assert list(system_tmp.iterdir()) == []


def test_unsupported_pynetdicom_falls_back(make_receiver, study, monkeypatch):
    monkeypatch.setattr(fastpaths, "ACTIVE", False)
    waits: list[int] = []
    wait_dul = fastpaths._Waker.wait_dul
    monkeypatch.setattr(fastpaths._Waker, "wait_dul", lambda self, t: waits.append(1) or wait_dul(self, t))
    receiver, sink, _ = make_receiver(_cfg(fast_paths=True))
    assert _send(receiver.port, study) == [0, 0, 0]
    assert len(sink.instances) == 3 and not waits


# ---- the Source protocol ------------------------------------------------------------------------------------


def test_source_poll_promotes_and_health_reports(make_receiver, study, tmp_path):
    idle = DicomReceiver(_cfg(), tmp_path / "idle", MemorySink())
    assert isinstance(idle, Source) and idle.name == "dicom"
    assert idle.health() == {"port": None, "active_associations": 0, "pending_connections": 0}

    receiver, sink, _ = make_receiver(_cfg(stable_age_seconds=42.0, acse_timeout_seconds=10.0))
    assert isinstance(receiver, Source)
    assert receiver.poll() == 0 and sink.stable_ages == [42.0]
    assert _send(receiver.port, study) == [0, 0, 0]
    assert receiver.poll() == 1  # the study's three instances: one study promoted
    assert receiver.poll() == 0 and sink.stable_ages == [42.0] * 3

    assert receiver.health() == {"port": receiver.port, "active_associations": 0, "pending_connections": 0}
    silent = _silent(receiver.port, 1)
    assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="PSGGATEWAY")
    try:
        assert assoc.is_established
        assert _wait(lambda: receiver.health() == {"port": receiver.port, "active_associations": 1,
                                                   "pending_connections": 1})
    finally:
        assoc.release()
        for s in silent:
            s.close()
    receiver.stop(timeout=1.0)
    assert receiver.health()["port"] is None
