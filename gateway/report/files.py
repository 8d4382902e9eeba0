"""The report files of a study's outputs folder: ``report.html`` and ``report.pdf``.

Written private and atomically (:func:`gateway.fsutil.atomic_write`), like the other outputs; named for
what they are, never after the patient.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsutil import atomic_write
from .content import build_report
from .html_report import render_html
from .pdf_report import render_pdf

if TYPE_CHECKING:
    from ..store.models import Study

__all__ = ["REPORT_HTML", "REPORT_PDF", "write_study_report"]

REPORT_HTML = "report.html"
REPORT_PDF = "report.pdf"


def write_study_report(study: Study, out_dir: Path | str, flags: dict[str, Any] | None = None, *,
                       generated_at: datetime | None = None) -> list[Path]:
    """Write ``report.html`` and ``report.pdf`` of ``study`` into its outputs folder ``out_dir``; returns
    the paths written. ``flags``: the flag decision to show instead of ``study.flags`` (the pipeline
    writes the report before it commits the decision). Raises
    :class:`~gateway.report.content.ReportError` when the folder holds no metrics.json."""
    out_dir = Path(out_dir)
    report = build_report(study, out_dir, flags, generated_at=generated_at)
    written = []
    for name, data in ((REPORT_HTML, render_html(report).encode("utf-8")), (REPORT_PDF, render_pdf(report))):
        atomic_write(out_dir / name, data)
        written.append(out_dir / name)
    return written
