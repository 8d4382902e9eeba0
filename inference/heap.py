"""How the C library's allocator holds this process's freed memory (glibc; elsewhere nothing is done).

glibc keeps what a process frees for reuse rather than returning it to the system, in one arena per
thread that allocates (up to eight per core), and once a large block has been freed it serves blocks
up to that size from the arenas too. Preprocessing frees tens of megabytes per channel, on its pool's
threads as well as the main one, and the engine's threads allocate in arenas of their own, so freed
memory piled up where the next step could not reuse it. So:

* :func:`limit_arenas` gives the whole process **one arena** (``mallopt(M_ARENA_MAX, 1)``), set by the
  command line before any thread starts unless the environment sets ``MALLOC_ARENA_MAX`` (which glibc
  then applies itself);
* :func:`release_free_memory` hands the free pages back (``malloc_trim(0)``, 2-30 ms), after each
  channel's preprocessing (``gateway.pipeline.prepare``) and once the engine has encoded a batch of
  nights, before its heads (:mod:`inference.engine`).

Process-level memory management, no I/O: it lives here so that the engine can call it too.

On the 8-hour bench night (2-core Xeon), ``psg-gateway infer``'s peak RSS was 714-745 MB with the
default arenas and 679-705 MB with one, wall time unchanged (13.2-13.9 s either way, four runs each,
alternating); without the trims, one arena peaked at 770-815 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from functools import cache, lru_cache

__all__ = ["ARENA_ENV", "limit_arenas", "release_free_memory"]

ARENA_ENV = "MALLOC_ARENA_MAX"
_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:  # pragma: no cover - no C library to load
        return None


@cache  # once per function: release_free_memory runs after every channel
def _function(name: str, argtypes: tuple) -> Callable[..., int] | None:
    fn = getattr(_libc(), name, None)
    if fn is None:  # pragma: no cover - not glibc
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def limit_arenas(environ: dict[str, str] | None = None) -> int | None:
    """One malloc arena for the process (before its threads start); returns the limit set, or None
    where the environment already chose one (``MALLOC_ARENA_MAX``) or the C library has no ``mallopt``."""
    env = os.environ if environ is None else environ
    if ARENA_ENV in env:
        return None
    mallopt = _function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None or not mallopt(_M_ARENA_MAX, 1):  # pragma: no cover - not glibc
        return None
    return 1


def release_free_memory() -> bool:
    """Return the heap's free pages to the system; False where the C library cannot (not glibc)."""
    trim = _function("malloc_trim", (ctypes.c_size_t,))
    if trim is None:  # pragma: no cover - not glibc
        return False
    trim(0)
    return True
