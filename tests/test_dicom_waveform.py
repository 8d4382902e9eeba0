"""DICOM waveform reader: calibration, gaps, multiplex groups, multi-instance studies, bad files, real test files."""

from __future__ import annotations

import shutil
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from gateway.montage.table import default_table
from gateway.readers import read_recording
from gateway.readers.dicom_waveform import (
    ACCEPTED_SOP_CLASSES,
    WAVEFORM_SOP_CLASSES,
    parse_patient_age,
    read_dicom_study,
    study_uid_of,
)
from gateway.readers.errors import ReaderError
from gateway.synthetic.dicom_study import (
    GENERAL_ECG,
    MULTICHANNEL_RESPIRATORY,
    SLEEP_EEG,
    SyntheticAnnotation,
    SyntheticPatient,
    WaveformChannel,
    WaveformGroup,
    make_waveform_dataset,
    write_psg_study,
    write_waveform_file,
)

T0 = datetime(2024, 3, 1, 22, 0, 0)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _write(folder: Path, name: str, groups, *, sop: str = SLEEP_EEG, acquisition: datetime = T0,
           study_uid: str | None = None, **kwargs) -> Path:
    ds = make_waveform_dataset(sop, groups, acquisition=acquisition, study_uid=study_uid or "1.2.3.4.5", **kwargs)
    return write_waveform_file(folder / name, ds)


def _eeg(seconds: float, rate: float = 256, labels=("C4-M1",), seed: int = 0, **kwargs) -> WaveformGroup:
    n = round(seconds * rate)
    rng = _rng(seed)
    return WaveformGroup(rate, [WaveformChannel(lb, rng.normal(0, 30, n)) for lb in labels], **kwargs)


def _by_label(recording):
    return {c.label: c for c in recording.channels}


# ---- one instance --------------------------------------------------------------------------------------------


def test_sop_class_table_is_complete_and_audio_refused():
    assert WAVEFORM_SOP_CLASSES[SLEEP_EEG].name == "Sleep Electroencephalogram Waveform Storage"
    assert "1.2.840.10008.5.1.4.1.1.9.1.4" in ACCEPTED_SOP_CLASSES  # General 32-bit ECG
    for audio in ("1.2.840.10008.5.1.4.1.1.9.4.1", "1.2.840.10008.5.1.4.1.1.9.4.2"):
        assert audio in WAVEFORM_SOP_CLASSES and audio not in ACCEPTED_SOP_CLASSES
    assert len(ACCEPTED_SOP_CLASSES) == 14


def test_single_instance_round_trip_within_calibration_step(tmp_path):
    rng = _rng(1)
    eeg = rng.normal(0, 40, 256 * 20)
    spo2 = 95 + rng.uniform(-2, 2, 20)
    path = _write(tmp_path, "a.dcm", [
        WaveformGroup(256, [WaveformChannel("F3-M2", eeg)]),
        WaveformGroup(1, [WaveformChannel("SpO2", spo2, unit="%", sensitivity=0.01)]),
    ])
    rec = read_dicom_study([path])
    assert rec.format == "DICOM" and rec.start == T0 and rec.duration_s == pytest.approx(20.0)
    chans = _by_label(rec)
    sens = float(dcmread(path).WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity)
    f3 = chans["F3-M2"].read()
    assert f3.dtype == np.float32 and f3.size == eeg.size and chans["F3-M2"].unit == "uV"
    assert np.max(np.abs(f3 - eeg)) <= sens / 2 + 1e-4
    assert chans["SpO2"].sampling_rate == 1.0 and chans["SpO2"].unit == "%"
    np.testing.assert_allclose(chans["SpO2"].read(), spo2, atol=0.005 + 1e-4)
    assert not chans["F3-M2"].has_gaps and not chans["SpO2"].has_gaps


