"""Montage tables: the default table, matching rules, site tables and malformed-table errors."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from gateway import montage as montage_module
from gateway.montage import (
    IGNORE,
    MODALITIES,
    MontageError,
    MontageTable,
    default_table,
    normalise_label,
)
from gateway.readers.synthetic import DEFAULT_BENCH_CHANNELS

ROOT = Path(__file__).resolve().parents[1]
MAPPINGS_DEFAULT = ROOT / "mappings" / "default.yaml"
PACKAGED_DEFAULT = ROOT / "gateway" / "data" / "default_montage.yaml"

SLEEP_EDF_LABELS = ["EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "Resp oro-nasal", "EMG submental",
                    "Temp rectal", "Event marker"]
# channel_groups.json entries that the default table deliberately puts elsewhere (see its comments)
CORRECTED = {"Pleth": "RESP", "Pressur": "RESP", "RIP Abd": "RESP", "RIP Tho": "RESP"}


def _table(tmp_path: Path, text: str, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---- the default table --------------------------------------------------------------------------------------


def test_packaged_default_is_identical_to_mappings_default():
    assert PACKAGED_DEFAULT.read_bytes() == MAPPINGS_DEFAULT.read_bytes()


def test_default_table_identity():
    table = default_table()
    assert table is default_table()  # loaded once
    assert table.name == "default"
    assert table.version == hashlib.sha256(PACKAGED_DEFAULT.read_bytes()).hexdigest()[:12]
    assert MontageTable.load(MAPPINGS_DEFAULT).version == table.version
    assert table.rules == ()
    assert "shared" not in Path(montage_module.__file__).read_text()  # never reads ../shared at run time


def test_default_table_has_provenance_header():
    head = MAPPINGS_DEFAULT.read_text().split("\nname:", 1)[0]
    assert "channel_groups.json" in head and "Format" in head and "Pleth" in head


def test_synthetic_night_grouping():
    labels = [c.label for c in DEFAULT_BENCH_CHANNELS]
    match = default_table().map_labels(labels)
    assert list(match.groups) == ["BAS", "RESP", "EKG", "EMG"]
    assert match.groups == {
        "BAS": [0, 1, 2, 3, 4, 5, 6, 7],
        "RESP": [12, 13, 14, 15, 16, 17],
        "EKG": [11],
        "EMG": [8, 9, 10],
    }
    assert match.unmapped == [] and match.ignored == []
    assert match.labels("EMG", labels) == ["Chin1-Chin2", "LLeg", "RLeg"]
    assert match.labels("RESP", labels) == ["Airflow", "Nasal Pressure", "Thor", "Abdo", "SpO2", "Snore"]
    assert match.modality_of["E2-M1"] == "BAS" and match.modality_of["ECG II"] == "EKG"


def test_sleep_edf_labels():
    match = default_table().map_labels(SLEEP_EDF_LABELS)
    assert match.groups == {"BAS": [0, 1, 2], "RESP": [3], "EMG": [4]}
    assert match.ignored == ["Temp rectal", "Event marker"]
    assert match.unmapped == []
    assert "EKG" not in match.groups  # only modalities that have channels


def test_sleep_edf_file_maps(reference_dir):
    from gateway.readers.edf import read_edf

    labels = read_edf(reference_dir / "real" / "short_psg.edf").channel_labels
    assert default_table().map_labels(labels).groups == {"BAS": [0, 1, 2], "RESP": [3], "EMG": [4]}


def test_default_covers_channel_groups_json(reference_dir):
    groups = json.loads((reference_dir / "sleepfm" / "channel_groups.json").read_text())
    table = default_table()
    for modality, labels in groups.items():
        for label in labels:
            got, how = table.lookup(label)
            assert got == CORRECTED.get(label, modality), (label, modality, got)
            assert how == "label"


def test_default_known_gaps_are_filled():
    table = default_table()
    expected = {
        "E2-M1": "BAS", "E1-M2": "BAS", "E1-M1": "BAS", "E2-M2": "BAS", "Chin1-Chin2": "EMG", "LLeg": "EMG",
        "RLeg": "EMG", "Leg/L": "EMG", "Leg/R": "EMG", "ECG II": "EKG", "Airflow": "RESP",
        "Nasal Pressure": "RESP", "Thor": "RESP", "Abdo": "RESP", "SpO2": "RESP", "Snore": "RESP",
        "Pleth": "RESP", "RIP Abd": "RESP", "Position": IGNORE, "Light": IGNORE,
    }
    for label, modality in expected.items():
        assert table.lookup(label)[0] == modality, label
    listed = table.labels_for("BAS")
    assert "E2-M1" in listed and "E2:M1" not in listed  # preferred spelling, duplicates removed


# ---- matching -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, normalised", [
    ("C3-M2", "c3-m2"),
    ("C3:M2", "c3-m2"),
    ("  c3 : m2  ", "c3-m2"),
    ("EEG   C3-A2", "eeg c3-a2"),
    ("Nasal\tPressure ", "nasal pressure"),
])
def test_normalise_label(label, normalised):
    assert normalise_label(label) == normalised


def test_normalisation_cases():
    table = default_table()
    match = table.map_labels(["EEG C3-A2", "C3:M2", "C3-M2", "c3-m2   ", "F4-M1 ", "spo2", "ecg  ii", "EEG  O1 : M2"])
    assert match.groups == {"BAS": [0, 1, 2, 3, 4, 7], "RESP": [5], "EKG": [6]}
    assert match.matched_by["EEG  O1 : M2"] == "prefix"  # 'O1:M2' is in the table, 'EEG O1:M2' is not
    assert match.matched_by["C3:M2"] == "label"
    assert match.modality_of["c3-m2   "] == "BAS"  # keyed by the label as given


def test_prefix_only_dropped_when_rest_matches():
    table = default_table()
    assert table.lookup("EMG submental") == ("EMG", "label")
    assert table.lookup("EEG Nonsense")[0] is None
    assert table.lookup("ECG C3-M2") == ("BAS", "prefix")  # the rest decides
    assert table.lookup("EEGC3-M2")[0] is None  # a prefix needs its space


def test_unknown_labels_are_unmapped():
    match = default_table().map_labels(["C3-M2", "Mystery 1", "", "XYZ-123", "Position"])
    assert match.unmapped == ["Mystery 1", "", "XYZ-123"]
    assert match.ignored == ["Position"]
    assert match.groups == {"BAS": [0]}
    assert "Mystery 1" not in match.modality_of


def test_duplicate_labels_keep_both_indices():
    match = default_table().map_labels(["C3-M2", "Snore", "C3-M2", "foo", "foo"])
    assert match.groups == {"BAS": [0, 2], "RESP": [1]}
    assert match.unmapped == ["foo", "foo"]


def test_groups_follow_modality_order_not_recording_order():
    match = default_table().map_labels(["Chin1-Chin2", "ECG II", "Thor", "C4-M1"])
    assert list(match.groups) == list(MODALITIES)
    assert match.groups == {"BAS": [3], "RESP": [2], "EKG": [1], "EMG": [0]}


# ---- site tables --------------------------------------------------------------------------------------------


def test_site_table_with_rules(tmp_path):
    path = _table(tmp_path, """\
        name: sleeplab-north
        format: 1
        modalities:
          BAS: ["C3-A2"]
          RESP:
            - NO        # a label, not a YAML boolean
          EMG:
        ignore: ["Pulse Rate"]
        rules:
          - match: 'EEG .+'
            modality: BAS
          - match: 'Leg\\s*[LR]\\d?'
            modality: EMG
          - match: 'DC\\d+'
            modality: ignore
        """)
    table = MontageTable.load(path)
    assert table.name == "sleeplab-north"
    assert table.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    match = table.map_labels(["C3:A2", "EEG Anything", "leg L2", "DC3", "no", "Pulse Rate", "SpO2", "EEGX"])
    assert match.groups == {"BAS": [0, 1], "RESP": [4], "EMG": [2]}
    assert match.ignored == ["DC3", "Pulse Rate"]
    assert match.unmapped == ["SpO2", "EEGX"]  # a site table does not include the default one
    assert match.matched_by["EEG Anything"] == "rule EEG .+"
    assert match.matched_by["C3:A2"] == "label"


def test_labels_win_over_rules(tmp_path):
    path = _table(tmp_path, """\
        modalities:
          EKG: ["EEG ECG"]
        rules:
          - {match: 'EEG .*', modality: BAS}
        """)
    table = MontageTable.load(path)
    assert table.name == "site"  # the file stem when the table has no name
    assert table.lookup("EEG ECG") == ("EKG", "label")
    assert table.lookup("EEG F3") == ("BAS", "rule EEG .*")


def test_version_follows_content(tmp_path):
    a = MontageTable.load(_table(tmp_path, "modalities: {BAS: [C3]}\n", "a.yaml"))
    b = MontageTable.load(_table(tmp_path, "modalities: {BAS: [C3, C4]}\n", "b.yaml"))
    assert a.version != b.version and len(a.version) == 12


# ---- malformed tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, fragments", [
    ("modalities:\n  BAS: [C3\n", ["not valid YAML", "line"]),
    ("modalities:\n  BAS: [C3]\nmodalitis:\n  EMG: [Chin]\n", ["unknown key 'modalitis'", "line 3"]),
    ("modalities:\n  BAS: [C3]\n  EEG: [C4]\n", ["unknown modality 'EEG'", "line 3"]),
    ("modalities:\n  BAS:\n    - C3:M2\n  EMG:\n    - c3-m2\n", ["'c3-m2'", "'BAS'", "line 5", "line 3"]),
    ("modalities:\n  BAS: [Temp]\nignore: [TEMP]\n", ["'TEMP'", "line 3"]),
    ("modalities:\n  BAS: C3\n", ["'BAS' must be a list", "line 2"]),
    ("modalities:\n  BAS:\n    - [C3, C4]\n", ["a label under 'BAS'", "line 3"]),
    ("modalities:\n  BAS:\n    - ''\n", ["empty label", "line 3"]),
    ("name: x\n", ["missing required key 'modalities'"]),
    ("", ["empty"]),
    ("- just\n- a list\n", ["must be a mapping", "line 1"]),
    ("format: 2\nmodalities: {BAS: [C3]}\n", ["unsupported format '2'", "line 1"]),
    ("modalities: {BAS: [C3]}\nrules:\n  - match: '(unclosed'\n    modality: BAS\n",
     ["invalid regular expression", "line 3"]),
    ("modalities: {BAS: [C3]}\nrules:\n  - match: 'x.*'\n    modality: EOG\n", ["unknown modality 'EOG'", "line 4"]),
    ("modalities: {BAS: [C3]}\nrules:\n  - modality: BAS\n", ["a rule needs 'match'", "line 3"]),
    ("modalities: {BAS: [C3]}\nrules:\n  - {match: x, modality: BAS, note: y}\n", ["unknown key 'note'"]),
    ("modalities: {BAS: [C3]}\nmodalities: {EMG: [Chin]}\n", ["duplicate key 'modalities'", "line 2"]),
])
def test_malformed_tables(tmp_path, text, fragments):
    path = _table(tmp_path, text, "bad.yaml")
    with pytest.raises(MontageError) as info:
        MontageTable.load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_montage_error_attributes(tmp_path):
    path = _table(tmp_path, "modalities:\n  BAS: [C3]\n  XYZ: [C4]\n", "bad.yaml")
    with pytest.raises(MontageError) as info:
        MontageTable.load(path)
    assert info.value.key == "XYZ" and info.value.line == 3 and info.value.source == str(path)
    assert isinstance(info.value, ValueError)


def test_missing_and_binary_table_files(tmp_path):
    with pytest.raises(MontageError, match="file not found"):
        MontageTable.load(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MontageError, match="bin.yaml"):
        MontageTable.load(tmp_path / "bin.yaml")
