"""Benchmark: the archive batch path (``psg-gateway batch``) on one GPU box, per precision.

Writes N synthetic nights, then runs them through the product's batch runner (``BatchRunner``, the
local backend: hashing, decode and preprocess in CPU worker processes, the engine in the runner's
process batching encoder windows across studies; SQLite in a temporary folder, HL7 off, results held)
once per precision, each run in its own child process (so peak GPU memory and RSS are its own). The
target: >= 10,000 nights/hour on one H100 with 16 cores, where decoding ~250 MB per 8-hour
night is the expected bound. Prints one JSON document:

* ``machine``: CPU model, cores, the CPU flags that decide bf16 on CPU (avx2, avx512f, avx512_bf16,
  amx), torch's version, the CUDA device;
* ``runs[precision]``: wall time of the batch run (discovery to summary, archive generation and
  model loading excluded), ``nights_per_hour`` (N * 3600 / wall), the worker processes and nights per
  engine call the runner used, seconds per night by stage (``stage_meaning`` says what each is and
  where it runs), each stage's ``share_of_wall`` (its seconds over the wall time times the processes
  it runs in), the engine thread's time (busy in engine calls; starting up until the first prepared
  night came back; waiting on the workers after that; ``own_thread``: the engine ran in a thread of its
  own, a second call queued, while the runner recorded the finished nights and drew their reports, as
  the batch does on CUDA, ``--engine-thread on|off`` to choose), peak GPU memory
  (``torch.cuda.max_memory_allocated``; null on CPU), GPU utilisation (``nvidia-smi`` every 0.5 s;
  null without it), peak RSS, and ``limiting_stage``;
* ``deviations[precision]``: each reduced-precision run's outputs against the fp32 run's, night by
  night (log-hazards, stage probabilities and the hypnogram's agreement, night and token embeddings);
* ``limiting_stage``: the fp32 run's (else the first run's).

A ``limiting_stage`` is the stage with the largest share of the wall time, except that when the
engine's thread, once started, spent more time waiting on the worker processes than in engine calls,
the workers limit and it is the largest of their stages (hash, decode, preprocess, spill). The
per-stage seconds come from the runner's own records (the batch summary's hash/decode/store, the
workers' read/preprocess/quality split, the engine's encode/heads per night); the engine calls, the
report and the waits are timed by this script around the runner's methods, without changing them.

Usage::

    python bench/bench_gpu.py [--nights 48] [--hours 8] [--device cuda|cpu|auto]
        [--precision fp32,bf16,fp16] [--workers W] [--windows-per-batch K] [--nights-per-call M]
        [--no-report] [--engine-thread auto|on|off] [--keep DIR]

``python bench/bench_gpu.py --device cpu --nights 2 --hours 0.1`` is a smoke test (under a minute).

Caveats: the nights are read from the page cache (just written), not from an archive's storage; the
wall time includes the batch's own start-up (worker processes, the engine's first batch), which
``steady_nights_per_hour`` leaves out (first to last night finished); writing the archive takes ~20 s
of one core per 8-hour night and ~235 MB of disk (``--keep DIR`` keeps and reuses it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRECISIONS = ("fp32", "bf16", "fp16")  # inference.engine.PRECISIONS, in the order they run

# What each stage's seconds are (seconds per night, summed over the processes that ran it).
STAGE_MEANING = {
    "hash": "SHA-256 of the file for the dedupe (worker processes; a thread when workers = 0)",
    "decode": "open the file and decode its samples (reader header + Channel.read of every mapped channel)",
    "preprocess": "filter and resample to 128 Hz, gap masks, and the signal-quality measures",
    "spill": "writing the prepared signals to the shared-memory spill file (worker processes only)",
    "check": "the engine call's time outside encode and heads: mapping the spilled signals and checking them "
             "(shapes, every sample finite) before the encoder",
    "encode": "the encoder (tokenizer, channel pooling, transformer) over all windows of an engine call, "
              "divided evenly among its nights, including host-device copies",
    "heads": "staging, diagnosis head, modality attribution and site heads for the night",
    "store": "writing the outputs (embeddings, hypnogram, hazards, metrics.json) and their database rows",
    "report": "report.html + report.pdf (pipeline.write_report; --no-report turns it off)",
    "record": "the rest of the engine thread's work per night: state commits, flag policy, bookkeeping",
}
WORKER_STAGES = ("hash", "decode", "preprocess", "spill")
# Disk per night-hour: the synthetic EDF (the bench channels, 16-bit) and one run's outputs (token
# embeddings of four modalities, reports): ~235 MB and ~16 MB for an 8-hour night.
EDF_MB_PER_HOUR = 29.5
OUTPUT_MB_PER_HOUR = 2.0


# ---- the archive --------------------------------------------------------------------------------
def _write(args: tuple[str, float, int]) -> str:
    from gateway.synthetic.night import write_synthetic_night

    path, hours, seed = args
    write_synthetic_night(Path(path), hours=hours, seed=seed)
    return path


def make_archive(folder: Path, nights: int, hours: float) -> list[Path]:
    """N different nights (seed i: the batch's dedupe must not see copies), written in parallel;
    nights already there (``--keep``) are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"night{i:05d}.edf"), hours, i) for i in range(nights)]
    todo = [j for j in jobs if not Path(j[0]).exists()]
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            list(pool.map(_write, todo))
    return [Path(j[0]) for j in jobs]


