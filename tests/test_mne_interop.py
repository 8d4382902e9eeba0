"""MNE interoperability (issue 19, part 3): Recording.to_mne / Recording.from_mne and the optional MNE
reader behind read_recording, checked against MNE's own EDF reader and on files MNE reads for us."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

mne = pytest.importorskip("mne")

from gateway.interop.mne import GAP_DESCRIPTION
from gateway.montage.table import default_table
from gateway.pipeline.prepare import prepare_study
from gateway.readers import read_recording
from gateway.readers.errors import ReaderError
from gateway.recording import Annotation, Channel, Demographics, Recording
from gateway.synthetic.night import write_synthetic_night

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """Three minutes of the synthetic night: rates 1 to 512 Hz, uV, mV, % and cmH2O, two annotations."""
    return write_synthetic_night(tmp_path_factory.mktemp("mne") / "night.edf", hours=0.05, seed=3)


def _channel(rec: Recording, label: str) -> Channel:
    return next(c for c in rec.channels if c.label == label)


def test_to_mne_equals_mnes_own_read_of_the_edf(night):
    rec = read_recording(night)
    raw = rec.to_mne()
    assert raw.info["sfreq"] == rec.highest_rate == 512
    assert raw.ch_names == rec.channel_labels
    assert raw.n_times == round(rec.duration_s * 512)
    theirs = mne.io.read_raw_edf(night, preload=True, verbose="error")
    assert theirs.ch_names == raw.ch_names
    ours, ref = raw.get_data(), theirs.get_data()
    for row, label in enumerate(raw.ch_names):  # every channel, resampled ones included, in MNE's units
        scale = np.abs(ref[row]).max() or 1.0
        np.testing.assert_allclose(ours[row], ref[row], rtol=0, atol=2e-6 * scale, err_msg=label)
    # native-rate channels are our own samples, scaled to volts (float32 tolerance)
    chin = _channel(rec, "Chin1-Chin2").read()
    np.testing.assert_allclose(raw.get_data(picks=["Chin1-Chin2"])[0], chin * 1e-6, rtol=1e-6, atol=1e-12)
    ecg = _channel(rec, "ECG II").read()  # mV
    np.testing.assert_allclose(raw.get_data(picks=["ECG II"])[0], ecg * 1e-3, rtol=1e-6, atol=1e-12)
    # units and types: volts for voltages, the rest unscaled with MNE's unit "none"
    types = dict(zip(raw.ch_names, raw.get_channel_types(), strict=True))
    assert types["C3-M2"] == "eeg" and types["E1-M2"] == "eog" and types["Chin1-Chin2"] == "emg"
    assert types["ECG II"] == "ecg" and types["Airflow"] == "resp" and types["SpO2"] == "misc"
    units = {ch["ch_name"]: ch["unit"] for ch in raw.info["chs"]}
    assert units["C3-M2"] == 107 and units["SpO2"] == -1  # FIFF_UNIT_V, FIFF_UNIT_NONE
    spo2 = raw.get_data(picks=["SpO2"])[0]
    assert 50 < float(np.median(spo2)) <= 100  # percent, not scaled
    # annotations and time
    assert [a["description"] for a in raw.annotations] == [a.text for a in rec.annotations]
    np.testing.assert_allclose(raw.annotations.onset, [a.onset_s for a in rec.annotations])
    assert raw.info["meas_date"].replace(tzinfo=None) == rec.start


def test_from_mne_of_to_mne_round_trip(night):
    rec = read_recording(night)
    back = Recording.from_mne(rec.to_mne())
    assert back.channel_labels == rec.channel_labels
    assert {c.sampling_rate for c in back.channels} == {512.0}  # MNE holds one rate
    assert back.duration_s == pytest.approx(rec.duration_s)
    assert back.start == rec.start and back.demographics.sex == rec.demographics.sex
    assert [(a.onset_s, a.text) for a in back.annotations] == [(a.onset_s, a.text) for a in rec.annotations]
    units = {c.label: c.unit for c in back.channels}
    assert units["C3-M2"] == "uV" and units["ECG II"] == "uV" and units["SpO2"] == "%"
    assert units["Nasal Pressure"] == "cmH2O"
    np.testing.assert_allclose(_channel(back, "Chin1-Chin2").read(), _channel(rec, "Chin1-Chin2").read(),
                               rtol=1e-5, atol=1e-4)
    # 256 -> 512 Hz is trigonometric interpolation: every other sample is the channel's own
    c3 = _channel(rec, "C3-M2").read()
    np.testing.assert_allclose(_channel(back, "C3-M2").read()[::2], c3, rtol=0, atol=1e-4 * np.abs(c3).max())
    np.testing.assert_allclose(_channel(back, "ECG II").read(), _channel(rec, "ECG II").read() * 1e3,
                               rtol=1e-5, atol=1e-3)
    assert _channel(back, "C3-M2").read().dtype == np.float32


def test_round_trip_of_one_rate_keeps_samples_gaps_and_repeated_labels():
    rng = np.random.default_rng(0)
    valid = np.ones(100 * 60, dtype=bool)
    valid[1000:1500] = False
    x = rng.standard_normal((3, 6000)).astype(np.float32) * 50
    rec = Recording(
        channels=[Channel.from_array("C3-M2", 100, x[0], valid=valid),
                  Channel.from_array("C3-M2", 100, x[1]),
                  Channel.from_array("Pos", 100, x[2], unit="")],
        duration_s=60.0, start=datetime(2024, 3, 1, 23, 0, 5),
        demographics=Demographics(sex="F"),
        annotations=[Annotation(12.5, 30.0, "Sleep stage W"), Annotation(40.0, None, "Lights on")],
    )
    raw = rec.to_mne()
    assert raw.ch_names == ["C3-M2", "C3-M2-1", "Pos"]
    gaps = [a for a in raw.annotations if a["description"] == GAP_DESCRIPTION]
    assert len(gaps) == 1 and gaps[0]["ch_names"] == ("C3-M2",)
    assert gaps[0]["onset"] == pytest.approx(10.0) and gaps[0]["duration"] == pytest.approx(5.0)
    back = Recording.from_mne(raw)
    assert back.channel_labels == ["C3-M2", "C3-M2-1", "Pos"]
    for ours, theirs, row in zip(back.channels, rec.channels, x, strict=True):
        assert ours.sampling_rate == 100 and ours.n_samples == 6000
        np.testing.assert_allclose(ours.read(), row, rtol=1e-6, atol=1e-5)
        assert ours.unit == theirs.unit
    np.testing.assert_array_equal(back.channels[0].read_valid(), valid)
    assert not back.channels[1].has_gaps
    assert [a.text for a in back.annotations] == ["Sleep stage W", "Lights on"]
    assert back.annotations[1].duration_s is None
    assert back.start == rec.start and back.demographics.sex == "F"
    assert back.identifiers.patient_id is None  # identifiers only on request


def test_identifiers_go_to_mne_only_when_asked():
    rec = Recording([Channel.from_array("C3", 100, np.zeros(3000))], 30.0, start=datetime(2024, 1, 1, 22, 0),
                    demographics=Demographics(sex="M", birth_date=datetime(1960, 5, 4).date()))
    rec.identifiers.patient_id = "MRN-1"
    assert "his_id" not in (rec.to_mne().info["subject_info"] or {})
    back = Recording.from_mne(rec.to_mne(identifiers=True))
    assert back.identifiers.patient_id == "MRN-1" and back.demographics.sex == "M"
    assert back.demographics.birth_date == rec.demographics.birth_date


def _write_brainvision(stem: Path, labels: list[str], data_uv: np.ndarray, rate: float) -> Path:
    """A BrainVision triple (.vhdr/.vmrk/.eeg, IEEE float32, multiplexed) written by hand from the spec."""
    vhdr, vmrk, eeg = (stem.with_suffix(s) for s in (".vhdr", ".vmrk", ".eeg"))
    data_uv.T.astype("<f4").tofile(eeg)
    channels = "\n".join(f"Ch{i + 1}={label},,1,µV" for i, label in enumerate(labels))
    vhdr.write_text(
        "Brain Vision Data Exchange Header File Version 1.0\n\n[Common Infos]\nCodepage=UTF-8\n"
        f"DataFile={eeg.name}\nMarkerFile={vmrk.name}\nDataFormat=BINARY\nDataOrientation=MULTIPLEXED\n"
        f"NumberOfChannels={len(labels)}\nSamplingInterval={1e6 / rate:g}\n\n"
        "[Binary Infos]\nBinaryFormat=IEEE_FLOAT_32\n\n[Channel Infos]\n" + channels + "\n", encoding="utf-8")
    vmrk.write_text(
        "Brain Vision Data Exchange Marker File, Version 1.0\n\n[Common Infos]\nCodepage=UTF-8\n"
        f"DataFile={eeg.name}\n\n[Marker Infos]\nMk1=New Segment,,1,1,0,20240301230005000000\n"
        f"Mk2=Comment,Lights off,{int(5 * rate) + 1},1,0\n", encoding="utf-8")
    return vhdr


def test_brainvision_file_through_read_recording_and_prepare_study(tmp_path):
    labels = ["C3-M2", "E1-M2", "Chin1-Chin2", "ECG II", "Airflow"]
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((len(labels), 256 * 90)) * 30).astype(np.float32)
    vhdr = _write_brainvision(tmp_path / "night", labels, data, 256.0)
    rec = read_recording(vhdr)
    assert rec.format == "MNE:RawBrainVision" and rec.identifiers.source_path == vhdr
    assert rec.channel_labels == labels and rec.duration_s == pytest.approx(90.0)
    assert rec.start == datetime(2024, 3, 1, 23, 0, 5)
    assert [(a.onset_s, a.text) for a in rec.annotations if a.text.endswith("Lights off")] == [
        (pytest.approx(5.0), "Comment/Lights off")]
    for channel, row in zip(rec.channels, data, strict=True):
        assert channel.unit == "uV" and channel.sampling_rate == 256
        np.testing.assert_allclose(channel.read(), row, rtol=1e-5, atol=1e-4)
    ready = prepare_study(rec, default_table())
    assert sorted(ready.engine_input.signals) == ["BAS", "EKG", "EMG", "RESP"]
    assert all(block.shape[1] == 90 * 128 for block in ready.engine_input.signals.values())
    assert all(np.isfinite(block).all() for block in ready.engine_input.signals.values())


def test_fif_file_through_read_recording(tmp_path, night):
    rec = read_recording(night)
    path = tmp_path / "night_raw.fif"
    rec.to_mne().save(path, verbose="error")
    back = read_recording(path)
    assert back.format.startswith("MNE:") and back.channel_labels == rec.channel_labels
    np.testing.assert_allclose(_channel(back, "Chin1-Chin2").read(), _channel(rec, "Chin1-Chin2").read(),
                               rtol=1e-5, atol=1e-3)
    assert [a.text for a in back.annotations] == [a.text for a in rec.annotations]
    ready = prepare_study(back, default_table())
    assert "BAS" in ready.engine_input.signals


def test_without_mne_the_fallback_names_the_extra(tmp_path, monkeypatch):
    vhdr = _write_brainvision(tmp_path / "x", ["C3"], np.zeros((1, 2560), np.float32), 256.0)
    monkeypatch.setitem(sys.modules, "mne", None)  # import mne now raises ImportError
    with pytest.raises(ReaderError) as caught:
        read_recording(vhdr)
    assert caught.value.kind == "unsupported"
    assert caught.value.reason == "install psg-gateway[mne] to read .vhdr files"
    assert "\n" not in str(caught.value)
    rec = Recording([Channel.from_array("C3", 100, np.zeros(3000))], 30.0)
    with pytest.raises(ImportError, match=r"psg-gateway\[mne\]"):
        rec.to_mne()
    with pytest.raises(ReaderError, match="not an EDF"):  # an unknown suffix is still refused as before
        (tmp_path / "x.abc").write_bytes(b"junk")
        read_recording(tmp_path / "x.abc")


def test_the_gateway_reads_edf_without_mne(night):
    code = ("import sys; sys.modules['mne'] = None\n"
            "import gateway.readers, gateway.recording, gateway.interop.mne, gateway.readers.mne_reader\n"
            f"rec = gateway.readers.read_recording({str(night)!r}); assert rec.channels[0].read().size\n"
            "assert sys.modules['mne'] is None")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
