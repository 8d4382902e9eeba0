"""Hypnogram and sleep metrics from stage probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from inference.hypnogram import build_staging, epoch_probabilities, sleep_metrics

W, N1, N2, N3, R = range(5)


def test_epoch_probabilities_average_six_tokens_and_drop_partial_epoch():
    probs = np.zeros((15, 5), np.float32)
    probs[:6, W] = 1
    probs[6:9, N2] = 1
    probs[9:12, R] = 1
    probs[12:, N3] = 1  # only 3 tokens: not a whole epoch
    epochs = epoch_probabilities(probs)
    assert epochs.shape == (2, 5)
    np.testing.assert_allclose(epochs[1], [0, 0, 0.5, 0, 0.5])


def test_metrics_follow_standard_definitions():
    # 10 min wake, sleep onset N1, N2..., 2 min wake after onset, REM, final 3 min wake.
    stages = [W] * 20 + [N1] * 2 + [N2] * 10 + [W] * 4 + [N3] * 6 + [R] * 8 + [W] * 6
    m = sleep_metrics(np.array(stages))
    assert m.tib_min == 28.0
    assert m.tst_min == 13.0
    assert m.sleep_efficiency_pct == pytest.approx(100 * 13 / 28)
    assert m.sleep_onset_latency_min == 10.0
    assert m.waso_min == 2.0
    assert m.rem_latency_min == 11.0  # from onset (epoch 20) to first REM (epoch 42)
    assert m.stage_min == {"W": 15.0, "N1": 1.0, "N2": 5.0, "N3": 3.0, "REM": 4.0}
    assert m.stage_pct_of_tst["N2"] == pytest.approx(100 * 5 / 13)
    assert sum(m.stage_pct_of_tst.values()) == pytest.approx(100.0)


def test_no_sleep_at_all():
    m = sleep_metrics(np.zeros(10, int))
    assert m.tst_min == 0 and m.sleep_onset_latency_min is None and m.rem_latency_min is None
    assert m.sleep_efficiency_pct == 0.0


def test_build_staging_labels():
    probs = np.full((12, 5), 0.1, np.float32)
    probs[:6, N2] = 0.6
    probs[6:, R] = 0.6
    staging = build_staging(probs)
    assert staging.hypnogram == ["N2", "REM"]
    assert staging.metrics.rem_latency_min == 0.5
