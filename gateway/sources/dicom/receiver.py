"""The DICOM source: a Storage SCP (C-STORE and C-ECHO receiver) that spools instances without decoding them.

:class:`DicomReceiver` runs a pynetdicom association server in background threads. Each received
instance goes through:

1. pynetdicom's *chunked receive* (``_config.STORE_RECV_CHUNKED_DATASET``): the encoded data set is
   streamed, PDV by PDV, into a Part-10 file (preamble, file meta with the negotiated transfer
   syntax, data set as sent) in ``<spool_dir>/dicom/.incoming/``. Nothing is held in memory and
   nothing is decoded; the maximum PDU size is unlimited.
2. The handler asks ``intake.known_instance(sop_instance_uid)``: a duplicate is answered Success
   (0x0000) and not written again.
3. Only the header up to (0020,000E) is parsed (``read_partial`` with a stop condition) to get the
   Study and Series Instance UIDs. Without a Study Instance UID the instance is refused with 0xA900
   ("data set does not match SOP class": the attribute is Type 1 in every storage IOD) and kept
   nowhere; the sender should not retry.
4. The file is fsynced (``cfg.fsync``), renamed atomically to
   ``<spool_dir>/dicom/<sha256(study_uid)[:24]>/<sha256(sop_instance_uid)[:24]>.dcm`` and the folder
   is fsynced. The incoming folder is inside the spool, so this is a rename on one filesystem (when it
   is not, a copy to a hidden temporary name in the target folder, fsync, rename).
5. ``intake.instance_received(...)`` records it. Any exception there, or any disk error before, removes
   the file and answers 0xA700 (out of resources) so the sender retries later; the receiver goes on.

Two associations sending the same SOP Instance UID at once are serialised: the second waits for the
first and then sees a duplicate.

Accepted SOP classes
    Every waveform storage class a PSG can arrive as (:data:`WAVEFORM_STORAGE_SOP_CLASSES`, several of
    which pynetdicom's default ``StoragePresentationContexts`` lacks), plus every other storage SOP
    class pynetdicom knows (``AllStoragePresentationContexts``): a sender that forwards a whole study
    (say with a PDF report or a video) should not see failures and retry for ever; the readers skip
    non-waveform objects. All with Implicit VR LE, Explicit VR LE, Explicit VR BE and Deflated
    Explicit VR LE. Verification (C-ECHO) is answered Success.

Association security (A-ASSOCIATE-RJ, permanent, service user)
    The called AE title must equal ``cfg.ae_title`` when ``cfg.require_called_ae`` (diagnostic 7); with
    a non-empty ``cfg.allowed_callers`` the calling AE title must be listed and, where the entry has a
    ``host``, the peer's address must be one of that host's addresses (diagnostic 3).
    At most ``cfg.max_associations`` associations at once (A-ASSOCIATE-RJ transient, local limit exceeded),
    counted by the receiver itself (see below): only callers that passed these checks hold one.
    ``cfg.tls`` wraps every connection in TLS (1.2 or later); ``require_client_cert`` with ``ca_file``
    makes it mutual. The TLS handshake runs in the association's thread, not in the accept loop, so a
    client that never completes it blocks nobody but itself (and is closed at the ACSE timeout, below).

Connections before their A-ASSOCIATE-RQ (nobody can starve the port)
    pynetdicom starts an association thread for every TCP connection and counts every live one against its
    ``maximum_associations``, from the accept on: connections that never send an A-ASSOCIATE-RQ held every
    slot for the ACSE timeout (and after their peer had closed them), while an allowed modality was
    rejected. So pynetdicom's own limit is switched off and:

    - *slots*: ``cfg.max_associations`` is checked in ``EVT_REQUESTED``, after the called/calling AE checks,
      and counts only associations that got that far (released when their connection closes): a connection
      holds a slot from its accepted A-ASSOCIATE-RQ until it closes, a silent one or a refused caller never.
    - *pending*: a connection is pending from its accept until its A-ASSOCIATE-RQ reaches the association
      thread. ``cfg.acse_timeout_seconds`` after the accept, a pending connection is shut down by the
      receiver's reaper thread (whatever pynetdicom is blocked in: a half-sent PDU or a TLS handshake), and a
      pending connection its peer closed is released at once (its association thread, which would wait for
      the request until the ACSE timeout, is woken and ends).
    - *per host*: a host with ``cfg.max_pending_per_host`` pending connections has the next one closed in
      the accept loop (no thread), unless some of its pending ones already have a complete A-ASSOCIATE-RQ
      waiting unread (plain TCP): a sender opening several associations at once is not refused.

    So an allowed caller is turned away only while ``cfg.max_associations`` allowed callers are associated,
    or while its own host keeps ``cfg.max_pending_per_host`` connections silent; other hosts cannot do it.
    Silent connections still cost two threads each (pynetdicom's), for at most the ACSE timeout.
    Counted in :attr:`DicomReceiver.pending_connections`, ``psg_dicom_pending_connections`` and
    ``psg_dicom_connections_closed_total{reason}`` (acse_timeout, per_host_cap, peer_closed, invalid_pdu,
    shutdown).

Process-wide settings
    pynetdicom's chunked receive is a module-level switch: :meth:`DicomReceiver.start` turns it on for
    the whole process and points pynetdicom's temporary files for associations of a gateway receiver
    at that receiver's incoming folder (other pynetdicom users in the process keep the system temporary
    folder). ``_config.LOG_HANDLER_LEVEL`` is set to ``"none"`` (pynetdicom's standard handlers format
    every PDU and message, UIDs included, at any log level) and the ``pynetdicom`` logger to WARNING
    (its debug output can show patient data). These are needed for correctness and privacy and are on
    whatever ``cfg.fast_paths`` says.

Fast paths (``cfg.fast_paths``, on by default)
    For speed, the associations of this receiver run replacements of some pynetdicom 3.0 internals
    (event-driven reactors instead of 1 ms polling, copy-free PDU reads, C-STORE responses and file meta
    encoded directly, early writeback of large files with ``cfg.fsync``): see :mod:`.fastpaths`, which says
    what each replaces, which pynetdicom versions they are pinned to, and that any other version runs
    pynetdicom's own code. With ``dicom.fast_paths: false`` the receiver runs plain pynetdicom (to compare in
    production): the same spooled files (bytes, names, modes, fsyncs), answers and limits, only slower.

Logs carry calling AE titles, peer addresses and ``study_key`` (a short hash of the Study Instance UID),
never patient names or IDs.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import ipaddress
import logging
import os
import queue
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom.filereader import data_element_generator, read_partial
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from ...config import DicomConfig, TlsConfig
from ...fsutil import fsync_dir
from ...logging import get_logger
from ...metrics import Metrics
from ..base import Intake
from . import fastpaths

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "TRANSFER_SYNTAXES",
    "WAVEFORM_STORAGE_SOP_CLASSES",
    "DicomReceiver",
    "ReceivedInstance",
    "spool_path_for",
]

log = get_logger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # disk or database trouble: the sender retries later
STATUS_DATASET_MISMATCH = 0xA900  # no Study Instance UID: a broken object, retrying will not help
STATUS_CANNOT_UNDERSTAND = 0xC000  # the header cannot be parsed at all

DICOM_DIR = "dicom"
INCOMING_DIR = ".incoming"
_KEY_LEN = 24
_COPY_CHUNK = 4 * 1024 * 1024

WAVEFORM_STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.4": "General 32-bit ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.2.1": "Hemodynamic Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.3.1": "Basic Cardiac Electrophysiology Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.5.1": "Arterial Pulse Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.6.1": "Respiratory Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.6.2": "Multi-channel Respiratory Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.7.1": "Routine Scalp Electroencephalogram Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.7.2": "Electromyogram Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.7.3": "Electrooculogram Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.7.4": "Sleep Electroencephalogram Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.8.1": "Body Position Waveform Storage",
}

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)

_STUDY_UID = Tag(0x0020, 0x000D)
_SERIES_UID = Tag(0x0020, 0x000E)


@dataclass(frozen=True)
class ReceivedInstance:
    study_uid: str
    series_uid: str | None
    sop_instance_uid: str
    sop_class_uid: str
    path: Path  # the final spool file, already fsynced (when cfg.fsync)
    size: int  # bytes on disk
    calling_ae: str
    peer_host: str


def _key(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:_KEY_LEN]


def spool_path_for(spool_dir: Path, study_uid: str, sop_instance_uid: str) -> Path:
    """``<spool_dir>/dicom/<sha256(study_uid)[:24]>/<sha256(sop_instance_uid)[:24]>.dcm``."""
    return Path(spool_dir) / DICOM_DIR / _key(study_uid) / f"{_key(sop_instance_uid)}.dcm"


def _clean_uid(value: Any) -> str:
    return str(value or "").strip(" \x00")


# ---- pynetdicom's temporary files in the receiver's own spool ---------------------------------------------
# pynetdicom creates the chunked-receive file with ``NamedTemporaryFile(delete=False, mode="wb",
# suffix=".dcm")`` in the DUL thread of the association; we give it a ``dir`` when that association
# belongs to one of our AEs, so the final step is a rename on one filesystem and received data never sits in
# the system temporary folder. ``mkstemp`` creates it 0600 whatever the umask: the spooled file keeps that
# mode. Needed for correctness, so installed with or without the fast paths.

_INCOMING_DIRS: weakref.WeakKeyDictionary[AE, Path] = weakref.WeakKeyDictionary()
_PATCH_LOCK = threading.Lock()
_ORIGINAL_NTF = tempfile.NamedTemporaryFile


def _incoming_dir_of_current_thread() -> Path | None:
    assoc = getattr(threading.current_thread(), "assoc", None)  # the DUL thread has .assoc
    ae = getattr(assoc, "ae", None)
    if ae is None:
        return None
    try:
        return _INCOMING_DIRS.get(ae)
    except TypeError:
        return None


def _spool_named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    if "dir" not in kwargs:
        folder = _incoming_dir_of_current_thread()
        if folder is not None:
            kwargs["dir"] = folder
            kwargs.setdefault("prefix", "rx-")
    return _ORIGINAL_NTF(*args, **kwargs)


def _install_pynetdicom_settings() -> None:
    with _PATCH_LOCK:
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom's "standard" handlers format every PDU and DIMSE message for its logs (UIDs, and
        # identifiers with LOG_REQUEST_IDENTIFIERS) whatever the log level: costly, and nothing we want.
        _config.LOG_HANDLER_LEVEL = "none"
        if getattr(dimse_messages, "NamedTemporaryFile", None) is not _spool_named_temporary_file:
            dimse_messages.NamedTemporaryFile = _spool_named_temporary_file  # type: ignore[attr-defined]
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class _LazyHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do the TLS handshake on first use (in the association's thread).

    pynetdicom wraps accepted sockets in its accept loop; with the default handshake-on-wrap, one client
    that connects and sends nothing would stall every other connection. ``handshake_timeout`` bounds
    reads and writes of each connection.
    """

    handshake_timeout: float | None = None

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        kwargs["do_handshake_on_connect"] = False
        if self.handshake_timeout is not None:
            sock.settimeout(self.handshake_timeout)
        return super().wrap_socket(sock, *args, **kwargs)