def test_calibration_formula_raw_times_sensitivity_times_correction_plus_baseline(tmp_path):
    raw = np.array([-300, -1, 0, 1, 2, 1000, 32000], dtype=np.int16)
    sensitivity, correction, baseline = 0.5, 1.2, -10.0
    physical = raw * sensitivity * correction + baseline
    path = _write(tmp_path, "cal.dcm", [WaveformGroup(100, [WaveformChannel(
        "Thor", physical, unit="mV", sensitivity=sensitivity, correction=correction, baseline=baseline)])])
    ds = dcmread(path)
    stored = np.frombuffer(ds.WaveformSequence[0].WaveformData, dtype="<i2")
    np.testing.assert_array_equal(stored, raw)  # the writer stored exactly these raw values
    channel = read_dicom_study([path]).channels[0]
    np.testing.assert_allclose(channel.read(), physical.astype(np.float32), rtol=1e-6)
    assert channel.unit == "mV"
    # pydicom's own calibrated conversion uses the same formula
    np.testing.assert_allclose(ds.waveform_array(0)[:, 0], physical)


def test_without_sensitivity_raw_values_are_kept_without_unit(tmp_path):
    ds = make_waveform_dataset(SLEEP_EEG, [WaveformGroup(10, [WaveformChannel(
        "Pos", np.arange(10.0), sensitivity=1.0)])], study_uid="1.2.3")
    definition = ds.WaveformSequence[0].ChannelDefinitionSequence[0]
    for keyword in ("ChannelSensitivity", "ChannelSensitivityUnitsSequence", "ChannelSensitivityCorrectionFactor",
                    "ChannelBaseline"):
        delattr(definition, keyword)
    channel = read_dicom_study([write_waveform_file(tmp_path / "raw.dcm", ds)]).channels[0]
    np.testing.assert_array_equal(channel.read(), np.arange(10, dtype=np.float32))
    assert channel.unit == ""


@pytest.mark.parametrize(("bits", "signed"), [(8, False), (8, True), (16, False), (32, True)])
def test_sample_encodings_with_padding_become_gaps(tmp_path, bits, signed):
    n = 500
    x = np.linspace(-50.0, 50.0, n)
    gaps = np.zeros(n, dtype=bool)
    gaps[100:150] = True
    gaps[-5:] = True
    path = _write(tmp_path, "pad.dcm", [WaveformGroup(50, [WaveformChannel("E1-M2", x, gaps=gaps)],
                                                      bits_allocated=bits, signed=signed)])
    channel = read_dicom_study([path]).channels[0]
    assert channel.has_gaps and channel.n_samples == n
    valid = channel.read_valid()
    np.testing.assert_array_equal(valid, ~gaps)
    data = channel.read()
    assert np.all(data[gaps] == 0.0)
    step = float(dcmread(path).WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity)
    assert np.max(np.abs(data[~gaps] - x[~gaps])) <= step / 2 + 1e-4


def test_implicit_vr_little_endian_is_read(tmp_path):
    x = _rng(2).normal(0, 10, 300)
    gaps = np.zeros(300, bool)
    gaps[10:20] = True
    ds = make_waveform_dataset(SLEEP_EEG, [WaveformGroup(100, [WaveformChannel("O1-M2", x, gaps=gaps)])],
                               study_uid="1.2.3", transfer_syntax=ImplicitVRLittleEndian)
    channel = read_dicom_study([write_waveform_file(tmp_path / "ivr.dcm", ds)]).channels[0]
    np.testing.assert_array_equal(channel.read_valid(), ~gaps)
    assert np.max(np.abs(channel.read()[~gaps] - x[~gaps])) < 0.01


def test_multiple_groups_with_their_own_rates(tmp_path):
    path = _write(tmp_path, "groups.dcm", [
        _eeg(30, 256, ("F3-M2", "F4-M1")),
        _eeg(30, 512, ("Chin1-Chin2",)),
        _eeg(30, 32, ("Airflow", "Thor", "Abdo")),
    ])
    rec = read_dicom_study([path])
    assert rec.channel_labels == ["F3-M2", "F4-M1", "Chin1-Chin2", "Airflow", "Thor", "Abdo"]
    assert [c.sampling_rate for c in rec.channels] == [256, 256, 512, 32, 32, 32]
    assert [c.n_samples for c in rec.channels] == [7680, 7680, 15360, 960, 960, 960]
    assert rec.duration_s == pytest.approx(30.0)


def test_label_falls_back_to_channel_source_code_meaning(tmp_path):
    path = _write(tmp_path, "src.dcm", [WaveformGroup(100, [
        WaveformChannel("ignored", np.zeros(100), write_label=False, source_meaning="Lead II"),
        WaveformChannel("C3-M2", np.zeros(100)),
    ])])
    assert read_dicom_study([path]).channel_labels == ["Lead II", "C3-M2"]


