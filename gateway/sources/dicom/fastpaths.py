"""pynetdicom 3.0 internals replaced, for speed, on the DICOM receiver's own associations.

One entry point: :func:`install` ``(assoc)``, called by the receiver from ``EVT_CONN_OPEN`` (before the
association's threads start) when ``dicom.fast_paths`` is true. It replaces, on that association only
(other pynetdicom users in the process are untouched):

``DULServiceProvider.run_reactor`` (:func:`_dul_run_reactor`)
    pynetdicom's DUL thread polls, sleeping 1 ms between checks. Ours waits in ``select`` on the peer's
    socket and a wake-up socket pair (written on each put into ``dul.to_provider_queue``).
``Association._run_reactor`` (:func:`_assoc_run_reactor`, acceptor)
    Same loop, waiting on an Event set on each put into ``dimse.msg_queue`` and ``dul.to_user_queue``
    instead of sleeping 1 ms. Both reactors still wake at least every 10 ms (``_WAIT_CAP``) to check
    timers and kill flags as before.
``AssociationSocket.recv`` (:func:`_recv_exact`)
    One buffer filled with ``recv_into`` instead of 4 KiB reads appended to a growing buffer (a 128 KiB PDU
    is 1-3 system calls instead of 32). Only once the association is established: before that (the
    A-ASSOCIATE-RQ of a caller not yet admitted) pynetdicom's reads, whose buffer grows only with what
    actually arrives, where ours allocates the length a PDU header declares.
``DULServiceProvider._read_pdu_data`` (:func:`_dul_read_pdu_data`)
    A P-DATA-TF PDU's PDVs are handed on as memoryviews of the one buffer it was read into (pynetdicom
    copies a 128 KiB PDU five times). Other PDUs, or an association with ``EVT_DATA_RECV`` handlers, go
    through pynetdicom's decoder.
``DIMSEServiceProvider.send_msg`` (:func:`_dimse_send_msg`)
    C-STORE responses encoded directly, byte-identical (pydicom builds and encodes two Datasets per
    response). A response with an error comment or offending element, anything else than a C-STORE
    response, or an association with ``EVT_DIMSE_SENT`` handlers goes through pynetdicom.
``dimse_messages.create_file_meta`` / ``write_file_meta_info`` (:func:`_create_file_meta`, :func:`_write_file_meta_info`)
    The file meta of pynetdicom's chunked receive written directly, byte-identical, without building a
    Dataset. These are module-level names in ``pynetdicom.dimse_messages``, replaced once, on the first
    :func:`install`; they act only in the DUL threads of associations that have the fast paths and
    otherwise call the originals.
Early writeback (``install(assoc, early_writeback=True)``, the receiver's ``dicom.fsync``)
    Every 8 MiB written to an incoming file, a helper thread fdatasyncs it (by name), so that the fsync
    before answering Success has only the tail left. Durability is unchanged: the receiver's fsync of the
    file and of its folder still happen.

Why: throughput. ``make bench-receiver`` (bench/bench_receiver.py; ``--compare-fast-paths`` adds runs with
``dicom.fast_paths: false``) measures the receiver against DCMTK's storescp; docs/integration-guide.md ("Receiver
throughput") has the numbers, with these fast paths in place. They change speed only: the
spooled files (bytes, names, modes), the answers and the receiver's logs are the same with
``dicom.fast_paths: false``.
What is needed for correctness (pynetdicom's temporary files in the receiver's spool, the pending-connection
accounting, the fsyncs) lives in ``receiver.py`` and is on in both modes.

Versions: written against pynetdicom :data:`SUPPORTED_PYNETDICOM` (3.0.x). On any other version
:data:`ACTIVE` is false, :func:`install` returns False and pynetdicom's own code runs (the receiver logs
``fast_paths=false`` at start). :data:`PINNED_SOURCES` holds a hash of the source of every pynetdicom
function these mirror or hook, as of pynetdicom 3.0.4; tests/test_dicom_fastpaths.py compares them with the
installed pynetdicom, so an upgrade that changes one fails loudly instead of drifting silently: re-read the
new code, update the fast path, then the pin.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pynetdicom
from pydicom.filewriter import write_file_meta_info as _ORIGINAL_WRITE_FILE_META_INFO
from pynetdicom import _config, dimse_messages, evt
from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dimse_primitives as _dimse_primitives
from pynetdicom import dsutils as _dsutils
from pynetdicom import dul as _dul
from pynetdicom import pdu as _pdu
from pynetdicom import pdu_items as _pdu_items
from pynetdicom import transport as _transport
from pynetdicom.pdu_primitives import P_DATA

__all__ = ["ACTIVE", "PINNED_SOURCES", "SUPPORTED_PYNETDICOM", "install"]

#: pynetdicom versions (major.minor) the fast paths are written against.
SUPPORTED_PYNETDICOM: tuple[str, ...] = ("3.0",)

#: ``sha256(inspect.getsource(obj))[:16]`` of the pynetdicom 3.0.4 code the fast paths mirror or hook, by
#: its path under ``pynetdicom`` (module, then qualified name).
PINNED_SOURCES: dict[str, str] = {
    "dul.DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    "dul.DULServiceProvider._read_pdu_data": "19f2d4e38c13c835",
    "association.Association._run_reactor": "f28838c5559e462a",
    "transport.AssociationSocket.recv": "6bc20a33b1b7cfe7",
    "dimse.DIMSEServiceProvider.send_msg": "a839cf2fb46976d9",
    # the chunked receive: names it looks up (NamedTemporaryFile, create_file_meta, write_file_meta_info)
    # and the PDV data it writes (a memoryview with our PDU reads)
    "dimse_messages.DIMSEMessage.decode_msg": "f51c777e841a76be",
    "dsutils.create_file_meta": "035ed415f5aeea15",
}

#: True when the installed pynetdicom is a supported version (else :func:`install` does nothing).
ACTIVE: bool = ".".join(pynetdicom.__version__.split(".")[:2]) in SUPPORTED_PYNETDICOM

_WAIT_CAP = 0.01  # s: longest wait without a wake-up (timers, kill flags, a DUL thread that ended)
_WRITEBACK_STEP = 8 * 1024 * 1024
_PDU_HEADER = struct.Struct(">BBL")
_UINT4_BE = struct.Struct(">L")

_ORIGINAL_RECV = _transport.AssociationSocket.recv
_ORIGINAL_SEND_MSG = _dimse.DIMSEServiceProvider.send_msg
_ORIGINAL_CREATE_FILE_META = _dsutils.create_file_meta
_fdatasync = getattr(os, "fdatasync", os.fsync)
_HOOKS_LOCK = threading.Lock()


def install(assoc: Any, *, early_writeback: bool = False) -> bool:
    """Install the fast paths on ``assoc`` (an acceptor whose threads have not started); True when installed.

    False, and pynetdicom's own code runs, on an unsupported pynetdicom version, for a requestor, with
    ``_config.PASS_CONTEXTVARS`` (pynetdicom's handlers then run in copied contexts) or once the
    association's threads run. Call it after replacing any of the association's queues: their ``put`` is
    wrapped here to wake the reactors. ``early_writeback``: fdatasync incoming files as they grow (see the
    module docstring); meant for a receiver that fsyncs each instance anyway.
    """
    if not ACTIVE or _config.PASS_CONTEXTVARS or assoc.is_requestor:
        return False
    dul, dimse = assoc.dul, assoc.dimse
    if dul.is_alive() or assoc.is_alive():
        return False
    _install_module_hooks()
    waker = _Waker()
    try:
        dul._psg_waker = assoc._psg_waker = waker
        assoc._psg_early_writeback = early_writeback
        _wake_on_put(dul.to_provider_queue, waker.wake_dul)
        _wake_on_put(dul.to_user_queue, waker.wake_assoc)
        _wake_on_put(dimse.msg_queue, waker.wake_assoc)
        sock = dul.socket
        if sock is not None and hasattr(getattr(sock, "socket", None), "recv_into"):
            sock.recv = types.MethodType(_recv_exact, sock)
        dul._read_pdu_data = types.MethodType(_dul_read_pdu_data, dul)
        dimse.send_msg = types.MethodType(_dimse_send_msg, dimse)
        assoc._run_reactor = types.MethodType(_assoc_run_reactor, assoc)
        dul.run = types.MethodType(_dul_run_reactor, dul)  # Thread.run: the DUL thread's body
    except BaseException:
        waker.close()  # the DUL reactor that would close it will not run
        raise
    return True


def _install_module_hooks() -> None:
    """The chunked receive's file-meta writers, once per process (they only act for our associations)."""
    with _HOOKS_LOCK:
        if getattr(dimse_messages, "write_file_meta_info", None) is not _write_file_meta_info:
            dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
            dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]


