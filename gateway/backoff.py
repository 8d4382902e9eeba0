"""One retry schedule for everything that tries again later: a study step, an HL7 delivery."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(tries: int, base_seconds: float, max_seconds: float) -> float:
    """Seconds to wait after the ``tries``-th failed try: ``base * 2**(tries-1)``, capped at ``max_seconds``,
    times a jitter of 0.8-1.2 so that workers (or nodes) that failed together do not retry together."""
    delay = min(max_seconds, base_seconds * 2 ** max(tries - 1, 0))
    return delay * random.uniform(0.8, 1.2)
