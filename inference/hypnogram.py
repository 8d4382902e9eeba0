"""From per-token stage probabilities to a 30-s hypnogram and sleep metrics."""

from __future__ import annotations

import numpy as np

from .results import STAGES, TOKENS_PER_EPOCH, SleepMetrics, Staging

EPOCH_MIN = 0.5


def epoch_probabilities(token_probs: np.ndarray) -> np.ndarray:
    """Mean of each run of six 5-s token probabilities; a trailing partial epoch is left out.

    Parameters
    ----------
    token_probs : numpy.ndarray
        ``(T, K)`` probabilities per 5-s token.

    Returns
    -------
    numpy.ndarray
        ``(T // 6, K)`` float32, one row per 30-s epoch.
    """
    n_epochs = token_probs.shape[0] // TOKENS_PER_EPOCH
    used = token_probs[: n_epochs * TOKENS_PER_EPOCH]
    return used.reshape(n_epochs, TOKENS_PER_EPOCH, -1).mean(axis=1).astype(np.float32)


def sleep_metrics(stages: np.ndarray) -> SleepMetrics:
    """Metrics from stage indices per 30-s epoch (0=W, 1=N1, 2=N2, 3=N3, 4=REM).

    Parameters
    ----------
    stages : numpy.ndarray
        One stage index per scored epoch, in time order.

    Returns
    -------
    SleepMetrics
        TIB, TST, efficiency, latencies, WASO and time per stage (see
        :class:`~inference.results.SleepMetrics` for the definitions).

    References
    ----------
    .. [1] YASA's sleep statistics (``yasa.sleep_statistics``; Vallat & Walker, eLife 2021), whose
       WASO is wake within the sleep period, from the first to the last non-W epoch.
    """
    stages = np.asarray(stages, dtype=np.int64)
    n = stages.size
    tib = n * EPOCH_MIN
    asleep = np.flatnonzero(stages != 0)
    tst = asleep.size * EPOCH_MIN
    stage_min = {name: float(np.count_nonzero(stages == i) * EPOCH_MIN) for i, name in enumerate(STAGES)}
    pct = {
        name: (100.0 * stage_min[name] / tst if tst else 0.0) for name in STAGES if name != "W"
    }
    if asleep.size == 0:
        return SleepMetrics(tib, 0.0, 0.0, None, 0.0, None, stage_min, pct)
    onset, last = int(asleep[0]), int(asleep[-1])
    period = stages[onset : last + 1]
    waso = float(np.count_nonzero(period == 0) * EPOCH_MIN)
    rem = np.flatnonzero(stages == STAGES.index("REM"))
    rem_latency = float((rem[0] - onset) * EPOCH_MIN) if rem.size else None
    return SleepMetrics(
        tib_min=tib,
        tst_min=tst,
        sleep_efficiency_pct=100.0 * tst / tib if tib else 0.0,
        sleep_onset_latency_min=onset * EPOCH_MIN,
        waso_min=waso,
        rem_latency_min=rem_latency,
        stage_min=stage_min,
        stage_pct_of_tst=pct,
    )


def build_staging(token_probs: np.ndarray, tail_start_token: int | None = None) -> Staging:
    """Package token probabilities with their hypnogram and metrics; tokens from ``tail_start_token``
    on were staged as their own segment (the tail past the last whole 5-minute window).

    Parameters
    ----------
    token_probs : numpy.ndarray
        ``(T, 5)`` stage probabilities per 5-s token, columns in ``STAGES`` order.
    tail_start_token : int, optional
        First token of the tail (a multiple of 6, as whole windows hold 60 tokens); ``None`` or
        ``T`` when there is no tail.

    Returns
    -------
    Staging
        The token and epoch probabilities, the hypnogram (the most probable stage per 30-s epoch)
        and its :func:`sleep_metrics`; ``tail_start_epoch`` is ``None`` when the tail holds no
        whole epoch.
    """
    epochs = epoch_probabilities(token_probs)
    stages = epochs.argmax(axis=1) if len(epochs) else np.zeros(0, dtype=np.int64)
    tail_epoch = None
    if tail_start_token is not None and tail_start_token < token_probs.shape[0]:
        # Whole windows hold 60 tokens, so the tail starts on an epoch boundary.
        tail_epoch = tail_start_token // TOKENS_PER_EPOCH
        if tail_epoch >= len(epochs):
            tail_epoch = None  # the tail is shorter than one epoch: no epoch of it is scored
    return Staging(
        token_probs=token_probs.astype(np.float32, copy=False),
        epoch_probs=epochs,
        hypnogram=[STAGES[i] for i in stages],
        metrics=sleep_metrics(stages),
        tail_start_epoch=tail_epoch,
    )
