"""``mappings/release-exact.yaml``: the published SleepFM labels only, matched exactly as the release does.

The release reads an EDF with MNE (labels stripped of surrounding spaces) and keeps a channel when its
label is, as written, a key of channel_groups.json: case-sensitive, no normalisation, no vendor-prefix
dropping, no labels beyond the published ones. The built-in table widens all of that and stays the default.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.config import load_config
from gateway.config_check import semantic_problems
from gateway.montage.table import EXCLUDE, MODALITIES, MontageTable, default_table, load_table

ROOT = Path(__file__).resolve().parents[1]
RELEASE_EXACT = ROOT / "mappings" / "release-exact.yaml"

runner = CliRunner()

# Labels the default table maps (by normalisation, vendor-prefix dropping, or because it adds them) that
# the release does not know: label -> the default table's modality (None: excluded there).
WIDENED = {
    "E2-M1": "BAS",  # published only as "E2:M1"
    "E1-M1": "BAS",  # published only as "E1:M1"
    "c3-m2": "BAS",  # case
    "C3 - M2": "BAS",  # spaces inside
    "C3_M2": "BAS",  # another separator
    "EEG C4-M1": "BAS",  # vendor prefix in front of the published "C4-M1"
    "EOG E1-M2": "BAS",
    "E1-A2": "BAS",  # added by the default table
    "ROC-A1": "BAS",
    "Fpz-Cz": "BAS",
    "EEG Fpz-Cz": "BAS",  # Sleep-EDF
    "EOG horizontal": "BAS",
    "ECG-II": "EKG",  # published as "ECG II", "ECGII"
    "ecg": "EKG",
    "EKG II": "EKG",
    "Lead II": "EKG",
    "spo2": "RESP",
    "Flow": "RESP",
    "Pressure": "RESP",
    "PTAF": "RESP",
    "Resp oro-nasal": "RESP",
    "Chin1 - Chin2": "EMG",
    "Leg-l": "EMG",
    "LAT": "EMG",
    "EMG submental": "EMG",
    "Position": None,
    "Temp rectal": None,
}

FIXTURE_LABELS = ["C3-M2", "O2-M1", "E1-M2", "ECG II", "Chin1-Chin2", "Thor", "Abdo", "Airflow", "SpO2", "Leg/L"]


@pytest.fixture(scope="module")
def release() -> MontageTable:
    return load_table(RELEASE_EXACT)


def _groups(reference_dir: Path) -> dict[str, list[str]]:
    return json.loads((reference_dir / "sleepfm" / "channel_groups.json").read_text())


def _published(reference_dir: Path) -> dict[str, str]:
    return {label: group for group, labels in _groups(reference_dir).items() for label in labels}


def _reaching_the_model(label: str, group: str) -> str:
    """What the release makes of a published label: its group, or nothing for a label with a "/"."""
    return EXCLUDE if "/" in label else group


# ---- the table is only exact rules ---------------------------------------------------------------------------


def test_release_exact_has_only_unscoped_exact_rules_and_no_base(release):
    assert release.name == "release-exact" and release.base is None and release.chain == ["release-exact"]
    assert release.rules == release.own_rules and len(release.rules) > 0
    for rule in release.rules:
        assert rule.kind == "exact", rule.describe()
        assert rule.priority == 300 and rule.scope is None, rule.describe()
        # no exclude group either, but for the published labels with a "/", which never reach the release's
        # model (its HDF5 writer turns the "/" into a group)
        assert rule.modality in MODALITIES or ("/" in rule.pattern and rule.modality == EXCLUDE), rule.describe()
        assert rule.pattern == rule.pattern.strip()
    assert release.problems() == []  # no conflicts, no repeated rules


def test_release_exact_header_says_generated_and_how():
    head = RELEASE_EXACT.read_text().split("\nname:", 1)[0]
    for words in ("GENERATED", "DO NOT EDIT BY HAND", "channel_groups.json", "exact", "E2-M1",
                  "montage:", "table: mappings/release-exact.yaml", "--montage", "--table"):
        assert words in head, words


@pytest.mark.reference
def test_release_exact_rules_are_exactly_the_published_labels(reference_dir, release):
    published = _published(reference_dir)
    assert set(_groups(reference_dir)) == set(MODALITIES)
    assert {r.pattern: r.modality for r in release.rules} == {
        label: _reaching_the_model(label, group) for label, group in published.items()}
    assert sum(r.modality == EXCLUDE for r in release.rules) == 10
    assert len(release.rules) == len(published)  # each distinct label once


@pytest.mark.reference
def test_release_exact_was_generated_from_this_channel_groups_file(reference_dir):
    digest = hashlib.sha256((reference_dir / "sleepfm" / "channel_groups.json").read_bytes()).hexdigest()
    head = RELEASE_EXACT.read_text().split("\nname:", 1)[0]
    assert re.search(r"\b[0-9a-f]{64}\b", head).group(0) == digest


# ---- matching --------------------------------------------------------------------------------------------------


@pytest.mark.reference
def test_every_published_label_maps_to_its_group(reference_dir, release):
    groups = _groups(reference_dir)
    for modality, labels in groups.items():
        for label in labels:
            want = _reaching_the_model(label, modality)
            res = release.resolve(label)
            assert res.modality == want, (label, want, res.modality)
            assert res.rule.kind == "exact" and res.rule.pattern == label and res.quality == 0
            # MNE strips the label's surrounding spaces: so does the gateway's EDF reader and the exact rule
            assert release.lookup(f"{label}   ") == (want, "exact")
    labels = [label for ls in groups.values() for label in ls]
    match = release.map_labels(labels)
    slashed = [label for label in labels if "/" in label]
    assert match.unmapped == [] and sorted(match.ignored) == sorted(slashed) and match.conflicts == {}
    assert sum(len(ix) for ix in match.groups.values()) == len(labels) - len(slashed)


@pytest.mark.parametrize("label, modality", sorted(WIDENED.items()))
def test_widened_labels_map_under_default_only(label, modality, release):
    assert default_table().lookup(label)[0] == (modality or EXCLUDE), label
    res = release.resolve(label)
    assert res.status == "unmapped" and res.candidates == [], (label, res.modality)


@pytest.mark.reference
def test_widened_labels_are_not_published(reference_dir):
    published = _published(reference_dir)
    assert not set(WIDENED) & set(published)


def _variants(label: str) -> set[str]:
    """Spellings the default table accepts for a published label: other case, other separators, spaces
    inside, a vendor prefix in front."""
    out = {label.lower(), label.upper(), label.swapcase()}
    for a, b in (("-", ":"), (":", "-"), ("-", "_"), ("-", " - "), (" ", ""), (" ", "  "), ("(", " (")):
        if a in label:
            out.add(label.replace(a, b))
    out.add(f"Resp {label}")
    return out


@pytest.mark.reference
def test_every_variant_of_a_published_label_is_unmapped(reference_dir, release):
    """Systematically: every re-spelling of a published label that is not itself published maps under the
    default table (to the published group) and is unmapped under release-exact."""
    published = _published(reference_dir)
    default = default_table()
    tried = 0
    for label, group in published.items():
        for variant in _variants(label) - set(published):
            if variant.strip() in published:
                continue  # only surrounding spaces differ: the release strips them too
            tried += 1
            assert release.resolve(variant).status == "unmapped", (label, variant)
            assert default.lookup(variant)[0] == group, (label, variant, default.lookup(variant))
    assert tried > 1000


@pytest.mark.reference
def test_fixture_and_sleep_edf_recordings(reference_dir, release):
    from gateway.readers import read_recording

    labels = read_recording(reference_dir / "preprocessing" / "fixture_10min.edf").channel_labels
    assert labels == FIXTURE_LABELS
    strict, wide = release.map_labels(labels), default_table().map_labels(labels)
    assert wide.groups == {"BAS": [0, 1, 2], "RESP": [5, 6, 7, 8], "EKG": [3], "EMG": [4, 9]}
    # Leg/L never reaches the release's model (see the table's header): excluded under release-exact
    assert strict.groups == {"BAS": [0, 1, 2], "RESP": [5, 6, 7, 8], "EKG": [3], "EMG": [4]}
    assert strict.unmapped == [] and strict.ignored == ["Leg/L"]

    labels = read_recording(reference_dir / "real" / "short_psg.edf").channel_labels
    assert default_table().map_labels(labels).groups == {"BAS": [0, 1, 2], "RESP": [3], "EMG": [4]}
    strict = release.map_labels(labels)
    assert strict.groups == {} and strict.unmapped == labels  # Sleep-EDF labels are not published


# ---- loading: the daemon's configuration and the CLI ------------------------------------------------------------


def test_loads_through_the_daemon_configuration(tmp_path):
    from gateway.montage.holder import MontageHolder

    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "release-exact.yaml").write_bytes(RELEASE_EXACT.read_bytes())
    config = tmp_path / "gateway.yaml"
    config.write_text("montage:\n  table: mappings/release-exact.yaml\n")
    cfg = load_config(config, env={})
    assert cfg.montage.table == mappings / "release-exact.yaml"
    assert not [p for p in semantic_problems(cfg) if p.startswith("montage.")]
    holder = MontageHolder(cfg.montage.table)
    assert holder.table.name == "release-exact"
    assert holder.table.version == load_table(RELEASE_EXACT).version
    assert holder.table.lookup("E2-M1") == (None, None)
    assert holder.table.lookup("E2:M1") == ("BAS", "exact")

    cfg = load_config(None, env={"PSG__MONTAGE__TABLE": str(RELEASE_EXACT)})  # or from the environment
    assert MontageHolder(cfg.montage.table).table.name == "release-exact"


def _cli(*args):
    return runner.invoke(app, ["montage", *map(str, args)])


def test_cli_validate_accepts_it():
    result = _cli("validate", RELEASE_EXACT, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["problems"] == []
    assert doc["table"]["name"] == "release-exact" and doc["table"]["extends"] == []
    assert list(doc["by_kind"]) == ["exact"] and doc["rules"] == doc["own_rules"] == doc["by_kind"]["exact"]
    result = _cli("validate", "--table", RELEASE_EXACT)
    assert result.exit_code == 0 and "OK" in result.stdout


def test_cli_show_and_map():
    result = _cli("show", "E2-M1", "--table", RELEASE_EXACT, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "unmapped"
    result = _cli("show", "E2:M1", "--table", RELEASE_EXACT, "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["modality"] == "BAS" and doc["rule"]["kind"] == "exact"
    result = _cli("map", *FIXTURE_LABELS, "E2-M1", "--table", RELEASE_EXACT, "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["unmapped"] == ["E2-M1"]
    assert _cli("map", *FIXTURE_LABELS, "--table", RELEASE_EXACT).exit_code == 0
    assert _cli("map", "E2-M1").exit_code == 0  # the built-in table still maps it


def test_cli_diff_against_default_shows_the_widened_labels(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("E2-M1\nC3-M2\nEEG C4-M1\n")
    result = _cli("diff", "default", RELEASE_EXACT, "--labels", labels, "--json")
    assert result.exit_code == 0, result.output
    changed = {row["label"]: (row["old"]["modality"], row["new"]["status"])
               for row in json.loads(result.stdout)["labels"]}
    assert changed == {"E2-M1": ("BAS", "unmapped"), "EEG C4-M1": ("BAS", "unmapped")}  # C3-M2 unchanged
