"""PHI at rest is private whatever the launcher's umask (issue 15, item 3).

Under umask 022 (``make run``, the Dockerfile) everything the gateway keeps must still be 0600 in 0700
folders, or 0640/0750 of ``service.group`` (tested with this process's own primary group): the SQLite
file and its WAL, the spool, processed/, quarantine/, outputs/, a batch export, what a CLI command
writes. No file or folder the gateway creates is named after the recording's original name or holds the
patient id; the claim manifest holds neither once the study is registered; the database's
``input_name`` keeps the original name (and the file-name pattern reads it there).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from peers import store_with_pynetdicom
from pipeline_env import pipeline_env
from typer.testing import CliRunner

from gateway import fsutil
from gateway.batch.export import check_export_dir
from gateway.cli.main import app
from gateway.config import DropFolderConfig
from gateway.fsutil import atomic_write, atomic_write_with, durable_mkdir, set_private_mode, tighten_tree
from gateway.sources.dropfolder import DropFolderWatcher, recover_claims
from gateway.store.db import make_engine, upgrade
from gateway.store.models import State
from gateway.synthetic.night import write_synthetic_night
from inference.bundle import load_bundle, make_demo_bundle
from inference.engine import Engine, EngineOptions

HOURS = 0.1
# The site's file-name pattern: a name and an MRN in the file name, as many vendor exports have it.
PATTERN = r"^(?P<patient_name>[A-Z]+_[A-Z]+)_MRN(?P<patient_id>\d+)\.edf$"
# PHI that the names below carry (and the header's patient ids of seeds 5 and 6): never in a name we create.
PHI = ("DOE_JANE", "7654321", "ROE_RICHARD", "1112223", "SIDE-4242", "POE_EDGAR", "9998887", "SYN-0005",
       "SYN-0006", "SYN-0004")
OWN_GID = os.getgid()


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run with ``mask`` as the process umask, restored after (and the fsutil modes with it)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(group: int | None) -> tuple[int, int]:
    return (0o640, 0o750) if group is not None else (0o600, 0o700)


def _entries(root: Path) -> list[Path]:
    return [root, *sorted(root.rglob("*"))]


def assert_private(root: Path, group: int | None, *, files_at_most: bool = False) -> int:
    """Every folder under ``root`` 0700 (0750 of ``group``), every file 0600 (0640 of ``group``); the number
    of entries checked. ``files_at_most``: a file may also be stricter (a received DICOM instance)."""
    file_mode, dir_mode = _modes(group)
    bad = []
    for path in _entries(root):
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode) & 0o777
        want = dir_mode if stat.S_ISDIR(st.st_mode) else file_mode
        ok = (mode & ~want == 0) if (files_at_most and not stat.S_ISDIR(st.st_mode)) else mode == want
        if not ok or (group is not None and st.st_gid != group):
            bad.append(f"{path.relative_to(root.parent)} {oct(mode)} gid {st.st_gid}")
    assert not bad, "not private:\n" + "\n".join(bad)
    return len(_entries(root))


def assert_no_phi_names(root: Path) -> None:
    named = [str(p.relative_to(root)) for p in _entries(root) for phi in PHI if phi in p.name]
    assert not named, f"names holding PHI: {named}"
    for manifest in root.rglob("claim.json"):
        text = manifest.read_text()
        assert "original_path" not in text, manifest
        assert not [phi for phi in PHI if phi in text], (manifest, text)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo")


@pytest.fixture(scope="module")
def model(bundle_dir):
    bundle = load_bundle(bundle_dir)
    return bundle, Engine(bundle, EngineOptions(device="cpu"))


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> dict[int, bytes]:
    folder = tmp_path_factory.mktemp("nights")
    return {seed: write_synthetic_night(folder / f"{seed}.edf", hours=HOURS, seed=seed).read_bytes()
            for seed in (5, 6)}


# ---- the helpers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [None, OWN_GID])
def test_fsutil_writes_private_files_whatever_the_umask(tmp_path, group):
    with umask(0o022):
        restore = set_private_mode(group) if group is not None else (lambda: None)
        try:
            os.umask(0o022)  # the helpers set modes explicitly: the umask must not matter
            durable_mkdir(tmp_path / "a" / "b")
            atomic_write(tmp_path / "a" / "b" / "x.json", b"{}")
            atomic_write_with(tmp_path / "a" / "y.csv", lambda tmp: Path(tmp).write_text("a,b\n"))
            atomic_write(tmp_path / "a" / "z.yaml", b"x: 1\n", mode=0o644)  # an explicit mode is kept
            assert (tmp_path / "a" / "z.yaml").stat().st_mode & 0o777 == 0o644
            (tmp_path / "a" / "z.yaml").unlink()
            assert_private(tmp_path / "a", group)
        finally:
            restore()
        assert os.umask(0o022) == 0o022  # restore() put the umask back
    assert fsutil.private_file_mode() == 0o600 and fsutil.shared_gid() is None


def test_an_unknown_group_is_refused_with_its_name():
    with pytest.raises(ValueError, match="no group named 'no-such-group-psg'"):
        set_private_mode("no-such-group-psg")
    assert fsutil.shared_gid() is None


def test_tighten_tree_fixes_an_older_versions_modes_skipping_links_and_excluded(tmp_path):
    var = tmp_path / "var"
    (var / "outputs" / "st-1").mkdir(parents=True)
    (var / "outputs" / "st-1" / "metrics.json").write_text("{}")
    (var / "drop").mkdir()
    (var / "drop" / "incoming.edf").write_text("x")
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    (var / "link").symlink_to(outside)
    for p in (var, var / "outputs", var / "outputs" / "st-1", var / "drop"):
        p.chmod(0o755)
    for p in (var / "outputs" / "st-1" / "metrics.json", var / "drop" / "incoming.edf", outside):
        p.chmod(0o644)
    changed, foreign = tighten_tree([var, var / "outputs"], exclude=[var / "drop"])
    assert (changed, foreign) == (4, 0)  # var, outputs, st-1, metrics.json
    assert (var / "drop").stat().st_mode & 0o777 == 0o755  # the site's drop folder: left alone
    assert outside.stat().st_mode & 0o777 == 0o644  # a link is not followed
    assert tighten_tree([var], exclude=[var / "drop"]) == (0, 0)


def test_sqlite_database_wal_and_lock_are_private_under_umask_022(tmp_path):
    with umask(0o022):
        engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'psg-gateway.db'}")
        try:
            upgrade(engine)
            with engine.connect() as conn:  # the WAL and shared-memory files exist while connected
                conn.exec_driver_sql("SELECT 1")
                names = {p.name for p in (tmp_path / "var").iterdir()}
                assert {"psg-gateway.db", "psg-gateway.db-wal", "psg-gateway.db-shm",
                        "psg-gateway.db.migrate-lock"} <= names
                assert_private(tmp_path / "var", None)
        finally:
            engine.dispose()


def test_a_new_export_folder_is_private(tmp_path):
    with umask(0o022):
        check_export_dir(tmp_path / "export" / "run1")
    assert_private(tmp_path / "export", None)


# ---- the drop folder -----------------------------------------------------------------------------------------
def test_a_registered_claim_forgets_the_original_path(tmp_path, nights):
    drop = DropFolderConfig(path=tmp_path / "drop", stable_seconds=0)
    drop.path.mkdir()
    registered: set[Path] = set()
    watcher = DropFolderWatcher([drop], tmp_path / "spool", known=lambda p: p in registered)
    (drop.path / "DOE_JANE_MRN7654321.edf").write_bytes(nights[5])
    [claim] = watcher.scan()
    manifest = claim.spool_path.parent / "claim.json"
    # until the database has it, the manifest keeps what recovery needs
    assert json.loads(manifest.read_text())["original_path"] == str(drop.path / "DOE_JANE_MRN7654321.edf")
    assert watcher.scan() == []
    assert "original_path" in json.loads(manifest.read_text())  # a failed registration keeps it
    registered.add(claim.spool_path)
    watcher.scan()
    doc = json.loads(manifest.read_text())
    assert "original_path" not in doc and doc["recording"] == claim.spool_path.name
    assert not [phi for phi in PHI if phi in manifest.read_text()]


def test_recovery_finishes_an_interrupted_copy_of_renamed_files(tmp_path, nights):
    """A claim cut short between the copy and the removal of the originals: recovery finds the originals
    (recording and the ``<stem>.json`` sidecar) from the manifest, though the claimed files have new names."""
    drop = DropFolderConfig(path=tmp_path / "drop", stable_seconds=0, filename_pattern=PATTERN)
    drop.path.mkdir()
    original = drop.path / "DOE_JANE_MRN7654321.edf"
    original.write_bytes(nights[5])
    (drop.path / "DOE_JANE_MRN7654321.json").write_text('{"sex": "F"}')
    [claim] = DropFolderWatcher([drop], tmp_path / "spool").scan()
    assert [s.name for s in claim.sidecars] == [f"{claim.claim_id}.json"]
    # as if the originals had been copied, not renamed, and the crash came before their removal
    original.write_bytes(nights[5])
    (drop.path / "DOE_JANE_MRN7654321.json").write_text('{"sex": "F"}')
    [recovered] = recover_claims(tmp_path / "spool", lambda p: False)
    assert recovered == claim  # the original path (input_name) and the pattern come back with it
    assert list(drop.path.iterdir()) == []


# ---- the pipeline in-process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [None, OWN_GID])
def test_pipeline_in_process_keeps_var_private_and_names_free_of_phi(tmp_path, model, nights, group):
    var = tmp_path / "var"
    drop = DropFolderConfig(path=tmp_path / "drop", stable_seconds=0, filename_pattern=PATTERN)
    drop.path.mkdir()
    with umask(0o022):
        restore = set_private_mode(group) if group is not None else (lambda: None)
        os.umask(0o022)  # the pipeline's own modes, not the process umask, must make it private
        db, repo, pipe, paths = pipeline_env(f"sqlite:///{var / 'psg-gateway.db'}", var, *model, reports=True)
        try:
            registered: set[Path] = set()
            watcher = DropFolderWatcher([drop], paths.spool, known=lambda p: p in registered)
            # a name and an MRN in the file name (read by the pattern), and a name, an MRN and a sidecar
            # whose patient id wins over the pattern's; a corrupt one is quarantined
            (drop.path / "DOE_JANE_MRN7654321.edf").write_bytes(nights[5])
            if group is None:
                (drop.path / "ROE_RICHARD_MRN1112223.edf").write_bytes(nights[6])
                (drop.path / "ROE_RICHARD_MRN1112223.edf.json").write_text('{"patient_id": "SIDE-4242"}')
            (drop.path / "POE_EDGAR_MRN9998887.edf").write_bytes(b"0       " + b"garbage" * 100)
            for c in watcher.scan():
                repo.register_file(source=c.source, path=str(c.spool_path), name=c.original_path.name,
                                   sha256=c.sha256, filename_pattern=c.filename_pattern, actor=c.source)
                registered.add(c.spool_path)
            watcher.scan()  # registered: the manifests forget the original path
            while pipe.run_once("w"):
                pass
            studies = {s.input_name: s for s in repo.list()}
        finally:
            db.dispose()
            restore()
    # the database keeps the names they arrived under, and the pattern read them there
    doe = studies["DOE_JANE_MRN7654321.edf"]
    assert doe.state == State.FLAGGED, doe.last_error
    assert (doe.patient_id, doe.patient_name) == ("7654321", "DOE_JANE")
    assert Path(doe.input_path) == paths.processed / doe.key / f"{doe.key}.edf"
    if group is None:
        roe = studies["ROE_RICHARD_MRN1112223.edf"]
        assert roe.state == State.FLAGGED and roe.patient_id == "SIDE-4242"  # the sidecar travelled with it
        assert (paths.processed / roe.key / f"{roe.key}.edf.json").is_file()
    poe = studies["POE_EDGAR_MRN9998887.edf"]
    assert poe.state == State.FAILED and Path(poe.input_path) == paths.quarantine / poe.key / f"{poe.key}.edf"
    assert sorted(p.name for p in (paths.quarantine / poe.key).iterdir()) == \
        sorted(["REASON.txt", "claim.json", f"{poe.key}.edf"])
    assert assert_private(var, group) > 20
    assert_no_phi_names(var)


def test_a_claim_from_an_older_version_is_renamed_when_processed(tmp_path, model, nights):
    """A claim folder an older version left in the spool (files under their original names, a version 1
    manifest with the original path) ends in processed/ under the study key, its manifest without it."""
    var = tmp_path / "var"
    db, repo, pipe, paths = pipeline_env(f"sqlite:///{var / 'psg-gateway.db'}", var, *model, reports=True)
    try:
        claim = paths.spool / "incoming" / "0190a1b2c3d47000800000000000abcd"
        claim.mkdir(parents=True)
        (claim / "DOE_JANE_MRN7654321.edf").write_bytes(nights[5])
        (claim / "DOE_JANE_MRN7654321.json").write_text('{"patient_id": "SIDE-4242"}')
        (claim / "claim.json").write_text(json.dumps({
            "version": 1, "claim_id": claim.name, "source": "folder:/in", "original_path": "/in/DOE_JANE_MRN7654321.edf",
            "recording": "DOE_JANE_MRN7654321.edf", "sidecars": ["DOE_JANE_MRN7654321.json"]}))
        study = repo.register_file(source="folder:/in", path=str(claim / "DOE_JANE_MRN7654321.edf"),
                                   name="DOE_JANE_MRN7654321.edf", sha256=hashlib.sha256(nights[5]).hexdigest(),
                                   filename_pattern=None, actor="folder:/in").study
        assert pipe.run_once("w")
        done = repo.get(study.id)
    finally:
        db.dispose()
    assert done.state == State.FLAGGED and done.patient_id == "SIDE-4242"
    folder = paths.processed / study.key
    assert sorted(p.name for p in folder.iterdir()) == sorted(["claim.json", f"{study.key}.edf", f"{study.key}.json"])
    manifest = json.loads((folder / "claim.json").read_text())
    assert manifest["recording"] == f"{study.key}.edf" and manifest["sidecars"] == [f"{study.key}.json"]
    assert_no_phi_names(var)
    assert_private(paths.processed, None)


# ---- the CLI ---------------------------------------------------------------------------------------------------
def test_a_cli_command_writes_private_files_and_leaves_the_callers_umask(tmp_path):
    runner = CliRunner()
    with umask(0o022):
        r = runner.invoke(app, ["example-night", str(tmp_path / "new" / "night.edf"), "--hours", "0.01"])
        assert r.exit_code == 0, r.output
        assert os.umask(0o022) == 0o022  # in-process: the command put the caller's umask back
    assert fsutil.private_file_mode() == 0o600 and fsutil.shared_gid() is None
    assert_private(tmp_path / "new", None)


@pytest.mark.parametrize("group", [None, OWN_GID])
def test_db_upgrade_run_under_umask_022_creates_a_private_database(tmp_path, group):
    """The real executable, launched as make run would (umask 022)."""
    cfg: dict = {"paths": {"var_dir": str(tmp_path / "var")}}
    if group is not None:
        cfg["service"] = {"group": group}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSG")}
    exe = Path(sys.executable).with_name("psg-gateway")
    r = subprocess.run([str(exe), "db", "upgrade", "--config", str(tmp_path / "c.yaml")], env=env, umask=0o022,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "var" / "psg-gateway.db").is_file()
    assert_private(tmp_path / "var", group)


# ---- the daemon in its own process ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("group", [None, OWN_GID])
def test_daemon_launched_with_umask_022_keeps_var_private(tmp_path, bundle_dir, nights, group):
    from daemon_proc import Daemon

    from gateway.synthetic.dicom_study import write_psg_study

    var = tmp_path / "d" / "var"
    overrides: dict = {"drop_folders": [{"path": str(tmp_path / "d" / "drop"), "stable_seconds": 0.3,
                                         "filename_pattern": PATTERN}]}
    if group is not None:
        overrides["service"] = {"group": group, "shutdown_timeout_seconds": 20, "node_name": "testnode"}
    d = Daemon(tmp_path / "d", f"sqlite:///{var / 'psg-gateway.db'}", bundle_dir, dicom__enabled=group is None,
               pipeline__write_report=True)  # the reports are PHI at rest too
    d.config.write_text(yaml.safe_dump({**d.cfg, **overrides}))
    d.umask = 0o022
    # what an older version left: 0644 outputs in 0755 folders
    old = var / "outputs" / "st-old"
    old.mkdir(parents=True)
    (old / "metrics.json").write_text("{}")
    for p in (var, var / "outputs", old):
        p.chmod(0o755)
    (old / "metrics.json").chmod(0o644)
    try:
        d.start()
        d.drop.mkdir(exist_ok=True)
        (d.drop / "ROE_RICHARD_MRN1112223.edf.json").write_text('{"patient_id": "SIDE-4242"}')
        (d.drop / "ROE_RICHARD_MRN1112223.edf").write_bytes(nights[6])
        want = 1
        if group is None:
            want = 2
            files = write_psg_study(tmp_path / "dcm", hours=HOURS, seed=4)
            assert store_with_pynetdicom(d.dicom_port, files) == [0] * len(files)

        def settled():
            done = [s for s in d.repo.list() if s.state == State.FLAGGED and s.input_path
                    and not s.input_path.startswith(str(var / "spool"))]
            return done if len(done) == want else None

        studies = d.wait_for(settled, timeout=180, what="studies FLAGGED and moved")
        assert d.stop() == 0
        events = [e for e in d.log_events() if e.get("event") == "daemon.permissions"]
    finally:
        d.close()
    [edf] = [s for s in studies if s.source_kind == "file"]
    assert edf.input_name == "ROE_RICHARD_MRN1112223.edf" and edf.patient_id == "SIDE-4242"
    assert edf.patient_name == "ROE_RICHARD"  # the pattern read the name it arrived under
    assert Path(edf.input_path) == var / "processed" / edf.key / f"{edf.key}.edf"
    assert events and events[0]["tightened"] == 4 and events[0]["not_owned"] == 0  # var, outputs, st-old, metrics
    assert not [k for k in events[0] if "path" in k]
    assert_private(var, group)
    assert_no_phi_names(var)
