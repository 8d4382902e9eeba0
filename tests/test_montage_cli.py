"""``psg-gateway montage ...``: list, show, test, map, unmapped, add, remove, validate, diff; JSON and exit codes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import montage_cmd
from gateway.cli.main import app
from gateway.montage.table import MontageTable, default_table
from gateway.synthetic.night import SyntheticChannel, write_synthetic_night

runner = CliRunner()

ODD_CHANNELS = (
    SyntheticChannel("C3-M2", 128, "eeg"),
    SyntheticChannel("Mystery 7", 64, "eeg"),
    SyntheticChannel("Chin1-Chin4", 256, "emg_chin"),
    SyntheticChannel("Position", 1, "spo2", unit="%", physical_min=0.0, physical_max=100.0),
    SyntheticChannel("ECG II", 256, "ecg", unit="mV", physical_min=-5.0, physical_max=5.0),
)


def _run(*args):
    return runner.invoke(app, ["montage", *map(str, args)])


def _json(result) -> dict:
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """A folder of studies: two EDF nights (one with unknown labels), a DICOM study in a sub-folder, a broken
    EDF file and a text file."""
    from gateway.synthetic.dicom_study import write_psg_study

    root = tmp_path_factory.mktemp("studies")
    write_synthetic_night(root / "good.edf", hours=0.02, seed=1)
    write_synthetic_night(root / "odd.edf", hours=0.02, seed=2, channels=ODD_CHANNELS)
    write_psg_study(root / "dicom" / "study1", hours=0.01, seed=3)
    (root / "broken.edf").write_bytes(b"0       " + b"x" * 300)
    (root / "README.txt").write_text("not a recording\n")
    return root


@pytest.fixture()
def site(tmp_path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text("# our lab\nname: north\nformat: 2\nextends: default\nrules:\n"
                    "  - {normalised: \"Tib L\", modality: EMG}  # tibialis\n")
    return path


# ---- list / show --------------------------------------------------------------------------------------------


def test_list_json_and_filters(site):
    result = _run("list", "--json")
    assert result.exit_code == 0, result.output
    doc = _json(result)
    assert doc["table"]["name"] == "default" and len(doc["rules"]) == len(default_table().rules)
    excluded = _json(_run("list", "--modality", "exclude", "--json"))["rules"]
    assert excluded and {r["modality"] for r in excluded} == {"exclude"}
    assert "Temp rectal" in [r["pattern"] for r in excluded]
    own = _json(_run("list", "--table", site, "--kind", "normalised", "--modality", "emg", "--json"))["rules"]
    assert own[-1]["pattern"] == "Tib L" and own[-1]["table"] == "north"
    assert _run("list", "--modality", "EEG").exit_code == 2
    human = _run("list", "--table", site, "--scope", "none", "--modality", "EMG")
    assert human.exit_code == 0 and "Tib L" in human.stdout


def test_list_by_scope():
    path = Path(__file__).resolve().parents[1] / "mappings" / "examples" / "sleeplab-north.yaml"
    rules = _json(_run("list", "--table", path, "--scope", "dicom:NK_PSG", "--json"))["rules"]
    assert [r["pattern"] for r in rules] == ["DC\\d{1,2}", "X1", "X2"]


def test_show_mapped_label():
    result = _run("show", "EEG C3:M2", "--json")
    assert result.exit_code == 0
    doc = _json(result)
    assert doc["status"] == "mapped" and doc["modality"] == "BAS"
    assert doc["rule"]["kind"] == "normalised" and doc["rule"]["pattern"] == "C3:M2"
    assert "vendor prefix" in doc["how"]
    human = _run("show", "Temp rectal")
    assert human.exit_code == 0 and "excluded" in human.stdout and "Temp rectal" in human.stdout


def test_show_unmapped_label_suggests_close_ones():
    result = _run("show", "Chin1-Chin4", "--json")
    assert result.exit_code == 1
    doc = _json(result)
    assert doc["status"] == "unmapped" and doc["rule"] is None
    assert doc["suggestions"] and doc["suggestions"][0]["modality"] == "EMG"
    assert "Chin1-Chin" in doc["suggestions"][0]["label"]
    human = _run("show", "Chin1-Chin4")
    assert human.exit_code == 1 and "UNMAPPED" in human.stdout and "Chin1-Chin" in human.stdout


def test_show_with_source_and_scoped_rules(tmp_path):
    table = tmp_path / "t.yaml"
    table.write_text("extends: default\nrules:\n"
                     "  - {normalised: C3, modality: EMG, priority: 250, scope: \"dicom:NK_PSG\", note: wiring}\n")
    scoped = _json(_run("show", "C3", "--table", table, "--source", "dicom:NK_PSG", "--json"))
    assert scoped["modality"] == "EMG" and scoped["rule"]["note"] == "wiring"
    assert [c["outcome"] for c in scoped["candidates"]] == ["decides", "lower priority (200 < 250)"]
    plain = _json(_run("show", "C3", "--table", table, "--json"))
    assert plain["modality"] == "BAS" and plain["other_sources"][0]["scope"] == "dicom:NK_PSG"
    human = _run("show", "C3", "--table", table)
    assert "only for dicom:NK_PSG" in human.stdout
    assert _run("show", "C3", "--source", "NK_PSG").exit_code == 2


def test_show_conflict_at_run_time(tmp_path):
    table = tmp_path / "t.yaml"
    table.write_text("rules:\n  - {regex: 'A.*', modality: EMG}\n  - {regex: '.*Z', modality: BAS}\n")
    result = _run("show", "AZ", "--table", table, "--json")
    assert result.exit_code == 1
    assert _json(result)["status"] == "conflict" and len(_json(result)["conflict"]) == 2
    assert "CONFLICT" in _run("show", "AZ", "--table", table).stdout


# ---- test / map / unmapped ----------------------------------------------------------------------------------


def test_test_one_good_file(studies):
    result = _run("test", studies / "good.edf", "--json")
    assert result.exit_code == 0, result.output
    doc = _json(result)
    assert doc["ok"] and doc["errors"] == []
    (study,) = doc["studies"]
    assert study["modalities"] == {"BAS": 8, "RESP": 6, "EKG": 1, "EMG": 3} and study["missing"] == []
    first = study["channels"][0]
    assert first["label"] == "F3-M2" and first["rate_hz"] == 256.0 and first["modality"] == "BAS"
    assert first["rule"].startswith("normalised") and first["where"].startswith("default:")


def test_test_reports_unmapped_with_suggestions(studies):
    result = _run("test", studies / "odd.edf", "--json")
    assert result.exit_code == 1
    (study,) = _json(result)["studies"]
    assert study["unmapped"] == ["Mystery 7", "Chin1-Chin4"]
    assert study["excluded"] == ["Position"]
    assert study["modalities"] == {"BAS": 1, "EKG": 1} and study["missing"] == ["RESP", "EMG"]
    by_label = {c["label"]: c for c in study["channels"]}
    assert by_label["Mystery 7"]["status"] == "unmapped" and by_label["Mystery 7"]["rate_hz"] == 64.0
    assert by_label["Chin1-Chin4"]["suggestions"][0]["modality"] == "EMG"
    human = _run("test", studies / "odd.edf")
    assert human.exit_code == 1
    assert "UNMAPPED" in human.stdout and "closest" in human.stdout and "missing RESP, EMG" in human.stdout


def test_test_a_folder_reads_edf_and_dicom_and_goes_on_after_errors(studies):
    result = _run("test", studies, "--json")
    assert result.exit_code == 1
    doc = _json(result)
    names = sorted(Path(s["input"]).name for s in doc["studies"])
    assert names == ["good.edf", "odd.edf", "study1"]
    dicom = next(s for s in doc["studies"] if s["input"].endswith("study1"))
    assert dicom["modalities"] == {"BAS": 8, "RESP": 4, "EKG": 1, "EMG": 3} and dicom["unmapped"] == []
    assert [Path(e["input"]).name for e in doc["errors"]] == ["broken.edf"]
    assert "broken.edf" in doc["errors"][0]["error"]
    human = _run("test", studies)
    assert "3 studies, 1 with unmapped labels, 1 unreadable" in human.stdout
    assert "broken.edf" in human.stderr


def test_test_the_real_sleep_edf_excerpt(reference_dir):
    result = _run("test", reference_dir / "real" / "short_psg.edf", "--json")
    assert result.exit_code == 0, result.output
    (study,) = _json(result)["studies"]
    assert study["modalities"] == {"BAS": 3, "RESP": 1, "EMG": 1}
    assert study["excluded"] == ["Temp rectal", "Event marker"]
    assert [c["rate_hz"] for c in study["channels"]][:4] == [100.0, 100.0, 100.0, 1.0]


def test_test_with_a_source(studies, tmp_path):
    table = tmp_path / "t.yaml"
    table.write_text("extends: default\nrules:\n  - {exact: \"Mystery 7\", modality: BAS, scope: \"dicom:X\"}\n"
                     "  - {normalised: \"Chin1-Chin4\", modality: EMG}\n")
    plain = _json(_run("test", studies / "odd.edf", "--table", table, "--json"))
    assert plain["studies"][0]["unmapped"] == ["Mystery 7"]
    scoped = _run("test", studies / "odd.edf", "--table", table, "--source", "dicom:X", "--json")
    assert scoped.exit_code == 0 and _json(scoped)["studies"][0]["modalities"]["BAS"] == 2


def test_map_labels_and_file(studies):
    ok = _run("map", studies / "good.edf")
    assert ok.exit_code == 0 and "E2-M1" in ok.stdout
    unknown = _run("map", "C3-M2", "Mystery 7")
    assert unknown.exit_code == 1 and "unmapped" in unknown.output
    doc = _json(_run("map", "C3-M2", "Mystery 7", "--json"))
    assert [row["status"] for row in doc["labels"]] == ["mapped", "unmapped"]


def test_unmapped_counts_across_a_folder(studies, tmp_path):
    folder = tmp_path / "more"
    folder.mkdir()
    for name in ("odd.edf", "good.edf"):
        shutil.copy(studies / name, folder / name)
    shutil.copy(studies / "odd.edf", folder / "odd2.edf")
    write_synthetic_night(folder / "third.edf", hours=0.01, seed=4,
                          channels=(SyntheticChannel("Mystery 7", 32, "eeg"), SyntheticChannel("Zed", 32, "eeg"),
                                    SyntheticChannel("Mystery 7", 32, "eeg")))
    result = _run("unmapped", folder, "--json")
    assert result.exit_code == 1
    doc = _json(result)
    assert doc["studies"] == 4 and doc["errors"] == []
    rows = [(r["label"], r["channels"], r["studies"]) for r in doc["unmapped"]]
    assert rows == [("Mystery 7", 4, 3), ("Chin1-Chin4", 2, 2), ("Zed", 1, 1)]
    human = _run("unmapped", folder)
    assert human.stdout.index("Mystery 7") < human.stdout.index("Chin1-Chin4") < human.stdout.index("Zed")
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(studies / "good.edf", clean / "good.edf")
    assert _run("unmapped", clean).exit_code == 0


def test_missing_paths_and_bad_tables_are_usage_errors(tmp_path, studies):
    missing = _run("test", tmp_path / "nope.edf")
    assert missing.exit_code == 2 and "nope.edf" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {normalised: C3\n")
    result = _run("test", studies / "good.edf", "--table", bad)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "bad.yaml" in result.stderr and "line" in result.stderr
    assert _run("list", "--table", tmp_path / "none.yaml").exit_code == 2
    assert _run("unmapped", tmp_path / "nope").exit_code == 2


# ---- validate -----------------------------------------------------------------------------------------------


def test_validate_the_built_in_and_example_tables():
    result = _run("validate")
    assert result.exit_code == 0 and "OK" in result.stdout
    doc = _json(_run("validate", "--json"))
    assert doc["ok"] and doc["problems"] == [] and doc["table"]["name"] == "default"
    example = Path(__file__).resolve().parents[1] / "mappings" / "examples" / "sleeplab-north.yaml"
    doc = _json(_run("validate", example, "--json"))
    assert doc["ok"] and doc["table"]["extends"] == ["default"] and doc["own_rules"] == 8


def test_validate_reports_conflicts(tmp_path):
    table = tmp_path / "t.yaml"
    table.write_text("rules:\n  - {normalised: C3-M2, modality: BAS}\n  - {normalised: 'c3:m2', modality: EMG}\n"
                     "  - {normalised: F4, modality: BAS}\n  - {normalised: f4, modality: BAS}\n")
    result = _run("validate", table, "--json")
    assert result.exit_code == 1
    doc = _json(result)
    assert not doc["ok"]
    assert [p["severity"] for p in doc["problems"]] == ["error", "warning"]
    assert [r["line"] for r in doc["problems"][0]["rules"]] == [2, 3]
    human = _run("validate", "--table", table)
    assert human.exit_code == 1 and "conflict" in human.stdout and "INVALID" in human.stdout


def test_validate_unreadable_table_is_a_usage_error(tmp_path):
    table = tmp_path / "t.yaml"
    table.write_text("rules: [\n")
    result = _run("validate", table)
    assert result.exit_code == 2 and "t.yaml" in result.stderr and "not valid YAML" in result.stderr


# ---- add / remove -------------------------------------------------------------------------------------------


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in montage_cmd.audit_log_path(path).read_text().splitlines()]


def test_add_and_remove_round_trip(site):
    original = site.read_text()
    before = MontageTable.load(site).version
    result = _run("add", "X 1", "emg", "--table", site, "--scope", "dicom:NK_PSG", "--note", "chin", "--json")
    assert result.exit_code == 0, result.output
    doc = _json(result)
    assert doc["written"] and doc["version_before"] == before and doc["version_after"] != before
    assert doc["effect"]["decided_by_new_rule"]
    text = site.read_text()
    assert text.startswith(original)  # comments and existing rules kept, rule appended
    assert text.endswith('  - {normalised: "X 1", modality: EMG, scope: "dicom:NK_PSG", note: "chin"}\n')
    table = MontageTable.load(site)
    assert table.version == doc["version_after"]
    assert table.lookup("X1", "dicom:NK_PSG") == ("EMG", "normalised")

    regex = _run("add", "DC\\d+", "exclude", "--kind", "regex", "--table", site)
    assert regex.exit_code == 0 and "added" in regex.stdout
    assert MontageTable.load(site).lookup("dc12") == ("exclude", "regex")

    removed = _run("remove", "x-1", "--table", site, "--json")
    assert removed.exit_code == 0, removed.output
    assert _json(removed)["rules"][0]["pattern"] == "X 1"
    assert _run("remove", "DC\\d+", "--table", site, "--kind", "regex").exit_code == 0
    assert site.read_text() == original
    assert MontageTable.load(site).version == before

    log = _audit(site)
    assert [e["action"] for e in log] == ["add", "add", "remove", "remove"]
    first = log[0]
    assert set(first) == {"time", "user", "action", "table", "rules", "version_before", "version_after"}
    assert first["time"].endswith("Z") and first["user"] and first["table"] == "site.yaml"
    assert first["rules"][0]["pattern"] == "X 1" and first["rules"][0]["scope"] == "dicom:NK_PSG"
    assert log[-1]["version_after"] == before


def test_add_creates_a_site_table_that_extends_the_default(tmp_path):
    path = tmp_path / "new-site.yaml"
    result = _run("add", "Tib R", "EMG", "--table", path)
    assert result.exit_code == 0, result.output
    assert "created" in result.stdout
    table = MontageTable.load(path)
    assert table.chain == ["new-site", "default"] and table.lookup("Tib R") == ("EMG", "normalised")
    assert table.lookup("C3-M2") == ("BAS", "normalised")
    (entry,) = _audit(path)
    assert entry["version_before"] is None and entry["version_after"] == table.version
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file (mkstemp alone gives 0600)


def test_add_refuses_a_conflict_and_leaves_the_table_alone(site):
    original = site.read_bytes()
    result = _run("add", "C3", "EMG", "--table", site)
    assert result.exit_code == 1
    assert "refused" in result.stderr and "unchanged" in result.stderr and "--priority 201" in result.stderr
    assert site.read_bytes() == original
    assert not montage_cmd.audit_log_path(site).exists()
    assert sorted(p.name for p in site.parent.iterdir()) == ["site.yaml"]  # no temp file left
    doc = _json(_run("add", "C3", "EMG", "--table", site, "--json"))
    assert not doc["ok"] and not doc["written"] and doc["problems"]
    # with a higher priority it overrides the built-in rule
    assert _run("add", "C3", "EMG", "--table", site, "--priority", "201").exit_code == 0
    assert MontageTable.load(site).lookup("C3") == ("EMG", "normalised")


def test_add_same_rule_twice_and_changed_rule(site):
    again = _run("add", "tib-l", "EMG", "--table", site, "--json")
    assert again.exit_code == 0 and not _json(again)["written"]
    other = _run("add", "Tib L", "RESP", "--table", site)
    assert other.exit_code == 1 and "remove it first" in other.stderr
    inherited = _run("add", "C3-M2", "BAS", "--table", site)
    assert inherited.exit_code == 0 and "nothing to do" in inherited.stdout
    assert not montage_cmd.audit_log_path(site).exists()


def test_add_write_is_atomic(site, monkeypatch):
    original = site.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    result = _run("add", "X9", "EMG", "--table", site)
    assert result.exit_code != 0 and isinstance(result.exception, OSError)
    assert site.read_bytes() == original
    assert sorted(p.name for p in site.parent.iterdir()) == ["site.yaml"]  # temp file removed, no audit line


@pytest.mark.parametrize("args, fragment", [
    (["add", "X", "BAS"], "needs --table"),
    (["add", "X", "EEG", "--table", "{site}"], "unknown modality"),
    (["add", "X", "BAS", "--kind", "fuzzy", "--table", "{site}"], "unknown rule kind"),
    (["add", "X", "BAS", "--scope", "ae:X", "--table", "{site}"], "unknown kind 'ae'"),
    (["add", "(x", "BAS", "--kind", "regex", "--table", "{site}"], "invalid regular expression"),
    (["remove", "X"], "needs --table"),
    (["remove", "Nope", "--table", "{site}"], "no rule for 'Nope'"),
    (["remove", "C3-M2", "--table", "{site}"], "comes from the table it extends"),
    (["remove", "Tib L", "--table", "{site}", "--kind", "fuzzy"], "unknown kind"),
    (["remove", "Tib L", "--table", "{missing}"], "file not found"),
])
def test_edit_usage_errors_change_nothing(site, args, fragment):
    original = site.read_bytes()
    args = [a.format(site=site, missing=site.parent / "missing.yaml") for a in args]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and result.stderr.count("\n") == 1
    assert site.read_bytes() == original
    assert sorted(p.name for p in site.parent.iterdir()) == ["site.yaml"]


def test_remove_asks_when_several_rules_match(site):
    for scope in ("dicom:A", "dicom:B"):
        assert _run("add", "X1", "EMG", "--scope", scope, "--table", site).exit_code == 0
    several = _run("remove", "X1", "--table", site)
    assert several.exit_code == 2 and "2 rules match" in several.stderr
    assert _run("remove", "X1", "--table", site, "--scope", "dicom:A").exit_code == 0
    assert _run("remove", "X1", "--table", site, "--all").exit_code == 0
    assert [r.pattern for r in MontageTable.load(site).own_rules] == ["Tib L"]


def test_editing_the_built_in_copy_is_refused():
    from importlib import resources

    builtin = Path(str(resources.files("gateway").joinpath("data/default_montage.yaml")))
    result = _run("add", "X", "BAS", "--table", builtin)
    assert result.exit_code == 2 and "read-only" in result.stderr


def test_format_1_tables_are_not_edited(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("modalities:\n  BAS: [C3]\n")
    result = _run("add", "C4", "BAS", "--table", path)
    assert result.exit_code == 2 and "format-1" in result.stderr
    assert path.read_text() == "modalities:\n  BAS: [C3]\n"


# ---- diff ---------------------------------------------------------------------------------------------------


def test_diff_rules_and_labels(site, tmp_path, studies):
    other = tmp_path / "other.yaml"
    other.write_text("name: other\nextends: default\nrules:\n  - {normalised: \"Tib L\", modality: RESP}\n"
                     "  - {normalised: \"Mystery 7\", modality: BAS}\n")
    result = _run("diff", site, other, "--json")
    assert result.exit_code == 0, result.output
    doc = _json(result)
    assert [r["pattern"] for r in doc["added"]] == ["Mystery 7"] and doc["removed"] == []
    (changed,) = doc["changed"]
    assert changed["fields"] == ["modality"] and changed["old"]["modality"] == "EMG"
    assert changed["new"]["modality"] == "RESP" and not doc["same"] and doc["labels"] is None

    labels = tmp_path / "labels.txt"
    labels.write_text("Tib L\nC3-M2\n\nMystery 7\n")
    doc = _json(_run("diff", site, other, "--labels", labels, "--labels", studies / "odd.edf", "--json"))
    moves = {c["label"]: (c["old"]["modality"], c["new"]["modality"]) for c in doc["labels"]}
    assert moves == {"Tib L": ("EMG", "RESP"), "Mystery 7": (None, "BAS")}

    human = _run("diff", site, other, "--labels", labels)
    assert "changed" in human.stdout and "EMG -> RESP" in human.stdout and "Mystery 7" in human.stdout


def test_diff_against_the_built_in_table(site):
    doc = _json(_run("diff", "default", site, "--json"))
    assert [r["pattern"] for r in doc["added"]] == ["Tib L"] and doc["b"]["extends"] == ["default"]
    same = _run("diff", "default", "default")
    assert same.exit_code == 0 and "no rule differs" in same.stdout
    assert _run("diff", "default", site.parent / "nope.yaml").exit_code == 2


def test_every_command_has_json():
    for command in ("list", "show", "test", "map", "unmapped", "validate", "diff", "add", "remove"):
        help_text = runner.invoke(app, ["montage", command, "--help"], env={"COLUMNS": "200"}).stdout
        assert "--json" in help_text, command


def test_audit_log_holds_no_recording_data(site, studies):
    _run("add", "X1", "EMG", "--table", site)
    text = montage_cmd.audit_log_path(site).read_text()
    assert "SYN-" not in text and "Synthetic" not in text and str(os.getcwd()) not in text
