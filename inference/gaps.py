"""Preprocessing a channel that has gaps (EDF+D records that do not meet, DICOM padding).

The 128 Hz timeline is kept whole so that every token stays at its clock time. Before filtering,
gap samples are set to the mean of the measured samples (a zero-filled gap would be a step that
rings through the low-pass filter); the z-score is computed over measured samples only; and after
it every 128 Hz sample that falls in a gap is set to 0, the channel's mean. Tokens over a gap
therefore carry a flat, neutral signal rather than being dropped, and the share of each channel
that was a gap is reported with the result.
"""

from __future__ import annotations

import numpy as np

from .preprocess import TARGET_RATE, preprocess_channel, resample_to_target

_CHUNK = 1 << 20


def validity_at_target(valid: np.ndarray, rate: float, n_out: int, target_rate: float = TARGET_RATE) -> np.ndarray:
    """Per 128 Hz sample: whether the nearest native sample was measured.

    Parameters
    ----------
    valid : numpy.ndarray
        Boolean per native sample: True where measured, False in a gap.
    rate : float
        Native sampling rate in Hz.
    n_out : int
        Output length (the recording's samples at ``target_rate``).
    target_rate : float, default 128.0
        Output rate in Hz.

    Returns
    -------
    numpy.ndarray
        Boolean ``(n_out,)``: the validity of native sample ``round(k * rate / target_rate)`` (half
        up; past the end, the last sample's).
    """
    valid = np.asarray(valid, dtype=bool).reshape(-1)
    out = np.empty(n_out, dtype=bool)
    last = valid.size - 1
    for lo in range(0, n_out, _CHUNK):
        k = np.arange(lo, min(lo + _CHUNK, n_out), dtype=np.float64)
        nearest = np.minimum(np.floor(k * (rate / target_rate) + 0.5).astype(np.int64), last)
        out[lo : lo + k.size] = valid[nearest]
    return out


def preprocess_with_gaps(
    samples: np.ndarray,
    valid: np.ndarray | None,
    rate: float,
    n_out: int,
    recording_rate: float | None = None,
    *,
    workers: int | None = None,
    overwrite_input: bool = False,
) -> tuple[np.ndarray, float]:
    """Resample and z-score a channel, honouring its gaps.

    Returns the float32 128 Hz signal and the fraction of it that was a gap. With ``valid`` None
    (no gaps) this is exactly :func:`~inference.preprocess.preprocess_channel`. ``recording_rate``
    (the recording's highest rate) is passed on to it: the gap-filled channel is upsampled like any
    other; ``workers`` and ``overwrite_input`` too. A channel with no measured sample at all raises
    ``ValueError``.

    Parameters
    ----------
    samples : numpy.ndarray
        1-D real samples at ``rate``; samples in a gap may hold anything (NaN included).
    valid : numpy.ndarray or None
        Boolean per sample, False in a gap; ``None`` when the channel has no gap.
    rate : float
        Sampling rate of ``samples`` in Hz.
    n_out : int
        Output length at 128 Hz (:func:`inference.preprocess.n_target_samples` of the recording).
    recording_rate : float, optional
        The recording's highest sampling rate (see :func:`inference.preprocess.resample_to_target`).
    workers : int, optional
        Threads to use (default: up to 4); 1 runs serially.
    overwrite_input : bool, default False
        Passed on to :func:`~inference.preprocess.preprocess_channel` when there is no gap (a
        channel with gaps is always copied).

    Returns
    -------
    signal : numpy.ndarray
        A float32 array ``(n_out,)``, z-scored over the measured samples, 0 over the gaps.
    gap_fraction : float
        Share of the 128 Hz samples that fall in a gap (0.0 without gaps).

    Raises
    ------
    ValueError
        A channel that is all gap, and whatever :func:`~inference.preprocess.preprocess_channel`
        raises (empty input, non-finite values, invalid rate or ``n_out``).
    """
    if valid is None or valid.all():
        return preprocess_channel(samples, rate, n_out=n_out, recording_rate=recording_rate, workers=workers,
                                  overwrite_input=overwrite_input), 0.0
    valid = np.asarray(valid, dtype=bool)
    if not valid.any():
        raise ValueError("channel has no measured samples (all gap)")
    samples = np.array(samples, dtype=np.float32, copy=True)
    samples[~valid] = samples[valid].mean(dtype=np.float64)
    out = resample_to_target(samples, rate, n_out=n_out, recording_rate=recording_rate, workers=workers)
    del samples
    ok = validity_at_target(valid, rate, n_out)
    measured = out[ok]
    mean = measured.mean(dtype=np.float64)
    std = measured.std(dtype=np.float64)
    del measured
    out -= np.float32(mean)
    if std > 0:
        out *= np.float32(1.0 / std)
    out[~ok] = 0.0
    return out, float(1.0 - ok.mean())
