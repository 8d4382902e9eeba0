"""Mapping and preprocessing a Recording for the engine, including channels with gaps."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.montage.table import default_table
from gateway.pipeline.prepare import MappingError, prepare_study
from gateway.recording import Channel, Demographics, Recording

SECONDS = 600


def _channel(label, rate, seed, valid=None):
    x = np.random.default_rng(seed).standard_normal(int(rate * SECONDS)).astype(np.float32) * 20
    if valid is not None:
        x[~valid] = 0.0
    return Channel.from_array(label, rate, x, valid=valid)


def test_channels_grouped_in_modality_order_and_standardised():
    rec = Recording(
        channels=[_channel("ECG II", 512, 1), _channel("C3-M2", 256, 2), _channel("Temp rectal", 1, 3),
                  _channel("Thor", 32, 4), _channel("C4-M1", 256, 5)],
        duration_s=SECONDS, demographics=Demographics(sex="F", age_years=61.0),
    )
    prepared = prepare_study(rec, default_table(), key="k")
    assert list(prepared.engine_input.signals) == ["BAS", "RESP", "EKG"]
    assert prepared.channels == {"BAS": ["C3-M2", "C4-M1"], "RESP": ["Thor"], "EKG": ["ECG II"]}
    assert prepared.engine_input.signals["BAS"].shape == (2, 128 * SECONDS)
    assert prepared.engine_input.age_years == 61.0 and prepared.engine_input.sex == "F"
    for block in prepared.engine_input.signals.values():
        assert block.dtype == np.float16  # stored as the release stores its 128 Hz signals
        np.testing.assert_allclose(block.mean(axis=1, dtype=np.float64), 0, atol=1e-3)
        np.testing.assert_allclose(block.std(axis=1, dtype=np.float64), 1, atol=1e-3)
    assert prepared.gap_fraction == {} and prepared.dropped == {}
    assert set(prepared.timings_s) == {"read", "preprocess", "quality"}


def test_gap_is_kept_on_the_timeline_as_zeros_and_reported():
    valid = np.ones(256 * SECONDS, bool)
    valid[256 * 100 : 256 * 160] = False
    rec = Recording(channels=[_channel("C3-M2", 256, 1, valid), _channel("Thor", 32, 2)], duration_s=SECONDS)
    prepared = prepare_study(rec, default_table())
    bas = prepared.engine_input.signals["BAS"][0]
    assert bas.shape == (128 * SECONDS,)
    assert (bas[128 * 100 : 128 * 160] == 0).all()
    assert np.abs(bas[128 * 170 : 128 * 200]).max() > 0.5
    assert prepared.gap_fraction == {"C3-M2": pytest.approx(0.1)}


def test_dead_channel_is_dropped_with_reason_and_study_goes_on():
    dead = np.zeros(256 * SECONDS, bool)
    rec = Recording(channels=[_channel("C3-M2", 256, 1, dead), _channel("C4-M1", 256, 2)], duration_s=SECONDS)
    prepared = prepare_study(rec, default_table())
    assert prepared.channels == {"BAS": ["C4-M1"]}
    assert prepared.engine_input.signals["BAS"].shape == (1, 128 * SECONDS)
    assert "all gap" in prepared.dropped["C3-M2"]



def test_longest_upsampled_channels_first_rows_in_table_order(monkeypatch):
    # Taken longest first (scratch before the other rows fill memory), those below the top rate before
    # those at it (the time-domain filter's import runs beside their transforms); rows still in the
    # table's order, each what the channel alone gives, and a dropped one in the middle left out.
    from gateway.pipeline import prepare
    from inference.gaps import preprocess_with_gaps

    taken = []

    def spy(samples, valid, rate, n_out, **kwargs):
        taken.append(rate)
        return preprocess_with_gaps(samples, valid, rate, n_out, **kwargs)

    monkeypatch.setattr(prepare, "preprocess_with_gaps", spy)
    dead = np.zeros(256 * SECONDS, bool)
    channels = [_channel("C3-M2", 256, 1), _channel("C4-M1", 256, 2, dead), _channel("O1-M2", 200, 3),
                _channel("Thor", 32, 4), _channel("ECG II", 512, 5), _channel("Snore", 500, 6)]
    rec = Recording(channels=channels, duration_s=SECONDS)
    prepared = prepare_study(rec, default_table())
    assert taken == [500, 256, 256, 200, 32, 512]
    assert prepared.channels == {"BAS": ["C3-M2", "O1-M2"], "RESP": ["Thor", "Snore"], "EKG": ["ECG II"]}
    assert list(prepared.dropped) == ["C4-M1"]
    n_out = 128 * SECONDS
    for modality, labels in prepared.channels.items():
        for row, label in zip(prepared.engine_input.signals[modality], labels):
            channel = next(c for c in channels if c.label == label)
            alone, _ = preprocess_with_gaps(channel.read(), channel.read_valid(), channel.sampling_rate, n_out,
                                            recording_rate=512.0)
            np.testing.assert_array_equal(row, alone.astype(np.float16))

def test_nothing_usable_is_a_mapping_error():
    rec = Recording(channels=[_channel("Mystery", 256, 1)], duration_s=SECONDS)
    with pytest.raises(MappingError, match="no channel maps to a modality"):
        prepare_study(rec, default_table())
    dead = np.zeros(256 * SECONDS, bool)
    rec = Recording(channels=[_channel("C3-M2", 256, 1, dead)], duration_s=SECONDS)
    with pytest.raises(MappingError, match="no usable channel"):
        prepare_study(rec, default_table())



@pytest.mark.parametrize(("seconds", "shown"), [(0.0, "0.0"), (12.5, "12.5"), (29.99, "29.9")])
def test_shorter_than_one_epoch_is_refused_before_any_channel_is_read(seconds, shown):
    """The engine's InputError with a one-line reason, raised before mapping and preprocessing: a 0-s
    recording used to fail in n_target_samples with an internal ValueError."""
    from inference.engine import InputError

    def never_read() -> np.ndarray:
        raise AssertionError("a channel was read")

    n = int(256 * seconds)
    rec = Recording(channels=[Channel("C3-M2", 256.0, "uV", n, never_read)], duration_s=seconds)
    with pytest.raises(InputError) as info:
        prepare_study(rec, default_table(), key="k")
    assert str(info.value) == f"recording shorter than one 30-s epoch ({shown} s)"


def test_thirty_seconds_are_prepared():
    rec = Recording(channels=[Channel.from_array("C3-M2", 256, np.ones(256 * 30, np.float32))], duration_s=30.0)
    assert prepare_study(rec, default_table()).engine_input.signals["BAS"].shape == (1, 128 * 30)
