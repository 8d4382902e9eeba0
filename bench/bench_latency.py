"""Benchmark: the daemon's per-study latency, from an EDF dropped into its drop folder to the ORU^R01 at the EHR.

Whole real processes, as a site runs them: ``psg-gateway hl7 listen`` (the stand-in EHR: it ACKs every
message and writes it to ``<MSH-10>.hl7`` in a folder) and ``psg-gateway run`` (the daemon, with one drop
folder, SQLite, the report written as by default, HL7 delivery to the listener, ``flags.send_mode: always``
so that every study sends a result whatever its flags). Synthetic nights are written beforehand, then
dropped one at a time: each is copied into the drop folder under a name the folder ignores (``.part``)
and renamed to ``*.edf``; the latency is from that rename to the moment its message file appears in the
listener's folder (polled every 20 ms; the listener writes it atomically, before it answers the ACK).

Each study's latency is broken down from the daemon's JSON log lines (their ISO timestamps), its
``/metrics`` (``psg_stage_seconds`` sums, read after each study: studies run one at a time) and the
report's file time:

* ``drop_to_claimed``: the drop folder's stability wait (``stable_seconds``, deliberate, listed on its
  own as ``stable_wait_configured``) plus scan alignment, the EDF header check and the move to the spool
  (``claim_overhead`` = the rest);
* ``claimed_to_received``: hashing the file and registering the study (``study.received``);
* ``received_to_worker``: until a worker claims it (``study.claimed``);
* ``worker_to_decoded``: decode (``decode``) and channel mapping + quality gate + preprocessing (``map``),
  then the DECODED commit;
* ``decoded_to_mapped``: the MAPPED commit;
* ``mapped_to_inferred``: model inference (``infer``) and writing the outputs (``store_outputs_and_commit``);
* ``inferred_to_queued``: the flag policy and the study report (``report``, to ``report.pdf``'s mtime;
  the first study also pays the report's imports), then building and committing the ORU^R01 to the
  outbox (``message_build_and_commit``); ``flag`` is the pipeline's own seconds for it;
* ``queued_to_oru``: the outbox's drain interval plus the MLLP send, until the message file exists
  (``queued_to_delivered_log``: to the daemon's ``message.delivered`` line, after the ACK).

Usage: ``python bench/bench_latency.py [--studies 3] [--hours 1] [--bundle DIR] [--stable-seconds 1.0]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXE = Path(sys.executable).with_name("psg-gateway")
POLL_S = 0.02


def log(msg: str) -> None:
    print(f"[bench_latency] {msg}", file=sys.stderr, flush=True)


def default_bundle() -> str:
    ref = ROOT.parent / "shared" / "reference" / "sleepfm"
    return str(ref) if (ref / "model_base").is_dir() else "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    from gateway.cpu import cpu_budget, cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    return {"cpu": model or "unknown", "cores": os.cpu_count(), "usable_cores": cpu_budget().logical,
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


_SUM = re.compile(r'^psg_stage_seconds_sum\{stage="([^"]+)"\}\s+(\S+)$', re.MULTILINE)


def stage_sums(port: int) -> dict[str, float]:
    code, text = http_get(port, "/metrics")
    return {m.group(1): float(m.group(2)) for m in _SUM.finditer(text)} if code == 200 else {}


def read_events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if "timestamp" in ev:
                    ev["_t"] = datetime.fromisoformat(ev["timestamp"]).timestamp()
                    out.append(ev)
    return out


def first(events: list[dict], name: str, after: float, key: str | None = None) -> dict | None:
    for ev in events:
        if ev.get("event") == name and ev["_t"] >= after - 0.005 and (key is None or ev.get("study_key") == key):
            return ev
    return None


def stop(proc: subprocess.Popen | None, timeout: float = 60) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def breakdown(events: list[dict], t_drop: float, t_oru: float, stable_s: float, metrics: dict[str, float],
              var: Path) -> dict[str, Any]:
    """Stage seconds of the study dropped at ``t_drop`` from the daemon's log events."""
    claimed = first(events, "dropfolder.claimed", t_drop)
    received = first(events, "study.received", t_drop)
    key = received.get("study_key") if received else None
    ts: dict[str, float | None] = {"drop": t_drop}
    for label, name in (("worker", "study.claimed"), ("decoded", "study.decoded"),
                        ("mapped", "study.mapped"), ("inferred", "study.inferred"), ("queued", "study.queued")):
        ev = first(events, name, t_drop, key)
        ts[label] = ev["_t"] if ev else None
    ts["claimed"] = claimed["_t"] if claimed else None
    ts["received"] = received["_t"] if received else None
    delivered = first(events, "message.delivered", ts["queued"] or t_drop)
    ts["delivered"] = delivered["_t"] if delivered else None
    ts["oru"] = t_oru

    def span(a: str, b: str) -> float | None:
        return round(ts[b] - ts[a], 3) if ts.get(a) is not None and ts.get(b) is not None else None

    stages: dict[str, Any] = {
        "drop_to_claimed": span("drop", "claimed"),
        "stable_wait_configured": stable_s,
        "claim_overhead": None,
        "claimed_to_received": span("claimed", "received"),
        "received_to_worker": span("received", "worker"),
        "worker_to_decoded": span("worker", "decoded"),
        "decoded_to_mapped": span("decoded", "mapped"),
        "mapped_to_inferred": span("mapped", "inferred"),
        "inferred_to_queued": span("inferred", "queued"),
        "queued_to_oru": span("queued", "oru"),
        "queued_to_delivered_log": span("queued", "delivered"),
    }
    if stages["drop_to_claimed"] is not None:
        stages["claim_overhead"] = round(stages["drop_to_claimed"] - stable_s, 3)
    # Inside the spans: the pipeline's own seconds per step (its /metrics) and the report's.
    inner = {k: round(v, 3) for k, v in metrics.items()}
    if "infer" in inner and stages["mapped_to_inferred"] is not None:
        inner["store_outputs_and_commit"] = round(stages["mapped_to_inferred"] - inner["infer"], 3)
    if key and ts["inferred"] is not None:
        with contextlib.suppress(OSError):
            # From the INFERRED commit to report.pdf's mtime (both files are rendered, then written): the
            # flag decision (milliseconds) and the report (HTML + PDF); an upper bound on the report alone.
            pdf = var / "outputs" / key / "report.pdf"
            inner["report"] = round(pdf.stat().st_mtime - ts["inferred"], 3)
        if "report" in inner and ts["queued"] is not None:
            inner["message_build_and_commit"] = round(ts["queued"] - ts["inferred"] - inner["report"], 3)
    stages["within"] = inner
    return {"study_key": key, "stages_s": stages,
            "events_found": sorted(k for k, v in ts.items() if v is not None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--bundle", default=None, help="model bundle folder or 'demo' (default: the reference "
                    "SleepFM bundle in ../shared/reference/sleepfm when present, else demo)")
    ap.add_argument("--stable-seconds", type=float, default=1.0)
    ap.add_argument("--scan-interval", type=float, default=0.2)
    ap.add_argument("--drain-interval", type=float, default=1.0, help="hl7.drain_interval_seconds (default "
                    "the shipped 1 s)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per study")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    args = ap.parse_args()

    import yaml

    from gateway.synthetic.night import write_synthetic_night

    bundle = args.bundle or default_bundle()
    if bundle != "demo":
        bundle = str(Path(bundle).resolve())
    temporary = args.keep is None
    if temporary:
        root = Path(tempfile.mkdtemp(prefix="psg-bench-latency-"))
    else:
        root = args.keep.resolve()
        root.mkdir(parents=True, exist_ok=True)
    nights_dir, drop, var, inbox = root / "nights", root / "drop", root / "var", root / "ehr-inbox"
    for d in (nights_dir, drop, inbox):
        d.mkdir(parents=True, exist_ok=True)
    ehr_port, http_port = free_port(), free_port()
    cfg = {
        "site": "bench-latency",
        "paths": {"var_dir": str(var)},
        "model": {"bundle": bundle, "device": "cpu"},
        "drop_folders": [{"path": str(drop), "stable_seconds": args.stable_seconds}],
        "dicom": {"enabled": False},
        "http": {"port": http_port},
        "pipeline": {"scan_interval_seconds": args.scan_interval},  # write_report: its default (true)
        "flags": {"send_mode": "always"},
        "hl7": {"enabled": True, "host": "127.0.0.1", "port": ehr_port, "timeout_seconds": 10,
                "retry_backoff_seconds": 0.3, "retry_backoff_max_seconds": 1.0,
                "drain_interval_seconds": args.drain_interval, "mrn_assigning_authority": "HOSP"},
        "service": {"shutdown_timeout_seconds": 30, "node_name": "bench"},
        "logging": {"format": "json", "level": "info"},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    daemon_log, ehr_log = root / "daemon.log", root / "listener.log"

    log(f"writing {args.studies} synthetic night(s) of {args.hours} h in {nights_dir}")
    t = time.perf_counter()
    nights = [write_synthetic_night(nights_dir / f"night{i:02d}.edf", hours=args.hours, seed=1000 + i)
              for i in range(args.studies)]
    write_s = time.perf_counter() - t

    env = {k: v for k, v in os.environ.items() if not k.startswith("PSG")}
    listener = daemon = None
    studies: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    try:
        listener = subprocess.Popen([str(EXE), "hl7", "listen", str(inbox), "--port", str(ehr_port)], env=env,
                                    stdout=open(ehr_log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ehr_port), timeout=1):
                break
            if listener.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"listener did not start: {ehr_log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

        t_launch = time.perf_counter()
        daemon = subprocess.Popen([str(EXE), "run", "--config", str(config)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(daemon_log, "ab"))  # noqa: SIM115
        deadline = time.monotonic() + 180
        while http_get(http_port, "/healthz")[0] != 200:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon not healthy (rc {daemon.poll()}):\n"
                                   f"{daemon_log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.1)
        startup_s = time.perf_counter() - t_launch
        log(f"daemon healthy after {startup_s:.1f} s (bundle {bundle})")

        for i, night in enumerate(nights):
            seen = {p.name for p in inbox.iterdir()}
            before = stage_sums(http_port)
            part = drop / f".night{i:02d}.edf.part"
            shutil.copyfile(night, part)
            t_drop = time.time()
            os.rename(part, drop / f"night{i:02d}.edf")
            deadline = time.monotonic() + args.timeout
            oru = None
            while oru is None:
                new = [p for p in inbox.iterdir() if p.name not in seen and p.suffix == ".hl7"]
                if new:
                    oru = new[0]
                    t_oru = time.time()
                    break
                if daemon.poll() is not None:
                    raise RuntimeError(f"daemon exited {daemon.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no ORU for study {i} within {args.timeout} s:\n"
                                       f"{daemon_log.read_text(errors='replace')[-4000:]}")
                time.sleep(POLL_S)
            latency = t_oru - t_drop
            # The delivery log line and the metrics follow the file: let them land.
            time.sleep(0.5)
            after = stage_sums(http_port)
            delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
            entry = {"index": i, "latency_s": round(latency, 3), "oru_file": oru.name,
                     "oru_bytes": oru.stat().st_size}
            entry.update(breakdown(read_events(daemon_log), t_drop, t_oru, args.stable_seconds, delta, var))
            studies.append(entry)
            log(f"study {i}: {latency:.2f} s")

        lat = [s["latency_s"] for s in studies]
        result = {
            "benchmark": "bench_latency",
            "machine": machine(),
            "config": {"bundle": bundle, "hours": args.hours, "studies": args.studies,
                       "stable_seconds": args.stable_seconds, "scan_interval_seconds": args.scan_interval,
                       "hl7_drain_interval_seconds": args.drain_interval, "write_report": True,
                       "send_mode": "always", "device": "cpu"},
            "setup_s": {"write_nights": round(write_s, 2), "daemon_start_to_healthy": round(startup_s, 2)},
            "studies": studies,
            "latency_s": {"median": round(statistics.median(lat), 3), "max": round(max(lat), 3),
                          "min": round(min(lat), 3)},
        }
    finally:
        rc_daemon = stop(daemon)
        rc_listener = stop(listener, timeout=15)
        if result:
            result["exit_codes"] = {"daemon": rc_daemon, "listener": rc_listener}
        if temporary and result:
            shutil.rmtree(root, ignore_errors=True)
        elif temporary:
            log(f"failed: kept {root} for inspection")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
