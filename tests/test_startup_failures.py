"""``psg-gateway run`` that cannot start: one line on stderr naming the cause, exit 1, never a traceback.

Each case runs the real command in its own process (as systemd would) with one thing wrong: the montage
table, the model bundle, the site heads, the database URL, a port, a folder, the var folder's lock. A
configuration file that does not validate keeps its own form: every problem with its key path, exit 2.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference.bundle import make_demo_bundle

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
EXE = Path(sys.executable).with_name("psg-gateway")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo")


def _config(tmp_path: Path, bundle: Path) -> dict[str, Any]:
    """A configuration that starts (SQLite under var/, no listeners); each case breaks one thing."""
    return {"paths": {"var_dir": str(tmp_path / "var")},
            "model": {"bundle": str(bundle), "device": "cpu"},
            "dicom": {"enabled": False}, "http": {"enabled": False},
            "logging": {"format": "json", "level": "info"}}


def _run(tmp_path: Path, cfg: dict[str, Any] | str, *args: str, command: str = "run",
         env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSG")}
    env.update(env_extra or {})
    cmd = [str(EXE), command, "--config", str(path)] if command == "run" else [str(EXE), *command.split(), str(path)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=180, env=env, check=False)


def _error_lines(stderr: str) -> list[str]:
    """stderr without the JSON log events: what the admin reads."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


# ---- the cases: (set-up, what the error line must say) ---------------------------------------------------------
# A set-up gets (tmp_path, bundle, cfg), changes cfg (and the disk) and returns the text the one error line
# must hold; it may return (text, forbidden) where forbidden must appear nowhere on stderr (a password).

