"""The per-study report (gateway.report): HTML that parses strictly, a PDF whose pages (pdftoppm) show the
hypnogram of hypnogram.csv and whose text (pdftotext) is the HTML's content, and ``studies report``.

The real pipeline runs once on a synthetic half-hour night carrying a scored hypnogram, with a site reference
that makes one watched outcome flagged and one borderline; the edge cases (no quality panel, no attribution,
a decision stored before ``outcomes`` existed, a validated bundle) use hand-written outputs.
"""

from __future__ import annotations

import csv
import json
import re
import stat
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime
from pathlib import Path

import html5lib
import numpy as np
import pytest
from matplotlib.image import imread
from peers import system_tool
from pipeline_env import pipeline_env, spool_file
from pyedflib import highlevel

from gateway.config import FlagOutcome, FlagsConfig
from gateway.report import REPORT_HTML, REPORT_PDF, build_report, render_html, render_pdf, write_study_report
from gateway.report.content import ReportError
from gateway.report.hypnogram import MODEL_COLOUR, SCORED_COLOUR, SCORED_OFFSET, STAGE_Y, Y_LIMITS
from gateway.report.pdf_report import HYPNOGRAM_BOX
from gateway.store.models import State, Study
from gateway.synthetic.night import write_synthetic_night

HOURS = 0.5  # 60 epochs
GENERATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SCORED = ["W"] * 6 + ["N1"] * 6 + ["N2"] * 18 + ["N3"] * 16 + ["N2"] * 8 + ["REM"] * 6
_ANNOTATION = {"W": "Sleep stage W", "N1": "Sleep stage 1", "N2": "Sleep stage 2", "N3": "Sleep stage 3",
               "REM": "Sleep stage R"}


def poppler(tool: str) -> str:
    """Path of a poppler-utils tool; skip without it, fail under PSG_REQUIRE_POPPLER=1."""
    return system_tool(tool, env="PSG_REQUIRE_POPPLER", package="poppler-utils")


# ---- a study the real pipeline made ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def processed(tmp_path_factory, model):
    """(repo, study row, db url, tmp folder): a scored synthetic night through the in-process pipeline; death
    flagged (percentile 95 >= 90), Stroke borderline (95 in the band 90 to 96), two more watched."""
    base = tmp_path_factory.mktemp("report")
    night = write_synthetic_night(base / "night.edf", hours=HOURS, seed=11)
    signals, headers, header = highlevel.read_edf(str(night), digital=True)
    header["annotations"] += [[30.0 * i, 30.0, _ANNOTATION[s]] for i, s in enumerate(SCORED)]
    highlevel.write_edf(str(base / "scored.edf"), signals, headers, header, digital=True)
    url = f"sqlite:///{base / 'gateway.db'}"
    db, repo, pipe, paths = pipeline_env(url, base / "var", *model, reports=True)
    model_hash = pipe.bundle.identity.model_hash
    for i in range(20):
        earlier = repo.register_file(source="folder:/in", path=f"/elsewhere/{i}.edf", name=f"{i}.edf",
                                     sha256=f"{i:064x}", filename_pattern=None, actor="t").study
        high = 1e6 if i == 0 else -1e6
        repo.add_reference(earlier.id, model_hash, {"death": high, "Stroke": high,
                                                    "Atrial fibrillation and flutter": 1e6})
        repo.transition(repo.claim("t", 60), State.FAILED, "t", "study.failed")
    pipe.flags = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=90),
                                       FlagOutcome(label="Stroke", percentile=96, second_look_percentile=90),
                                       FlagOutcome(label="Atrial fibrillation and flutter", percentile=95)],
                             percentile_min_reference=20)
    study = spool_file(paths, "night.edf", (base / "scored.edf").read_bytes(), repo)
    assert pipe.run_once("w")
    done = repo.get(study.id)
    assert done.output_path and done.flags, done.last_error
    yield repo, done, url, base
    db.dispose()


@pytest.fixture(scope="module")
def written(processed):
    """The report files written into the study's outputs folder, and the report they were drawn from."""
    _, study, _, _ = processed
    paths = write_study_report(study, Path(study.output_path), generated_at=GENERATED)
    return paths, build_report(study, generated_at=GENERATED)


@pytest.fixture(scope="module")
def pages(written, tmp_path_factory) -> list[Path]:
    pdftoppm = poppler("pdftoppm")
    out = tmp_path_factory.mktemp("pages")
    subprocess.run([pdftoppm, "-png", "-r", "100", str(written[0][1]), str(out / "page")], check=True, timeout=60)
    return sorted(out.glob("page-*.png"))


