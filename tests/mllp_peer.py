"""An MLLP listener for tests that plays the EHR's interface engine, and misbehaves on request.

Plain sockets and threads, independent of ``gateway.hl7.mllp``; received messages are parsed with
python-hl7. Each received message takes the next :class:`PeerAction` from ``peer.script`` (a deque; an
empty script answers AA)::

    with MllpPeer() as peer:                       # or MllpPeer(ssl_context=server_ctx)
        peer.script.extend([PeerAction(code="AR"), PeerAction(delay=2.0), PeerAction.half_ack_then_close()])
        ...                                        # connect to ("127.0.0.1", peer.port)
        peer.wait_for(3)
        peer.control_ids                           # MSH-10 of every received message, in order
        peer.down(); ...; peer.up()                # not listening, then listening again on the same port
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Self

import hl7

__all__ = ["MllpPeer", "PeerAction", "ack_message"]

SB, EB = b"\x0b", b"\x1c\x0d"
_POLL_S = 0.05


def ack_message(control_id: str, code: str = "AA", text: str | None = None, err: str | None = None,
                separator: str = "\r") -> str:
    """An ACK^R01 (v2.5.1) answering ``control_id``, with an optional MSA-3 text and ERR segment."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    segments = [f"MSH|^~\\&|EHR|HOSPITAL|PSG-GATEWAY|SLEEPLAB|{stamp}||ACK^R01^ACK|ACK{control_id}|P|2.5.1",
                f"MSA|{code}|{control_id}" + (f"|{text}" if text is not None else "")]
    if err is not None:
        segments.append(f"ERR|||207^Application internal error^HL70357|E||||{err}")
    return separator.join(segments) + separator


@dataclass
class PeerAction:
    """What the peer does with one received message (the defaults answer AA at once)."""

    code: str = "AA"  # MSA-1
    delay: float = 0.0  # seconds before answering (interrupted by down()/stop())
    control_id: str | None = None  # MSA-2; None: the received MSH-10
    text: str | None = None  # MSA-3
    err: str | None = None  # an ERR segment with this ERR-8 user message
    drip: float | None = None  # send the ACK one byte per TCP segment, sleeping this long between bytes
    half_then_close: bool = False  # send the first half of the framed ACK, then close the connection
    close: bool = False  # close the connection without answering
    silent: bool = False  # never answer (hold the connection open)
    raw: bytes | None = None  # send these bytes verbatim instead of a framed ACK
    close_after: bool = False  # close the connection after answering

    @classmethod
    def ack(cls, code: str = "AA", **kw) -> PeerAction:
        return cls(code=code, **kw)

    @classmethod
    def half_ack_then_close(cls) -> PeerAction:
        return cls(half_then_close=True)

    @classmethod
    def wrong_id(cls, code: str = "AA") -> PeerAction:
        return cls(code=code, control_id="NOT-YOUR-MESSAGE")

    @classmethod
    def no_answer(cls) -> PeerAction:
        return cls(silent=True)

    @classmethod
    def hang_up(cls) -> PeerAction:
        return cls(close=True)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    thread: threading.Thread | None = None
    closed: threading.Event = field(default_factory=threading.Event)


