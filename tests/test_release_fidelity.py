"""End to end against the SleepFM release's own data path on the mixed-rate fixture: what our reader,
montage, preprocessing, encoder and heads make of ``fixture_10min.edf`` equals what the release's
``EDFToHDF5Converter.convert`` (MNE read), dataset, collate functions and models made of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.montage.table import default_table, load_table
from gateway.pipeline.prepare import prepare_study
from gateway.readers.edf import read_edf
from gateway.recording import Channel, Recording
from inference.bundle import load_bundle
from inference.engine import Engine, EngineOptions
from inference.results import StudyInput

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def fixture(reference_dir):
    pre = reference_dir / "preprocessing"
    recording = read_edf(pre / "fixture_10min.edf")
    return {
        "recording": recording,
        # strict reproduction: the release's labels, exactly (Leg/L excluded, see below)
        "prepared": prepare_study(recording, load_table(ROOT / "mappings" / "release-exact.yaml")),
        "all_channels": prepare_study(recording, default_table()),
        "signals_128": np.load(pre / "fixture_10min_release_128hz.npz"),
        "outputs": np.load(pre / "fixture_10min_release_outputs.npz"),
        "bundle": reference_dir / "sleepfm",
    }


def test_the_recordings_highest_rate_is_its_top_channel_rate(fixture):
    recording = fixture["recording"]
    assert sorted({c.sampling_rate for c in recording.channels}) == [1.0, 32.0, 200.0, 256.0, 500.0, 512.0]
    assert recording.highest_rate == float(fixture["signals_128"]["source_rate"]) == 512.0


def test_highest_rate_counts_unmapped_channels_and_an_empty_recording_has_none():
    one = Channel.from_array("Thor", 32, np.zeros(320))
    other = Channel.from_array("Mic", 1000, np.zeros(10000))  # unmapped, still read (and upsampled to) by MNE
    assert Recording([one, other], 10.0).highest_rate == 1000.0
    assert Recording([], 10.0).highest_rate is None


def test_gateway_preprocessing_equals_the_release_per_channel(fixture):
    """Through the real reader and montage: every channel's float32 128 Hz signal within 2e-5 z-units per
    sample of the release's (measured ~1e-6), before either is stored as float16."""
    from inference.gaps import preprocess_with_gaps

    recording, prepared, ref = fixture["recording"], fixture["all_channels"], fixture["signals_128"]
    labels = [str(label) for label in ref["labels"]]
    by_label = {c.label: c for c in recording.channels}
    seen = 0
    for used in prepared.channels.values():
        for label in used:
            channel = by_label[label]
            row, _ = preprocess_with_gaps(channel.read(), channel.read_valid(), channel.sampling_rate,
                                          ref["signals"].shape[1], recording_rate=recording.highest_rate)
            diff = np.abs(row - ref["signals"][labels.index(label)]).max()
            assert diff <= 2e-5, f"{label}: {diff:.3g} (measured ~1e-6)"
            seen += 1
    assert seen == 10


def test_the_signals_are_stored_as_the_release_stores_them(fixture):
    """The release keeps its 128 Hz signals as float16 and its encoder reads those; so does the pipeline.
    The stored values are the release's own, but for the few samples whose float32 values (1e-6 apart)
    lie either side of a float16 rounding boundary: those differ by one float16 step (near zero, where
    the steps are finer than 1e-6, by the float32 difference)."""
    prepared, ref = fixture["all_channels"], fixture["signals_128"]
    labels = [str(label) for label in ref["labels"]]
    for modality, used in prepared.channels.items():
        stored = prepared.engine_input.signals[modality]
        assert stored.dtype == np.float16
        for row, label in enumerate(used):
            theirs = ref["signals_float16"][labels.index(label)]
            differ = stored[row] != theirs
            assert differ.mean() < 0.02, f"{label}: {differ.mean():.3%} of samples differ"
            ours, release = stored[row][differ], theirs[differ]
            step = np.spacing(np.maximum(np.abs(ours), np.abs(release))).astype(np.float32)  # float16 steps
            # one float16 step beyond the float32 difference (the 2e-5 bound above), which shows near 0
            assert np.all(np.abs(ours.astype(np.float32) - release.astype(np.float32)) <= step + 2e-5), label