def _csv_stages(out_dir: Path) -> list[str]:
    with open(out_dir / "hypnogram.csv", newline="", encoding="utf-8") as f:
        return [row["stage"] for row in csv.DictReader(f)]


def test_report_files_are_private_and_named_for_what_they_are(processed, written):
    _, study, _, _ = processed
    paths, _ = written
    assert [p.name for p in paths] == [REPORT_HTML, REPORT_PDF]
    assert all(p.parent == Path(study.output_path) for p in paths)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, oct(p.stat().st_mode)
        assert study.patient_id not in p.name and "Synthetic" not in p.name
    assert paths[1].read_bytes().startswith(b"%PDF-")


def test_html_parses_strictly_and_shows_outcomes_flags_notes_and_banner(processed, written):
    _, study, _, _ = processed
    page = written[0][0].read_text(encoding="utf-8")
    html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(page)  # raises on any parse error
    root = ET.fromstring(page)  # and well-formed XML: every element closed, no stray entity
    text = " ".join(" ".join(root.itertext()).split())
    assert "NOT FOR CLINICAL USE" in text  # demo weights: never validated
    rows = {}
    for tr in root.iter("tr"):
        cells = [" ".join("".join(td.itertext()).split()) for td in tr.findall("td")]
        if len(cells) == 6:
            rows[cells[1]] = (cells, tr.get("class"))
    outcomes = {o["code"]: o for o in study.flags["outcomes"]}
    assert set(rows) == set(outcomes) == {"PSG-DEATH", "PSG-STROKE", "PSG-ATRIAL-FIBRILLAT"}
    assert rows["PSG-DEATH"][0][3:] == ["95.0", "20", "FLAGGED"] and rows["PSG-DEATH"][1] == "flagged"
    assert rows["PSG-STROKE"][0][3:] == ["95.0", "20", "second look"] and rows["PSG-STROKE"][1] == "borderline"
    assert rows["PSG-ATRIAL-FIBRILLAT"][0][5] == "not flagged"
    for code, o in outcomes.items():
        assert rows[code][0][2] == f"{o['log_hazard']:+.3f}".replace("-", "\u2212")
    assert re.search(r"FLAGGED death \(PSG-DEATH\): percentile 95\.0", text)
    assert "SECOND LOOK Stroke (PSG-STROKE)" in text
    for note in study.flags["notes"]:
        assert " ".join(note.split()) in text
    # the header identifies the patient and the study; the footer the model, montage and encoding
    assert "Synthetic" in text and study.patient_id in text and study.key in text
    assert study.bundle_hash in text and study.montage_version in text and "psg-gateway demo (age-50)/20" in text
    assert "Cohen\u2019s \u03ba" in text
    [img] = [e for e in root.iter("img")]
    assert img.get("src").startswith("data:image/png;base64,")
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched


def _near(pixels: np.ndarray, colour: str, tolerance: float = 0.2) -> np.ndarray:
    rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return np.linalg.norm(pixels[..., :3] - rgb, axis=-1) < tolerance


def _stable(stages: list, i: int, half: int = 2) -> bool:
    return 0 < i - half and i + half < len(stages) and len({stages[j] for j in range(i - half, i + half + 1)}) == 1


def test_pdf_pages_plot_the_hypnogram_of_hypnogram_csv(processed, pages):
    """On page 1 the hypnogram's axes box is HYPNOGRAM_BOX: in the middle of every run of a stage, the
    model's colour sits on that stage's row and on no other, and the scored colour just below its stage."""
    _, study, _, _ = processed
    stages = _csv_stages(Path(study.output_path))
    scored = json.loads((Path(study.output_path) / "metrics.json").read_text())["staging_agreement"]["scored"]
    assert scored == SCORED and len(stages) == len(SCORED) == 60
    assert len(pages) >= 2
    image = imread(pages[0])
    height, width = image.shape[:2]
    left, bottom, box_w, box_h = HYPNOGRAM_BOX

    def column(i: int) -> int:
        return round((left + (i + 0.5) / len(stages) * box_w) * width)

    def row(y: float) -> int:
        return round((1 - (bottom + (y - Y_LIMITS[0]) / (Y_LIMITS[1] - Y_LIMITS[0]) * box_h)) * height)

    def seen(x: int, y: float, colour: str) -> bool:
        r = row(y)
        return bool(_near(image[r - 3:r + 4, x - 1:x + 2], colour).any())

    checked = {"model": 0, "scored": 0}
    for i in range(len(stages)):
        if _stable(stages, i):
            x = column(i)
            assert seen(x, STAGE_Y[stages[i]], MODEL_COLOUR), (i, stages[i])
            assert not any(seen(x, STAGE_Y[s], MODEL_COLOUR) for s in STAGE_Y if s != stages[i]), (i, stages[i])
            checked["model"] += 1
        if _stable(scored, i):
            x = column(i)
            assert seen(x, STAGE_Y[scored[i]] + SCORED_OFFSET, SCORED_COLOUR), (i, scored[i])
            others = [s for s in STAGE_Y if s != scored[i]]
            assert not any(seen(x, STAGE_Y[s] + SCORED_OFFSET, SCORED_COLOUR) for s in others), (i, scored[i])
            checked["scored"] += 1
    assert checked["model"] >= 10 and checked["scored"] >= 30, checked
    # the scored trace visits every stage row: the check above saw W, N1, N2, N3 and REM
    assert {scored[i] for i in range(len(scored)) if _stable(scored, i)} == set(STAGE_Y)
    # the axes frame: the left spine (black) runs down the box's left edge
    x0, top, foot = round(left * width), row(Y_LIMITS[1]), row(Y_LIMITS[0])
    assert _near(image[top + 5:foot - 5, x0 - 2:x0 + 3], "#000000", 0.35).any(axis=1).all()