# ---- a child: one batch run at one precision ------------------------------------------------------
class GpuSampler:
    """``nvidia-smi``'s utilisation.gpu every ``interval_s`` in a thread, for the device the run uses."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-nvidia-smi", daemon=True)

    def _command(self) -> list[str]:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        # nvidia-smi counts every GPU; torch's cuda:0 is the first visible one.
        return [*cmd, f"--id={visible if visible.isdigit() else 0}"]

    def _run(self) -> None:
        cmd = self._command()
        while not self._stop.is_set():
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return  # no usable nvidia-smi: the run reports null, not a partial guess
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, float | int] | None:
        if not self.samples:
            return None
        return {"mean_pct": round(sum(self.samples) / len(self.samples), 1), "max_pct": max(self.samples),
                "samples": len(self.samples)}


def timed_runner_class() -> type:
    """``BatchRunner`` with stopwatches on the seams the summary does not time: what the workers send
    back (read/preprocess/quality split, their own time), the engine calls, the steps after them."""
    from gateway.batch.runner import BatchRunner

    class TimedRunner(BatchRunner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.clock: dict[str, float] = {k: 0.0 for k in ("read", "preprocess", "quality", "worker", "encode",
                                                               "heads", "engine_busy", "after_engine", "report",
                                                               "wait")}
            self.started_at = 0.0  # the loop's start (perf_counter)
            self.first_ready: tuple[float, float] | None = None  # (when, waited until then): the start-up
            self.finished_at: list[float] = []  # when each night's last step ended (perf_counter)

        def _backend(self) -> Any:
            backend = super()._backend()
            engine = backend.engine
            run_many = engine.run_many

            def timed_run_many(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()  # in whichever thread runs the engine (this one, or its own)
                try:
                    return run_many(*args, **kwargs)
                finally:
                    self.clock["engine_busy"] += time.perf_counter() - t0

            engine.run_many = timed_run_many
            return backend

        def _loop(self, entries: list, bar: Any) -> None:
            report = self.pipeline._report

            def timed_report(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return report(*args, **kwargs)
                finally:
                    self.clock["report"] += time.perf_counter() - t0

            self.pipeline._report = timed_report
            self.started_at = time.perf_counter()
            super()._loop(entries, bar)

        def _prepared(self, entry: Any, outcome: Any) -> None:
            from gateway.batch.work import Prepared

            if self.first_ready is None:  # until now the engine could only wait for the workers to start
                self.first_ready = (time.perf_counter(), self.clock["wait"])
            if isinstance(outcome, Prepared):
                for k in ("read", "preprocess", "quality"):
                    self.clock[k] += outcome.ready.timings_s.get(k, 0.0)
                self.clock["worker"] += outcome.timings.get("worker_s", 0.0)
            super()._prepared(entry, outcome)

        def _inferred(self, entry: Any, prepared: Any, outcome: Any) -> None:
            if not isinstance(outcome, BaseException):
                self.clock["encode"] += outcome.timings_s.get("encode", 0.0)
                self.clock["heads"] += outcome.timings_s.get("heads", 0.0)
            t0 = time.perf_counter()
            try:
                super()._inferred(entry, prepared, outcome)
            finally:
                self.finished_at.append(time.perf_counter())
                self.clock["after_engine"] += self.finished_at[-1] - t0

    return TimedRunner


@contextmanager
def timed_waits(clock: dict[str, float]):
    """Time the runner's ``wait`` on its futures: the engine's thread with nothing to do but wait for
    the hashing and preparing workers (the local backend's engine futures are done when returned)."""
    import gateway.batch.runner as runner_module

    original = runner_module.wait

    def wait(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            clock["wait"] = clock.get("wait", 0.0) + time.perf_counter() - t0

    runner_module.wait = wait
    try:
        yield
    finally:
        runner_module.wait = original


def _write_config(work: Path, args: argparse.Namespace) -> Path:
    import yaml

    model: dict[str, Any] = {"device": args.device, "precision": args.precision}
    if args.windows_per_batch:
        model["windows_per_batch"] = args.windows_per_batch
    doc = {"paths": {"var_dir": str(work / "var")}, "logging": {"level": "warning"}, "model": model,
           "hl7": {"enabled": False}, "pipeline": {"write_report": not args.no_report},
           "batch": {"nights_per_call": args.nights_per_call or 0}}
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _outputs_by_file(runner: Any) -> dict[str, str]:
    """Input file name -> the study's output folder: how runs at two precisions are matched."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from gateway.store.models import Study

    with Session(runner.db) as session:
        rows = session.execute(select(Study.input_name, Study.output_path)
                               .where(Study.batch_run_id == runner.run_id, Study.output_path.is_not(None)))
        return {name: path for name, path in rows}


def _stages(runner: Any, clock: dict[str, float], processed: int) -> dict[str, float]:
    """Seconds per night by stage (see STAGE_MEANING); the summary's tally gives hash, decode, store."""
    tally = runner.tally.stage_seconds
    after = clock["after_engine"]
    totals = {
        "hash": tally.get("hash", 0.0),
        "decode": tally.get("decode", 0.0) + clock["read"],  # decode_s: reader setup; read: the samples
        "preprocess": clock["preprocess"] + clock["quality"],
        # map_s covers read + preprocess + quality; the worker's remaining time is the spill file
        "spill": max(0.0, clock["worker"] - tally.get("decode", 0.0) - tally.get("map", 0.0)),
        "check": max(0.0, clock["engine_busy"] - clock["encode"] - clock["heads"]),
        "encode": clock["encode"],
        "heads": clock["heads"],
        "store": tally.get("store", 0.0),
        "report": clock["report"],
        "record": max(0.0, after - tally.get("store", 0.0) - clock["report"]),
    }
    return {k: round(v / processed, 4) for k, v in totals.items()} if processed else {}


def _shares(stages: dict[str, float], processed: int, wall: float, workers: int) -> dict[str, float]:
    """Each stage's seconds over the capacity it had: the wall time times the processes it ran in."""
    out = {}
    for stage, per_night in stages.items():
        lanes = workers if stage in WORKER_STAGES and workers else 1
        out[stage] = round(per_night * processed / (wall * lanes), 3) if wall > 0 else 0.0
    return out


def limiting_stage(shares: dict[str, float], engine: dict[str, float], workers: int) -> tuple[str | None, str]:
    """The stage that bounds the rate, and why (see the module's docstring)."""
    if not shares:
        return None, "no night processed"
    if workers and engine["waiting_share"] > engine["busy_share"]:
        stage = max(WORKER_STAGES, key=lambda s: shares.get(s, 0.0))
        return stage, (f"the engine's thread waited on the workers {engine['waiting_share']:.0%} of the wall "
                       f"time (busy {engine['busy_share']:.0%}); {stage} is their largest stage")
    stage = max(shares, key=lambda s: shares[s])
    return stage, f"largest share of the wall time ({shares[stage]:.0%})"


def steady_rate(finished_at: list[float]) -> float | None:
    """Nights per hour between the first and the last night finished: the rate without the start-up
    (worker processes spawning, the engine's first batch, the pipeline filling)."""
    if len(finished_at) < 2 or finished_at[-1] <= finished_at[0]:
        return None
    return round(3600 * (len(finished_at) - 1) / (finished_at[-1] - finished_at[0]), 1)


def _gpu_memory(device: str) -> dict[str, float] | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return {"max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "max_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


def child_run(archive: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from gateway.batch.runner import BatchOptions
    from gateway.config import load_config

    work.mkdir(parents=True, exist_ok=True)
    if args.engine_thread != "auto":  # the backend's own choice is the engine's own thread on CUDA only
        import functools

        import gateway.batch.runner as runner_module

        runner_module.LocalBackend = functools.partial(runner_module.LocalBackend,
                                                       engine_thread=args.engine_thread == "on")
    runner = timed_runner_class()(load_config(_write_config(work, args)),
                                  BatchOptions(archives=[archive], progress=False, workers=args.workers))
    runner.preflight()  # loads the model: not part of the timed run
    if args.device == "cuda":  # the CUDA context (seconds) is a process's, not the batch's, start-up cost
        import torch

        torch.zeros(1, device="cuda")
    sampler = GpuSampler() if args.device == "cuda" else None
    with warnings.catch_warnings(record=True) as caught, sampler or nullcontext(), timed_waits(runner.clock):
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        outcome = runner.run()
        wall = time.perf_counter() - t0
    try:
        return _child_result(runner, outcome, wall, sampler, args, sorted({str(w.message) for w in caught}))
    finally:
        runner.close()


def engine_thread(runner: Any, wall: float) -> dict[str, float]:
    """The engine's thread: busy in engine calls, starting up (until the first prepared night came back:
    worker processes spawning and importing, the first decode), and waiting on the workers after that."""
    clock = runner.clock
    ready_at, waited_before = runner.first_ready or (runner.started_at, 0.0)
    waited = clock["wait"] - waited_before
    own_thread = getattr(runner.backend, "engine_thread", None) is not None
    if own_thread:  # the loop's waits include the engine's calls: its idle time after start-up instead
        waited = max(0.0, wall - (ready_at - runner.started_at) - clock["engine_busy"])
    return {"own_thread": own_thread, "busy_s": round(clock["engine_busy"], 3),
            "startup_s": round(ready_at - runner.started_at, 3),
            "waiting_on_workers_s": round(waited, 3),
            "busy_share": round(clock["engine_busy"] / wall, 3) if wall else 0.0,
            "waiting_share": round(waited / wall, 3) if wall else 0.0}


def _child_result(runner: Any, outcome: Any, wall: float, sampler: GpuSampler | None,
                  args: argparse.Namespace, warned: list[str]) -> dict[str, Any]:
    studies = outcome.summary["studies"]
    processed = studies.get("processed", 0)
    workers = runner.backend.workers
    stages = _stages(runner, runner.clock, processed)
    shares = _shares(stages, processed, wall, workers)
    engine = engine_thread(runner, wall)
    stage, why = limiting_stage(shares, engine, workers)
    device = str(runner.backend.engine.device)
    return {
        "precision": args.precision,
        "device": device,
        "nights": processed,
        "failed": studies.get("failed", 0),
        "failures": outcome.summary["failures_by_reason"],
        "status": outcome.status,
        "wall_s": round(wall, 3),
        "nights_per_hour": round(3600 * processed / wall, 1) if wall > 0 else 0.0,
        "steady_nights_per_hour": steady_rate(runner.finished_at),
        "workers": workers,
        "nights_per_call": runner.nights_per_call,
        "windows_per_batch": runner.backend.engine.windows_per_batch,
        # /dev/shm, or a folder on disk when /dev/shm lacks room for the queue (then the spill is disk I/O)
        "spill_dir": str(runner.backend.spill_dir) if runner.backend.spill_dir else None,
        "stage_seconds_per_night": stages,
        "share_of_wall": shares,
        "engine_thread": engine,
        "limiting_stage": stage,
        "limiting_reason": why,
        "gpu_memory": _gpu_memory(device),
        "gpu_utilisation": sampler.summary() if sampler is not None else None,
        "peak_rss_mb": {
            "engine_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            # the workers are this process's only children (waited for when the pool shuts down)
            "largest_worker": (round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
                               if workers else None),
        },
        "warnings": warned,
        "outputs": _outputs_by_file(runner),
    }


# ---- reduced precision against fp32 -------------------------------------------------------------
def _hazards(folder: Path) -> dict[str, float]:
    from gateway.pipeline.outputs import read_hazards

    return {f"{r.head}:{r.index}": r.log_hazard for r in read_hazards(folder) or []}


def _hypnogram(folder: Path) -> tuple[list[str], list[list[float]]]:
    from inference.results import STAGES

    path = folder / "hypnogram.csv"
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["stage"] for r in rows], [[float(r[f"p_{s}"]) for s in STAGES] for r in rows]


def _max_abs(a: Any, b: Any) -> float:
    """Largest |a - b| where both are finite; inf when the arrays differ in shape or in where NaN is
    (a missing modality is NaN in the night vector of both runs, or it is a real difference)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return math.inf
    finite = ~np.isnan(a)
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))


def compare_night(base: Path, other: Path) -> dict[str, float | None]:
    """One night's outputs at a reduced precision against the fp32 outputs of the same night."""
    import numpy as np

    h0, h1 = _hazards(base), _hazards(other)
    s0, p0 = _hypnogram(base)
    s1, p1 = _hypnogram(other)
    night0, night1 = np.load(base / "night.npy"), np.load(other / "night.npy")
    tokens, token_scale = [], 0.0
    for f in sorted((base / "embeddings").glob("*.npy")):
        if not f.stem.endswith("_5min"):  # the token embeddings (the 5-min ones are their means)
            t0 = np.load(f)
            tokens.append(_max_abs(t0, np.load(other / "embeddings" / f.name)))
            token_scale = max(token_scale, float(np.max(np.abs(t0), initial=0.0)))
    scale = float(np.nanmax(np.abs(night0))) if np.isfinite(night0).any() else 0.0
    night_dev = _max_abs(night0, night1)
    token_dev = max(tokens, default=None)
    return {
        "log_hazard_max_abs": (_max_abs([h0[k] for k in sorted(h0)], [h1.get(k, math.nan) for k in sorted(h0)])
                               if h0 else None),
        "staging_prob_max_abs": _max_abs(p0, p1) if p0 else None,
        "hypnogram_agreement": (sum(a == b for a, b in zip(s0, s1)) / len(s0)
                                if s0 and len(s0) == len(s1) else None),
        "night_embedding_max_abs": night_dev,
        "night_embedding_max_rel": night_dev / scale if scale else None,
        "token_embedding_max_abs": token_dev,
        "token_embedding_max_rel": token_dev / token_scale if token_dev is not None and token_scale else None,
    }


def deviations(base: dict[str, str], other: dict[str, str]) -> dict[str, Any]:
    """Per-night comparisons reduced over the nights both runs processed: the worst deviation, and the
    lowest and mean hypnogram agreement."""
    common = sorted(set(base) & set(other))
    nights = [compare_night(Path(base[n]), Path(other[n])) for n in common]
    out: dict[str, Any] = {"nights_compared": len(nights)}
    for key in ("log_hazard_max_abs", "staging_prob_max_abs", "night_embedding_max_abs",
                "night_embedding_max_rel", "token_embedding_max_abs", "token_embedding_max_rel"):
        values = [n[key] for n in nights if n[key] is not None]
        out[key] = _json_float(max(values)) if values else None
    agreement = [n["hypnogram_agreement"] for n in nights if n["hypnogram_agreement"] is not None]
    out["hypnogram_agreement_min"] = round(min(agreement), 4) if agreement else None
    out["hypnogram_agreement_mean"] = round(sum(agreement) / len(agreement), 4) if agreement else None
    return out


def _json_float(x: float) -> float | str:
    """JSON has no infinity: a shape or NaN-pattern mismatch is reported as the string "mismatch"."""
    return float(f"{x:.6g}") if math.isfinite(x) else "mismatch"


# ---- the parent ---------------------------------------------------------------------------------
def cpu_info() -> dict[str, Any]:
    """CPU model, usable cores and the flags that decide how bf16 runs on this CPU."""
    from gateway.cpu import cpu_budget, cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    return {"cpu": model or platform.processor() or None, "cores": cpu_budget().logical,
            "cpu_flags": {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                          "avx512_bf16": "avx512_bf16" in flags,
                          "amx": sorted(f for f in flags if f.startswith("amx"))}}


def machine_info(device: str) -> dict[str, Any]:
    import torch

    from inference.engine import cpu_has_native_bf16

    return {**cpu_info(), "torch": torch.__version__, "cpu_native_bf16": cpu_has_native_bf16(),
            "cuda_device": torch.cuda.get_device_name(0) if device == "cuda" else None}


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    return name


def choose_precisions(requested: str | None, device: str) -> tuple[list[str], list[str]]:
    """The precisions to run (fp32 first: the baseline of the deviations) and a note per one left out."""
    from inference.engine import cpu_has_native_bf16

    explicit = requested is not None
    names = [p.strip() for p in requested.split(",") if p.strip()] if explicit else (
        list(PRECISIONS) if device == "cuda" else ["fp32", "bf16"])
    unknown = sorted(set(names) - set(PRECISIONS))
    if unknown:
        raise SystemExit(f"--precision: unknown {unknown}; use some of {list(PRECISIONS)}")
    chosen, notes = [], []
    for p in sorted(set(names), key=PRECISIONS.index):
        if p == "fp16" and device != "cuda":
            notes.append("fp16 skipped: the engine runs fp16 on CUDA only")
        elif p == "bf16" and device == "cpu" and not cpu_has_native_bf16():
            if explicit:
                notes.append("bf16 on a CPU without AVX512-BF16/AMX: emulated, its speed means nothing")
                chosen.append(p)
            else:
                notes.append("bf16 skipped: no native bf16 on this CPU (emulated, several times slower); "
                             "name it in --precision to run it anyway")
        else:
            chosen.append(p)
    return chosen, notes


def _in_child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_args(args: argparse.Namespace, archive: Path, work: Path, precision: str, device: str) -> list[str]:
    out = ["--child", "--archive", str(archive), "--work", str(work), "--device", device, "--precision", precision]
    for flag, value in (("--workers", args.workers), ("--windows-per-batch", args.windows_per_batch),
                        ("--nights-per-call", args.nights_per_call)):
        if value is not None:
            out += [flag, str(value)]
    return out + (["--no-report"] if args.no_report else []) + ["--engine-thread", args.engine_thread]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=48, help="nights in the archive (~235 MB each at 8 h)")
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--device", choices=["cuda", "cpu", "auto"], default="auto")
    parser.add_argument("--precision", help="comma-separated, of fp32,bf16,fp16 (default: all three on CUDA, "
                                            "fp32,bf16 on CPU, bf16 only where the CPU runs it natively)")
    parser.add_argument("--workers", type=int, help="decode/preprocess processes (default: batch.workers, auto)")
    parser.add_argument("--windows-per-batch", type=int, help="encoder windows per forward pass "
                                                              "(default: the engine's, 64 on CUDA, 4 on CPU)")
    parser.add_argument("--nights-per-call", type=int, help="nights per engine call (default: the batch's, "
                                                            "4 on a GPU, 1 on CPU)")
    parser.add_argument("--no-report", action="store_true", help="pipeline.write_report off (no HTML/PDF)")
    parser.add_argument("--engine-thread", choices=["auto", "on", "off"], default="auto",
                        help="the engine in its own thread, a second call queued, while the runner records "
                             "and draws reports (auto: on for CUDA, as the batch chooses)")
    parser.add_argument("--keep", type=Path, help="keep the archive and the runs' outputs here (archive reused)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--archive", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nights < 1 or args.hours <= 0:
        parser.error("--nights must be >= 1 and --hours > 0")
    return args


def check_disk(root: Path, nights: int, hours: float, runs: int) -> None:
    """Stop before writing an archive the disk cannot hold (a full disk mid-run measures nothing)."""
    need_mb = nights * hours * (EDF_MB_PER_HOUR + runs * OUTPUT_MB_PER_HOUR)
    free_mb = shutil.disk_usage(root).free / 2**20
    if need_mb > 0.9 * free_mb:
        raise SystemExit(f"{nights} nights of {hours:g} h need ~{need_mb:,.0f} MB; {root} has {free_mb:,.0f} MB free")


def run_all(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    precisions, notes = choose_precisions(args.precision, device)
    root.mkdir(parents=True, exist_ok=True)
    check_disk(root, args.nights, args.hours, len(precisions))
    t0 = time.perf_counter()
    archive = root / f"archive-{args.nights}x{args.hours:g}h"
    make_archive(archive, args.nights, args.hours)
    generated_s = time.perf_counter() - t0
    runs: dict[str, dict[str, Any]] = {}
    for p in precisions:
        work = root / "runs" / p
        shutil.rmtree(work, ignore_errors=True)  # a kept run folder would count every study as done
        runs[p] = _in_child(_child_args(args, archive, work, p, device))
    outputs = {p: r.pop("outputs") for p, r in runs.items()}
    devs = {p: deviations(outputs["fp32"], outputs[p]) for p in precisions if p != "fp32" and "fp32" in outputs}
    if len(precisions) > 1 and "fp32" not in outputs:
        notes.append("no fp32 run: no deviations computed")
    headline = runs.get("fp32") or next(iter(runs.values()), {})
    return {
        "benchmark": f"psg-gateway batch over {args.nights} synthetic {args.hours:g}-h nights, per precision",
        "machine": machine_info(device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("child", "archive", "work")},
        "device": device,
        "precisions_run": precisions,
        "notes": notes,
        "archive_generation_s": round(generated_s, 2),
        "stage_meaning": STAGE_MEANING,
        "runs": runs,
        "deviations": devs,
        "limiting_stage": headline.get("limiting_stage"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_run(args.archive, args.work, args)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="psg-bench-gpu-"))
    try:
        print(json.dumps(run_all(args, args.keep or tmp), indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
