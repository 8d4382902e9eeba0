"""Benchmark: one synthetic 8-hour, 18-channel PSG night through read, preprocess, encode and heads.

Prints one JSON document. Each measured path runs in its own child process so that its peak RSS
is its own:

* ``ours-fp32`` / ``ours-bf16``: the product path (streaming EDF reader, float32 preprocessing,
  batched engine);
* ``reference``: a re-creation of the public reference path as its users run it (pyedflib float64
  read of every channel, float64 filtfilt + np.interp, per-modality encoder passes with channel
  padding, 4 windows per forward, tail dropped) -- the baseline the issue names.

Usage: ``python bench/bench_night.py [--hours 8] [--skip-reference] [--repeat N]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bundle_dir() -> Path:
    ref = ROOT.parent / "shared" / "reference" / "sleepfm"
    if ref.is_dir():
        return ref
    from inference.bundle import ensure_demo_bundle

    return ensure_demo_bundle()


def child_ours(edf: Path, precision: str, save: Path | None) -> dict:
    import torch

    from gateway.montage import default_table
    from gateway.prepare import prepare_study
    from gateway.readers.edf import read_edf
    from inference.bundle import load_bundle
    from inference.engine import Engine, EngineOptions

    engine = Engine(load_bundle(_bundle_dir()), EngineOptions(precision=precision))
    rss_loaded = _peak_rss_mb()
    t0 = time.perf_counter()
    recording = read_edf(edf)
    t_open = time.perf_counter() - t0
    prepared = prepare_study(recording, default_table())
    result = engine.run(prepared.study)
    total = time.perf_counter() - t0
    if save is not None:
        np.savez(save, hazards=result.hazards.log_hazard, probs=result.staging.token_probs,
                 **{f"tok_{m}": v for m, v in result.token_embeddings.items()})
    n_tokens = result.n_tokens * len(result.modalities)
    return {
        "precision": precision,
        "threads": torch.get_num_threads(),
        "windows_per_batch": engine.windows_per_batch,
        "seconds": {
            "read": round(t_open + prepared.timings_s["read"], 3),
            "preprocess": round(prepared.timings_s["preprocess"], 3),
            "encode": round(result.timings_s["encode"], 3),
            "heads": round(result.timings_s["heads"], 3),
            "total": round(total, 3),
        },
        "channels": {m: len(v) for m, v in prepared.channels.items()},
        "tokens": result.n_tokens,
        "tokens_per_s": round(n_tokens / total, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_model_load_mb": round(rss_loaded, 1),
    }


def child_reference(edf: Path) -> dict:
    """The public reference path, re-created: float64 everywhere, tail windows dropped."""
    import pyedflib
    import torch
    from scipy.signal import butter, filtfilt

    from gateway.montage import default_table
    from inference.bundle import load_bundle

    encoder = load_bundle(_bundle_dir()).encoder
    t0 = time.perf_counter()
    reader = pyedflib.EdfReader(str(edf))
    labels = reader.getSignalLabels()
    match = default_table().map_labels(labels)
    raw = {i: reader.readSignal(i) for idx in match.groups.values() for i in idx}  # float64
    rates = {i: reader.getSampleFrequency(i) for i in raw}
    duration = reader.getFileDuration()
    reader.close()
    t_read = time.perf_counter() - t0

    t1 = time.perf_counter()
    grid = np.arange(int(duration * 128)) / 128.0
    resampled = {}
    for i, x in raw.items():
        fs = rates[i]
        if fs > 128:
            b, a = butter(4, 64 / (fs / 2), btype="low")
            x = filtfilt(b, a, x)
        y = np.interp(grid, np.arange(len(x)) / fs, x)
        sd = y.std()
        resampled[i] = (y - y.mean()) / (sd if sd > 0 else 1.0)
    del raw
    t_pre = time.perf_counter() - t1

    t2 = time.perf_counter()
    win = 60 * 640
    n_windows = len(grid) // win
    max_channels = max(len(ix) for ix in match.groups.values())
    with torch.inference_mode():
        for indices in match.groups.values():
            block = np.zeros((max_channels, n_windows * win), dtype=np.float32)
            for row, i in enumerate(indices):
                block[row] = resampled[i][: n_windows * win]
            mask = torch.zeros(1, max_channels, dtype=torch.bool)
            mask[0, len(indices):] = True
            for w in range(0, n_windows, 4):
                x = torch.from_numpy(block[:, w * win : min(w + 4, n_windows) * win]).reshape(
                    max_channels, -1, win).permute(1, 0, 2).contiguous()
                encoder(x, mask.expand(x.shape[0], -1))
    t_enc = time.perf_counter() - t2
    total = time.perf_counter() - t0
    return {
        "seconds": {"read": round(t_read, 3), "preprocess": round(t_pre, 3), "encode": round(t_enc, 3),
                    "total": round(total, 3)},
        "tokens": n_windows * 60,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs per path; the fastest is reported")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--edf", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "ours":
        print(json.dumps(child_ours(args.edf, args.precision, args.save)))
        return
    if args.child == "reference":
        print(json.dumps(child_reference(args.edf)))
        return

    from gateway.readers.synthetic import write_synthetic_night

    with tempfile.TemporaryDirectory(prefix="psg-bench-") as tmp:
        tmp_path = Path(tmp)
        edf = tmp_path / "night.edf"
        write_synthetic_night(edf, hours=args.hours, seed=0)

        def best(child_args: list[str]) -> dict:
            runs = [_run_child(child_args) for _ in range(max(1, args.repeat))]
            return min(runs, key=lambda r: r["seconds"]["total"])

        report: dict = {
            "benchmark": "one synthetic night: read + preprocess + encode + heads",
            "night": {"hours": args.hours, "edf_mb": round(edf.stat().st_size / 1e6, 1)},
            "machine": {"cpus": os.cpu_count()},
        }
        report["ours_fp32"] = best(["--child", "ours", "--edf", str(edf), "--precision", "fp32",
                                    "--save", str(tmp_path / "fp32.npz")])
        report["ours_bf16"] = best(["--child", "ours", "--edf", str(edf), "--precision", "bf16",
                                    "--save", str(tmp_path / "bf16.npz")])
        a, b = np.load(tmp_path / "fp32.npz"), np.load(tmp_path / "bf16.npz")
        report["bf16_vs_fp32_max_abs_diff"] = {
            k: float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a.files
        }
        if not args.skip_reference:
            ref = best(["--child", "reference", "--edf", str(edf)])
            report["reference_path"] = ref
            report["speedup_vs_reference_fp32"] = round(
                ref["seconds"]["total"] / report["ours_fp32"]["seconds"]["total"], 2)
        report["targets_fp32"] = {"total_s_max": 8.0, "peak_rss_mb_max": 850,
                                  "met": report["ours_fp32"]["seconds"]["total"] <= 8.0
                                  and report["ours_fp32"]["peak_rss_mb"] <= 850}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
