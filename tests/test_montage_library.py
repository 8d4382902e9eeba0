"""The montage library under ``psg-gateway montage``: editing a table file in place, its lock, its audit log,
and the recordings a table is tried on."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pytest

from gateway.fsutil import atomic_write
from gateway.montage.audit import append_audit_entry, audit_log_path, os_user
from gateway.montage.editing import (
    MontageEditError,
    RuleExistsError,
    add_rule,
    editable_table,
    remove_rules,
    table_lock,
)
from gateway.montage.recordings import read_studies
from gateway.montage.table import MontageError, MontageTable
from gateway.synthetic.dicom_study import write_psg_study
from gateway.synthetic.night import write_synthetic_night

SITE = ("# Sleep lab north: our own labels.\n"
        "name: north   # the lab\n"
        "format: 2\n"
        "extends: default\n"
        "\n"
        "rules:\n"
        "  # legs\n"
        "  - {normalised: \"Tib L\", modality: EMG}  # tibialis\n"
        "\n"
        "# end of the site's rules\n")


@pytest.fixture()
def site(tmp_path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(SITE)
    return path


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in audit_log_path(path).read_text().splitlines()]


# ---- editing ------------------------------------------------------------------------------------------------


def test_add_then_remove_keeps_comments_and_layout(site):
    before = MontageTable.load(site).version
    added = add_rule(site, "exact", "X 1", "emg", scope="dicom:NK_PSG", note="chin")
    assert added.written and not added.created and added.version_before == before
    text = site.read_text()
    assert text.startswith(SITE.split("\n# end")[0])  # every comment and blank line before the new rule kept
    assert '  - {exact: "X 1", modality: EMG, scope: "dicom:NK_PSG", note: "chin"}\n' in text
    assert text.endswith("# end of the site's rules\n")
    (rule,) = added.rules
    assert rule.pattern == "X 1" and added.table.version == MontageTable.load(site).version != before

    removed = remove_rules(site, "X 1")
    assert [r.pattern for r in removed.rules] == ["X 1"] and removed.version_before == added.table.version
    assert site.read_text() == SITE and removed.table.version == before


def test_add_creates_a_table_that_extends_the_default(tmp_path):
    path = tmp_path / "new.yaml"
    edit = add_rule(path, "normalised", "Tib R", "EMG")
    assert edit.created and edit.version_before is None
    assert MontageTable.load(path).chain == ["new", "default"]
    assert path.read_text().startswith("# Site montage table, created by 'psg-gateway montage add'")


def test_add_of_a_rule_in_effect_writes_nothing(site):
    original = site.read_bytes()
    edit = add_rule(site, "normalised", "tib-l", "EMG")
    assert not edit.written and edit.rules == () and edit.message.startswith("nothing to do")
    assert site.read_bytes() == original and not audit_log_path(site).exists()


def test_add_refusals_leave_the_file_alone(site):
    original = site.read_bytes()
    with pytest.raises(RuleExistsError, match="remove it first"):
        add_rule(site, "normalised", "Tib L", "RESP")
    with pytest.raises(MontageError) as conflict:  # ties the built-in normalised C3 -> BAS
        add_rule(site, "normalised", "C3", "EMG")
    assert conflict.value.problems and not isinstance(conflict.value, RuleExistsError)
    with pytest.raises(MontageEditError, match="unknown modality"):
        add_rule(site, "exact", "X", "EEG")
    assert site.read_bytes() == original and not audit_log_path(site).exists()
    assert sorted(p.name for p in site.parent.iterdir()) == ["site.yaml"]


def test_remove_errors(site):
    with pytest.raises(MontageEditError, match="comes from the table it extends"):
        remove_rules(site, "C3-M2")
    with pytest.raises(MontageEditError, match="no rule for 'Nope' of kind exact with scope none"):
        remove_rules(site, "Nope", kind="exact", scope=None)
    add_rule(site, "normalised", "X1", "EMG", scope="dicom:A")
    add_rule(site, "normalised", "X1", "EMG", scope="dicom:B")
    with pytest.raises(MontageEditError, match="2 rules match"):
        remove_rules(site, "X1")
    assert len(remove_rules(site, "x-1", all_matching=True).rules) == 2


def test_editable_table_refuses_folders_and_the_built_in_copy(tmp_path):
    from importlib import resources

    with pytest.raises(MontageEditError, match="is a folder"):
        editable_table(tmp_path)
    builtin = Path(str(resources.files("gateway").joinpath("data/default_montage.yaml")))
    with pytest.raises(MontageEditError, match="read-only"):
        editable_table(builtin)
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "real.yaml")
    assert editable_table(link) == (tmp_path / "real.yaml").resolve()  # the link is kept, its target written


def test_an_edit_keeps_the_tables_permissions(site):
    site.chmod(0o640)
    add_rule(site, "exact", "X2", "BAS")
    assert site.stat().st_mode & 0o777 == 0o640


def test_atomic_write_keep_mode(tmp_path):
    path = tmp_path / "t.yaml"
    atomic_write(path, b"a", mode=0o644, keep_mode=True)  # new file: the mode given
    assert path.stat().st_mode & 0o777 == 0o644 and path.read_bytes() == b"a"
    path.chmod(0o604)
    atomic_write(path, b"b", mode=0o644, keep_mode=True)  # existing file: its own mode
    assert path.stat().st_mode & 0o777 == 0o604 and path.read_bytes() == b"b"
    atomic_write(path, b"c", mode=0o644)
    assert path.stat().st_mode & 0o777 == 0o644


# ---- the lock -----------------------------------------------------------------------------------------------


def test_table_lock_excludes_a_second_writer(tmp_path):
    entered = threading.Event()

    def second() -> None:
        with table_lock(tmp_path):
            entered.set()

    with table_lock(tmp_path):
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        assert not entered.wait(0.3)  # waits while the first holds the lock
    assert entered.wait(10)
    thread.join(10)


def test_table_lock_is_best_effort_without_a_folder(tmp_path):
    with table_lock(tmp_path / "missing"):
        pass


# ---- the audit log ------------------------------------------------------------------------------------------


def test_audit_entries(site, monkeypatch):
    assert audit_log_path(site) == site.with_name("site.yaml.audit.log")
    monkeypatch.setenv("SUDO_USER", "alice-admin")
    append_audit_entry(site, "add", [{"pattern": "X"}], None, "v2")
    append_audit_entry(site, "remove", [{"pattern": "X"}], "v2", "v3")
    first, second = _log(site)
    assert set(first) == {"time", "user", "action", "table", "rules", "version_before", "version_after"}
    assert first["time"].endswith("Z") and first["table"] == "site.yaml" and first["rules"] == [{"pattern": "X"}]
    assert (first["action"], first["version_before"], first["version_after"]) == ("add", None, "v2")
    assert (second["action"], second["version_before"], second["version_after"]) == ("remove", "v2", "v3")
    assert first["user"] == os_user() and "(sudo by alice-admin)" in first["user"]


def test_every_edit_is_audited(site):
    add_rule(site, "exact", "X3", "BAS")
    remove_rules(site, "X3")
    assert [(e["action"], e["rules"][0]["pattern"]) for e in _log(site)] == [("add", "X3"), ("remove", "X3")]


# ---- the recordings a table is tried on ---------------------------------------------------------------------


def test_read_studies(tmp_path):
    write_synthetic_night(tmp_path / "a" / "night.edf", hours=0.01, seed=1)
    write_psg_study(tmp_path / "a" / "dicom", hours=0.01, seed=3)
    (tmp_path / "a" / "bad.dcm").write_bytes(b"not dicom")
    (tmp_path / "notes.txt").write_text("x\n")
    studies = list(read_studies([tmp_path / "a", tmp_path / "notes.txt"]))
    assert [s.name for s in studies] == [str(tmp_path / "a" / "bad.dcm"), str(tmp_path / "a" / "night.edf"),
                                         str(tmp_path / "a" / "dicom"), str(tmp_path / "notes.txt")]
    bad, night, dicom, notes = studies
    assert bad.recording is None and bad.error.startswith(f"{tmp_path / 'a' / 'bad.dcm'}: not a readable DICOM")
    assert night.error is None and night.recording.channels
    assert dicom.error is None and {ch.label for ch in dicom.recording.channels} >= {"C3-M2", "ECG II"}
    assert notes.recording is None and "notes.txt" in notes.error and "not an EDF" in notes.error
