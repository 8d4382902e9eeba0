"""Montage tables: the default table, rule kinds, priorities, scopes, conflicts, extends, versions, editing."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from gateway.montage import table as montage_module
from gateway.montage.editing import MontageEditError, add_rule_text, remove_rules_text, render_rule
from gateway.montage.table import (
    EXCLUDE,
    IGNORE,
    MODALITIES,
    MontageError,
    MontageTable,
    default_table,
    normalise_label,
    parse_source,
    scope_matches,
)
from gateway.synthetic.night import DEFAULT_BENCH_CHANNELS

ROOT = Path(__file__).resolve().parents[1]
MAPPINGS_DEFAULT = ROOT / "mappings" / "default.yaml"
PACKAGED_DEFAULT = ROOT / "gateway" / "data" / "default_montage.yaml"
EXAMPLES = ROOT / "mappings" / "examples"

SLEEP_EDF_LABELS = ["EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "Resp oro-nasal", "EMG submental",
                    "Temp rectal", "Event marker"]
# published oddities the default table keeps as published (listed in its header)
ODDITIES = {"Pleth": "EMG", "Pressur": "EMG", "RIP Abd": "EMG", "RIP Tho": "EMG", "PPG": "RESP", "HR": "RESP"}


def _table(tmp_path: Path, text: str, name: str = "site.yaml", **kwargs) -> MontageTable:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return MontageTable.load(path, **kwargs)


# ---- the default table --------------------------------------------------------------------------------------


def test_packaged_default_is_identical_to_mappings_default():
    assert PACKAGED_DEFAULT.read_bytes() == MAPPINGS_DEFAULT.read_bytes()


def test_default_table_identity():
    table = default_table()
    assert table is default_table()  # loaded once
    assert table.name == "default" and table.format == 2 and table.base is None
    assert table.version == hashlib.sha256(PACKAGED_DEFAULT.read_bytes()).hexdigest()[:12]
    assert MontageTable.load(MAPPINGS_DEFAULT).version == table.version
    assert "shared" not in Path(montage_module.__file__).read_text()  # never reads ../shared at run time
    assert [p for p in table.problems()] == []  # no conflicts, no repeated rules


def test_default_table_header_documents_format_and_oddities():
    head = MAPPINGS_DEFAULT.read_text().split("\nname:", 1)[0]
    for word in ("channel_groups.json", "Format", "exact", "normalised", "regex", "priority", "scope",
                 "Oddities", "Pleth", "Pressur", "RIP Abd", "RIP Tho", "Heart Rate", "two groups"):
        assert word in head, word


def test_default_covers_channel_groups_as_published(reference_dir):
    groups = json.loads((reference_dir / "sleepfm" / "channel_groups.json").read_text())
    table = default_table()
    assert set(groups) == set(MODALITIES)
    for modality, labels in groups.items():
        for label in labels:
            res = table.resolve(label)
            assert res.modality == modality, (label, modality, res.modality)
            assert res.rule is not None and res.rule.table == "default" and res.quality == 0, label


def test_channel_groups_have_no_cross_group_labels(reference_dir):
    """The header says no label is in two groups, not even after normalisation: keep that true."""
    groups = json.loads((reference_dir / "sleepfm" / "channel_groups.json").read_text())
    seen: dict[str, str] = {}
    for modality, labels in groups.items():
        for label in labels:
            key = normalise_label(label)
            assert seen.setdefault(key, modality) == modality, (label, seen[key], modality)


def test_oddities_are_kept_as_published_with_a_note():
    table = default_table()
    for label, modality in ODDITIES.items():
        res = table.resolve(label)
        assert res.modality == modality, label
        assert "oddity" in res.rule.note


def test_default_known_gaps_are_filled():
    table = default_table()
    expected = {
        "E2-M1": "BAS", "E1-M2": "BAS", "E1-M1": "BAS", "E2-M2": "BAS", "E1-A2": "BAS", "ROC-A1": "BAS",
        "EKG": "EKG", "ECG1-ECG2": "EKG", "ECG II": "EKG", "Flow": "RESP", "Pressure": "RESP", "PTAF": "RESP",
        "Therm": "RESP", "SaO2": "RESP", "Chest": "RESP", "Abdomen": "RESP", "Chin": "EMG", "LAT": "EMG",
        "RAT": "EMG", "Chin1-Chin2": "EMG", "LLeg": "EMG", "RLeg": "EMG", "Leg/L": "EMG",
        "Position": EXCLUDE, "Light": EXCLUDE, "Status": EXCLUDE,
    }
    for label, modality in expected.items():
        assert table.lookup(label)[0] == modality, label


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
    assert match.unmapped == [] and match.ignored == [] and match.conflicts == {}
    assert match.labels("EMG", labels) == ["Chin1-Chin2", "LLeg", "RLeg"]
    assert match.labels("RESP", labels) == ["Airflow", "Nasal Pressure", "Thor", "Abdo", "SpO2", "Snore"]
    assert match.modality_of["E2-M1"] == "BAS" and match.modality_of["ECG II"] == "EKG"


def test_sleep_edf_labels():
    match = default_table().map_labels(SLEEP_EDF_LABELS)
    assert match.groups == {"BAS": [0, 1, 2], "RESP": [3], "EMG": [4]}
    assert match.ignored == ["Temp rectal", "Event marker"] == match.excluded
    assert match.unmapped == []
    assert "EKG" not in match.groups  # only modalities that have channels


def test_sleep_edf_file_maps(reference_dir):
    from gateway.readers import read_recording

    labels = read_recording(reference_dir / "real" / "short_psg.edf").channel_labels
    assert default_table().map_labels(labels).groups == {"BAS": [0, 1, 2], "RESP": [3], "EMG": [4]}


# ---- normalisation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, normalised", [
    ("C3-M2", "c3m2"),
    ("C3:M2", "c3m2"),
    ("  c3 : m2  ", "c3m2"),
    ("C3_M2", "c3m2"),
    ("C3/M2", "c3m2"),
    ("EEG   C3-A2", "eegc3a2"),
    ("Nasal\tPressure ", "nasalpressure"),
    ("H.R.", "hr"),
    ("EMG #1", "emg1"),
    ("ＣＨＩＮ１", "chin1"),  # full-width characters (NFKC)
    ("SpO₂", "spo2"),
    ("---", ""),
])
def test_normalise_label(label, normalised):
    assert normalise_label(label) == normalised


def test_normalisation_cases():
    table = default_table()
    labels = ["EEG C3-A2", "C3:M2", "C3-M2", "c3-m2   ", "F4-M1 ", "spo2", "ecg  ii", "EEG  O1 : M2", "C3M2",
              "eeg:f3_m2"]
    match = table.map_labels(labels)
    assert match.groups == {"BAS": [0, 1, 2, 3, 4, 7, 8, 9], "RESP": [5], "EKG": [6]}
    assert table.lookup("EEG  O1 : M2") == ("BAS", "prefix")  # only 'O1:M2' is in the table
    assert table.lookup("C3:M2") == ("BAS", "normalised")
    assert match.modality_of["c3-m2   "] == "BAS"  # keyed by the label as given


def test_vendor_prefix_only_dropped_when_the_rest_matches():
    table = default_table()
    assert table.lookup("EMG submental") == ("EMG", "normalised")  # the whole label is in the table
    assert table.lookup("EEG Nonsense") == (None, None)
    assert table.lookup("ECG C3-M2") == ("BAS", "prefix")  # the rest decides
    assert table.lookup("EEGC3-M2") == (None, None)  # a prefix needs a separator
    assert table.lookup("Resp Thorax") == ("RESP", "prefix")
    res = table.resolve("EEG C3:M2")
    assert res.quality == 1 and "vendor prefix" in res.how


def test_whole_label_beats_vendor_prefix_match(tmp_path):
    table = _table(tmp_path, """\
        rules:
          - {normalised: "EEG X", modality: EMG}
          - {normalised: "X", modality: BAS}
        """)
    assert table.lookup("EEG X") == ("EMG", "normalised")
    assert table.lookup("EMG X") == ("BAS", "prefix")


def test_unknown_labels_are_unmapped():
    match = default_table().map_labels(["C3-M2", "Mystery 1", "", "XYZ-123", "Position"])
    assert match.unmapped == ["Mystery 1", "", "XYZ-123"]
    assert match.ignored == ["Position"]
    assert match.groups == {"BAS": [0]}
    assert "Mystery 1" not in match.modality_of and "Mystery 1" not in match.matched_by
    assert [c.status for c in match.channels] == ["mapped", "unmapped", "unmapped", "unmapped", "excluded"]


def test_duplicate_labels_keep_both_indices():
    match = default_table().map_labels(["C3-M2", "Snore", "C3-M2", "foo", "foo"])
    assert match.groups == {"BAS": [0, 2], "RESP": [1]}
    assert match.unmapped == ["foo", "foo"]


def test_groups_follow_modality_order_not_recording_order():
    match = default_table().map_labels(["Chin1-Chin2", "ECG II", "Thor", "C4-M1"])
    assert list(match.groups) == list(MODALITIES)
    assert match.groups == {"BAS": [3], "RESP": [2], "EKG": [1], "EMG": [0]}


def test_suggestions_use_normalised_labels():
    table = default_table()
    assert [r.pattern for r in table.suggest("Chin1-Chin4")][:1] in (["Chin1-Chin2"], ["Chin1-Chin3"])
    assert table.suggest("EEG C3-M3")[0].modality == "BAS"
    assert table.suggest("qqqqqqqqqq") == []


# ---- rule kinds, priorities, exclude --------------------------------------------------------------------------


def test_default_priorities_exact_beats_normalised_beats_regex(tmp_path):
    table = _table(tmp_path, """\
        name: kinds
        rules:
          - {regex: 'X.*', modality: EMG}
          - {normalised: "x-1", modality: RESP}
          - {exact: "X1", modality: EKG}
        """)
    assert table.lookup("X1") == ("EKG", "exact")  # exact (300)
    assert table.lookup("x 1") == ("RESP", "normalised")  # exact is case- and punctuation-sensitive
    assert table.lookup("X2") == ("EMG", "regex")
    res = table.resolve("X1")
    assert [r.kind for r, _ in res.candidates] == ["exact", "normalised", "regex"]
    assert res.why_not(*res.candidates[1]) == "lower priority (200 < 300)"


def test_explicit_priority_wins(tmp_path):
    table = _table(tmp_path, """\
        rules:
          - {exact: "X1", modality: EKG}
          - {regex: 'X\\d', modality: EMG, priority: 301}
        """)
    assert table.lookup("X1") == ("EMG", "regex")
    assert table.rules[1].priority == 301 and table.rules[0].priority == 300


def test_regex_must_match_the_whole_label(tmp_path):
    table = _table(tmp_path, """\
        rules:
          - {regex: 'Leg\\s*[LR]\\d?', modality: EMG}
          - {regex: 'DC\\d+', modality: exclude}
        """)
    assert table.lookup("leg L2") == ("EMG", "regex")  # case-insensitive
    assert table.lookup("Leg  R") == ("EMG", "regex")  # whitespace collapsed
    assert table.lookup("Leg L2 extra") == (None, None)  # no partial match
    assert table.lookup("my Leg L") == (None, None)
    assert table.lookup("DC12") == (EXCLUDE, "regex")


def test_exclude_and_ignore_alias(tmp_path):
    table = _table(tmp_path, """\
        rules:
          - {normalised: "Temp", modality: exclude}
          - {normalised: "Light", modality: ignore}
          - {normalised: "C3", modality: bas}
        """)
    match = table.map_labels(["TEMP", "light", "c3"])
    assert match.ignored == ["TEMP", "light"] and match.groups == {"BAS": [2]}
    assert IGNORE == EXCLUDE == "exclude"
    assert table.labels_for("exclude") == ["Temp", "Light"]


# ---- scopes -------------------------------------------------------------------------------------------------


def test_scoped_rules_apply_only_to_their_source(tmp_path):
    table = _table(tmp_path, """\
        rules:
          - {exact: "X1", modality: EMG, scope: "dicom:NK_PSG"}
          - {exact: "X1", modality: EKG, scope: {source: "folder:/data/lab2/"}}
          - {normalised: "X1", modality: RESP, priority: 300}
        """)
    assert table.rules[1].scope == "folder:/data/lab2"
    assert table.lookup("X1") == ("RESP", "normalised")  # no source: unscoped rules only
    assert table.lookup("X1", source="dicom:NK_PSG") == ("EMG", "exact")  # scoped beats unscoped, same priority
    assert table.lookup("X1", source="dicom:OTHER") == ("RESP", "normalised")
    assert table.lookup("X1", source="folder:/data/lab2/night3") == ("EKG", "exact")  # sub-folders count
    assert table.lookup("X1", source="folder:/data/lab20") == ("RESP", "normalised")  # not a sub-folder
    match = table.map_labels(["X1"], source="dicom:NK_PSG")
    assert match.source == "dicom:NK_PSG" and match.groups == {"EMG": [0]}
    assert "[dicom:NK_PSG]" in match.matched_by["X1"]


def test_higher_priority_unscoped_beats_scoped(tmp_path):
    table = _table(tmp_path, """\
        rules:
          - {normalised: "X1", modality: EMG, scope: "dicom:A"}
          - {normalised: "X1", modality: BAS, priority: 250}
        """)
    res = table.resolve("X1", "dicom:A")
    assert res.modality == "BAS"
    assert "lower priority" in res.why_not(*res.candidates[1])


@pytest.mark.parametrize("text, canonical", [
    ("dicom:PSG_SCU", "dicom:PSG_SCU"),
    ("DICOM: PSG_SCU ", "dicom:PSG_SCU"),
    ("folder:/data/lab2/", "folder:/data/lab2"),
    ("folder:/data//lab2/./x/..", "folder:/data/lab2"),
    ("archive:old-pacs", "archive:old-pacs"),
])
def test_parse_source(text, canonical):
    assert parse_source(text) == canonical


@pytest.mark.parametrize("text", ["PSG_SCU", "dicom:", "ftp:host", "folder:relative/path",
                                  "dicom:AN_AE_TITLE_LONGER_THAN_16"])
def test_bad_sources(text):
    with pytest.raises(ValueError):
        parse_source(text)
    with pytest.raises(ValueError):
        default_table().map_labels(["C3"], source=text)


def test_scope_matches():
    assert scope_matches(None, None) and scope_matches(None, "dicom:A")
    assert not scope_matches("dicom:A", None) and not scope_matches("dicom:A", "dicom:a")
    assert scope_matches("folder:/", "folder:/x") and not scope_matches("folder:/x", "dicom:x")


# ---- conflicts ----------------------------------------------------------------------------------------------


def test_conflict_refuses_the_table_and_names_both_rules(tmp_path):
    text = """\
        name: clash
        rules:
          - {normalised: "C3-M2", modality: BAS}
          - {normalised: "c3:m2", modality: EMG}
        """
    with pytest.raises(MontageError) as info:
        _table(tmp_path, text)
    message = str(info.value)
    assert "site.yaml" in message and "conflicting" in message
    assert "clash:3" in message and "clash:4" in message and "BAS" in message and "EMG" in message
    assert len(info.value.problems) == 1
    table = _table(tmp_path, text, check=False)  # for 'validate'
    (problem,) = table.problems()
    assert problem.severity == "error" and {r.line for r in problem.rules} == {3, 4}
    res = table.resolve("C3-M2")  # at run time the label is left unmapped, not guessed
    assert res.status == "conflict" and res.modality is None
    match = table.map_labels(["C3-M2", "F4"])
    assert match.unmapped == ["C3-M2", "F4"] and list(match.conflicts) == ["C3-M2"]


def test_same_modality_is_no_conflict_but_a_repeat_warns(tmp_path):
    table = _table(tmp_path, """\
        rules:
          - {normalised: "C3-M2", modality: BAS}
          - {normalised: "c3:m2", modality: BAS}
        """)
    (problem,) = table.problems()
    assert problem.severity == "warning" and "repeats" in problem.message


def test_regex_conflicting_with_a_label_at_equal_priority(tmp_path):
    with pytest.raises(MontageError, match="regex"):
        _table(tmp_path, """\
            rules:
              - {normalised: "Chin", modality: EMG}
              - {regex: 'Ch.*', modality: RESP, priority: 200}
            """)
    _table(tmp_path, """\
        rules:
          - {normalised: "Chin", modality: EMG}
          - {regex: 'Ch.*', modality: RESP}
        """)  # default priorities differ: no conflict


def test_scopes_that_never_meet_do_not_conflict(tmp_path):
    _table(tmp_path, """\
        rules:
          - {exact: "X1", modality: EMG, scope: "dicom:A"}
          - {exact: "X1", modality: BAS, scope: "dicom:B"}
          - {exact: "X1", modality: EKG, scope: "folder:/data/a"}
        """)
    with pytest.raises(MontageError, match="X1"):
        _table(tmp_path, """\
            rules:
              - {exact: "X1", modality: EMG, scope: "folder:/data"}
              - {exact: "X1", modality: BAS, scope: "folder:/data/lab2"}
            """)


def test_two_regexes_meeting_on_an_unknown_label_conflict_at_run_time(tmp_path):
    table = _table(tmp_path, """\
        rules:
          - {regex: 'A.*', modality: EMG}
          - {regex: '.*Z', modality: BAS}
        """)
    match = table.map_labels(["AZ", "AB", "BZ"])
    assert match.unmapped == ["AZ"] and match.groups == {"BAS": [2], "EMG": [1]}
    assert len(match.conflicts["AZ"]) == 2


# ---- extends, versions, provenance --------------------------------------------------------------------------


def test_extends_the_built_in_table(tmp_path):
    table = _table(tmp_path, """\
        name: north
        extends: default
        rules:
          - {normalised: "Tib L", modality: EMG}
          - {normalised: "Pleth", modality: exclude, priority: 250}
        """)
    assert table.chain == ["north", "default"] and table.base is default_table()
    assert len(table.rules) == len(default_table().rules) + 2 and len(table.own_rules) == 2
    match = table.map_labels(["C3-M2", "Tib L", "Pleth"])
    assert match.groups == {"BAS": [0], "EMG": [1]} and match.ignored == ["Pleth"]
    assert match.matched_by["C3-M2"].endswith("@ default:82") or "@ default:" in match.matched_by["C3-M2"]
    assert "@ north:4" in match.matched_by["Tib L"]


def test_overriding_a_base_label_needs_a_higher_priority(tmp_path):
    with pytest.raises(MontageError, match="default:"):
        _table(tmp_path, "extends: default\nrules:\n  - {normalised: C3, modality: EMG}\n")


def test_extends_a_path_and_versions_follow_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nrules:\n  - {normalised: C3, modality: BAS}\n")
    site = _table(tmp_path, "extends: base.yaml\nrules:\n  - {normalised: C4, modality: BAS}\n")
    assert site.chain == ["site", "base"] and site.lookup("C3") == ("BAS", "normalised")
    before = site.version
    (tmp_path / "base.yaml").write_text("name: base\nrules:\n  - {normalised: C3, modality: EMG}\n")
    after = MontageTable.load(tmp_path / "site.yaml")
    assert after.version != before  # the site file did not change, the rules in effect did
    assert after.lookup("C3") == ("EMG", "normalised")


@pytest.mark.parametrize("files, fragment", [
    ({"site.yaml": "extends: site.yaml\nrules: []\n"}, "cycle"),
    ({"site.yaml": "extends: a.yaml\nrules: []\n", "a.yaml": "extends: site.yaml\nrules: []\n"}, "cycle"),
    ({"site.yaml": "extends: nope.yaml\nrules: []\n"}, "not found"),
    ({"site.yaml": "extends: ''\nrules: []\n"}, "'extends' must name a table"),
])
def test_bad_extends(tmp_path, files, fragment):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(MontageError, match=fragment):
        MontageTable.load(tmp_path / "site.yaml")


def test_version_follows_content(tmp_path):
    a = _table(tmp_path, "rules: [{normalised: C3, modality: BAS}]\n", "a.yaml")
    b = _table(tmp_path, "rules: [{normalised: C3, modality: BAS}, {normalised: C4, modality: BAS}]\n", "b.yaml")
    c = _table(tmp_path, "rules: [{normalised: C3, modality: BAS}]\n", "c.yaml")
    assert a.version != b.version and len(a.version) == 12
    assert a.version == c.version  # the content, not the file name


def test_match_records_table_and_rule():
    table = default_table()
    match = table.map_labels(["C3-M2", "Mystery"])
    assert (match.table_name, match.table_version) == ("default", table.version)
    assert match.matched_by["C3-M2"].startswith('normalised "C3:M2" @ default:')
    channel = match.channels[0]
    assert channel.rule is not None and channel.rule.kind == "normalised" and channel.rule.line > 40
    doc = json.loads(json.dumps(match.as_dict()))
    assert doc["table"] == {"name": "default", "version": table.version}
    assert doc["channels"][1] == {"index": 1, "label": "Mystery", "modality": None, "status": "unmapped",
                                  "rule": None, "where": None}


def test_example_site_tables():
    north = MontageTable.load(EXAMPLES / "sleeplab-north.yaml")
    assert north.problems() == [] and north.chain == ["sleeplab-north", "default"]
    labels = ["X1", "DC3", "Kanal 2", "Pleth", "Tib L", "C3-M2", "X2"]
    dicom = north.map_labels(labels, "dicom:NK_PSG")
    assert dicom.groups == {"BAS": [5], "EKG": [6], "EMG": [0, 4]} and dicom.ignored == ["DC3", "Pleth"]
    folder = north.map_labels(labels, "folder:/data/lab2/2024")
    assert folder.groups == {"BAS": [2, 5], "EMG": [0, 4]} and folder.unmapped == ["DC3", "X2"]
    home = MontageTable.load(EXAMPLES / "home-test-device.yaml")
    assert home.base is None and home.lookup("C3-M2") == (None, None)
    assert home.lookup("nasal pressure") == (None, None)  # exact rules only
    for path in EXAMPLES.glob("*.yaml"):
        assert MontageTable.load(path).problems() == [], path


# ---- the first table format is still read ---------------------------------------------------------------------


def test_format_1_tables_still_load(tmp_path):
    table = _table(tmp_path, """\
        name: old
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
        """)
    assert table.format == 1 and table.name == "old"
    match = table.map_labels(["C3:A2", "EEG Anything", "no", "Pulse Rate", "SpO2"])
    assert match.groups == {"BAS": [0, 1], "RESP": [2]} and match.ignored == ["Pulse Rate"]
    assert match.unmapped == ["SpO2"]


# ---- malformed tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, fragments", [
    ("rules:\n  - {normalised: C3\n", ["not valid YAML", "line"]),
    ("rules: []\nrulez: []\n", ["unknown key 'rulez'", "line 2"]),
    ("rules:\n  - {normalised: C3, modality: EEG}\n", ["unknown modality 'EEG'", "line 2"]),
    ("rules:\n  - {normalised: C3}\n", ["needs 'modality'", "line 2"]),
    ("rules:\n  - {modality: BAS}\n", ["exactly one of", "line 2"]),
    ("rules:\n  - {exact: C3, regex: C3, modality: BAS}\n", ["exactly one of", "exact, regex"]),
    ("rules:\n  - {normalised: C3, modality: BAS, notes: x}\n", ["unknown key 'notes'", "line 2"]),
    ("rules:\n  - {normalised: '--', modality: BAS}\n", ["empty normalised label", "line 2"]),
    ("rules:\n  - {regex: '(unclosed', modality: BAS}\n", ["invalid regular expression", "line 2"]),
    ("rules:\n  - {normalised: C3, modality: BAS, priority: high}\n", ["whole number", "line 2"]),
    ("rules:\n  - {normalised: C3, modality: BAS, scope: PSG_SCU}\n", ["bad 'scope'", "line 2"]),
    ("rules:\n  - {normalised: C3, modality: BAS, scope: {ae: X}}\n", ["'scope' must be", "line 2"]),
    ("rules:\n  - [C3, BAS]\n", ["a rule must be a mapping", "line 2"]),
    ("rules: C3\n", ["'rules' must be a list", "line 1"]),
    ("name: x\n", ["missing required key 'rules'"]),
    ("", ["empty"]),
    ("- just\n- a list\n", ["must be a mapping", "line 1"]),
    ("format: 3\nrules: []\n", ["unsupported format '3'", "line 1"]),
    ("rules: []\nrules: []\n", ["duplicate key 'rules'", "line 2"]),
    ("modalities:\n  EEG: [C4]\n", ["unknown modality 'EEG'", "line 2"]),
])
def test_malformed_tables(tmp_path, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MontageError) as info:
        MontageTable.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_montage_error_attributes(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - {normalised: C3, modality: BAS}\n  - {normalised: C4, modality: XYZ}\n")
    with pytest.raises(MontageError) as info:
        MontageTable.load(path)
    assert info.value.key == "XYZ" and info.value.line == 3 and info.value.source == str(path)
    assert isinstance(info.value, ValueError)


def test_missing_binary_and_folder_table_files(tmp_path):
    with pytest.raises(MontageError, match="file not found"):
        MontageTable.load(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MontageError, match="bin.yaml.*UTF-8"):
        MontageTable.load(tmp_path / "bin.yaml")
    with pytest.raises(MontageError, match="folder"):
        MontageTable.load(tmp_path)


# ---- editing a table's text ---------------------------------------------------------------------------------


def test_render_rule_round_trips_awkward_text():
    line = render_rule("regex", 'EEG\\s"quoted" #not-a-comment', "bas", priority=5, scope="dicom:A",
                       note="a: b")
    table = MontageTable.parse(f"rules:\n  - {line}\n")
    rule = table.rules[0]
    assert (rule.pattern, rule.modality, rule.priority, rule.scope, rule.note) == (
        'EEG\\s"quoted" #not-a-comment', "BAS", 5, "dicom:A", "a: b")
    with pytest.raises(ValueError):
        render_rule("fuzzy", "x", "BAS")
    with pytest.raises(ValueError):
        render_rule("exact", "x", "EEG")


@pytest.mark.parametrize("text", [
    "name: a\nrules:\n",
    "name: a\nrules: []  # none yet\n",
    "name: a\n",
    "# header\nname: a\nrules:\n  - normalised: x\n    modality: BAS\n  # trailing comment\n\nformat: 2\n",
    "name: a\nrules:\n    - {normalised: x, modality: BAS}  # why\n",
])
def test_add_rule_text_keeps_the_rest(text):
    new = add_rule_text(text, render_rule("exact", "Y1", "EMG"))
    table = MontageTable.parse(new)
    assert table.rules[-1].pattern == "Y1"
    before = MontageTable.parse(text).rules if "rules:" in text else ()
    assert [r.pattern for r in table.rules[:-1]] == [r.pattern for r in before]
    for line in text.splitlines():
        if not line.startswith("rules:"):
            assert line in new.splitlines()  # comments and layout kept
    assert "# none yet" in new or "# none yet" not in text


def test_add_rule_text_refuses_flow_lists():
    with pytest.raises(MontageEditError, match="one rule per line"):
        add_rule_text("rules: [{normalised: x, modality: BAS}]\n", render_rule("exact", "Y", "EMG"))


def test_remove_rules_text():
    text = ("# keep me\nname: a\nrules:\n  - {normalised: x, modality: BAS}  # x's comment\n"
            "  - normalised: y\n    modality: EMG\n\n  - {exact: z, modality: EKG}\n")
    table = MontageTable.parse(text)
    new = remove_rules_text(text, table, [table.rules[0], table.rules[1]])
    assert new == "# keep me\nname: a\nrules:\n\n  - {exact: z, modality: EKG}\n"
    table = MontageTable.parse(new)
    empty = remove_rules_text(new, table, list(table.rules))
    assert MontageTable.parse(empty).rules == ()
    flow = "rules: [{normalised: x, modality: BAS}]\n"
    table = MontageTable.parse(flow)
    with pytest.raises(MontageEditError, match="by hand"):
        remove_rules_text(flow, table, list(table.rules))
    with pytest.raises(MontageEditError, match="not one of this file's rules"):
        remove_rules_text(flow, table, list(default_table().rules[:1]))
