"""Tests for inference.preprocess (SleepFM-compatible resampling to 128 Hz + z-score)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from scipy import signal

import inference.preprocess as pp
from inference.preprocess import (
    TARGET_RATE,
    n_target_samples,
    preprocess_channel,
    resample_to_target,
    standardize,
)

FIXTURE_EDF = Path("preprocessing") / "fixture_10min.edf"
# What the release's own path (EDFToHDF5Converter.convert: MNE read, then filter/interp/z-score) makes of
# the fixture. (fixture_10min_expected_128hz.npz came from its legacy pyedflib reader and is superseded.)
FIXTURE_NPZ = Path("preprocessing") / "fixture_10min_release_128hz.npz"


def _reference_float64(x: np.ndarray, rate: float, n_out: int, zscore: bool = True) -> np.ndarray:
    """Straightforward float64 version of the reference recipe (filtfilt + np.interp + z-score)."""
    x = np.asarray(x, dtype=np.float64)
    if rate > TARGET_RATE:
        b, a = signal.butter(4, TARGET_RATE / 2, btype="low", fs=rate)
        x = signal.filtfilt(b, a, x, padlen=min(15, x.size - 1))
    y = np.interp(np.arange(n_out) / TARGET_RATE, np.arange(x.size) / rate, x)
    if zscore:
        y = y - y.mean()
        s = y.std()
        if s > 0:
            y = y / s
    return y


def _noise(n: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) + 0.02 * np.cumsum(rng.standard_normal(n)) + offset).astype(np.float32)


# --------------------------------------------------------------------------------------------
# equivalence with the public reference preprocessing (fixture)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_data(reference_dir: Path) -> dict:
    pyedflib = pytest.importorskip("pyedflib")
    edf_path = reference_dir / FIXTURE_EDF
    npz_path = reference_dir / FIXTURE_NPZ
    assert edf_path.is_file() and npz_path.is_file(), f"missing fixture under {reference_dir}"
    reader = pyedflib.EdfReader(str(edf_path))
    try:
        channels = [
            (reader.getLabel(i), float(reader.getSampleFrequency(i)), reader.readSignal(i))
            for i in range(reader.signals_in_file)
        ]
        duration = float(reader.file_duration)
    finally:
        reader.close()
    expected = np.load(npz_path)
    return {
        "channels": channels,
        "duration": duration,
        "signals": expected["signals"],
        "labels": [str(s) for s in expected["labels"]],
        "source_rate": float(expected["source_rate"]),
    }


@pytest.mark.reference
def test_fixture_layout(fixture_data: dict) -> None:
    assert fixture_data["signals"].shape == (10, 76800)
    assert [c[0] for c in fixture_data["channels"]] == fixture_data["labels"]
    assert n_target_samples(fixture_data["duration"]) == fixture_data["signals"].shape[1]
    assert fixture_data["source_rate"] == max(c[1] for c in fixture_data["channels"]) == 512.0


@pytest.mark.reference
@pytest.mark.parametrize("index", range(10))
def test_fixture_channel_matches_release(fixture_data: dict, index: int) -> None:
    """Each channel (1 Hz SpO2, 32 Hz respiration, 200/256 Hz, 500/512 Hz) equals what the release's own
    path makes of it within 2e-3 z-units per sample (measured: ~1e-6)."""
    label, rate, samples = fixture_data["channels"][index]
    expected = fixture_data["signals"][index]
    n_out = n_target_samples(fixture_data["duration"])
    top = fixture_data["source_rate"]
    for x in (samples, samples.astype(np.float32)):
        out = preprocess_channel(x, rate, n_out, recording_rate=top)
        assert out.dtype == np.float32
        assert out.shape == expected.shape
        assert out.flags.c_contiguous
        diff = float(np.max(np.abs(out - expected)))
        assert diff <= 2e-3, f"{label} @ {rate} Hz: max |diff| {diff:.3g}"
        assert diff <= 2e-5, f"{label} @ {rate} Hz: max |diff| {diff:.3g} (was ~1e-6)"
    # default n_out from the channel's own duration gives the same length here
    assert preprocess_channel(samples, rate, recording_rate=top).shape == expected.shape


@pytest.mark.reference
@pytest.mark.parametrize("index", range(10))
def test_without_the_upsampling_only_top_rate_channels_match_the_release(fixture_data: dict, index: int) -> None:
    """The per-channel path (the release's legacy reader) is the release's only at the top rate: below it,
    MNE's upsampling changes every channel (Thor/Airflow/Abdo ~0.5 z-units, C3-M2 ~0.1)."""
    label, rate, samples = fixture_data["channels"][index]
    out = preprocess_channel(samples, rate, n_target_samples(fixture_data["duration"]))
    diff = float(np.max(np.abs(out - fixture_data["signals"][index])))
    if rate == fixture_data["source_rate"]:
        assert diff <= 2e-5
    else:
        assert diff > 1e-2, f"{label} @ {rate} Hz: legacy path unexpectedly equal ({diff:.3g})"


# --------------------------------------------------------------------------------------------
# lengths and grid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("duration", [600.0, 30.0, 1.0, 0.5, 1 / 128, 1.5 / 128, 7.3, 28800.0, 12345.678])
def test_n_target_samples_matches_arange(duration: float) -> None:
    assert n_target_samples(duration) == len(np.arange(0, duration, 1 / 128))


def test_n_target_samples_ignores_float_noise_and_rejects_bad_durations() -> None:
    assert n_target_samples(600.0 + 1e-10) == 76800
    assert n_target_samples(600.0 + 1 / 256) == 76801
    assert n_target_samples(3.0, target_rate=100.0) == 300
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="duration"):
            n_target_samples(bad)


