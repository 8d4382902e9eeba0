"""The study report as an A4 PDF, drawn with matplotlib (object-oriented API, no pyplot) page by page.

The content and its order are the HTML page's (:mod:`gateway.report.wording` words both). Page 1 has a
fixed top: title, patient block, the NOT FOR CLINICAL USE banner slot, and the hypnogram in the axes box
:data:`HYPNOGRAM_BOX` (figure fractions of the A4 page), so that a rendered page can be checked against
``hypnogram.csv``. Below it the sections flow onto as many pages as they need; every page carries the
patient's identification at the top and the study, model and montage in the footer. The PDF has no
creation date: the same report gives the same bytes.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib as mpl
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont, get_font
from matplotlib.ft2font import LoadFlags
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch, Rectangle
from matplotlib.text import Text

from .content import StudyReport
from .hypnogram import MODEL_COLOUR, SCORED_COLOUR, draw_hypnogram
from .wording import (
    BANNER,
    BAR_MM,
    DASH,
    SUBTITLE,
    TITLE,
    agreement_line,
    attribution_note,
    attribution_rows,
    banner_detail,
    clock,
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

__all__ = ["HYPNOGRAM_BOX", "PAGE_SIZE_IN", "render_pdf"]

PAGE_SIZE_IN = (8.27, 11.69)  # A4
W, H = PAGE_SIZE_IN
LEFT, RIGHT, TOP, BOTTOM = 0.6, 0.6, 0.5, 0.85
CONTENT_W = W - LEFT - RIGHT
_AX_LEFT, _AX_TOP, _AX_W, _AX_H = 1.0, 3.3, W - RIGHT - 1.0, 1.7
# (left, bottom, width, height) of the hypnogram's axes on page 1, in fractions of the page
HYPNOGRAM_BOX = (_AX_LEFT / W, 1 - (_AX_TOP + _AX_H) / H, _AX_W / W, _AX_H / H)

NAVY, RED, AMBER, GREEN, GREY, RULE = "#1d3f8f", "#c0161d", "#8a5a00", "#2e6b34", "#555555", "#c9cfdc"
FLAG_BG, BORDER_BG, PANEL_BG, BORDER_TAG = "#fdecec", "#fff6e0", "#f6f7fa", "#f0a202"


# The report's own typography in Latin-1: every character beyond it costs the PDF a second subset of the
# font (fontTools subsetting, about 0.15 s each). Patient names and labels keep whatever they hold.
_LATIN1 = str.maketrans({"\u2212": "-", "\u2014": "-", "\u2019": "'", "\u2022": "\u00b7", "\u2026": "...",
                         "\u03ba": "kappa"})
# No ligatures (matplotlib >= 3.11 shapes text with HarfBuzz): an "fi" glyph is outside Latin-1 too, and
# pdftotext reads it apart from its word.
_TEXT_FEATURES = {"fontfeatures": ["-liga", "-clig"]} if hasattr(Text, "set_fontfeatures") else {}
_RENDERING = threading.Lock()  # rcParams are process-wide: one PDF is saved at a time


def _mpl(s: object) -> str:
    """Text for matplotlib: a ``$`` would start mathtext."""
    return str(s).translate(_LATIN1).replace("$", r"\$")


_ADVANCE: dict[tuple[bool, str], float] = {}  # (bold, character) -> advance width in em


def _advance(ch: str, bold: bool) -> float:
    width = _ADVANCE.get((bold, ch))
    if width is None:
        font = get_font(findfont(FontProperties(weight="bold" if bold else "normal")))
        font.set_size(100, 72)
        glyph = font.load_char(ord(ch), flags=LoadFlags.NO_HINTING)
        width = _ADVANCE[(bold, ch)] = glyph.linearHoriAdvance / 65536 / 100
    return width


def _width(text: str, size: float, bold: bool = False) -> float:
    """The width of ``text`` in inches at ``size`` points (the font's advances; a little to spare)."""
    return 1.03 * size / 72 * sum(_advance(ch, bold) for ch in text.translate(_LATIN1))


def _wrap(text: str, width_in: float, size: float, bold: bool = False) -> list[str]:
    """Greedy word wrap to ``width_in`` inches; a word wider than a line is cut."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if _width(candidate, size, bold) <= width_in:
                line = candidate
                continue
            if line:
                lines.append(line)
            while _width(word, size, bold) > width_in and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and _width(word[:cut], size, bold) > width_in:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines or [""]


def _shorten(text: str, width_in: float, size: float, bold: bool = False) -> str:
    if _width(text, size, bold) <= width_in:
        return text
    while text and _width(text + "\u2026", size, bold) > width_in:
        text = text[:-1]
    return text + "\u2026"


@dataclass(frozen=True)
class Column:
    title: str
    width: float  # inches
    align: str = "left"


class _Document:
    """A cursor over A4 figures: ``y`` is inches from the top of the current page."""

    def __init__(self, report: StudyReport) -> None:
        self.r = report
        self.pages: list[Figure] = []
        self.fig = self._page()
        self.y = TOP

    # ---- pages -------------------------------------------------------------------------------------------
    def _page(self) -> Figure:
        fig = Figure(figsize=PAGE_SIZE_IN)
        self.pages.append(fig)
        return fig

    def new_page(self) -> None:
        self.fig = self._page()
        p = self.r.patient
        who = " \u00b7 ".join(x for x in (p.display_name, p.patient_id, clock(self.r.recording_start)) if x)
        self.text(LEFT, 0.45, f"{TITLE} \u2014 {who}", size=8, color=GREY)
        if not self.r.validated:
            self.text(W - RIGHT, 0.45, BANNER, size=8.5, color=RED, weight="bold", ha="right")
        self.hline(0.53, color=NAVY, width=0.8)
        self.y = 0.75

    def ensure(self, height: float) -> None:
        if self.y + height > H - BOTTOM:
            self.new_page()

    # ---- drawing primitives (inches from the top-left corner) --------------------------------------------
    def text(self, x: float, y: float, s: str, size: float = 8.0, **kw) -> None:
        kw.setdefault("va", "baseline")
        self.fig.text(x / W, 1 - y / H, _mpl(s), fontsize=size, **_TEXT_FEATURES, **kw)

    def hline(self, y: float, x0: float = LEFT, x1: float = W - RIGHT, color: str = RULE, width: float = 0.6) -> None:
        self.fig.add_artist(Line2D([x0 / W, x1 / W], [1 - y / H, 1 - y / H], color=color, linewidth=width))

    def rect(self, x: float, y: float, width: float, height: float, color: str, **kw) -> None:
        self.fig.add_artist(Rectangle((x / W, 1 - (y + height) / H), width / W, height / H, facecolor=color,
                                      edgecolor=kw.pop("edgecolor", "none"), linewidth=kw.pop("linewidth", 0),
                                      **kw))

    # ---- flowing content ---------------------------------------------------------------------------------
    def heading(self, title: str, keep: float = 0.6) -> None:
        self.ensure(0.42 + keep)
        self.y += 0.3
        self.text(LEFT, self.y, title.upper(), size=10, color=NAVY, weight="bold")
        self.hline(self.y + 0.07)
        self.y += 0.16

    def para(self, text: str, size: float = 8.0, color: str = "#1a1a1a", indent: float = 0.0,
             weight: str = "normal", hanging: float = 0.0) -> None:
        """Wrapped text; ``hanging``: how far lines after the first are indented."""
        lines = _wrap(text, CONTENT_W - indent - hanging, size, bold=weight == "bold")
        step = size * 1.4 / 72
        for k, line in enumerate(lines):
            self.ensure(step)
            self.text(LEFT + indent + (hanging if k else 0.0), self.y + size / 72, line, size=size, color=color,
                      weight=weight)
            self.y += step
        self.y += 0.03

    def tagged(self, tag: str, text: str, colour: str, text_colour: str = "white", size: float = 8.0) -> None:
        """A coloured tag (FLAGGED, SECOND LOOK ...) and its line of text beside it."""
        tag_w = 0.95
        lines = _wrap(text, CONTENT_W - tag_w - 0.1, size)
        step = size * 1.4 / 72
        self.ensure(step * len(lines) + 0.05)
        self.fig.add_artist(FancyBboxPatch(
            ((LEFT) / W, 1 - (self.y + step + 0.01) / H), (tag_w - 0.08) / W, (step - 0.02) / H,
            boxstyle="round,pad=0,rounding_size=0.004", facecolor=colour, edgecolor="none"))
        self.text(LEFT + (tag_w - 0.08) / 2, self.y + size / 72 + 0.005, tag, size=size - 1, color=text_colour,
                  weight="bold", ha="center")
        for k, line in enumerate(lines):
            self.text(LEFT + tag_w, self.y + size / 72 + k * step, line, size=size)
        self.y += step * len(lines) + 0.07

    def table(self, columns: Sequence[Column], rows: Sequence[Sequence[str]], styles: Sequence[str] = (),
              size: float = 7.8, x0: float = LEFT, bars: dict[tuple[int, int], tuple[float, str]] | None = None,
              status: int | None = None) -> None:
        """Rows under a header (repeated on a new page); ``styles[i]``: ``flagged``, ``borderline`` (the row
        shaded, its ``status`` column in colour), ``bad`` (the row in red) or ``""``. ``bars[(row, col)]``:
        (width in inches, colour) of a bar before the cell's text."""
        line = size * 1.3 / 72
        pad = 0.045
        total = sum(c.width for c in columns)

        def header() -> None:
            self.ensure(line + 2 * pad + line)
            x = x0
            for c in columns:
                tx = x + c.width - 0.05 if c.align == "right" else x + 0.05
                self.text(tx, self.y + line, c.title, size=size - 0.3, weight="bold", color="#333333",
                          ha="right" if c.align == "right" else "left")
                x += c.width
            self.y += line + pad
            self.hline(self.y, x0, x0 + total, color=NAVY, width=0.9)
            self.y += pad

        header()
        for i, row in enumerate(rows):
            style = styles[i] if i < len(styles) else ""
            cells = [_wrap(v, c.width - 0.1 - (0.45 if bars and (i, j) in bars else 0.0), size,
                           bold=style in ("flagged", "borderline") and j == status)
                     for j, (c, v) in enumerate(zip(columns, row, strict=True))]
            height = max(len(c) for c in cells) * line + 2 * pad
            if self.y + height > H - BOTTOM:
                self.new_page()
                header()
            if style in ("flagged", "borderline"):
                self.rect(x0, self.y, total, height, FLAG_BG if style == "flagged" else BORDER_BG)
            x = x0
            for j, (c, lines) in enumerate(zip(columns, cells, strict=True)):
                tx = x + 0.05
                if bars and (i, j) in bars:
                    bw, colour = bars[(i, j)]
                    self.rect(tx, self.y + pad + line * 0.2, max(bw, 0.005), line * 0.6, colour)
                    tx += 0.45
                colour = "#1a1a1a"
                weight = "normal"
                if style == "bad":
                    colour = RED
                if style in ("flagged", "borderline") and j == status:
                    weight, colour = "bold", RED if style == "flagged" else AMBER
                for k, text in enumerate(lines):
                    ty = self.y + pad + (k + 1) * line - 0.025
                    if c.align == "right":
                        self.text(x + c.width - 0.05, ty, text, size=size, ha="right", color=colour, weight=weight)
                    else:
                        self.text(tx, ty, text, size=size, color=colour, weight=weight)
                x += c.width
            self.y += height
            self.hline(self.y, x0, x0 + total, color="#e1e4ea", width=0.5)
        self.y += 0.05

    def kv(self, rows: Sequence[tuple[str, str]], x0: float = LEFT, label_w: float = 1.9, width: float = CONTENT_W,
           size: float = 8.0) -> float:
        """Label / value lines; returns the height used (the cursor is not moved)."""
        y = self.y
        line = size * 1.45 / 72
        for label, value in rows:
            lines = _wrap(value, width - label_w - 0.05, size)
            self.text(x0, y + line, label, size=size, color=GREY)
            for k, text in enumerate(lines):
                self.text(x0 + label_w, y + (k + 1) * line, text, size=size)
            y += len(lines) * line + 0.02
            self.hline(y, x0, x0 + width, color="#e1e4ea", width=0.4)
        return y - self.y


# ---- the page-1 top --------------------------------------------------------------------------------------
def _top(d: _Document) -> None:
    r = d.r
    d.text(LEFT, 0.72, TITLE, size=17, color=NAVY, weight="bold")
    d.text(LEFT, 0.92, SUBTITLE, size=8, color=GREY)
    d.text(W - RIGHT, 0.72, f"Study {r.key}", size=8.5, ha="right", weight="bold")
    d.text(W - RIGHT, 0.92, f"Generated {generated(r)} UTC", size=8, ha="right", color=GREY)
    d.hline(1.02, color=NAVY, width=1.6)
    rows = patient_rows(r)
    box_top, line = 1.12, 0.22
    n = (len(rows) + 1) // 2
    d.rect(LEFT, box_top, CONTENT_W, n * line + 0.1, PANEL_BG, edgecolor=RULE, linewidth=0.6)
    half = CONTENT_W / 2
    for i, (label, value) in enumerate(rows):
        x = LEFT + 0.1 + (i % 2) * half
        y = box_top + 0.05 + (i // 2 + 1) * line - 0.06
        d.text(x, y, label, size=8.5, color=GREY)
        d.text(x + 1.0, y, _shorten(value, half - 1.15, 9, bold=True), size=9, weight="bold")
    top = box_top + n * line + 0.2
    if not r.validated:
        detail = _wrap(banner_detail(r), CONTENT_W - 0.3, 7.8)[:2]
        d.rect(LEFT, top, CONTENT_W, 0.62, RED)
        d.text(LEFT + 0.15, top + 0.25, BANNER, size=13, color="white", weight="bold")
        for k, text in enumerate(detail):
            d.text(LEFT + 0.15, top + 0.42 + k * 0.14, text, size=7.8, color="white")
    else:
        d.text(LEFT, top + 0.2, "Model bundle validated by this site.", size=8.5, color=GREEN)


def _hypnogram(d: _Document) -> None:
    r = d.r
    d.y = 2.75
    d.heading("Hypnogram", keep=0)
    # the legend, right-aligned on the heading line
    legend = [("model (30-s epochs)", MODEL_COLOUR)]
    if r.scored is not None:
        legend.append(("scored (drawn just below its stage)", SCORED_COLOUR))
    x = W - RIGHT
    for label, colour in reversed(legend):
        d.text(x, d.y - 0.16, label, size=7.5, ha="right", color="#333333")
        x -= _width(label, 7.5) + 0.05
        d.fig.add_artist(Line2D([(x - 0.3) / W, (x - 0.02) / W], [1 - (d.y - 0.19) / H] * 2, color=colour,
                                linewidth=2))
        x -= 0.45
    ax = d.fig.add_axes(HYPNOGRAM_BOX)
    draw_hypnogram(ax, r, fontsize=7.5)
    d.y = _AX_TOP + _AX_H + 0.45
    extra = [agreement_line(r)] if r.agreement is not None else []
    if r.tail_epochs:
        extra.append(f"Grey: the last {r.tail_epochs} epochs, staged past the last whole 5-minute window.")
    for text in [*extra, *r.warnings]:
        d.para(text, size=7.8, color=GREY)


def _summary(d: _Document) -> None:
    r = d.r
    d.heading("Risk flags and findings")
    if r.risk_flags_suppressed:
        d.tagged("WITHHELD", "Risk flags withheld for this study. " + "; ".join(r.suppression_reasons), RED)
    if not r.flags_decided:
        d.para("The flag step has not run for this study: no risk flags decided yet.", color=GREY)
    for o in r.flagged:
        d.tagged("FLAGGED", f"{o.phenotype} ({o.code})" + (f": {o.reason}" if o.reason else ""), RED)
    for o in r.borderline:
        d.tagged("SECOND LOOK", f"{o.phenotype} ({o.code})" + (f": {o.reason}" if o.reason else ""), BORDER_TAG,
                 "#1a1a1a")
    for f in r.findings:
        d.tagged("FINDING", str(f.get("reason") or f.get("text")), RED)
    if r.flags_decided and not (r.flagged or r.borderline or r.findings):
        d.tagged("NO FLAG", "No watched outcome flagged or marked for a second look.", "#e4e7ee", "#333333")


def _sleep(d: _Document) -> None:
    r = d.r
    d.heading("Sleep metrics", keep=1.3)
    if not r.sleep:
        d.para("No sleep metrics: the model bundle has no staging head.", color=GREY)
        return
    used = d.kv(sleep_rows(r), width=CONTENT_W / 2 - 0.2, label_w=1.95)
    start = d.y
    d.table([Column("Stage", 1.0), Column("Minutes", 1.2, "right"), Column("% of TST", 1.1, "right")],
            stage_rows(r), x0=LEFT + CONTENT_W / 2 + 0.1)
    d.y = max(d.y, start + used) + 0.05


def _outcomes(d: _Document) -> None:
    r = d.r
    d.heading("Watched outcomes")
    if not r.outcomes:
        d.para("No watched outcome" + (" in this study's flag decision." if r.flags_decided else "."), color=GREY)
        return
    rows = outcome_rows(r)
    d.table([Column("Outcome", 1.9), Column("Code", 1.4), Column("Log-hazard", 0.75, "right"),
             Column("Site percentile", 1.0, "right"), Column("Reference size", 1.0, "right"),
             Column("Status", 1.02)],
            [[o["name"] + (f" (site head {o['head']})" if o["head"] else ""), o["code"], o["log_hazard"],
              o["percentile"], o["reference_size"], o["status"]] for o in rows],
            styles=[o["css"] for o in rows], status=5)
    d.para("Site percentile: where this study's log-hazard lies among the site's earlier studies on the same "
           "model (the reference). A log-hazard alone is not a risk: it has no baseline.", size=7.5, color=GREY)


def _notes(d: _Document) -> None:
    if not d.r.notes:
        return
    d.heading("Notes", keep=0.3)
    for note in d.r.notes:
        d.rect(LEFT + 0.04, d.y + 0.045, 0.045, 0.045, NAVY)  # the bullet
        d.para(note, indent=0.17)


def _attribution(d: _Document) -> None:
    r = d.r
    d.heading("Modality attribution")
    d.para(attribution_note(r), size=7.8, color=GREY)
    rows = attribution_rows(r)
    if not rows:
        return
    mods = r.attribution_modalities
    each = min(1.15, (CONTENT_W - 2.4) / max(1, len(mods)))
    bars = {}
    for i, row in enumerate(rows):
        for j, cell in enumerate(row["cells"]):
            bars[(i, j + 1)] = (float(cell["width"]) / BAR_MM * 0.4, RED if cell["direction"] == "up" else "#2a7f9e")
    d.table([Column("Outcome", 2.4), *(Column(m, each) for m in mods)],
            [[row["name"], *(c["text"] for c in row["cells"])] for row in rows],
            styles=[row["css"] for row in rows], bars=bars)


def _quality(d: _Document) -> None:
    r = d.r
    d.heading("Signal quality")
    q = r.quality
    colour = GREY if q is None else GREEN if q.interpretable else RED
    d.para(quality_summary(r), color=colour, weight="normal" if q is None else "bold")
    if q is None:
        return
    for line in quality_modalities(r):
        d.para(line, size=7.8, indent=0.05, hanging=0.3)
    problems = quality_problems(r)
    if not problems:
        d.para("No channel problems found.", size=7.8, color=GREY)
        return
    d.table([Column("Channel", 1.6), Column("Modality", 0.9), Column("Usable", 0.7), Column("Problems", 3.87)],
            [[c.label, c.modality, "yes" if c.usable else "NO", "; ".join(c.problems) or DASH] for c in problems],
            styles=["" if c.usable else "bad" for c in problems])


def _model(d: _Document) -> None:
    rows = model_rows(d.r)
    d.heading("Model, montage and inputs", keep=len(rows) * 0.18 + 0.05)
    d.y += d.kv(rows, label_w=1.7)


def _footers(d: _Document) -> None:
    lines = footer(d.r)
    n = len(d.pages)
    for i, fig in enumerate(d.pages, 1):
        d.fig = fig
        d.hline(H - 0.62, width=0.6)
        d.text(LEFT, H - 0.47, lines[0], size=6.6, color=GREY)
        d.text(LEFT, H - 0.34, lines[1], size=6.6, color=GREY)
        d.text(W - RIGHT, H - 0.47, f"Page {i} of {n}", size=7, color=GREY, ha="right")


def render_pdf(report: StudyReport) -> bytes:
    """The report as PDF bytes: A4 pages, text as text (``pdftotext`` reads it), no creation date. The
    report's own dashes and minus signs are printed in Latin-1 (``-``), kappa spelled out."""
    d = _Document(report)
    _top(d)
    _hypnogram(d)
    for section in (_summary, _sleep, _outcomes, _notes, _attribution, _quality, _model):
        section(d)
    _footers(d)
    buf = io.BytesIO()
    metadata = {"Title": f"{TITLE} {report.key}", "Creator": "psg-gateway", "Producer": "psg-gateway",
                "CreationDate": None}
    # TrueType (Type 42) fonts: text that pdftotext, search and copy read as written (Type 3 splits ligatures)
    with _RENDERING, mpl.rc_context({"pdf.fonttype": 42}), PdfPages(buf, metadata=metadata) as pdf:
        for fig in d.pages:
            pdf.savefig(fig)
    return buf.getvalue()
