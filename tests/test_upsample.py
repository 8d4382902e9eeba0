"""The release reader's FFT upsampling, composed with the low-pass and the 128 Hz grid, against the
direct computation: MNE's resampler (``npad=0``, the whole channel) to the recording's top rate, then
the release's filtfilt, np.interp onto the 128 Hz grid and z-score."""

from __future__ import annotations

import math

import mne
import numpy as np
import pytest
from scipy import signal

import inference.upsample as up
from inference.gaps import preprocess_with_gaps
from inference.preprocess import n_target_samples, preprocess_channel, resample_to_target


def _fft_upsample(x: np.ndarray, n_up: int) -> np.ndarray:
    """MNE's FFT resampling written out: irfft(rfft(x) * M / N, M), the old Nyquist bin halved."""
    n = x.size
    spec = np.fft.rfft(np.asarray(x, dtype=np.float64))
    if n % 2 == 0:
        spec[n // 2] *= 0.5
    return np.fft.irfft(spec * (n_up / n), n_up)


def _release(x: np.ndarray, rate: float, top: float, n_out: int, zscore: bool = True) -> np.ndarray:
    """The release path on one channel of a recording whose highest rate is ``top``."""
    u = _fft_upsample(x, round(x.size * top / rate)) if top != rate else np.asarray(x, np.float64)
    if top > 128:
        b, a = signal.butter(4, 64 / (top / 2), btype="low")
        u = signal.filtfilt(b, a, u)
    y = np.interp(np.arange(n_out) / 128, np.arange(u.size) / top, u)
    if not zscore:
        return y
    y = y - y.mean()
    return y / y.std() if y.std() > 0 else y


def _band_limited(n: int, rate: float, seed: int) -> np.ndarray:
    """A sum of sinusoids below the channel's Nyquist frequency, plus an offset (like SpO2's)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    freqs = rng.uniform(0.0, 0.48 * rate, 12)
    x = sum(rng.uniform(0.2, 2.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs)
    return (x + 95.0).astype(np.float32)


def _white(n: int, seed: int) -> np.ndarray:
    """Noise up to the Nyquist frequency and a random walk: the hardest case for any interpolation."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) + 0.05 * np.cumsum(rng.standard_normal(n))).astype(np.float32)


@pytest.mark.parametrize("n", [1000, 1001])
def test_written_out_upsampling_is_mne_resample(n):
    """The test's own reference is MNE's resampler, as the release's reader calls it."""
    x = _white(n, 3).astype(np.float64)
    mne_up = mne.filter.resample(x, 5120, n, npad=0, verbose="error")
    np.testing.assert_allclose(_fft_upsample(x, 5120), mne_up, atol=1e-12)


# rate pairs of the issue (1->512, 32->512, 100->200, 256->512, 500->512) and others: with the low-pass
# at a multiple of 128 Hz (direct 128 Hz evaluation) or not (200, 500, 1000, 8000 Hz: u at the samples
# the interpolation needs; 129 and 300.5 Hz: u built on its own grid), without it (top rate <= 128 Hz), odd
# lengths and a top rate that is not a whole multiple of the rate.
PAIRS = [
    (1.0, 512.0, 600),
    (32.0, 512.0, 600),
    (100.0, 200.0, 600),
    (256.0, 512.0, 600),
    (500.0, 512.0, 600),
    (200.0, 512.0, 300),
    (32.0, 500.0, 300),
    (256.0, 1024.0, 120),
    (10.0, 100.0, 300),
    (64.0, 128.0, 300),
    (100.0, 256.0, 600.01),
    (32.0, 512.0, 600.53125),
    (256.0, 1000.0, 60),  # a top rate of 125/16 x 128 Hz: u needed at 32 of every 125 of its samples
    (200.0, 8000.0, 10),  # 125/2 x 128 Hz (a snore microphone): 4 of every 125
    (100.0, 250.0, 200),  # 125/64 x 128 Hz
    (100.0, 129.0, 400),  # 129/128: the filter's ends reach so far that u is built whole
    (100.0, 300.5, 200),  # 601/256: too many phases, so the filtered u is built on its own grid
]


@pytest.mark.parametrize(("rate", "top", "seconds"), PAIRS)
@pytest.mark.parametrize("kind", ["band-limited", "white"])
def test_composed_upsampling_equals_the_direct_path(rate, top, seconds, kind):
    n = round(rate * seconds)
    x = _band_limited(n, rate, 1) if kind == "band-limited" else _white(n, 2)
    n_out = n_target_samples(round(n * top / rate) / top)
    want = _release(x, rate, top, n_out)
    got = preprocess_channel(x, rate, n_out, recording_rate=top)
    assert got.dtype == np.float32 and got.shape == (n_out,)
    assert np.abs(got - want).max() <= 2e-5, f"{rate}->{top} Hz: {np.abs(got - want).max():.3g}"


@pytest.mark.parametrize(("rate", "top"), [(32.0, 512.0), (100.0, 200.0), (1.0, 100.0)])
def test_resample_keeps_units_and_offset(rate, top):
    n = int(rate * 400)
    x = _band_limited(n, rate, 4)
    n_out = n_target_samples(n / rate)
    want = _release(x, rate, top, n_out, zscore=False)
    got = resample_to_target(x, rate, n_out=n_out, recording_rate=top)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_edges_use_the_exact_filtfilt_padding():
    """Near both ends filtfilt pads and starts from a steady state: the frequency-domain response alone
    would be wrong there by far more than the tolerance."""
    n, rate, top = 38400, 256.0, 512.0
    x = _white(n, 5)
    n_out = n_target_samples(n / rate)
    want = _release(x, rate, top, n_out)
    got = preprocess_channel(x, rate, n_out, recording_rate=top)
    ends = np.r_[0:32, n_out - 32 : n_out]
    assert np.abs(got[ends] - want[ends]).max() <= 2e-5
    # what circular filtering would give at the ends (the wrap from the last sample to the first)
    m_total = up.recording_grid_length(n, rate, top)
    coef = up._real_coefficients(x.astype(np.float64) - x.mean(dtype=np.float64), None)
    coef = coef * up._lowpass_response(4, 64.0, top, coef.size, m_total)
    circular = up._grid_values(coef, n, n_out)
    circular = (circular - circular.mean()) / circular.std()
    assert np.abs(circular[ends] - want[ends]).max() > 1e-2


@pytest.mark.parametrize(("n", "rate", "top"), [(1000, 1.0, 512.0), (999, 32.0, 512.0), (40000, 256.0, 512.0),
                                                 (30001, 500.0, 512.0), (5000, 100.0, 200.0)])
def test_edge_values_are_the_upsampled_channel(n, rate, top):
    x = _white(n, 6).astype(np.float64)
    m_total = up.recording_grid_length(n, rate, top)
    u = _fft_upsample(x, m_total)
    head, tail = up._edge_values(up._real_coefficients(x, None), n, m_total, 200)
    scale = np.abs(u).max()
    assert np.abs(head - u[:200]).max() <= 1e-6 * scale
    assert np.abs(tail - u[-200:]).max() <= 1e-6 * scale


@pytest.mark.parametrize("q", [512000, 128000, 507, 1000])
def test_grid_values_fold_bins_beyond_the_grid(q):
    n = 1000
    x = _white(n, 7).astype(np.float64)
    coef = up._real_coefficients(x, None)
    t = np.arange(q) * n / q
    if q <= 5000:
        direct = (np.exp(2j * np.pi * np.outer(t, np.arange(coef.size)) / n) @ coef).real / n
    else:
        direct = _fft_upsample(x, q)
    np.testing.assert_allclose(up._grid_values(coef, n, q), direct, atol=1e-9)


def test_past_the_end_holds_the_last_value():
    n, rate, top = 19200, 32.0, 512.0
    x = _white(n, 8)
    n_data = n_target_samples(n / rate)
    got = resample_to_target(x, rate, n_out=n_data + 7, recording_rate=top)
    want = _release(x, rate, top, n_data + 7, zscore=False)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.all(got[n_data:] == got[n_data - 1]) or np.allclose(got[n_data:], want[-1], atol=1e-4)


def test_same_rate_or_no_top_rate_is_the_per_channel_path():
    x = _white(5120, 9)
    plain = preprocess_channel(x, 512.0, 1280)
    np.testing.assert_array_equal(preprocess_channel(x, 512.0, 1280, recording_rate=512.0), plain)
    np.testing.assert_array_equal(preprocess_channel(x, 512.0, 1280, recording_rate=None), plain)


@pytest.mark.parametrize("bad", [100.0, 0.0, -1.0, math.nan, math.inf])
def test_top_rate_below_the_channel_rate_is_refused(bad):
    with pytest.raises(ValueError, match="recording_rate"):
        preprocess_channel(_white(5120, 1), 256.0, recording_rate=bad)


def test_gap_filled_channel_is_upsampled_too():
    n, rate, top = 19200, 32.0, 512.0
    x = _white(n, 10)
    n_out = n_target_samples(n / rate)
    plain, gap = preprocess_with_gaps(x, None, rate, n_out, recording_rate=top)
    assert gap == 0.0
    np.testing.assert_array_equal(plain, preprocess_channel(x, rate, n_out, recording_rate=top))
    valid = np.ones(n, dtype=bool)
    valid[5000:6000] = False
    out, gap = preprocess_with_gaps(x, valid, rate, n_out, recording_rate=top)
    assert gap == pytest.approx(1000 / n, abs=1e-3)
    filled = x.copy()
    filled[~valid] = x[valid].mean()
    want = _release(filled, rate, top, n_out, zscore=False)
    ok = out != 0.0
    # over the measured samples: the upsampled gap-filled channel, z-scored on those samples
    want = (want - want[ok].mean()) / want[ok].std()
    assert np.abs(out[ok] - want[ok]).max() <= 1e-3
    assert (out[20001:23997] == 0.0).all()


def test_overwrite_input_gives_the_same_result_and_only_then_touches_the_input():
    x = _white(19200, 11) + np.float32(95.0)
    keep = x.copy()
    plain = preprocess_channel(x, 32.0, recording_rate=512.0)
    np.testing.assert_array_equal(x, keep)  # by default the input is left alone
    scratch = x.copy()
    np.testing.assert_array_equal(preprocess_channel(scratch, 32.0, recording_rate=512.0, overwrite_input=True),
                                  plain)
    assert not np.array_equal(scratch, keep)  # it was used as scratch space


@pytest.mark.parametrize("n", [1 << 17, (1 << 17) + 2, 3 * 5 * 7 * 1024 + 6])
def test_split_transform_is_the_transform(n):
    """The channel's transform as two halves side by side equals the whole transform."""
    from concurrent.futures import ThreadPoolExecutor

    x = _white(n, 12)
    with ThreadPoolExecutor(2) as pool:
        split = up._rfft(x, pool.submit)
    whole = np.fft.rfft(x.astype(np.float64))
    assert split.shape == whole.shape
    assert np.abs(split - whole).max() <= 1e-5 * np.abs(whole).max()
