"""Progress of a batch: a live bar on a terminal, plain log lines every N seconds otherwise (a job
scheduler's log, ``nohup``, systemd-run)."""

from __future__ import annotations

import sys
import time
from typing import Any, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..logging import get_logger

__all__ = ["BatchProgress"]

log = get_logger("psg.batch")


class BatchProgress:
    """``update(done, total, processed, failed)`` as often as wanted; it draws or logs at its own pace."""

    def __init__(self, *, live: bool | None = None, interval_s: float = 30.0, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.live = sys.stderr.isatty() if live is None else live
        self.interval_s = interval_s
        self._t0 = time.monotonic()
        self._last_log = 0.0
        self._bar: Progress | None = None
        self._task: Any = None
        self._state: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __enter__(self) -> Self:
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} nights/h"), TextColumn("[red]{task.fields[failed]} failed"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task("batch", total=None, rate="-", failed=0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._log(final=True)
        if self._bar is not None:
            self._bar.stop()

    def update(self, done: int, total: int, processed: int, failed: int) -> None:
        self._state = (done, total, processed, failed)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, rate=f"{self._rate(processed):.0f}",
                             failed=failed)
        elif time.monotonic() - self._last_log >= self.interval_s:
            self._log()

    def _rate(self, processed: int) -> float:
        elapsed = time.monotonic() - self._t0
        return 3600.0 * processed / elapsed if elapsed > 0 else 0.0

    def _log(self, final: bool = False) -> None:
        self._last_log = time.monotonic()
        if self._bar is not None and not final:
            return
        done, total, processed, failed = self._state
        elapsed = time.monotonic() - self._t0
        rate = self._rate(processed)
        remaining = total - done
        eta = remaining / (done / elapsed) if done and elapsed > 0 and not final else None
        log.info("batch.progress", done=done, total=total, processed=processed, failed=failed,
                 nights_per_hour=round(rate, 1), elapsed_s=round(elapsed), eta_s=round(eta) if eta else None)
