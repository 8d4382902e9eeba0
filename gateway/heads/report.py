"""The self-contained HTML report of ``psg-gateway heads evaluate``: plots first, numbers second.

``render_report(evaluation, out_dir)`` writes ``out_dir/report.html`` (one file: every plot a PNG
embedded as a ``data:`` URI, inline CSS, no JavaScript, nothing fetched from anywhere), the input as
``out_dir/evaluation.json`` and each plot as ``out_dir/plots/<name>.png``.

Plots are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global figure
registry: safe in a thread, no display needed). Each plot has a ``*_figure`` function that returns
the :class:`~matplotlib.figure.Figure` (what the tests inspect: the drawn points are the input's) and
a ``plot_*`` function that returns the PNG bytes. Any number may be missing, ``None`` or NaN (a
C-index without a comparable pair, a CI that could not be computed): it reads "n/a" and the point
is left out of the plot. Every string from the evaluation (labels come from a site's CSV) is
HTML-escaped, and ``$`` is escaped for matplotlib so that a label is never parsed as mathtext.
The output is deterministic apart from the ``generated_at`` timestamp in the input.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gateway.fsutil import atomic_write
from gateway.report.content import finite

from .store import plain

__all__ = [
    "ablation_figure",
    "calibration_figure",
    "confusion_figure",
    "forest_figure",
    "plot_ablation",
    "plot_calibration",
    "plot_confusion",
    "plot_forest",
    "plot_roc",
    "plot_staging_confusion",
    "plot_staging_scores",
    "plot_td_auc",
    "render_report",
    "roc_figure",
    "staging_confusion_figure",
    "staging_scores_figure",
    "td_auc_figure",
]

NA = "n/a"
DPI = 110
BLUE, RED, GREY, GREEN = "#1f5fa8", "#c0392b", "#7f8c8d", "#2e8b57"
BANNER_DEMO = "Fitted on demo (untrained) weights \u2014 NOT FOR CLINICAL USE"
BANNER_UNVALIDATED = "Base model not validated \u2014 NOT FOR CLINICAL USE"


# ---- values ----------------------------------------------------------------------------------------------
def _metric(m: Any) -> tuple[float | None, float | None, float | None]:
    """(value, ci low, ci high) of ``{"value": .., "ci": [lo, hi]}`` or of a bare number."""
    if isinstance(m, dict):
        ci = m.get("ci")
        lo = hi = None
        if isinstance(ci, (list, tuple)) and len(ci) >= 2:
            lo, hi = finite(ci[0]), finite(ci[1])
        return finite(m.get("value")), lo, hi
    return finite(m), None, None


def _fmt(v: Any, digits: int = 2, signed: bool = False) -> str:
    f = finite(v)
    if f is None:
        return NA
    return f"{f:+.{digits}f}" if signed else f"{f:.{digits}f}"


def _fmt_ci(m: Any, digits: int = 2) -> str:
    """``0.71 [0.65, 0.77]``, ``0.71 [CI n/a]`` or ``n/a``."""
    value, lo, hi = _metric(m)
    if value is None:
        return NA
    if lo is None or hi is None:
        return f"{value:.{digits}f} [CI {NA}]"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _int(v: Any) -> str:
    f = finite(v)
    return NA if f is None else str(round(f))


def _str(v: Any, default: str = NA) -> str:
    return default if v is None or (isinstance(v, str) and not v.strip()) else str(v)


def _mpl(s: Any) -> str:
    """Text for matplotlib: a ``$`` would start mathtext (and a malformed expression would raise)."""
    return str(s).replace("$", r"\$")


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else []


# ---- figures ---------------------------------------------------------------------------------------------
def _figure(width: float = 6.0, height: float = 4.2, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # no Software tag: the same input gives the same bytes under any matplotlib version's metadata
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    fig.clear()
    return buf.getvalue()


def _title(text: str, label: Any = None) -> str:
    if label is None:
        return text
    name = str(label)
    if len(name) > 40:
        name = name[:39] + "\u2026"
    return _mpl(f"{text} \u2014 {name}")


def _no_data(ax, text: str = f"{NA}: nothing to plot") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=GREY, fontsize=12)


def calibration_figure(cal: dict | None, time_unit: str | None = None, label: Any = None) -> Figure:
    """Observed risk (Kaplan-Meier, with its CI) against mean predicted risk per decile, and y = x.

    The bins' points are one ``Line2D`` with gid ``calibration-points`` (the bins with both numbers).
    """
    cal = _dict(cal)
    fig, ax = _figure(5.6, 4.6)
    xs, ys, err_x, err_y, err_lo, err_hi = [], [], [], [], [], []
    for b in _list(cal.get("bins")):
        b = _dict(b)
        x, y = finite(b.get("mean_predicted")), finite(b.get("observed"))
        if x is None or y is None:
            continue
        xs.append(x)
        ys.append(y)
        lo, hi = finite(b.get("observed_low")), finite(b.get("observed_high"))
        if lo is not None and hi is not None:
            err_x.append(x)
            err_y.append(y)
            err_lo.append(max(0.0, y - lo))
            err_hi.append(max(0.0, hi - y))
    extent = [v for v in xs + ys + [y + h for y, h in zip(err_y, err_hi)] if v is not None]
    top = min(1.0, max(extent) * 1.08) if extent and max(extent) > 0 else 0.1
    top = max(top, 0.02)
    ax.plot([0, top], [0, top], linestyle="--", color=GREY, linewidth=1, label="perfect calibration (y = x)",
            gid="diagonal")
    if err_x:
        ax.errorbar(err_x, err_y, yerr=[err_lo, err_hi], fmt="none", ecolor=BLUE, elinewidth=1, capsize=3,
                    alpha=0.7, label="observed 95 % CI")
    if xs:
        ax.plot(xs, ys, "o", color=BLUE, markersize=6, gid="calibration-points",
                label="decile of predicted risk")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    else:
        _no_data(ax)
    horizon = finite(cal.get("horizon"))
    unit = f" {_mpl(time_unit)}" if time_unit else ""
    at = f"at {horizon:g}{unit}" if horizon is not None else f"at horizon {NA}"
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(f"mean predicted risk {at}")
    ax.set_ylabel(f"observed risk {at} (Kaplan-Meier)")
    ax.set_title(_title("Calibration by decile of predicted risk", label), fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def plot_calibration(cal: dict | None, time_unit: str | None = None, label: Any = None) -> bytes:
    return _png(calibration_figure(cal, time_unit, label))


def td_auc_figure(td_auc: Sequence[dict] | None, time_unit: str | None = None, label: Any = None) -> Figure:
    """Time-dependent AUROC against the horizon; the 95 % CI as a band; chance (0.5) dashed.

    The estimates are one ``Line2D`` with gid ``td-auc-points`` (the horizons with a value).
    """
    fig, ax = _figure()
    rows = []
    for r in _list(td_auc):
        r = _dict(r)
        h = finite(r.get("horizon"))
        value, lo, hi = _metric(r)
        if h is not None:
            rows.append((h, value, lo, hi))
    rows.sort(key=lambda r: r[0])
    ax.axhline(0.5, linestyle="--", color=GREY, linewidth=1, label="chance (0.5)", gid="chance")
    pts = [(h, v) for h, v, _, _ in rows if v is not None]
    band = [(h, lo, hi) for h, _, lo, hi in rows if lo is not None and hi is not None]
    if band:
        hb = np.array([b[0] for b in band])
        ax.fill_between(hb, [b[1] for b in band], [b[2] for b in band], color=BLUE, alpha=0.18, linewidth=0,
                        label="95 % CI")
        if len(band) == 1:  # a band of one horizon has no width: show it as an error bar
            ax.errorbar(hb, [(band[0][1] + band[0][2]) / 2], yerr=[(band[0][2] - band[0][1]) / 2],
                        fmt="none", ecolor=BLUE, alpha=0.5, capsize=4)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=BLUE, gid="td-auc-points",
                label="time-dependent AUROC")
    else:
        _no_data(ax)
    hs = [r[0] for r in rows]
    if hs:
        span = (max(hs) - min(hs)) or max(abs(max(hs)), 1.0)
        ax.set_xlim(min(hs) - 0.08 * span, max(hs) + 0.08 * span)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"horizon ({_mpl(time_unit)})" if time_unit else "horizon")
    ax.set_ylabel("AUROC")
    ax.set_title(_title("Time-dependent AUROC", label), fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def plot_td_auc(td_auc: Sequence[dict] | None, time_unit: str | None = None, label: Any = None) -> bytes:
    return _png(td_auc_figure(td_auc, time_unit, label))


def _subgroup_label(s: dict) -> str:
    return f"{_str(s.get('group'))}: {_str(s.get('value'))} (n={_int(s.get('n'))})"


def forest_figure(subgroups: Sequence[dict] | None, overall: Any = None, label: Any = None) -> Figure:
    """Harrell's C with its CI per subgroup (top to bottom in input order); overall C and 0.5 as lines.

    The points are one ``Line2D`` with gid ``forest-points``; a subgroup without a value keeps its row
    (labelled "n/a") so that the reader sees it was not computable.
    """
    subs = [_dict(s) for s in _list(subgroups)]
    fig, ax = _figure(6.4, max(2.4, 1.2 + 0.42 * max(1, len(subs))))
    ys = list(range(len(subs), 0, -1))
    px, py, ex, ey, elo, ehi, labels = [], [], [], [], [], [], []
    for y, s in zip(ys, subs):
        value, lo, hi = _metric(s.get("harrell_c"))
        row = _subgroup_label(s)
        labels.append(_mpl(row + ("" if value is not None else f"  {NA}")))
        if value is None:
            continue
        px.append(value)
        py.append(y)
        if lo is not None and hi is not None:
            ex.append(value)
            ey.append(y)
            elo.append(max(0.0, value - lo))
            ehi.append(max(0.0, hi - value))
    ax.axvline(0.5, linestyle="--", color=GREY, linewidth=1, label="chance (0.5)", gid="chance")
    c, _, _ = _metric(overall)
    if c is not None:
        ax.axvline(c, linestyle="-", color=GREEN, linewidth=1.2, label=f"overall C = {c:.2f}", gid="overall")
    if ex:
        ax.errorbar(ex, ey, xerr=[elo, ehi], fmt="none", ecolor=BLUE, capsize=3, elinewidth=1.2)
    if px:
        ax.plot(px, py, "s", color=BLUE, markersize=6, gid="forest-points", label="Harrell C [95 % CI]")
    if not subs:
        _no_data(ax)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(0.4, len(subs) + 0.6)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Harrell's C-index")
    ax.set_title(_title("C-index by subgroup", label), fontsize=10)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_forest(subgroups: Sequence[dict] | None, overall: Any = None, label: Any = None) -> bytes:
    return _png(forest_figure(subgroups, overall, label))


def ablation_figure(ablation: Sequence[dict] | None, label: Any = None) -> Figure:
    """Horizontal bars: the change in Harrell's C when each modality is masked (negative: it carries risk).

    Bars are ``Rectangle`` patches with gid ``ablation-<modality>``; a modality without a delta has no
    bar and reads "n/a".
    """
    rows = [_dict(a) for a in _list(ablation)]
    fig, ax = _figure(6.0, max(2.4, 1.2 + 0.45 * max(1, len(rows))))
    ys = list(range(len(rows), 0, -1))
    deltas = [finite(a.get("delta")) for a in rows]
    labels = [_mpl(_str(a.get("modality"))) for a in rows]
    sizes = [abs(d) for d in deltas if d is not None]
    pad = max(sizes) * 0.45 if sizes and max(sizes) > 0 else 0.01
    for y, a, d in zip(ys, rows, deltas):
        if d is None:
            ax.text(0, y, f"  {NA}", va="center", ha="left", fontsize=8, color=GREY)
            continue
        bar = ax.barh([y], [d], color=RED if d < 0 else GREY, height=0.6)[0]
        bar.set_gid(f"ablation-{_str(a.get('modality'))}")
        ax.text(d, y, f" {d:+.3f} ", va="center",
                ha="left" if d >= 0 else "right", fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    lim = (max(sizes) if sizes else 0.0) + pad
    ax.set_xlim(-lim, lim)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=9)
    ax.set_ylim(0.4, len(rows) + 0.6)
    if not rows:
        _no_data(ax)
    ax.set_xlabel("change in Harrell's C with the modality masked  (red: the modality carries risk)")
    ax.set_title(_title("Modality ablation", label), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_ablation(ablation: Sequence[dict] | None, label: Any = None) -> bytes:
    return _png(ablation_figure(ablation, label))


def roc_figure(roc: dict | None, auroc: Any = None) -> Figure:
    """The ROC curve of apnea presence (AHI >= 5) with AUROC [CI] in the legend; chance diagonal.

    The curve is one ``Line2D`` with gid ``roc-curve`` (the points with both coordinates).
    """
    roc = _dict(roc)
    fig, ax = _figure(5.2, 4.8)
    fpr, tpr = (finite(v) for v in _list(roc.get("fpr"))), (finite(v) for v in _list(roc.get("tpr")))
    pairs = [(x, y) for x, y in zip(fpr, tpr) if x is not None and y is not None]
    ax.plot([0, 1], [0, 1], linestyle="--", color=GREY, linewidth=1, label="chance", gid="chance")
    if pairs:
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], color=BLUE, linewidth=2, gid="roc-curve",
                label=f"AUROC {_fmt_ci(auroc)}")
    else:
        _no_data(ax, f"{NA}: no ROC curve (one class only?)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("false-positive rate (1 - specificity)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.set_title("Apnea presence (AHI \u2265 5): ROC", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def plot_roc(roc: dict | None, auroc: Any = None) -> bytes:
    return _png(roc_figure(roc, auroc))


def _matrix(m: Any, k: int) -> np.ndarray:
    """A k x k float matrix (NaN where a cell is missing) from a nested list of any shape."""
    out = np.full((k, k), np.nan)
    for i, row in enumerate(_list(m)[:k]):
        for j, v in enumerate(_list(row)[:k]):
            f = finite(v)
            if f is not None:
                out[i, j] = f
    return out


def _classes(classes: Any, m: Any) -> list[str]:
    names = [_str(c) for c in _list(classes)]
    k = max(len(names), len(_list(m)), *(len(_list(r)) for r in _list(m)), 0) if _list(m) else len(names)
    return names + [f"class {i}" for i in range(len(names), k)]


def _heatmap(ax, counts: np.ndarray, classes: list[str], title: str) -> None:
    """Row-normalised colour (each true class sums to 1), the counts written in the cells."""
    rows = np.nansum(counts, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, np.nan_to_num(counts) / np.where(rows > 0, rows, 1), 0.0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="equal")
    k = len(classes)
    for i in range(k):
        for j in range(k):
            v = counts[i, j]
            text = NA if np.isnan(v) else f"{round(v)}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8 if k > 4 else 9,
                    color="white" if share[i, j] > 0.55 else "black")
    ticks = [_mpl(c) for c in classes]
    ax.set_xticks(range(k))
    ax.set_xticklabels(ticks, fontsize=8)
    ax.set_yticks(range(k))
    ax.set_yticklabels(ticks, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(_mpl(title), fontsize=10)


def confusion_figure(matrix: Any, classes: Any = None, title: str = "Confusion matrix") -> Figure:
    """One confusion matrix: rows the true class, columns the predicted one; colour row-normalised."""
    names = _classes(classes, matrix)
    fig, ax = _figure(5.0, 4.4)
    if not names:
        _no_data(ax)
        return fig
    _heatmap(ax, _matrix(matrix, len(names)), names, title)
    return fig


def plot_confusion(matrix: Any, classes: Any = None, title: str = "Confusion matrix") -> bytes:
    return _png(confusion_figure(matrix, classes, title))


def staging_confusion_figure(classes: Any, before: dict | None, after: dict | None) -> Figure:
    """The released head's and the re-fitted head's confusion matrices side by side."""
    before, after = _dict(before), _dict(after)
    names = _classes(classes, before.get("confusion") or after.get("confusion"))
    fig, axes = _figure(9.6, 4.4, ncols=2)
    panels = ((axes[0], before, "before (released head)"), (axes[1], after, "after (site re-fit)"))
    for ax, part, title in panels:
        if names and part.get("confusion") is not None:
            _heatmap(ax, _matrix(part.get("confusion"), len(names)), names, title)
        else:
            ax.set_title(title, fontsize=10)
            ax.set_axis_off()
            _no_data(ax)
    return fig


def plot_staging_confusion(classes: Any, before: dict | None, after: dict | None) -> bytes:
    return _png(staging_confusion_figure(classes, before, after))


STAGING_SCORES = (("accuracy", "accuracy"), ("cohen_kappa", "Cohen's \u03ba"), ("macro_f1", "macro-F1"))


def staging_scores_figure(before: dict | None, after: dict | None) -> Figure:
    """Grouped bars of accuracy, Cohen's kappa and macro-F1, before and after the re-fit.

    Bars are ``Rectangle`` patches with gid ``<before|after>-<metric>``; a missing score has no bar.
    """
    fig, ax = _figure(6.0, 3.8)
    width = 0.36
    values = []
    for k, (part, name, color) in enumerate(((_dict(before), "before", GREY), (_dict(after), "after", BLUE))):
        labelled = False
        for i, (key, _) in enumerate(STAGING_SCORES):
            v = finite(part.get(key))
            x = i + (k - 0.5) * width
            if v is None:
                ax.text(x, 0.02, NA, ha="center", va="bottom", fontsize=8, color=GREY)
                continue
            values.append(v)
            bar = ax.bar([x], [v], width=width, color=color, label=None if labelled else name)[0]
            bar.set_gid(f"{name}-{key}")
            labelled = True
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(STAGING_SCORES)))
    ax.set_xticklabels([label for _, label in STAGING_SCORES])
    ax.set_ylim(min([0.0, *values]) - 0.05, 1.08)
    ax.set_ylabel("score")
    ax.set_title("Sleep staging: released head vs site re-fit", fontsize=10)
    if values:
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_staging_scores(before: dict | None, after: dict | None) -> bytes:
    return _png(staging_scores_figure(before, after))


# ---- HTML ------------------------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
padding:1rem 1.5rem 3rem;color:#1d2733;line-height:1.4}
h1{font-size:1.5rem;margin:.4rem 0}h2{font-size:1.25rem;border-bottom:2px solid #d5dde6;padding-bottom:.2rem;
margin-top:2rem}h3{font-size:1.05rem;margin:1.2rem 0 .4rem}
.banner{background:#b71c1c;color:#fff;font-weight:700;font-size:1.2rem;padding:.8rem 1rem;border-radius:4px;
margin:.6rem 0;text-align:center;letter-spacing:.02em}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:.5rem 0;font-size:.92rem}
.meta dt{font-weight:600;color:#4a5a6a}.meta dd{margin:0}
code{background:#eef2f6;padding:0 .25rem;border-radius:3px}
.summary{font-size:1rem;background:#f4f7fa;border-left:4px solid #1f5fa8;padding:.45rem .7rem}
.plots{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;flex:1 1 440px;max-width:100%}figure.wide{flex-basis:100%}
figure img{max-width:100%;height:auto;border:1px solid #e1e6eb}
figcaption{font-size:.85rem;color:#4a5a6a;margin-top:.25rem}
table{border-collapse:collapse;font-size:.88rem;margin:.5rem 0}
th,td{border:1px solid #d5dde6;padding:.2rem .55rem;text-align:right}th{background:#eef2f6}
td.l,th.l{text-align:left}.na{color:#8a96a3}.note{color:#4a5a6a}
details{margin:.5rem 0}summary{cursor:pointer;color:#1f5fa8}
footer{margin-top:2.5rem;font-size:.8rem;color:#8a96a3}
""".strip()