def _fast_assoc_of_current_thread() -> Any:
    """The association of the current DUL thread when it has the fast paths, else None."""
    assoc = getattr(threading.current_thread(), "assoc", None)  # the DUL thread has .assoc
    return assoc if getattr(assoc, "_psg_waker", None) is not None else None


# ---- wake-ups instead of polling ------------------------------------------------------------------------------


class _Waker:
    """Wake-ups for one association: a socket pair for its DUL thread (which also waits on the peer's socket)
    and an Event for its reactor thread. Both wait at most ``_WAIT_CAP`` s, then check their flags as before."""

    def __init__(self) -> None:
        self.assoc_event = threading.Event()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def wake_dul(self) -> None:
        try:
            self._w.send(b"\x00")
        except OSError:  # buffer full (a wake-up is pending anyway) or closed (the DUL thread ended)
            pass

    def wake_assoc(self) -> None:
        self.assoc_event.set()

    def wait_dul(self, transport: Any) -> bool:
        """Wait until the peer's socket is readable, a wake-up arrives or ``_WAIT_CAP`` passes.

        True when the peer's socket was readable."""
        sock = getattr(transport, "socket", None)
        fds: list[Any] = [self._r]
        if sock is not None and getattr(transport, "_is_connected", False):
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return True
            fds.append(sock)
        try:
            ready, _, _ = select.select(fds, [], [], _WAIT_CAP)
        except (OSError, ValueError):  # the socket was closed under us: poll like pynetdicom
            time.sleep(0.001)
            return False
        if self._r in ready:
            try:
                while self._r.recv(4096):
                    pass
            except OSError:
                pass
        return len(fds) > 1 and fds[1] in ready

    def wait_assoc(self) -> None:
        self.assoc_event.wait(_WAIT_CAP)
        self.assoc_event.clear()

    def close(self) -> None:
        self._r.close()
        self._w.close()


