"""Benchmark: the engine's thread count and OpenMP wait policy, on an idle and on a busy machine.

Why ``gateway.cpu`` chooses what it does. One synthetic night is read and preprocessed once per child;
each child then encodes it and applies the heads (``Engine.run``, best of ``--repeat``) with

* ``threads``: 1 and the physical cores this process may use (``gateway.cpu.cpu_budget``);
* ``OMP_WAIT_POLICY``: ``PASSIVE``, ``ACTIVE`` and unset (the OpenMP runtime's default), set before
  torch loads in a fresh process; and ``spin:N``, unset with ``GOMP_SPINCOUNT=N`` (GNU OpenMP, which
  torch's wheels use: a waiting thread spins N rounds, then sleeps), for each N of ``--spincounts``
  (``spin:3000`` is what the command line sets);
* ``load``: ``idle``, and ``busy`` with ``--busy N`` CPU-bound processes (default: one per physical
  core less one) running beside it -- a shared machine, or the batch's own worker processes.

Prints one JSON document: the machine (CPU model, flags of interest, cores), and per case the
seconds of ``Engine.run``. The busy case is where spinning OpenMP threads hurt: a thread that waits
spins on its core while the thread it waits for is descheduled.

Usage: ``python bench/bench_threads.py [--hours 1] [--repeat 2] [--busy N] [--spincounts 3000,30000]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = ("PASSIVE", "ACTIVE", None)


def _bundle_dir() -> Path:
    ref = ROOT.parent / "shared" / "reference" / "sleepfm"
    if ref.is_dir():
        return ref
    from inference.bundle import ensure_demo_bundle

    return ensure_demo_bundle()


def child(edf: Path, threads: int, repeat: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from gateway.montage.table import default_table
    from gateway.pipeline.prepare import prepare_study
    from gateway.readers.edf import read_edf
    from inference.bundle import load_bundle
    from inference.engine import Engine, EngineOptions

    engine = Engine(load_bundle(_bundle_dir()), EngineOptions(threads=threads))
    study = prepare_study(read_edf(edf), default_table()).engine_input
    engine.run(study)  # warm: first-call allocations and oneDNN primitive creation
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        engine.run(study)
        best = min(best, time.perf_counter() - t0)
    return {"threads": threads, "seconds": round(best, 3)}


def _spin(stop) -> None:  # a CPU-bound neighbour
    while not stop.is_set():
        sum(range(10_000))


def _machine() -> dict:
    from gateway.cpu import cpu_budget, cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    budget = cpu_budget()
    return {"cpu": model, "logical_cpus": budget.logical, "physical_cores": budget.physical,
            "cpu_quota": budget.quota, "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile"})}


def _run_child(edf: Path, threads: int, policy: str | None, repeat: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy and policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy.removeprefix("spin:")
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--child", str(edf), "--threads", str(threads),
                          "--repeat", str(repeat)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--busy", type=int, default=None, help="CPU-bound neighbours in the busy case")
    parser.add_argument("--spincounts", default="3000,30000",
                        help="GOMP_SPINCOUNT values to measure with the policy unset (comma-separated; '' for none)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.repeat)))
        return

    from gateway.synthetic.night import write_synthetic_night

    machine = _machine()
    cores = machine["physical_cores"]
    busy = args.busy if args.busy is not None else max(1, cores - 1)
    counts = sorted({1, cores})
    policies = POLICIES + tuple(f"spin:{int(n)}" for n in args.spincounts.split(",") if n.strip())
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        edf = write_synthetic_night(Path(tmp) / "night.edf", hours=args.hours, seed=0)
        for load in ("idle", "busy"):
            stop = mp.Event()
            neighbours = [mp.Process(target=_spin, args=(stop,), daemon=True)
                          for _ in range(busy if load == "busy" else 0)]
            for p in neighbours:
                p.start()
            try:
                for threads in counts:
                    for policy in policies if threads > 1 else ("PASSIVE",):
                        row = _run_child(edf, threads, policy, args.repeat)
                        results.append({"load": load, **row, "omp_wait_policy": policy or "unset"})
            finally:
                stop.set()
                for p in neighbours:
                    p.join(5)
    print(json.dumps({"benchmark": "engine threads and OpenMP wait policy", "hours": args.hours,
                      "busy_neighbours": busy, "machine": machine, "torch_threads_default": _torch_default(),
                      "results": results}, indent=2))


def _torch_default() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
