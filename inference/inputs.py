"""What the engine refuses before any compute: its input error and the shortest recording it takes.

Torch-free, so that decoding and preprocessing (``gateway.pipeline.prepare``) can refuse a study with
the engine's own words without loading the engine. :mod:`inference.engine` re-exports both.
"""

from __future__ import annotations

import math

from .results import TOKEN_SECONDS, TOKENS_PER_EPOCH

__all__ = ["MIN_DURATION_S", "InputError", "check_duration"]


class InputError(ValueError):
    """A study the engine cannot encode (no mapped channel, wrong shapes, too short...)."""


# The shortest recording the engine takes: one scored 30-s epoch. Anything shorter has no epoch to
# stage (the hypnogram would be empty) and too little signal for the heads to mean anything.
MIN_DURATION_S = float(TOKENS_PER_EPOCH * TOKEN_SECONDS)


def check_duration(duration_s: float) -> None:
    """Raise :class:`InputError` for a recording shorter than one 30-s epoch.

    Called on the recording's duration before any channel is preprocessed (``gateway.pipeline.prepare``) and on
    the samples the engine is given, so that every caller (``infer``, the daemon, a batch) refuses it
    with the same one-line reason instead of failing deep inside preprocessing or staging.

    Parameters
    ----------
    duration_s : float
        The recording's duration in seconds.

    Raises
    ------
    InputError
        When the duration is not finite or is shorter than :data:`MIN_DURATION_S` (30 s).
    """
    d = float(duration_s)
    if not (math.isfinite(d) and d >= MIN_DURATION_S):
        raise InputError(_too_short(d))


def _too_short(duration_s: float) -> str:
    # Rounded down: a 29.97-s recording must not read "shorter than ... (30.0 s)".
    d = duration_s
    shown = f"{math.floor(d * 10) / 10:.1f}" if math.isfinite(d) and d >= 0 else repr(d)
    return f"recording shorter than one {MIN_DURATION_S:g}-s epoch ({shown} s)"