def test_disconnected_channel_is_a_gap_throughout(tmp_path):
    path = _write(tmp_path, "status.dcm", [WaveformGroup(100, [
        WaveformChannel("LLeg", np.ones(100), status="DISCONNECTED"), WaveformChannel("RLeg", np.ones(100))])])
    chans = _by_label(read_dicom_study([path]))
    assert not chans["LLeg"].read_valid().any() and not chans["LLeg"].read().any()
    assert not chans["RLeg"].has_gaps


def test_annotations_points_and_segments(tmp_path):
    path = _write(tmp_path, "ann.dcm", [_eeg(1, 100), _eeg(120, 256, ("C4-M1",), time_offset_ms=2000)],
                  annotations=[SyntheticAnnotation("Lights off", 10.0, group=1),
                               SyntheticAnnotation("Sleep stage 2", 30.0, 30.0, group=1)])
    rec = read_dicom_study([path])
    assert [(a.text, a.onset_s, a.duration_s) for a in rec.annotations] == [
        ("Lights off", pytest.approx(12.0), None), ("Sleep stage 2", pytest.approx(32.0), pytest.approx(30.0))]


def test_identifiers_and_demographics_from_the_header(tmp_path):
    patient = SyntheticPatient(patient_id="SYN-42", issuer="SYN-ISSUER", name="Doe^Jane", sex="O",
                               birth_date=date(1980, 2, 29), age="044Y", accession="ACC-9")
    path = _write(tmp_path, "who.dcm", [_eeg(2)], patient=patient, study_uid="1.2.826.0.1.3680043.8.498.77")
    rec = read_dicom_study([path])
    ids = rec.identifiers
    assert (ids.patient_id, ids.patient_name, ids.admin_code) == ("SYN-42", "Doe^Jane", "ACC-9")
    assert ids.source_path == path
    assert rec.demographics.sex is None  # "O" is not a sex the model knows
    assert rec.demographics.birth_date == date(1980, 2, 29) and rec.demographics.age_years == 44.0
    assert study_uid_of([path]) == "1.2.826.0.1.3680043.8.498.77"
    if hasattr(ids, "study_uid"):
        assert ids.study_uid == "1.2.826.0.1.3680043.8.498.77"
    shown = repr(rec) + repr(ids) + repr(rec.demographics)
    assert "SYN-42" not in shown and "Doe" not in shown and "ACC-9" not in shown and "1980" not in shown


@pytest.mark.parametrize(("text", "years"), [
    ("045Y", 45.0), ("006M", 0.5), ("010W", 70 / 365.2425), ("003D", 3 / 365.2425), ("045y", 45.0),
    ("", None), (None, None), ("45", None), ("045X", None), ("ABCD", None),
])
def test_patient_age_parsing(text, years):
    got = parse_patient_age(text)
    assert got == (pytest.approx(years) if years is not None else None)


def test_content_date_time_is_the_fallback_reference_time(tmp_path):
    path = _write(tmp_path, "c.dcm", [_eeg(1)], acquisition=T0 + timedelta(microseconds=250000),
                  write_acquisition_datetime=False)
    assert read_dicom_study([path]).start == T0 + timedelta(microseconds=250000)


# ---- several instances ---------------------------------------------------------------------------------------