def build_server_ssl_context(tls: TlsConfig, timeout: float | None = None) -> ssl.SSLContext:
    """The server-side TLS context of ``tls`` (TLS 1.2+; client certificates required for mutual TLS)."""
    ctx = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.handshake_timeout = timeout
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("dicom.tls: cert_file and key_file are required")
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _resolve(host: str) -> frozenset[str]:
    """The addresses of ``host`` (an IP literal or a name), as normalised strings."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        log.warning("dicom.caller_host_unresolved", host=host)
        return frozenset()
    return frozenset(str(ipaddress.ip_address(info[4][0])) for info in infos)


def _normalise_peer(host: str) -> str:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def _wake_unassociated(assoc: Any) -> None:
    """End an acceptor thread still waiting for its A-ASSOCIATE-RQ (it would wait the whole ACSE timeout).

    Its reactor takes a ``None`` from the DUL's queue as "timed out": it stops the DUL and closes the socket.
    """
    if assoc.is_established or assoc.is_rejected or assoc.is_aborted or assoc.is_released:
        return
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if queue is not None and queue.empty() and not getattr(queue, "requested", False):
        queue.put(None)


def _context_syntax(event: Any) -> str | None:
    try:
        return str(event.context.transfer_syntax)
    except Exception:  # noqa: BLE001
        return None


def _after_series_uid(tag: Any, vr: Any, length: int) -> bool:
    return tag > _SERIES_UID


_META_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
_PLAIN_SYNTAXES = {ImplicitVRLittleEndian: (True, True), ExplicitVRLittleEndian: (False, True),
                   ExplicitVRBigEndian: (False, False)}


def _scan_uids(fh: Any, transfer_syntax: str | None) -> tuple[Any, Any] | None:
    """Raw (0020,000D) and (0020,000E) values from a Part-10 file as pynetdicom writes it, or None.

    Skips the file meta by its group length and walks the data set's raw elements (no conversion, no
    Dataset) until the first tag after (0020,000E). None (use the generic reader) for a deflated or
    unknown transfer syntax or a file meta without a group length.
    """
    encoding = _PLAIN_SYNTAXES.get(str(transfer_syntax)) if transfer_syntax else None
    if encoding is None:
        return None
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != _META_GROUP_LENGTH:
        return None
    fh.seek(144 + int.from_bytes(head[140:144], "little"))
    study = series = ""
    for elem in data_element_generator(fh, encoding[0], encoding[1], stop_when=_after_series_uid,
                                       defer_size=4096):
        if elem.tag == _STUDY_UID:
            study = elem.value
        elif elem.tag == _SERIES_UID:
            series = elem.value
    return study, series


# ---- connections before their A-ASSOCIATE-RQ ---------------------------------------------------------------

# pynetdicom counts every live association thread against AE.maximum_associations, silent connections included;
# the receiver counts its own slots instead (``DicomReceiver._on_requested``), so pynetdicom's check never fires.
_NO_PYNETDICOM_LIMIT = 1 << 30
_HANGUP_GRACE = 5.0  # s: a pending entry still there this long after its hang-up is dropped (never seen stuck)
# bytes: a larger A-ASSOCIATE-RQ (rare: 128 presentation contexts take ~20 KiB) is not looked for in the receive
# buffer, so that a host at its cap cannot make the accept loop copy much
_MAX_PEEK = 64 * 1024
_CLOSED_LOG_EVERY = 60.0  # s: one log line per (reason, host) at most, with the number left out
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_UINT4_BE = struct.Struct(">L")


class _UserQueue(queue.Queue):  # type: ignore[type-arg]
    """``dul.to_user_queue`` of this receiver's associations: notes when the A-ASSOCIATE-RQ is handed to the
    association thread (calling ``on_request``: the connection is no longer pending), and wakes that thread
    when the connection ends before any request (:meth:`wake_unrequested`).

    Only the DUL thread puts requests here, and it also runs ``EVT_CONN_CLOSE``: called from there,
    :meth:`wake_unrequested` cannot race with a request being delivered. Installed with or without the fast
    paths (which wrap its ``put`` to wake their reactor).
    """

    def __init__(self) -> None:
        super().__init__()
        self.requested = False
        self.on_request: Callable[[], None] | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if not self.requested and isinstance(item, A_ASSOCIATE):
            self.requested = True
            if self.on_request is not None:
                self.on_request()
        super().put(item, block, timeout)

    def wake_unrequested(self) -> bool:
        """End the association thread's wait for the request (pynetdicom takes ``None`` as its ACSE timeout:
        it stops the DUL and closes the socket). Nothing once a request was delivered. True when woken."""
        if self.requested:
            return False
        self.put(None)  # self.put, not super().put: the fast paths' wrapper wakes their reactor
        return True


@dataclass(eq=False)
class _Pending:
    """A connection that has not yet handed an A-ASSOCIATE-RQ to its association thread."""

    sock: Any  # the accepted socket (an SSLSocket with TLS), as the accept loop got it
    host: str
    deadline: float  # time.monotonic() by which the request must have arrived
    hung_up_at: float | None = None  # set by the reaper when it shut the socket down


def _request_waiting(sock: Any) -> bool:
    """True when a whole A-ASSOCIATE-RQ PDU waits unread in ``sock``'s receive buffer (plain TCP only).

    Such a connection has spoken DICOM; pynetdicom just has not read it yet. Never blocks (the caller is the
    accept loop): TLS sockets, sockets with a timeout and platforms without ``MSG_DONTWAIT`` answer False.
    """
    if (isinstance(sock, ssl.SSLSocket) or not getattr(socket, "MSG_DONTWAIT", 0)
            or sock.gettimeout() is not None):
        return False
    try:
        head = sock.recv(6, _PEEK_FLAGS)
        if len(head) < 6 or head[0] != 0x01:
            return False
        length = _UINT4_BE.unpack_from(head, 2)[0]
        return length <= _MAX_PEEK and len(sock.recv(6 + length, _PEEK_FLAGS)) == 6 + length
    except (OSError, ValueError):
        return False


def _hang_up(sock: Any) -> None:
    """Shut ``sock`` down in both directions, whatever thread is blocked on it (its recv returns b"").

    The plain socket's ``shutdown`` also for an SSLSocket, whose own would drop its TLS state under a reader.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError, TypeError):
        pass


