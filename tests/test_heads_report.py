"""The HTML evaluation report of ``psg-gateway heads evaluate``: one self-contained, well-formed file whose
plots show the evaluation's numbers; escaping of the site's labels; NaN and missing parts read "n/a"."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from gateway.heads.report import (
    ablation_figure,
    calibration_figure,
    confusion_figure,
    forest_figure,
    plot_calibration,
    render_report,
    roc_figure,
    staging_confusion_figure,
    staging_scores_figure,
    td_auc_figure,
)

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# ---- a strict little HTML checker --------------------------------------------------------------------------
class StrictHTML(HTMLParser):
    """Records the tags; fails on an end tag that does not close the innermost open element or on an element
    left open at the end."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        assert tag not in VOID, f"end tag for void element <{tag}>"
        assert self.stack, f"</{tag}> with nothing open"
        assert self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1]}> (open: {self.stack})"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def close(self):
        super().close()
        assert not self.stack, f"unclosed tags: {self.stack}"


def parse(path: Path) -> StrictHTML:
    parser = StrictHTML()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def png_of(src: str | None) -> bytes:
    prefix = "data:image/png;base64,"
    assert src and src.startswith(prefix), (src or "")[:40]
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(PNG_MAGIC)
    return data


# ---- synthetic evaluations ---------------------------------------------------------------------------------
def ci(value, lo, hi):
    return {"value": value, "ci": [lo, hi]}


def cox_part(label: str, c: float) -> dict:
    return {
        "label": label, "n": 100, "events": 30, "time_unit": "years",
        "harrell_c": ci(c, c - 0.06, c + 0.06), "uno_c": ci(c - 0.01, c - 0.08, c + 0.05),
        "td_auc": [{"horizon": h, **ci(0.70 + 0.02 * h, 0.62 + 0.02 * h, 0.80 + 0.02 * h)}
                   for h in (1.0, 2.0, 3.0)],
        "calibration": {"horizon": 2.0, "bins": [
            {"n": 10, "mean_predicted": round(0.03 * (k + 1), 4),
             "observed": round(0.03 * (k + 1) + (0.01 if k % 2 else -0.01), 4),
             "observed_low": round(max(0.0, 0.03 * (k + 1) - 0.05), 4),
             "observed_high": round(0.03 * (k + 1) + 0.06, 4)}
            for k in range(10)]},
        "subgroups": [
            {"group": "sex", "value": "F", "n": 50, "events": 14, "harrell_c": ci(0.70, 0.60, 0.80)},
            {"group": "sex", "value": "M", "n": 50, "events": 16, "harrell_c": ci(0.72, 0.62, 0.81)},
            {"group": "age", "value": "40-59", "n": 45, "events": 12, "harrell_c": ci(0.71, 0.60, 0.82)},
            {"group": "age", "value": "60+", "n": 55, "events": 18, "harrell_c": ci(0.74, 0.62, 0.85)},
        ],
        "ablation": [{"modality": "BAS", "harrell_c": c - 0.05, "delta": -0.05},
                     {"modality": "RESP", "harrell_c": c - 0.02, "delta": -0.02},
                     {"modality": "EKG", "harrell_c": c + 0.004, "delta": 0.004},
                     {"modality": "EMG", "harrell_c": c - 0.001, "delta": -0.001}],
    }


SEVERITY = [[40, 8, 2, 0], [6, 30, 9, 1], [1, 7, 35, 6], [0, 1, 5, 49]]
STAGES_AFTER = [[500, 40, 30, 2, 20], [60, 80, 90, 3, 40], [20, 30, 1500, 90, 60], [1, 0, 120, 400, 0],
                [15, 25, 50, 0, 600]]
STAGES_BEFORE = [[420, 10, 100, 2, 60], [90, 10, 150, 3, 20], [40, 5, 1400, 200, 55], [5, 0, 300, 216, 0],
                 [60, 10, 200, 0, 420]]