def test_instances_merge_on_a_common_timeline_aligned_to_the_sample(tmp_path):
    eeg = _write(tmp_path, "eeg.dcm", [_eeg(60, 256, ("C4-M1",), seed=1)], acquisition=T0)
    resp = _write(tmp_path, "resp.dcm", [_eeg(30, 32, ("Thor",), seed=2, time_offset_ms=500)],
                  sop=MULTICHANNEL_RESPIRATORY, acquisition=T0 + timedelta(seconds=2.5))  # starts at T0 + 3 s
    ecg = _write(tmp_path, "ecg.dcm", [_eeg(10, 512, ("ECG II",), seed=3)], sop=GENERAL_ECG,
                 acquisition=T0 - timedelta(seconds=1))  # the earliest: the recording starts here
    rec = read_dicom_study([eeg, resp, ecg])
    assert rec.start == T0 - timedelta(seconds=1)
    assert rec.duration_s == pytest.approx(61.0)
    chans = _by_label(rec)
    assert {c: chans[c].sampling_rate for c in chans} == {"C4-M1": 256, "Thor": 32, "ECG II": 512}

    c4, thor, ecg_ch = chans["C4-M1"], chans["Thor"], chans["ECG II"]
    assert (c4.n_samples, thor.n_samples, ecg_ch.n_samples) == (61 * 256, 61 * 32, 61 * 512)
    expected = {c4: (256, 60 * 256, eeg), thor: (4 * 32, 30 * 32, resp), ecg_ch: (0, 10 * 512, ecg)}
    for channel, (first, n, path) in expected.items():
        valid = channel.read_valid()
        assert valid is not None and channel.has_gaps
        assert not valid[:first].any() and valid[first : first + n].all() and not valid[first + n :].any()
        alone = read_dicom_study([path]).channels[0].read()
        np.testing.assert_array_equal(channel.read()[first : first + n], alone)
        assert not channel.read()[~valid].any()


def test_consecutive_instances_are_concatenated_with_a_gap(tmp_path):
    first = _write(tmp_path, "part1.dcm", [_eeg(60, 256, ("C3-M2", "E1-M2"), seed=1)], acquisition=T0,
                   instance_number=1)
    second = _write(tmp_path, "part2.dcm", [_eeg(50, 256, ("C3-M2", "E1-M2"), seed=2)],
                    acquisition=T0 + timedelta(seconds=70), instance_number=2)
    rec = read_dicom_study([second, first])  # order of the files does not matter
    assert rec.channel_labels == ["C3-M2", "E1-M2"] or rec.channel_labels == ["C3-M2", "E1-M2"][::-1]
    assert rec.start == T0 and rec.duration_s == pytest.approx(120.0)
    c3 = _by_label(rec)["C3-M2"]
    assert c3.n_samples == 120 * 256
    valid = c3.read_valid()
    assert valid[: 60 * 256].all() and not valid[60 * 256 : 70 * 256].any() and valid[70 * 256 :].all()
    data = c3.read()
    np.testing.assert_array_equal(data[: 60 * 256], read_dicom_study([first]).channels[0].read())
    np.testing.assert_array_equal(data[70 * 256 :], read_dicom_study([second]).channels[0].read())


def test_instances_meeting_within_a_millisecond_join_without_gap(tmp_path):
    first = _write(tmp_path, "p1.dcm", [_eeg(10, 512, ("Chin1-Chin2",))], acquisition=T0)
    second = _write(tmp_path, "p2.dcm", [_eeg(10, 512, ("Chin1-Chin2",), seed=5)],
                    acquisition=T0 + timedelta(seconds=9.9996))  # timestamp rounded down by the sender
    channel = read_dicom_study([first, second]).channels[0]
    assert channel.n_samples == 20 * 512 and not channel.has_gaps


def test_overlapping_instances_of_the_same_channel_are_refused(tmp_path):
    first = _write(tmp_path, "night-a.dcm", [_eeg(60)], acquisition=T0)
    second = _write(tmp_path, "night-b.dcm", [_eeg(60, seed=1)], acquisition=T0 + timedelta(seconds=30))
    with pytest.raises(ReaderError) as info:
        read_dicom_study([first, second])
    assert "night-a.dcm" in str(info.value) and "night-b.dcm" in str(info.value)
    assert "overlaps" in str(info.value)


def test_same_label_at_another_rate_in_another_instance_is_refused(tmp_path):
    first = _write(tmp_path, "r1.dcm", [_eeg(10, 256)], acquisition=T0)
    second = _write(tmp_path, "r2.dcm", [_eeg(10, 200)], acquisition=T0 + timedelta(seconds=10))
    with pytest.raises(ReaderError, match="r1.dcm"):
        read_dicom_study([first, second])


def test_instances_of_different_studies_are_refused(tmp_path):
    first = _write(tmp_path, "s1.dcm", [_eeg(5)], study_uid="1.2.3.1")
    second = _write(tmp_path, "s2.dcm", [_eeg(5, 32, ("Thor",))], study_uid="1.2.3.2")
    with pytest.raises(ReaderError, match="another study") as info:
        read_dicom_study([first, second])
    assert "s1.dcm" in str(info.value) and "s2.dcm" in str(info.value)
    with pytest.raises(ReaderError, match="another study"):
        study_uid_of([first, second])


