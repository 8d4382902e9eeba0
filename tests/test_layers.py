"""The test layers (tests/README.md) on a few known tests: ``pytest --collect-only -m LAYER`` in a subprocess
selects exactly the chosen tests of that layer, so the layering cannot break silently. And the guard: a
test with two layer marks stops the collection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# node id -> the layer it must be in, each for a different reason
KNOWN = {
    # pure computation
    "tests/test_scoring.py::test_kappa_by_hand": "unit",
    "tests/test_hl7_mllp.py::test_frame": "unit",
    # the SQLite variant of a repository test is a unit test, the PostgreSQL one an integration test
    "tests/test_store.py::test_file_registration_and_content_dedupe[sqlite]": "unit",
    "tests/test_store.py::test_file_registration_and_content_dedupe[postgresql]": "integration",
    # the independent MLLP listener (a fixture), DCMTK against the DICOM receiver, a local Ray instance
    "tests/test_hl7_mllp.py::test_aa": "integration",
    "tests/test_dicom_scp.py::test_echoscu": "integration",
    "tests/test_batch_ray.py::test_ray_batch_processes_the_archive_like_the_local_backend[sqlite]": "integration",
    # the in-process pipeline on a night: database, spool and the model together (even on SQLite)
    "tests/test_pipeline.py::test_file_study_goes_to_inferred_with_outputs_and_input_in_processed[sqlite]":
        "integration",
    # the daemon in its own process, psg-gateway run, infer on a night, a batch over an archive
    "tests/test_chaos.py::test_kill9_at_every_crash_point_loses_nothing_and_sends_nothing_unaccounted[sqlite]":
        "e2e",
    "tests/test_daemon_e2e.py::test_config_error_exits_with_key_path": "e2e",
    "tests/test_cli_infer.py::test_infer_writes_every_output_with_documented_shapes": "e2e",
    "tests/test_batch.py::test_missing_archive_path_stops_before_any_work[sqlite]": "e2e",
    # found in mixed modules: the daemon's process (tests/daemon_proc.py), psg-gateway batch in process
    "tests/test_montage_health.py::test_daemon_reports_a_broken_table_as_degraded_until_fixed[sqlite]": "e2e",
    "tests/test_batch_export.py::test_batch_refuses_to_drop_identifier_columns_then_drops_them_when_asked[sqlite]":
        "e2e",
}


def _pytest(*args: str, cwd: Path = ROOT) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    proc = _pytest(*args, cwd=cwd)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_known_tests_are_in_their_layer():
    layers = ("unit", "integration", "e2e")
    procs = {layer: _pytest("-m", layer, *KNOWN) for layer in layers}  # at once: three collections
    for layer, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        selected = {line for line in out.splitlines() if "::" in line}
        wanted = {node for node, lay in KNOWN.items() if lay == layer}
        if selected != wanted:  # say what each of them is, and why
            shown = _collect("--layers", *KNOWN).stdout.splitlines()
            pytest.fail(f"-m {layer} selected {sorted(selected)}, not {sorted(wanted)}:\n"
                        + "\n".join(line for line in shown if line.split(" ", 1)[0] in layers))


def test_two_layer_marks_stop_the_collection(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_both.py").write_text("import pytest\n\npytestmark = pytest.mark.e2e\n\n\n"
                                           "@pytest.mark.unit\ndef test_twice():\n    pass\n\n\n"
                                           "def test_once():\n    pass\n")
    r = _collect("-W", "ignore::pytest.PytestUnknownMarkWarning", "test_both.py", cwd=tmp_path)
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout + r.stderr
    assert "exactly one layer mark" in r.stderr and "test_both.py::test_twice: e2e and unit" in r.stderr
    assert "test_once" not in r.stderr