def _wake_on_put(q: queue.Queue, wake: Callable[[], None]) -> None:  # type: ignore[type-arg]
    """Make every ``q.put`` (and ``put_nowait``, which calls it) call ``wake`` afterwards.

    Wraps the instance's own ``put``, so a queue subclass (the receiver's request queue) keeps its behaviour."""
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    q.put = put_and_wake  # type: ignore[method-assign]


def _dul_run_reactor(self: Any) -> None:
    """``DULServiceProvider.run_reactor`` with its 1 ms polling sleep replaced by :meth:`_Waker.wait_dul`."""
    waker: _Waker = self._psg_waker
    self._idle_timer.start()
    sleep = False
    readable = False  # the last wait ended on a readable socket and no event has been processed since
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                if readable:  # readable yet nothing to do (should not happen): do not spin, poll as pynetdicom
                    readable = False
                    time.sleep(self._run_loop_delay)
                else:
                    readable = waker.wait_dul(self.socket)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort the association
                _dul.LOGGER.error("Exception in DUL.run(), aborting association")
                _dul.LOGGER.exception(exc)
                abort_pdu = _pdu.A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = readable = False
    finally:
        waker.wake_assoc()
        waker.close()


def _assoc_run_reactor(self: Any) -> None:
    """``Association._run_reactor`` (acceptor) with its 1 ms polling sleep replaced by :meth:`_Waker.wait_assoc`."""
    waker: _Waker = self._psg_waker
    self._is_paused = False
    while not self._kill:
        if self.dimse.msg_queue.empty():
            waker.wait_assoc()
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _association.LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _association.LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            _association.LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


# ---- reading PDUs ---------------------------------------------------------------------------------------------