def test_the_same_instance_twice_is_read_once(tmp_path):
    path = _write(tmp_path, "x.dcm", [_eeg(5)], instance_uid="1.2.3.99")
    copy = tmp_path / "copy" / "x.dcm"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    rec = read_dicom_study([path, copy])
    assert rec.channel_labels == ["C4-M1"] and not rec.channels[0].has_gaps


def test_time_zone_offsets_are_honoured_across_instances(tmp_path):
    first = _write(tmp_path, "tz1.dcm", [_eeg(10)])
    second = _write(tmp_path, "tz2.dcm", [_eeg(10, 32, ("Thor",))])
    for path, stamp in ((first, "20240301220000+0100"), (second, "20240301210005+0000")):
        ds = dcmread(path)
        ds.AcquisitionDateTime = stamp
        ds.save_as(path)
    rec = read_dicom_study([first, second])
    assert rec.start == T0
    valid = _by_label(rec)["Thor"].read_valid()
    assert not valid[: 5 * 32].any() and valid[5 * 32 : 15 * 32].all()


# ---- bad input -----------------------------------------------------------------------------------------------


def _ct_image(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.Modality = "CT"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_unsupported_sop_class_names_file_and_class(tmp_path):
    ct = _ct_image(tmp_path / "ct.dcm")
    with pytest.raises(ReaderError) as info:
        read_dicom_study([ct])
    assert info.value.kind == "unsupported"
    assert "ct.dcm" in str(info.value) and "CT Image Storage" in str(info.value)
    audio = _write(tmp_path, "audio.dcm", [_eeg(1, 8000, ("Mic",))], sop="1.2.840.10008.5.1.4.1.1.9.4.2")
    with pytest.raises(ReaderError, match="General Audio") as info:
        read_dicom_study([audio])
    assert info.value.kind == "unsupported"
    eeg = _write(tmp_path, "eeg.dcm", [_eeg(2)])
    assert read_dicom_study([ct, audio, eeg], ignore_unsupported=True).channel_labels == ["C4-M1"]


def test_malformed_files_raise_reader_errors_naming_the_file(tmp_path):
    good = _write(tmp_path, "good.dcm", [_eeg(20, 256, ("C4-M1", "O2-M1"))])
    blob = good.read_bytes()
    cases: dict[str, bytes] = {
        "truncated.dcm": blob[: len(blob) // 2],
        "header_only.dcm": blob[:150],
        "garbage.dcm": b"\0" * 128 + b"DICM" + _rng(3).bytes(4000),
        "not_dicom.dcm": b"0       " + b"x" * 300,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ReaderError) as info:
            read_dicom_study([tmp_path / name])
        assert name in str(info.value), str(info.value)
    with pytest.raises(ReaderError) as info:
        read_dicom_study([tmp_path / "truncated.dcm"])
    assert info.value.kind == "truncated"
    with pytest.raises(ReaderError) as info:
        read_dicom_study([tmp_path / "missing.dcm"])
    assert info.value.kind == "not_found"


def _mutated(tmp_path: Path, name: str, change) -> Path:
    ds = make_waveform_dataset(SLEEP_EEG, [_eeg(5, 100, ("C4-M1", "O2-M1"))], study_uid="1.2.3")
    change(ds)
    return write_waveform_file(tmp_path / name, ds)


@pytest.mark.parametrize(("name", "change", "message"), [
    ("no_sequence.dcm", lambda ds: delattr(ds, "WaveformSequence"), "no Waveform Sequence"),
    ("count.dcm", lambda ds: setattr(ds.WaveformSequence[0], "NumberOfWaveformChannels", 3),
     "Channel Definition Sequence has 2"),
    ("length.dcm", lambda ds: setattr(ds.WaveformSequence[0], "WaveformData",
                                      ds.WaveformSequence[0].WaveformData + b"\0\0\0\0"), "expected"),
    ("short.dcm", lambda ds: setattr(ds.WaveformSequence[0], "NumberOfWaveformSamples", 600), "truncated"),
    ("rate.dcm", lambda ds: setattr(ds.WaveformSequence[0], "SamplingFrequency", "0"), "Sampling Frequency"),
    ("bits.dcm", lambda ds: setattr(ds.WaveformSequence[0], "WaveformSampleInterpretation", "MB"),
     "not supported"),
    ("nodata.dcm", lambda ds: delattr(ds.WaveformSequence[0], "WaveformData"), "missing WaveformData"),
])
def test_inconsistent_waveform_module_is_reported(tmp_path, name, change, message):
    path = _mutated(tmp_path, name, change)
    with pytest.raises(ReaderError, match=message) as info:
        read_dicom_study([path])
    assert name in str(info.value)


# ---- real files and the whole path ---------------------------------------------------------------------------


def _pydicom_test_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom no longer ships its test file {name}"
    return path


def test_pydicom_waveform_ecg_test_file():
    path = _pydicom_test_file("waveform_ecg.dcm")
    rec = read_dicom_study([path])
    # the RHYTHM group; the DERIVED median beat group repeating the same leads is a template and skipped
    assert len(rec.channels) == 12 and rec.channel_labels[:2] == ["Lead I (Einthoven)", "Lead II"]
    assert all(c.sampling_rate == 1000 and c.n_samples == 10000 and c.unit == "uV" for c in rec.channels)
    assert rec.start == datetime(2013, 1, 25, 10, 59, 19) and rec.duration_s == pytest.approx(10.0)
    assert rec.demographics.sex == "F" and rec.demographics.birth_date == date(1971, 1, 23)
    expected = dcmread(path).waveform_array(0)  # pydicom's calibrated values
    for c, channel in enumerate(rec.channels):
        np.testing.assert_allclose(channel.read(), expected[:, c].astype(np.float32), rtol=1e-6)
    texts = {a.text for a in rec.annotations}
    assert "QRS Onset" in texts and all(0 <= a.onset_s <= 10 for a in rec.annotations)
    assert default_table().map_labels(["ECG II"]).groups == {"EKG": [0]}


def test_read_recording_merges_a_synthetic_psg_study_folder(tmp_path):
    files = write_psg_study(tmp_path / "study", hours=0.02, seed=3)
    assert [f.name for f in files] == ["eeg.dcm", "resp.dcm", "ecg.dcm"]
    assert {str(dcmread(f).SOPClassUID) for f in files} == {SLEEP_EEG, MULTICHANNEL_RESPIRATORY, GENERAL_ECG}
    rec = read_recording(tmp_path / "study")
    assert rec.format == "DICOM" and rec.duration_s == pytest.approx(72.0)
    rates = {c.label: c.sampling_rate for c in rec.channels}
    assert rates["F3-M2"] == 256 and rates["Chin1-Chin2"] == 512 and rates["Airflow"] == 32
    assert rates["SpO2"] == 1 and rates["ECG II"] == 512 and len(rates) == 16
    assert not any(c.has_gaps for c in rec.channels)
    assert rec.identifiers.patient_id == "SYN-0003" and rec.demographics.sex in ("M", "F")
    assert [a.text for a in rec.annotations] == ["Lights off", "Lights on"]
    match = default_table().map_labels(rec.channel_labels)
    assert set(match.groups) == {"BAS", "RESP", "EKG", "EMG"} and not match.unmapped
    assert len(match.groups["BAS"]) == 8 and len(match.groups["RESP"]) == 4
    # one file through read_recording too
    single = read_recording(files[2])
    assert single.channel_labels == ["ECG II"] and single.channels[0].unit == "mV"
    # the same seed writes the same signals
    again = write_psg_study(tmp_path / "again", hours=0.02, seed=3)
    assert dcmread(again[1]).WaveformSequence[0].WaveformData == dcmread(files[1]).WaveformSequence[0].WaveformData


def test_study_folder_skips_non_waveform_objects_but_a_single_one_is_refused(tmp_path):
    files = write_psg_study(tmp_path / "study", hours=0.01, seed=4)
    ct = _ct_image(tmp_path / "study" / "scout.dcm")
    rec = read_recording(tmp_path / "study")
    assert len(rec.channels) == 16
    assert rec.identifiers.study_uid and rec.identifiers.study_uid in repr(dcmread(files[0]).StudyInstanceUID)
    assert rec.identifiers.study_uid not in repr(rec.identifiers)
    with pytest.raises(ReaderError, match="CT Image Storage"):
        read_recording(ct)
