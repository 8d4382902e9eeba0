"""The release's Butterworth low-pass as second-order sections, designed without ``scipy.signal``.

``scipy.signal`` takes about 0.8 s to import (its package imports ``scipy.stats``, its windows and its
LTI systems), 5-6 % of a whole-night ``psg-gateway infer``, and the preprocessing of a channel that the
release upsamples needs from it only the filter's coefficients and a few hundred samples of recursion
at each end of the channel. Those are textbook formulas, kept here and checked against
``scipy.signal.butter``, ``sosfilt_zi`` and ``sosfilt`` in ``tests/test_iir.py`` (to ~1e-13). The
full-length recursion of a channel at the recording's top rate still uses scipy's compiled kernel
(:mod:`inference.preprocess` imports it beside the first upsampled channel's transforms).
"""

from __future__ import annotations

import numpy as np

__all__ = ["butter_lowpass", "sosfilt_short", "sosfilt_steady_state"]


def butter_lowpass(order: int, cutoff: float, rate: float) -> np.ndarray:
    """``scipy.signal.butter(order, cutoff, btype="low", fs=rate, output="sos")``.

    Parameters
    ----------
    order : int
        Filter order, even (the release's is 4): an odd order's real pole is where scipy's section
        layout depends on the pole geometry, which is not reproduced here.
    cutoff : float
        -3 dB frequency in Hz, ``0 < cutoff < rate / 2``.
    rate : float
        Sampling rate in Hz.

    Returns
    -------
    numpy.ndarray
        ``(order / 2, 6)`` float64 sections ``[b0, b1, b2, 1, a1, a2]``, ordered as scipy's
        ``zpk2sos`` orders them (the poles nearest the unit circle last), the gain in the first.
    """
    if order < 2 or order % 2 or not 0.0 < cutoff < rate / 2.0:
        raise ValueError(f"need an even order >= 2 and 0 < cutoff < rate / 2, got order {order}, cutoff {cutoff}, "
                         f"rate {rate}")
    # Analog prototype poles, scaled to the pre-warped cut-off (scipy works at fs = 2, so the warp is
    # 4 tan(pi Wn / 2) with Wn = 2 cutoff / rate), then the bilinear transform z = (4 + s) / (4 - s).
    warped = 4.0 * np.tan(np.pi * (2.0 * cutoff / rate) / 2.0)
    analog = -np.exp(1j * np.pi * np.arange(-order + 1, order, 2) / (2 * order)) * warped
    gain = float(np.real(warped**order / np.prod(4.0 - analog)))
    poles = (4.0 + analog) / (4.0 - analog)
    # One section per conjugate pair (the member above the real axis), both zeros at z = -1; zpk2sos fills
    # its sections from the last, each time with the pair left nearest the unit circle.
    upper = sorted((p for p in poles if p.imag > 0), key=lambda p: -abs(1.0 - abs(p)))
    sos = np.array([[1.0, 2.0, 1.0, 1.0, -2.0 * p.real, abs(p) ** 2] for p in upper])
    sos[0, :3] *= gain
    return sos


def sosfilt_steady_state(sos: np.ndarray) -> np.ndarray:
    """``scipy.signal.sosfilt_zi(sos)``: each section's state after a unit step has settled,
    ``(n_sections, 2)`` float64 (multiply by a channel's first sample to start a pass from it)."""
    zi = np.empty((len(sos), 2))
    scale = 1.0
    for i, (b0, b1, b2, _, a1, a2) in enumerate(np.asarray(sos, dtype=np.float64)):
        # lfilter_zi: solve (I - A^T) z = B - a * b0 for the transposed direct form II's companion A
        lhs = np.array([[1.0 + a1, -1.0], [a2, 1.0]])
        rhs = np.array([b1 - a1 * b0, b2 - a2 * b0])
        zi[i] = scale * np.linalg.solve(lhs, rhs)
        scale *= (b0 + b1 + b2) / (1.0 + a1 + a2)
    return zi


def sosfilt_short(sos: np.ndarray, x: np.ndarray, zi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.signal.sosfilt(sos, x, zi=zi)`` in float64 for a short 1-D ``x`` (a Python loop: a few
    hundred samples at a channel's ends, not a channel). Returns ``(y, zf)``."""
    y = np.asarray(x, dtype=np.float64).tolist()
    zf = np.array(zi, dtype=np.float64)
    for i, (b0, b1, b2, _, a1, a2) in enumerate(np.asarray(sos, dtype=np.float64).tolist()):
        z0, z1 = float(zf[i, 0]), float(zf[i, 1])
        for n, v in enumerate(y):  # transposed direct form II, as scipy's kernel
            out = b0 * v + z0
            z0 = b1 * v - a1 * out + z1
            z1 = b2 * v - a2 * out
            y[n] = out
        zf[i] = (z0, z1)
    return np.array(y), zf