def full_evaluation(demo: bool = True, validated: bool = False) -> dict:
    return copy.deepcopy({
        "head": {"name": "site-cox-v1", "kind": "cox", "checksum": "ab12cd34ef56" * 5 + "abcd",
                 "base_model": {"name": "sleepfm-demo", "hash": "0123456789abcdef" * 4,
                                "validated": validated},
                 "demo_weights": demo},
        "data": {"export": "/data/export", "labels": "/data/labels.csv", "split": "test", "n_studies": 120,
                 "n_patients": 80, "seed": 0, "bootstrap": 200},
        "generated_at": "2025-01-01T00:00:00+00:00",
        "cox": [cox_part("mortality", 0.71), cox_part("stroke", 0.66)],
        "apnea": {"n": 200, "presence": {
            "accuracy": ci(0.80, 0.74, 0.86), "balanced_accuracy": ci(0.78, 0.72, 0.84),
            "auroc": ci(0.86, 0.80, 0.91),
            "roc": {"fpr": [0.0, 0.0, 0.1, 0.2, 0.4, 0.7, 1.0], "tpr": [0.0, 0.3, 0.6, 0.8, 0.9, 0.97, 1.0]}},
            "severity": {"accuracy": ci(0.60, 0.53, 0.67), "balanced_accuracy": ci(0.58, 0.50, 0.65),
                         "classes": ["normal", "mild", "moderate", "severe"], "confusion_matrix": SEVERITY}},
        "staging": {"classes": ["W", "N1", "N2", "N3", "REM"],
                    "before": {"accuracy": 0.62, "cohen_kappa": 0.45, "macro_f1": 0.50,
                               "confusion": STAGES_BEFORE},
                    "after": {"accuracy": 0.78, "cohen_kappa": 0.68, "macro_f1": 0.64,
                              "confusion": STAGES_AFTER}},
        "notes": ["no patient ids: bootstrap resamples studies"],
    })


# 4 per Cox label (calibration, td-AUROC, subgroups, ablation), 2 apnea (ROC, severity), 2 staging
EXPECTED_PLOTS = {
    "cox1-mortality-calibration", "cox1-mortality-td-auc", "cox1-mortality-subgroups",
    "cox1-mortality-ablation",
    "cox2-stroke-calibration", "cox2-stroke-td-auc", "cox2-stroke-subgroups", "cox2-stroke-ablation",
    "apnea-roc", "apnea-severity-confusion", "staging-confusion", "staging-scores",
}


# ---- (a) the full report ----------------------------------------------------------------------------------
def test_full_report_is_one_self_contained_well_formed_file(tmp_path):
    ev = full_evaluation()
    path = render_report(copy.deepcopy(ev), tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    html_text = path.read_text(encoding="utf-8")
    doc = parse(path)
    assert doc.tags[0] == "html" and {"head", "title", "style", "body"} <= set(doc.tags)

    # one embedded PNG per plot, each a real image wide enough to read
    assert len(doc.imgs) == len(EXPECTED_PLOTS)
    embedded = []
    for img in doc.imgs:
        data = png_of(img.get("src"))
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 300 and im.height >= 150
        assert img.get("alt")
        embedded.append(data)

    # nothing fetched, nothing executed
    low = html_text.lower()
    assert "http://" not in low and "https://" not in low and "<script" not in low
    assert "<link" not in low and " on" + "load=" not in low and "javascript:" not in low

    # the numbers a reader looks for
    text = " ".join(doc.text)
    for needle in ("site-cox-v1", "ab12cd34ef56", "sleepfm-demo", "120 studies of 80 patients",
                   "200 replicates", "Outcome: mortality", "Outcome: stroke", "Harrell C 0.71 [0.65, 0.77]",
                   "AUROC 0.86 [0.80, 0.91]",
                   "no patient ids: bootstrap resamples studies", "sex: F"):
        assert needle in text, needle
    # plots come before the tables in each section
    assert low.index("<img") < low.index("<table")

    # evaluation.json is the input; plots/ holds the same PNGs
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text()) == ev
    files = {p.stem: p.read_bytes() for p in (tmp_path / "out" / "plots").glob("*.png")}
    assert set(files) == EXPECTED_PLOTS
    assert sorted(files.values()) == sorted(embedded)


