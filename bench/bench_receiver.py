"""Receiver throughput on loopback: our DicomReceiver vs DCMTK's storescp, both fed by DCMTK's storescu.

    .venv/bin/python bench/bench_receiver.py [--small 300] [--hours 8] [--channels 12] [--repeat 3]
                                             [--compare-fast-paths]

(a) instances/s for N small Sleep EEG instances (distinct SOP Instance UIDs, one association);
(b) MB/s for one full-night Sleep EEG instance (hours x 256 Hz x channels, 16-bit).

Ours runs with fsync on and a sink doing one SQLite insert + commit per instance (WAL, synchronous=NORMAL).
storescp runs with ``+B`` (bit-preserving: writes the data set as received, as ours does), ``-pdu 131072``
(its largest receive PDU) and ``-od``; storescp has no fsync option, so it is measured without one.
storescu runs with ``-R`` (propose only the files' SOP classes) and ``TCP_NODELAY=1``.
Ours is also measured with fsync off (``ours_nofsync``), the like-for-like comparison with storescp, and,
with ``--compare-fast-paths``, with ``dicom.fast_paths: false`` (``ours_plain``: fsync on, plain pynetdicom;
see gateway/sources/dicom/fastpaths.py).
Each variant runs ``--repeat`` times (default 3), the variants taking turns; best and median are reported
(wall time of storescu, i.e. until the last response and the release). Prints one JSON object, with whether
the targets are met: >= 200 small instances/s with fsync on, and at least storescp's MB/s on the large one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
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
from gateway.sources.dicom.receiver import DicomReceiver, ReceivedInstance
from gateway.synthetic.dicom_study import (
    SLEEP_EEG,
    WaveformChannel,
    WaveformGroup,
    make_waveform_dataset,
    write_waveform_file,
)

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


def run_ours(files: list[Path], work: Path, fsync: bool = True, fast_paths: bool = True) -> float:
    spool = work / "spool"
    sink = SqliteSink(work / "bench.db")
    receiver = DicomReceiver(DicomConfig(port=0, fsync=fsync, fast_paths=fast_paths), spool, sink)
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


def run_ours_plain(files: list[Path], work: Path) -> float:
    return run_ours(files, work, fast_paths=False)


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


def measure(variants: dict, base: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds per run of each variant; the variants take turns (noise on this machine hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, (fn, files) in variants.items():
            work = Path(tempfile.mkdtemp(dir=base))
            try:
                times[name].append(fn(files, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return times


def rates(amount: float, seconds: list[float]) -> dict[str, float | list[float]]:
    return {"best": round(amount / min(seconds), 1), "median": round(amount / statistics.median(seconds), 1),
            "seconds": [round(t, 3) for t in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: system temp)")
    parser.add_argument("--compare-fast-paths", action="store_true",
                        help="also run ours with dicom.fast_paths: false (ours_plain)")
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
        variants = {
            "small_ours": (run_ours, small), "small_storescp": (run_storescp, small),
            "small_ours_nofsync": (run_ours_nofsync, small),
            "large_ours": (run_ours, [large]), "large_storescp": (run_storescp, [large]),
            "large_ours_nofsync": (run_ours_nofsync, [large]),
        }
        if args.compare_fast_paths:
            variants |= {"small_ours_plain": (run_ours_plain, small), "large_ours_plain": (run_ours_plain, [large])}
        times = measure(variants, base, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    kinds = ("ours", "storescp", "ours_nofsync", *(("ours_plain",) if args.compare_fast_paths else ()))
    small_rates = {k: rates(args.small, times[f"small_{k}"]) for k in kinds}
    large_rates = {k: rates(large_mb, times[f"large_{k}"]) for k in kinds}
    target_small = 200
    result = {
        "small": {
            "instances": args.small,
            "mean_kb": round(small_bytes / args.small / 1e3, 1),
            "instances_per_s": small_rates,
            "mb_per_s": {k: rates(small_bytes / 1e6, times[f"small_{k}"])["best"] for k in small_rates},
        },
        "large": {
            "mb": round(large_mb, 1),
            "hours": args.hours,
            "channels": args.channels,
            "mb_per_s": large_rates,
            "instances_per_s": {k: rates(1, times[f"large_{k}"])["best"] for k in large_rates},
        },
        "targets": {
            "small_ours_instances_per_s_min": target_small,
            "small_met_best": small_rates["ours"]["best"] >= target_small,
            "small_met_median": small_rates["ours"]["median"] >= target_small,
            "large_ours_mb_per_s_at_least_storescp_best": large_rates["ours"]["best"] >= large_rates["storescp"]["best"],
            "large_ours_mb_per_s_at_least_storescp_median":
                large_rates["ours"]["median"] >= large_rates["storescp"]["median"],
        },
        "options": {
            "ours": "fsync=true (file and folder fsynced before Success), sqlite sink (WAL, synchronous=NORMAL, "
                    "commit per instance), max PDU unlimited, fast_paths=true; ours_nofsync: same with "
                    "fsync=false; ours_plain (--compare-fast-paths): same with fast_paths=false",
            "ours_fsync": True,
            "storescp": "storescp " + " ".join(STORESCP_OPTS) + " -aet STORESCP -od DIR PORT (no fsync option)",
            "storescu": "storescu " + " ".join(STORESCU_OPTS) + " -aet BENCH -aec AEC 127.0.0.1 PORT FILES..., "
                        "env TCP_NODELAY=1",
            "repeat": args.repeat,
            "measure": "wall time of storescu (until the last response and release); variants take turns",
            "cpus": os.cpu_count(),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
