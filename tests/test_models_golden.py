"""The networks reproduce the public reference code's outputs on its golden inputs (eval mode)."""

from __future__ import annotations

import json

import pytest
import torch

from inference.bundle import load_bundle
from inference.checkpoints import load_into, read_state_dict
from inference.models import DiagnosisHead, SleepEncoder, StagingHead, reference_masks

TOL = 1e-4
pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def bundle(reference_dir):
    return load_bundle(reference_dir / "sleepfm")


def _golden(reference_dir, folder):
    return torch.load(reference_dir / "sleepfm" / folder / "golden_io.pt", weights_only=True)


def test_state_dict_names_and_shapes_match_release(reference_dir, bundle):
    shapes = json.loads((reference_dir / "sleepfm" / "state_dict_shapes.json").read_text())
    for part, model in (("base", bundle.encoder), ("staging", bundle.staging), ("diagnosis", bundle.diagnosis)):
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == shapes[part], part


@torch.inference_mode()
def test_encoder_matches_golden_with_padded_channels(reference_dir, bundle):
    g = _golden(reference_dir, "model_base")
    pooled, tokens = bundle.encoder(g["x"], g["mask"])
    assert (pooled - g["pooled"]).abs().max() <= TOL
    assert (tokens - g["embedding"]).abs().max() <= TOL


@torch.inference_mode()
def test_encoder_matches_golden_single_channel(reference_dir, bundle):
    g = _golden(reference_dir, "model_base")
    pooled, tokens = bundle.encoder(g["x_single"], g["mask_single"])
    assert (pooled - g["pooled_single"]).abs().max() <= TOL
    assert (tokens - g["embedding_single"]).abs().max() <= TOL
    # The unpadded path (what the engine uses) gives the same numbers.
    pooled2, tokens2 = bundle.encoder(g["x_single"])
    assert (tokens2 - g["embedding_single"]).abs().max() <= TOL
    assert (pooled2 - g["pooled_single"]).abs().max() <= TOL


@torch.inference_mode()
def test_encoder_dropping_padded_channels_is_equivalent(reference_dir, bundle):
    g = _golden(reference_dir, "model_base")
    keep = ~g["mask"][1]
    pooled, tokens = bundle.encoder(g["x"][1:, keep])
    assert (pooled - g["pooled"][1:]).abs().max() <= TOL
    assert (tokens - g["embedding"][1:]).abs().max() <= TOL


@torch.inference_mode()
def test_staging_head_matches_golden_where_time_mask_false(reference_dir, bundle):
    g = _golden(reference_dir, "model_sleep_staging")
    modality_mask, token_mask = reference_masks(g["mask"])
    logits = bundle.staging(g["x"], modality_mask, token_mask)
    valid = ~token_mask
    assert (logits - g["logits"])[valid].abs().max() <= TOL
    # One study at a time (the engine's path, which drops missing modalities) agrees too.
    one = bundle.staging(g["x"][:1], modality_mask[:1])
    assert (one - g["logits"][:1]).abs().max() <= TOL


@torch.inference_mode()
def test_diagnosis_head_matches_golden(reference_dir, bundle):
    g = _golden(reference_dir, "model_diagnosis")
    modality_mask, token_mask = reference_masks(g["mask"])
    hazards = bundle.diagnosis(g["x"], g["demo"], modality_mask, token_mask)
    assert (hazards - g["hazards"]).abs().max() <= TOL
    # Study 1 with its padded tail cut off and its missing modality masked, alone.
    n = int((~token_mask[1]).sum())
    alone = bundle.diagnosis(g["x"][1:, :, :n], g["demo"][1:], modality_mask[1:])
    assert (alone - g["hazards"][1:]).abs().max() <= TOL


@pytest.mark.parametrize(
    "folder,cls",
    [("model_base", SleepEncoder), ("model_sleep_staging", StagingHead), ("model_diagnosis", DiagnosisHead)],
)
def test_release_checkpoints_load_with_their_configs(reference_dir, bundle, folder, cls):
    model = {"model_base": bundle.encoder, "model_sleep_staging": bundle.staging,
             "model_diagnosis": bundle.diagnosis}[folder]
    assert isinstance(model, cls)
    assert not model.training
    ckpt = next((reference_dir / "sleepfm" / folder).glob("best.pt*"))
    fresh = cls(model.cfg)
    load_into(fresh, read_state_dict(ckpt))
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


@torch.inference_mode()
def test_inference_tokenizer_is_the_tokenizer_with_batchnorm_folded(reference_dir, bundle):
    """The engine's tokenizer (BatchNorm folded into the convolutions, ELU through exp) gives the release
    tokenizer's embeddings: on the golden input with the released weights, and on a tokenizer whose
    BatchNorm statistics are far from identity, so that a wrong fold could not hide."""
    from inference.models import InferenceTokenizer, Tokenizer

    g = _golden(reference_dir, "model_base")
    released = bundle.encoder.patch_embedding.eval()
    patches = g["x"].reshape(-1, released.patch_size)
    assert (InferenceTokenizer(released)(patches) - released(patches)).abs().max() <= 1e-5

    torch.manual_seed(3)
    odd = Tokenizer().eval()
    for module in odd.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)):
            module.weight.normal_(1.0, 0.5)
            module.bias.normal_(0.0, 0.5)
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0.0, 2.0)
            module.running_var.uniform_(0.1, 4.0)
    x = torch.randn(300, odd.patch_size) * 3
    want, got = odd(x), InferenceTokenizer(odd)(x.clone())
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() <= 1e-5
    # the exp form of ELU at the kink and for large negative inputs
    edge = torch.tensor([[0.0] * 320 + [-80.0] * 160 + [1e-7] * 160])
    assert (InferenceTokenizer(odd)(edge) - odd(edge)).abs().max() <= 1e-5


@torch.inference_mode()
def test_the_tokenizer_split_into_passes_keeps_every_patch_in_place(monkeypatch):
    """On CPU the tokenizer takes at most TOKENIZER_CHUNK patches a pass: a batch of 2.5 passes gives each
    patch the embedding it gets alone, in its place, with the batch's leading shape."""
    from inference import models

    monkeypatch.setattr(models, "TOKENIZER_CHUNK", 8)
    torch.manual_seed(5)
    tokenizer = models.InferenceTokenizer(models.Tokenizer().eval())
    patches = torch.randn(4, 5, tokenizer.patch_size)  # 20 patches: passes of 8, 8 and 4
    got = tokenizer(patches)
    assert got.shape == (4, 5, tokenizer.embed_dim)
    alone = torch.stack([tokenizer(p[None])[0] for p in patches.reshape(-1, tokenizer.patch_size)])
    assert (got.reshape(20, -1) - alone).abs().max() <= 1e-6
