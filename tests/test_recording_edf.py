"""Recording type, EDF/BDF reader and the synthetic night generator."""

from __future__ import annotations

import pickle
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pyedflib
import pytest

from gateway.readers.edf import read_edf
from gateway.readers.errors import ReaderError
from gateway.recording import Annotation, Channel, Demographics, Identifiers, Recording
from gateway.synthetic.night import DEFAULT_BENCH_CHANNELS, SyntheticChannel, write_synthetic_night

SLEEP_EDF_LABELS = ["EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "Resp oro-nasal", "EMG submental",
                    "Temp rectal", "Event marker"]


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """A 6-minute synthetic night (EDF+), same channels as the benchmark night."""
    return write_synthetic_night(tmp_path_factory.mktemp("night") / "night.edf", hours=0.1, seed=1)


@pytest.fixture(scope="module")
def night_bdf(tmp_path_factory) -> Path:
    return write_synthetic_night(tmp_path_factory.mktemp("night") / "night.bdf", hours=0.05, seed=2)


def _pyedflib_physical(path: Path) -> list[np.ndarray]:
    reader = pyedflib.EdfReader(str(path))
    try:
        return [reader.readSignal(i) for i in range(reader.signals_in_file)]
    finally:
        reader.close()


def _assert_matches_pyedflib(path: Path, sample_reader: str) -> Recording:
    expected = _pyedflib_physical(path)
    recording = read_edf(path, sample_reader=sample_reader)
    assert len(recording.channels) == len(expected)
    for channel, ref in zip(recording.channels, expected, strict=True):
        got = channel.read()
        assert got.dtype == np.float32 and got.shape == ref.shape == (channel.n_samples,)
        # same formula, float64 arithmetic, cast once: identical to pyedflib's values at float32
        np.testing.assert_array_equal(got, ref.astype(np.float32), err_msg=channel.label)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(initial=1.0))
    return recording


# ---- synthetic night ----------------------------------------------------------------------------------------


