"""The release reader's FFT upsampling, composed with the low-pass and the 128 Hz grid (pure compute).

The SleepFM release's own path (``EDFToHDF5Converter.convert``) reads a recording with MNE
(``read_raw_edf(preload=True)``), which first brings every channel below the file's highest rate ``R``
up to ``R``: ``mne.filter.resample(x, up=M, down=N, npad=0)`` on the whole channel, i.e.

    u = irfft(rfft(x) * M / N, M)      (the old Nyquist bin halved when N is even)

for a channel of ``N`` samples and ``M = round(N * R / rate)``. Only then does the release low-pass
(4th-order Butterworth at 64 Hz, ``filtfilt``, when ``R > 128``), interpolate linearly onto the 128 Hz
grid and z-score. ``u`` is the channel's trigonometric interpolant ``p`` sampled at ``t = m N / M``
(source-sample units), so every value of it, and of the filtered ``u`` away from the ends, is a
value of a trigonometric polynomial that we can evaluate on whatever grid the output needs without
ever building ``u`` at ``R``:

* **interior** -- ``filtfilt`` away from the ends is the filter's zero-phase response, which in the
  frequency domain multiplies bin ``k`` by ``|H(e^{2 pi i k / M})|^2``. When ``R`` is a multiple
  ``d`` of 128 Hz, the 128 Hz output takes every ``d``-th sample of the filtered ``u``: that is the
  filtered polynomial on a grid of ``P = M / d`` points per period, one inverse FFT of the output's
  length (bins above the output's Nyquist fold onto it, exactly as sampling folds them). For any
  other ``R`` with ``R / 128 = p / q`` (500 Hz: 125/32, 1000 Hz: 125/16, 8 kHz: 125/2), the linear
  interpolation needs the filtered ``u`` only at the two neighbours of each output, at most ``2q``
  of every ``p`` samples: each such offset is one small inverse FFT of ``M / p`` points. Only a
  ratio with more than 64 phases builds the filtered ``u`` on its own grid (``M`` float32 samples).
* **ends** -- ``filtfilt`` pads with an odd extension and starts each pass from the steady state of
  its first sample, which the frequency-domain response does not see. Within ``E`` samples of either
  end (``E`` = the filter's decay to 1e-12, see ``preprocess._lowpass``) the output is replaced by an
  exact time-domain ``filtfilt`` over the first and last ``2E`` samples of ``u``; those ``u`` values
  come straight from the spectrum (band by band, a short Taylor series each; no ``M``-sample array).

Without a low-pass (``R <= 128``), ``u`` has at most as many samples as the 128 Hz output and is
built directly. The equality with MNE's resampler followed by the release's filter and interpolation
is proved in ``tests/test_upsample.py`` (rate pairs 1->512, 32->512, 100->200, 256->512, 500->512 and
the release's own fixture).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import fft as sfft

from .iir import butter_lowpass, sosfilt_short, sosfilt_steady_state

__all__ = ["recording_grid_length", "upsampled_resample"]

_PADLEN = 15  # filtfilt's odd extension for a 4th-order filter: 3 * max(len(a), len(b))
_SMALL = 1 << 15  # below this many samples at R, build u whole (cheap) and filter it exactly
_MAX_PHASES = 64  # output phases (the denominator of R / 128) evaluated offset by offset


def recording_grid_length(n: int, rate: float, recording_rate: float) -> int:
    """Samples of a channel of ``n`` samples at ``rate`` once upsampled to ``recording_rate``
    (MNE's ``round(n * up / down)``; exact for EDF, where both are whole samples per record)."""
    return max(1, round(n * float(recording_rate) / float(rate)))


_SPLIT_MIN = 1 << 16  # below this, one transform: splitting would not pay
_BLOCK = 1 << 18  # elements per step where a cached table is computed in float64 (2-4 MB of scratch)


@lru_cache(maxsize=1)
def _split_twiddles(n: int) -> np.ndarray:
    """``exp(-2 pi i k / n)`` for ``k = 0 .. n/4`` (complex64), to join the halves' spectra."""
    out = np.empty(n // 4 + 1, dtype=np.complex64)
    for lo in range(0, out.size, _BLOCK):  # in blocks: no whole-length complex128 temporary
        k = np.arange(lo, min(out.size, lo + _BLOCK), dtype=np.float64)
        out[lo : lo + k.size] = np.exp((-2j * np.pi / n) * k)
    out.flags.writeable = False
    return out


def _rfft(x: np.ndarray, submit: Callable | None) -> np.ndarray:
    """``rfft(x)``; with ``submit`` (a thread pool's) and an even length, as the transforms of the even
    and of the odd samples, run side by side, joined by one twiddle (decimation in time). One 1-D
    transform uses one core, and the halves also share their plan with the 128 Hz output's inverse
    transform (pocketfft keeps a plan, about 4 bytes a sample, for each length it has seen)."""
    n = x.size
    if submit is None or n % 2 or n < _SPLIT_MIN:
        return sfft.rfft(x)
    odd = submit(sfft.rfft, x[1::2])
    even = sfft.rfft(x[0::2])
    twiddled = odd.result()
    twiddled *= _split_twiddles(n)[: twiddled.size]
    half = n // 2
    out = np.empty(half + 1, dtype=np.result_type(even, np.complex64))
    m = even.size  # half // 2 + 1
    np.add(even, twiddled, out=out[:m])
    # bins beyond the halves' own range: X[half - k] = conj(E[k] - W^k O[k])
    even -= twiddled
    np.conjugate(even, out=even)
    out[half - m + 1 :] = even[::-1]
    return out


def _real_coefficients(x: np.ndarray, submit: Callable | None) -> np.ndarray:
    """One-sided coefficients ``a`` with ``p(t) = Re(sum_k a_k exp(2 pi i k t / N)) / N`` the
    trigonometric interpolant of ``x`` as MNE's upsampling evaluates it (Nyquist term split evenly)."""
    n = x.size
    a = _rfft(x, submit)
    a[1 : (n + 1) // 2] *= 2.0  # each positive bin stands for itself and its conjugate
    return a


def _grid_values(a: np.ndarray, n: int, q: int) -> np.ndarray:
    """``p(j * n / q)`` for ``j = 0 .. q-1``: the polynomial on ``q`` points per period."""
    # Re(sum_k a_k e^{2 pi i k j / q}) is the inverse FFT of the Hermitian H_m = (A_m + conj(A_-m)) / 2, where A
    # folds the bins beyond the grid's range onto it (bins k and k + q are the same on this grid).
    half = q // 2 + 1
    herm = np.zeros(half, dtype=a.dtype)
    for lo in range(0, a.size, q):
        part = a[lo : lo + q]
        herm[: min(half, part.size)] += part[:half]
        first, stop = q - half + 1, min(part.size, q)  # bins whose negative, q - i, lands in 1 .. half-1
        if stop > first:
            herm[q - stop + 1 : half][::-1] += np.conj(part[first:stop])
    herm[0] = 2.0 * herm[0].real  # A_0 + conj(A_0)
    herm *= 0.5 * q / n
    return sfft.irfft(herm, q, overwrite_x=True)


def _offset_grids(a: np.ndarray, n: int, m_total: int, p: int, offsets: list[int]) -> dict[int, np.ndarray]:
    """The polynomial at ``u``'s samples ``r p + o`` (``r < M / p``) for each offset ``o``: the few
    phases that a linear interpolation onto a coarser grid needs, without the ``M``-sample array.

    With ``Q = M / p`` and bins folded as ``a_{m + l Q}``, the offset's phase ``e^{2 pi i k o / M}``
    is ``e^{2 pi i m o / M} e^{2 pi i l o / p}``: one small matrix product over ``l`` for all offsets,
    a twist per offset, and one inverse FFT of ``Q`` points each."""
    q2 = m_total // p
    rows = -(-a.size // q2)
    blocks = np.zeros(rows * q2, dtype=np.complex64)
    blocks[: a.size] = a
    offs = np.asarray(sorted(offsets), dtype=np.int64)
    phase = np.exp((2j * np.pi / p) * np.outer(offs, np.arange(rows))).astype(np.complex64)
    folded = phase @ blocks.reshape(rows, q2)  # (offsets, Q)
    del blocks
    # The twists e^{2 pi i m o / M}, offset after offset, as powers of e^{2 pi i m / M} (in complex128, so
    # that up to p products stay exact to ~1e-14).
    step = np.exp((2j * np.pi / m_total) * np.arange(q2, dtype=np.float64))
    twist = np.ones(q2, dtype=np.complex128)
    out, power = {}, 0
    for i, o in enumerate(offs):
        for _ in range(int(o) - power):
            twist *= step
        power = int(o)
        folded[i] *= twist
        out[power] = _grid_values(folded[i], n, q2)
    return out


def _interpolate_offsets(values: dict[int, np.ndarray], head: np.ndarray, tail: np.ndarray, m_total: int,
                         p: int, q: int, n_out: int) -> np.ndarray:
    """``np.interp`` of ``u`` (known at ``r p + o`` through ``values``, exactly near the ends through
    ``head``/``tail``) at the output positions ``j p / q``; past ``u``'s last sample, its last value."""
    edge = head.size
    last = float(tail[-1])

    def at(idx: np.ndarray) -> np.ndarray:
        # one output phase: its samples of u share their offset r p + o
        got = values[int(idx[0] % p)][idx // p].astype(np.float64)
        low, high = idx < edge, idx >= m_total - edge
        got[low] = head[idx[low]]
        got[high] = tail[idx[high] - (m_total - edge)]
        return got

    out = np.full(n_out, last, dtype=np.float32)
    for ph in range(q):
        j = np.arange(ph, n_out, q, dtype=np.int64)
        pos = j * p  # in units of 1/q of a sample of u
        idx, rem = np.divmod(pos, q)
        inside = idx < m_total - 1
        j, idx, rem = j[inside], idx[inside], rem[inside]
        if j.size == 0:
            continue
        lo = at(idx)
        hi = at(idx + 1)
        out[j] = lo + (rem / q) * (hi - lo)
    return out


_TAYLOR_TERMS = 18  # |theta| <= 1/2 below: the first term left out is < 0.5**18 / 18! ~ 6e-22


@lru_cache(maxsize=1)
def _edge_basis(n: int, m_total: int, k: int, n_coef: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The parts of :func:`_edge_values` that depend only on the lengths (shared by a recording's
    channels of one rate): the Taylor matrix (width, terms), the powers of the normalised time
    (terms, 2k), each band's carrier (bands, 2k), and the band width."""
    t = np.arange(-k, k, dtype=np.float64) * (n / m_total)  # source-sample units
    tau = float(np.abs(t).max()) or 1.0
    width = max(1, int(0.5 * n / (np.pi * tau)))  # bins per band, so that |theta| <= 1/2
    n_bands = -(-n_coef // width)
    offset = np.arange(width, dtype=np.float64) - (width - 1) / 2.0
    theta = offset * (2.0 * np.pi * tau / n)
    terms = np.arange(_TAYLOR_TERMS)
    factorial = np.cumprod(np.concatenate([[1.0], np.arange(1, _TAYLOR_TERMS, dtype=np.float64)]))
    taylor = ((1j * theta[:, None]) ** terms[None, :] / factorial[None, :]).astype(np.complex64)
    centre = np.arange(n_bands, dtype=np.float64) * width + (width - 1) / 2.0
    carrier = np.exp((2j * np.pi / n) * np.outer(centre, t))  # (bands, 2k)
    powers = ((t / tau)[None, :] ** terms[:, None]).astype(np.complex128)  # (terms, 2k)
    for arr in (taylor, powers, carrier):
        arr.flags.writeable = False
    return taylor, powers, carrier, width


def _edge_values(a: np.ndarray, n: int, m_total: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``u`` (the upsampled channel, ``m_total`` samples) at its first and its last ``k`` samples.

    Those are ``p(t)`` at ``t = m n / M`` for ``m = -k .. k-1`` (wrapping round the end). The spectrum
    is cut into bands narrow enough that, over that short stretch of ``t``, each band is its centre
    frequency times a polynomial in ``t``: the Taylor series of ``exp(i theta)`` with ``|theta| <= 1/2``,
    exact to float64 with 18 terms. That costs two small matrix products instead of a transform of the
    whole upsampled channel.
    """
    taylor, powers, carrier, width = _edge_basis(n, m_total, k, a.size)
    full = a.size // width
    coef = np.empty((carrier.shape[0], taylor.shape[1]), dtype=np.complex128)  # (bands, terms)
    coef[:full] = a[: full * width].reshape(full, width) @ taylor
    if full < coef.shape[0]:  # the last band is partial: its missing bins are zero
        coef[full] = a[full * width :] @ taylor[: a.size - full * width]
    vals = np.einsum("bm,bm->m", carrier, coef @ powers).real / n
    return vals[k:], vals[:k]


@lru_cache(maxsize=1)  # the channels of one recording share their rates: computed once per rate pair
def _lowpass_response(order: int, cutoff: float, rate: float, n_bins: int, m_total: int) -> np.ndarray:
    """``|H|^2`` at ``omega_k = 2 pi k / M`` for ``k < n_bins``: filtfilt's gain for the digital
    Butterworth that ``scipy.signal.butter`` designs (bilinear transform with a pre-warped cut-off),
    ``1 / (1 + (tan(omega / 2) / tan(omega_c / 2)) ** (2 order))``; float32 (it scales float32 bins)."""
    # In blocks: whole-length float64 temporaries would hold three times the float32 result at once
    # (about 170 MB for a 500 Hz night's channel), at the top of the preprocessing's peak memory.
    ratio = np.empty(n_bins, dtype=np.float32)
    scale = np.tan(np.pi * cutoff / rate)
    for lo in range(0, n_bins, _BLOCK):
        half_omega = np.arange(lo, min(n_bins, lo + _BLOCK), dtype=np.float64) * (np.pi / m_total)
        np.tan(half_omega, out=half_omega)
        half_omega /= scale
        ratio[lo : lo + half_omega.size] = half_omega
    ratio **= 2 * order
    ratio += 1.0
    np.reciprocal(ratio, out=ratio)
    ratio.flags.writeable = False
    return ratio


def _filtfilt(sos: np.ndarray, x: np.ndarray) -> np.ndarray:
    """scipy's ``filtfilt`` (odd padding, steady-state start of each pass) in float64."""
    # imported here: only channels short enough to build whole need it (inference.iir says why)
    from scipy import signal

    return signal.sosfiltfilt(sos, x, padtype="odd", padlen=min(_PADLEN, x.size - 1))


def _left_end(sos: np.ndarray, zi: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``filtfilt`` of the whole channel on its first samples, from ``u``'s first ``len(u)``;
    exact up to the backward pass's start-up, which has decayed by ``len(u) / 2`` samples in."""
    pad = 2.0 * u[0] - u[_PADLEN:0:-1]
    return _forward_backward(sos, zi, np.concatenate([pad, u]))[_PADLEN:]


def _right_end(sos: np.ndarray, zi: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The same on the channel's last samples; the forward pass's start-up decays the same way."""
    pad = 2.0 * u[-1] - u[-2 : -_PADLEN - 2 : -1]
    return _forward_backward(sos, zi, np.concatenate([u, pad]))[: u.size]


def _forward_backward(sos: np.ndarray, zi: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """``ext`` filtered forward then backward, each pass from the steady state of its first sample."""
    fwd, _ = sosfilt_short(sos, ext, zi * ext[0])
    back, _ = sosfilt_short(sos, fwd[::-1], zi * fwd[-1])
    return back[::-1]


def upsampled_resample(
    x: np.ndarray,
    rate: float,
    recording_rate: float,
    target_rate: float,
    n_out: int,
    *,
    cutoff: float,
    order: int,
    edge: int,
    interpolate: Callable[[np.ndarray, float, float, int], np.ndarray],
    submit: Callable | None = None,
) -> np.ndarray:
    """What the release makes of ``x`` (centred samples at ``rate``) before its z-score.

    Parameters
    ----------
    x : ndarray
        The channel's samples, float32 (or float64 for float64 transforms), centred on their mean:
        the result is linear in ``x`` and centring keeps float32 precision for offsets like SpO2's.
    rate, recording_rate : float
        The channel's rate and the recording's highest rate ``R`` (``R > rate``).
    target_rate : float
        Output rate (128 Hz).
    n_out : int
        Output samples; positions past the upsampled channel's end hold its last value.
    cutoff, order : float, int
        The release's low-pass (64 Hz, 4), applied at ``R`` when ``R > target_rate``.
    edge : int
        Samples at ``R`` from each end within which the frequency-domain response is replaced by the
        exact ``filtfilt`` (the filter's decay length).
    interpolate : callable
        ``interpolate(y, rate, target_rate, n_out)``: the linear interpolation onto the output grid,
        ``y`` float32 at ``rate`` (``preprocess._interpolate``).
    submit : callable, optional
        A thread pool's ``submit``: the channel's transform then runs as two halves side by side.

    Returns
    -------
    ndarray
        float32, ``n_out`` samples at ``target_rate``.
    """
    n = x.size
    m_total = recording_grid_length(n, rate, recording_rate)
    a = _real_coefficients(x, submit)
    if recording_rate <= target_rate:  # no low-pass: u is no longer than the output itself
        u = _grid_values(a, n, m_total)
        return interpolate(u.astype(np.float32), recording_rate, target_rate, n_out)

    sos = butter_lowpass(order, cutoff, recording_rate)
    zi = sosfilt_steady_state(sos)
    k = max(2 * edge, 4 * _PADLEN)
    # Build u whole and filter it exactly when that is cheap: a short channel, or a filter so close to
    # the top rate's Nyquist frequency (R just above 128 Hz) that its ends reach far and the band-wise
    # evaluation there (about pi k N / M bands times 2k points) would cost more than the whole of u.
    if m_total <= max(_SMALL, 4 * k) or np.pi * k * n / m_total * 2 * k > m_total:
        y = _filtfilt(sos, _grid_values(a, n, m_total))
        return interpolate(y.astype(np.float32), recording_rate, target_rate, n_out)

    u_head, u_tail = _edge_values(a, n, m_total, k)
    head = _left_end(sos, zi, u_head)[:edge]
    tail = _right_end(sos, zi, u_tail)[k - edge :]
    a *= _lowpass_response(order, cutoff, recording_rate, a.size, m_total)

    step = recording_rate / target_rate
    d = round(step)
    if abs(step - d) < 1e-9 and m_total % d == 0:
        # The output grid is every d-th sample of the filtered u: evaluate it there directly.
        p_len = m_total // d
        main = _grid_values(a, n, p_len)
        out = np.empty(n_out, dtype=np.float32)
        n_main = min(n_out, p_len)
        out[:n_main] = main[:n_main]
        j_head = min(n_main, -(-edge // d))  # outputs j with j * d < edge
        out[:j_head] = head[: j_head * d : d]
        j_tail = -(-(m_total - edge) // d)  # first output j with j * d >= M - edge
        if j_tail < n_main:
            offset = j_tail * d - (m_total - edge)
            out[j_tail:n_main] = tail[offset::d][: n_main - j_tail]
        out[n_main:] = tail[-1]  # past the end of u: np.interp holds the last value
        return out

    ratio = Fraction(recording_rate) / Fraction(target_rate)
    p, q = ratio.numerator, ratio.denominator
    if ratio.denominator <= _MAX_PHASES and m_total % p == 0:
        # The linear interpolation needs u only at the two neighbours of each output: p/q = 125/32
        # (500 Hz) needs at most 64 of every 125 samples of u, 8 kHz (125/2) only 4.
        offsets = sorted({(ph * p // q + step) % p for ph in range(q) for step in (0, 1)})
        values = _offset_grids(a, n, m_total, p, offsets)
        return _interpolate_offsets(values, head, tail, m_total, p, q, n_out)

    y = _grid_values(a, n, m_total)  # rates without a short ratio: u on its own grid
    y[:edge] = head
    y[m_total - edge :] = tail
    return interpolate(y.astype(np.float32), recording_rate, target_rate, n_out)

