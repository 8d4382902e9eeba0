"""The built-in table on real vendors' labels (issue 19): coded DICOM channel sources, Nihon Kohden, Compumedics,
Philips Alice, Natus/Embla, Grass, plain EOG/EMG/ECG, the standard ECG leads and 10-10 electrode names.

Each family is checked on a real file where one is installed (pydicom's 12-lead ECG object, pyedflib's and the
project's EDFs) and otherwise on the labels the vendor or dataset documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.montage.table import MontageError, MontageTable, canonical_code, default_table
from gateway.readers.dicom_waveform import read_dicom_study
from gateway.readers.edf import read_edf

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

TWELVE_LEADS = {
    "5.6.3-9-1": "Lead I (Einthoven)", "5.6.3-9-2": "Lead II", "5.6.3-9-61": "Lead III", "5.6.3-9-62": "Lead aVR",
    "5.6.3-9-63": "Lead aVL", "5.6.3-9-64": "Lead aVF", "5.6.3-9-3": "Lead V1", "5.6.3-9-4": "Lead V2",
    "5.6.3-9-5": "Lead V3", "5.6.3-9-6": "Lead V4", "5.6.3-9-7": "Lead V5", "5.6.3-9-8": "Lead V6",
}


def _pydicom_ecg() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("waveform_ecg.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's waveform_ecg.dcm is not installed")
    return Path(path)


def _parse(text: str) -> MontageTable:
    return MontageTable.parse(text, source="site.yaml", default_name="site")


# ---- coded channel sources ----------------------------------------------------------------------------------


def test_real_12_lead_dicom_ecg_maps_every_lead_by_its_code():
    recording = read_dicom_study([_pydicom_ecg()])
    assert {ch.source_code for ch in recording.channels} == {("SCPECG", v) for v in TWELVE_LEADS}
    assert len(recording.channels) == 12  # the derived median-beat group repeats them and is skipped
    match = default_table().map_labels(recording.channel_labels, codes=recording.channel_codes)
    assert match.groups == {"EKG": list(range(12))} and match.unmapped == []
    for channel in match.channels:
        assert channel.rule is not None and channel.rule.kind == "code", channel.label
        assert channel.rule.where.startswith("default:")


def test_the_code_decides_whatever_the_label_says():
    recording = read_dicom_study([_pydicom_ecg()])
    wrong = ["Mystery 7", "C3-M2", "Position"] + ["X"] * 9  # unknown, a BAS label, an excluded label
    match = default_table().map_labels(wrong, codes=recording.channel_codes)
    assert match.groups == {"EKG": list(range(12))}
    assert match.unmapped == [] and match.ignored == []
    res = default_table().resolve("C3-M2", code=("SCPECG", "5.6.3-9-2"))
    assert res.modality == "EKG" and res.rule.kind == "code" and "coded source SCPECG:5.6.3-9-2" in res.how
    # a label rule of any priority does not outrank a code that matches ...
    site = _parse('extends: default\nrules:\n  - {normalised: "Lead II", modality: EMG, priority: 999}\n')
    assert site.resolve("Lead II", code=("SCPECG", "5.6.3-9-2")).modality == "EKG"
    # ... and without a matching code rule the label decides as before
    assert site.resolve("Lead II", code=("SCPECG", "no-such-code")).modality == "EMG"
    assert site.resolve("Lead II").modality == "EMG"


def test_mdc_codes_and_code_rule_syntax():
    table = default_table()
    for value in ("2:1", "2:2", "2:3", "2:8", "2:61", "2:62", "2:63", "2:64"):
        assert table.resolve("?", code=("MDC", value)).modality == "EKG", value
    assert table.resolve("?", code=("mdc", " 2:62 ")).modality == "EKG"  # scheme case and spaces ignored
    assert canonical_code("scpecg: 5.6.3-9-1") == "SCPECG:5.6.3-9-1"
    assert canonical_code("MDC:2:62") == "MDC:2:62"  # only the first colon separates
    for bad in ("SCPECG", ":2:1", "MDC:"):
        with pytest.raises(ValueError):
            canonical_code(bad)
    site = _parse('rules:\n  - {code: "DCM:122137", modality: exclude, note: "a site code"}\n'
                  '  - {code: "SCPECG:5.6.3-9-2", modality: EMG, priority: 401}\n')
    assert site.resolve("Lead II", code=("SCPECG", "5.6.3-9-2")).modality == "EMG"
    assert site.resolve("Lead II", code="DCM:122137").status == "excluded"
    assert site.labels_for("EMG") == []  # code rules name no label


def test_code_rules_are_checked_for_conflicts_and_syntax():
    with pytest.raises(MontageError, match="code SCPECG:5.6.3-9-2 matches"):
        _parse('rules:\n  - {code: "SCPECG:5.6.3-9-2", modality: EKG}\n'
               '  - {code: "scpecg:5.6.3-9-2", modality: EMG}\n')
    with pytest.raises(MontageError, match="SCHEME:VALUE") as err:
        _parse('rules:\n  - {code: "5.6.3-9-2", modality: EKG}\n')
    assert err.value.line == 2


def test_label_only_callers_are_unchanged_by_code_rules():
    match = default_table().map_labels(["Lead II", "Mystery"])  # no codes given: labels decide
    assert match.groups == {"EKG": [0]} and match.unmapped == ["Mystery"]


# ---- label families -----------------------------------------------------------------------------------------

# Nihon Kohden EDF export: the EEG electrodes against the system reference, polygraph inputs with 'POL'.
NIHON_KOHDEN_EEG = [f"EEG {s}-Ref" for s in (
    "Fp1", "Fp2", "F3", "F4", "C3", "C4", "P3", "P4", "O1", "O2", "F7", "F8", "T3", "T4", "T5", "T6", "Fz", "Cz",
    "Pz", "A1", "A2")]
NIHON_KOHDEN_POL = {"POL SpO2": "RESP", "POL Pulse": "RESP", "POL Chin": "EMG", "POL ECG": "EKG",
                    "POL Snore": "RESP", "POL Abdomen": "RESP", "POL Thorax": "RESP"}
# Compumedics Profusion exports as distributed by the NSRR (SHHS, MESA channel lists)
COMPUMEDICS = {"SaO2": "RESP", "H.R.": "RESP", "EEG(sec)": "BAS", "ECG": "EKG", "EMG": "EMG", "EOG(L)": "BAS",
               "EOG(R)": "BAS", "EEG": "BAS", "THOR RES": "RESP", "ABDO RES": "RESP", "POSITION": "exclude",
               "LIGHT": "exclude", "AIRFLOW": "RESP", "NEW AIR": "RESP", "OX stat": "exclude",
               "EKG": "EKG", "EOG-L": "BAS", "EOG-R": "BAS", "EEG1": "BAS", "EEG2": "BAS", "EEG3": "BAS",
               "Pres": "RESP", "Flow": "RESP", "Snore": "RESP", "Thor": "RESP", "Abdo": "RESP", "Leg": "EMG",
               "Therm": "RESP", "Pos": "exclude", "SpO2": "RESP", "HR": "RESP", "OxStatus": "exclude",
               "EKG_Off": "exclude", "EEG1_Off": "exclude"}
# Philips Alice / Sleepware G3 EDF export
ALICE = {"EEG F3-A2": "BAS", "EEG F4-A1": "BAS", "EEG A1-A2": "BAS", "EEG C3-A2": "BAS", "EEG C4-A1": "BAS",
         "EEG O1-A2": "BAS", "EEG O2-A1": "BAS", "EOG LOC-A2": "BAS", "EOG ROC-A2": "BAS", "EMG Chin": "EMG",
         "Leg 1": "EMG", "Leg 2": "EMG", "ECG I": "EKG", "ECG II": "EKG", "Snore": "RESP", "Flow Patient": "RESP",
         "Effort THO": "RESP", "Effort ABD": "RESP", "SpO2": "RESP", "Body": "exclude", "PulseRate": "RESP"}
# Natus Embla / RemLogic EDF export (AASM derivations)
EMBLA = {"F4-M1": "BAS", "C4-M1": "BAS", "O2-M1": "BAS", "E1-M2": "BAS", "E2-M2": "BAS", "Chin1-Chin2": "EMG",
         "Leg L": "EMG", "Leg R": "EMG", "ECG": "EKG", "Nasal Pressure": "RESP", "Thermistor": "RESP",
         "Thorax": "RESP", "Abdomen": "RESP", "RIP Sum": "RESP", "SpO2": "RESP", "Pulse": "RESP",
         "Position": "exclude", "Activity": "exclude", "Light": "exclude"}
# Grass Comet (2009-) and Heritage (2000-2009) exports as the NSRR publishes them for the Wisconsin Sleep Cohort
# (wsc-documentation, montage-and-sampling-rate-information.md): every EDF label of both montages
GRASS = {"E1": "BAS", "E2": "BAS", "F3_M2": "BAS", "Fz_M2": "BAS", "Cz_M2": "BAS", "C3_M2": "BAS", "Pz_M2": "BAS",
         "O1_M2": "BAS", "cchin_l": "EMG", "chin": "EMG", "lleg_r": "EMG", "ECG": "EKG", "snore": "RESP",
         "flow": "RESP", "nasalflow": "RESP", "oralflow": "RESP", "nas_pres": "RESP", "thorax": "RESP",
         "abdomen": "RESP", "sum": "RESP", "position": "exclude", "spo2": "RESP"}
# ECG leads: a cart's 12 leads, PhysioNet's MIT-BIH ('MLII', 'V5'), DICOM code meanings
ECG_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6", "MLII", "ECG V5", "ECG III",
             *TWELVE_LEADS.values()]
# PhysioNet EEG Motor Movement/Imagery (EEGMMIDB) EDF labels: 10-10 names padded with dots
EEGMMIDB = ["Fc5.", "Fc3.", "Fc1.", "Fcz.", "Fc2.", "Fc4.", "Fc6.", "C5..", "C3..", "C1..", "Cz..", "C2..", "C4..",
            "C6..", "Cp5.", "Cp3.", "Cp1.", "Cpz.", "Cp2.", "Cp4.", "Cp6.", "Fp1.", "Fpz.", "Fp2.", "Af7.", "Af3.",
            "Afz.", "Af4.", "Af8.", "F7..", "F5..", "F3..", "F1..", "Fz..", "F2..", "F4..", "F6..", "F8..", "Ft7.",
            "Ft8.", "T7..", "T8..", "T9..", "T10.", "Tp7.", "Tp8.", "P7..", "P5..", "P3..", "P1..", "Pz..", "P2..",
            "P4..", "P6..", "P8..", "Po7.", "Po3.", "Poz.", "Po4.", "Po8.", "O1..", "Oz..", "O2..", "Iz.."]


def _outcomes(labels) -> dict[str, str | None]:
    return {label: default_table().resolve(label).modality for label in labels}


def test_nihon_kohden_referential_eeg_and_polygraph_labels():
    assert set(_outcomes(NIHON_KOHDEN_EEG).values()) == {"BAS"}
    assert _outcomes([s.replace("-Ref", "-Avg") for s in NIHON_KOHDEN_EEG[:3]]) == dict.fromkeys(
        [s.replace("-Ref", "-Avg") for s in NIHON_KOHDEN_EEG[:3]], "BAS")
    assert _outcomes(NIHON_KOHDEN_POL) == NIHON_KOHDEN_POL
    # generic inputs say nothing about the signal: left to the site
    assert _outcomes(["POL X1", "POL DC03", "POL E", "EEG X1-Ref", "EEG Mystery-Ref"]) == dict.fromkeys(
        ["POL X1", "POL DC03", "POL E", "EEG X1-Ref", "EEG Mystery-Ref"])


@pytest.mark.parametrize("family", [COMPUMEDICS, ALICE, EMBLA, GRASS], ids=["compumedics", "alice", "embla", "grass"])
def test_psg_vendor_exports(family):
    assert _outcomes(family) == family


def test_plain_modality_names_and_ecg_leads():
    assert _outcomes(["EOG", "EMG", "ECG", "EKG"]) == {"EOG": "BAS", "EMG": "EMG", "ECG": "EKG", "EKG": "EKG"}
    assert set(_outcomes(ECG_LEADS).values()) == {"EKG"}


def test_10_10_electrode_names():
    assert set(_outcomes(EEGMMIDB).values()) == {"BAS"}
    assert _outcomes(["I1", "I2", "Nz"]) == {"I1": None, "I2": None, "Nz": None}  # left out on purpose


def test_real_edfs_still_map(reference_files=REFERENCE):
    import pyedflib

    utf8 = Path(pyedflib.__file__).parent / "tests" / "data" / "test_utf8.edf"
    if utf8.exists():
        recording = read_edf(utf8)
        assert default_table().map_labels(recording.channel_labels).groups == {"BAS": [0]}  # 'Fp1'
    sleep_edf = reference_files / "real" / "short_psg.edf"
    if not sleep_edf.exists():
        pytest.skip("shared reference data not present")
    recording = read_edf(sleep_edf)
    assert all(code is None for code in recording.channel_codes)
    match = default_table().map_labels(recording.channel_labels, codes=recording.channel_codes)
    assert match.unmapped == [] and set(match.groups) == {"BAS", "RESP", "EMG"}
