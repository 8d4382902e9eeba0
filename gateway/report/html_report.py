"""The study report as one self-contained HTML page (Jinja2, autoescaped).

Inline CSS, the hypnogram a PNG ``data:`` URI, no script, nothing fetched. The page is also well-formed
XML (void elements closed), so a strict HTML5 parser and an XML parser both read it.
"""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from .content import StudyReport
from .hypnogram import MODEL_COLOUR, SCORED_COLOUR, hypnogram_png
from .wording import (
    BANNER,
    DASH,
    SUBTITLE,
    TITLE,
    agreement_line,
    attribution_note,
    attribution_rows,
    banner_detail,
    footer,
    generated,
    model_rows,
    outcome_rows,
    patient_rows,
    quality_modalities,
    quality_problems,
    quality_summary,
    sleep_rows,
    stage_rows,
)

__all__ = ["render_html"]

TEMPLATES = Path(__file__).resolve().parent / "templates"


@cache
def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _pairs(rows: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    return [rows[i:i + 2] for i in range(0, len(rows), 2)]


def render_html(report: StudyReport) -> str:
    """The report as an HTML document (a string; write it as UTF-8)."""
    r = report
    quality_class = "muted" if r.quality is None else "quality-ok" if r.quality.interpretable else "quality-bad"
    return _environment().get_template("report.html.j2").render(
        r=r, dash=DASH, title=TITLE, subtitle=SUBTITLE, banner=BANNER, banner_detail=banner_detail(r),
        css=(TEMPLATES / "report.css").read_text(encoding="utf-8"),
        generated=generated(r), patient_rows=_pairs(patient_rows(r)),
        model_colour=MODEL_COLOUR, scored_colour=SCORED_COLOUR,
        hypnogram_png=base64.b64encode(hypnogram_png(r)).decode("ascii"), agreement=agreement_line(r),
        sleep_rows=sleep_rows(r), stage_rows=stage_rows(r), outcome_rows=outcome_rows(r),
        attribution_note=attribution_note(r), attribution_rows=attribution_rows(r),
        quality_summary=quality_summary(r), quality_modalities=quality_modalities(r),
        quality_problems=quality_problems(r), quality_class=quality_class, model_rows=model_rows(r),
        footer=" \u00b7 ".join(footer(r)),
    )
