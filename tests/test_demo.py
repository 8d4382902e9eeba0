"""The README's first command: ``make demo`` runs ``psg-gateway demo --config deploy/demo.yaml``. Here the
same command on the same configuration, moved to a temporary folder and free ports: the site reference
is seeded from generated nights, both studies (the dropped EDF and the DICOM study sent over C-STORE)
get percentiles within it, end DELIVERED, and the stand-in EHR holds their two ORU^R01 messages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from peers import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def test_the_demo_delivers_both_studies_to_the_stand_in_ehr(tmp_path):
    cfg = yaml.safe_load((ROOT / "deploy" / "demo.yaml").read_text())
    cfg["paths"]["var_dir"] = str(tmp_path / "var")
    cfg["drop_folders"][0]["path"] = str(tmp_path / "var" / "drop")
    cfg["dicom"]["port"], cfg["http"]["port"], cfg["hl7"]["port"] = free_port(), free_port(), free_port()
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PSG")}, "COLUMNS": "400"}  # no wrapping
    result = subprocess.run([str(Path(sys.executable).with_name("psg-gateway")), "demo", "--config", str(path),
                             "--hours", "0.1", "--timeout", "300"],
                            check=False, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": DELIVERED") == 2, result.stdout[-3000:]
    # The reference is seeded first, so percentile flags act (demo.yaml: 20 studies needed, top 5 %):
    # every watched outcome of both studies has a percentile within those 20 generated nights.
    assert "site reference: 20 studies per watched outcome; percentile flags active" in result.stdout
    # (the study that finishes second is compared with the first one too: 21)
    lines = re.findall(r"^\s+(death|Heart Failure|Stroke): percentile \d+, reference of (20|21) \((flagged|borderline|not "
                       r"flagged)\)$", result.stdout, re.MULTILINE)
    assert len(lines) == 6, result.stdout[-3000:]
    inbox = tmp_path / "var" / "ehr-inbox"
    assert len(list(inbox.glob("*.hl7"))) == 2
    assert all(m.read_text().startswith("MSH|") for m in inbox.glob("*.hl7"))
