"""inference.iir: the release's low-pass designed without importing scipy.signal gives scipy.signal's
coefficients, steady states and recursion."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from inference.iir import butter_lowpass, sosfilt_short, sosfilt_steady_state

RATES = (100.0, 128.5, 200.0, 256.0, 500.0, 512.0, 1000.0, 8000.0)


@pytest.mark.parametrize("order", [2, 4, 6, 8])
@pytest.mark.parametrize("rate", RATES)
def test_coefficients_and_steady_state_match_scipy(order: int, rate: float) -> None:
    for cutoff in (1.0, 30.0, 64.0, 0.45 * rate):
        if cutoff >= rate / 2.0:
            continue
        want = signal.butter(order, cutoff, btype="low", fs=rate, output="sos")
        got = butter_lowpass(order, cutoff, rate)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14 * np.abs(want).max())
        zi_want = signal.sosfilt_zi(want)
        # (a 1 Hz cut-off at 8 kHz leaves the 2x2 systems ill-conditioned: ~1e-10 there, ~1e-15 elsewhere)
        np.testing.assert_allclose(sosfilt_steady_state(got), zi_want, rtol=0, atol=1e-9 * np.abs(zi_want).max())


def test_short_recursion_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    sos = butter_lowpass(4, 64.0, 512.0)
    for n in (1, 2, 17, 400):
        x = rng.standard_normal(n) * 50.0 + 7.0
        zi = sosfilt_steady_state(sos) * x[0]
        y, zf = sosfilt_short(sos, x, zi)
        y_want, zf_want = signal.sosfilt(sos, x, zi=zi)
        np.testing.assert_allclose(y, y_want, rtol=1e-13, atol=1e-12)
        np.testing.assert_allclose(zf, zf_want, rtol=1e-13, atol=1e-12)
    assert zi.flags.writeable and np.array_equal(zi, sosfilt_steady_state(sos) * x[0])  # input left alone


@pytest.mark.parametrize(("order", "cutoff"), [(3, 30.0), (0, 30.0), (4, 0.0), (4, 256.0), (4, 300.0)])
def test_refuses_what_it_does_not_reproduce(order: int, cutoff: float) -> None:
    with pytest.raises(ValueError, match="even order"):
        butter_lowpass(order, cutoff, 512.0)
