"""Benchmark: what modality attribution (issue 17) adds to a night, against the same engine without it.

One night of preprocessed signals (4 modalities; random, the cost does not depend on the values)
runs through the engine twice per repeat, with ``modality_attribution`` off (the baseline) and on.
Prints one JSON document: seconds for the encoder and the heads in each mode (median of the repeats),
the attribution's own cost (heads on - heads off) and its share of the night's total.

Usage: ``python bench/bench_attribution.py [--hours 8] [--repeat 3] [--device cpu]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bundle_dir() -> Path:
    ref = ROOT.parent / "shared" / "reference" / "sleepfm"
    if ref.is_dir():
        return ref
    from inference.bundle import ensure_demo_bundle

    return ensure_demo_bundle()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from inference.bundle import load_bundle
    from inference.engine import Engine, EngineOptions
    from inference.results import StudyInput

    bundle_dir = _bundle_dir()
    bundle = load_bundle(bundle_dir)
    n = int(args.hours * 3600 * 128)
    rng = np.random.default_rng(0)
    rows = {"BAS": 4, "RESP": 3, "EKG": 1, "EMG": 2}
    study = StudyInput({m: rng.standard_normal((r, n), dtype=np.float32) for m, r in rows.items()}, 60, "F")
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    engines = {mode: Engine(bundle, EngineOptions(device=args.device, modality_attribution=mode == "on"))
               for mode in runs}
    for _ in range(args.repeat):
        for mode, engine in engines.items():
            runs[mode].append(engine.run(study).timings_s)

    def median(mode: str, key: str) -> float:
        return round(statistics.median(t[key] for t in runs[mode]), 3)

    off_total = median("off", "encode") + median("off", "heads")
    added = round(median("on", "heads") - median("off", "heads"), 3)
    print(json.dumps({
        "bundle": str(bundle_dir), "device": args.device, "hours": args.hours, "repeat": args.repeat,
        "modalities": rows,
        "baseline_without_attribution": {"encode_s": median("off", "encode"), "heads_s": median("off", "heads")},
        "with_attribution": {"encode_s": median("on", "encode"), "heads_s": median("on", "heads")},
        "attribution_s": added,
        "attribution_share_of_night": round(added / off_total, 4) if off_total else None,
    }, indent=2))


if __name__ == "__main__":
    main()
