"""``bench/release_differences.py``, the measure of each documented difference from the SleepFM release
(``make bench-differences``), must run and report what the researcher guide's table says: it broke once
unnoticed when the pipeline's signals became float16."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_the_differences_script_runs_and_the_fixture_still_matches_the_release(reference_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "release_differences.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    left = report["fixture_vs_release_outputs"]  # the tolerances of tests/test_release_fidelity.py
    assert left["tokens"] <= 3e-4 and left["windows_5min"] <= 2e-5
    assert left["stage_probs"] <= 2e-6 and left["log_hazard"] <= 2e-6
    # every difference the guide lists is measured, and each one changes something
    for name in ("slash_labels_kept_Leg/L", "missing_modality_masked_EKG"):
        assert max(report[name].values()) > 1e-4, name
    assert report["one_channel_modality_independent_of_batch"]["channel_pooled_tokens"] > 1e-3
    assert report["tail_staged_on_its_own"]["whole_windows_vs_night_cut_there"]["log_hazard"] == 0.0
