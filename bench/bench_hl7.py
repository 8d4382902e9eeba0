"""Benchmark: ORU^R01 build + STRICT validation + outbox + MLLP delivery over loopback.

Prints one JSON document: messages/s for building alone (hl7apy, validated), for the outbox round
trip (commit with the study's state, drain, ACK, mark delivered; SQLite in WAL mode, fsync on), and
for the whole path. The peer is a plain-socket MLLP listener in this process answering AA at once.
The need is a few messages per hour; the point is the order of magnitude, and that delivery runs
outside the study workers.

Usage: ``python bench/bench_hl7.py [--messages 200]``
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import Hl7Config
from gateway.hl7.compose import build_study_message, new_control_id
from gateway.hl7.delivery import Deliverer
from gateway.logging import configure_logging
from gateway.pipeline.flags import Flag, FlagDecision
from gateway.store.db import make_engine, upgrade
from gateway.store.models import MessageState, State
from gateway.store.repo import Repo

SLEEP = {"tst_min": 402.5, "sleep_efficiency_pct": 83.9, "sleep_onset_latency_min": 14.0, "waso_min": 63.5,
         "rem_latency_min": 96.0, "stage_min": {"W": 77.5, "N1": 30.0, "N2": 220.0, "N3": 70.0, "REM": 82.5}}
DECISION = FlagDecision(flags=[
    Flag("death", "PSG-DEATH", "death", "death", 0.92, 2.51, None, "hazard ratio 2.51 >= 2"),
    Flag("Heart Failure", "PSG-HEART-FAILURE", "Heart Failure", "Heart Failure", 0.81, 2.25, 97.2,
         "percentile 97.2 >= 95 (site reference of 812 studies)")])


def _ack_server(stop: threading.Event) -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn: socket.socket) -> None:
        buf = b""
        with conn:
            while not stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\x1c\r" in buf:
                    frame, buf = buf.split(b"\x1c\r", 1)
                    msh = frame.lstrip(b"\x0b").split(b"\r", 1)[0].decode().split("|")
                    ack = f"MSH|^~\\&|EHR|H|PSG|S|{msh[6]}||ACK|A{msh[9]}|P|2.5.1\rMSA|AA|{msh[9]}"
                    conn.sendall(b"\x0b" + ack.encode() + b"\x1c\r")

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def _study(repo: Repo, i: int):
    s = repo.register_file(source="bench", path=f"/b/{i}.edf", name=f"{i}.edf", sha256=f"{i:064x}",
                           filename_pattern=None, actor="bench").study
    s = repo.claim("bench", 60)
    for st in (State.DECODED, State.MAPPED):
        s = repo.transition(s, st, "bench", "x")
    return repo.transition(s, State.INFERRED, "bench", "x", patient_id=f"MRN{i:06d}", patient_name="DOE^JANE",
                           accession=f"ACC{i}", bundle_name="sleepfm", bundle_version="1.0",
                           bundle_hash="ab" * 32, bundle_validated=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200)
    args = ap.parse_args()
    configure_logging("warning")  # one log line per delivered message would time the terminal
    n = args.messages
    stop = threading.Event()
    port = _ack_server(stop)
    cfg = Hl7Config(enabled=True, port=port, mrn_assigning_authority="HOSP")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Repo(make_engine(f"sqlite:///{Path(tmp) / 'bench.db'}"))
        upgrade(repo.engine)
        studies = [_study(repo, i) for i in range(n)]

        t0 = time.perf_counter()
        messages = [build_study_message(s, DECISION, SLEEP, cfg, control_id=new_control_id(), now=datetime.now(UTC),
                                        correction=False, validated=True) for s in studies]
        build_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for s, er7 in zip(studies, messages):
            control = er7.split("\r", 1)[0].split("|")[9]
            repo.queue_message(s, State.QUEUED, "bench", "study.queued", None, destination=cfg.destination,
                               control_id=control, er7=er7, message_state=MessageState.PENDING, correction=False)
        queue_s = time.perf_counter() - t0

        deliverer = Deliverer(repo, cfg)
        t0 = time.perf_counter()
        delivered = deliverer.drain()
        deliver_s = time.perf_counter() - t0
        deliverer.close()
        assert delivered == n, delivered
        assert repo.counts_by_state() == {"DELIVERED": n}
    stop.set()
    total = build_s + queue_s + deliver_s
    print(json.dumps({
        "messages": n,
        "flags_per_message": len(DECISION.flags),
        "build_and_validate": {"seconds": round(build_s, 3), "messages_per_s": round(n / build_s, 1),
                               "ms_per_message": round(1000 * build_s / n, 1)},
        "outbox_commit": {"seconds": round(queue_s, 3), "messages_per_s": round(n / queue_s, 1)},
        "deliver_over_mllp": {"seconds": round(deliver_s, 3), "messages_per_s": round(n / deliver_s, 1)},
        "end_to_end": {"messages_per_s": round(n / total, 1), "messages_per_hour": round(3600 * n / total)},
    }, indent=2))


if __name__ == "__main__":
    main()
