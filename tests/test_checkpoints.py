"""Checkpoint formats: released base, released heads, training checkpoints; with/without module."""

from __future__ import annotations

import pytest
import torch

from inference.checkpoints import CheckpointError, extract_state_dict, load_into, read_state_dict
from inference.models import HeadConfig, StagingHead

CFG = HeadConfig(num_heads=4, num_layers=1, num_classes=5, pooling_head=4, max_seq_length=64)


def _model(seed: int) -> StagingHead:
    torch.manual_seed(seed)
    return StagingHead(CFG).eval()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},  # released base
        lambda sd: {"module." + k: v for k, v in sd.items()},  # released heads
        lambda sd: {"model_state_dict": dict(sd), "epoch": 3, "optimizer": {}},  # training
        lambda sd: dict(sd),  # bare, no prefix
    ],
    ids=["state_dict+module", "bare+module", "model_state_dict", "bare"],
)
def test_every_format_loads_the_same_weights(tmp_path, wrap):
    source = _model(1)
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(source.state_dict()), path)
    target = _model(2)
    load_into(target, read_state_dict(path), source=str(path))
    for (name, a), b in zip(target.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name


def test_wrong_file_names_missing_and_unexpected_keys(tmp_path):
    weights = dict(_model(1).state_dict())
    weights.pop("fc.weight")
    weights["extra.layer"] = torch.zeros(3)
    path = tmp_path / "wrong.pth"
    torch.save(weights, path)
    with pytest.raises(CheckpointError) as err:
        load_into(_model(2), read_state_dict(path), source=str(path))
    text = str(err.value)
    assert "missing keys: fc.weight" in text
    assert "unexpected keys: extra.layer" in text
    assert "wrong.pth" in text


def test_wrong_shape_is_named():
    weights = dict(_model(1).state_dict())
    weights["fc.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"fc.bias \(file \(7,\), model \(5,\)\)"):
        load_into(_model(2), weights)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable PyTorch checkpoint"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")


def test_non_tensor_entries_are_rejected():
    with pytest.raises(CheckpointError, match="'lr' is a float"):
        extract_state_dict({"lr": 0.1})
    with pytest.raises(CheckpointError, match="holds no state dict"):
        extract_state_dict([1, 2, 3])
