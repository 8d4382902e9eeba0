"""EDF+D / BDF+D: data records placed at their time-stamps, gaps zero-filled and marked invalid.

The files are written byte by byte here (:func:`edf_bytes`, also used by the quirk and fuzz tests), and
one is made by patching a pyedflib-written EDF+C.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyedflib
import pytest

from gateway.readers import read_recording
from gateway.readers.edf import read_edf
from gateway.readers.edf_discontinuous import read_raw_edf
from gateway.readers.errors import ReaderError
from gateway.recording import Annotation

# ---- a byte-level EDF/BDF writer (tests only) ---------------------------------------------------------------


@dataclass
class Sig:
    label: str | bytes
    spr: int  # samples per data record
    pmin: float | str = -32768
    pmax: float | str = 32767
    dmin: int | str = -32768
    dmax: int | str = 32767
    unit: str = "uV"
    transducer: str = ""
    prefilter: str = ""


def _field(value: object, width: int) -> bytes:
    raw = value if isinstance(value, bytes) else str(value).encode("latin-1")
    assert len(raw) <= width, (value, width)
    return raw.ljust(width, b" ")


def _decimal(value: float, signed: bool = False) -> bytes:
    text = f"{value:.7f}".rstrip("0").rstrip(".")
    return ((("+" if value >= 0 else "") if signed else "") + text).encode()


def tal(onset: float, duration: float | None = None, *texts: str) -> bytes:
    stamp = _decimal(onset, signed=True)
    if duration is not None:
        stamp += b"\x15" + _decimal(duration)
    return stamp + b"\x14" + b"".join(t.encode("utf-8") + b"\x14" for t in texts) + b"\x00"


def record_tals(onset: float, *annotations: tuple[float, float | None, str]) -> bytes:
    """The annotation bytes of one data record: the time-keeping TAL, then the annotations."""
    return tal(onset, None, "") + b"".join(tal(o, d, text) for o, d, text in annotations)


def edf_bytes(
    signals: list[Sig],
    data: list[np.ndarray],
    *,
    tals: list[bytes] | None = None,
    annotation_spr: int = 30,
    bdf: bool = False,
    reserved: str | None = None,
    record_duration: float | str = 1,
    n_records_field: int | str | None = None,
    patient: str | bytes = "MRN-7 F 02-MAR-1961 Doe_Jane",
    recording: str = "Startdate 01-JAN-2024 ACC-42 X X",
    start: tuple[str, str] = ("01.01.24", "22.00.00"),
) -> bytes:
    """An EDF(+)/BDF(+) file. ``data[i]`` holds signal i's digital values, shape (n_records, spr).

    With ``tals`` (the annotation bytes of each record) an annotation signal is appended last and the
    file is EDF+ (``reserved`` defaults to EDF+C / BDF+C).
    """
    n_records = data[0].shape[0] if data else len(tals or [])
    signals = list(signals)
    if tals is not None:
        signals.append(Sig("BDF Annotations" if bdf else "EDF Annotations", annotation_spr, -1, 1, -32768, 32767,
                           unit=""))
        if reserved is None:
            reserved = "BDF+C" if bdf else "EDF+C"
    ns = len(signals)
    head = b"\xffBIOSEMI" if bdf else b"0       "
    head += _field(patient, 80) + _field(recording, 80) + _field(start[0], 8) + _field(start[1], 8)
    head += _field(256 * (ns + 1), 8) + _field(reserved or ("24BIT" if bdf else ""), 44)
    head += _field(n_records if n_records_field is None else n_records_field, 8)
    head += _field(record_duration, 8) + _field(ns, 4)
    for attr, width in (("label", 16), ("transducer", 80), ("unit", 8), ("pmin", 8), ("pmax", 8), ("dmin", 8),
                        ("dmax", 8), ("prefilter", 80), ("spr", 8)):
        head += b"".join(_field(getattr(s, attr), width) for s in signals)
    head += b" " * 32 * ns
    bps = 3 if bdf else 2
    body = bytearray()
    for k in range(n_records):
        for i, s in enumerate(signals):
            if tals is not None and i == ns - 1:
                body += tals[k].ljust(s.spr * bps, b"\x00")[: s.spr * bps]
                continue
            values = np.asarray(data[i][k], dtype=np.int64)
            if bdf:
                b = (values & 0xFFFFFF).astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
                body += b.tobytes()
            else:
                body += values.astype("<i2").tobytes()
    return head + bytes(body)


def ramp(n_records: int, spr: int, start: int = 0) -> np.ndarray:
    return (np.arange(n_records * spr, dtype=np.int64) + start).reshape(n_records, spr)


# ---- EDF+D ---------------------------------------------------------------------------------------------------

ONSETS = [0.0, 1.0, 3.0, 4.5]  # records of 1 s: gaps of 1 s (2..3) and 0.5 s (4..4.5)


def _discontinuous(tmp_path: Path, *, bdf: bool = False, onsets: list[float] = ONSETS, name: str = "d.edf",
                   extra_tals: dict[int, list[tuple[float, float | None, str]]] | None = None) -> Path:
    n = len(onsets)
    data = [ramp(n, 8, 100), ramp(n, 2, -50)]
    tals = [record_tals(t, *(extra_tals or {}).get(k, [])) for k, t in enumerate(onsets)]
    path = tmp_path / name
    path.write_bytes(edf_bytes([Sig("EEG C3-A2", 8), Sig("SpO2", 2, unit="%")], data, tals=tals, bdf=bdf,
                               reserved="BDF+D" if bdf else "EDF+D"))
    return path


def _expected_timeline(onsets: list[float], spr: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """What placing ramp records at their onsets gives: values and validity."""
    values = ramp(len(onsets), spr, start)
    n = round((max(onsets) - min(onsets) + 1) * spr)
    out, valid = np.zeros(n, np.float32), np.zeros(n, bool)
    for k, t in enumerate(onsets):
        at = round((t - min(onsets)) * spr)
        out[at:at + spr] = values[k]
        valid[at:at + spr] = True
    return out, valid


@pytest.mark.parametrize("bdf", [False, True])
def test_records_are_placed_at_their_time_stamps(tmp_path, bdf):
    path = _discontinuous(tmp_path, bdf=bdf, name="d.bdf" if bdf else "d.edf")
    warnings: list[str] = []
    recording = read_edf(path, warnings=warnings)
    assert recording.format == ("BDF+D" if bdf else "EDF+D")
    assert recording.duration_s == 5.5  # end of the last record (5.5) minus onset of the first (0)
    assert recording.channel_labels == ["EEG C3-A2", "SpO2"]
    assert [c.sampling_rate for c in recording.channels] == [8.0, 2.0]
    for channel, spr, start in zip(recording.channels, (8, 2), (100, -50), strict=True):
        expected, valid = _expected_timeline(ONSETS, spr, start)
        assert channel.n_samples == expected.size == round(5.5 * spr)
        assert channel.has_gaps
        got = channel.read()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(channel.read_valid(), valid)
        assert (got[~valid] == 0).all()
    eeg_valid = recording.channels[0].read_valid()
    assert eeg_valid[:16].all() and not eeg_valid[16:24].any() and eeg_valid[24:32].all()
    assert not eeg_valid[32:36].any() and eeg_valid[36:].all() and eeg_valid.size == 44
    assert any("2 gaps" in w and "1.5 s" in w for w in warnings)
    assert recording.start == datetime(2024, 1, 1, 22, 0, 0)
    assert recording.annotations == []
    assert read_recording(path).format == recording.format  # the content-sniffing entry point too


def test_annotations_are_relative_to_the_first_record(tmp_path):
    onsets = [10.25, 11.25, 20.25]
    extra = {0: [(10.5, None, "Lights off")], 2: [(20.25, 30.0, "Sleep stage W"), (20.5, 2.0, "Arousal")],
             1: [(11.25, 0.0, "Ünïcode marker")]}
    path = _discontinuous(tmp_path, onsets=onsets, extra_tals=extra)
    recording = read_edf(path)
    assert recording.duration_s == pytest.approx(11.0)
    assert recording.start == datetime(2024, 1, 1, 22, 0, 10, 250000)
    assert recording.annotations == [
        Annotation(0.25, None, "Lights off"),
        Annotation(1.0, 0.0, "Ünïcode marker"),
        Annotation(10.0, 30.0, "Sleep stage W"),
        Annotation(10.25, 2.0, "Arousal"),
    ]
    spo2 = recording.channels[1]
    assert spo2.n_samples == 22
    expected, valid = _expected_timeline(onsets, 2, -50)
    np.testing.assert_array_equal(spo2.read(), expected)
    np.testing.assert_array_equal(spo2.read_valid(), valid)


def test_out_of_order_records_are_sorted(tmp_path):
    onsets = [3.0, 0.0, 1.0, 6.0]  # file order
    path = _discontinuous(tmp_path, onsets=onsets)
    warnings: list[str] = []
    recording = read_edf(path, warnings=warnings)
    assert recording.duration_s == 7.0
    values = ramp(4, 8, 100)
    got = recording.channels[0].read()
    np.testing.assert_array_equal(got[0:8], values[1])
    np.testing.assert_array_equal(got[8:16], values[2])
    np.testing.assert_array_equal(got[24:32], values[0])
    np.testing.assert_array_equal(got[48:56], values[3])
    valid = recording.channels[0].read_valid()
    assert valid.sum() == 32 and not valid[16:24].any() and not valid[32:48].any()
    assert any("not in time order" in w for w in warnings)


def test_out_of_order_but_contiguous_records_have_no_gaps(tmp_path):
    path = _discontinuous(tmp_path, onsets=[1.0, 0.0, 2.0])
    channel = read_edf(path).channels[0]
    assert not channel.has_gaps and channel.read_valid() is None
    values = ramp(3, 8, 100)
    np.testing.assert_array_equal(channel.read(), np.concatenate([values[1], values[0], values[2]]))


def test_contiguous_discontinuous_file_has_no_gaps(tmp_path):
    path = _discontinuous(tmp_path, onsets=[0.0, 1.0, 2.0])
    recording = read_edf(path)
    assert recording.format == "EDF+D" and recording.duration_s == 3.0
    assert not any(c.has_gaps for c in recording.channels)
    np.testing.assert_array_equal(recording.channels[0].read(), ramp(3, 8, 100).reshape(-1))


def test_sub_sample_jitter_is_not_a_gap_or_an_overlap(tmp_path):
    path = _discontinuous(tmp_path, onsets=[0.0, 1.00001, 1.99999, 3.0])
    recording = read_edf(path)
    assert not any(c.has_gaps for c in recording.channels)
    assert recording.channels[0].n_samples == 32


@pytest.mark.parametrize(("onsets", "first", "second"), [
    ([0.0, 1.0, 1.5, 3.0], 3, 2),  # record 3 starts half-way through record 2
    ([0.0, 2.0, 2.0], 3, 2),  # same time-stamp twice
    ([5.0, 0.0, 5.9], 3, 1),  # out of order, then an overlap
])
def test_overlap_is_an_error_naming_the_records(tmp_path, onsets, first, second):
    path = _discontinuous(tmp_path, onsets=onsets)
    with pytest.raises(ReaderError) as info:
        read_edf(path)
    message = str(info.value)
    assert str(path) in message and "overlap" in message
    assert f"data record {first} " in message and f"data record {second} " in message
    assert info.value.kind == "corrupt"


def test_missing_time_stamp_is_an_error_naming_the_record(tmp_path):
    data = [ramp(3, 8), ramp(3, 2)]
    tals = [record_tals(0.0), tal(1.0, None, "not a time-keeping TAL"), record_tals(2.0)]
    path = tmp_path / "nostamp.edf"
    path.write_bytes(edf_bytes([Sig("A", 8), Sig("B", 2)], data, tals=tals, reserved="EDF+D"))
    with pytest.raises(ReaderError, match=r"data record 2 has no time-keeping annotation") as info:
        read_edf(path)
    assert str(path) in str(info.value)


def test_discontinuous_without_annotation_signal_is_an_error(tmp_path):
    path = tmp_path / "noannot.edf"
    path.write_bytes(edf_bytes([Sig("A", 8)], [ramp(2, 8)], reserved="EDF+D"))
    with pytest.raises(ReaderError, match="without an annotation signal"):
        read_edf(path)


def test_absurd_time_stamp_is_an_error(tmp_path):
    path = _discontinuous(tmp_path, onsets=[0.0, 1.0, 1e9])
    with pytest.raises(ReaderError, match="data record 3 .* more than 7 days"):
        read_edf(path)


def test_patched_pyedflib_file_with_gaps(tmp_path):
    """A pyedflib-written EDF+C turned into EDF+D: time-stamps rewritten to leave a 3-s gap after record 2."""
    path = tmp_path / "c.edf"
    rng = np.random.default_rng(0)
    signals = [rng.uniform(-400, 400, 256 * 5), rng.uniform(0, 100, 5)]
    writer = pyedflib.EdfWriter(str(path), 2, file_type=pyedflib.FILETYPE_EDFPLUS)
    writer.setSignalHeaders([
        {"label": "C3-M2", "dimension": "uV", "sample_frequency": 256, "physical_min": -500, "physical_max": 500,
             "digital_min": -32768, "digital_max": 32767, "transducer": "", "prefilter": ""},
        {"label": "SpO2", "dimension": "%", "sample_frequency": 1, "physical_min": 0, "physical_max": 100,
             "digital_min": -32768, "digital_max": 32767, "transducer": "", "prefilter": ""},
    ])
    writer.writeAnnotation(3.5, -1, "Lights off")
    writer.writeSamples(signals)
    writer.close()
    reference = read_edf(path)
    continuous = [c.read() for c in reference.channels]

    data = bytearray(path.read_bytes())
    data[192:197] = b"EDF+D"
    ns = 3
    spr = [int(data[256 + 216 * ns + 8 * i: 256 + 216 * ns + 8 * i + 8]) for i in range(ns)]
    header_bytes, record_bytes = 256 * (ns + 1), sum(spr) * 2
    annot_at = (spr[0] + spr[1]) * 2
    for k in range(5):
        onset = k if k < 2 else k + 3
        extra = [(onset + 0.5, None, "Lights off")] if k == 3 else []
        at = header_bytes + k * record_bytes + annot_at
        data[at:at + spr[2] * 2] = record_tals(onset, *extra).ljust(spr[2] * 2, b"\x00")
    gapped = tmp_path / "d.edf"
    gapped.write_bytes(bytes(data))

    recording = read_edf(gapped)
    assert recording.format == "EDF+D" and recording.duration_s == 8.0
    assert recording.annotations == [Annotation(6.5, None, "Lights off")]
    for channel, ref in zip(recording.channels, continuous, strict=True):
        rate = int(channel.sampling_rate)
        got, valid = channel.read(), channel.read_valid()
        assert got.size == 8 * rate
        np.testing.assert_array_equal(got[: 2 * rate], ref[: 2 * rate])
        np.testing.assert_array_equal(got[5 * rate:], ref[2 * rate:])
        assert (got[2 * rate: 5 * rate] == 0).all() and not valid[2 * rate: 5 * rate].any()
        assert valid.sum() == 5 * rate


def test_read_streams_one_channel_without_holding_samples(tmp_path):
    recording = read_edf(_discontinuous(tmp_path))
    channel = recording.channels[0]
    first = channel.read()
    first[:] = 7
    assert not (channel.read() == 7).all()
    holders = [vars(channel), vars(channel._source)]
    assert not any(isinstance(v, np.ndarray) and v.size >= channel.n_samples for d in holders for v in d.values())


def test_raw_reader_equals_pyedflib_path_on_a_continuous_night(tmp_path):
    from gateway.synthetic.night import write_synthetic_night

    night = write_synthetic_night(tmp_path / "n.edf", hours=0.02, seed=4)
    a, b = read_edf(night), read_raw_edf(night)
    assert a.channel_labels == b.channel_labels and a.annotations == b.annotations
    assert (a.duration_s, a.start, a.format) == (b.duration_s, b.start, b.format)
    for x, y in zip(a.channels, b.channels, strict=True):
        assert (x.sampling_rate, x.unit, x.n_samples) == (y.sampling_rate, y.unit, y.n_samples)
        np.testing.assert_array_equal(x.read(), y.read())


def test_edf_plus_c_annotations_through_the_tal_parser(tmp_path):
    """An EDF+C that pyedflib refuses (non-ASCII patient name) still gives its annotations."""
    data = [ramp(3, 8), ramp(3, 2)]
    tals = [record_tals(0.0, (0.5, None, "Lights off")), record_tals(1.0, (1.0, 30.0, "Sleep stage 2")),
            record_tals(2.0)]
    path = tmp_path / "c.edf"
    path.write_bytes(edf_bytes([Sig("A", 8), Sig("B", 2)], data, tals=tals,
                               patient="MRN-7 F 02-MAR-1961 M\xfcller".encode("latin-1")))
    recording = read_edf(path)
    assert recording.format == "EDF+C" and recording.duration_s == 3.0
    assert recording.annotations == [Annotation(0.5, None, "Lights off"), Annotation(1.0, 30.0, "Sleep stage 2")]
    assert recording.identifiers.patient_name == "Müller"
    assert recording.start == datetime(2024, 1, 1, 22)