@pytest.mark.parametrize(
    ("rate", "n_in", "n_out"),
    [
        (256.0, 2560, 1280),
        (256.0, 2561, 1281),
        (512.0, 5000, 1250),
        (500.0, 5000, 1280),
        (500.0, 5003, 1281),
        (200.0, 2000, 1280),
        (128.0, 1000, 1000),
        (100.0, 1000, 1280),
        (32.0, 100, 400),
        (1.0, 30, 3840),
        (10 / 3, 10, 384),
    ],
)
def test_default_output_length(rate: float, n_in: int, n_out: int) -> None:
    x = _noise(n_in)
    assert n_target_samples(n_in / rate) == n_out
    assert resample_to_target(x, rate).shape == (n_out,)
    assert preprocess_channel(x, rate).shape == (n_out,)


@pytest.mark.parametrize("rate", [256.0, 500.0, 128.0, 32.0, 1.0])
@pytest.mark.parametrize("n_out", [1, 7, 1000])
def test_explicit_n_out(rate: float, n_out: int) -> None:
    x = _noise(int(rate * 5) + 1)
    out = preprocess_channel(x, rate, n_out)
    assert out.shape == (n_out,) and out.dtype == np.float32


# --------------------------------------------------------------------------------------------
# resampling against a float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate",
    [128.0, 100.0, 50.5, 32.0, 1.0, 10 / 3, 100.0003, 200.0, 256.0, 500.0, 512.0, 1000.0, 250.3, 140.0],
)
def test_resample_matches_float64_reference(rate: float) -> None:
    n_in = int(rate * 40) + 3
    x = _noise(n_in, seed=int(rate * 10), offset=50.0)
    n_out = n_target_samples(n_in / rate)
    want = _reference_float64(x, rate, n_out, zscore=False)
    got = resample_to_target(x, rate)
    assert got.dtype == np.float32 and got.shape == (n_out,)
    scale = float(np.abs(want).max())
    assert np.max(np.abs(got - want)) <= 2e-6 * scale
    z = preprocess_channel(x, rate)
    assert np.max(np.abs(z - _reference_float64(x, rate, n_out))) <= 1e-4


def test_rate_equal_to_target_is_identity() -> None:
    x = _noise(1000, offset=3.0)
    out = resample_to_target(x, 128.0)
    np.testing.assert_array_equal(out, x)
    assert not np.shares_memory(out, x)
    np.testing.assert_allclose(preprocess_channel(x, 128.0), standardize(x.copy()), atol=1e-6)


