"""Fuzzing the EDF/BDF header and annotation parsers: any mutation of a valid file reads or raises ReaderError.

Random bytes in random header fields, random numbers in the numeric fields, truncations, and random
bytes in the data records (the annotation TALs among them), on an EDF+C, an EDF+D and a BDF+D file.
Every channel that a mutated file yields is read too (samples and validity), as is its hypnogram.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_edf_discontinuous import Sig, edf_bytes, ramp, record_tals

from gateway.pipeline.scoring import reference_hypnogram
from gateway.readers.edf import read_edf
from gateway.readers.errors import ReaderError

pytestmark = pytest.mark.slow

_SIGNALS = [Sig("EEG C3-A2", 8, -500, 500), Sig("SpO2", 2, 0, 100, 0, 100, unit="%")]


def _base_files() -> dict[str, bytes]:
    n = 4
    data = [ramp(n, 8), ramp(n, 2, 10)]
    plus_c = [record_tals(k, *([(k + 0.5, 30.0, "Sleep stage 2")] if k == 1 else [])) for k in range(n)]
    plus_d = [record_tals(t, (t + 0.25, None, "Lights off")) for t in (0.0, 1.0, 3.5, 4.5)]
    return {
        "edf+c": edf_bytes(_SIGNALS, data, tals=plus_c),
        "edf+d": edf_bytes(_SIGNALS, data, tals=plus_d, reserved="EDF+D"),
        "bdf+d": edf_bytes(_SIGNALS, data, tals=plus_d, reserved="BDF+D", bdf=True),
        "edf": edf_bytes(_SIGNALS, data),
    }


BASES = _base_files()
NS = len(_SIGNALS) + 1  # with the annotation signal; the plain EDF has one fewer
_FIXED_FIELDS = [(8, 80), (88, 80), (168, 8), (176, 8), (184, 8), (192, 44), (236, 8), (244, 8), (252, 4)]
_NUMERIC_FIXED = [(168, 8), (176, 8), (184, 8), (236, 8), (244, 8), (252, 4)]
_SIGNAL_WIDTHS = [16, 80, 8, 8, 8, 8, 8, 80, 8, 32]
_NUMERIC_SIGNAL = [3, 4, 5, 6, 8]  # physical min/max, digital min/max, samples per record


def _signal_field(ns: int, field: int, index: int) -> tuple[int, int]:
    start = 256 + sum(_SIGNAL_WIDTHS[:field]) * ns + index * _SIGNAL_WIDTHS[field]
    return start, _SIGNAL_WIDTHS[field]


_numbers = st.one_of(
    st.integers(-(10**8), 10**9).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: f"{x:.6g}"),
    st.sampled_from(["-1", "0", "1", "0.5", "1e308", "-0", "nan", "inf", " ", "", "99999999", "0.000001"]),
)


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(BASES)))
    data = bytearray(BASES[name])
    ns = NS if name != "edf" else NS - 1
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["fixed", "signal", "number", "data", "truncate"]))
        if kind == "fixed":
            start, width = draw(st.sampled_from(_FIXED_FIELDS))
            data[start:start + width] = draw(st.binary(min_size=width, max_size=width))
        elif kind == "signal":
            start, width = _signal_field(ns, draw(st.integers(0, 9)), draw(st.integers(0, ns - 1)))
            data[start:start + width] = draw(st.binary(min_size=width, max_size=width))
        elif kind == "number":
            if draw(st.booleans()):
                start, width = draw(st.sampled_from(_NUMERIC_FIXED))
            else:
                start, width = _signal_field(ns, draw(st.sampled_from(_NUMERIC_SIGNAL)), draw(st.integers(0, ns - 1)))
            data[start:start + width] = draw(_numbers).encode()[:width].ljust(width)
        elif kind == "data" and len(data) > 256 * (ns + 1):
            at = draw(st.integers(256 * (ns + 1), len(data) - 1))
            patch = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(patch)] = patch
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
    return name, bytes(data)


@contextmanager
def _time_limit(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"reading took more than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_base_files_read(fuzz_dir):
    for name, content in BASES.items():
        path = fuzz_dir / f"base-{name}.edf"
        path.write_bytes(content)
        recording = read_edf(path)
        assert recording.channel_labels == ["EEG C3-A2", "SpO2"], name
        assert recording.channels[1].read().size == (11 if name.endswith("+d") else 8), name


@settings(max_examples=1000, deadline=timedelta(seconds=2), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_mutated_files_read_or_raise_reader_error(fuzz_dir, case):
    _name, content = case
    path = fuzz_dir / "mutated.edf"
    path.write_bytes(content)
    with _time_limit(10):
        try:
            warnings: list[str] = []
            recording = read_edf(path, warnings=warnings)
            for channel in recording.channels:
                if channel.n_samples <= 1_000_000:
                    samples = channel.read()
                    assert samples.dtype == np.float32 and samples.shape == (channel.n_samples,)
                    valid = channel.read_valid()
                    assert valid is None or valid.shape == samples.shape
            reference_hypnogram(recording.annotations)
            repr(recording)
            assert all(isinstance(w, str) for w in warnings)
        except ReaderError as error:
            assert str(path) in str(error) and error.kind in (
                "not_found", "unreadable", "not_edf", "truncated", "corrupt", "unsupported")
