"""Benchmark: ``psg-gateway batch`` over N synthetic 8-hour nights against the single-night rate.

Prints one JSON document. All runs are child processes of this one (so each peak RSS is its own):

* ``single``: the single-night benchmark's product path (``bench_night.py``'s ``ours-fp32``: read,
  preprocess, encode and heads of one night in one process), the baseline the issue names: its
  rate is ``3600 / seconds`` nights/hour;
* ``batch-N``: the batch runner (local backend, its default workers and queue, SQLite, outputs
  written, every state committed) over N nights, for N = 3 and N = 12 (``--nights``): nights/hour
  from the run's wall time, peak RSS of the engine's process and of the worker processes;
* ``batch_3_one_worker_process``: the 3 nights with ``--workers 1`` (decode/preprocess in a worker
  process beside the engine), the choice the default makes only with a GPU or more than 4 cores.

The target (issue 7): the 12-night batch at >= 90 % of the single-night rate, and peak RSS that does
not grow with N.

Usage: ``python bench/bench_batch.py [--nights 12] [--hours 8] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _write(args: tuple[str, float, int]) -> str:
    from gateway.synthetic.night import write_synthetic_night

    path, hours, seed = args
    write_synthetic_night(Path(path), hours=hours, seed=seed)
    return path


def make_archive(folder: Path, nights: int, hours: float) -> list[Path]:
    """N different nights (different seeds: the batch's dedupe must not see copies)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"night{i:02d}.edf"), hours, 100 + i) for i in range(nights)]
    todo = [j for j in jobs if not Path(j[0]).exists()]
    with ProcessPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        list(pool.map(_write, todo))
    return [Path(j[0]) for j in jobs]


def child_batch(archive: Path, work: Path, workers: int | None = None) -> dict:
    import yaml

    from gateway.batch.runner import BatchOptions, BatchRunner
    from gateway.config import load_config

    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "gateway.yaml"
    cfg_path.write_text(yaml.safe_dump({"paths": {"var_dir": str(work / "var")}, "logging": {"level": "warning"}}))
    runner = BatchRunner(load_config(cfg_path), BatchOptions(archives=[archive], progress=False,
                                                                       workers=workers))
    runner.preflight()
    t0 = time.perf_counter()
    outcome = runner.run()
    wall = time.perf_counter() - t0
    runner.close()
    n = outcome.summary["studies"].get("processed", 0)
    return {
        "nights": n,
        "failed": outcome.summary["studies"].get("failed", 0),
        "wall_s": round(wall, 2),
        "seconds_per_night": round(wall / n, 3) if n else None,
        "nights_per_hour": round(3600 * n / wall, 1) if n else 0.0,
        "workers": runner.backend.workers,
        "stage_seconds_per_night": outcome.summary["stage_seconds_per_study"],
        "peak_rss_mb": {
            "engine_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        },
    }


def _in_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nights", type=int, default=12)
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--keep", type=Path, help="keep the generated archive here (reused when present)")
    parser.add_argument("--child", choices=["batch", "single"], help=argparse.SUPPRESS)
    parser.add_argument("--archive", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "batch":
        print(json.dumps(child_batch(args.archive, args.work, args.workers)))
        return
    if args.child == "single":  # bench_night.py's ours-fp32 path on one of the nights
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_night import child_ours

        print(json.dumps(child_ours(args.archive, "fp32", None)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="psg-bench-batch-"))
    archive_root = args.keep or tmp / "archive"
    try:
        t0 = time.perf_counter()
        nights = make_archive(archive_root / "all", args.nights, args.hours)
        small = archive_root / "small"
        small.mkdir(exist_ok=True)
        for p in nights[:3]:  # the same 3 nights, hard-linked: a smaller archive for the RSS comparison
            if not (small / p.name).exists():
                os.link(p, small / p.name)
        generated_s = time.perf_counter() - t0

        single = _in_child(["--child", "single", "--archive", str(nights[0])])
        batch_small = _in_child(["--child", "batch", "--archive", str(small), "--work", str(tmp / "w3")])
        batch_all = _in_child(["--child", "batch", "--archive", str(archive_root / "all"),
                               "--work", str(tmp / f"w{args.nights}")])
        # The alternative the default rejects on a small CPU machine: one worker process beside the engine.
        batch_worker = _in_child(["--child", "batch", "--archive", str(small), "--work", str(tmp / "w3p"),
                                  "--workers", "1"])
        single_rate = 3600.0 / single["seconds"]["total"]
        doc = {
            "benchmark": f"psg-gateway batch over {args.nights} synthetic {args.hours:g}-h nights vs one night",
            "cpu_cores": len(os.sched_getaffinity(0)),
            "archive_generation_s": round(generated_s, 1),
            "single_night": {"seconds": single["seconds"]["total"], "nights_per_hour": round(single_rate, 1),
                             "peak_rss_mb": single["peak_rss_mb"]},
            "batch_3": batch_small,
            f"batch_{args.nights}": batch_all,
            "batch_3_one_worker_process": batch_worker,
            "rate_vs_single": round(batch_all["nights_per_hour"] / single_rate, 3),
            "target_rate_vs_single": 0.9,
            "rss_growth_3_to_n_mb": round(batch_all["peak_rss_mb"]["engine_process"]
                                          - batch_small["peak_rss_mb"]["engine_process"], 1),
        }
        print(json.dumps(doc, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
