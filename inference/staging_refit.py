"""Re-fit the released staging head on a site's own scored nights.

On some equipment the released staging head is miscalibrated (users report all-Wake hypnograms). A
site that has scored hypnograms re-fits the head, starting from the released weights, on its own
token embeddings (``psg-gateway heads fit staging``): cross-entropy per 5-s token, each 30-s epoch's
label applying to its six tokens, unscored epochs (-1) ignored, optional inverse-frequency class
weights, AdamW, early stopping on the validation studies. The caller's head is never modified: a
copy is trained and returned.

Nights are fed exactly as the engine feeds them (:meth:`inference.engine.Engine._stage`): one night
``(1, 4, T, 128)`` with a modality mask (True where missing), cut in equal segments when it is longer
than the head's positional table. Pure compute: arrays in, a module and a report out.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hypnogram import epoch_probabilities
from .models import StagingHead
from .results import MODALITIES, STAGES, TOKENS_PER_EPOCH
from .splits import split_by_group

__all__ = ["CRITERIA", "RefitReport", "StagingExample", "predict_epochs", "refit_staging", "split_by_group",
           "staging_scores"]

CRITERIA = ("macro_f1", "cohen_kappa", "accuracy")
GRAD_CLIP = 1.0  # max gradient norm per step: a few bad nights cannot throw the released weights far
N_STAGES = len(STAGES)


@dataclass
class StagingExample:
    """One scored night: token embeddings per modality ``(T, 128)`` (a missing modality is simply absent),
    one stage index per 30-s epoch in :data:`~inference.results.STAGES` order (-1: unscored or unknown),
    and the patient it belongs to.

    Labels beyond the night's last whole epoch are ignored; epochs beyond the labels count as unscored.

    Parameters
    ----------
    tokens : mapping of str to numpy.ndarray
        ``(T, 128)`` token embeddings by modality (as exported, or ``StudyResult.token_embeddings``).
    labels : numpy.ndarray
        Integer stage index per 30-s epoch, 0..4 in ``STAGES`` order, -1 for unscored.
    group : str, default ""
        The patient, named in error messages.
    """

    tokens: Mapping[str, np.ndarray]
    labels: np.ndarray
    group: str = ""


@dataclass
class RefitReport:
    """``before`` / ``after``: :func:`staging_scores` of the starting and the returned weights on the
    validation studies. ``best_epoch`` 0 means no training epoch beat the starting weights, which are
    then returned unchanged. ``history``: one row per training epoch (train loss, validation scores).

    Parameters
    ----------
    before, after : dict
        :func:`staging_scores` on the validation studies, of the starting and the returned weights.
    epochs_run : int
        Training epochs run (early stopping may end them before ``epochs``).
    best_epoch : int
        The epoch whose weights were returned (0: the starting weights).
    train_studies, val_studies : int
        Studies on each side.
    history : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``val_macro_f1``, ``val_cohen_kappa``,
        ``val_accuracy``, ``seconds``.
    criterion : str
        The validation score that chose the weights.
    class_weights : list of float or None
        Per stage in ``STAGES`` order; ``None`` when unweighted.
    train_epochs_scored : int
        Scored 30-s epochs in the training studies.
    seconds : float
        Wall time of the refit.
    settings : dict
        The arguments that shaped the run (epochs, lr, weight decay, patience, seed, class weighting,
        gradient clip, device).
    """

    before: dict
    after: dict
    epochs_run: int
    best_epoch: int
    train_studies: int
    val_studies: int
    history: list[dict]
    criterion: str = "macro_f1"
    class_weights: list[float] | None = None  # per stage, STAGES order; None when unweighted
    train_epochs_scored: int = 0
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)


# ---- inputs -----------------------------------------------------------------------------------------------
@dataclass
class _Night:
    """A checked night: float32 ``(T, E)`` arrays of the present modalities (the caller's own arrays when
    they are float32 already: nothing is copied until a step needs the stacked tensor)."""

    arrays: dict[str, np.ndarray]
    n_tokens: int
    embed_dim: int
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (T // 6,) epochs

    @property
    def mask(self) -> Tensor:
        """``(1, M)`` modality mask, True where a modality is missing."""
        return torch.tensor([[m not in self.arrays for m in MODALITIES]])

    def stacked(self, a: int = 0, b: int | None = None) -> Tensor:
        """``(1, M, b - a, E)`` float32 tokens ``a:b`` (zeros for a missing modality)."""
        b = self.n_tokens if b is None else b
        out = torch.zeros(1, len(MODALITIES), b - a, self.embed_dim)
        for i, m in enumerate(MODALITIES):
            if m in self.arrays:
                out[0, i] = torch.from_numpy(self.arrays[m][a:b])
        return out

    def token_labels(self) -> np.ndarray:
        """Each epoch's label on its six tokens; tokens of a trailing partial epoch -1."""
        out = np.full(self.n_tokens, -1, dtype=np.int64)
        out[: self.labels.size * TOKENS_PER_EPOCH] = np.repeat(self.labels, TOKENS_PER_EPOCH)
        return out