def montage_missing(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    cfg["montage"] = {"table": str(tmp_path / "site.yaml")}
    return f"montage.table: montage table {tmp_path / 'site.yaml'}: file not found"


def montage_unreadable(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    # A folder where the file should be (root reads a mode-000 file, a folder it cannot read as a table).
    (tmp_path / "site.yaml").mkdir()
    cfg["montage"] = {"table": str(tmp_path / "site.yaml")}
    return "site.yaml: is a folder, not a table file"



def montage_yaml_syntax(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    (tmp_path / "site.yaml").write_text("name: site\nformat: 2\nrules: [ {exact: C3\n")
    cfg["montage"] = {"table": str(tmp_path / "site.yaml")}
    return "site.yaml, line 4: not valid YAML"


def montage_schema(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    (tmp_path / "site.yaml").write_text("name: site\nformat: 2\nrules:\n  - exact: C3-M2\n    modality: EEG\n")
    cfg["montage"] = {"table": str(tmp_path / "site.yaml")}
    return "site.yaml, line 5: unknown modality 'EEG'"




def bundle_missing(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    cfg["model"]["bundle"] = str(tmp_path / "no-bundle")
    return f"model bundle: {tmp_path / 'no-bundle'}: model bundle folder not found"



def bundle_corrupt_checkpoint(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    copy = _copy_bundle(bundle, tmp_path)
    (copy / "model_base" / "best.pt").write_bytes(b"not a checkpoint\n")
    cfg["model"]["bundle"] = str(copy)
    return "best.pt: not a readable PyTorch checkpoint"



def heads_missing(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    cfg["model"]["site_heads"] = [str(tmp_path / "heads" / "cox")]
    return "site heads: " + str(tmp_path / "heads" / "cox") + ": not a head folder"


def heads_broken(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    # head.json matches its checksum but is not a head: the loader's KeyError/JSON error used to escape.
    import hashlib

    head = tmp_path / "heads" / "cox"
    head.mkdir(parents=True)
    body = b'{"format": 1, "kind": "cox"}'
    (head / "head.json").write_bytes(body)
    (head / "head.sha256").write_text(hashlib.sha256(body).hexdigest() + "\n")
    cfg["model"]["site_heads"] = [str(head)]
    return f"site heads: {head}: not a usable head (KeyError: 'name')"



def database_unknown_driver(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    cfg["database"] = {"url": f"sqlite+nodriver:///{tmp_path / 'x.db'}"}
    return "database.url cannot be used: NoSuchModuleError"


def database_malformed_url(tmp_path: Path, bundle: Path, cfg: dict) -> tuple[str, str]:
    cfg["database"] = {"url": "postgresql://psg:s3cret-pw@127.0.0.1:notaport/x"}
    return "database.url cannot be used: ValueError", "s3cret-pw"


def database_unreachable(tmp_path: Path, bundle: Path, cfg: dict) -> tuple[str, str]:
    cfg["database"] = {"url": "postgresql://psg:s3cret-pw@127.0.0.1:1/x"}
    return "database postgresql+psycopg://psg:***@127.0.0.1:1/x unavailable: OperationalError", "s3cret-pw"


def database_folder_not_creatable(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    (tmp_path / "afile").write_text("in the way\n")
    cfg["database"] = {"url": f"sqlite:///{tmp_path / 'afile' / 'gateway.db'}"}
    return f"database: cannot create {tmp_path / 'afile'}"


def dicom_port_taken(tmp_path: Path, bundle: Path, cfg: dict, taken: int) -> str:
    cfg["dicom"] = {"enabled": True, "port": taken}
    return f"cannot listen for DICOM on 127.0.0.1:{taken}: Address already in use"


def http_port_taken(tmp_path: Path, bundle: Path, cfg: dict, taken: int) -> str:
    cfg["http"] = {"enabled": True, "port": taken}
    return f"cannot listen for HTTP on 127.0.0.1:{taken}: Address already in use"


def folder_not_creatable(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    (tmp_path / "afile").write_text("in the way\n")
    cfg["paths"]["var_dir"] = str(tmp_path / "afile" / "var")
    return f"cannot create {tmp_path / 'afile' / 'var'}: Not a directory"



def lock_file_not_openable(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    (tmp_path / "var" / "psg-gateway.lock").mkdir(parents=True)
    return f"cannot open {tmp_path / 'var' / 'psg-gateway.lock'}: Is a directory"


def absolute_threshold_on_an_uncalibrated_outcome(tmp_path: Path, bundle: Path, cfg: dict) -> str:
    # The demo bundle declares no calibrated outcome: a log-hazard threshold means nothing for it.
    cfg["flags"] = {"outcomes": [{"label": "Heart Failure", "log_hazard": 2.0, "percentile": None}]}
    return ("flags.outcomes 'Heart Failure': log_hazard needs an outcome the model bundle declares calibrated "
            "(bundle.json calibrated_outcomes); this bundle does not")


CASES: list[Callable[..., Any]] = [  # a schema error: test_run_and_config_check_say_the_same_...
    montage_missing, montage_unreadable, montage_yaml_syntax, bundle_missing, bundle_corrupt_checkpoint,
    heads_missing, heads_broken, absolute_threshold_on_an_uncalibrated_outcome, database_unknown_driver, database_malformed_url, database_unreachable,
    database_folder_not_creatable, dicom_port_taken, http_port_taken, folder_not_creatable, lock_file_not_openable,
]


def _assert_one_line_failure(r: subprocess.CompletedProcess[str], expected: str, forbidden: str | None = None) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = _error_lines(r.stderr)
    assert len(lines) == 1, lines  # one line, however long the reason (never wrapped at 80 columns)
    assert lines[0].startswith("error: ") and expected in lines[0], (expected, lines[0])
    if forbidden is not None:
        assert forbidden not in r.stderr and forbidden not in r.stdout
    # The log says the same (journald keeps it), and the daemon never got as far as READY.
    failed = [e for e in _events(r.stderr) if e.get("event") == "daemon.start_failed"]
    assert failed and expected.replace("error: ", "") in " ".join(failed[-1]["reason"].split())
    assert not [e for e in _events(r.stderr) if e.get("event") == "daemon.ready"]
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_start_failure_is_one_line_and_exit_1(case, tmp_path, bundle):
    cfg = _config(tmp_path, bundle)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        wants_port = "port_taken" in case.__name__
        expected = case(tmp_path, bundle, cfg, taken.getsockname()[1]) if wants_port else case(tmp_path, bundle, cfg)
        text, forbidden = expected if isinstance(expected, tuple) else (expected, None)
        r = _run(tmp_path, cfg)
    finally:
        taken.close()
    _assert_one_line_failure(r, text, forbidden)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file")
def test_unreadable_montage_file(tmp_path, bundle):
    table = tmp_path / "site.yaml"
    table.write_text("name: site\nformat: 2\nrules: []\n")
    table.chmod(0)
    cfg = _config(tmp_path, bundle)
    cfg["montage"] = {"table": str(table)}
    _assert_one_line_failure(_run(tmp_path, cfg), "site.yaml: cannot read: Permission denied")


def test_cuda_requested_without_a_gpu(tmp_path, bundle):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = _config(tmp_path, bundle)
    cfg["model"]["device"] = "cuda"
    _assert_one_line_failure(_run(tmp_path, cfg), "model.device cuda: device 'cuda' requested but CUDA is not available")


def test_another_daemon_holds_the_var_folder(tmp_path, bundle):
    cfg = _config(tmp_path, bundle)
    (tmp_path / "var").mkdir()
    with open(tmp_path / "var" / "psg-gateway.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = _run(tmp_path, cfg)
    assert "Traceback" not in r.stderr and r.returncode == 1
    assert _error_lines(r.stderr) == [f"error: another psg-gateway daemon is using {tmp_path / 'var'}"]


def test_run_and_config_check_say_the_same_about_a_broken_montage_table(tmp_path, bundle):
    cfg = _config(tmp_path, bundle)
    montage_schema(tmp_path, bundle, cfg)
    run = _run(tmp_path, cfg)
    line = _assert_one_line_failure(run, "unknown modality 'EEG'")
    check = _run(tmp_path, cfg, command="config check")
    assert check.returncode == 1 and "Traceback" not in check.stderr
    problems = [p.strip() for p in _error_lines(check.stderr)[1:]]
    # The same words, key path first: what `config check` predicts is what `run` refuses to start with.
    assert problems == [line.removeprefix("error: ")]
    assert problems[0].startswith(f"montage.table: montage table {tmp_path / 'site.yaml'}, line 5: ")


@pytest.mark.parametrize("text, key", [
    ("paths: {var_dir: var}\nhttp: {port: [}\n", "(file): not valid YAML"),
    ("paths: {var_dir: var}\nmontage: {table: site.yaml, reload_check_seconds: -1}\n", "montage.reload_check_seconds"),
    ("paths: {var_dir: var}\ndatabase: {url: 'mysql://x'}\n", "database.url"),
], ids=["yaml", "value", "database-url-scheme"])
def test_configuration_errors_keep_exit_2_with_key_paths(tmp_path, text, key):
    r = _run(tmp_path, text)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = _error_lines(r.stderr)
    assert lines[0] == f"configuration error in {tmp_path / 'gateway.yaml'}:"
    assert any(line.strip().startswith(key) for line in lines[1:]), lines


def test_missing_configuration_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSG")}
    r = subprocess.run([str(EXE), "run", "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                       timeout=120, env=env, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert _error_lines(r.stderr) == [f"configuration error in {tmp_path / 'nope.yaml'}:",
                                      "  (file): cannot read: No such file or directory"]
