"""What went wrong with a study, in words that are safe to store and log, and whether to try again.

Errors are sorted into two kinds:

* transient (database busy or gone, GPU/CPU out of memory, a full disk): the study keeps its state and
  is retried with exponential backoff and jitter (:func:`gateway.backoff.backoff_delay`), up to
  ``pipeline.max_attempts``;
* permanent (unreadable or corrupt input, no channel mapped, input the model cannot take, or an
  unexpected error): the study is FAILED with the reason and its input goes to ``quarantine/`` with a
  ``REASON.txt`` beside it. ``psg-gateway studies retry`` puts it back.
"""

from __future__ import annotations

import errno

from hl7apy.exceptions import MaxLengthReached
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy.exc import OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from inference.inputs import InputError

from ..hl7.oru import OruError
from ..logging import scrub
from ..readers.errors import ReaderError
from .prepare import MappingError

__all__ = ["StepError", "classify"]

_TRANSIENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ENOMEM}


class StepError(Exception):
    """A study step failed: the reason, safe to store and log, and whether trying again can help."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def classify(exc: BaseException) -> StepError:
    """The reason (no paths, no identifiers, no values) and whether trying again later can help.

    Every reason is stored (``last_error``, the events table, ``REASON.txt``) and logged, so every branch
    ends in :func:`~gateway.logging.scrub`: the bound study's identifiers, quoted values, paths and long
    digit runs out, one line of at most 300 characters. A library's error (hl7apy, pydicom, pyedflib,
    pydantic, SQLAlchemy, a plain ValueError) is reduced to ``<ExceptionType>: <message without values>``
    or, where the library says which field, the field alone.
    """
    if isinstance(exc, StepError):  # ours, or a worker process's classification: the study's identifiers
        return StepError(scrub(exc), exc.transient)  # are known here and were not there
    if isinstance(exc, ReaderError):
        return StepError(scrub(f"unreadable input ({exc.kind}): {exc.reason}"), transient=False)
    if isinstance(exc, MappingError):
        return StepError(scrub(f"montage: {exc}"), transient=False)
    if isinstance(exc, InputError):
        return StepError(scrub(f"model input: {exc}"), transient=False)
    if isinstance(exc, OruError):
        return StepError(scrub(f"result message: {exc}"), transient=False)
    if isinstance(exc, (OperationalError, PoolTimeout)):
        return StepError(f"database unavailable: {type(exc.orig if hasattr(exc, 'orig') else exc).__name__}",
                         transient=True)
    if isinstance(exc, StatementError):  # its text holds the statement's parameters: patient fields
        orig = getattr(exc, "orig", None)
        return StepError(f"database: {type(exc).__name__}" + (f" ({type(orig).__name__})" if orig is not None else ""),
                         transient=False)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return StepError("out of memory during inference", transient=True)
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return StepError(f"storage: {errno.errorcode.get(exc.errno or 0, 'error')} ({exc.strerror})", transient=True)
    if isinstance(exc, OSError):  # str(exc) would quote the file name, which can hold an MRN
        return StepError(scrub(f"storage: {type(exc).__name__}: {exc.strerror or exc}"), transient=False)
    return StepError(scrub(f"internal error: {_library_error(exc)}"), transient=False)


def _library_error(exc: BaseException) -> str:
    """``<ExceptionType>: <what is wrong>`` for an exception we did not raise, without the value it quotes
    where the library keeps it apart (hl7apy's too-long value, pydantic's input); scrub() does the rest."""
    name = type(exc).__name__
    if isinstance(exc, PydanticValidationError):  # field paths and error kinds, never the input
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'} ({e['type']})"
                           for e in exc.errors(include_url=False, include_input=False, include_context=False)[:5])
        return f"{name}: {fields}"
    if isinstance(exc, MaxLengthReached):
        return f"{name}: a value exceeds its maximum length ({exc.limit})"
    if isinstance(exc, UnicodeError):  # str() quotes the bytes around the bad one
        return f"{name}: {getattr(exc, 'reason', '') or 'cannot encode or decode text'}"
    return f"{name}: {exc}"