class MllpPeer:
    """Threaded MLLP server on 127.0.0.1 (``port=0``: a free port, kept across down()/up())."""

    def __init__(self, port: int = 0, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1",
                 handshake_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.script: deque[PeerAction] = deque()
        self.received: list[str] = []  # every received message, in order (ER7 as received)
        self.messages: list[hl7.Message] = []  # the same, parsed by python-hl7
        self.unparsable: list[str] = []  # received frames python-hl7 could not parse (connection closed)
        self.connections = 0  # connections accepted (and, with TLS, handshaken)
        self.tls_errors: list[str] = []  # failed TLS handshakes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conns: set[_Conn] = set()
        self._stopping = threading.Event()  # set by down()/stop(): interrupts delays and handlers
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._accept_stop = threading.Event()

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Self:
        self.up()
        return self

    def stop(self) -> None:
        self.down()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        """Listen (again) on ``self.port``."""
        if self._listener is not None:
            return
        self._stopping.clear()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(16)
        sock.settimeout(_POLL_S)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accept_stop = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(sock, self._accept_stop),
                                               name=f"mllp-peer-accept-{self.port}", daemon=True)
        self._accept_thread.start()

    def down(self) -> None:
        """Stop listening and drop every connection (connects are refused until up())."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_stop.set()
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        self.drop_connections()

    def drop_connections(self) -> None:
        """Close every open connection (an EHR or firewall dropping idle connections); keep listening."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.closed.set()
        for conn in conns:
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(timeout=5)

    # ---- observation ------------------------------------------------------------------------------
    @property
    def control_ids(self) -> list[str]:
        with self._lock:
            return [str(m.segment("MSH")[10]) for m in self.messages]

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` messages were received; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.received) >= count, timeout=timeout)

    def wait_until(self, predicate, timeout: float = 5.0) -> bool:
        """Poll ``predicate(peer)`` until it is true; False on timeout (for asynchronous effects such as
        a closed connection being noticed, or a TLS handshake failure being recorded)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # ---- threads ----------------------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    sock, _addr = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn = _Conn(sock)
                conn.thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                               name=f"mllp-peer-conn-{self.port}")
                with self._lock:
                    self._conns.add(conn)
                conn.thread.start()
        finally:
            with contextlib.suppress(OSError):
                listener.close()

    def _done(self, conn: _Conn) -> bool:
        return conn.closed.is_set() or self._stopping.is_set()

    def _sleep(self, conn: _Conn, seconds: float) -> bool:
        """Sleep; False when interrupted by down()/stop()/drop_connections()."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if conn.closed.wait(min(left, _POLL_S)) or self._stopping.is_set():
                return False
        return True

    def _serve(self, conn: _Conn) -> None:
        sock = conn.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock.settimeout(self.handshake_timeout)
                try:
                    sock = conn.sock = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ValueError) as exc:
                    with self._lock:
                        self.tls_errors.append(str(exc))
                    return
            with self._lock:
                self.connections += 1
            sock.settimeout(_POLL_S)
            buf = bytearray()
            scanned = 0  # bytes of buf already searched for the end block: a message of a few MB (an embedded
            # report) arrives in many reads, and searching it all again after each would be quadratic
            while not self._done(conn):
                try:
                    chunk = sock.recv(1 << 20)
                except TimeoutError:
                    continue
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while True:
                    start = buf.find(SB)
                    if start < 0:
                        buf.clear()
                        scanned = 0
                        break
                    end = buf.find(EB, max(start, scanned - 1))
                    if end < 0:
                        del buf[:start]
                        scanned = len(buf)
                        break
                    body = bytes(buf[start + 1:end])
                    del buf[:end + len(EB)]
                    scanned = 0
                    if not self._handle(conn, sock, body.decode("utf-8", errors="replace")):
                        return
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._conns.discard(conn)

    def _handle(self, conn: _Conn, sock: socket.socket, body: str) -> bool:
        """Record one message and act on it; False when the connection is to be closed."""
        try:
            parsed = hl7.parse(body)
            control_id = str(parsed.segment("MSH")[10])
        except (hl7.ParseException, KeyError, IndexError, ValueError, UnicodeError):  # not HL7: record it and hang up, as an engine would
            with self._cond:
                self.received.append(body)
                self.unparsable.append(body)
                self._cond.notify_all()
            return False
        with self._cond:
            self.received.append(body)
            self.messages.append(parsed)
            self._cond.notify_all()
            action = self.script.popleft() if self.script else PeerAction()
        if action.delay and not self._sleep(conn, action.delay):
            return False
        if action.close:
            return False
        if action.silent:
            while not self._done(conn):
                conn.closed.wait(_POLL_S)
            return False
        if action.raw is not None:
            data = action.raw
        else:
            ack = ack_message(action.control_id if action.control_id is not None else control_id,
                              action.code, action.text, action.err)
            data = SB + ack.encode("utf-8") + EB
        try:
            if action.half_then_close:
                sock.sendall(data[: len(data) // 2])
                return False
            if action.drip is not None:
                for i in range(len(data)):
                    sock.sendall(data[i:i + 1])
                    if action.drip and not self._sleep(conn, action.drip):
                        return False
            else:
                sock.sendall(data)
        except OSError:
            return False
        return not action.close_after
