"""Benchmark: whole-process ``psg-gateway infer`` against YASA's sleep staging and the SleepFM release's path.

Prints one JSON document. Every measured path is one whole process, from exec to exit (interpreter start,
imports, model loading, reading, work, writing, exit), on the same synthetic night
(``gateway.synthetic.night.write_synthetic_night(hours=H, seed=0)``: 18 channels, mixed rates up to 512 Hz):

* ``ours``: ``psg-gateway infer NIGHT.edf --out DIR --device cpu`` (read, preprocess, encoder, staging and
  hazard heads, attribution, all outputs written), with the bundle ``bench_night.py`` uses
  (``../shared/reference/sleepfm`` when present, else the generated demo bundle);
* ``yasa``: a small script in a SEPARATE virtualenv (YASA is never a dependency of this project): imports mne
  and yasa, ``mne.io.read_raw_edf(NIGHT, preload=True)`` (every channel, as YASA's documentation does: MNE
  upsamples all of them to the file's top rate, 512 Hz, in float64), then
  ``yasa.SleepStaging(raw, eeg_name=C4-M1, eog_name=E1-M2, emg_name=Chin1-Chin2).predict()``;
* ``yasa_picked``: the same with ``read_raw_edf(..., include=[those 3 channels])``, a reader that knows to
  load only what staging uses (the chin EMG is at 512 Hz, so MNE still upsamples EEG and EOG to 512 Hz);
* ``release``: the SleepFM release's own path as ``bench_night.py`` re-creates it, launched as its own process
  (``python bench/bench_night.py --child reference --edf NIGHT``): MNE read of every channel, filter,
  resample to 128 Hz, float16, encoder passes; no heads, nothing written. Its ``internal_seconds`` are that
  child's own report (imports and model load excluded).

Wall seconds are measured by a tiny intermediate Python process around exactly one child (so
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is that child's own peak RSS); best of ``--repeat`` (paths take turns;
peak RSS is the largest over the repeats). Before measuring, each interpreter imports its heavy modules once
(not measured) so that no path pays for a cold page cache. Creating the YASA virtualenv (``python -m venv`` +
``pip install yasa==<pin>``, default ``~/.cache/psg-gateway-bench/yasa-venv``) is setup, not measured.

Ratios: ``speedup_vs_yasa`` = yasa wall / ours wall (also ``_picked``), ``speedup_vs_release`` = release wall /
ours wall, ``rss_fraction_of_release`` = ours peak RSS / release peak RSS (also ``rss_fraction_of_yasa``).
YASA only stages sleep (5 stages per 30-s epoch, LightGBM on hand-made features); ours also makes embeddings,
hazards and attribution and writes them.

Usage: ``python bench/bench_yasa.py [--hours 8] [--repeat 1] [--yasa-venv DIR] [--skip-ours]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

YASA_PIN = "yasa==0.8.1"  # what `pip install yasa` gave on Python 3.11 (with mne 1.13.2, lightgbm 4.7.0)
EEG, EOG, EMG = "C4-M1", "E1-M2", "Chin1-Chin2"  # from gateway.synthetic.night.DEFAULT_BENCH_CHANNELS
DEFAULT_YASA_VENV = Path.home() / ".cache" / "psg-gateway-bench" / "yasa-venv"

# Runs one command, stdout/stderr to PREFIX.out / PREFIX.err, and writes PREFIX.json with the child's wall time,
# peak RSS and CPU time. This process has exactly one child, so RUSAGE_CHILDREN is that child's own.
_MEASURE = r"""
import json, resource, subprocess, sys, time
prefix, cmd = sys.argv[1], sys.argv[2:]
with open(prefix + ".out", "wb") as out, open(prefix + ".err", "wb") as err:
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, stdout=out, stderr=err)
    wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(prefix + ".json", "w") as f:
    json.dump({"rc": rc, "wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024,
               "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime}, f)
"""

# The YASA path, run by the YASA virtualenv's interpreter: argv = EDF EEG EOG EMG all|picked.
_YASA_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import mne
import yasa
t_import = time.perf_counter() - t0
edf, eeg, eog, emg, mode = sys.argv[1:6]
extra = {"include": [eeg, eog, emg]} if mode == "picked" else {}
raw = mne.io.read_raw_edf(edf, preload=True, verbose="ERROR", **extra)
t_read = time.perf_counter() - t0 - t_import
t1 = time.perf_counter()
hyp = yasa.SleepStaging(raw, eeg_name=eeg, eog_name=eog, emg_name=emg).predict()
t_stage = time.perf_counter() - t1
stages = [str(s) for s in getattr(hyp, "hypno", hyp)]
print(json.dumps({
    "internal_seconds": {"import": round(t_import, 3), "read": round(t_read, 3), "stage": round(t_stage, 3)},
    "channels_read": len(raw.ch_names), "read_rate_hz": raw.info["sfreq"],
    "epochs": len(stages), "stage_counts": {s: stages.count(s) for s in sorted(set(stages))},
}))
"""

_YASA_VERSIONS = r"""
import json, platform
from importlib import metadata
print(json.dumps({"python": platform.python_version(), **{p: metadata.version(p) for p in
      ("yasa", "mne", "lightgbm", "numpy", "scipy", "scikit-learn", "antropy", "numba")}}))
"""


def _log(msg: str) -> None:
    print(f"[bench_yasa] {msg}", file=sys.stderr, flush=True)


def _machine() -> dict:
    from gateway.cpu import cpu_budget, cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpus": os.cpu_count(),
        "cpus_usable": cpu_budget().logical,
        "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")},
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def _yasa_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _yasa_versions(venv: Path) -> dict | None:
    py = _yasa_python(venv)
    if not py.exists():
        return None
    proc = subprocess.run([str(py), "-c", _YASA_VERSIONS], capture_output=True, text=True, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def ensure_yasa_venv(venv: Path) -> dict:
    """Create ``venv`` with YASA installed unless it already has it (setup, not measured); return its versions."""
    versions = _yasa_versions(venv)
    if versions is not None:
        return versions
    _log(f"creating the YASA virtualenv {venv} ({YASA_PIN}); setup, not measured")
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not _yasa_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(_yasa_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", YASA_PIN],
                   check=True, stdout=sys.stderr)
    versions = _yasa_versions(venv)
    if versions is None:
        raise SystemExit(f"YASA virtualenv {venv}: `import yasa, mne, lightgbm` fails after the install")
    return versions


def _bundle_dir() -> Path:
    ref = ROOT.parent / "shared" / "reference" / "sleepfm"
    if ref.is_dir():
        return ref
    from inference.bundle import ensure_demo_bundle

    return ensure_demo_bundle()


def _cli() -> str:
    exe = Path(sys.executable).parent / "psg-gateway"  # not resolved: the venv's python is a symlink
    if exe.exists():
        return str(exe)
    import shutil

    found = shutil.which("psg-gateway")
    if found is None:
        raise SystemExit("psg-gateway not found beside this interpreter nor on PATH (pip install -e .)")
    return found


def measure(cmd: list[str], prefix: Path) -> dict:
    """Run ``cmd`` as the only child of a fresh intermediate process; its wall time, peak RSS, CPU, output."""
    subprocess.run([sys.executable, "-c", _MEASURE, str(prefix), *cmd], check=True)
    result = json.loads(prefix.with_suffix(".json").read_text())
    result["stdout"] = prefix.with_suffix(".out").read_text(errors="replace")
    result["stderr"] = prefix.with_suffix(".err").read_text(errors="replace")
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[:4]}... exited {result['rc']}:\n{result['stderr'][-4000:]}")
    return result


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _summary(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["wall_s"])
    return {
        "wall_s": round(best["wall_s"], 3),
        "wall_s_runs": [round(r["wall_s"], 3) for r in runs],
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "cpu_s": round(best["cpu_user_s"] + best["cpu_sys_s"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per path; the fastest is reported")
    parser.add_argument("--yasa-venv", type=Path, default=DEFAULT_YASA_VENV,
                        help=f"virtualenv with YASA (created with {YASA_PIN} when missing)")
    parser.add_argument("--skip-ours", action="store_true", help="do not run psg-gateway infer")
    parser.add_argument("--skip-release", action="store_true", help="do not run the SleepFM release path")
    args = parser.parse_args()

    from gateway.synthetic.night import DEFAULT_BENCH_CHANNELS, write_synthetic_night

    labels = {c.label: c for c in DEFAULT_BENCH_CHANNELS}
    missing = [c for c in (EEG, EOG, EMG) if c not in labels]
    if missing:
        raise SystemExit(f"the synthetic night has no {missing}; update EEG/EOG/EMG in {__file__}")

    report: dict = {
        "benchmark": "whole process, exec to exit: psg-gateway infer vs YASA staging vs SleepFM release path",
        "machine": _machine(),
        "versions": {"psg_gateway": metadata.version("psg-gateway"), "torch": metadata.version("torch"),
                     "numpy": metadata.version("numpy")},
    }
    yasa_py = str(_yasa_python(args.yasa_venv))
    report["versions"]["yasa_venv"] = {"path": str(args.yasa_venv), "pin": YASA_PIN,
                                       **ensure_yasa_venv(args.yasa_venv)}
    bundle = _bundle_dir()

    with tempfile.TemporaryDirectory(prefix="psg-bench-yasa-") as tmp:
        tmp_path = Path(tmp)
        edf = tmp_path / "night.edf"
        write_synthetic_night(edf, hours=args.hours, seed=0)
        script = tmp_path / "yasa_stage.py"
        script.write_text(_YASA_SCRIPT)
        report["night"] = {
            "hours": args.hours, "edf_mb": round(edf.stat().st_size / 1e6, 1), "channels": len(labels),
            "yasa_channels": {"eeg": [EEG, labels[EEG].rate], "eog": [EOG, labels[EOG].rate],
                              "emg": [EMG, labels[EMG].rate]},
        }

        paths: dict[str, Callable[[int], list[str]]] = {}
        if not args.skip_ours:
            paths["ours"] = lambda i: [_cli(), "infer", str(edf), "--out", str(tmp_path / f"ours-out-{i}"),
                                       "--bundle", str(bundle), "--device", "cpu"]
        paths["yasa"] = lambda i: [yasa_py, str(script), str(edf), EEG, EOG, EMG, "all"]
        paths["yasa_picked"] = lambda i: [yasa_py, str(script), str(edf), EEG, EOG, EMG, "picked"]
        if not args.skip_release:
            paths["release"] = lambda i: [sys.executable, str(ROOT / "bench" / "bench_night.py"),
                                          "--child", "reference", "--edf", str(edf)]

        # Warm the page cache for each interpreter's imports (not measured).
        subprocess.run([yasa_py, "-c", "import mne, yasa, lightgbm"], check=True, capture_output=True)
        subprocess.run([sys.executable, "-c", "import torch, mne, scipy.signal, gateway.cli.main, inference.engine"],
                       check=True, capture_output=True)

        runs: dict[str, list[dict]] = {name: [] for name in paths}
        for i in range(max(1, args.repeat)):
            for name, make_cmd in paths.items():
                _log(f"run {i + 1}/{args.repeat}: {name}")
                runs[name].append(measure(make_cmd(i), tmp_path / f"{name}-{i}"))

        for name, rs in runs.items():
            entry = _summary(rs)
            best = min(rs, key=lambda r: r["wall_s"])
            if name.startswith("yasa"):
                entry.update(_last_json(best["stdout"]))
            elif name == "release":
                child = _last_json(best["stdout"])
                entry["internal_seconds"] = child.get("seconds")
                entry["read_rate_hz"] = child.get("read_rate_hz")
                entry["tokens"] = child.get("tokens")
            elif name == "ours":
                out = tmp_path / f"ours-out-{rs.index(best)}"
                entry["outputs"] = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
                metrics = out / "metrics.json"
                if metrics.is_file():  # the CLI's own stage timings (imports, model load, writing excluded)
                    entry["internal_seconds"] = json.loads(metrics.read_text()).get("timings_s")
                entry["command"] = "psg-gateway infer NIGHT.edf --out DIR --bundle BUNDLE --device cpu"
                entry["bundle"] = str(bundle)
            if any("InconsistentVersionWarning" in r["stderr"] for r in rs):
                entry["warnings"] = [("scikit-learn InconsistentVersionWarning: YASA's bundled classifiers "
                                      "were pickled with an older scikit-learn")]
            report[name] = entry

    if "ours" in report:
        ours = report["ours"]
        ratios: dict = {}
        for name in ("yasa", "yasa_picked"):
            ratios[f"speedup_vs_{name}"] = round(report[name]["wall_s"] / ours["wall_s"], 2)
        ratios["rss_fraction_of_yasa"] = round(ours["peak_rss_mb"] / report["yasa"]["peak_rss_mb"], 3)
        if "release" in report:
            ratios["speedup_vs_release"] = round(report["release"]["wall_s"] / ours["wall_s"], 2)
            ratios["rss_fraction_of_release"] = round(ours["peak_rss_mb"] / report["release"]["peak_rss_mb"], 3)
        report["ratios"] = ratios
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