def test_integer_decimation_takes_filtered_samples() -> None:
    x = _noise(4096).astype(np.float64)
    sos = signal.butter(4, 64, fs=256, output="sos")
    filtered = signal.sosfiltfilt(sos, x)
    np.testing.assert_allclose(resample_to_target(x, 256.0), filtered[::2], atol=2e-5)


def test_upsampling_interpolates_linearly_without_filter() -> None:
    x = np.array([0.0, 4.0, -4.0, 2.0], dtype=np.float32)
    out = resample_to_target(x, 32.0)
    assert out.shape == (16,)
    expected = np.interp(np.arange(16) / 128, np.arange(4) / 32, x)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0] == 0.0 and out[4] == 4.0 and out[2] == 2.0


def test_n_out_past_the_data_holds_the_last_value() -> None:
    x = _noise(100, offset=5.0)
    out = resample_to_target(x, 32.0, n_out=500)
    # sample 99 of the input sits at output index 396; everything after holds it
    np.testing.assert_allclose(out[396:], x[-1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[:396], np.interp(np.arange(396) / 128, np.arange(100) / 32, x), atol=1e-5)
    # above 128 Hz the held value is the last *filtered* sample (input sample 2559 at 9.996 s)
    x256 = _noise(2560)
    hi = resample_to_target(x256, 256.0, n_out=2000)
    last = signal.sosfiltfilt(signal.butter(4, 64, fs=256, output="sos"), x256.astype(np.float64))[-1]
    assert np.all(hi[1280:] == hi[1280])
    assert abs(float(hi[1280]) - last) < 1e-5
    x500 = _noise(5000)
    odd = resample_to_target(x500, 500.0, n_out=2000)
    last = signal.sosfiltfilt(signal.butter(4, 64, fs=500, output="sos"), x500.astype(np.float64))[-1]
    assert np.all(odd[1280:] == odd[1280])
    assert abs(float(odd[1280]) - last) < 1e-5


# --------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_in", [1, 2, 5, 15, 16, 17])
@pytest.mark.parametrize("rate", [256.0, 500.0])
def test_channel_shorter_than_filter_padding(n_in: int, rate: float) -> None:
    x = _noise(n_in, offset=1.0)
    out = resample_to_target(x, rate)
    n_out = n_target_samples(n_in / rate)
    assert out.shape == (n_out,) and np.all(np.isfinite(out))
    if n_in > 1:
        np.testing.assert_allclose(out, _reference_float64(x, rate, n_out, zscore=False), atol=1e-5)
    else:
        np.testing.assert_allclose(out, x[0], atol=1e-5)
    assert np.all(np.isfinite(preprocess_channel(x, rate)))


@pytest.mark.parametrize("rate", [512.0, 256.0, 200.0, 128.0, 32.0, 1.0])
@pytest.mark.parametrize("value", [0.0, 95.25, -1234.5])
def test_constant_channel_is_only_centred(rate: float, value: float) -> None:
    x = np.full(int(rate * 10), value, dtype=np.float64)
    out = preprocess_channel(x, rate)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.zeros_like(out))
    np.testing.assert_allclose(resample_to_target(x, rate), value, rtol=1e-6)