def _night(tokens: Mapping[str, np.ndarray], embed_dim: int, where: str) -> _Night:
    """Check one night's token embeddings (modalities known, shapes equal, values finite)."""
    unknown = sorted(set(tokens) - set(MODALITIES))
    if unknown:
        raise ValueError(f"{where}: unknown modalities {unknown}; expected some of {list(MODALITIES)}")
    arrays: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        arr = tokens.get(m)
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != embed_dim:
            raise ValueError(f"{where}: {m} tokens must be (tokens, {embed_dim}), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{where}: {m} tokens hold NaN or infinite values")
        arrays[m] = arr
    if not arrays:
        raise ValueError(f"{where}: no token embeddings in any modality")
    lengths = {a.shape[0] for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"{where}: modalities differ in token count ({sorted(lengths)})")
    n_tokens = lengths.pop()
    if n_tokens == 0:
        raise ValueError(f"{where}: no tokens")
    return _Night(arrays, n_tokens, embed_dim)


def _segments(n_tokens: int, limit: int) -> list[tuple[int, int]]:
    """Equal segments that each fit the positional table, as the engine cuts long nights."""
    n_segments = -(-n_tokens // limit)
    bounds = np.linspace(0, n_tokens, n_segments + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def _epoch_labels(labels: np.ndarray, n_tokens: int, where: str) -> np.ndarray:
    """Labels of the night's whole epochs (``T // 6``): extra labels dropped, missing ones -1."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must be one stage index per epoch, got shape {y.shape}")
    try:
        as_float = y.astype(np.float64)
    except (TypeError, ValueError):
        as_float = np.array([np.nan])
    if not (np.isfinite(as_float).all() and (as_float == np.round(as_float)).all()):
        raise ValueError(f"{where}: labels must be integer stage indices (-1: unscored)")
    y = as_float.astype(np.int64)
    bad = (y < -1) | (y >= N_STAGES)
    if bad.any():
        raise ValueError(f"{where}: labels must be -1 (unscored) or 0..{N_STAGES - 1} ({', '.join(STAGES)}); "
                         f"found {sorted(set(y[bad].tolist()))[:5]}")
    n_epochs = n_tokens // TOKENS_PER_EPOCH
    out = np.full(n_epochs, -1, dtype=np.int64)
    k = min(n_epochs, y.size)
    out[:k] = y[:k]
    return out


def _head_embed_dim(head: nn.Module) -> int:
    cfg = getattr(head, "cfg", None)
    return int(getattr(cfg, "embed_dim", 128))


# ---- prediction -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(head: nn.Module) -> Iterator[None]:
    was = head.training
    head.eval()
    try:
        yield
    finally:
        head.train(was)


def _token_probs(head: nn.Module, night: _Night, device: torch.device) -> np.ndarray:
    limit = head.positional_encoding.max_length
    mask = night.mask.to(device)
    probs = [torch.softmax(head(night.stacked(a, b).to(device), mask).float(), dim=-1)[0]
             for a, b in _segments(night.n_tokens, limit)]
    return torch.cat(probs).cpu().numpy()


def predict_epochs(head: nn.Module, tokens: Mapping[str, np.ndarray], device: str | torch.device = "cpu"
                   ) -> np.ndarray:
    """``(E, 5)`` stage probabilities per whole 30-s epoch (``E = T // 6``), columns in STAGES order.

    The token softmax averaged over each epoch's six tokens, nights longer than the head's positional
    table in equal segments, exactly as the engine stages a night. ``head`` must already be on
    ``device``; it is run in eval mode and its mode restored afterwards.

    Parameters
    ----------
    head : torch.nn.Module
        A staging head (e.g. ``ModelBundle.staging`` or one returned by :func:`refit_staging`).
    tokens : mapping of str to numpy.ndarray
        ``(T, 128)`` token embeddings by modality; a missing modality is absent.
    device : str or torch.device, default "cpu"
        Where ``head`` is.

    Returns
    -------
    numpy.ndarray
        ``(T // 6, 5)`` float32.

    Raises
    ------
    ValueError
        Unknown modalities, no modality, arrays of the wrong shape or of different lengths, no
        tokens, or NaN or infinite values.
    """
    night = _night(tokens, _head_embed_dim(head), "night")
    with _eval_mode(head), torch.no_grad():
        probs = _token_probs(head, night, torch.device(device))
    return epoch_probabilities(probs)


# ---- scores -----------------------------------------------------------------------------------------------
def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def staging_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Per-epoch agreement of predicted with true stages (both stage indices, scored epochs only).

    ``accuracy``; ``cohen_kappa`` (None when undefined: one class only on both sides); ``per_stage_f1``
    (None for a stage absent from the truth); ``macro_f1``, the mean F1 over the stages present in the
    truth (a predicted stage the scorers never used lowers the others' precision); ``confusion`` (5x5,
    rows true, columns predicted, STAGES order); ``n_epochs_scored``.

    Parameters
    ----------
    truth, pred : numpy.ndarray
        Stage indices (0..4, ``STAGES`` order) of the same scored epochs.

    Returns
    -------
    dict
        The scores above; every score is ``None`` when there is no epoch.

    References
    ----------
    .. [1] Cohen, J. (1960). A coefficient of agreement for nominal scales. *Educational and
       Psychological Measurement*, 20(1), 37-46.
    """
    truth = np.asarray(truth, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    confusion = np.zeros((N_STAGES, N_STAGES), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    n = int(confusion.sum())
    if n == 0:
        return {"accuracy": None, "cohen_kappa": None, "macro_f1": None,
                "per_stage_f1": {s: None for s in STAGES}, "confusion": confusion.tolist(), "n_epochs_scored": 0}
    po = np.trace(confusion) / n
    pe = float(confusion.sum(axis=1) @ confusion.sum(axis=0)) / n**2
    kappa = (po - pe) / (1.0 - pe) if pe < 1.0 else float("nan")
    per_stage: dict[str, float | None] = {}
    for k, s in enumerate(STAGES):
        support = confusion[k].sum()
        if support == 0:
            per_stage[s] = None
            continue
        tp, predicted = confusion[k, k], confusion[:, k].sum()
        per_stage[s] = float(2 * tp / (support + predicted))
    present = [v for v in per_stage.values() if v is not None]
    return {"accuracy": float(po), "cohen_kappa": _num(kappa), "macro_f1": float(np.mean(present)),
            "per_stage_f1": per_stage, "confusion": confusion.tolist(), "n_epochs_scored": n}


def _evaluate(head: nn.Module, nights: list[_Night], device: torch.device) -> dict[str, Any]:
    truth, pred = [], []
    with _eval_mode(head), torch.no_grad():
        for night in nights:
            scored = night.labels >= 0
            if not scored.any():
                continue
            probs = epoch_probabilities(_token_probs(head, night, device))
            truth.append(night.labels[scored])
            pred.append(probs.argmax(axis=1)[scored])
    if not truth:
        return staging_scores(np.zeros(0), np.zeros(0))
    return staging_scores(np.concatenate(truth), np.concatenate(pred))


# ---- re-fitting -------------------------------------------------------------------------------------------
def _prepare(examples: Sequence[StagingExample], embed_dim: int, side: str) -> list[_Night]:
    out = []
    for i, ex in enumerate(examples):
        where = f"{side} study {i}" + (f" (patient {ex.group})" if ex.group else "")
        night = _night(ex.tokens, embed_dim, where)
        night.labels = _epoch_labels(ex.labels, night.n_tokens, where)
        out.append(night)
    return out


def _class_weights(nights: list[_Night]) -> np.ndarray:
    """Inverse stage frequency over the scored training epochs, mean 1 over the scored epochs; a stage
    that never occurs gets 0 (it is never a target)."""
    counts = np.zeros(N_STAGES)
    for night in nights:
        counts += np.bincount(night.labels[night.labels >= 0], minlength=N_STAGES)
    present = counts > 0
    weights = np.zeros(N_STAGES)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """cuDNN in deterministic mode on CUDA for the duration (CPU kernels are deterministic already)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _better(value: float | None, best: float | None) -> bool:
    if value is None:
        return False
    return best is None or value > best + 1e-12


def refit_staging(head: StagingHead, train: Sequence[StagingExample], val: Sequence[StagingExample], *,
                  epochs: int = 20, lr: float = 1e-4, weight_decay: float = 1e-4, patience: int = 4,
                  seed: int = 0, class_weighted: bool = True, device: str | torch.device = "cpu",
                  criterion: str = "macro_f1") -> tuple[StagingHead, RefitReport]:
    """Fine-tune a copy of ``head`` on scored nights; returns ``(best copy, report)``.

    Cross-entropy per token (each epoch's label applies to its six tokens; -1 ignored; with
    ``class_weighted``, inverse-frequency stage weights from the training epochs), AdamW (``lr``,
    ``weight_decay``), gradient norm clipped at 1, one night per step (a night longer than the head's
    positional table: one segment per step, cut as the engine cuts it), nights in a seeded random order
    each epoch, dropout as in the release's training. After every epoch the validation studies are
    staged; the weights with the best validation ``criterion`` (``macro_f1``, ``cohen_kappa`` or
    ``accuracy``) are kept, the starting weights included (best epoch 0), and training stops after
    ``patience`` epochs without improvement. The returned head is in eval mode on ``device``.

    Deterministic for a given ``seed`` on CPU (the torch RNG is seeded inside a forked RNG state, so
    the caller's is left as it was). Raises ``ValueError`` when there is nothing to learn from or to
    validate on (no training or validation study, no scored epoch) or an input is malformed.

    Parameters
    ----------
    head : StagingHead
        The starting weights (e.g. the bundle's released head); never modified.
    train, val : sequence of StagingExample
        Training and validation nights; split them by patient
        (:func:`inference.splits.split_by_group`).
    epochs : int, default 20
        Training epochs at most (0: only the starting weights are scored).
    lr : float, default 1e-4
        AdamW learning rate, > 0.
    weight_decay : float, default 1e-4
        AdamW weight decay, >= 0.
    patience : int, default 4
        Epochs without improvement before stopping, >= 1.
    seed : int, default 0
        Seed of the night order and of torch's RNG (dropout).
    class_weighted : bool, default True
        Weight the cross-entropy by inverse stage frequency.
    device : str or torch.device, default "cpu"
        Where to train; the returned head is there.
    criterion : {"macro_f1", "cohen_kappa", "accuracy"}, default "macro_f1"
        The validation score that chooses the weights.

    Returns
    -------
    head : StagingHead
        The best copy, in eval mode.
    report : RefitReport
        Scores before and after, the history and the settings.

    Raises
    ------
    ValueError
        An unknown ``criterion``, invalid ``epochs``, ``patience``, ``lr`` or ``weight_decay``, no
        training or validation study, no scored epoch on either side, or malformed tokens or labels.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")
    if int(epochs) < 0 or int(patience) < 1:
        raise ValueError(f"epochs must be >= 0 and patience >= 1 (got {epochs}, {patience})")
    if not (lr > 0 and weight_decay >= 0):
        raise ValueError(f"lr must be > 0 and weight_decay >= 0 (got {lr}, {weight_decay})")
    if not train:
        raise ValueError("no training studies")
    if not val:
        raise ValueError("no validation studies (early stopping and the before/after report need some)")
    t0 = time.perf_counter()
    dev = torch.device(device)
    embed_dim = _head_embed_dim(head)
    train_nights = _prepare(train, embed_dim, "training")
    val_nights = _prepare(val, embed_dim, "validation")
    train_scored = sum(int((night.labels >= 0).sum()) for night in train_nights)
    if train_scored == 0:
        raise ValueError("no scored epochs in the training studies (every label is -1)")
    if not any((night.labels >= 0).any() for night in val_nights):
        raise ValueError("no scored epochs in the validation studies (every label is -1)")

    model = copy.deepcopy(head).to(dev).float()
    limit = model.positional_encoding.max_length
    weights = _class_weights(train_nights) if class_weighted else None
    weight_t = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=dev)
    # One step per night segment that holds a scored token: unscored nights take no part at all.
    steps = [(k, a, b) for k, night in enumerate(train_nights)
             for a, b in _segments(night.n_tokens, limit) if (night.token_labels()[a:b] >= 0).any()]
    order_rng = np.random.default_rng(seed)
    history: list[dict] = []
    forked = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), _deterministic(dev):
        torch.manual_seed(seed)
        before = _evaluate(model, val_nights, dev)
        best_value, best_epoch, best_scores = before[criterion], 0, before
        best_state = copy.deepcopy(model.state_dict())
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        since_best = 0
        epochs_run = 0
        for epoch in range(1, int(epochs) + 1):
            t_epoch = time.perf_counter()
            model.train()
            loss_sum, loss_tokens = 0.0, 0
            for j in order_rng.permutation(len(steps)):
                k, a, b = steps[j]
                loss, n_scored = _step(model, optimizer, train_nights[k], a, b, weight_t, dev)
                loss_sum += loss * n_scored
                loss_tokens += n_scored
            scores = _evaluate(model, val_nights, dev)
            epochs_run = epoch
            history.append({"epoch": epoch, "train_loss": loss_sum / max(loss_tokens, 1),
                            **{f"val_{c}": scores[c] for c in CRITERIA},
                            "seconds": round(time.perf_counter() - t_epoch, 3)})
            if _better(scores[criterion], best_value):
                best_value, best_epoch, best_scores = scores[criterion], epoch, scores
                best_state = copy.deepcopy(model.state_dict())
                since_best = 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
    model.load_state_dict(best_state)
    model.eval()
    report = RefitReport(
        before=before, after=best_scores, epochs_run=epochs_run, best_epoch=best_epoch,
        train_studies=len(train), val_studies=len(val), history=history, criterion=criterion,
        class_weights=None if weights is None else [float(w) for w in weights],
        train_epochs_scored=train_scored, seconds=round(time.perf_counter() - t0, 3),
        settings={"epochs": int(epochs), "lr": float(lr), "weight_decay": float(weight_decay),
                  "patience": int(patience), "seed": int(seed), "class_weighted": bool(class_weighted),
                  "grad_clip": GRAD_CLIP, "device": str(dev)},
    )
    return model, report


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, night: _Night, a: int, b: int,
          weight: Tensor | None, device: torch.device) -> tuple[float, int]:
    """One optimiser step on tokens ``a:b`` of a night; (loss, scored tokens). Skipped when unscored."""
    y = night.token_labels()[a:b]
    n_scored = int((y >= 0).sum())
    if n_scored == 0:
        return 0.0, 0
    target = torch.from_numpy(y).to(device)
    logits = model(night.stacked(a, b).to(device), night.mask.to(device))[0].float()
    loss = F.cross_entropy(logits, target, weight=weight, ignore_index=-1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return float(loss.detach()), n_scored
