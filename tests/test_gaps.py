"""Channels with gaps keep their timeline; gaps become zeros after standardisation."""

from __future__ import annotations

import numpy as np
import pytest

from inference.gaps import preprocess_with_gaps, validity_at_target
from inference.preprocess import preprocess_channel


def test_no_gaps_is_plain_preprocessing():
    x = np.random.default_rng(0).standard_normal(256 * 60).astype(np.float32)
    out, frac = preprocess_with_gaps(x, None, 256.0, 128 * 60)
    np.testing.assert_array_equal(out, preprocess_channel(x, 256.0, n_out=128 * 60))
    assert frac == 0.0
    out2, _ = preprocess_with_gaps(x, np.ones(x.size, bool), 256.0, 128 * 60)
    np.testing.assert_array_equal(out, out2)


def test_validity_maps_to_nearest_target_sample():
    valid = np.ones(256 * 10, bool)
    valid[256 * 4 : 256 * 6] = False  # seconds 4..6 missing
    at128 = validity_at_target(valid, 256.0, 128 * 10)
    assert at128.sum() == 128 * 8
    assert not at128[128 * 4 : 128 * 6].any()
    assert at128[: 128 * 4].all() and at128[128 * 6 :].all()
    slow = validity_at_target(np.array([True, False, True]), 1.0, 384)
    assert slow[:64].all() and not slow[64:192].any() and slow[192:].all()


def test_gap_is_zero_and_measured_part_is_standardised_on_its_own():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(256 * 120) * 50 + 10).astype(np.float32)
    valid = np.ones(x.size, bool)
    valid[256 * 30 : 256 * 60] = False
    x[~valid] = 0.0  # what a reader fills a gap with
    out, frac = preprocess_with_gaps(x, valid, 256.0, 128 * 120)
    assert out.dtype == np.float32 and out.shape == (128 * 120,)
    assert frac == pytest.approx(0.25)
    gap = out[128 * 30 : 128 * 60]
    assert (gap == 0).all()
    measured = np.concatenate([out[: 128 * 30], out[128 * 60 :]])
    assert measured.mean() == pytest.approx(0.0, abs=1e-3)
    assert measured.std() == pytest.approx(1.0, abs=1e-3)
    # Far from the gap edges the signal equals plain preprocessing of that stretch, up to scale.
    plain = preprocess_channel(x[256 * 60 :], 256.0, n_out=128 * 60)
    far = out[128 * 70 : 128 * 110]
    assert np.corrcoef(far, plain[128 * 10 : 128 * 50])[0, 1] > 0.999


def test_all_gap_channel_is_an_error():
    with pytest.raises(ValueError, match="all gap"):
        preprocess_with_gaps(np.zeros(512, np.float32), np.zeros(512, bool), 256.0, 256)
