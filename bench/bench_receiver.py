"""Receiver throughput on loopback: our DicomReceiver vs DCMTK's storescp, both fed by DCMTK's storescu.

    .venv/bin/python bench/bench_receiver.py [--small 300] [--hours 8] [--channels 12] [--repeat 2]

(a) instances/s for N small Sleep EEG instances (distinct SOP Instance UIDs, one association);
(b) MB/s for one full-night Sleep EEG instance (hours x 256 Hz x channels, 16-bit).

Ours runs with fsync on and a sink doing one SQLite insert + commit per instance (WAL, synchronous=NORMAL).
storescp runs with ``+B`` (bit-preserving: writes the data set as received, as ours does), ``-pdu 131072``
(its largest receive PDU) and ``-od``; storescp has no fsync option, so it is measured without one.
storescu runs with ``-R`` (propose only the files' SOP classes) and ``TCP_NODELAY=1``.
Ours is also measured with fsync off (``ours_without_fsync_*``), the like-for-like comparison with storescp.
Each measurement is the best of ``--repeat`` runs (wall time of storescu, i.e. until the last response).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import DicomConfig
from gateway.logging import configure_logging
from gateway.readers.dicom_synthetic import (
    SLEEP_EEG,
    WaveformChannel,
    WaveformGroup,
    make_waveform_dataset,
    write_waveform_file,
)
from gateway.sources.dicom_scp import DicomReceiver, ReceivedInstance

ENV = {**os.environ, "TCP_NODELAY": "1"}
STORESCP_OPTS = ["+B", "-pdu", "131072"]
STORESCU_OPTS = ["-R"]


class SqliteSink:
    """A realistic sink: one row per instance, committed."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE inst (sop TEXT PRIMARY KEY, study TEXT, path TEXT, size INTEGER)")
        self.lock = threading.Lock()
        self.count = 0

    def known_instance(self, sop_instance_uid: str) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM inst WHERE sop=?", (sop_instance_uid,)).fetchone() is not None

    def instance_received(self, instance: ReceivedInstance) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO inst VALUES (?,?,?,?)", (instance.sop_instance_uid, instance.study_uid,
                                                                  str(instance.path), instance.size))
            self.db.execute("COMMIT")
            self.count += 1


def small_files(folder: Path, n: int, seconds: int = 10) -> list[Path]:
    rng = np.random.default_rng(1)
    groups = [WaveformGroup(256, [WaveformChannel(f"EEG{i}", rng.normal(0, 30, 256 * seconds)) for i in range(6)])]
    ds = make_waveform_dataset(SLEEP_EEG, groups, study_uid=generate_uid())
    files = []
    for i in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        files.append(write_waveform_file(folder / f"s{i:05d}.dcm", ds))
    return files


def large_file(folder: Path, hours: float, channels: int, rate: int = 256) -> Path:
    ds = make_waveform_dataset(SLEEP_EEG, [WaveformGroup(rate, [WaveformChannel(f"EEG{i}", np.zeros(rate))
                                                                for i in range(channels)])])
    samples = int(hours * 3600 * rate)
    item = ds.WaveformSequence[0]
    item.NumberOfWaveformSamples = samples
    raw = np.random.default_rng(2).integers(-3000, 3000, size=samples * channels, dtype=np.int16)
    item.WaveformData = raw.astype("<i2").tobytes()
    del raw
    return write_waveform_file(folder / "night.dcm", ds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def send(port: int, aec: str, files: list[Path]) -> float:
    start = time.perf_counter()
    result = subprocess.run(["storescu", *STORESCU_OPTS, "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port),
                             *map(str, files)], check=False, env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-500:]}")
    return elapsed


def run_ours(files: list[Path], work: Path, fsync: bool = True) -> float:
    spool = work / "spool"
    sink = SqliteSink(work / "bench.db")
    receiver = DicomReceiver(DicomConfig(port=0, fsync=fsync), spool, sink)
    receiver.start()
    try:
        elapsed = send(receiver.port, "PSGGATEWAY", files)
    finally:
        receiver.stop(timeout=5)
    if sink.count != len(files):
        raise RuntimeError(f"ours stored {sink.count} of {len(files)}")
    return elapsed


def run_ours_nofsync(files: list[Path], work: Path) -> float:
    return run_ours(files, work, fsync=False)


def run_storescp(files: list[Path], work: Path) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", *STORESCP_OPTS, "-aet", "STORESCP", "-od", str(out), str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port)
        elapsed = send(port, "STORESCP", files)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    stored = len(list(out.iterdir()))
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)}")
    return elapsed


def best(fn, files: list[Path], base: Path, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        work = Path(tempfile.mkdtemp(dir=base))
        try:
            times.append(fn(files, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return min(times), [round(t, 3) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: system temp)")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"DCMTK's {tool} is required")
    configure_logging("warning", json=True)

    base = Path(tempfile.mkdtemp(prefix="bench-receiver-", dir=args.workdir))
    try:
        inputs = base / "inputs"
        small = small_files(inputs / "small", args.small)
        large = large_file(inputs / "large", args.hours, args.channels)
        small_bytes = sum(f.stat().st_size for f in small)
        large_mb = large.stat().st_size / 1e6

        ours_small, ours_small_all = best(run_ours, small, base, args.repeat)
        scp_small, scp_small_all = best(run_storescp, small, base, args.repeat)
        ours_large, ours_large_all = best(run_ours, [large], base, args.repeat)
        nofsync_small, _ = best(run_ours_nofsync, small, base, args.repeat)
        nofsync_large, _ = best(run_ours_nofsync, [large], base, args.repeat)
        scp_large, scp_large_all = best(run_storescp, [large], base, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    result = {
        "small": {
            "instances": args.small,
            "mean_kb": round(small_bytes / args.small / 1e3, 1),
            "ours_instances_per_s": round(args.small / ours_small, 1),
            "storescp_instances_per_s": round(args.small / scp_small, 1),
            "ours_without_fsync_instances_per_s": round(args.small / nofsync_small, 1),
            "ours_seconds": ours_small_all,
            "storescp_seconds": scp_small_all,
        },
        "large": {
            "mb": round(large_mb, 1),
            "hours": args.hours,
            "channels": args.channels,
            "ours_mb_per_s": round(large_mb / ours_large, 1),
            "storescp_mb_per_s": round(large_mb / scp_large, 1),
            "ours_without_fsync_mb_per_s": round(large_mb / nofsync_large, 1),
            "ours_seconds": ours_large_all,
            "storescp_seconds": scp_large_all,
        },
        "targets": {
            "small_instances_per_s_min": 200,
            "small_met": args.small / ours_small >= 200,
            "large_mb_per_s_vs_storescp_met": ours_large <= scp_large,
        },
        "options": {
            "ours": "fsync=true, sqlite sink (WAL, synchronous=NORMAL, commit per instance), max PDU unlimited",
            "storescp": " ".join(STORESCP_OPTS) + " -od DIR (storescp has no fsync option)",
            "storescu": " ".join(STORESCU_OPTS) + " with TCP_NODELAY=1",
            "repeat": args.repeat,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