def _recv_exact(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with one buffer and ``recv_into`` instead of 4 KiB reads and appends.

    Same contract: up to ``nr_bytes``, fewer only when the peer closed the connection. Before the association
    is established, pynetdicom's own reads (see the module docstring: no buffer of a declared length for a
    caller not yet admitted).
    """
    if not self.assoc.is_established:
        return _ORIGINAL_RECV(self, nr_bytes)
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    sock = self.socket
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            view.release()
            del buf[got:]
            return buf
        got += n
    view.release()
    return buf


def _decode_p_data_tf(body: bytearray) -> Any:
    """A P-DATA-TF PDU from its body (after the 6-byte header), its PDVs as memoryviews of ``body`` (no copies)."""
    view = memoryview(body)
    items = []
    offset, end = 0, len(body)
    while offset < end:
        if offset + 5 > end:
            raise ValueError("truncated PDV item")
        item_end = offset + 4 + _UINT4_BE.unpack_from(body, offset)[0]
        if item_end < offset + 5 or item_end > end:
            raise ValueError("invalid PDV item length")
        item = _pdu_items.PresentationDataValueItem()
        item.presentation_context_id = body[offset + 4]
        item.presentation_data_value = view[offset + 5:item_end]  # type: ignore[assignment]
        items.append(item)
        offset = item_end
    pdu = _pdu.P_DATA_TF()
    pdu.presentation_data_value_items = items
    return pdu


def _dul_read_pdu_data(self: Any) -> None:
    """``DULServiceProvider._read_pdu_data`` without copying P-DATA-TF PDUs: one read into one buffer, the PDVs
    handed on as memoryviews (pynetdicom copies each 128 KiB PDU five times). Same events, same logs."""
    transport = self.socket
    try:
        header = transport.recv(6)
    except (OSError, TimeoutError) as exc:
        _dul.LOGGER.error("Connection closed before the entire PDU was received")
        _dul.LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    if len(header) != 6:
        self.event_queue.put("Evt17")
        return
    pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        _dul.LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        self.event_queue.put("Evt19")
        return
    try:
        body = transport.recv(pdu_length)
    except (OSError, TimeoutError) as exc:
        _dul.LOGGER.error("Connection closed before the entire PDU was received")
        _dul.LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    if len(body) != pdu_length:
        _dul.LOGGER.error(f"The received PDU is shorter than expected ({len(body) + 6} of "
                          f"{6 + pdu_length} bytes received)")
        self.event_queue.put("Evt17")
        return
    try:
        if pdu_type == 0x04 and not self.assoc.get_handlers(evt.EVT_DATA_RECV):
            pdu, event = _decode_p_data_tf(body), "Evt10"
            evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        else:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        self.event_queue.put(event)
    except Exception as exc:  # noqa: BLE001 - as pynetdicom: an invalid PDU
        _dul.LOGGER.error("Unable to decode the received PDU data")
        _dul.LOGGER.exception(exc)
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


# ---- C-STORE responses ------------------------------------------------------------------------------------------


def _implicit_le(tag: bytes, value: bytes) -> bytes:
    return tag + len(value).to_bytes(4, "little") + value


def _ui(value: Any) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _encode_store_rsp(primitive: Any) -> bytes | None:
    """The command set of a C-STORE-RSP as pynetdicom encodes it (implicit VR LE), or None (use pynetdicom)."""
    if (type(primitive) is not _dimse_primitives.C_STORE or primitive.MessageIDBeingRespondedTo is None
            or primitive.Status is None or primitive.ErrorComment is not None
            or primitive.OffendingElement is not None):
        return None
    try:
        body = b"".join((
            _implicit_le(b"\x00\x00\x02\x00", _ui(primitive.AffectedSOPClassUID))
            if primitive.AffectedSOPClassUID is not None else b"",
            _implicit_le(b"\x00\x00\x00\x01", b"\x01\x80"),
            _implicit_le(b"\x00\x00\x20\x01", int(primitive.MessageIDBeingRespondedTo).to_bytes(2, "little")),
            _implicit_le(b"\x00\x00\x00\x08", b"\x01\x01"),
            _implicit_le(b"\x00\x00\x00\x09", int(primitive.Status).to_bytes(2, "little")),
            _implicit_le(b"\x00\x00\x00\x10", _ui(primitive.AffectedSOPInstanceUID))
            if primitive.AffectedSOPInstanceUID is not None else b"",
        ))
    except (UnicodeError, OverflowError, ValueError, TypeError):
        return None
    return _implicit_le(b"\x00\x00\x00\x00", len(body).to_bytes(4, "little")) + body


def _dimse_send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg`` with C-STORE responses encoded directly (pydicom builds and encodes
    two Datasets per response); everything else, and any response with extras, goes to pynetdicom."""
    command = _encode_store_rsp(primitive)
    max_pdu = self.maximum_pdu_size
    if (command is None or (max_pdu and len(command) + 12 > max_pdu)
            or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        _ORIGINAL_SEND_MSG(self, primitive, context_id)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]
    self.dul.send_pdu(pdata)