@pytest.mark.parametrize("func", [preprocess_channel, resample_to_target])
def test_empty_input_raises(func) -> None:
    with pytest.raises(ValueError, match="empty"):
        func(np.array([], dtype=np.float32), 256.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rate", [256.0, 128.0, 32.0])
def test_non_finite_input_raises(bad: float, rate: float) -> None:
    x = _noise(1000)
    x[10] = bad
    with pytest.raises(ValueError, match="non-finite"):
        preprocess_channel(x, rate)
    with pytest.raises(ValueError, match="non-finite"):
        resample_to_target(x.astype(np.float64), rate)


def test_invalid_arguments_raise() -> None:
    x = _noise(100)
    with pytest.raises(ValueError, match="1-D"):
        preprocess_channel(x.reshape(10, 10), 256.0)
    for rate in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rate"):
            preprocess_channel(x, rate)
    for n_out in (0, -5, 2.5):
        with pytest.raises(ValueError, match="n_out"):
            preprocess_channel(x, 256.0, n_out)
    with pytest.raises(ValueError, match="dtype"):
        preprocess_channel(x.astype(np.complex64), 256.0)
    with pytest.raises(ValueError, match="workers"):
        preprocess_channel(x, 256.0, workers=0)


def test_integer_input_dtype() -> None:
    x = (np.arange(2560) % 50 - 25).astype(np.int16)
    out = preprocess_channel(x, 256.0)
    np.testing.assert_allclose(out, _reference_float64(x, 256.0, 1280), atol=1e-4)


# --------------------------------------------------------------------------------------------
# standardize
# --------------------------------------------------------------------------------------------


def test_standardize_is_population_zscore_in_place() -> None:
    x = _noise(100_000, offset=7.0)
    want = (x.astype(np.float64) - x.mean(dtype=np.float64)) / x.std(dtype=np.float64)
    same = standardize(x)
    assert same is x
    assert same.dtype == np.float32
    np.testing.assert_allclose(same, want, atol=1e-5)
    assert abs(float(same.mean(dtype=np.float64))) < 1e-6
    assert abs(float(same.std(dtype=np.float64)) - 1.0) < 1e-6


def test_standardize_large_offset_and_non_float32_input() -> None:
    rng = np.random.default_rng(3)
    x64 = 1e4 + rng.standard_normal(50_000)
    original = x64.copy()
    out = standardize(x64)
    assert out.dtype == np.float32 and out is not x64
    np.testing.assert_array_equal(x64, original)
    x32 = x64.astype(np.float32).astype(np.float64)  # what float32 storage can represent
    want = (x32 - x32.mean()) / x32.std()
    np.testing.assert_allclose(out, want, atol=1e-4)
    assert abs(float(out.mean(dtype=np.float64))) < 1e-5


def test_standardize_zero_variance_and_errors() -> None:
    const = np.full(1000, 42.5, dtype=np.float32)
    np.testing.assert_array_equal(standardize(const), np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match="empty"):
        standardize(np.array([], dtype=np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        standardize(np.array([1.0, np.nan, 2.0], dtype=np.float32))


# --------------------------------------------------------------------------------------------
# output form, threads, fallbacks, memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [512.0, 500.0, 256.0, 200.0, 128.0, 100.0, 32.0, 1.0, 10 / 3])
def test_output_is_new_contiguous_float32(rate: float) -> None:
    x = _noise(int(rate * 20) + 1)
    for out in (preprocess_channel(x, rate), resample_to_target(x, rate)):
        assert out.dtype == np.float32
        assert out.ndim == 1 and out.flags.c_contiguous and out.flags.owndata
        assert out.flags.writeable
        assert not np.shares_memory(out, x)


@pytest.mark.parametrize("rate", [256.0, 500.0, 512.0, 200.0, 140.0, 32.0, 1.0, 100.0003])
def test_threaded_blocks_match_serial(monkeypatch: pytest.MonkeyPatch, rate: float) -> None:
    monkeypatch.setattr(pp, "_MIN_PARALLEL", 2048)
    monkeypatch.setattr(pp, "_DEFAULT_WORKERS", 3)
    x = _noise(int(rate * 300) + 11, offset=20.0)
    serial = preprocess_channel(x, rate, workers=1)
    threaded = preprocess_channel(x, rate, workers=3)
    np.testing.assert_allclose(threaded, serial, atol=1e-5, rtol=0)


def test_public_sosfilt_fallback_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _noise(50_000, offset=3.0)
    fast = preprocess_channel(x, 500.0, workers=1)
    assert pp._load_kernel() is not None  # the private kernel served `fast`
    monkeypatch.setitem(pp._KERNEL, "kernel", None)
    slow = preprocess_channel(x, 500.0, workers=1)
    np.testing.assert_allclose(fast, slow, atol=1e-6, rtol=0)


def test_no_float64_copy_of_the_channel() -> None:
    rate, n = 256.0, 256 * 3600  # one hour
    x64 = _noise(n).astype(np.float64)
    n_out = n_target_samples(n / rate)
    tracemalloc.start()
    try:
        preprocess_channel(x64, rate, n_out, workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one padded float32 working buffer + the float32 output + chunk-sized temporaries
    assert peak <= 4 * (n + 64) + 4 * n_out + (2 << 20), peak
    assert peak < 8 * n  # less than a single float64 copy of the channel
