"""Header quirks of field EDF/BDF files: each is read correctly or refused with the file and the field named."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pyedflib
import pytest
from test_edf_discontinuous import Sig, edf_bytes, ramp, record_tals

from gateway.readers.edf import read_edf
from gateway.readers.edf_discontinuous import read_raw_edf
from gateway.readers.edf_header import read_header
from gateway.readers.errors import ReaderError


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _read(path: Path) -> tuple:
    warnings: list[str] = []
    recording = read_edf(path, warnings=warnings)
    return recording, warnings


def _error(path: Path, *needles: str, kind: str = "corrupt") -> ReaderError:
    with pytest.raises(ReaderError) as info:
        read_edf(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    assert info.value.kind == kind
    return info.value


def _pyedflib_accepts(path: Path) -> bool:
    try:
        pyedflib.EdfReader(str(path)).close()
    except OSError:
        return False
    return True


# ---- labels --------------------------------------------------------------------------------------------------


def test_trailing_spaces_and_nul_padding_are_stripped(tmp_path):
    signals = [Sig("C3-M2   ", 4), Sig(b"O1-M2\x00\x00\x00", 4), Sig(" Fp1 ", 4)]
    path = _write(tmp_path, "spaces.edf", edf_bytes(signals, [ramp(2, 4)] * 3))
    recording, _ = _read(path)
    assert recording.channel_labels == ["C3-M2", "O1-M2", " Fp1"]


def test_vendor_prefixes_are_kept_as_recorded(tmp_path):
    signals = [Sig("EEG C3-A2", 4), Sig("EMG Chin", 4), Sig("ECG ECG1-ECG2", 4)]
    path = _write(tmp_path, "prefix.edf", edf_bytes(signals, [ramp(2, 4)] * 3))
    assert _pyedflib_accepts(path)
    recording, warnings = _read(path)
    assert recording.channel_labels == ["EEG C3-A2", "EMG Chin", "ECG ECG1-ECG2"]
    assert warnings == []


def test_non_ascii_bytes_are_decoded_not_refused(tmp_path):
    signals = [Sig(b"C3\xe9M2", 4, unit=b"\xb5V".decode("latin-1")),  # latin-1 bytes
               Sig("Température".encode(), 4, unit="°C")]  # UTF-8 bytes
    content = edf_bytes(signals, [ramp(2, 4), ramp(2, 4, 7)])
    content = content.replace(b"\xc2\xb0C", b"\xb0C ")  # the unit in latin-1 too: b"\xb0C"
    path = _write(tmp_path, "latin.edf", content)
    assert not _pyedflib_accepts(path)  # edflib refuses anything outside printable ASCII
    recording, _ = _read(path)
    assert recording.channel_labels == ["C3éM2", "Température"]
    assert [c.unit for c in recording.channels] == ["µV", "°C"]
    np.testing.assert_array_equal(recording.channels[1].read(), ramp(2, 4, 7).reshape(-1))
    assert recording.identifiers.patient_name == "Doe_Jane"


def test_non_ascii_patient_field(tmp_path):
    content = edf_bytes([Sig("A", 4)], [ramp(1, 4)], patient="MRN-7 M 02-MAR-1961 Jürgen_Ñoño".encode())
    recording, _ = _read(_write(tmp_path, "pat.edf", content))
    assert recording.identifiers.patient_name == "Jürgen_Ñoño" and recording.demographics.sex == "M"
    garbage = edf_bytes([Sig("A", 4)], [ramp(1, 4)], patient=bytes(range(128, 208)))
    recording, _ = _read(_write(tmp_path, "garbage.edf", garbage))
    assert recording.identifiers.patient_id is not None and recording.demographics.sex is None


def test_duplicate_labels_are_both_kept(tmp_path):
    signals = [Sig("C3-M2", 4), Sig("C3-M2", 4), Sig("SpO2", 1)]
    path = _write(tmp_path, "dup.edf", edf_bytes(signals, [ramp(3, 4), ramp(3, 4, 1000), ramp(3, 1, 5)]))
    assert _pyedflib_accepts(path)  # pyedflib path
    for recording in (read_edf(path), read_raw_edf(path)):
        assert recording.channel_labels == ["C3-M2", "C3-M2", "SpO2"]
        np.testing.assert_array_equal(recording.channels[0].read(), ramp(3, 4).reshape(-1))
        np.testing.assert_array_equal(recording.channels[1].read(), ramp(3, 4, 1000).reshape(-1))


# ---- ranges --------------------------------------------------------------------------------------------------


def test_physical_min_equal_max_is_a_constant_channel(tmp_path):
    signals = [Sig("C3-M2", 4, -500, 500), Sig("Marker", 4, 1, 1)]
    path = _write(tmp_path, "pminmax.edf", edf_bytes(signals, [ramp(2, 4), ramp(2, 4)]))
    assert not _pyedflib_accepts(path)
    recording, warnings = _read(path)
    marker = recording.channels[1]
    assert marker.label == "Marker" and marker.n_samples == 8
    np.testing.assert_array_equal(marker.read(), np.ones(8, np.float32))
    assert any("signal 2 ('Marker')" in w and "physical minimum equals physical maximum" in w for w in warnings)
    # the other channel is read normally
    scale = 1000 / 65535
    np.testing.assert_allclose(recording.channels[0].read(), (ramp(2, 4).reshape(-1) + 32768) * scale - 500,
                               rtol=1e-6, atol=1e-4)


def test_digital_min_equal_max_is_a_constant_channel(tmp_path):
    signals = [Sig("Pos", 2, -10, 10, 0, 0), Sig("C3-M2", 2)]
    path = _write(tmp_path, "dminmax.edf", edf_bytes(signals, [ramp(2, 2), ramp(2, 2)]))
    recording, warnings = _read(path)
    np.testing.assert_array_equal(recording.channels[0].read(), np.full(4, -10, np.float32))
    assert any("signal 1 ('Pos')" in w and "digital minimum equals digital maximum" in w for w in warnings)


def test_inverted_ranges_are_scaled_as_written(tmp_path):
    # physical max < min is legal EDF (inverted polarity); digital max < min is not, but is linear all the same
    signals = [Sig("Inv", 2, 100, -100, -100, 100), Sig("DInv", 2, -100, 100, 100, -100)]
    path = _write(tmp_path, "inv.edf", edf_bytes(signals, [ramp(1, 2, 10), ramp(1, 2, 10)]))
    recording, warnings = _read(path)
    np.testing.assert_allclose(recording.channels[0].read(), [-10, -11])
    np.testing.assert_allclose(recording.channels[1].read(), [-10, -11])
    assert any("digital maximum -100 is below the digital minimum 100" in w for w in warnings)


def test_numbers_with_nul_padding_comma_or_trailing_zero(tmp_path):
    content = edf_bytes([Sig("A", 4, "-3276,8", "3276.7", "-32768.0", 32767)], [ramp(1, 4)])
    content = content.replace(b"1       4   ", b"1\x00\x00\x00\x00\x00\x00\x004   ")  # record duration
    recording, _ = _read(_write(tmp_path, "numbers.edf", content))
    assert recording.channels[0].sampling_rate == 4.0
    np.testing.assert_allclose(recording.channels[0].read(), np.arange(4) * 0.1, atol=1e-4)


# ---- records and file size -----------------------------------------------------------------------------------


def _two_rates(n_records: int, **kwargs) -> bytes:
    return edf_bytes([Sig("Chin", 512), Sig("SpO2", 1, 0, 100, 0, 100, unit="%")],
                     [ramp(n_records, 512, -1000), ramp(n_records, 1, 90)], **kwargs)


def test_one_hertz_next_to_512_hertz(tmp_path):
    path = _write(tmp_path, "rates.edf", _two_rates(10))
    for recording in (read_edf(path), read_raw_edf(path)):
        assert [c.sampling_rate for c in recording.channels] == [512.0, 1.0]
        assert [c.n_samples for c in recording.channels] == [5120, 10]
        np.testing.assert_array_equal(recording.channels[1].read(), np.arange(90, 100, dtype=np.float32))
        assert recording.duration_s == 10.0


def test_truncated_last_record_is_dropped(tmp_path):
    content = _two_rates(10)
    path = _write(tmp_path, "trunc.edf", content[:-300])
    recording, warnings = _read(path)
    assert recording.duration_s == 9.0 and [c.n_samples for c in recording.channels] == [9 * 512, 9]
    np.testing.assert_array_equal(recording.channels[0].read(), ramp(9, 512, -1000).reshape(-1))
    assert any("declares 10 data records" in w and "9 complete" in w and "partial" in w for w in warnings)


def test_file_shorter_by_several_records(tmp_path):
    record = 513 * 2
    path = _write(tmp_path, "short.edf", _two_rates(10)[: 256 * 3 + 4 * record])
    recording, warnings = _read(path)
    assert recording.duration_s == 4.0
    assert any("declares 10" in w and "4 complete" in w for w in warnings)


def test_minus_one_records_is_derived_from_the_file_size(tmp_path):
    path = _write(tmp_path, "open.edf", _two_rates(6, n_records_field=-1))
    recording, warnings = _read(path)
    assert recording.duration_s == 6.0
    np.testing.assert_array_equal(recording.channels[1].read(), np.arange(90, 96, dtype=np.float32))
    assert any("-1 data records" in w and "6 complete" in w for w in warnings)
    cut = _write(tmp_path, "open_cut.edf", _two_rates(6, n_records_field=-1)[:-5])
    recording, warnings = _read(cut)
    assert recording.duration_s == 5.0 and any("partial" in w for w in warnings)


def test_trailing_bytes_after_the_declared_records_are_ignored(tmp_path):
    path = _write(tmp_path, "long.edf", _two_rates(4) + b"\x00" * 700)
    recording, warnings = _read(path)
    assert recording.duration_s == 4.0
    assert any("700 bytes after the 4 declared data records" in w for w in warnings)
    fewer = _write(tmp_path, "fewer.edf", _two_rates(4, n_records_field=3))
    recording, warnings = _read(fewer)
    assert recording.duration_s == 3.0 and any("1026 bytes after the 3" in w for w in warnings)


def test_signal_without_samples_is_skipped(tmp_path):
    content = edf_bytes([Sig("A", 4), Sig("Empty", 0), Sig("B", 2)], [ramp(2, 4), ramp(2, 0), ramp(2, 2)])
    recording, warnings = _read(_write(tmp_path, "empty_signal.edf", content))
    assert recording.channel_labels == ["A", "B"]
    np.testing.assert_array_equal(recording.channels[1].read(), ramp(2, 2).reshape(-1))
    assert any("signal 2 ('Empty') has 0 samples" in w for w in warnings)


# ---- annotation-only files -----------------------------------------------------------------------------------


def test_annotation_only_edf_plus(tmp_path):
    tals = [record_tals(0.0, (0.0, 30.0, "Sleep stage W"), (30.0, 60.0, "Sleep stage 2"))]
    path = _write(tmp_path, "hyp.edf", edf_bytes([], [], tals=tals, record_duration=0, annotation_spr=60))
    for recording in (read_edf(path), read_raw_edf(path)):
        assert recording.channels == [] and recording.format == "EDF+C"
        assert [(a.onset_s, a.duration_s, a.text) for a in recording.annotations] == [
            (0.0, 30.0, "Sleep stage W"), (30.0, 60.0, "Sleep stage 2")]


def test_zero_signal_plain_edf(tmp_path):
    path = _write(tmp_path, "nothing.edf", edf_bytes([], [], record_duration=30, n_records_field=1))
    recording, _ = _read(path)
    assert recording.channels == [] and recording.annotations == [] and recording.format == "EDF"
    # with 0 data records as well, the file holds nothing at all: refused like any 0-record file
    empty = _write(tmp_path, "empty.edf", edf_bytes([], [], record_duration=30))
    _error(empty, "0 data records in the header", kind="truncated")


def test_bdf_quirks_too(tmp_path):
    content = edf_bytes([Sig("EEG Fpz-Cz", 8, -8388608, 8388607, -8388608, 8388607), Sig("Flat", 8, 0, 0)],
                        [ramp(3, 8, -4_000_000), ramp(3, 8)], bdf=True)
    path = _write(tmp_path, "q.bdf", content[:-10])
    recording, warnings = _read(path)
    assert recording.format == "BDF" and recording.duration_s == 2.0
    np.testing.assert_array_equal(recording.channels[0].read(), ramp(2, 8, -4_000_000).reshape(-1))
    np.testing.assert_array_equal(recording.channels[1].read(), np.zeros(16, np.float32))
    assert len(warnings) == 2


# ---- start date ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "expected"), [
    (("01.01.24", "22.00.00"), datetime(2024, 1, 1, 22)),
    (("24.04.89", "16:13:00"), datetime(1989, 4, 24, 16, 13)),  # ':' separators
    (("01.01.84", "00.00.00"), datetime(2084, 1, 1)),  # the EDF clipping year
    (("00.00.00", "00.00.00"), None),  # anonymised: not a date
    (("        ", "        "), None),
])
def test_start_date(tmp_path, fields, expected):
    recording_field = "Startdate X X X X"
    content = edf_bytes([Sig("A", 2)], [ramp(1, 2)], start=fields, recording=recording_field)
    recording, warnings = _read(_write(tmp_path, "start.edf", content))
    assert recording.start == expected
    assert (expected is None) == any("start date" in w for w in warnings)


def test_edf_plus_four_digit_year_wins(tmp_path):
    content = edf_bytes([Sig("A", 2)], [ramp(1, 2)], start=("01.01.84", "00.00.00"),
                        recording="Startdate 01-JAN-1884 X X X")
    assert read_header(_write(tmp_path, "y.edf", content)).start == datetime(1884, 1, 1)


# ---- clear errors naming the field ---------------------------------------------------------------------------


@pytest.mark.parametrize(("signals", "kwargs", "needles"), [
    ([Sig("C3", 2, "abc")], {}, ["physical minimum of signal 1 ('C3')", "'abc'"]),
    ([Sig("A", 2), Sig("C4", 2, -1, "nan")], {}, ["physical maximum of signal 2 ('C4')"]),
    ([Sig("A", 2, dmax="1.5")], {}, ["digital maximum of signal 1 ('A')", "whole number"]),
    ([Sig("A", "x")], {}, ["number of samples per data record of signal 1 ('A')"]),
    ([Sig("A", 2)], {"record_duration": "one"}, ["duration of a data record"]),
    ([Sig("A", 2)], {"record_duration": 0}, ["duration of a data record is 0 s", "signal 1 ('A')"]),
    ([Sig("A", 2)], {"record_duration": -1}, ["duration of a data record is -1"]),
    ([Sig("A", 2)], {"record_duration": "0.000001"}, ["signal 1 ('A') would be sampled at 2e+06 Hz"]),
    ([Sig("A", 2)], {"n_records_field": "many"}, ["number of data records"]),
    ([Sig("A", 2)], {"n_records_field": -5}, ["number of data records is -5"]),
])
def test_bad_field_is_an_error_naming_it(tmp_path, signals, kwargs, needles):
    data = [ramp(1, s.spr) if isinstance(s.spr, int) else ramp(1, 2) for s in signals]
    path = _write(tmp_path, "bad.edf", edf_bytes(signals, data, **kwargs))
    _error(path, *needles)


def test_negative_samples_per_record(tmp_path):
    content = bytearray(edf_bytes([Sig("A", 2)], [ramp(1, 2)]))
    content[256 + 216: 256 + 224] = b"-2      "
    _error(_write(tmp_path, "neg.edf", bytes(content)), "number of samples per data record of signal 1 ('A') is -2")


def test_header_size_mismatch(tmp_path):
    content = bytearray(edf_bytes([Sig("A", 2)], [ramp(1, 2)]))
    content[184:192] = b"768     "
    _error(_write(tmp_path, "size.edf", bytes(content)), "header size field says 768", "need 512")


def test_errors_never_hold_identifiers_in_warnings(tmp_path):
    content = _two_rates(3, patient="MRN-7 F 02-MAR-1961 Doe_Jane", n_records_field=-1)
    warnings: list[str] = []
    read_edf(_write(tmp_path, "Doe_Jane_MRN-7.edf", content[:-3]), warnings=warnings)
    assert warnings
    for w in warnings:
        for secret in ("Doe", "MRN-7", "1961", "ACC-42"):
            assert secret not in w


def test_sub_second_start_is_the_same_on_both_paths(tmp_path):
    """The first record's time-stamp (+0.5 s) moves the start; annotations stay relative to it."""
    tals = [record_tals(0.5, (1.0, None, "Lights off")), record_tals(1.5), record_tals(2.5)]
    path = _write(tmp_path, "sub.edf", edf_bytes([Sig("A", 4)], [ramp(3, 4)], tals=tals))
    assert _pyedflib_accepts(path)
    for recording in (read_edf(path), read_raw_edf(path)):
        assert recording.start == datetime(2024, 1, 1, 22, 0, 0, 500000)
        assert [(a.onset_s, a.text) for a in recording.annotations] == [(0.5, "Lights off")]


def test_warnings_are_kept_on_the_recording_without_the_path(tmp_path):
    path = _write(tmp_path, "Doe_John_trunc.edf", _two_rates(10)[:-300])
    recording, warnings = _read(path)
    assert recording.warnings == warnings and warnings
    assert not any("Doe_John" in w or str(tmp_path) in w for w in recording.warnings)