class _GatewayServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the receiver's gate in its accept loop.

    ``verify_request`` runs in the accept loop before any thread exists: a connection refused there (the
    per-host cap) costs nothing but the accept. ``shutdown_request`` (every socket the server closes: refused,
    failed to start, or at the end of an association thread) forgets a pending connection.
    """

    gate: DicomReceiver | None = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        gate = self.gate
        return True if gate is None else gate._admit(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        gate = self.gate
        if gate is not None:
            gate._forget(request)
        super().shutdown_request(request)


class _Refused(Exception):
    """An instance refused for its content (status in ``status``)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class DicomReceiver:
    """A Storage SCP writing received instances into ``<spool_dir>/dicom`` and handing them to ``intake``.

    A :class:`~gateway.sources.base.Source`: :meth:`start`, :meth:`poll` (promotes the studies that became
    stable), :meth:`stop`, :meth:`health`.
    """

    name = "dicom"

    def __init__(self, cfg: DicomConfig, spool_dir: Path, intake: Intake,
                 metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.spool_dir = Path(spool_dir)
        self.intake = intake
        self.metrics = metrics
        self._root = self.spool_dir / DICOM_DIR
        self._incoming = self._root / INCOMING_DIR
        self._ae: AE | None = None
        self._server: Any = None
        self._lock = threading.Lock()
        self._active: set[int] = set()  # id() of established associations
        self._aborted: set[int] = set()
        self._slots: dict[int, Any] = {}  # id() -> association, from its accepted A-ASSOCIATE-RQ to its close
        self._pending: dict[Any, _Pending] = {}  # accepted socket -> connection still without a request
        self._pending_by_host: dict[str, set[_Pending]] = {}
        self._closed_logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._stopping = False
        self._reaper: threading.Thread | None = None
        self._reaper_wake = threading.Event()
        self._inflight: dict[str, threading.Event] = {}  # SOP Instance UID -> done
        self._callers: dict[str, list[frozenset[str] | None]] = {}

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen (non-blocking); associations are served in background threads."""
        if self._server is not None:
            raise RuntimeError("DicomReceiver already started")
        cfg = self.cfg
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._clean_incoming()
        _install_pynetdicom_settings()
        self._callers = {}
        for caller in cfg.allowed_callers:
            hosts = _resolve(caller.host) if caller.host else None
            self._callers.setdefault(caller.ae_title, []).append(hosts)

        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = 0  # unlimited: the sender picks its PDU size
        ae.maximum_associations = _NO_PYNETDICOM_LIMIT  # cfg.max_associations: counted in _on_requested
        ae.network_timeout = cfg.network_timeout_seconds
        # pynetdicom's wait for the A-ASSOCIATE-RQ and its ARTIM timer; the reaper enforces the same deadline
        # from the accept on, also on a connection blocked in a half-sent PDU or a TLS handshake.
        ae.acse_timeout = cfg.acse_timeout_seconds
        ae.dimse_timeout = cfg.network_timeout_seconds
        ae.require_called_aet = False  # checked in _on_requested, with logs and metrics
        ae.require_calling_aet = []
        for uid in WAVEFORM_STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax not in WAVEFORM_STORAGE_SOP_CLASSES:
                ae.add_supported_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                                ExplicitVRBigEndian])
        ssl_context = (build_server_ssl_context(cfg.tls, cfg.network_timeout_seconds)
                       if cfg.tls.enabled else None)
        _INCOMING_DIRS[ae] = self._incoming
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected_by_pynetdicom),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # AE.start_server(block=False) with our server class: the gate is in place before the first accept.
        server = ae.make_server((cfg.host, cfg.port), ssl_context=ssl_context, evt_handlers=handlers,
                                server_class=_GatewayServer)
        server.gate = self
        self._stopping = False
        self._reaper_wake.clear()
        self._reaper = threading.Thread(target=self._reap, name="dicom-reaper", daemon=True)
        self._reaper.start()
        threading.Thread(target=make_target(server.serve_forever), name="dicom-accept", daemon=True).start()
        ae._servers.append(server)  # server.shutdown() removes it, as for AE.start_server
        self._server = server
        self._ae = ae
        log.info("dicom.listening", ae_title=cfg.ae_title, host=cfg.host, port=self.port,
                 tls=cfg.tls.enabled, mutual_tls=cfg.tls.enabled and cfg.tls.require_client_cert,
                 allowed_callers=len(cfg.allowed_callers), max_associations=cfg.max_associations,
                 acse_timeout=cfg.acse_timeout_seconds, max_pending_per_host=cfg.max_pending_per_host,
                 fast_paths=cfg.fast_paths and fastpaths.ACTIVE)
        if cfg.fast_paths and not fastpaths.ACTIVE:
            # pynetdicom's own code runs (slower, same results): the fast paths are pinned to other versions
            log.warning("dicom.fast_paths_unsupported", pynetdicom=pynetdicom.__version__,
                     supported=",".join(fastpaths.SUPPORTED_PYNETDICOM))

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("DicomReceiver not started")
        return int(self._server.server_address[1])

    def poll(self) -> int:
        """Mark ready the studies that received nothing for ``cfg.stable_age_seconds``; how many."""
        return self.intake.promote_stable(self.cfg.stable_age_seconds)

    def health(self) -> dict[str, Any]:
        """For ``/healthz``: the listening port (None when not listening) and the connection counts."""
        server = self._server
        return {"port": int(server.server_address[1]) if server is not None else None,
                "active_associations": self.active_associations,
                "pending_connections": self.pending_connections}

    @property
    def active_associations(self) -> int:
        """Established associations."""
        with self._lock:
            return len(self._active)

    @property
    def pending_connections(self) -> int:
        """Connections that have not yet sent an A-ASSOCIATE-RQ (they hold no association slot)."""
        with self._lock:
            return len(self._pending)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting; let open associations finish for up to ``timeout`` s, then abort them."""
        server, ae = self._server, self._ae
        if server is None:
            return
        with self._lock:
            self._stopping = True  # the gate refuses what the accept loop may still take
            pending = list(self._pending.values())
        server.shutdown()  # closes the listening socket
        for entry in pending:  # their association threads end at once (see _on_conn_close)
            _hang_up(entry.sock)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            associations = list(server.active_associations)
            for assoc in associations:
                if not assoc.is_established:
                    _wake_unassociated(assoc)
            if not any(a.is_established for a in associations) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        remaining = [a for a in server.active_associations if a.is_established]
        for assoc in remaining:
            log.warning("dicom.association.aborting", calling_ae=self._calling_ae(assoc),
                        peer_host=self._peer_host(assoc), reason="shutdown")
            # Counted here, not by the aborted event: for an abort of our own, the connection can close
            # (and leave _active) before that event runs, and the abort would go uncounted.
            with self._lock:
                first = id(assoc) not in self._aborted
                self._aborted.add(id(assoc))
            if first:
                self._count("dicom_associations", "aborted")
            assoc.abort()
        join_until = time.monotonic() + 5.0
        for assoc in list(server.active_associations):
            if not assoc.is_established:
                _wake_unassociated(assoc)
            assoc.join(timeout=max(0.0, join_until - time.monotonic()))
        self._server = None
        self._reaper_wake.set()
        if self._reaper is not None:
            self._reaper.join(timeout=2.0)
            self._reaper = None
        if ae is not None:
            _INCOMING_DIRS.pop(ae, None)
        log.info("dicom.stopped", aborted=len(remaining))

    def _clean_incoming(self) -> None:
        """Leftovers of a crash or of an interrupted transfer (pynetdicom keeps them on an abort)."""
        for folder in (self._incoming, *self._root.glob("*/")):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.is_file() and (folder == self._incoming or entry.name.endswith(".part")):
                    try:
                        entry.unlink()
                    except OSError:
                        pass

    # ---- connections before their A-ASSOCIATE-RQ ------------------------------------------------------------

    def _admit(self, sock: Any, client_address: Any) -> bool:
        """The accept loop's gate (``verify_request``): False closes the connection at once, before any thread.

        A host's connections without a request are capped; those of them that already have a whole
        A-ASSOCIATE-RQ waiting unread do not count (a sender opening several associations at once).
        """
        host = _normalise_peer(str(client_address[0]))
        cap = self.cfg.max_pending_per_host
        with self._lock:
            if self._stopping:
                return False
            mine = self._pending_by_host.setdefault(host, set())
            refused = len(mine) >= cap and sum(1 for e in mine if not _request_waiting(e.sock)) >= cap
            if not refused:
                entry = _Pending(sock=sock, host=host, deadline=time.monotonic() + self.cfg.acse_timeout_seconds)
                self._pending[sock] = entry
                mine.add(entry)
                if len(self._pending) == 1:
                    self._reaper_wake.set()
                self._set_pending_gauge()
            elif not mine:
                del self._pending_by_host[host]
        if refused:
            self._closed("per_host_cap", host)
        return not refused

    def _set_pending_gauge(self) -> None:  # under self._lock
        if self.metrics is not None:
            self.metrics.dicom_pending_connections.set(len(self._pending))

    def _release(self, entry: _Pending, reason: str | None) -> bool:
        """Forget a pending connection (its request arrived: ``reason`` None; or it was closed). Idempotent."""
        with self._lock:
            if self._pending.get(entry.sock) is not entry:
                return False
            del self._pending[entry.sock]
            mine = self._pending_by_host.get(entry.host)
            if mine is not None:
                mine.discard(entry)
                if not mine:
                    del self._pending_by_host[entry.host]
            self._set_pending_gauge()
        if reason is not None:
            self._closed(reason, entry.host)
        return True

    def _close_reason(self, entry: _Pending, state: str | None = None) -> str:
        if self._stopping:
            return "shutdown"
        if entry.hung_up_at is not None or time.monotonic() >= entry.deadline:
            return "acse_timeout"  # the reaper's hang-up, or pynetdicom's ARTIM (which starts after the accept)
        if state == "Sta13":
            return "invalid_pdu"  # something other than an A-ASSOCIATE-RQ: pynetdicom answered A-ABORT
        return "peer_closed"  # closed by the peer, or its TLS handshake failed

    def _forget(self, sock: Any) -> None:
        """The server closes ``sock``: a connection still pending here ended without ``EVT_CONN_CLOSE``."""
        with self._lock:
            entry = self._pending.get(sock)
        if entry is not None:
            self._release(entry, self._close_reason(entry))

    def _closed(self, reason: str, host: str) -> None:
        """Count a connection closed before its request; log it, at most once a minute per reason and host."""
        if self.metrics is not None:
            self.metrics.dicom_connections_closed.labels(reason=reason).inc()
        now = time.monotonic()
        key = (reason, host)
        with self._lock:
            last, left_out = self._closed_logged.get(key, (None, 0))
            if last is not None and now - last < _CLOSED_LOG_EVERY:
                self._closed_logged[key] = (last, left_out + 1)
                return
            if len(self._closed_logged) >= 1024:  # many hosts: start over rather than grow
                self._closed_logged.clear()
            self._closed_logged[key] = (now, 0)
        # peer_closed is what TCP health checks and port scans look like: not worth a warning
        emit = log.debug if reason in ("peer_closed", "shutdown") else log.warning
        emit("dicom.connection.closed", reason=reason, peer_host=host, left_out=left_out)

    def _reap(self) -> None:
        """The ACSE timeout, from the accept on: shut down connections still pending at their deadline.

        pynetdicom's own timers cannot do it for a connection whose DUL thread is blocked in a read (a
        half-sent PDU, a TLS handshake) or whose thread has not started; the hang-up makes any such read
        return, and pynetdicom then closes the connection (``EVT_CONN_CLOSE`` releases it).
        """
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                due, stuck, waits = [], [], []
                for entry in self._pending.values():
                    if entry.hung_up_at is None:
                        if entry.deadline <= now:
                            entry.hung_up_at = now
                            due.append(entry)
                        else:
                            waits.append(entry.deadline)
                    elif now - entry.hung_up_at >= _HANGUP_GRACE:
                        stuck.append(entry)
                    else:
                        waits.append(entry.hung_up_at + _HANGUP_GRACE)
                self._reaper_wake.clear()
            for entry in due:
                _hang_up(entry.sock)
            for entry in stuck:  # a safety net: never let a lost entry count against its host for ever
                self._release(entry, "acse_timeout")
            self._reaper_wake.wait(max(0.0, min(waits) - time.monotonic()) if waits else None)

    # ---- association events ----------------------------------------------------------------------------

    @staticmethod
    def _calling_ae(assoc: Any) -> str:
        try:
            return str(assoc.requestor.ae_title).strip()
        except Exception:  # noqa: BLE001 - only for logs
            return ""

    @staticmethod
    def _peer_host(assoc: Any) -> str:
        try:
            return str(assoc.requestor.address)
        except Exception:  # noqa: BLE001
            return ""

    def _on_conn_open(self, event: evt.Event) -> None:
        assoc = event.assoc
        # Before the association's threads start: its request queue tells when the A-ASSOCIATE-RQ arrives.
        dul = assoc.dul
        user_queue = dul.to_user_queue = _UserQueue()
        with self._lock:
            entry = self._pending.get(getattr(dul.socket, "socket", None))
        assoc._psg_pending = entry
        if entry is not None:
            user_queue.on_request = functools.partial(self._release, entry, None)
        if self.cfg.fast_paths:  # after the queue above: the fast paths wrap the queues they find
            try:
                fastpaths.install(assoc, early_writeback=self.cfg.fsync)
            except Exception as exc:  # noqa: BLE001 - pynetdicom's own code still works
                log.warning("dicom.fast_paths_failed", error=type(exc).__name__)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = _clean_uid(getattr(rq, "calling_ae_title", ""))
        called = _clean_uid(getattr(rq, "called_ae_title", ""))
        peer = self._peer_host(assoc)
        reason, diagnostic = None, 0
        if self.cfg.require_called_ae and called != self.cfg.ae_title:
            reason, diagnostic = "called_ae", 0x07
        elif self._callers:
            entries = self._callers.get(calling)
            if entries is None:
                reason, diagnostic = "calling_ae", 0x03
            elif not any(hosts is None or _normalise_peer(peer) in hosts for hosts in entries):
                reason, diagnostic = "caller_host", 0x03
        entry = getattr(assoc, "_psg_pending", None)
        if entry is not None:  # normally released already, when the DUL handed the request on
            self._release(entry, None)
        if reason is None:
            # The slot check (pynetdicom's own is off): only callers allowed in count, and only from their
            # request on; a slot is freed when the connection closes (EVT_CONN_CLOSE), or found dead here.
            with self._lock:
                for key in [k for k, a in self._slots.items() if not a.is_alive()]:
                    del self._slots[key]
                if len(self._slots) >= self.cfg.max_associations:
                    reason = "max_associations"
                else:
                    self._slots[id(assoc)] = assoc
        if reason is None:
            return
        self._count("dicom_associations", "rejected")
        log.warning("dicom.association.rejected", reason=reason, calling_ae=calling, called_ae=called,
                    peer_host=peer)
        if reason == "max_associations":  # as pynetdicom: transient, service provider (presentation), local limit
            assoc.acse.send_reject(0x02, 0x03, 0x02)
        else:
            assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_rejected_by_pynetdicom(self, event: evt.Event) -> None:
        # Only pynetdicom's own rejections get here (ours do not trigger the event); its association limit is
        # off (see _on_requested), so this is for anything else pynetdicom may refuse.
        self._count("dicom_associations", "rejected")
        log.warning("dicom.association.rejected", reason="pynetdicom",
                    calling_ae=self._calling_ae(event.assoc), peer_host=self._peer_host(event.assoc))

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self._active.add(id(event.assoc))
        self._count("dicom_associations", "accepted")
        if self.metrics is not None:
            self.metrics.dicom_active_associations.inc()
        log.info("dicom.association.accepted", calling_ae=self._calling_ae(event.assoc),
                 peer_host=self._peer_host(event.assoc))

    def _on_aborted(self, event: evt.Event) -> None:
        key = id(event.assoc)
        with self._lock:
            counted = key in self._active and key not in self._aborted
            if counted:
                self._aborted.add(key)
        if counted:
            self._count("dicom_associations", "aborted")
            log.warning("dicom.association.aborted", calling_ae=self._calling_ae(event.assoc),
                        peer_host=self._peer_host(event.assoc))

    def _on_conn_close(self, event: evt.Event) -> None:
        # Runs in the DUL thread, inside the state machine's action (its state is still the one it closed in).
        assoc = event.assoc
        key = id(assoc)
        with self._lock:
            was_active = key in self._active
            self._active.discard(key)
            self._aborted.discard(key)
            self._slots.pop(key, None)
        if was_active and self.metrics is not None:
            self.metrics.dicom_active_associations.dec()
        entry = getattr(assoc, "_psg_pending", None)
        if entry is not None:
            state = getattr(getattr(assoc.dul, "state_machine", None), "current_state", None)
            self._release(entry, self._close_reason(entry, state))
        user_queue = assoc.dul.to_user_queue
        if isinstance(user_queue, _UserQueue):
            # Closed before any request: pynetdicom's association thread would wait for one until the ACSE
            # timeout (holding a thread, and a slot in pynetdicom's count); wake it so that it ends now.
            user_queue.wake_unrequested()

    def _on_echo(self, event: evt.Event) -> int:
        log.debug("dicom.echo", calling_ae=self._calling_ae(event.assoc), peer_host=self._peer_host(event.assoc))
        return STATUS_SUCCESS

    # ---- C-STORE ------------------------------------------------------------------------------------------

    def _count(self, metric: str, result: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(result=result).inc()

    def _on_store(self, event: evt.Event) -> int:
        req = event.request
        sop_uid = _clean_uid(req.AffectedSOPInstanceUID)
        sop_class = _clean_uid(req.AffectedSOPClassUID)
        calling, peer = self._calling_ae(event.assoc), self._peer_host(event.assoc)
        received = getattr(req, "_dataset_path", None)
        try:
            if not sop_uid:
                raise _Refused(STATUS_DATASET_MISMATCH, "no_sop_instance_uid")
            status = self._store_one(event, req, Path(received) if received else None, sop_uid, sop_class,
                                     calling, peer)
        except _Refused as exc:
            self._count("dicom_instances", "refused")
            log.warning("dicom.instance.refused", reason=exc.reason, status=f"0x{exc.status:04X}",
                        calling_ae=calling, peer_host=peer)
            status = exc.status
        except Exception as exc:  # noqa: BLE001 - disk or database: the sender retries later
            self._count("dicom_instances", "failed")
            log.error("dicom.instance.failed", error=type(exc).__name__, detail=str(exc)[:200],
                      calling_ae=calling, peer_host=peer)
            status = STATUS_OUT_OF_RESOURCES
        finally:
            if received:  # what pynetdicom left in .incoming (normally already renamed away)
                try:
                    os.unlink(received)
                except OSError:
                    pass
        return status

    def _store_one(self, event: evt.Event, req: Any, received: Path | None, sop_uid: str, sop_class: str,
                   calling: str, peer: str) -> int:
        # Serialise the same SOP instance arriving on two associations at once.
        while True:
            with self._lock:
                done = self._inflight.get(sop_uid)
                if done is None:
                    mine = self._inflight[sop_uid] = threading.Event()
                    break
            done.wait(self.cfg.network_timeout_seconds)
        try:
            if self.intake.known_instance(sop_uid):
                self._count("dicom_instances", "duplicate")
                log.info("dicom.instance.duplicate", calling_ae=calling, peer_host=peer)
                return STATUS_SUCCESS
            return self._write_and_record(event, req, received, sop_uid, sop_class, calling, peer)
        finally:
            with self._lock:
                self._inflight.pop(sop_uid, None)
            mine.set()

    def _write_and_record(self, event: evt.Event, req: Any, received: Path | None, sop_uid: str,
                          sop_class: str, calling: str, peer: str) -> int:
        if received is None:  # chunked receive off (another component changed it): write the bytes ourselves
            self._incoming.mkdir(parents=True, exist_ok=True)
            own = self._incoming / f"rx-{uuid.uuid4().hex}.dcm"
            try:
                with open(own, "wb") as fh:
                    fh.write(event.encoded_dataset(include_meta=True))
                return self._write_and_record(event, req, own, sop_uid, sop_class, calling, peer)
            finally:
                try:
                    own.unlink()
                except OSError:
                    pass
        handle = getattr(req, "_dataset_file", None)
        if handle is not None and not handle.closed:
            handle.flush()
        study_uid, series_uid = self._read_uids(received, _context_syntax(event))
        final = spool_path_for(self.spool_dir, study_uid, sop_uid)
        folder = final.parent
        created = False
        try:
            if self.cfg.fsync:
                fd = os.open(received, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            folder.mkdir(parents=True, exist_ok=True)
            self._place(received, final)
            created = True
            if self.cfg.fsync:
                fsync_dir(folder)
            size = final.stat().st_size
            instance = ReceivedInstance(study_uid=study_uid, series_uid=series_uid, sop_instance_uid=sop_uid,
                                        sop_class_uid=sop_class, path=final, size=size, calling_ae=calling,
                                        peer_host=peer)
            self.intake.instance_received(instance)
        except BaseException:
            if created:
                try:
                    final.unlink()
                    if self.cfg.fsync:
                        fsync_dir(folder)
                except OSError:
                    pass
            raise
        self._count("dicom_instances", "stored")
        if self.metrics is not None:
            self.metrics.dicom_bytes.inc(size)
        log.info("dicom.instance.stored", study_key=_key(study_uid), instance_key=_key(sop_uid),
                 sop_class=WAVEFORM_STORAGE_SOP_CLASSES.get(sop_class, sop_class), size=size,
                 calling_ae=calling, peer_host=peer)
        return STATUS_SUCCESS

    @staticmethod
    def _read_uids(path: Path, transfer_syntax: str | None = None) -> tuple[str, str | None]:
        """Study and Series Instance UIDs, parsing the header only up to (0020,000E)."""
        try:
            with open(path, "rb", buffering=64 * 1024) as fh:
                found = _scan_uids(fh, transfer_syntax)
                if found is None:  # deflated, or an unusual file meta: pydicom's own header reader
                    fh.seek(0)
                    ds = read_partial(fh, stop_when=_after_series_uid, defer_size=1024)
                    found = (ds[_STUDY_UID].value if _STUDY_UID in ds else "",
                             ds[_SERIES_UID].value if _SERIES_UID in ds else "")
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - a data set pydicom cannot parse
            raise _Refused(STATUS_CANNOT_UNDERSTAND, f"unparsable:{type(exc).__name__}") from None
        study, series = (_clean_uid(v.decode("ascii", "replace") if isinstance(v, bytes) else v) for v in found)
        if not study:
            raise _Refused(STATUS_DATASET_MISMATCH, "no_study_instance_uid")
        return study, series or None

    def _place(self, src: Path, final: Path) -> None:
        """Rename ``src`` to ``final`` (copy to a hidden name, fsync and rename across filesystems)."""
        try:
            os.replace(src, final)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.part")
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_CHUNK)
                fout.flush()
                if self.cfg.fsync:
                    os.fsync(fout.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
