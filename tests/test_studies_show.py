"""``psg-gateway studies show``: the human view (a terminal, or --human) and the JSON document (--json, or
a stdout that is not a terminal, as scripts have always had it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pipeline_env import pipeline_env, spool_file
from pyedflib import highlevel
from typer.testing import CliRunner

from gateway.cli import studies_cmd
from gateway.cli.main import app
from gateway.config import FlagOutcome, FlagsConfig, Hl7Config
from gateway.store.db import make_engine, upgrade
from gateway.store.models import State
from gateway.store.repo import Repo
from gateway.synthetic.night import write_synthetic_night

runner = CliRunner()
HOURS = 0.1  # 12 epochs
SCORED = ["W", "N1", "N2", "N2", "N3", "N3", "N2", "REM", "REM", "N2", "W", "N2"]
_ANNOTATION = {"W": "Sleep stage W", "N1": "Sleep stage 1", "N2": "Sleep stage 2", "N3": "Sleep stage 3",
               "REM": "Sleep stage R"}


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    """A wide console: the assertions read whole lines (CliRunner is no terminal: 80 columns otherwise)."""
    monkeypatch.setattr(studies_cmd.out, "_width", 200)


def _config(tmp_path: Path, db_url: str) -> tuple[Path, dict[str, str]]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  var_dir: {tmp_path / 'var'}\n")
    return cfg, {"PSG__DATABASE__URL": db_url}


def _show(cfg: Path, env: dict, ref: str, *options: str):
    return runner.invoke(app, ["studies", "show", ref, "--config", str(cfg), *options], env=env)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


# ---- a study the real pipeline made -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processed(tmp_path_factory, model):
    """(db url, base folder, study row, message): a scored night (technician J_Smith) through the in-process
    pipeline; death flagged (percentile 95 >= 90), Stroke in its second-look band; its message queued."""
    base = tmp_path_factory.mktemp("show")
    night = write_synthetic_night(base / "night.edf", hours=HOURS, seed=12)
    signals, headers, header = highlevel.read_edf(str(night), digital=True)
    header["annotations"] += [[30.0 * i, 30.0, _ANNOTATION[s]] for i, s in enumerate(SCORED)]
    header["technician"] = "J_Smith"
    highlevel.write_edf(str(base / "scored.edf"), signals, headers, header, digital=True)
    url = f"sqlite:///{base / 'gateway.db'}"
    db, repo, pipe, paths = pipeline_env(url, base / "var", *model, reports=True)
    model_hash = pipe.bundle.identity.model_hash
    for i in range(20):
        earlier = repo.register_file(source="folder:/in", path=f"/elsewhere/{i}.edf", name=f"{i}.edf",
                                     sha256=f"{i:064x}", filename_pattern=None, actor="t").study
        high = 1e6 if i == 0 else -1e6
        repo.add_reference(earlier.id, model_hash, {"death": high, "Stroke": high})
        repo.transition(repo.claim("t", 60), State.FAILED, "t", "study.failed")
    pipe.flags = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=90),
                                       FlagOutcome(label="Stroke", percentile=96, second_look_percentile=90)],
                             percentile_min_reference=20)
    study = spool_file(paths, "night.edf", (base / "scored.edf").read_bytes(), repo)
    pipe.hl7 = Hl7Config(enabled=True, host="ehr.example", port=2575)
    assert pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.QUEUED and done.flags, done.last_error
    [message] = repo.messages(study_id=done.id)
    assert "Synthetic" in message.message  # the patient's name: in the ER7, never in the view
    yield url, base, done, message
    db.dispose()


def test_human_view_puts_the_flags_at_the_top(processed):
    url, base, study, message = processed
    cfg, env = _config(base, url)
    r = _show(cfg, env, study.key, "--human")
    assert r.exit_code == 0, r.output
    lines = _lines(r.stdout)
    text = "\n".join(lines)
    heads = [next(i for i, line in enumerate(lines) if line.startswith(title)) for title in (
        f"Study {study.key}", "Flags", "Watched outcomes", "Sleep metrics", "Signal quality", "Timeline",
        "Messages", "Report")]
    assert heads == sorted(heads)  # in this order: flags first, history last

    # the header: state, source, recorded, identifiers as the JSON view has them, scorer, model, montage
    assert re.search(r"^State\s+QUEUED\s+version 1", text, re.MULTILINE)
    assert re.search(r"^Source\s+folder:/in \(file\)$", text, re.MULTILINE)
    assert re.search(r"^Recorded\s+\d{4}-\d\d-\d\d \d\d:\d\d · 0 h 06 min, EDF\+C, \d+ channels$", text, re.MULTILINE)
    assert re.search(rf"^Patient ID\s+{re.escape(study.patient_id)}$", text, re.MULTILINE)
    assert re.search(r"^Scorer\s+J Smith$", text, re.MULTILINE)
    assert re.search(r"^Input\s+night\.edf \(sha256 [0-9a-f]{12}\)$", text, re.MULTILINE)
    assert re.search(rf"^Model\s+sleepfm-demo-untrained \S+ \(hash {study.bundle_hash[:12]}\) · NOT FOR CLINICAL USE "
                     r"\(not validated by this site\)$", text, re.MULTILINE)
    assert re.search(rf"^Montage\s+{re.escape(study.montage_name)} {study.montage_version} · BAS \d+, RESP \d+",
                     text, re.MULTILINE)

    # the flags: flagged with percentile, reference size and reason; the second look; the notes
    flags = lines[heads[1] + 1: heads[2]]
    assert flags[0] == ("FLAGGED death (PSG-DEATH): percentile 95.0 of 20 — percentile 95.0 >= 90 "
                        "(site reference of 20 studies)")
    assert flags[1].startswith("SECOND LOOK Stroke (PSG-STROKE): percentile 95.0 of 20 — percentile 95.0 in the "
                               "second-look band 90 to 96")
    assert [f"Note: {n}" for n in study.flags["notes"]] == [f for f in flags if f.startswith("Note:")]

    # the watched outcomes table
    rows = {line.split()[0]: line.split() for line in lines[heads[2] + 2: heads[3]] if line}
    for o in study.flags["outcomes"]:
        assert rows[o["phenotype"]][1:5] == [o["code"], f"{o['log_hazard']:+.3f}", "95.0", "20"]
    assert rows["death"][5:] == ["FLAGGED"] and rows["Stroke"][5:] == ["second", "look"]

    # sleep metrics from metrics.json, the scored hypnogram's agreement with its scorer, quality
    metrics = json.loads((Path(study.output_path) / "metrics.json").read_text())
    sleep, scoring = metrics["sleep"], metrics["staging_agreement"]
    assert re.search(rf"^Total sleep time\s+{sleep['tst_min']:.1f} min$", text, re.MULTILINE)
    assert re.search(rf"^N2\s+{sleep['stage_min']['N2']:.1f}\s+{sleep['stage_pct_of_tst']['N2']:.1f}$", text, re.MULTILINE)
    assert (f"Scored hypnogram (scorer J Smith): 12 epochs, accuracy {100 * scoring['accuracy']:.1f} %, "
            f"Cohen's kappa {scoring['kappa']:.2f}; F1 W ") in text
    assert lines[heads[4] + 1] == "Signals interpretable."
    assert lines[heads[4] + 2].startswith("BAS ") and "usable" in lines[heads[4] + 2]

    # the timeline, one line per event, in order; the message; the report files
    events = [line.split()[2] for line in lines[heads[5] + 2: heads[6]] if line]
    assert events == ["study.received", "study.ready", "study.decoded", "study.mapped", "study.inferred",
                      "study.queued"]
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+study\.queued\s+INFERRED → QUEUED\s+w\s+"
                     r"flags=\[\"PSG-DEATH\"\]", text, re.MULTILINE)
    message_row = lines[heads[6] + 2].split()
    assert message_row[:6] == [str(message.id), "1", "PENDING", message.destination, "0",
                               message.created_at.strftime("%Y-%m-%d")]
    for name in ("report.pdf", "report.html"):
        assert re.search(rf"^{re.escape(name)}\s+{re.escape(str(Path(study.output_path) / name))}$", text, re.MULTILINE)

    # no PHI beyond what the JSON view shows: not the name, birth date or sex; never the message text
    assert "Synthetic" not in text and study.birth_date.isoformat() not in text and "ORU^R01" not in text
    assert study.birth_date.strftime("%d-%b-%Y").upper() not in text.upper()


def test_json_stays_the_default_off_a_terminal_and_with_json(processed):
    url, base, study, _ = processed
    cfg, env = _config(base, url)
    for options in ((), ("--json",)):
        r = _show(cfg, env, study.key, *options)
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["key"] == study.key and doc["flags"] == study.flags
        assert doc["identifiers"]["scorer"] == "J Smith"
        assert [e["event"] for e in doc["events"]][-1] == "study.queued"
    r = _show(cfg, env, study.key, "--json", "--human")
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_human_view_is_the_default_on_a_terminal(processed, monkeypatch):
    url, base, study, _ = processed
    cfg, env = _config(base, url)
    monkeypatch.setattr(studies_cmd.out, "_force_terminal", True)
    r = _show(cfg, env, study.key)
    assert r.exit_code == 0, r.output
    assert re.search(r"^Flags", r.stdout, re.MULTILINE) and not r.stdout.lstrip().startswith("{")
    r = _show(cfg, env, study.key, "--json")
    assert json.loads(r.stdout)["key"] == study.key


# ---- withheld risk flags, findings, an uninterpretable night, a failure: from the row as stored -----------------
def test_withheld_flags_findings_and_quality_without_a_pipeline(tmp_path, db_url):
    cfg, env = _config(tmp_path, db_url)
    engine = make_engine(db_url)
    upgrade(engine)
    repo = Repo(engine)
    try:
        s = repo.register_file(source="folder:/in", path="/x/a.edf", name="a.edf", sha256="d" * 64,
                               filename_pattern=None, actor="folder:/in").study
        out = tmp_path / "out"
        out.mkdir()
        (out / "metrics.json").write_text(json.dumps({
            "sleep": {"tst_min": 301.5, "sleep_efficiency_pct": 62.1, "rem_latency_min": None},
            "quality": {"interpretable": False, "reasons": ["BAS: 1 of 1 channels unusable"],
                        "modalities": {"BAS": {"usable": 0, "channels": 1}},
                        "channels": {"C3-M2": {"modality": "BAS", "usable": False,
                                               "problems": ["[flat] 80% of the night"]},
                                     "ECG": {"modality": "EKG", "usable": True, "problems": []}}}}))
        flags = {"flags": [], "borderline": [], "notes": ["risk flags withheld: see the quality"],
                 "findings": [{"metric": "sleep_efficiency_pct", "value": 62.1, "text": "Sleep efficiency",
                               "reason": "Sleep efficiency 62.1 < 70"}],
                 "outcomes": [{"label": "death", "code": "PSG-DEATH", "phecode": "death", "phenotype": "death",
                               "log_hazard": 1.5, "percentile": None, "reference_size": 3, "status": "withheld",
                               "head": ""}],
                 "risk_flags": {"suppressed": True, "reasons": ["signals not interpretable: BAS unusable"],
                                "kinds": ["quality"]}}
        c = repo.claim("w", 60)
        c = repo.transition(c, State.FAILED, "w", "study.failed", {"why": "[red]not markup[/red]"},
                            last_error="delivery: AE from the EHR", flags=flags, output_path=str(out))
        r = _show(cfg, env, s.key, "--human")
        assert r.exit_code == 0, r.output
        text = "\n".join(_lines(r.stdout))
        assert re.search(r"^State\s+FAILED", text, re.MULTILINE)
        assert re.search(r"^Last error\s+delivery: AE from the EHR$", text, re.MULTILINE)
        assert re.search(r"^Model\s+—$", text, re.MULTILINE) and re.search(r"^Scorer", text, re.MULTILINE) is None
        assert "RISK FLAGS WITHHELD: signals not interpretable: BAS unusable" in text
        assert "FINDING Sleep efficiency 62.1 < 70" in text
        assert "Nothing flagged" not in text
        assert re.search(r"^death\s+PSG-DEATH\s+\+1\.500\s+—\s+3\s+withheld$", text, re.MULTILINE)
        assert re.search(r"^Sleep efficiency\s+62\.1 %$", text, re.MULTILINE)
        assert re.search(r"^REM latency\s+no REM$", text, re.MULTILINE)
        assert "Signals NOT interpretable: BAS: 1 of 1 channels unusable" in text
        assert "C3-M2 (BAS): unusable — [flat] 80% of the night" in text and "ECG (EKG)" not in text
        assert 'why=[red]not markup[/red]' in text  # values are text, never rich markup
        assert "No message for this study." in text
        assert re.search(r"^report\.pdf\s+not written$", text, re.MULTILINE)

        # no outputs, no decision: the view says so
        bare = repo.register_file(source="folder:/in", path="/x/b.edf", name="b.edf", sha256="e" * 64,
                                  filename_pattern=None, actor="folder:/in").study
        r = _show(cfg, env, str(bare.id), "--human")
        assert r.exit_code == 0, r.output
        assert "Not decided yet: the flag step has not run for this study (READY)." in r.stdout
        assert "No outputs yet." in r.stdout and "Sleep metrics" not in r.stdout
    finally:
        engine.dispose()