def test_pdf_text_is_the_reports_content(processed, written):
    _, study, _, _ = processed
    pdftotext = poppler("pdftotext")
    text = subprocess.run([pdftotext, "-layout", str(written[0][1]), "-"], check=True, capture_output=True,
                          text=True, timeout=60).stdout
    flat = " ".join(text.split())
    assert "NOT FOR CLINICAL USE" in flat
    assert "Synthetic" in flat and study.patient_id in flat and study.key in flat
    for o in study.flags["outcomes"]:  # the PDF prints its minus signs in Latin-1
        assert o["code"] in flat and f"{o['log_hazard']:+.3f}" in flat
    assert re.search(r"PSG-DEATH\s+[+-]\d\.\d{3}\s+95\.0\s+20\s+FLAGGED", text)
    assert re.search(r"PSG-STROKE\s+[+-]\d\.\d{3}\s+95\.0\s+20\s+second look", text)
    assert "FLAGGED death (PSG-DEATH): percentile 95.0" in flat and "SECOND LOOK Stroke (PSG-STROKE)" in flat
    assert re.search(r"Agreement with the scored hypnogram over 60 epochs: accuracy \d+\.\d %, Cohen's kappa -?\d\.\d\d",
                     flat)
    for heading in ("HYPNOGRAM", "RISK FLAGS AND FINDINGS", "SLEEP METRICS", "WATCHED OUTCOMES", "NOTES",
                    "MODALITY ATTRIBUTION", "SIGNAL QUALITY", "MODEL, MONTAGE AND INPUTS"):
        assert heading in text
    assert f"Model {study.bundle_name} {study.bundle_version} (hash {study.bundle_hash[:12]})" in flat
    assert "Page 1 of" in flat


def test_pdf_bytes_are_deterministic_without_a_creation_date(written):
    _, report = written
    first, second = render_pdf(report), render_pdf(report)
    assert first == second
    assert b"/CreationDate" not in first and b"/ModDate" not in first
    assert render_html(report) == render_html(report)


def test_studies_report_cli_writes_pdf_and_html_and_refuses_a_bad_suffix(processed, tmp_path):
    from typer.testing import CliRunner

    from gateway.cli.main import app

    repo, study, url, _ = processed
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  var_dir: {tmp_path / 'var'}\n")
    env = {"PSG__DATABASE__URL": url, "PSG_CONFIG": None}
    runner = CliRunner()

    def report(ref: str, out: Path):
        return runner.invoke(app, ["studies", "report", ref, "--out", str(out), "--config", str(cfg)], env=env)

    pdf, page = tmp_path / "r.pdf", tmp_path / "r.html"
    done = report(study.key, pdf)
    assert done.exit_code == 0, done.output
    assert pdf.read_bytes().startswith(b"%PDF-") and stat.S_IMODE(pdf.stat().st_mode) & 0o077 == 0
    done = report(str(study.id), page)
    assert done.exit_code == 0, done.output
    html5lib.HTMLParser(strict=True).parse(page.read_text(encoding="utf-8"))

    refused = report(study.key, tmp_path / "r.txt")
    assert refused.exit_code == 1 and not (tmp_path / "r.txt").exists()
    [line] = [x for x in refused.output.splitlines() if x.startswith("error:")]
    assert ".pdf or .html" in line
    # a study with no outputs yet: one line, nothing written
    waiting = repo.register_file(source="folder:/in", path="/elsewhere/x.edf", name="x.edf", sha256="f" * 64,
                                 filename_pattern=None, actor="t").study
    refused = report(waiting.key, tmp_path / "w.pdf")
    assert refused.exit_code == 1 and not (tmp_path / "w.pdf").exists()
    [line] = [x for x in refused.output.splitlines() if x.startswith("error:")]
    assert f"study {waiting.key} has no outputs" in line