def test_synthetic_night_is_deterministic(tmp_path):
    a = write_synthetic_night(tmp_path / "a.edf", hours=0.02, seed=7)
    b = write_synthetic_night(tmp_path / "b.edf", hours=0.02, seed=7)
    c = write_synthetic_night(tmp_path / "c.edf", hours=0.02, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_synthetic_night_layout(night):
    reader = pyedflib.EdfReader(str(night))
    try:
        assert reader.datarecord_duration == 1.0
        assert reader.getFileDuration() == 360
        assert reader.getSignalLabels() == [c.label for c in DEFAULT_BENCH_CHANNELS]
        for i, spec in enumerate(DEFAULT_BENCH_CHANNELS):
            x = reader.readSignal(i)
            assert reader.getSampleFrequency(i) == spec.rate
            assert spec.physical_min <= x.min() and x.max() <= spec.physical_max, spec.label
            assert x.std() > 0, spec.label
    finally:
        reader.close()


def test_synthetic_night_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown kind"):
        write_synthetic_night(tmp_path / "x.edf", hours=0.01, channels=[SyntheticChannel("X", 100, "nope")])
    with pytest.raises(ValueError, match="at least one second"):
        write_synthetic_night(tmp_path / "x.edf", hours=0.0)


# ---- reading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_reader", ["numpy", "pyedflib"])
def test_physical_values_equal_pyedflib_edf(night, sample_reader):
    recording = _assert_matches_pyedflib(night, sample_reader)
    assert recording.format == "EDF+C"


@pytest.mark.parametrize("sample_reader", ["numpy", "pyedflib"])
def test_physical_values_equal_pyedflib_bdf(night_bdf, sample_reader):
    recording = _assert_matches_pyedflib(night_bdf, sample_reader)
    assert recording.format == "BDF+C"


def test_labels_rates_units(night):
    recording = read_edf(night)
    assert recording.channel_labels == [c.label for c in DEFAULT_BENCH_CHANNELS]
    assert [c.sampling_rate for c in recording.channels] == [float(c.rate) for c in DEFAULT_BENCH_CHANNELS]
    assert [c.unit for c in recording.channels] == [c.unit for c in DEFAULT_BENCH_CHANNELS]
    assert [c.n_samples for c in recording.channels] == [c.rate * 360 for c in DEFAULT_BENCH_CHANNELS]
    assert recording.duration_s == 360.0
    assert all(c.duration_s == 360.0 for c in recording.channels)
    assert [a.text for a in recording.annotations] == ["Lights off", "Lights on"]
    assert recording.annotations[0] == Annotation(60.0, None, "Lights off")


def test_read_streams_and_is_not_cached(night):
    channel = read_edf(night).channels[0]
    first = channel.read()
    first[:] = 0.0  # the caller owns what it gets
    second = channel.read()
    assert second is not first
    assert np.any(second != 0.0)
    np.testing.assert_array_equal(second, channel.read())
    assert not any(isinstance(v, np.ndarray) for v in vars(channel).values())  # nothing held


def test_demographics_and_identifiers_from_synthetic_header(night):
    recording = read_edf(night)
    ids, demo = recording.identifiers, recording.demographics
    assert ids.patient_id == "SYN-0001"
    assert ids.patient_name == "Synthetic"
    assert ids.admin_code == "SYNADM-0001"
    assert ids.source_path == night
    assert demo.sex in ("M", "F")
    assert isinstance(demo.birth_date, date)
    assert isinstance(recording.start, datetime)
    expected_age = (recording.start.date() - demo.birth_date).days / 365.2425
    assert recording.age_years == pytest.approx(expected_age)
    assert 30 < recording.age_years < 80
    # pyedflib agrees on what it parses
    header = pyedflib.EdfReader(str(night))
    try:
        assert header.getPatientCode() == ids.patient_id
        assert header.getSex()[0] == demo.sex
        assert header.getBirthdate(string=False).date() == demo.birth_date
        assert header.getStartdatetime() == recording.start
    finally:
        header.close()


def test_phi_is_not_in_repr(night):
    recording = read_edf(night)
    shown = " ".join([repr(recording), str(recording), repr(recording.identifiers), str(recording.demographics),
                      repr(recording.demographics), repr(recording.channels[0]), repr(recording.annotations[:0])])
    birth = recording.demographics.birth_date
    for secret in ("SYN-0001", "Synthetic", "SYNADM-0001", str(night), night.name, birth.isoformat(),
                   birth.strftime("%d-%b-%Y").upper(), str(birth.year)):
        assert secret not in shown, secret
    assert "EDF+C" in repr(recording) and "channels=18" in repr(recording)


def test_sleep_edf_excerpt(reference_dir):
    for name, fmt in (("short_psg.edf", "EDF"), ("short_psg.bdf", "BDF")):
        path = reference_dir / "real" / name
        recording = _assert_matches_pyedflib(path, "numpy")
        assert recording.format == fmt
        assert recording.channel_labels == SLEEP_EDF_LABELS
        assert [c.sampling_rate for c in recording.channels] == [100.0] * 3 + [1.0] * 4
        assert recording.channels[0].unit == "uV" and recording.channels[5].unit == "DegC"
        assert recording.duration_s == 300.0
        assert recording.start == datetime(1989, 4, 24, 16, 13)
        # plain EDF, but the patient field uses the EDF+ layout: "X F X Female_33yr"
        assert recording.demographics.sex == "F"
        assert recording.demographics.birth_date is None and recording.age_years is None
        assert recording.identifiers.patient_id is None
        assert recording.annotations == []
        eeg = recording.channels[0].read()
        assert eeg.size == 30000 and 1.0 < float(eeg.std()) < 500.0


def test_annotation_only_hypnogram(reference_dir):
    recording = read_edf(reference_dir / "real" / "SC4001EC-Hypnogram.edf")
    assert recording.channels == [] and recording.channel_labels == []
    assert len(recording.annotations) == 154
    assert recording.annotations[0] == Annotation(0.0, 30630.0, "Sleep stage W")
    assert {a.text for a in recording.annotations} >= {"Sleep stage W", "Sleep stage 1", "Sleep stage 2"}
    assert recording.demographics.sex == "F"


# ---- errors -------------------------------------------------------------------------------------------------


def _reader_error(path: Path, kind: str) -> ReaderError:
    with pytest.raises(ReaderError) as info:
        read_edf(path)
    error = info.value
    assert not isinstance(error, OSError)
    assert str(path) in str(error)
    assert error.path == Path(path)
    assert error.kind == kind, str(error)
    return error


def test_error_nonexistent(tmp_path):
    error = _reader_error(tmp_path / "missing.edf", "not_found")
    assert "not found" in str(error)


def test_error_random_bytes(tmp_path):
    path = tmp_path / "random.edf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert "not an EDF or BDF file" in str(_reader_error(path, "not_edf"))


def test_error_other_format(tmp_path):
    path = tmp_path / "notes.edf"
    path.write_text("patient notes, not a recording\n" * 20)
    _reader_error(path, "not_edf")


def test_error_empty_and_directory(tmp_path):
    (tmp_path / "empty.edf").write_bytes(b"")
    assert "empty" in str(_reader_error(tmp_path / "empty.edf", "truncated"))
    (tmp_path / "dir.edf").mkdir()
    assert "is a folder, not a file" in str(_reader_error(tmp_path / "dir.edf", "unreadable"))


@pytest.mark.parametrize("case", ["missing", "folder", "unreadable"])
def test_both_readers_report_the_same_os_error_the_same_way(tmp_path, case):
    """One mapping of OSError to ReaderError (readers.errors.os_error): an EDF and a DICOM file that
    cannot be opened for the same reason give the same kind and reason, without the path in the reason."""
    import os

    from gateway.readers.dicom_waveform import read_dicom_study

    if case == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file")
    errors = []
    for name, read in (("patient-DOE.edf", read_edf), ("patient-DOE.dcm", lambda p: read_dicom_study([p]))):
        path = tmp_path / name
        if case == "folder":
            path.mkdir()
        elif case == "unreadable":
            path.write_bytes(b"\0" * 512)
            path.chmod(0)
        with pytest.raises(ReaderError) as info:
            read(path)
        errors.append(info.value)
    edf, dicom = errors
    assert edf.kind == dicom.kind == ("not_found" if case == "missing" else "unreadable")
    assert edf.reason == dicom.reason and "DOE" not in edf.reason


def test_error_truncated(night, tmp_path):
    data = night.read_bytes()
    header_only = tmp_path / "header_only.edf"
    header_only.write_bytes(data[:600])
    assert "header" in str(_reader_error(header_only, "truncated"))
    tiny = tmp_path / "tiny.edf"
    tiny.write_bytes(data[:100])
    _reader_error(tiny, "truncated")
    header_bytes = 256 * (len(DEFAULT_BENCH_CHANNELS) + 2)  # + the annotation signal
    no_record = tmp_path / "no_record.edf"
    no_record.write_bytes(data[: header_bytes + 100])
    assert "not one complete data record" in str(_reader_error(no_record, "truncated"))


def _header_only(source: Path, dest: Path, records: bytes, reserved: bytes | None = None) -> Path:
    """``source``'s header alone (no data record), its number-of-records field set to ``records``."""
    data = bytearray(source.read_bytes())
    header_bytes = int(data[184:192])
    data[236:244] = records.ljust(8)
    if reserved is not None:
        data[192:192 + len(reserved)] = reserved
    dest.write_bytes(bytes(data[:header_bytes]))
    return dest


@pytest.mark.parametrize("fixture", ["night", "night_bdf"])
def test_zero_data_records_is_a_reader_error(fixture, request, tmp_path):
    """A header that declares 0 data records holds no sample: refused by the reader (both parsers),
    not passed on as a 0-second recording that fails later in preprocessing."""
    from gateway.readers.edf_discontinuous import read_raw_edf

    source = request.getfixturevalue(fixture)
    zero = _header_only(source, tmp_path / f"zero{source.suffix}", b"0")
    error = _reader_error(zero, "truncated")
    assert error.reason == "0 data records in the header: the recording holds no samples"
    with pytest.raises(ReaderError, match="0 data records in the header"):
        read_raw_edf(zero)
    # the same with bytes after the header: the header, not the file size, says there is no record
    trailing = tmp_path / f"trailing{source.suffix}"
    trailing.write_bytes(zero.read_bytes() + b"\x00" * 4096)
    assert _reader_error(trailing, "truncated").reason.startswith("0 data records in the header")


def test_minus_one_records_and_no_data_is_a_reader_error(night, tmp_path):
    """-1 records (never closed) and nothing after the header: 0 records, said as such."""
    error = _reader_error(_header_only(night, tmp_path / "open.edf", b"-1"), "truncated")
    assert error.reason.startswith("0 data records: the header gives -1 (recording not closed)")
    assert "0 bytes after the header" in error.reason


def test_discontinuous_file_without_records_is_a_reader_error(night, tmp_path):
    path = _header_only(night, tmp_path / "disc.edf", b"0", reserved=b"EDF+D")
    assert _reader_error(path, "truncated").reason.startswith("0 data records in the header")


def test_truncated_file_reads_its_complete_records(night, tmp_path):
    """A file cut short (copy interrupted, disk full) keeps its complete records, with a warning."""
    data = night.read_bytes()
    cut = tmp_path / "cut.edf"
    cut.write_bytes(data[: len(data) // 2])
    warnings: list[str] = []
    recording = read_edf(cut, warnings=warnings)
    record_bytes = (len(data) - 256 * (len(DEFAULT_BENCH_CHANNELS) + 2)) // 360
    complete = (len(data) // 2 - 256 * (len(DEFAULT_BENCH_CHANNELS) + 2)) // record_bytes
    assert recording.duration_s == complete
    assert recording.channels[0].n_samples == 256 * complete
    full = read_edf(night).channels[0].read()
    np.testing.assert_array_equal(recording.channels[0].read(), full[: 256 * complete])
    assert any("truncated" in w and "360 data records" in w and f"{complete} complete" in w for w in warnings)
    assert not any(str(cut) in w or "SYN-0001" in w for w in warnings)  # no path, no identifiers


def test_invalid_start_date_reads_without_start(night, tmp_path):
    data = bytearray(night.read_bytes())
    data[168:176] = b"99.99.99"  # an impossible start date: pyedflib refuses the file
    bad = tmp_path / "baddate.edf"
    bad.write_bytes(bytes(data))
    warnings: list[str] = []
    recording = read_edf(bad, warnings=warnings)
    assert recording.start is None and recording.age_years is None
    assert recording.duration_s == 360.0 and len(recording.channels) == 18
    assert any("start date" in w and "99.99.99" in w for w in warnings)


def test_pyedflib_rejection_falls_back_to_the_raw_reader(night, tmp_path):
    data = bytearray(night.read_bytes())
    data[8:88] = b"SYN-0001 Q 01-JAN-1970 Name".ljust(80)  # EDF+ patient field with an invalid sex subfield
    odd = tmp_path / "odd.edf"
    odd.write_bytes(bytes(data))
    warnings: list[str] = []
    recording = read_edf(odd, warnings=warnings)
    assert any("pyedflib refused" in w and "raw EDF parser" in w for w in warnings)
    assert recording.format == "EDF+C" and len(recording.channels) == 18
    # Still the EDF+ layout (a valid birth date after a one-word sex subfield): the code is the id, the
    # unknown sex code is flagged (identifier_limits warns), not the whole field (name and birth date) as an id.
    assert recording.identifiers.patient_id == "SYN-0001" and recording.demographics.sex is None
    assert recording.demographics.sex_unrecognised
    assert [a.text for a in recording.annotations] == ["Lights off", "Lights on"]
    np.testing.assert_array_equal(recording.channels[3].read(), read_edf(night).channels[3].read())


def test_discontinuous_header_is_read(night, tmp_path):
    """EDF+D whose records follow each other: read like the continuous file."""
    data = bytearray(night.read_bytes())
    data[192:197] = b"EDF+D"
    path = tmp_path / "disc.edf"
    path.write_bytes(bytes(data))
    recording = read_edf(path)
    reference = read_edf(night)
    assert recording.format == "EDF+D"
    assert recording.duration_s == reference.duration_s and recording.start == reference.start
    assert recording.annotations == reference.annotations
    assert not any(c.has_gaps for c in recording.channels)
    np.testing.assert_array_equal(recording.channels[8].read(), reference.channels[8].read())


def test_error_file_changed_after_decoding(tmp_path):
    path = write_synthetic_night(tmp_path / "n.edf", hours=0.01, seed=3)
    recording = read_edf(path)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 10)
    with pytest.raises(ReaderError, match="changed since it was decoded"):
        recording.channels[0].read()
    path.unlink()
    with pytest.raises(ReaderError, match="gone"):
        recording.channels[0].read()


def test_reader_error_pickles():
    error = pickle.loads(pickle.dumps(ReaderError("/x/y.edf", "truncated: ...", kind="truncated")))
    assert isinstance(error, ReaderError) and error.kind == "truncated" and str(error) == "/x/y.edf: truncated: ..."


# ---- in-memory recordings and the types themselves ----------------------------------------------------------


def test_channel_from_array():
    data = np.arange(10, dtype=np.float64)
    channel = Channel.from_array("C3-M2  ", 2.0, data)
    assert channel.label == "C3-M2" and channel.unit == "uV" and channel.n_samples == 10
    assert channel.duration_s == 5.0
    data[:] = -1  # copied at construction
    got = channel.read()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.arange(10, dtype=np.float32))
    got[:] = 7  # and at each read
    np.testing.assert_array_equal(channel.read(), np.arange(10, dtype=np.float32))
    with pytest.raises(ValueError):
        Channel.from_array("X", 0, data)


def test_in_memory_recording_and_repr():
    recording = Recording(
        channels=[Channel.from_array("ECG", 256, np.zeros(512), unit="mV")],
        duration_s=2.0,
        start=datetime(2024, 3, 1, 22, 0),
        identifiers=Identifiers(patient_id="MRN123456", patient_name="Doe^Jane", admin_code="ACC42",
                                source_path=Path("/spool/Doe_Jane_MRN123456.edf")),
        demographics=Demographics(sex="F", birth_date=date(1960, 3, 2)),
    )
    assert recording.channel_labels == ["ECG"]
    assert recording.age_years == pytest.approx((date(2024, 3, 1) - date(1960, 3, 2)).days / 365.2425)
    for text in (repr(recording), str(recording), repr(recording.identifiers), repr(recording.demographics)):
        for secret in ("MRN123456", "Doe", "Jane", "ACC42", "1960", "spool", "2024"):
            assert secret not in text, (secret, text)


def test_demographics_age():
    assert Demographics(age_years=41.5).age_at(datetime(2024, 1, 1)) == 41.5
    assert Demographics(age_years=41.5).age_at(None) == 41.5
    assert Demographics().age_at(datetime(2024, 1, 1)) is None
    born = Demographics(birth_date=date(2000, 1, 1))
    assert born.age_at(date(2010, 1, 1)) == pytest.approx(10.0, abs=0.01)
    assert born.age_at(datetime(1999, 1, 1)) is None  # birth after the recording: bad header
    with pytest.raises(ValueError):
        Demographics(sex="Female")
