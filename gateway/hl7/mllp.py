"""MLLP client: send one HL7 v2 message at a time to the EHR's interface engine and check its ACK.

Neither library does this for us: hl7apy has no MLLP client, and python-hl7's does not check the ACK.

* One persistent TCP (or TLS) connection, opened lazily and reused; it is closed, and the next send
  reconnects, after any error, when it sat idle longer than ``idle_reconnect_seconds`` (firewalls drop
  idle TCP silently), or when the peer closed it or sent bytes nobody asked for while it was idle.
* TCP keepalive and TCP_NODELAY on every connection.
* Framing: ``0x0B`` + UTF-8 message + ``0x1C 0x0D``. The ACK is read until its end block (split across
  any number of segments), bytes before its start block are ignored, and the whole exchange (connect,
  TLS handshake, write, ACK) is bounded by ``timeout_seconds``: a slow-drip peer cannot stretch it.
* The ACK's MSA-2 must equal the sent MSH-10; otherwise the stream is out of sync: the connection is
  closed and :class:`MllpProtocolError` raised.
* Every transport problem is an :class:`MllpError` (``retryable``); AE/CE (dead letter) and AR/CR
  (retry) are not errors but :class:`Ack` values the caller acts on.

Nothing here logs: messages hold PHI, and logging (without content) is the caller's job.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ..crashpoints import crashpoint

__all__ = [
    "Ack",
    "MllpClient",
    "MllpConnectError",
    "MllpDestination",
    "MllpError",
    "MllpProtocolError",
    "MllpTimeout",
    "frame",
    "parse_ack",
]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20  # an ACK is a few hundred bytes; more is a confused peer, not an ACK

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})

# TCP keepalive: first probe after 30 s idle, then every 10 s, dead after 3 unanswered probes.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 3


# ---- errors ----------------------------------------------------------------------------------------
class MllpError(Exception):
    """A transport problem: the message may or may not have arrived; sending it again is safe
    (same MSH-10) and the right thing to do."""

    retryable: bool = True


class MllpConnectError(MllpError):
    """Connection refused, host unreachable or not answering, TLS setup or handshake failure."""


class MllpTimeout(MllpError):
    """No complete ACK within ``timeout_seconds``."""


class MllpProtocolError(MllpError):
    """The exchange broke: connection closed or reset mid-exchange, garbage, an unparsable ACK, or an
    ACK whose MSA-2 is not the sent MSH-10."""


# ---- ACK -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1: AA, AE, AR, CA, CE, CR
    control_id: str  # MSA-2
    text: str | None  # MSA-3 and/or ERR text, for logs and dead letters
    raw: str  # the ACK message as received (ER7, \r separators)

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")

    @property
    def rejected_permanently(self) -> bool:
        """AE/CE: the receiver will not take this message as it is (dead letter)."""
        return self.code in ("AE", "CE")

    @property
    def retryable(self) -> bool:
        """AR/CR: the receiver could not take it now (send again later)."""
        return self.code in ("AR", "CR")


def _split_segments(er7: str) -> list[str]:
    text = er7.replace("\r\n", "\r").replace("\n", "\r")
    return [seg for seg in (s.strip() for s in text.split("\r")) if seg]


def _unescape(value: str, esc: str, field_sep: str, comp: str, rep: str, sub: str) -> str:
    if not esc or esc not in value:
        return value
    table = {"F": field_sep, "S": comp, "R": rep, "T": sub, "E": esc}
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == esc:
            end = value.find(esc, i + 1)
            if end > i + 1 and value[i + 1:end] in table:
                out.append(table[value[i + 1:end]])
                i = end + 1
                continue
            if end > i + 1 and value[i + 1:end] in (".br", "X0D", "X0A"):
                out.append(" ")
                i = end + 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def parse_ack(raw: str) -> Ack:
    """The MSA (and ERR) of an ACK; segments may end in ``\\r``, ``\\n`` or ``\\r\\n``.

    Raises :class:`MllpProtocolError` when there is no MSA segment or MSA-1 is not an ACK code.
    """
    segments = _split_segments(raw.lstrip("\ufeff"))
    field_sep, comp, rep, esc, sub = "|", "^", "~", "\\", "&"
    for seg in segments:
        if seg.startswith("MSH") and len(seg) >= 4:
            field_sep = seg[3]
            enc = seg[4:].split(field_sep, 1)[0]
            comp, rep, esc, sub = (list(enc) + ["", "", "", ""])[:4]
            comp, rep, sub = comp or "^", rep or "~", sub or "&"
            break

    def fields(seg: str) -> list[str]:
        return seg.split(field_sep)

    def unesc(value: str) -> str:
        return _unescape(value, esc, field_sep, comp, rep, sub).strip()

    msa = next((fields(s) for s in segments if s.startswith("MSA" + field_sep) or s == "MSA"), None)
    if msa is None:
        raise MllpProtocolError("ACK has no MSA segment")
    msa += [""] * (4 - len(msa))
    code = msa[1].strip().upper()
    if code not in ACK_CODES:
        raise MllpProtocolError(f"ACK has an unknown MSA-1 acknowledgment code {code[:8]!r}")
    control_id = msa[2].strip()

    texts: list[str] = []
    if unesc(msa[3]):
        texts.append(unesc(msa[3]))
    for seg in segments:
        if not seg.startswith("ERR" + field_sep):
            continue
        err = fields(seg) + [""] * 9
        # v2.5+: ERR-8 user message, ERR-3 HL7 error code (CWE: id^text^system).
        # v2.3/2.4: ERR-1 error code and location (segment^seq^field^id&text&system).
        candidates = [err[8]]
        code3 = err[3].split(rep)[0].split(comp) if err[3] else []
        candidates.append(code3[1] if len(code3) > 1 and code3[1] else (code3[0] if code3 else ""))
        eld = err[1].split(rep)[0].split(comp) if err[1] else []
        if len(eld) > 3 and eld[3]:
            ce = eld[3].split(sub)
            candidates.append(ce[1] if len(ce) > 1 and ce[1] else ce[0])
        for cand in candidates:
            cand = unesc(cand)
            if cand and cand not in texts:
                texts.append(cand)
                break
    return Ack(code=code, control_id=control_id, text="; ".join(texts) or None, raw=raw)


# ---- framing ---------------------------------------------------------------------------------------
def frame(er7: str) -> bytes:
    """``0x0B`` + the UTF-8 message + ``0x1C 0x0D``."""
    if "\x0b" in er7 or "\x1c" in er7:
        raise ValueError("message contains an MLLP block character (0x0B or 0x1C)")
    return START_BLOCK + er7.encode("utf-8") + END_BLOCK


def control_id_of(er7: str) -> str:
    """MSH-10 of an ER7 message (``ValueError`` when the message has no MSH-10)."""
    text = er7.lstrip("\ufeff \t\r\n")
    if not text.startswith("MSH") or len(text) < 4:
        raise ValueError("message does not start with an MSH segment")
    first = text.replace("\n", "\r").split("\r", 1)[0]
    fields = first.split(text[3])
    control_id = fields[9].strip() if len(fields) > 9 else ""
    if not control_id:
        raise ValueError("message has no MSH-10 (message control id)")
    return control_id


# ---- destination and client ------------------------------------------------------------------------
@dataclass(frozen=True)
class MllpDestination:
    host: str
    port: int
    timeout_seconds: float = 30.0
    tls: bool = False
    ca_file: Path | None = None  # CA bundle the server certificate must chain to (None: system CAs)
    verify: bool = True
    client_cert: Path | None = None  # mutual TLS
    client_key: Path | None = None
    server_hostname: str | None = None  # TLS SNI and hostname check (None: host)
    idle_reconnect_seconds: float = 60.0  # close and reconnect a connection idle this long

    def __str__(self) -> str:
        return f"{'mllps' if self.tls else 'mllp'}://{self.host}:{self.port}"


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPALIVE", KEEPALIVE_IDLE_S),
                        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S), ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        opt = getattr(socket, name, None)
        if opt is None or (name == "TCP_KEEPALIVE" and hasattr(socket, "TCP_KEEPIDLE")):
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        except OSError:
            pass  # not supported by this platform: SO_KEEPALIVE with the system defaults


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()


class MllpClient:
    """One destination, one connection, one message in flight (``send`` is serialised by a lock)."""

    def __init__(self, destination: MllpDestination) -> None:
        self.destination = destination
        self._sock: socket.socket | None = None
        self._last_used = 0.0
        self._ssl_context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------------------------------
    def send(self, er7: str) -> Ack:
        """Send one message and return the receiver's ACK (AA/CA, AE/CE or AR/CR).

        Raises :class:`MllpError` subclasses for transport problems (the connection is closed then, and
        the next send reconnects); ``ValueError`` when ``er7`` has no MSH-10 or holds a block character.
        """
        control_id = control_id_of(er7)
        payload = frame(er7)
        with self._lock:
            deadline = _Deadline(self.destination.timeout_seconds)
            try:
                sock = self._connection(deadline)
                self._write(sock, payload, deadline)
                crashpoint("delivery.sent")
                raw, clean = self._read_ack(sock, deadline)
                ack = parse_ack(raw)
                if ack.control_id != control_id:
                    raise MllpProtocolError(
                        f"ACK is for control id {ack.control_id[:40]!r}, not the sent {control_id[:40]!r}")
            except BaseException:
                self._close()
                raise
            if clean:
                self._last_used = time.monotonic()
            else:
                self._close()  # bytes after the ACK: the stream cannot be trusted for the next message
            return ack

    def connect(self) -> None:
        """Open the connection now (or keep a reusable one), so that the caller can record an attempt
        after the EHR answered the connect and before the first byte of the message is written."""
        with self._lock:
            try:
                self._connection(_Deadline(self.destination.timeout_seconds))
            except BaseException:
                self._close()
                raise

    def close(self) -> None:
        with self._lock:
            self._close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connection -------------------------------------------------------------------------------
    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _reusable(self, sock: socket.socket) -> bool:
        """The connection is fresh enough, still open, and has nothing unread."""
        if time.monotonic() - self._last_used > self.destination.idle_reconnect_seconds:
            return False
        try:
            sock.settimeout(0.0)
            sock.recv(1)  # b"": the peer closed it; a byte: unsolicited data, the stream is out of sync
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True  # nothing to read: open and in sync (TLS 1.3 session tickets end here too)
        except OSError:
            return False
        return False

    def _connection(self, deadline: _Deadline) -> socket.socket:
        if self._sock is not None:
            if self._reusable(self._sock):
                return self._sock
            self._close()
        self._sock = self._connect(deadline)
        self._last_used = time.monotonic()
        return self._sock

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            dest = self.destination
            try:
                ctx = ssl.create_default_context(cafile=str(dest.ca_file) if dest.ca_file else None)
                if not dest.verify:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                if dest.client_cert is not None:
                    ctx.load_cert_chain(str(dest.client_cert),
                                        str(dest.client_key) if dest.client_key is not None else None)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise MllpConnectError(f"{dest}: TLS setup failed: {exc}") from exc
            self._ssl_context = ctx
        return self._ssl_context

    def _connect(self, deadline: _Deadline) -> socket.socket:
        dest = self.destination
        context = self._context() if dest.tls else None
        remaining = deadline.remaining()
        if remaining <= 0:
            raise MllpConnectError(f"{dest}: no time left to connect")
        try:
            sock = socket.create_connection((dest.host, dest.port), timeout=remaining)
        except TimeoutError as exc:
            raise MllpConnectError(f"{dest}: connect timed out after {deadline.seconds:g} s") from exc
        except OSError as exc:
            raise MllpConnectError(f"{dest}: connect failed: {exc}") from exc
        try:
            _tune(sock)
            if context is not None:
                sock.settimeout(max(deadline.remaining(), 0.001))
                sock = context.wrap_socket(sock, server_hostname=dest.server_hostname or dest.host)
        except TimeoutError as exc:
            sock.close()
            raise MllpConnectError(f"{dest}: TLS handshake timed out") from exc
        except (OSError, ValueError) as exc:  # ssl.SSLError and SSLCertVerificationError are OSErrors
            sock.close()
            raise MllpConnectError(f"{dest}: TLS handshake failed: {exc}") from exc
        return sock

    # -- exchange ---------------------------------------------------------------------------------
    def _timeout(self, deadline: _Deadline, what: str) -> MllpTimeout:
        return MllpTimeout(f"{self.destination}: {what} within {deadline.seconds:g} s")

    def _write(self, sock: socket.socket, payload: bytes, deadline: _Deadline) -> None:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise self._timeout(deadline, "message not sent")
        try:
            sock.settimeout(remaining)
            sock.sendall(payload)  # the timeout bounds the whole sendall (Python >= 3.5)
        except TimeoutError as exc:
            raise self._timeout(deadline, "message not sent") from exc
        except OSError as exc:
            raise MllpProtocolError(f"{self.destination}: connection lost while sending: {exc}") from exc

    def _read_ack(self, sock: socket.socket, deadline: _Deadline) -> tuple[str, bool]:
        """The ACK between the start and end blocks, and whether nothing followed it."""
        buf = bytearray()
        started = False
        while True:
            if not started:
                start = buf.find(START_BLOCK)
                if start >= 0:
                    del buf[:start + 1]
                    started = True
                else:
                    buf.clear()  # bytes before the start block are ignored
            if started:
                end = buf.find(END_BLOCK)
                if end >= 0:
                    body, rest = bytes(buf[:end]), bytes(buf[end + len(END_BLOCK):])
                    if START_BLOCK in body:
                        raise MllpProtocolError(f"{self.destination}: a second start block inside the ACK")
                    return body.decode("utf-8", errors="replace"), not rest
                if len(buf) > MAX_ACK_BYTES:
                    raise MllpProtocolError(f"{self.destination}: no end block in {len(buf)} bytes")
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._timeout(deadline, "no complete ACK" if started else "no ACK")
            try:
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise self._timeout(deadline, "no complete ACK" if started else "no ACK") from exc
            except OSError as exc:
                raise MllpProtocolError(f"{self.destination}: connection lost while reading the ACK: {exc}") \
                    from exc
            if not chunk:
                what = "in the middle of the ACK" if started else "before the ACK"
                raise MllpProtocolError(f"{self.destination}: connection closed by the peer {what}")
            buf += chunk