# ---- edge cases on hand-written outputs ------------------------------------------------------------------
def _outputs(folder: Path, *, quality: dict | None = None, attribution: bool = False, validated: bool = False,
             stages: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stages = stages or ["W"] * 4 + ["N1"] * 2 + ["N2"] * 10 + ["N3"] * 8 + ["REM"] * 6
    with open(folder / "hypnogram.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "onset_s", "stage", "p_W", "p_N1", "p_N2", "p_N3", "p_REM", "tail"])
        for i, s in enumerate(stages):
            writer.writerow([i, 30 * i, s, 0.2, 0.2, 0.2, 0.2, 0.2, int(i >= len(stages) - 2)])
    metrics = {
        "modalities": ["BAS", "RESP"], "missing_modalities": ["EKG", "EMG"],
        "sleep": {"tib_min": 15.0, "tst_min": 13.0, "sleep_efficiency_pct": 86.7, "sleep_onset_latency_min": 2.0,
                  "waso_min": 0.0, "rem_latency_min": 8.0,
                  "stage_min": {"W": 2.0, "N1": 1.0, "N2": 5.0, "N3": 4.0, "REM": 3.0},
                  "stage_pct_of_tst": {"N1": 7.7, "N2": 38.5, "N3": 30.8, "REM": 23.1}},
        "staging_agreement": None, "demographics_encoding": "unconfirmed",
        "model_bundle": {"name": "site-model", "version": "2", "validated": validated,
                         "checkpoints": {"base": "a" * 64}},
        "validated": validated, "montage": {"name": "lab", "version": "v7", "channels": {"BAS": ["C3-M2"]},
                                            "unmapped": ["Pleth"]},
        "recording": {"duration_s": 900.0, "format": "EDF+C"},
    }
    if quality is not None:
        metrics["quality"] = quality
    if attribution:
        metrics["attribution"] = {"file": "attribution.csv", "modalities": ["BAS", "RESP"]}
        (folder / "attribution.csv").write_text("index,phecode,phenotype,BAS,RESP\n0,death,death,0.1,-0.05\n"
                                                "1,433,Stroke <b>x</b>,0.0,0.02\n")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _study(folder: Path | None, flags: dict | None, name: str = "Doe^Jane") -> Study:
    return Study(id=7, key="st-0123456789ab", state="FLAGGED", version=1, patient_name=name, patient_id="MRN-1",
                 patient_id_issuer="HOSP", birth_date=date(1960, 5, 6), sex="F", accession="ACC-9",
                 recording_start=datetime(2025, 2, 3, 22, 47, 30), flags=flags,
                 output_path=None if folder is None else str(folder))


OLD_FLAGS = {  # a decision stored before ``outcomes`` and ``risk_flags`` existed
    "flags": [{"label": "death", "code": "PSG-DEATH", "phecode": "death", "phenotype": "death", "log_hazard": 0.4,
               "hazard_ratio": 1.49, "percentile": None, "reason": "hazard ratio 1.49 >= 1.2", "head": ""}],
    "findings": [{"metric": "sleep_efficiency_pct", "value": 61.0, "text": "Sleep efficiency",
                  "reason": "Sleep efficiency 61.0 < 70"}],
    "notes": ["percentile thresholds inactive: the site reference holds 3 studies"],
    "borderline": [{"label": "433", "code": "PSG-433", "phecode": "433", "phenotype": "Stroke <b>x</b>",
                    "log_hazard": -0.2, "percentile": 91.0, "reference_size": 250, "reason": "band", "head": ""}],
}


def _strict_text(page: str) -> str:
    html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(page)
    return " ".join(" ".join(ET.fromstring(page).itertext()).split())


def test_an_older_decision_without_outcomes_lists_its_flags_and_borderline(tmp_path):
    report = build_report(_study(_outputs(tmp_path / "o"), OLD_FLAGS), generated_at=GENERATED)
    assert [(o.code, o.status) for o in report.outcomes] == [("PSG-DEATH", "flagged"), ("PSG-433", "borderline")]
    assert report.outcomes[1].reference_size == 250 and report.outcomes[1].percentile == 91.0
    text = _strict_text(render_html(report))
    assert "Stroke <b>x</b>" in text  # escaped: shown as text, never markup
    assert "FINDING Sleep efficiency 61.0 < 70" in text
    assert "Signal quality checks were not recorded for this study." in text
    assert "Modality attribution was not computed" in text
    assert "UNCONFIRMED" in text and "Doe, Jane" in text and "MRN-1 (HOSP)" in text
    assert "missing: EKG, EMG" in text and "Pleth" in text
    # the model hash is derived from metrics.json when the row has none
    assert report.bundle_hash and len(report.bundle_hash) == 64


def test_quality_panel_attribution_and_withheld_flags(tmp_path):
    quality = {"interpretable": False, "reasons": ["no usable EEG channel"],
               "channels": {"C3-M2": {"modality": "BAS", "problems": ["flat line 92 % of the night"], "usable": False,
                                      "flat_fraction": 0.92},
                            "Airflow": {"modality": "RESP", "problems": [], "usable": True}},
               "modalities": {"BAS": {"usable": 0, "channels": 1}, "RESP": {"usable": 1, "channels": 1}}}
    flags = {"flags": [], "findings": [], "notes": [], "borderline": [],
             "outcomes": [{"label": "death", "code": "PSG-DEATH", "phecode": "death", "phenotype": "death",
                           "log_hazard": 0.1, "percentile": 97.5, "reference_size": 300, "status": "withheld",
                           "head": ""},
                          {"label": "433", "code": "PSG-433", "phecode": "433", "phenotype": "Stroke <b>x</b>",
                           "log_hazard": -0.3, "percentile": None, "reference_size": 0, "status": "inactive",
                           "head": ""}],
             "risk_flags": {"suppressed": True, "reasons": ["signals not interpretable: no usable EEG channel"]}}
    report = build_report(_study(_outputs(tmp_path / "o", quality=quality, attribution=True), flags),
                          generated_at=GENERATED)
    assert report.risk_flags_suppressed and not report.flagged
    assert [(a.phecode, a.changes) for a in report.attribution] == [("death", {"BAS": 0.1, "RESP": -0.05}),
                                                                    ("433", {"BAS": 0.0, "RESP": 0.02})]
    text = _strict_text(render_html(report))
    assert "WITHHELD Risk flags withheld for this study. signals not interpretable: no usable EEG channel" in text
    assert "Signals NOT interpretable: no usable EEG channel." in text
    assert "C3-M2 BAS NO flat line 92 % of the night" in text and "BAS 0/1 usable: C3-M2" in text
    assert "97.5 300 withheld" in text and "\u2212" + "0.050" in text
    pdf_text = _pdf_text(render_pdf(report), tmp_path)
    for expected in ("Risk flags withheld for this study", "Signals NOT interpretable: no usable EEG channel.",
                     "flat line 92 % of the night", "withheld", "Stroke <b>x</b>"):
        assert expected in pdf_text, expected


def _pdf_text(data: bytes, folder: Path) -> str:
    pdftotext = poppler("pdftotext")
    path = folder / "x.pdf"
    path.write_bytes(data)
    out = subprocess.run([pdftotext, str(path), "-"], check=True, capture_output=True, text=True, timeout=60)
    return " ".join(out.stdout.split())


def test_a_validated_bundle_has_no_banner_and_a_long_night_pages_on(tmp_path):
    notes = [f"note {i}: " + "word " * 30 for i in range(40)]  # enough to need more pages
    flags = {"flags": [], "findings": [], "notes": notes, "borderline": [], "outcomes": []}
    folder = _outputs(tmp_path / "o", validated=True, stages=["N2", "N3", "REM", "W"] * 240)
    report = build_report(_study(folder, flags), generated_at=GENERATED)
    assert report.validated and report.n_epochs == 960
    text = _strict_text(render_html(report))
    assert "NOT FOR CLINICAL USE" not in text and "Model bundle validated by this site." in text
    pdf_text = _pdf_text(render_pdf(report), tmp_path)
    assert "NOT FOR CLINICAL USE" not in pdf_text
    pages = int(re.search(r"Page 1 of (\d+)", pdf_text).group(1))
    assert pages >= 3 and f"Page {pages} of {pages}" in pdf_text
    assert "note 39:" in pdf_text


def test_a_study_without_outputs_has_no_report(tmp_path):
    with pytest.raises(ReportError, match="no outputs"):
        build_report(_study(None, None))
    with pytest.raises(ReportError, match="no metrics.json"):
        build_report(_study(tmp_path, None))
