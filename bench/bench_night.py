"""Benchmark: one synthetic 8-hour, 18-channel PSG night through read, preprocess, encode and heads.

Prints one JSON document. Each measured path runs in its own child process so that its peak RSS
is its own (model load included):

* ``ours-fp32`` / ``ours-bf16``: the product path (streaming EDF reader, float32 preprocessing,
  float16 storage of the 128 Hz signals as the release stores them, batched engine, heads); seconds
  for read / preprocess / encode / heads;
* ``reference``: the SleepFM release's own path (``EDFToHDF5Converter.convert``), re-created: MNE
  ``read_raw_edf(preload=True)``, which reads float64 and FFT-upsamples every channel below the file's
  top rate to that rate, then at that rate a 64 Hz Butterworth filtfilt (when above 128 Hz),
  ``np.interp`` to 128 Hz, z-score and float16 storage, then the reference's encoder passes
  (per-modality, channel padding, 4 windows per forward, tail dropped; no heads); seconds for
  read (MNE, upsampling included) / resample / encode. ``speedup_vs_reference`` is its total over
  ``ours-fp32``'s;
* ``legacy`` (``--legacy``; off by default): the release's older pyedflib reader (``read_edf_old``,
  which ``convert`` no longer calls) -- each mapped channel read at its own rate in float64, then the
  same resampling without the float16 step and the same encoder passes. This is what ``reference``
  measured before (its ``resample`` was called ``preprocess`` then); kept to compare old numbers.
  ``speedup_vs_legacy`` is its total over ``ours-fp32``'s.

Imports and model loading are outside every child's seconds; ``total`` is from the start of the read.

The night (``gateway.synthetic.night.DEFAULT_BENCH_CHANNELS``) has mixed rates -- SpO2 at 1 Hz,
respiration at 32 Hz, EEG/EOG/leg EMG at 256 Hz, snore at 500 Hz, chin EMG and ECG at the top rate
512 Hz -- so the MNE read upsamples 16 of its 18 channels; ``night.rates_hz`` lists them.

Usage: ``python bench/bench_night.py [--hours 8] [--skip-reference] [--legacy] [--repeat N]``
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

    from gateway.montage.table import default_table
    from gateway.pipeline.prepare import prepare_study
    from gateway.readers.edf import read_edf
    from inference.bundle import load_bundle
    from inference.engine import Engine, EngineOptions

    engine = Engine(load_bundle(_bundle_dir()), EngineOptions(precision=precision))
    rss_loaded = _peak_rss_mb()
    t0 = time.perf_counter()
    recording = read_edf(edf)
    t_open = time.perf_counter() - t0
    prepared = prepare_study(recording, default_table())
    result = engine.run(prepared.engine_input)
    total = time.perf_counter() - t0
    if save is not None:
        np.savez(save, hazards=result.hazards.log_hazard, probs=result.staging.token_probs,
                 **{f"tok_{m}": v for m, v in result.token_embeddings.items()})
    n_tokens = result.n_tokens * len(result.modalities)
    read, preprocess = prepared.timings_s["read"], prepared.timings_s["preprocess"]
    return {
        "precision": precision,
        "threads": torch.get_num_threads(),
        "windows_per_batch": engine.windows_per_batch,
        "seconds": {
            "read": round(t_open + read, 3),
            "preprocess": round(preprocess, 3),
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


def _encode_like_reference(encoder, groups: dict[str, list[int]], signals, n_samples: int) -> tuple[float, int]:
    """The reference's encoder passes: one pass per modality, each padded to the largest modality's channel
    count, 4 five-minute windows per forward, the tail that does not fill a window dropped. ``signals[i]`` is
    channel ``i`` at 128 Hz (any float dtype; fed as float32). Returns (seconds, windows)."""
    import torch

    t0 = time.perf_counter()
    win = 60 * 640
    n_windows = n_samples // win
    max_channels = max(len(ix) for ix in groups.values())
    with torch.inference_mode():
        for indices in groups.values():
            block = np.zeros((max_channels, n_windows * win), dtype=np.float32)
            for row, i in enumerate(indices):
                block[row] = signals[i][: n_windows * win]
            mask = torch.zeros(1, max_channels, dtype=torch.bool)
            mask[0, len(indices):] = True
            for w in range(0, n_windows, 4):
                x = torch.from_numpy(block[:, w * win : min(w + 4, n_windows) * win]).reshape(
                    max_channels, -1, win).permute(1, 0, 2).contiguous()
                encoder(x, mask.expand(x.shape[0], -1))
    return time.perf_counter() - t0, n_windows


def release_read(edf: Path) -> tuple[list[str], float, list[np.ndarray]]:
    """The release's ``read_edf``: MNE ``read_raw_edf(preload=True)`` (float64; every channel below the
    file's top rate FFT-upsampled to it), then one ``get_data`` copy per channel. Returns (labels, the
    common rate, signals)."""
    import mne

    raw = mne.io.read_raw_edf(str(edf), preload=True, verbose="ERROR")
    labels = list(raw.ch_names)
    return labels, float(raw.info["sfreq"]), [raw.get_data(picks=[name])[0] for name in labels]


def release_resample(signals: list[np.ndarray], sfreq: float) -> np.ndarray:
    """The release's ``resample_signals`` + HDF5 dtype: per channel at ``sfreq``, a 4th-order Butterworth
    low-pass at 64 Hz forward-backward when ``sfreq`` > 128, ``np.interp`` onto the 128 Hz grid, z-score
    (population std; a zero-variance channel only centred); stacked, as float16 (channels, samples)."""
    from scipy.signal import butter, filtfilt

    n = len(signals[0])
    grid = np.arange(0, n / sfreq, 1 / 128)
    src_t = np.arange(n) / sfreq
    ba = butter(4, 64 / (sfreq / 2), btype="low") if sfreq > 128 else None
    out = []
    for x in signals:
        if ba is not None:
            x = filtfilt(*ba, x)
        y = np.interp(grid, src_t, x)
        sd = y.std()
        out.append((y - y.mean()) / sd if sd > 0 else y - y.mean())
    return np.stack(out).astype(np.float16)


def _reference_report(groups: dict[str, list[int]], t_read: float, t_resample: float, t_enc: float,
                      total: float, n_windows: int, rss_loaded: float) -> dict:
    """What the reference and legacy children report: channels, seconds, tokens, memory."""
    return {
        "channels": {m: len(v) for m, v in groups.items()},
        "seconds": {"read": round(t_read, 3), "resample": round(t_resample, 3), "encode": round(t_enc, 3),
                    "total": round(total, 3)},
        "tokens": n_windows * 60,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_model_load_mb": round(rss_loaded, 1),
    }


def child_reference(edf: Path) -> dict:
    """The SleepFM release's own path (``EDFToHDF5Converter.convert``), re-created.

    read: ``mne.io.read_raw_edf(preload=True)`` -- float64, every channel below the file's top rate
    FFT-upsampled to that rate -- then one ``get_data`` copy per channel, as the release's ``read_edf`` does.
    resample: per channel at the top rate, a 4th-order Butterworth low-pass at 64 Hz forward-backward when
    that rate is above 128 Hz, ``np.interp`` onto the 128 Hz grid, z-score (population std; a zero-variance
    channel only centred), stacked and stored as float16 (the release's HDF5 dtype; the HDF5 file itself is
    not written). Every channel in the file is resampled, as ``convert`` does; the encoder then takes the
    mapped ones.
    """
    from gateway.montage.table import default_table
    from inference.bundle import load_bundle

    encoder = load_bundle(_bundle_dir()).encoder
    rss_loaded = _peak_rss_mb()

    t0 = time.perf_counter()
    labels, sfreq, signals = release_read(edf)
    t_read = time.perf_counter() - t0

    t1 = time.perf_counter()
    stored = release_resample(signals, sfreq)
    del signals
    t_resample = time.perf_counter() - t1

    match = default_table().map_labels(labels)
    t_enc, n_windows = _encode_like_reference(encoder, match.groups, stored, stored.shape[1])
    total = time.perf_counter() - t0
    return {"read_rate_hz": sfreq, "channels_resampled": len(labels),
            **_reference_report(match.groups, t_read, t_resample, t_enc, total, n_windows, rss_loaded)}


def child_legacy(edf: Path) -> dict:
    """The release's legacy pyedflib path (``read_edf_old``), as this bench's ``reference`` used to be: each
    mapped channel read at its own rate in float64, float64 filtfilt + np.interp, no float16 step."""
    import pyedflib
    from scipy.signal import butter, filtfilt

    from gateway.montage.table import default_table
    from inference.bundle import load_bundle

    encoder = load_bundle(_bundle_dir()).encoder
    rss_loaded = _peak_rss_mb()
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
    t_resample = time.perf_counter() - t1

    t_enc, n_windows = _encode_like_reference(encoder, match.groups, resampled, len(grid))
    total = time.perf_counter() - t0
    return _reference_report(match.groups, t_read, t_resample, t_enc, total, n_windows, rss_loaded)


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--skip-reference", action="store_true", help="do not run the release (MNE) path")
    parser.add_argument("--legacy", action="store_true", help="also run the release's legacy pyedflib path")
    parser.add_argument("--repeat", type=int, default=1, help="runs per path; the fastest is reported")
    parser.add_argument("--child", choices=["ours", "reference", "legacy"], help=argparse.SUPPRESS)
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
    if args.child == "legacy":
        print(json.dumps(child_legacy(args.edf)))
        return

    from gateway.synthetic.night import DEFAULT_BENCH_CHANNELS, write_synthetic_night

    with tempfile.TemporaryDirectory(prefix="psg-bench-") as tmp:
        tmp_path = Path(tmp)
        edf = tmp_path / "night.edf"
        write_synthetic_night(edf, hours=args.hours, seed=0)

        def best(child_args: list[str]) -> dict:
            runs = [_run_child(child_args) for _ in range(max(1, args.repeat))]
            return min(runs, key=lambda r: r["seconds"]["total"])

        report: dict = {
            "benchmark": "one synthetic night: read + preprocess + encode + heads",
            "night": {"hours": args.hours, "edf_mb": round(edf.stat().st_size / 1e6, 1),
                      "rates_hz": {c.label: c.rate for c in DEFAULT_BENCH_CHANNELS}},
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
        ours_total = report["ours_fp32"]["seconds"]["total"]
        if not args.skip_reference:
            report["reference"] = best(["--child", "reference", "--edf", str(edf)])
            report["speedup_vs_reference"] = round(report["reference"]["seconds"]["total"] / ours_total, 2)
        if args.legacy:
            report["legacy"] = best(["--child", "legacy", "--edf", str(edf)])
            report["speedup_vs_legacy"] = round(report["legacy"]["seconds"]["total"] / ours_total, 2)
        report["targets_fp32"] = {"total_s_max": 8.0, "peak_rss_mb_max": 850,
                                  "met": report["ours_fp32"]["seconds"]["total"] <= 8.0
                                  and report["ours_fp32"]["peak_rss_mb"] <= 850}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
