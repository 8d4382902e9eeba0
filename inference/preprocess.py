"""SleepFM-compatible preprocessing of one PSG channel to 128 Hz (pure compute, no I/O).

The release's own path reads a recording with MNE, which first FFT-upsamples every channel below the
recording's highest rate to that rate; ``recording_rate=`` reproduces that step without building the
upsampled channel (see :mod:`inference.upsample`, which composes it with steps 1 and 2 below). Then,
per channel, at the (upsampled) rate:

1. if the sampling rate is above 128 Hz, a 4th-order Butterworth low-pass at 64 Hz applied
   forward-backward (``filtfilt``: odd extension of 15 samples at each end, steady-state initial
   conditions scaled by the first sample of each pass);
2. linear interpolation onto the 128 Hz grid ``t_k = k / 128`` s for ``k = 0 .. n_out - 1`` (the
   same grid as ``np.arange(0, duration, 1/128)``) from the source times ``i / rate``; output
   times past the last source sample hold its value (``np.interp`` semantics);
3. a per-channel z-score with the population standard deviation (``ddof=0``); a zero-variance
   channel is only centred.

This module reproduces that to float32 precision (max |diff| ~1e-6 on the reference fixture) while
working in float32 and channel by channel:

* the filter is a float32 second-order-sections cascade designed once per rate (cached), run in
  place on a single padded float32 buffer (no float64 copy of the channel is ever made);
* with more than one worker thread, each filter pass is split into blocks that start from a
  state obtained by a warm-up over the preceding samples; the warm-up is long enough for the
  start-up error to decay far below float32 resolution, so the result matches the serial pass;
* interpolation is exact index arithmetic: integer ratios are strided slices, rational ratios
  (500 Hz -> 128 Hz is 125/32) use a periodic table of neighbour offsets and float32 weights,
  and any other rate falls back to chunked float64 positions (only ``_CHUNK`` elements at a time);
* mean and variance are accumulated in float64 scalars from float32 chunks.

Because filtering and interpolation are linear and preserve constants, the input is centred on
its own mean while it is converted to float32; this keeps float32 precision for channels with a
large DC offset (e.g. SpO2 around 95 %) and makes a constant channel come out exactly zero.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import lru_cache
from typing import TypeVar

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .iir import butter_lowpass, sosfilt_steady_state

__all__ = [
    "FILTER_ORDER",
    "STORED_DTYPE",
    "TARGET_RATE",
    "n_target_samples",
    "preprocess_channel",
    "resample_to_target",
    "standardize",
]

TARGET_RATE = 128.0
"""Sampling rate (Hz) of every preprocessed channel."""

FILTER_ORDER = 4
"""Order of the Butterworth anti-aliasing low-pass (cut-off at half the target rate)."""

STORED_DTYPE = np.float16
"""The dtype a night's 128 Hz signals are kept in for the encoder: the release stores its preprocessed
signals as float16 (HDF5) and its encoder reads those, so rounding them the same way is the release's
model input (and half the memory of float32). Preprocessing itself runs in float32; the encoder
computes in float32 (or the chosen precision)."""

# scipy's filtfilt(b, a) pads 3 * max(len(a), len(b)) = 15 samples for a 4th-order filter, and
# sosfiltfilt pads 3 * (2 * n_sections + 1) = 15 as well.
_PADLEN = 3 * (FILTER_ORDER + 1)

_CHUNK = 1 << 16  # elements per chunk for chunked float64 work / temporaries
_MIN_PARALLEL = 1 << 19  # below this many samples a pass is not split across threads
_MAX_RATIONAL_DEN = 4096  # largest denominator of rate/target handled by the periodic table
_LENGTH_TOL = 1e-6  # fraction of a sample ignored when turning a duration into a sample count
_WARMUP_EPS = 1e-12  # start-up error left after a block's warm-up (relative to signal scale)

_F32 = np.float32

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# threading helpers
# --------------------------------------------------------------------------------------------


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


_DEFAULT_WORKERS = max(1, min(4, _available_cpus()))
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=_DEFAULT_WORKERS, thread_name_prefix="psg-preprocess")
        return _POOL


def set_default_workers(n: int) -> None:
    """Threads one channel's preprocessing may use (default: up to 4). A process that is itself one of
    several parallel workers (an archive batch) sets 1, so the workers do not fight over the cores.

    Process-wide: it caps the ``workers`` argument of every function here, and the next call makes
    a thread pool of the new size.

    Parameters
    ----------
    n : int
        Threads, at least 1.

    Raises
    ------
    ValueError
        When ``n < 1``.
    """
    global _DEFAULT_WORKERS, _POOL
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    with _POOL_LOCK:
        _DEFAULT_WORKERS = int(n)
        _POOL = None  # the next call makes a pool of the new size


def _forget_threads_after_fork() -> None:  # pragma: no cover - runs in forked children
    # A forked child inherits the executor object but not its threads; start a fresh one there. Its
    # locks may have been held by a thread that the child lacks, the filter kernel's loader among them.
    global _POOL, _POOL_LOCK, _KERNEL_LOCK, _LOADER_LOCK, _KERNEL_LOADER
    _POOL = None
    _POOL_LOCK = threading.Lock()
    _KERNEL_LOCK = threading.Lock()
    _LOADER_LOCK = threading.Lock()
    _KERNEL_LOADER = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads_after_fork)


def _resolve_workers(workers: int | None) -> int:
    if workers is None:
        return _DEFAULT_WORKERS
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return min(int(workers), _DEFAULT_WORKERS)


def _run_split(fn: Callable[[int, int], T], n: int, workers: int, min_part: int = _MIN_PARALLEL) -> list[T]:
    """Run ``fn(lo, hi)`` over up to ``workers`` contiguous ranges of ``[0, n)`` of at least
    ``min_part`` each; the caller's thread takes the first range."""
    parts = max(1, min(workers, n // max(1, min_part))) if n > 0 else 1
    if parts == 1:
        return [fn(0, n)]
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_pool().submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    first = fn(bounds[0], bounds[1])
    return [first] + [f.result() for f in futures]


# --------------------------------------------------------------------------------------------
# filtering
# --------------------------------------------------------------------------------------------

def _load_kernel() -> Callable | None:
    """scipy's in-place kernel (what ``scipy.signal.sosfilt`` calls after copying its input), checked
    once against the public ``sosfilt``; None where it is missing or does not behave alike.

    Imported on first use, not with this module: ``scipy.signal`` takes ~0.8 s to import, and a
    channel that the release upsamples never needs it (see :mod:`inference.iir`)."""
    with _KERNEL_LOCK:
        if "kernel" not in _KERNEL:
            _KERNEL["kernel"] = _checked_kernel()
        return _KERNEL["kernel"]


_KERNEL: dict[str, Callable | None] = {}
_KERNEL_LOCK = threading.Lock()


def _checked_kernel() -> Callable | None:
    from scipy import signal

    try:
        from scipy.signal._sosfilt import _sosfilt as kernel  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - depends on the scipy build
        return None
    try:
        sos = signal.butter(FILTER_ORDER, 0.3, output="sos").astype(_F32)
        x = np.linspace(-1.0, 1.0, 64, dtype=_F32) ** 3
        zi = (signal.sosfilt_zi(sos) * 0.5).astype(_F32)
        want, want_zf = signal.sosfilt(sos, x, zi=zi)
        got = x.copy().reshape(1, -1)
        state = zi.copy().reshape(1, -1, 2)
        kernel(sos, got, state)
        works = bool(np.allclose(got[0], want, atol=1e-6) and np.allclose(state[0], want_zf, atol=1e-6))
    except (TypeError, ValueError, RuntimeError):  # pragma: no cover
        works = False
    return kernel if works else None


def _load_kernel_beside() -> None:
    """Start loading the kernel on a thread of its own (once): called by a channel that the release
    upsamples, whose transforms leave the interpreter free, since the recording's channels at its top
    rate will need the kernel."""
    global _KERNEL_LOADER
    with _LOADER_LOCK:  # not _KERNEL_LOCK, which the loader holds while it imports
        if _KERNEL_LOADER is not None or "kernel" in _KERNEL:
            return
        _KERNEL_LOADER = threading.Thread(target=_load_kernel, name="psg-filter-kernel", daemon=True)
        _KERNEL_LOADER.start()


_KERNEL_LOADER: threading.Thread | None = None
_LOADER_LOCK = threading.Lock()


def _sosfilt_inplace(sos: np.ndarray, x: np.ndarray, state: np.ndarray) -> None:
    """Filter the contiguous float32 1-D array ``x`` in place; ``state`` (n_sections, 2) float32
    is the initial state on entry and the final state on return."""
    if x.size == 0:
        return
    kernel = _load_kernel()
    if kernel is not None:
        z = state.reshape(1, -1, 2)
        kernel(sos, x.reshape(1, -1), z)
    else:  # pragma: no cover - fallback for scipy builds without the private kernel
        from scipy import signal

        y, zf = signal.sosfilt(sos, x, zi=state)
        x[...] = y
        state[...] = zf


@lru_cache(maxsize=64)
def _lowpass(rate: float, cutoff: float) -> tuple[np.ndarray, np.ndarray, int]:
    """float32 SOS, float32 steady-state ``zi`` (for a unit step) and the warm-up length."""
    sos = butter_lowpass(FILTER_ORDER, cutoff, rate)
    zi = sosfilt_steady_state(sos)
    radius = max(float(np.abs(np.roots(section[3:])).max()) for section in sos)
    if radius <= 0.0:  # pragma: no cover - not a Butterworth low-pass
        warmup = 16
    elif radius >= 1.0:  # pragma: no cover - unstable; never split
        warmup = 1 << 62
    else:
        warmup = math.ceil(math.log(_WARMUP_EPS) / math.log(radius)) + 32
    sos32 = np.ascontiguousarray(sos, dtype=_F32)
    zi32 = np.ascontiguousarray(zi, dtype=_F32)
    zi32.flags.writeable = False  # (sos32 stays writeable: scipy's kernel takes a writable view)
    return sos32, zi32, warmup


def _filter_pass(sos: np.ndarray, zi: np.ndarray, warmup: int, x: np.ndarray, workers: int) -> None:
    """One causal pass over ``x`` in place, starting from ``zi * x[0]`` like ``filtfilt``."""
    n = x.size
    parts = max(1, min(workers, n // max(_MIN_PARALLEL, 8 * warmup)))
    states = [zi * x[0]]
    if parts == 1:
        _sosfilt_inplace(sos, x, states[0])
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    # Block i > 0 starts from the state reached by filtering the `warmup` samples before it
    # (from the steady state of their first sample); taken before any block is modified.
    for b in bounds[1:-1]:
        head = np.array(x[b - warmup : b])
        state = zi * head[0]
        _sosfilt_inplace(sos, head, state)
        states.append(state)

    def work(i: int) -> None:
        _sosfilt_inplace(sos, x[bounds[i] : bounds[i + 1]], states[i])

    futures = [_pool().submit(work, i) for i in range(1, parts)]
    work(0)
    for f in futures:
        f.result()


def _reverse_inplace(x: np.ndarray) -> None:
    """Reverse a 1-D array in place using only chunk-sized temporaries."""
    i, j = 0, x.size
    tmp = np.empty(min(_CHUNK, x.size // 2 + 1), dtype=x.dtype)
    while j - i >= 2 * tmp.size and tmp.size > 0:
        c = tmp.size
        tmp[...] = x[i : i + c]
        x[i : i + c] = x[j - c : j][::-1]
        x[j - c : j] = tmp[::-1]
        i += c
        j -= c
    if j - i > 1:
        x[i:j] = x[i:j][::-1].copy()


def _filtfilt_centered(
    samples: np.ndarray, center: float, rate: float, cutoff: float, workers: int
) -> np.ndarray:
    """``filtfilt`` of ``samples - center`` as a float32 array of the same length."""
    sos, zi, warmup = _lowpass(float(rate), float(cutoff))
    n = samples.size
    pad = min(_PADLEN, n - 1)  # scipy needs len > padlen; shorter channels get a shorter pad
    buf = np.empty(n + 2 * pad, dtype=_F32)
    data = buf[pad : pad + n]
    _to_centered_f32(samples, center, data, workers)
    if pad > 0:
        # odd extension: 2*x[0] - x[pad:0:-1] and 2*x[-1] - x[-2:-pad-2:-1]
        np.subtract(_F32(2.0) * data[0], data[pad:0:-1], out=buf[:pad])
        np.subtract(_F32(2.0) * data[-1], data[-2 : -pad - 2 : -1], out=buf[pad + n :])
    _filter_pass(sos, zi, warmup, buf, workers)
    _reverse_inplace(buf)
    _filter_pass(sos, zi, warmup, buf, workers)
    _reverse_inplace(buf)
    return buf[pad : pad + n]


# --------------------------------------------------------------------------------------------
# conversion and interpolation
# --------------------------------------------------------------------------------------------


def _to_centered_f32(samples: np.ndarray, center: float, out: np.ndarray, workers: int) -> None:
    """``out[:] = samples - center`` in float32 (float64 arithmetic in chunks for float64 input)."""
    c: float | np.floating = _F32(center) if samples.dtype == _F32 else np.float64(center)

    def work(lo: int, hi: int) -> None:
        np.subtract(samples[lo:hi], c, out=out[lo:hi], casting="unsafe")

    _run_split(work, samples.size, workers)


def _rational(rate: float, target_rate: float) -> tuple[int, int] | None:
    """``rate / target_rate`` as an exact fraction ``(p, q)`` with a small denominator, else None."""
    ratio = Fraction(rate) / Fraction(target_rate)
    if ratio.denominator <= _MAX_RATIONAL_DEN and ratio.numerator < (1 << 31):
        return ratio.numerator, ratio.denominator
    return None


def _interp_positions(
    y: np.ndarray, out: np.ndarray, k0: int, k1: int, frac_ratio: tuple[int, int] | None, ratio: float
) -> None:
    """General case: out[k] for k in [k0, k1) at source position k * ratio (exact if rational);
    positions at or past the last sample hold its value."""
    last = y.size - 1
    for s in range(k0, k1, _CHUNK):
        e = min(s + _CHUNK, k1)
        k = np.arange(s, e, dtype=np.int64)
        if frac_ratio is not None:
            p, q = frac_ratio
            idx, rem = np.divmod(k * p, q)
            frac = (rem / q).astype(_F32)
        else:
            pos = k * ratio
            idx = np.floor(pos).astype(np.int64)
            frac = (pos - idx).astype(_F32)
        past = idx >= last
        np.minimum(idx, last, out=idx)
        frac[past] = 0.0
        lo = y[idx]
        hi = y[np.minimum(idx + 1, last)]
        hi -= lo
        hi *= frac
        hi += lo
        out[s:e] = hi


def _interpolate(y: np.ndarray, rate: float, target_rate: float, n_out: int, workers: int) -> np.ndarray:
    """Linear interpolation of ``y`` (float32, contiguous, sampled at ``rate`` from t=0) at
    ``k / target_rate`` for ``k < n_out``; times past the last sample hold its value."""
    n = y.size
    out = np.empty(n_out, dtype=_F32)
    pq = _rational(rate, target_rate)
    if pq is None:
        ratio = float(rate) / float(target_rate)
        _run_split(lambda lo, hi: _interp_positions(y, out, lo, hi, None, ratio), n_out, workers)
        return out

    p, q = pq
    # Output k = r*q + j (period r, phase j) sits at source index r*p + off[j] + w[j].
    n_rows = min((n - 1) // p, n_out // q)  # full periods whose neighbours all lie inside y
    if n_rows > 0:
        if q == 1:  # integer decimation (or identity): a strided slice, no arithmetic

            def rows_work(lo: int, hi: int) -> None:
                out[lo:hi] = y[lo * p : hi * p : p]

            _run_split(rows_work, n_rows, workers)
        elif p == 1:  # integer upsampling: out[r*q + j] = y[r] + w[j] * (y[r+1] - y[r])
            w = (np.arange(q, dtype=np.float64) / q).astype(_F32)
            rows_per_chunk = max(1, _CHUNK // q)

            def rows_work(lo: int, hi: int) -> None:
                for r0 in range(lo, hi, rows_per_chunk):
                    r1 = min(r0 + rows_per_chunk, hi)
                    block = out[r0 * q : r1 * q].reshape(r1 - r0, q)
                    diff = y[r0 + 1 : r1 + 1] - y[r0:r1]
                    np.multiply(diff[:, None], w, out=block)
                    block += y[r0:r1, None]

            _run_split(rows_work, n_rows, workers, max(1, _MIN_PARALLEL // q))
        else:
            phase = np.arange(q, dtype=np.int64) * p
            off = phase // q
            off_next = off + 1
            w = ((phase % q) / q).astype(_F32)
            step = y.strides[0]
            table = as_strided(y, shape=(n_rows, p + 1), strides=(p * step, step), writeable=False)
            rows_per_chunk = max(1, _CHUNK // q)

            def rows_work(lo: int, hi: int) -> None:
                for r0 in range(lo, hi, rows_per_chunk):
                    r1 = min(r0 + rows_per_chunk, hi)
                    block = out[r0 * q : r1 * q].reshape(r1 - r0, q)
                    src = table[r0:r1]
                    block[...] = src[:, off]
                    nxt = src[:, off_next]
                    nxt -= block
                    nxt *= w
                    block += nxt

            _run_split(rows_work, n_rows, workers, max(1, _MIN_PARALLEL // q))
    done = n_rows * q
    if done < n_out:
        _run_split(
            lambda lo, hi: _interp_positions(y, out, done + lo, done + hi, (p, q), 0.0),
            n_out - done,
            workers,
        )
    return out


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_samples(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D array of samples, got shape {x.shape}")
    if x.size == 0:
        raise ValueError("cannot preprocess an empty channel (0 samples)")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"expected real numeric samples, got dtype {x.dtype}")
    return x


def _check_rate(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _finite_mean(x: np.ndarray, workers: int, what: str) -> float:
    """Mean accumulated in float64; raises ValueError naming non-finite values."""
    total = math.fsum(
        _run_split(lambda lo, hi: float(np.add.reduce(x[lo:hi], dtype=np.float64)), x.size, workers)
    )
    mean = total / x.size
    if not math.isfinite(mean):
        bad = x.size - int(np.count_nonzero(np.isfinite(x))) if x.dtype.kind == "f" else 0
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(x)))
            raise ValueError(
                f"{what} contains {bad} non-finite value(s) ({n_nan} NaN, {bad - n_nan} infinite); "
                "gaps must be handled before preprocessing"
            )
        raise ValueError(f"{what} values are too large to average in float64")
    return mean


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def n_target_samples(duration_s: float, target_rate: float = TARGET_RATE) -> int:
    """Number of output samples for a recording of ``duration_s`` seconds at ``target_rate``.

    This is ``len(np.arange(0, duration_s, 1 / target_rate))`` = ``ceil(duration_s * target_rate)``,
    except that float noise below 1e-6 of a sample is ignored (600.0000000001 s -> 76800, not 76801).
    Pass the same value as ``n_out`` for every channel of a recording so that they line up.

    Parameters
    ----------
    duration_s : float
        The recording's duration in seconds (e.g. samples / rate of its longest channel).
    target_rate : float, default 128.0
        Output rate in Hz.

    Returns
    -------
    int
        Output samples, at least 1.

    Raises
    ------
    ValueError
        A duration or rate that is not a positive finite number.

    Examples
    --------
    >>> n_target_samples(600.0000000001)
    76800
    >>> n_target_samples(30.001)
    3841
    """
    d = float(duration_s)
    rate = _check_rate("target_rate", target_rate)
    if not math.isfinite(d) or d <= 0.0:
        raise ValueError(f"duration_s must be a positive finite number, got {duration_s!r}")
    return max(1, math.ceil(d * rate - _LENGTH_TOL))


def _needs_upsampling(rate: float, recording_rate: float | None) -> bool:
    if recording_rate is None:
        return False
    r = _check_rate("recording_rate", recording_rate)
    if r < rate * (1.0 - 1e-9):
        raise ValueError(f"recording_rate {r} Hz is below the channel's own rate {rate} Hz")
    return r > rate * (1.0 + 1e-9)


def _resample_centered(
    samples: np.ndarray,
    rate: float,
    target_rate: float,
    n_out: int | None,
    workers: int | None,
    always_center: bool,
    recording_rate: float | None = None,
    overwrite_input: bool = False,
) -> tuple[np.ndarray, float]:
    """Resample ``samples - center``; returns the float32 result and ``center``. The centre is
    the channel mean when filtering, upsampling or when ``always_center``, else 0 (exact pass-through)."""
    x = _check_samples(samples)
    rate = _check_rate("rate", rate)
    target_rate = _check_rate("target_rate", target_rate)
    nw = _resolve_workers(workers)
    if n_out is None:
        n_out = n_target_samples(x.size / rate, target_rate)
    elif int(n_out) != n_out or n_out < 1:
        raise ValueError(f"n_out must be a positive integer, got {n_out!r}")
    n_out = int(n_out)
    center = _finite_mean(x, nw, "channel")
    if _needs_upsampling(rate, recording_rate):
        # Imported here: upsample is a leaf that receives this module's interpolation as a callable.
        from .upsample import upsampled_resample

        assert recording_rate is not None
        if recording_rate > target_rate:
            _load_kernel_beside()  # the channels at the top rate will filter in the time domain
        # the filter's decay length at the top rate: how far from each end filtfilt's padding reaches
        edge = _lowpass(float(recording_rate), target_rate / 2.0)[2] if recording_rate > target_rate else 0
        if overwrite_input and x.dtype == _F32 and x.flags.c_contiguous and x.flags.writeable:
            centred = x  # the caller's own copy: centre it in place rather than hold a second one
        else:
            centred = np.empty(x.size, dtype=_F32)
        _to_centered_f32(x, center, centred, nw)
        out = upsampled_resample(
            centred, rate, float(recording_rate), target_rate, n_out,
            cutoff=target_rate / 2.0, order=FILTER_ORDER, edge=edge,
            interpolate=lambda y, r, t, n: _interpolate(y, r, t, n, nw),
            submit=_pool().submit if nw > 1 else None,
        )
        return out, center
    if not (always_center or rate > target_rate):
        center = 0.0

    if rate > target_rate:
        y = _filtfilt_centered(x, center, rate, target_rate / 2.0, nw)
    else:
        if rate == target_rate and n_out <= x.size:  # grids coincide: convert straight into the output
            out = np.empty(n_out, dtype=_F32)
            _to_centered_f32(x[:n_out], center, out, nw)
            return out, center
        y = np.empty(x.size, dtype=_F32)
        _to_centered_f32(x, center, y, nw)
    return _interpolate(y, rate, target_rate, n_out, nw), center


def resample_to_target(
    samples: np.ndarray,
    rate: float,
    target_rate: float = TARGET_RATE,
    n_out: int | None = None,
    *,
    workers: int | None = None,
    recording_rate: float | None = None,
) -> np.ndarray:
    """Resample one channel to ``target_rate`` (no z-score), returning a new float32 array.

    If ``rate > target_rate`` the channel is first low-pass filtered (4th-order Butterworth at
    ``target_rate / 2``, forward-backward, scipy ``filtfilt`` padding). It is then linearly
    interpolated at ``k / target_rate`` seconds for ``k = 0 .. n_out - 1``, with sample ``i`` of
    the input at ``i / rate`` seconds. Output times past the last input sample hold the last
    (filtered) value, so ``n_out`` may exceed what the data covers.

    Parameters
    ----------
    samples : numpy.ndarray
        1-D real samples (any float or integer dtype; float32 avoids a conversion).
    rate : float
        Sampling rate of ``samples`` in Hz.
    target_rate : float, default 128.0
        Output rate in Hz.
    n_out : int, optional
        Output length; default ``n_target_samples(len(samples) / rate, target_rate)``.
        Pass the recording-wide value so all channels have the same length.
    workers : int, optional
        Threads to use (default: up to 4, the CPUs available; never more than
        :func:`set_default_workers` allows); 1 runs serially.
    recording_rate : float, optional
        The recording's highest rate. A channel below it is first treated as the release's MNE
        reader treats it, FFT-upsampled to that rate (see :mod:`inference.upsample`), and the
        low-pass then applies when ``recording_rate > target_rate``. ``None`` (or the channel's own
        rate) skips that step.

    Returns
    -------
    numpy.ndarray
        A new float32 array of shape ``(n_out,)``.

    Raises
    ------
    ValueError
        Empty or non-1-D input, non-finite values, an invalid rate or ``n_out``, or a
        ``recording_rate`` below ``rate``.

    References
    ----------
    .. [1] The public SleepFM release: the ``sleepfm-clinical`` repository of the Zou group
       (Stanford) on GitHub; its recordings are read with MNE's ``read_raw_edf(preload=True)``.
    """
    out, center = _resample_centered(samples, rate, target_rate, n_out, workers, always_center=False,
                                     recording_rate=recording_rate)
    if center != 0.0:
        out += _F32(center)
    return out


def standardize(x: np.ndarray, *, workers: int | None = None) -> np.ndarray:
    """Z-score ``x`` with the population standard deviation (``ddof=0``) as float32.

    Works in place when ``x`` is a writeable C-contiguous float32 array (and returns it);
    otherwise a float32 copy is standardized and returned. Mean and variance are accumulated in
    float64 scalars from float32 chunks (no float64 copy of the array). A zero-variance input
    (e.g. a constant channel) is only centred, giving zeros.

    Parameters
    ----------
    x : numpy.ndarray
        Real values of any shape; all of them are standardised together.
    workers : int, optional
        Threads to use (default: up to 4); 1 runs serially.

    Returns
    -------
    numpy.ndarray
        A float32 array of the shape of ``x``: ``x`` itself when it was standardised in place.

    Raises
    ------
    ValueError
        Empty or non-numeric input, or non-finite values.
    """
    arr = np.asarray(x)
    if arr.size == 0:
        raise ValueError("cannot standardize an empty array")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"expected real numeric values, got dtype {arr.dtype}")
    if not (arr.dtype == _F32 and arr.flags.c_contiguous and arr.flags.writeable):
        arr = np.array(arr, dtype=_F32, order="C")
    flat = arr.reshape(-1)
    n = flat.size
    nw = _resolve_workers(workers)
    mean = _F32(_finite_mean(flat, nw, "input"))

    def centre_and_moments(lo: int, hi: int) -> tuple[float, float]:
        tmp = np.empty(min(_CHUNK, hi - lo), dtype=_F32)
        s1 = s2 = 0.0
        for s in range(lo, hi, _CHUNK):
            c = flat[s : min(s + _CHUNK, hi)]
            c -= mean
            t = tmp[: c.size]
            np.multiply(c, c, out=t)
            s1 += float(np.add.reduce(c, dtype=np.float64))
            s2 += float(np.add.reduce(t, dtype=np.float64))
        return s1, s2

    parts = _run_split(centre_and_moments, n, nw)
    resid = math.fsum(p[0] for p in parts) / n  # mean left after subtracting the float32 mean
    var = max(0.0, math.fsum(p[1] for p in parts) / n - resid * resid)
    std = math.sqrt(var)
    shift = _F32(resid)
    if std > 0.0 and math.isfinite(std) and _F32(1.0 / std) != 0:
        scale = _F32(1.0 / std)

        def finish(lo: int, hi: int) -> None:
            c = flat[lo:hi]
            c -= shift
            c *= scale

    else:

        def finish(lo: int, hi: int) -> None:
            flat[lo:hi] -= shift

    _run_split(finish, n, nw)
    return arr


def preprocess_channel(
    samples: np.ndarray,
    rate: float,
    n_out: int | None = None,
    *,
    workers: int | None = None,
    recording_rate: float | None = None,
    overwrite_input: bool = False,
) -> np.ndarray:
    """SleepFM-compatible preprocessing of one channel: resample to 128 Hz, then z-score.

    Equivalent to ``standardize(resample_to_target(samples, rate, TARGET_RATE, n_out,
    recording_rate=recording_rate))`` (see those functions), computed without re-adding the channel
    mean. Returns a new C-contiguous float32 array of length ``n_out`` (default: what
    ``len(samples) / rate`` seconds gives). Pass the recording's highest rate as ``recording_rate``
    to reproduce the release's own path (its reader upsamples every channel to that rate first).
    ``overwrite_input=True`` lets it use a float32 ``samples`` as scratch space (a caller that owns
    the array saves a copy of the channel).

    Parameters
    ----------
    samples : numpy.ndarray
        1-D real samples in physical units (any float or integer dtype).
    rate : float
        Sampling rate of ``samples`` in Hz.
    n_out : int, optional
        Output length at 128 Hz; pass :func:`n_target_samples` of the recording's duration so that
        every channel has the same length.
    workers : int, optional
        Threads to use (default: up to 4); 1 runs serially.
    recording_rate : float, optional
        The recording's highest sampling rate (see :func:`resample_to_target`).
    overwrite_input : bool, default False
        Allow ``samples`` to be overwritten (used only when the channel is upsampled first and is a
        writeable, C-contiguous float32 array).

    Returns
    -------
    numpy.ndarray
        A new C-contiguous float32 array of shape ``(n_out,)``, mean 0 and population standard
        deviation 1 (all zeros for a constant channel).

    Raises
    ------
    ValueError
        Empty or non-1-D input, non-finite values (gaps must be handled first: see
        :func:`inference.gaps.preprocess_with_gaps`), an invalid rate or ``n_out``.

    See Also
    --------
    resample_to_target : The resampling step alone.
    standardize : The z-score step alone.
    inference.gaps.preprocess_with_gaps : The same for a channel with gaps.

    References
    ----------
    .. [1] The public SleepFM release: the ``sleepfm-clinical`` repository of the Zou group
       (Stanford) on GitHub; its recordings are read with MNE's ``read_raw_edf(preload=True)``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.sin(np.arange(256 * 60) / 10.0)  # one minute at 256 Hz
    >>> y = preprocess_channel(x, 256.0, n_out=n_target_samples(60.0))
    >>> y.shape, y.dtype, round(float(y.std()), 3)
    ((7680,), dtype('float32'), 1.0)
    """
    out, _ = _resample_centered(samples, rate, TARGET_RATE, n_out, workers, always_center=True,
                                recording_rate=recording_rate, overwrite_input=overwrite_input)
    return standardize(out, workers=workers)
