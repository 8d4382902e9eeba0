"""Issue 19: every DICOM object we generate passes David Clunie's dciodvfy (Debian's dicom3tools).

Skipped where dciodvfy is missing, unless PSG_REQUIRE_DICOM3TOOLS=1 (``make peers`` installs it).

dicom3tools (Debian 1.00~20220618, and the 2026-09 release) has no IOD definition for the Sleep EEG and
Multi-channel Respiratory waveform SOP classes: it reports only "Information Object Not found" for them.
Their modules (Patient, General Study, General Series, Synchronization, General Equipment, Waveform
Identification, Waveform, Acquisition Context, Waveform Annotation, SOP Common) are then checked on a copy
labelled General ECG, whose IOD has the same modules. Accepted warning: the private coding scheme ``99PSGGW``
of the synthetic channel sources (PS3.16 allows local "99" schemes; dciodvfy warns about any it does not know).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
from peers import system_tool

from gateway.readers.dicom_waveform import read_dicom_study
from gateway.synthetic.dicom_study import (
    GENERAL_ECG,
    WaveformChannel,
    WaveformGroup,
    make_waveform_dataset,
    write_psg_study,
    write_waveform_file,
)

NO_IOD = "Error - Information Object Not found"
ACCEPTED_WARNINGS = ("Warning - Unrecognized defined term <99PSGGW> for value 1 of attribute <Coding Scheme Designator>",)


def _report(path) -> list[str]:
    dciodvfy = system_tool("dciodvfy", env="PSG_REQUIRE_DICOM3TOOLS", package="dicom3tools")
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def _as_general_ecg(path, tmp_path):
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = GENERAL_ECG
    ds.Modality = "ECG"
    out = tmp_path / f"as-ecg-{path.name}"
    ds.save_as(out, enforce_file_format=True)
    return out


def _assert_clean(path, tmp_path):
    lines = _report(path)
    if lines == [NO_IOD]:  # no IOD in dicom3tools for this SOP class: check its modules as General ECG
        lines = _report(_as_general_ecg(path, tmp_path))
    assert [line for line in lines if line not in ACCEPTED_WARNINGS] == [], path.name


def test_synthetic_psg_study_is_conformant(tmp_path):
    files = write_psg_study(tmp_path / "study", hours=0.02, seed=3, operator="Scorer^Synthetic")
    assert sorted(f.name for f in files) == ["ecg.dcm", "eeg.dcm", "resp.dcm"]
    for path in files:
        _assert_clean(path, tmp_path)
    ecg = pydicom.dcmread(files[2])
    assert ecg.AcquisitionTimeSynchronized == "N" and "MultiplexGroupTimeOffset" not in ecg.WaveformSequence[0]
    assert "FrameOfReferenceUID" not in ecg and ecg.SynchronizationFrameOfReferenceUID


def _ecg_with_median_beat(tmp_path):
    t = np.arange(5000) / 500
    rhythm = WaveformGroup(500, [WaveformChannel("Lead II", np.sin(2 * np.pi * t), unit="mV")], label="RHYTHM")
    median = WaveformGroup(500, [WaveformChannel("Lead II", np.sin(2 * np.pi * t[:600]), unit="mV")],
                           label="MEDIAN BEAT", originality="DERIVED")
    return write_waveform_file(tmp_path / "median.dcm", make_waveform_dataset(GENERAL_ECG, [rhythm, median]))


def test_derived_group_object_is_conformant_and_its_skip_is_a_warning(tmp_path):
    path = _ecg_with_median_beat(tmp_path)
    _assert_clean(path, tmp_path)
    recording = read_dicom_study([path])
    assert [c.label for c in recording.channels] == ["Lead II"]
    assert len(recording.warnings) == 1
    warning = recording.warnings[0]
    assert "group 2 'MEDIAN BEAT' skipped" in warning and "DERIVED" in warning and "median beat" in warning


def test_demo_objects_are_conformant(tmp_path):
    """The demo and the benchmarks write through write_psg_study too: a short study with another seed."""
    for path in write_psg_study(tmp_path / "demo", hours=1 / 60, seed=11):
        _assert_clean(path, tmp_path)
