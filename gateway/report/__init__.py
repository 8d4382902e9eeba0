"""The per-study report: a sleep-lab document in HTML and PDF with the same content.

``build_report`` gathers a study's row and outputs folder into a :class:`StudyReport`;
``render_html`` and ``render_pdf`` draw it; ``write_study_report`` writes ``report.html`` and
``report.pdf`` into the outputs folder. ``psg-gateway studies report ID --out FILE.pdf|FILE.html``
writes one on demand.
"""

from __future__ import annotations

from .content import ReportError, StudyReport, build_report
from .files import REPORT_HTML, REPORT_PDF, write_study_report
from .html_report import render_html
from .pdf_report import render_pdf

__all__ = ["REPORT_HTML", "REPORT_PDF", "ReportError", "StudyReport", "build_report", "render_html", "render_pdf",
           "write_study_report"]
