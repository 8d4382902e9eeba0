"""A minimal MLLP receiver that writes each message to a folder and answers AA: the local destination
of ``make demo``, and a stand-in EHR while an interface is being set up (``psg-gateway hl7 listen``).

Not an interface engine: it accepts every framed message, stores it as ``<MSH-10>.hl7`` exactly as
received (ER7: the bytes between the MLLP start and end blocks, CR between segments) and acknowledges it with an ACK whose MSA-2 is the message's MSH-10.
"""

from __future__ import annotations

import re
import socketserver
import threading
from datetime import UTC, datetime
from pathlib import Path

from ..fsutil import atomic_write

__all__ = ["FileMllpListener"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _ack_for(message: str) -> bytes:
    msh = message.split("\r", 1)[0].split("|")
    control = msh[9] if len(msh) > 9 else ""
    version = msh[11] if len(msh) > 11 and msh[11] else "2.5.1"
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    sender = "|".join([msh[4] if len(msh) > 4 else "", msh[5] if len(msh) > 5 else "",
                       msh[2] if len(msh) > 2 else "", msh[3] if len(msh) > 3 else ""])
    ack = f"MSH|^~\\&|{sender}|{now}||ACK^R01^ACK|ACK{control}|P|{version}\rMSA|AA|{control}"
    return b"\x0b" + ack.encode("utf-8") + b"\x1c\r"


class FileMllpListener:
    def __init__(self, host: str, port: int, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.received = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                # No size limit, and linear in the message size: a message with an embedded report (an ED
                # OBX) is a few MB. Only the new bytes (and one before them) are searched for the end block.
                buf = bytearray()
                while True:
                    data = self.request.recv(1 << 20)
                    if not data:
                        return
                    scan = max(len(buf) - 1, 0)
                    buf += data
                    while (end := buf.find(b"\x1c\r", scan)) >= 0:
                        frame = bytes(buf[:end])
                        del buf[:end + 2]
                        scan = 0
                        payload = frame[frame.find(b"\x0b") + 1:]
                        message = payload.decode("utf-8", "replace")
                        outer._store(message, payload)
                        self.request.sendall(_ack_for(message))

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="mllp-listener", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def _store(self, message: str, payload: bytes) -> None:
        """Write ``payload`` (the framed bytes, untouched: ER7 with CR segment separators) as <MSH-10>.hl7."""
        msh = message.split("\r", 1)[0].split("|")
        name = _SAFE.sub("_", msh[9] if len(msh) > 9 and msh[9] else f"message-{self.received}")
        atomic_write(self.folder / f"{name}.hl7", payload)
        self.received += 1

    def start(self) -> FileMllpListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
