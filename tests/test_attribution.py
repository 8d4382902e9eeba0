"""Modality attribution of the diagnosis head (issue 17, part 4): for each modality present, the change
in every log-hazard when that modality is masked, computed by the engine in its own head passes and
checked here against the same masking done by hand on the result's own token embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gateway.pipeline.outputs import ATTRIBUTION_FILE, read_attribution, read_hazards, write_study_outputs
from inference.engine import Engine, EngineOptions
from inference.results import MODALITIES, StudyInput

SECONDS = 600  # two 5-minute windows


def _study(modalities: tuple[str, ...], seed: int = 3) -> StudyInput:
    rng = np.random.default_rng(seed)
    signals = {m: rng.standard_normal((2 if m == "BAS" else 1, 128 * SECONDS), dtype=np.float32)
               for m in modalities}
    return StudyInput(signals, age_years=63, sex="M", key="st-attr")


def _by_hand(bundle, result, modality: str) -> np.ndarray:
    """The diagnosis head on the result's tokens with ``modality`` masked, as the engine masks a missing one."""
    embed = bundle.encoder.cfg.embed_dim
    stacked = torch.zeros(1, len(MODALITIES), result.n_tokens, embed)
    for i, m in enumerate(MODALITIES):
        if m in result.token_embeddings:
            stacked[0, i] = torch.from_numpy(result.token_embeddings[m])
    mask = torch.tensor([[m not in result.modalities or m == modality for m in MODALITIES]])
    age, sex = bundle.demographics.encode(63, "M")
    with torch.inference_mode():
        out = bundle.diagnosis(stacked[:, :, : result.diagnosis_tokens], torch.tensor([[age, sex]]), mask)
    return out[0].float().numpy()


def test_attribution_equals_masking_each_modality_by_hand(model):
    bundle, engine = model
    result = engine.run(_study(("BAS", "RESP", "EKG")))
    attribution = result.hazards.attribution
    assert list(attribution) == ["BAS", "RESP", "EKG"]
    for modality, delta in attribution.items():
        assert delta.shape == (len(bundle.outcomes),) and delta.dtype == np.float32
        expected = result.hazards.log_hazard[: len(bundle.outcomes)] - _by_hand(bundle, result, modality)
        np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-5)
        assert np.abs(delta).max() > 0  # masking a modality moves the untrained head's outputs


def test_one_modality_alone_is_not_attributed_and_attribution_can_be_switched_off(model):
    bundle, engine = model
    assert engine.run(_study(("BAS",))).hazards.attribution == {}
    off = Engine(bundle, EngineOptions(device="cpu", modality_attribution=False))
    result = off.run(_study(("BAS", "RESP")))
    assert result.hazards.attribution == {}
    # the hazards themselves do not depend on whether attribution ran
    np.testing.assert_array_equal(result.hazards.log_hazard, engine.run(_study(("BAS", "RESP"))).hazards.log_hazard)


def test_attribution_is_written_beside_the_hazards_and_read_back(model, tmp_path):
    _, engine = model
    result = engine.run(_study(("BAS", "RESP", "EKG", "EMG")))
    written = write_study_outputs(result, tmp_path)
    assert tmp_path / ATTRIBUTION_FILE in written
    table = read_attribution(tmp_path)
    hazards = read_hazards(tmp_path)
    assert len(table) == len(result.hazards.attribution["BAS"]) == len(hazards)
    first = hazards[0]
    assert table[first.phecode] == {m: pytest.approx(float(result.hazards.attribution[m][0]), abs=1e-6)
                                    for m in ("BAS", "RESP", "EKG", "EMG")}
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["attribution"]["file"] == ATTRIBUTION_FILE
    assert doc["attribution"]["modalities"] == ["BAS", "RESP", "EKG", "EMG"]


def test_a_single_modality_study_writes_no_attribution_file(model, tmp_path):
    _, engine = model
    write_study_outputs(engine.run(_study(("BAS",))), tmp_path)
    assert read_attribution(tmp_path) is None and "attribution" not in json.loads((tmp_path / "metrics.json").read_text())