def test_release_exact_leaves_out_what_never_reaches_the_releases_model(fixture):
    """The release's HDF5 writer turns the '/' of 'Leg/L' into a group, so that channel never reaches its
    model (it is missing from the signals the release stored). release-exact excludes it; the default
    table keeps it in EMG (a documented difference)."""
    assert "signals_Leg/L" not in fixture["outputs"].files
    assert fixture["prepared"].channels["EMG"] == ["Chin1-Chin2"]
    assert "Leg/L" in fixture["prepared"].match.ignored
    assert fixture["all_channels"].channels["EMG"] == ["Chin1-Chin2", "Leg/L"]


@pytest.fixture(scope="module")
def release_result(fixture):
    engine = Engine(load_bundle(fixture["bundle"]), EngineOptions(device="cpu"))
    demo = fixture["outputs"]["demo"]
    # (age - 50) / 20 = 0.25 and female = 0.0: the fixture's encoded demographics (0.25, 0.0)
    assert tuple(demo) == (0.25, 0.0)
    signals = fixture["prepared"].engine_input.signals
    return engine, signals, engine.run(StudyInput(signals, 55.0, "F"))


def test_end_to_end_equals_the_release(fixture, release_result):
    _, _, result = release_result
    ref = fixture["outputs"]
    assert result.demographics_used["age_feature"] == 0.25 and result.demographics_used["sex_feature"] == 0.0
    assert result.n_tokens == 120 and result.tail_tokens == 0 and result.diagnosis_tokens == 120
    for m in ("BAS", "RESP", "EKG", "EMG"):
        tok = np.abs(result.token_embeddings[m] - ref[f"tok_{m}"]).max()
        win = np.abs(result.window_embeddings[m] - ref[f"win_{m}"]).max()
        # measured (2-core AVX2): tokens up to 7.7e-5 (RESP), 5-min vectors 2.9e-6
        assert tok <= 3e-4, f"{m} tokens: {tok:.3g}"
        assert win <= 2e-5, f"{m} 5-min vectors: {win:.3g}"
    stage = np.abs(result.staging.token_probs - ref["stage_probs"]).max()
    hazard = np.abs(result.hazards.log_hazard - ref["log_hazard"]).max()
    assert stage <= 2e-6, f"stage probabilities: {stage:.3g} (measured 8.9e-8)"
    assert hazard <= 2e-6, f"log-hazards: {hazard:.3g} (measured 6.0e-8)"


def test_float32_model_input_is_further_from_the_release(fixture, release_result):
    """Keeping the float32 signals instead (as psg-gateway did before) moves the tokens 4x further from
    the release's: the float16 storage is part of the release's model input."""
    from inference.gaps import preprocess_with_gaps

    engine, _signals, result = release_result
    ref = fixture["outputs"]
    recording = fixture["recording"]
    by_label = {c.label: c for c in recording.channels}
    wide = {}
    for modality, used in fixture["prepared"].channels.items():
        wide[modality] = np.stack([
            preprocess_with_gaps(by_label[label].read(), None, by_label[label].sampling_rate, 76800,
                                 recording_rate=recording.highest_rate)[0] for label in used])
        assert wide[modality].dtype == np.float32
    as_float32 = engine.run(StudyInput(wide, 55.0, "F"))
    for m in ("BAS", "RESP", "EKG", "EMG"):
        ours = np.abs(result.token_embeddings[m] - ref[f"tok_{m}"]).max()
        assert np.abs(as_float32.token_embeddings[m] - ref[f"tok_{m}"]).max() > 2 * ours, m


def test_the_legacy_read_is_not_the_release(fixture, release_result):
    """Without the upsampling (the release's legacy pyedflib reader) the tokens move by far more than the
    tolerance: the golden test above would catch a return to it."""
    from inference.preprocess import preprocess_channel

    engine, _signals, _ = release_result
    recording, prepared = fixture["recording"], fixture["prepared"]
    by_label = {c.label: c for c in recording.channels}
    legacy = {}
    for modality, used in prepared.channels.items():
        rows = [preprocess_channel(by_label[label].read(), by_label[label].sampling_rate, 76800)
                for label in used]
        legacy[modality] = np.stack(rows)
    result = engine.run(StudyInput(legacy, 55.0, "F"))
    assert np.abs(result.token_embeddings["RESP"] - fixture["outputs"]["tok_RESP"]).max() > 1e-2
