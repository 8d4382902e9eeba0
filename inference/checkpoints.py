"""Loading SleepFM checkpoints in every format the release and its training code produce."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

# Keys under which training scripts nest the weights; a bare state dict has none of them.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIX = "module."  # added by DataParallel / DistributedDataParallel


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model it is loaded into."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    chunk : int, default 1 MiB
        Bytes read at a time.

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a checkpoint file and return its weights with any ``module.`` prefix removed.

    Accepts ``{"state_dict": ...}`` (released base model), a bare state dict (released heads) and
    ``{"model_state_dict": ...}`` (training checkpoints).

    The file is loaded with ``torch.load(..., map_location="cpu", weights_only=True)``: a checkpoint
    can hold tensors and plain containers, never code.

    Parameters
    ----------
    path : pathlib.Path
        The checkpoint file (``.pt`` / ``.pth``).

    Returns
    -------
    dict of str to torch.Tensor
        Parameter name to tensor, on the CPU.

    Raises
    ------
    CheckpointError
        The file is missing or not a readable PyTorch checkpoint, or holds no state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        # weights_only: a checkpoint is data; never let it run code on load.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__}: {exc})") from exc
    return extract_state_dict(obj, source=str(path))


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """Unwrap a loaded checkpoint object into a flat ``name -> tensor`` dict without ``module.``.

    Parameters
    ----------
    obj : object
        What ``torch.load`` returned: a state dict, or a mapping holding one under ``state_dict``,
        ``model_state_dict`` or ``model``.
    source : str, default "checkpoint"
        How error messages name the object (e.g. its path).

    Returns
    -------
    dict of str to torch.Tensor
        The weights, one leading ``module.`` (DataParallel) removed from each name.

    Raises
    ------
    CheckpointError
        No non-empty state dict, or an entry that is not a tensor.
    """
    if isinstance(obj, Mapping):
        for key in _NESTING_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: holds no state dict (found {type(obj).__name__})")
    weights: dict[str, Tensor] = {}
    for name, value in obj.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
        weights[name.removeprefix(_PREFIX)] = value
    return weights


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_into(model: nn.Module, weights: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``weights`` into ``model`` strictly; the error names missing, unexpected and mis-shaped keys.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its parameters and buffers are overwritten in place.
    weights : mapping of str to torch.Tensor
        A state dict, e.g. from :func:`read_state_dict`.
    source : str, default "checkpoint"
        How the error message names the weights.

    Raises
    ------
    CheckpointError
        Keys missing from ``weights``, keys the model does not have, or tensors of another shape
        (up to eight of each are named).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(
        f"{k} (file {tuple(weights[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(weights)
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"wrong shapes: {_summarise(misshaped)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(weights, strict=True)