# ---- the chunked receive's file meta, and early writeback -------------------------------------------------------


class _RawFileMeta:
    """File meta information already encoded (explicit VR LE, group length first)."""

    __slots__ = ("encoded",)

    def __init__(self, encoded: bytes) -> None:
        self.encoded = encoded


def _explicit_le(tag: bytes, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + len(value).to_bytes(4, "little") + value
    return tag + vr + len(value).to_bytes(2, "little") + value


def _encode_file_meta(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
                      implementation_uid: Any = None, implementation_version: Any = None) -> bytes:
    """What ``write_file_meta_info(fp, create_file_meta(...))`` writes, without building a Dataset."""
    uid = implementation_uid if implementation_uid is not None else _dsutils.PYNETDICOM_IMPLEMENTATION_UID
    version = (implementation_version if implementation_version is not None
               else _dsutils.PYNETDICOM_IMPLEMENTATION_VERSION)
    name = str(version).encode("ascii")
    if len(name) % 2:
        name += b" "
    body = b"".join((
        _explicit_le(b"\x02\x00\x01\x00", b"OB", b"\x00\x01"),
        _explicit_le(b"\x02\x00\x02\x00", b"UI", _ui(sop_class_uid)),
        _explicit_le(b"\x02\x00\x03\x00", b"UI", _ui(sop_instance_uid)),
        _explicit_le(b"\x02\x00\x10\x00", b"UI", _ui(transfer_syntax)),
        _explicit_le(b"\x02\x00\x12\x00", b"UI", _ui(uid)),
        _explicit_le(b"\x02\x00\x13\x00", b"SH", name),
    ))
    return _explicit_le(b"\x02\x00\x00\x00", b"UL", len(body).to_bytes(4, "little")) + body


def _create_file_meta(**kwargs: Any) -> Any:
    """``dimse_messages.create_file_meta``: encoded bytes in our DUL threads, pynetdicom's Dataset elsewhere."""
    if _fast_assoc_of_current_thread() is not None and all(kwargs.get(k) for k in (
            "sop_class_uid", "sop_instance_uid", "transfer_syntax")):
        try:
            return _RawFileMeta(_encode_file_meta(**kwargs))
        except (UnicodeError, TypeError):
            pass
    return _ORIGINAL_CREATE_FILE_META(**kwargs)


def _write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> Any:
    """``dimse_messages.write_file_meta_info``, called once per incoming file right after it was created:
    starts its early writeback (our associations with ``early_writeback``) and writes our encoded meta."""
    assoc = _fast_assoc_of_current_thread()
    if (assoc is not None and getattr(assoc, "_psg_early_writeback", False)
            and hasattr(fp, "file") and hasattr(fp, "name")):
        _EarlyWriteback(fp)
    if isinstance(file_meta, _RawFileMeta):
        fp.write(file_meta.encoded)
        return None
    return _ORIGINAL_WRITE_FILE_META_INFO(fp, file_meta, *args, **kwargs)


class _EarlyWriteback:
    """Starts writing a large incoming file to disk while it is still being received.

    Installed as the ``write`` of pynetdicom's temporary file (its wrapper looks ``write`` up on the instance):
    every ``_WRITEBACK_STEP`` bytes a helper thread opens the file by name and fdatasyncs it (at most one at a
    time per file; a file renamed or removed meanwhile is skipped), so the fsync before answering Success has
    only the tail left. Durability is unchanged: that final fsync still happens.
    """

    __slots__ = ("_busy", "_file", "_name", "_next", "_written")

    def __init__(self, handle: Any) -> None:
        self._file = handle.file
        self._name = handle.name
        self._written = 0
        self._next = _WRITEBACK_STEP
        self._busy = False
        handle.write = self.write

    def write(self, data: Any) -> int:
        n = self._file.write(data)
        self._written += len(data)
        if self._written >= self._next:
            self._next = self._written + _WRITEBACK_STEP
            if not self._busy:
                self._busy = True
                self._file.flush()
                threading.Thread(target=self._sync, name="dicom-writeback", daemon=True).start()
        return n

    def _sync(self) -> None:
        try:
            fd = os.open(self._name, os.O_RDONLY)
            try:
                _fdatasync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        finally:
            self._busy = False