class _Plots:
    """The plots of one report: unique file names, PNG bytes, and the HTML ``<figure>`` for each."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, name: str, png: bytes, alt: str, caption: str, wide: bool = False) -> str:
        base = name
        n = 2
        while name in self.files:
            name = f"{base}-{n}"
            n += 1
        self.files[name] = png
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        cls = ' class="wide"' if wide else ""
        return (f'<figure{cls}><img src="{src}" alt="{_e(alt)}">'
                f"<figcaption>{caption}</figcaption></figure>")


def _slug(s: Any) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(s)).strip("-").lower()[:40]
    return slug or "label"


def _cell(text: str, left: bool = False) -> str:
    cls = [c for c, on in (("l", left), ("na", text == NA)) if on]
    attr = f' class="{" ".join(cls)}"' if cls else ""
    return f"<td{attr}>{_e(text)}</td>"


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], left: int = 1) -> str:
    """A table; the first ``left`` columns are left-aligned (text), the rest numbers."""
    h = "".join(("<th class=\"l\">" if i < left else "<th>") + f"{_e(c)}</th>" for i, c in enumerate(head))
    body = "".join("<tr>" + "".join(_cell(c, i < left) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _banner(head: dict) -> str:
    base = _dict(head.get("base_model"))
    if head.get("demo_weights") is True:
        return f'<div class="banner" role="alert">{_e(BANNER_DEMO)}</div>'
    if base.get("validated") is not True:  # false, or not stated: not validated
        return f'<div class="banner" role="alert">{_e(BANNER_UNVALIDATED)}</div>'
    return ""


def _header(ev: dict) -> str:
    head, data = _dict(ev.get("head")), _dict(ev.get("data"))
    base = _dict(head.get("base_model"))
    checksum = _str(head.get("checksum"))
    short = checksum[:12] if checksum != NA else NA
    base_hash = _str(base.get("hash"))
    validated = {True: "yes", False: "no"}.get(base.get("validated"), NA)
    meta = [
        ("Head", f"<strong>{_e(_str(head.get('name')))}</strong> ({_e(_str(head.get('kind')))})"),
        ("Head checksum", f'<code title="{_e(checksum)}">{_e(short)}</code>'),
        ("Base model", (f"{_e(_str(base.get('name')))} &middot; hash <code title=\"{_e(base_hash)}\">"
                        f"{_e(base_hash[:12] if base_hash != NA else NA)}</code> &middot; "
                        f"validated: {_e(validated)}")),
        ("Demo weights", _e({True: "yes", False: "no"}.get(head.get("demo_weights"), NA))),
        ("Evaluated", (f"{_e(_int(data.get('n_studies')))} studies of "
                       f"{_e(_int(data.get('n_patients')))} patients"
                      f" &middot; split <code>{_e(_str(data.get('split')))}</code>")),
        ("Bootstrap", (f"{_e(_int(data.get('bootstrap')))} replicates (95 % CI) &middot; "
                      f"seed {_e(_int(data.get('seed')))}")),
        ("Export", f"<code>{_e(_str(data.get('export')))}</code>"),
    ]
    if data.get("labels") is not None:
        meta.append(("Labels", f"<code>{_e(_str(data.get('labels')))}</code>"))
    meta.append(("Generated", _e(_str(ev.get("generated_at")))))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in meta)
    notes = [n for n in _list(ev.get("notes")) if n is not None]
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    notes_html = f"<h3>Notes</h3><ul class=\"note\">{items}</ul>" if notes else ""
    title = _e(f"Evaluation of head {_str(head.get('name'))}")
    return f"<header><h1>{title}</h1>{_banner(head)}<dl class=\"meta\">{dl}</dl>{notes_html}</header>"


def _cox_section(i: int, part: dict, plots: _Plots) -> str:
    label = _str(part.get("label"))
    unit = part.get("time_unit") if isinstance(part.get("time_unit"), str) else None
    slug = f"cox{i + 1}-{_slug(label)}"
    summary = (f"n = {_e(_int(part.get('n')))}, events = {_e(_int(part.get('events')))} &middot; "
               f"Harrell C {_e(_fmt_ci(part.get('harrell_c')))} &middot; "
               f"Uno C {_e(_fmt_ci(part.get('uno_c')))}")
    figs = []
    cal = part.get("calibration")
    if isinstance(cal, dict) and _list(cal.get("bins")):
        figs.append(plots.add(
            f"{slug}-calibration", plot_calibration(cal, unit, label), f"calibration plot for {label}",
            "Calibration: each point is a decile of predicted risk; observed risk (Kaplan-Meier, 95 % CI) "
            "against the mean predicted risk. Points on the dashed diagonal are perfectly calibrated; "
            "above it the model under-estimates the risk, below it over-estimates."))
    else:
        figs.append(f'<p class="na">Calibration: {NA} (no horizon inside the follow-up).</p>')
    if _list(part.get("td_auc")):
        figs.append(plots.add(
            f"{slug}-td-auc", plot_td_auc(part.get("td_auc"), unit, label),
            f"time-dependent AUROC for {label}",
            "How well the risk score separates those with an event by each horizon from those still "
            "event-free after it (0.5: chance, 1: perfect); the band is the bootstrap 95 % CI."))
    else:
        figs.append(f'<p class="na">Time-dependent AUROC: {NA} (no horizon).</p>')
    if _list(part.get("subgroups")):
        figs.append(plots.add(
            f"{slug}-subgroups", plot_forest(part.get("subgroups"), part.get("harrell_c"), label),
            f"C-index by subgroup for {label}",
            "Harrell's C with its 95 % CI in each subgroup; the green line is the overall C, the dashed line "
            "chance. Wide intervals mean few patients or events."))
    else:
        figs.append(f'<p class="na">C-index by subgroup: {NA}.</p>')
    if _list(part.get("ablation")):
        figs.append(plots.add(
            f"{slug}-ablation", plot_ablation(part.get("ablation"), label), f"modality ablation for {label}",
            "Change in C when one modality's embedding is replaced by its training mean: a negative change "
            "(red) means the modality carries risk information."))
    else:
        figs.append(f'<p class="na">Modality ablation: {NA}.</p>')
    tables = []
    td = [_dict(r) for r in _list(part.get("td_auc"))]
    if td:
        tables.append("<h4>Time-dependent AUROC</h4>" + _table(
            [f"horizon ({unit})" if unit else "horizon", "AUROC [95 % CI]"],
            [[_fmt(r.get("horizon"), 3).rstrip("0").rstrip(".") if finite(r.get("horizon")) is not None else NA,
              _fmt_ci(r)] for r in td]))
    subs = [_dict(s) for s in _list(part.get("subgroups"))]
    if subs:
        tables.append("<h4>Subgroups</h4>" + _table(
            ["subgroup", "n", "events", "Harrell C [95 % CI]"],
            [[f"{_str(s.get('group'))}: {_str(s.get('value'))}", _int(s.get("n")), _int(s.get("events")),
              _fmt_ci(s.get("harrell_c"))] for s in subs]))
    abl = [_dict(a) for a in _list(part.get("ablation"))]
    if abl:
        tables.append("<h4>Modality ablation</h4>" + _table(
            ["modality masked", "Harrell C", "change"],
            [[_str(a.get("modality")), _fmt(a.get("harrell_c")), _fmt(a.get("delta"), 3, signed=True)]
             for a in abl]))
    if isinstance(cal, dict) and _list(cal.get("bins")):
        bins = [_dict(b) for b in _list(cal.get("bins"))]
        horizon = _e(_fmt(cal.get("horizon"), 3))
        tables.append(f"<details><summary>Calibration bins (horizon {horizon})</summary>"
                      + _table(["decile", "n", "mean predicted", "observed [95 % CI]"],
                               [[str(k + 1), _int(b.get("n")), _fmt(b.get("mean_predicted"), 3),
                                 _fmt_ci({"value": b.get("observed"),
                                          "ci": [b.get("observed_low"), b.get("observed_high")]}, 3)]
                                for k, b in enumerate(bins)]) + "</details>")
    return (f'<section class="cox"><h2>Outcome: {_e(label)}</h2><p class="summary">{summary}</p>'
            f'<div class="plots">{"".join(figs)}</div>{"".join(tables)}</section>')


def _apnea_section(ap: dict, plots: _Plots) -> str:
    presence, severity = _dict(ap.get("presence")), _dict(ap.get("severity"))
    summary = (f"n = {_e(_int(ap.get('n')))} &middot; presence (AHI &ge; 5): AUROC "
               f"{_e(_fmt_ci(presence.get('auroc')))}, balanced accuracy "
               f"{_e(_fmt_ci(presence.get('balanced_accuracy')))} &middot; severity: balanced accuracy "
               f"{_e(_fmt_ci(severity.get('balanced_accuracy')))}")
    figs = [plots.add("apnea-roc", plot_roc(presence.get("roc"), presence.get("auroc")), "apnea ROC curve",
                      "ROC curve of apnea presence (AHI &ge; 5) over every threshold of the predicted "
                      "probability; the dashed diagonal is chance.")]
    if severity.get("confusion_matrix") is not None:
        figs.append(plots.add(
            "apnea-severity-confusion",
            plot_confusion(severity.get("confusion_matrix"), severity.get("classes"), "Apnea severity"),
            "apnea severity confusion matrix",
            "Severity class (normal &lt; 5, mild 5-15, moderate 15-30, severe &ge; 30 events/h): true rows, "
            "predicted columns; counts in the cells, colour the share of each true class."))
    else:
        figs.append(f'<p class="na">Severity confusion matrix: {NA}.</p>')
    table = _table(["task", "accuracy [95 % CI]", "balanced accuracy [95 % CI]", "AUROC [95 % CI]"], [
        ["presence (AHI ≥ 5)", _fmt_ci(presence.get("accuracy")), _fmt_ci(presence.get("balanced_accuracy")),
         _fmt_ci(presence.get("auroc"))],
        ["severity (4 classes)", _fmt_ci(severity.get("accuracy")),
         _fmt_ci(severity.get("balanced_accuracy")), NA],
    ])
    return (f'<section class="apnea"><h2>Apnea</h2><p class="summary">{summary}</p>'
            f'<div class="plots">{"".join(figs)}</div>{table}</section>')


def _staging_section(st: dict, plots: _Plots) -> str:
    before, after = _dict(st.get("before")), _dict(st.get("after"))
    epochs = f"{_e(_int(st.get('epochs')))} scored epochs &middot; " if st.get("epochs") is not None else ""
    changes = ", ".join(f"{label} {_e(_fmt(before.get(key)))} &rarr; {_e(_fmt(after.get(key)))}"
                        for key, label in (("accuracy", "accuracy"), ("cohen_kappa", "Cohen's &kappa;"),
                                           ("macro_f1", "macro-F1")))
    summary = f"{epochs}{changes}"
    figs = [
        plots.add("staging-confusion", plot_staging_confusion(st.get("classes"), before, after),
                  "sleep staging confusion matrices before and after the re-fit",
                  "Per-epoch confusion matrices, released head (left) and site re-fit (right): true stage "
                  "rows, predicted columns; counts in the cells, colour the share of each true stage.",
                  wide=True),
        plots.add("staging-scores", plot_staging_scores(before, after),
                  "sleep staging scores before and after",
                  "Accuracy, Cohen's &kappa; and macro-F1 on the same scored epochs."),
    ]
    table = _table(["score", "before", "after"], [
        [label, _fmt(before.get(key), 3), _fmt(after.get(key), 3)] for key, label in STAGING_SCORES])
    return (f'<section class="staging"><h2>Sleep staging</h2><p class="summary">{summary}</p>'
            f'<div class="plots">{"".join(figs)}</div>{table}</section>')


def _build_html(ev: dict, plots: _Plots) -> str:
    head = _dict(ev.get("head"))
    sections = []
    cox = [_dict(p) for p in _list(ev.get("cox"))]
    for i, part in enumerate(cox):
        sections.append(_cox_section(i, part, plots))
    if isinstance(ev.get("apnea"), dict):
        sections.append(_apnea_section(ev["apnea"], plots))
    if isinstance(ev.get("staging"), dict):
        sections.append(_staging_section(ev["staging"], plots))
    if not sections:
        sections.append('<p class="na">Nothing was evaluated (see the notes).</p>')
    title = _e(f"psg-gateway heads evaluate: {_str(head.get('name'))}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
            f"<style>{CSS}</style></head><body>{_header(ev)}<main>{''.join(sections)}</main>"
            "<footer>psg-gateway heads evaluate &middot; research use; the numbers are those of "
            "evaluation.json next to this file.</footer></body></html>\n")


def render_report(evaluation: dict, out_dir: Path) -> Path:
    """Write out_dir/report.html (one self-contained file: every plot a PNG embedded as a data: URI, inline
    CSS, no JavaScript, no external resources) and out_dir/evaluation.json (the input, indented) and return
    the HTML path. Also write each plot as out_dir/plots/<name>.png.

    In evaluation.json a NaN or infinite number is written as null (strict JSON)."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    ev = _dict(evaluation)
    plots = _Plots()
    page = _build_html(ev, plots)
    for name, png in plots.files.items():
        atomic_write(plots_dir / f"{name}.png", png)
    text = json.dumps(plain(evaluation, strict=True), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write(out_dir / "evaluation.json", text.encode("utf-8"))
    path = out_dir / "report.html"
    atomic_write(path, page.encode("utf-8"))
    return path
