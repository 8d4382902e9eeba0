"""The site reference behind percentile flags: ``psg-gateway reference seed ARCHIVE`` fills it with nothing
sent, ``reference show`` reports it, and percentile flags stay inactive below
``flags.percentile_min_reference`` and act above it, at the percentile the reference gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.store.db import make_engine
from gateway.store.models import ReferenceHazard, State
from gateway.store.repo import Repo
from gateway.synthetic.night import write_synthetic_night

pytestmark = [pytest.mark.slow, pytest.mark.integration]
runner = CliRunner()
HOURS = 0.1
NEEDED = 3


def _config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "paths": {"var_dir": str(tmp_path / "var")}, "database": {"url": db_url},
        "pipeline": {"write_report": False},
        "flags": {"outcomes": [{"label": "death", "percentile": 50}], "percentile_min_reference": NEEDED,
                  "send_mode": "always"},
        # A message would be built for every study (send_mode always): seeding must build none.
        "hl7": {"enabled": True, "host": "127.0.0.1", "port": 9},
    }))
    return path


def test_seeding_fills_the_reference_sends_nothing_and_activates_percentile_flags(tmp_path, db_url):
    cfg = _config(tmp_path, db_url)
    archive = tmp_path / "archive"
    for i in range(NEEDED):
        write_synthetic_night(archive / f"ref_{i}.edf", hours=HOURS, seed=300 + i)

    assert runner.invoke(app, ["db", "upgrade", "--config", str(cfg)]).exit_code == 0
    r = runner.invoke(app, ["reference", "show", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "the reference is empty: percentile flags are inactive until 3 studies" in " ".join(r.output.split())

    # Seeding studies one at a time: each sees the reference of those before it, too small to flag.
    r = runner.invoke(app, ["reference", "seed", str(archive), "--config", str(cfg), "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["reference"] == {"death": NEEDED} and doc["active"] is True and doc["needed"] == NEEDED
    repo = Repo(make_engine(db_url))
    seeded = repo.list(limit=10)
    assert len(seeded) == NEEDED and {s.state for s in seeded} == {State.FLAGGED}
    assert repo.messages() == []  # nothing built, nothing for the EHR
    for s in seeded:
        assert s.flags["flags"] == [] and s.flags["outcomes"][0]["status"] == "not flagged"
        assert any(n.startswith("percentile thresholds inactive") for n in s.flags["notes"])

    r = runner.invoke(app, ["reference", "show", "--config", str(cfg), "--json"])
    [(model, sizes)] = json.loads(r.stdout)["models"].items()
    assert sizes == {"death": NEEDED} and model == seeded[0].bundle_hash

    # The next study (batch, messages held) is compared with the three: flagged when at or above 50.
    new = tmp_path / "new"
    write_synthetic_night(new / "night.edf", hours=HOURS, seed=999)
    r = runner.invoke(app, ["batch", str(new), "--config", str(cfg), "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    study = next(s for s in repo.list(limit=10) if s.id not in {x.id for x in seeded})
    with repo.sessions() as s:
        reference = [v for (v,) in s.query(ReferenceHazard.log_hazard).filter(
            ReferenceHazard.study_id != study.id).all()]
    [outcome] = study.flags["outcomes"]
    expected = 100.0 * sum(v < outcome["log_hazard"] for v in reference) / len(reference)
    assert outcome["percentile"] == pytest.approx(expected) and outcome["reference_size"] == NEEDED
    assert outcome["status"] == ("flagged" if expected >= 50 else "not flagged")
    assert [f["label"] for f in study.flags["flags"]] == (["death"] if expected >= 50 else [])
    assert not any(n.startswith("percentile thresholds inactive") for n in study.flags["notes"])
    assert len(repo.messages(study_id=study.id)) == 1  # the batch holds its message (send_mode always)


def test_seeding_refuses_what_the_batch_refuses(tmp_path, db_url):
    cfg = _config(tmp_path, db_url)
    r = runner.invoke(app, ["reference", "seed", str(tmp_path / "nowhere"), "--config", str(cfg)])
    assert r.exit_code == 2 and "error:" in r.output and "nowhere" in r.output
