"""The hypnogram figure: the model's stages as a step trace over the night, the scored one overlaid.

Drawn with matplotlib's object-oriented API (no pyplot). The layout is fixed so that a rendered page
can be checked against ``hypnogram.csv``: stage rows at :data:`STAGE_Y` (W on top, N3 at the bottom),
the y-axis limits :data:`Y_LIMITS`, the x-axis from the first epoch's onset to the last epoch's end in
hours (ticks labelled with the clock time when the start is known), the model's trace solid
:data:`MODEL_COLOUR`, the scored trace solid :data:`SCORED_COLOUR` drawn :data:`SCORED_OFFSET` rows
below its stage so that both stay visible where they agree.
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timedelta

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .content import EPOCH_S, StudyReport

__all__ = [
    "MODEL_COLOUR",
    "SCORED_COLOUR",
    "SCORED_OFFSET",
    "STAGE_Y",
    "Y_LIMITS",
    "draw_hypnogram",
    "hypnogram_png",
]

STAGE_Y: dict[str, float] = {"W": 4.0, "REM": 3.0, "N1": 2.0, "N2": 1.0, "N3": 0.0}
Y_LIMITS = (-0.6, 4.6)
SCORED_OFFSET = -0.25
MODEL_COLOUR = "#1d3f8f"  # dark blue
SCORED_COLOUR = "#e8750a"  # orange
REM_BAND = "#fbe3e3"
GRID = "#d9d9d9"
TAIL_SHADE = "#eeeeee"


def _trace(stages, offset: float = 0.0) -> tuple[list[float], list[float]]:
    """Step-post points: one per epoch onset plus the end of the last epoch; NaN where unstaged."""
    hours = EPOCH_S / 3600.0
    xs = [i * hours for i in range(len(stages) + 1)]
    ys = [STAGE_Y[s] + offset if s in STAGE_Y else math.nan for s in stages]
    return xs, [*ys, ys[-1] if ys else math.nan]


def _ticks(total_h: float, start: datetime | None) -> tuple[list[float], list[str]]:
    """Ticks on whole clock hours (or half hours / 10 minutes for a short recording)."""
    step_min = 60 if total_h >= 3 else 30 if total_h >= 1 else 10
    offset_min = 0.0
    if start is not None:
        offset_min = start.minute + start.second / 60.0  # minutes past the hour at the first epoch
    first = math.ceil(offset_min / step_min - 1e-9) * step_min - offset_min  # minutes into the recording
    positions, labels = [], []
    m = first
    while m <= total_h * 60 + 1e-6:
        positions.append(m / 60.0)
        if start is not None:
            labels.append((start + timedelta(minutes=m)).strftime("%H:%M"))
        else:
            labels.append(f"{int(m // 60)}:{int(m % 60):02d}")
        m += step_min
    return positions, labels


def draw_hypnogram(ax: Axes, report: StudyReport, fontsize: float = 7.5) -> None:
    """The hypnogram on ``ax`` (its position and size are the caller's)."""
    n = report.n_epochs
    total_h = n * EPOCH_S / 3600.0
    ax.set_xlim(0.0, total_h if n else 1.0)
    ax.set_ylim(*Y_LIMITS)
    ax.set_yticks([STAGE_Y[s] for s in STAGE_Y], list(STAGE_Y), fontsize=fontsize)
    for y in STAGE_Y.values():
        ax.axhline(y, color=GRID, linewidth=0.5, zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_linewidth(0.8)
        ax.spines[side].set_color("#000000")
    ax.tick_params(length=3, width=0.6, labelsize=fontsize)
    if not n:
        ax.set_xticks([])
        ax.text(0.5, 0.5, "No hypnogram: the model bundle has no staging head", transform=ax.transAxes,
                ha="center", va="center", fontsize=fontsize + 1, color="#555555")
        return
    if report.tail_epochs:
        ax.axvspan((n - report.tail_epochs) * EPOCH_S / 3600.0, total_h, color=TAIL_SHADE, zorder=0,
                   linewidth=0)
    if report.scored is not None:
        xs, ys = _trace(list(report.scored)[:n], SCORED_OFFSET)
        ax.step(xs[: len(ys)], ys, where="post", color=SCORED_COLOUR, linewidth=1.2, solid_capstyle="butt",
                zorder=2, label="scored", gid="hypnogram-scored")
    xs, ys = _trace(report.hypnogram)
    ax.step(xs, ys, where="post", color=MODEL_COLOUR, linewidth=1.5, solid_capstyle="butt", zorder=3,
            label="model", gid="hypnogram-model")
    positions, labels = _ticks(total_h, report.recording_start)
    ax.set_xticks(positions, labels, fontsize=fontsize)
    ax.set_xlabel("clock time" if report.recording_start is not None else "hours since the start",
                  fontsize=fontsize)


def hypnogram_png(report: StudyReport, width_in: float = 7.4, height_in: float = 2.1, dpi: int = 150) -> bytes:
    """The hypnogram as a PNG for the HTML report (no Software tag: the bytes depend on the input only)."""
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.07, 0.2, 0.91, 0.75))
    draw_hypnogram(ax, report, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
