"""Measure each deliberate difference between psg-gateway and the SleepFM release's own path.

Prints one JSON document: for each difference docs/researcher-guide.md lists (section "Where psg-gateway differs from
the SleepFM release, and why"), the largest change it makes to tokens, 5-minute vectors, stage
probabilities and log-hazards, on the release's mixed-rate fixture (with the release's outputs) or on a
synthetic night, with the reference bundle in ../shared/reference/sleepfm (random weights: the sizes are
what the code paths change, not clinical effects).

Usage: ``python bench/release_differences.py`` (needs ../shared/reference).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.montage.table import default_table, load_table
from gateway.pipeline.prepare import prepare_study
from gateway.readers.edf import read_edf
from gateway.synthetic.night import write_synthetic_night
from inference.bundle import load_bundle
from inference.engine import Engine, EngineOptions
from inference.results import MODALITIES, StudyInput

REFERENCE = ROOT.parent / "shared" / "reference"
AGE, SEX = 55.0, "F"  # the fixture's encoded demographics (0.25, 0.0) under (age - 50) / 20


def _max(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def _compare(one, two, tokens: slice = slice(None)) -> dict:
    """Largest differences between two results over the modalities both have."""
    both = [m for m in MODALITIES if m in one.token_embeddings and m in two.token_embeddings]
    out = {
        "tokens": max(_max(one.token_embeddings[m][tokens], two.token_embeddings[m][tokens]) for m in both),
        "stage_probs": _max(one.staging.token_probs[tokens], two.staging.token_probs[tokens]),
        "log_hazard": _max(one.hazards.log_hazard, two.hazards.log_hazard),
    }
    if all(len(one.window_embeddings[m]) == len(two.window_embeddings[m]) for m in both):
        out["windows_5min"] = max(_max(one.window_embeddings[m], two.window_embeddings[m]) for m in both)
    return {k: float(f"{v:.3g}") for k, v in out.items()}


def main() -> None:
    engine = Engine(load_bundle(REFERENCE / "sleepfm"), EngineOptions(device="cpu"))
    pre = REFERENCE / "preprocessing"
    ref = np.load(pre / "fixture_10min_release_outputs.npz")
    exact = load_table(ROOT / "mappings" / "release-exact.yaml")
    recording = read_edf(pre / "fixture_10min.edf")
    release_input = prepare_study(recording, exact).engine_input.signals  # Leg/L excluded, as the release loses it
    ours = engine.run(StudyInput(release_input, AGE, SEX))
    report: dict = {"bundle": "shared/reference/sleepfm (random weights)"}

    # 0. what is left against the release's own outputs (both feed the model float16 signals)
    report["fixture_vs_release_outputs"] = {
        "tokens": float(f"{max(_max(ours.token_embeddings[m], ref[f'tok_{m}']) for m in MODALITIES):.3g}"),
        "windows_5min": float(f"{max(_max(ours.window_embeddings[m], ref[f'win_{m}']) for m in MODALITIES):.3g}"),
        "stage_probs": float(f"{_max(ours.staging.token_probs, ref['stage_probs']):.3g}"),
        "log_hazard": float(f"{_max(ours.hazards.log_hazard, ref['log_hazard']):.3g}"),
    }

    # 1. labels with '/' kept (the release's HDF5 writer turns 'Leg/L' into a group and loses it)
    kept = engine.run(StudyInput(prepare_study(recording, default_table()).engine_input.signals, AGE, SEX))
    report["slash_labels_kept_Leg/L"] = _compare(kept, ours)

    # 2. a one-channel modality is passed through the channel pooling as the release does when it is alone;
    #    the release runs it through the pooling transformer when a batch pads it next to more channels
    encoder = engine.bundle.encoder
    with torch.inference_mode():
        ekg = torch.from_numpy(release_input["EKG"][:, : 60 * 640]).float().reshape(1, 1, -1)
        tokens = encoder.tokenize(ekg)  # (1, 1, 60, E)
        padded = torch.cat([tokens, torch.zeros_like(tokens)], dim=1)
        alone = encoder.pool_channels(tokens)
        in_batch = encoder.pool_channels(padded, torch.tensor([[False, True]]))
        report["one_channel_modality_independent_of_batch"] = {
            "channel_pooled_tokens": float(f"{_max(alone, in_batch):.3g}")}

    # 3. a missing modality is masked (the release cannot run such a study): EKG left out of the fixture
    no_ekg = {m: a for m, a in release_input.items() if m != "EKG"}
    report["missing_modality_masked_EKG"] = _compare(engine.run(StudyInput(no_ekg, AGE, SEX)), ours)

    with tempfile.TemporaryDirectory() as tmp:
        # 4. the tail: 17 min 25 s = 3 whole windows + 29 tokens. Staging and hazards of the whole windows
        #    are computed without it (as the release); before, the tail window entered the heads too.
        night = write_synthetic_night(Path(tmp) / "tail.edf", hours=1045 / 3600, seed=3)
        prepared = prepare_study(read_edf(night), default_table())
        full = engine.run(StudyInput(prepared.engine_input.signals, AGE, SEX))
        cut = engine.run(StudyInput({m: a[:, : 180 * 640] for m, a in prepared.engine_input.signals.items()}, AGE, SEX))
        report["tail_staged_on_its_own"] = {
            "whole_windows_vs_night_cut_there": _compare(full, cut, slice(0, 180)),
            "tail_tokens": full.tail_tokens, "tail_epochs": len(full.staging.hypnogram) - full.staging.tail_start_epoch,
        }
        signals = {m: torch.from_numpy(np.ascontiguousarray(full.token_embeddings[m])) for m in MODALITIES}
        stacked = torch.stack([signals[m] for m in MODALITIES])[None]
        with torch.inference_mode():
            demo = torch.tensor([[full.demographics_used["age_feature"], full.demographics_used["sex_feature"]]])
            with_tail = engine.bundle.diagnosis(stacked, demo)[0].numpy()
            staged_whole = torch.softmax(engine.bundle.staging(stacked), dim=-1)[0].numpy()
        report["tail_staged_on_its_own"]["before_tail_in_the_heads"] = {
            "stage_probs_of_whole_windows": float(f"{_max(staged_whole[:180], full.staging.token_probs[:180]):.3g}"),
            "log_hazard": float(f"{_max(with_tail, full.hazards.log_hazard):.3g}"),
        }

        # 5. normalised labels: on a 1-hour night the default table maps E2-M1, EEG labels of other
        #    spellings and leg EMG that the release's exact labels do not
        night = write_synthetic_night(Path(tmp) / "labels.edf", hours=1.0, seed=4)
        recording = read_edf(night)
        wide = prepare_study(recording, default_table())
        strict = prepare_study(recording, exact)
        report["default_table_wider_matching"] = {
            "channels_default": wide.channels, "channels_release_exact": strict.channels,
            "unmapped_release_exact": strict.match.unmapped,
            "effect": _compare(engine.run(StudyInput(wide.engine_input.signals, AGE, SEX)),
                               engine.run(StudyInput(strict.engine_input.signals, AGE, SEX))),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