def test_output_is_deterministic(tmp_path):
    a = render_report(full_evaluation(), tmp_path / "a")
    b = render_report(full_evaluation(), tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    for name in ("evaluation.json", "plots/cox1-mortality-calibration.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ---- (b) the not-for-clinical-use banner ------------------------------------------------------------------
@pytest.mark.parametrize(("demo", "validated", "banner"), [
    (True, False, "Fitted on demo (untrained) weights"),
    (True, True, "Fitted on demo (untrained) weights"),
    (False, False, "Base model not validated"),
    (False, True, None),
])
def test_banner_only_when_demo_or_unvalidated(tmp_path, demo, validated, banner):
    ev = full_evaluation(demo, validated)
    ev.update(cox=ev["cox"][:1], apnea=None, staging=None)  # the banner is in the header: keep it quick
    html_text = render_report(ev, tmp_path).read_text()
    if banner is None:
        assert "NOT FOR CLINICAL USE" not in html_text and 'class="banner"' not in html_text
    else:
        assert html_text.count('class="banner"') == 1
        assert f"{banner} \u2014 NOT FOR CLINICAL USE" in html_text


def test_banner_when_the_base_model_is_unknown(tmp_path):
    ev = full_evaluation(demo=False)
    ev.update(cox=[], apnea=None, staging=None)
    ev["head"]["base_model"] = None
    html_text = render_report(ev, tmp_path).read_text()
    assert "NOT FOR CLINICAL USE" in html_text


# ---- (c) escaping -----------------------------------------------------------------------------------------
def test_strings_from_the_site_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    ev = full_evaluation()
    ev["head"]["name"] = evil
    ev["cox"][0]["label"] = evil
    ev["cox"][0]["subgroups"][0]["value"] = evil
    ev["cox"][0]["ablation"][0]["modality"] = '"><img src=x onerror=alert(1)>'
    ev["cox"][1]["label"] = r"cost $\frac{ and $x"  # would be malformed mathtext in matplotlib
    ev["apnea"]["severity"]["classes"][0] = evil
    ev["notes"].append(evil)
    path = render_report(ev, tmp_path)
    html_text = path.read_text()
    assert "<script" not in html_text.lower()
    assert "onerror=alert" not in html_text.replace("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    doc = parse(path)  # still well formed
    assert len(doc.imgs) == len(EXPECTED_PLOTS)
    assert all(img["src"].startswith("data:image/png;base64,") for img in doc.imgs)
    assert r"cost $\frac{ and $x" in " ".join(doc.text)


# ---- (d) NaN and missing parts ----------------------------------------------------------------------------
def degraded_evaluation() -> dict:
    nan = float("nan")
    ev = full_evaluation()
    ev["apnea"] = None
    ev["staging"] = None
    ev["data"].pop("labels")
    a, b = ev["cox"]
    a["harrell_c"] = {"value": nan, "ci": None}
    a["uno_c"] = {"value": 0.7, "ci": [nan, None]}
    a["td_auc"] = []
    a["calibration"] = None
    a["subgroups"][0]["harrell_c"]["ci"] = None
    a["subgroups"][1]["harrell_c"] = {"value": None, "ci": None}
    a["ablation"][2]["delta"] = None
    a["ablation"][2]["harrell_c"] = nan
    b["time_unit"] = None
    b["td_auc"][1]["value"] = nan
    b["td_auc"][2]["ci"] = None
    b["calibration"]["bins"][3]["observed"] = None
    b["calibration"]["bins"][4]["observed_low"] = nan
    b["calibration"]["horizon"] = None
    b["subgroups"] = []
    b["ablation"] = []
    return ev


def test_nan_and_missing_parts_render_as_na(tmp_path):
    path = render_report(degraded_evaluation(), tmp_path)
    doc = parse(path)
    text = " ".join(doc.text)
    assert "Harrell C n/a" in text
    assert "Uno C 0.70 [CI n/a]" in text
    assert "Calibration: n/a" in text and "Time-dependent AUROC: n/a" in text
    assert "Apnea" not in text and "Sleep staging" not in text
    # label 1: subgroups + ablation; label 2: calibration + td-AUROC
    names = {p.stem for p in (tmp_path / "plots").glob("*.png")}
    assert names == {"cox1-mortality-subgroups", "cox1-mortality-ablation", "cox2-stroke-calibration",
                     "cox2-stroke-td-auc"}
    assert len(doc.imgs) == 4
    for img in doc.imgs:
        with Image.open(io.BytesIO(png_of(img["src"]))) as im:
            assert im.width >= 300
    # strict JSON: NaN written as null
    saved = json.loads((tmp_path / "evaluation.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert saved["cox"][0]["harrell_c"] == {"value": None, "ci": None}
    assert saved["apnea"] is None


def test_degraded_apnea_and_staging(tmp_path):
    ev = full_evaluation()
    ev["cox"] = []
    ev["apnea"]["presence"]["roc"] = {"fpr": [], "tpr": []}
    ev["apnea"]["presence"]["auroc"] = {"value": None, "ci": None}
    ev["apnea"]["severity"]["confusion_matrix"] = None
    ev["staging"]["before"] = {"accuracy": 0.5, "cohen_kappa": float("nan"), "macro_f1": None,
                               "confusion": None}
    ev["staging"]["after"]["confusion"][0][0] = None
    doc = parse(render_report(ev, tmp_path))
    text = " ".join(doc.text)
    assert "Severity confusion matrix: n/a" in text
    assert "Cohen's \u03ba n/a \u2192 0.68" in text
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} == {"apnea-roc", "staging-confusion",
                                                                      "staging-scores"}


def test_nothing_evaluated(tmp_path):
    ev = full_evaluation()
    ev.update(cox=[], apnea=None, staging=None, notes=["label 'x' is not in the labels file: not evaluated"])
    doc = parse(render_report(ev, tmp_path))
    assert not doc.imgs
    assert "Nothing was evaluated" in " ".join(doc.text)


# ---- (e) the plots show the input --------------------------------------------------------------------------
def line(fig, gid):
    found = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(found) == 1, gid
    return found[0]


def test_calibration_plot_shows_the_bins():
    bins = [{"n": 10, "mean_predicted": p, "observed": p, "observed_low": max(0.0, p - 0.05),
             "observed_high": p + 0.05} for p in np.round(np.linspace(0.05, 0.5, 10), 3).tolist()]
    cal = {"horizon": 3.0, "bins": bins}
    png = plot_calibration(cal, "years")
    assert png.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(png)) as im:
        assert im.width >= 300

    fig = calibration_figure(cal, "years")
    ax = fig.axes[0]
    pts = line(fig, "calibration-points")
    assert list(pts.get_xdata()) == [b["mean_predicted"] for b in bins]
    assert list(pts.get_ydata()) == [b["observed"] for b in bins]
    # perfectly calibrated: every point lies on the plotted diagonal y = x
    diagonal = line(fig, "diagonal")
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata())
    assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0
    assert ax.get_xlim()[1] >= 0.55 and ax.get_xlim() == ax.get_ylim()
    assert "3 years" in ax.get_xlabel()
    # the error bars span the observed CI
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert sorted((round(s[0][1], 6), round(s[1][1], 6)) for s in segments) == sorted(
        (round(b["observed_low"], 6), round(b["observed_high"], 6)) for b in bins)


def test_calibration_plot_skips_missing_bins():
    cal = {"horizon": 1.0, "bins": [
        {"n": 10, "mean_predicted": 0.1, "observed": 0.12, "observed_low": 0.05, "observed_high": 0.2},
        {"n": 10, "mean_predicted": 0.2, "observed": None, "observed_low": None, "observed_high": None},
        {"n": 10, "mean_predicted": float("nan"), "observed": 0.3, "observed_low": 0.2, "observed_high": 0.4},
        {"n": 10, "mean_predicted": 0.4, "observed": 0.35, "observed_low": None, "observed_high": 0.5},
    ]}
    pts = line(calibration_figure(cal), "calibration-points")
    assert list(pts.get_xdata()) == [0.1, 0.4] and list(pts.get_ydata()) == [0.12, 0.35]
    assert plot_calibration(None).startswith(PNG_MAGIC)


def test_td_auc_plot():
    rows = [{"horizon": 1.0, **ci(0.7, 0.6, 0.8)}, {"horizon": 2.0, "value": float("nan"), "ci": None},
            {"horizon": 3.0, **ci(0.75, 0.65, 0.85)}]
    fig = td_auc_figure(rows, "years")
    ax = fig.axes[0]
    pts = line(fig, "td-auc-points")
    assert list(pts.get_xdata()) == [1.0, 3.0] and list(pts.get_ydata()) == [0.7, 0.75]
    assert list(line(fig, "chance").get_ydata()) == [0.5, 0.5]
    band = ax.collections[0].get_paths()[0].vertices
    assert math.isclose(band[:, 1].min(), 0.6) and math.isclose(band[:, 1].max(), 0.85)
    assert ax.get_ylim() == (0, 1)


def test_forest_plot():
    subs = cox_part("x", 0.7)["subgroups"]
    subs.append({"group": "age", "value": "unknown", "n": 3, "events": 0,
                 "harrell_c": {"value": None, "ci": None}})
    fig = forest_figure(subs, ci(0.71, 0.65, 0.77))
    ax = fig.axes[0]
    pts = line(fig, "forest-points")
    assert list(pts.get_xdata()) == [s["harrell_c"]["value"] for s in subs[:4]]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[0] == "sex: F (n=50)" and ticks[-1] == "age: unknown (n=3)  n/a"
    assert list(line(fig, "chance").get_xdata()) == [0.5, 0.5]
    assert list(line(fig, "overall").get_xdata()) == [0.71, 0.71]
    # each point's horizontal bar spans its CI
    segments = ax.collections[0].get_segments()
    assert sorted((round(s[0][0], 6), round(s[1][0], 6)) for s in segments) == sorted(
        (s["harrell_c"]["ci"][0], s["harrell_c"]["ci"][1]) for s in subs[:4])


def test_ablation_plot():
    abl = cox_part("x", 0.7)["ablation"]
    abl[3]["delta"] = None
    fig = ablation_figure(abl)
    ax = fig.axes[0]
    bars = {p.get_gid(): p for p in ax.patches if p.get_gid()}
    assert set(bars) == {"ablation-BAS", "ablation-RESP", "ablation-EKG"}
    assert math.isclose(bars["ablation-BAS"].get_width(), -0.05)
    assert math.isclose(bars["ablation-EKG"].get_width(), 0.004)
    assert to_hex(bars["ablation-BAS"].get_facecolor()) != to_hex(bars["ablation-EKG"].get_facecolor())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["BAS", "RESP", "EKG", "EMG"]
    assert "n/a" in [t.get_text().strip() for t in ax.texts]


def test_roc_plot():
    ev = full_evaluation()["apnea"]["presence"]
    fig = roc_figure(ev["roc"], ev["auroc"])
    curve = line(fig, "roc-curve")
    assert list(curve.get_xdata()) == ev["roc"]["fpr"] and list(curve.get_ydata()) == ev["roc"]["tpr"]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "AUROC 0.86 [0.80, 0.91]" in legend


def test_confusion_heatmaps_annotate_counts():
    fig = confusion_figure(SEVERITY, ["normal", "mild", "moderate", "severe"], "severity")
    ax = fig.axes[0]
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(v for row in SEVERITY for v in row)
    shown = ax.images[0].get_array()
    assert np.allclose(np.asarray(shown).sum(axis=1), 1.0)  # row-normalised colour

    fig = staging_confusion_figure(["W", "N1", "N2", "N3", "REM"], {"confusion": STAGES_BEFORE},
                                   {"confusion": STAGES_AFTER})
    left, right = fig.axes
    assert [int(t.get_text()) for t in left.texts] == [v for row in STAGES_BEFORE for v in row]
    assert [int(t.get_text()) for t in right.texts] == [v for row in STAGES_AFTER for v in row]


def test_staging_scores_plot():
    st = full_evaluation()["staging"]
    fig = staging_scores_figure(st["before"], {**st["after"], "cohen_kappa": None})
    bars = {p.get_gid(): p.get_height() for p in fig.axes[0].patches if p.get_gid()}
    assert bars == {"before-accuracy": 0.62, "before-cohen_kappa": 0.45, "before-macro_f1": 0.50,
                    "after-accuracy": 0.78, "after-macro_f1": 0.64}
