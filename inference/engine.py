"""The inference engine: preprocessed nights in, :class:`StudyResult` out, on CPU or GPU.

Nights are cut into 5-minute windows of sixty 5-s tokens. The release silently drops a last
partial window; here one more window, aligned to the end of the recording, covers it and only its
new tokens are kept, so every full 5 s of the night gets a token. A night shorter than 5 minutes
is encoded as one shorter window (staged, and given hazards, from that window alone); one shorter than
a 30-s epoch is refused with :class:`InputError` (:func:`check_duration`).

The heads see the night as the release does: staging of the whole night and the hazards are computed
on the tokens of the whole 5-minute windows only (the release's windows), and the diagnosis head on at
most its positional table's length of them (6480 tokens, 9 h, in the release). The tail (the tokens
past the last whole window) is staged on its own, as a short segment, so that the hypnogram covers the
night without the tail changing what the bidirectional heads see of the rest; its tokens and epochs
are marked (``StudyResult.tail_start``).

Windows of every modality and every study in a call are batched together: the tokenizer runs on
all their channels at once, channel pooling per group of equal channel count (no padding, so no
compute is wasted on padded channels), and the temporal transformer on all windows at once.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .bundle import ModelBundle, load_bundle
from .heap import release_free_memory
from .hypnogram import build_staging
from .identity import Outcome
from .inputs import MIN_DURATION_S, InputError, _too_short, check_duration  # noqa: F401 - re-exported
from .models import InferenceTokenizer
from .results import (
    MODALITIES,
    STAGES,
    TOKENS_PER_EPOCH,
    TOKENS_PER_WINDOW,
    Hazards,
    StudyInput,
    StudyResult,
)

SAMPLE_RATE = 128
TOKEN_SAMPLES = 640
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs.

    ``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    ``precision``: ``fp32`` (default, the equivalence mode), ``bf16`` (CPU or CUDA autocast) or
    ``fp16`` (CUDA only). ``threads``: torch intra-op threads (``None`` keeps torch's default).
    ``windows_per_batch``: 5-minute windows per encoder forward pass; on CPU small batches stay
    in cache (see ``bench/``), on a GPU larger ones fill it.

    Parameters
    ----------
    device : str, default "auto"
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    precision : {"fp32", "bf16", "fp16"}, default "fp32"
        ``fp32`` is the equivalence mode; ``bf16`` runs under autocast on CPU or CUDA (on a CPU
        without native bf16 it is emulated, and :class:`Engine` warns); ``fp16`` on CUDA only.
    threads : int, optional
        Torch intra-op threads (``torch.set_num_threads``, process-wide); ``None`` keeps torch's
        default.
    windows_per_batch : int, optional
        5-minute windows per encoder forward pass; ``None``: 64 on CUDA, 8 on CPU.
    modality_attribution : bool, default True
        Also run the diagnosis head once per present modality with that modality masked, and report
        the change in each log-hazard (:attr:`inference.results.Hazards.attribution`). One head pass
        per modality on the encoded tokens; the encoder does not run again.
    """

    device: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    windows_per_batch: int | None = None
    modality_attribution: bool = True


@dataclass(frozen=True)
class _Window:
    study: int
    modality: str
    index: int  # position among the study's windows
    start: int  # first token
    length: int  # tokens in the window
    keep_from: int  # tokens before this are already covered by the previous window


def release_tokens(n_tokens: int) -> int:
    """Tokens covered by whole 5-minute windows (the release's windows); a night shorter than one
    window has none, and then its one short window stands in for them.

    Parameters
    ----------
    n_tokens : int
        Tokens in the night.

    Returns
    -------
    int
        ``60 * (n_tokens // 60)``, or ``n_tokens`` when that is 0. This is
        :attr:`StudyResult.tail_start`.
    """
    whole = (n_tokens // TOKENS_PER_WINDOW) * TOKENS_PER_WINDOW
    return whole if whole else n_tokens


def plan_windows(n_tokens: int) -> list[tuple[int, int, int]]:
    """``(start, length, keep_from)`` per window so that tokens ``0..n_tokens-1`` are each covered once.

    Parameters
    ----------
    n_tokens : int
        Tokens in the night.

    Returns
    -------
    list of tuple of int
        One ``(start, length, keep_from)`` per window: whole 60-token windows from token 0, then, when
        ``n_tokens`` is not a multiple of 60, one window aligned to the end whose first ``keep_from``
        tokens are already covered by the window before it. A night shorter than 60 tokens is one
        window of ``n_tokens``; no tokens give an empty list.

    Examples
    --------
    >>> plan_windows(130)
    [(0, 60, 0), (60, 60, 0), (70, 60, 50)]
    """
    if n_tokens <= 0:
        return []
    if n_tokens < TOKENS_PER_WINDOW:
        return [(0, n_tokens, 0)]
    full, rest = divmod(n_tokens, TOKENS_PER_WINDOW)
    plan = [(i * TOKENS_PER_WINDOW, TOKENS_PER_WINDOW, 0) for i in range(full)]
    if rest:
        plan.append((n_tokens - TOKENS_PER_WINDOW, TOKENS_PER_WINDOW, TOKENS_PER_WINDOW - rest))
    return plan


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Parameters
    ----------
    name : str
        ``"auto"`` or any name ``torch.device`` accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

    Returns
    -------
    torch.device
        The device to run on.

    Raises
    ------
    ValueError
        When a CUDA device is requested and CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


_INPUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))  # kept as given; float16 is the pipeline's storage


def _validate(study: StudyInput, position: int) -> tuple[dict[str, np.ndarray], int]:
    """Check one study's signals; return them as float16 or float32 arrays (others converted to
    float32) and the token count."""
    where = f"study {study.key or position}"
    unknown = sorted(set(study.signals) - set(MODALITIES))
    if unknown:
        raise InputError(f"{where}: unknown modalities {unknown}; expected some of {list(MODALITIES)}")
    signals: dict[str, np.ndarray] = {}
    lengths = set()
    for modality in MODALITIES:
        arr = study.signals.get(modality)
        if arr is None:
            continue
        arr = np.asarray(arr)
        if arr.dtype not in _INPUT_DTYPES:
            arr = arr.astype(np.float32)
        if arr.ndim != 2:
            raise InputError(f"{where}: {modality} must be (channels, samples), got shape {arr.shape}")
        if arr.shape[0] == 0:
            continue
        # Row by row: a whole-modality boolean temporary would cost ~30 MB on an 8-hour night.
        if not all(np.isfinite(row).all() for row in arr):
            raise InputError(f"{where}: {modality} holds NaN or infinite values")
        signals[modality] = arr
        lengths.add(arr.shape[1])
    if not signals:
        raise InputError(f"{where}: no mapped channel in any modality; nothing to encode")
    if len(lengths) != 1:
        raise InputError(f"{where}: modalities differ in length ({sorted(lengths)} samples at 128 Hz)")
    n_samples = lengths.pop()
    n_tokens = n_samples // TOKEN_SAMPLES
    if n_tokens < TOKENS_PER_EPOCH:
        # Fewer than six tokens give no 30-s epoch: staging would have nothing to score (and used to
        # fail in a reshape); 6 tokens are exactly MIN_DURATION_S of samples.
        raise InputError(f"{where}: {_too_short(n_samples / SAMPLE_RATE)}")
    return signals, n_tokens


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); without it, bf16 is emulated.

    Returns
    -------
    bool
        False too when torch cannot tell.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Engine:
    """Runs a :class:`ModelBundle` over studies. Create once; reuse for many studies.

    The bundle's networks are moved to the engine's device (in place: the bundle is then tied to
    that device) and put in eval mode.

    Parameters
    ----------
    bundle : ModelBundle
        The networks and their identity, e.g. from :func:`inference.bundle.load_bundle`.
    options : EngineOptions, optional
        Device, precision, threads and batch size; the defaults when ``None``.

    Raises
    ------
    ValueError
        An unknown precision, ``fp16`` on a device other than CUDA, or a CUDA device without CUDA.

    Warns
    -----
    RuntimeWarning
        ``bf16`` on a CPU without native bf16 support (emulated, several times slower than fp32).

    See Also
    --------
    inference.results.StudyInput : What :meth:`run` takes.
    inference.results.StudyResult : What it returns.

    Examples
    --------
    A sketch (the demo bundle's weights are untrained; its outputs mean nothing clinically):

    >>> import numpy as np
    >>> from inference.bundle import ensure_demo_bundle
    >>> from inference.results import StudyInput
    >>> engine = Engine.from_bundle_dir(ensure_demo_bundle())  # doctest: +SKIP
    >>> bas = np.random.default_rng(0).standard_normal((2, 128 * 600), dtype=np.float32)
    >>> result = engine.run(StudyInput({"BAS": bas}, age_years=57, sex="F"))  # doctest: +SKIP
    >>> result.night_vector.shape, len(result.staging.hypnogram)  # doctest: +SKIP
    ((512,), 20)
    """

    def __init__(self, bundle: ModelBundle, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        if self.options.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.options.precision!r}")
        self.device = resolve_device(self.options.device)
        if self.options.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 runs on CUDA only; use bf16 on CPU")
        if self.options.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and several times "
                          "slower than fp32; use fp32", RuntimeWarning, stacklevel=2)
        if self.options.threads:
            torch.set_num_threads(int(self.options.threads))
        self.bundle = bundle
        for module in bundle.modules():
            module.to(self.device).eval()
        self._tokenizer = InferenceTokenizer(bundle.encoder.patch_embedding)
        self.windows_per_batch = self.options.windows_per_batch or (
            64 if self.device.type == "cuda" else 8
        )

    @classmethod
    def from_bundle_dir(cls, path: str | Path, options: EngineOptions | None = None) -> Engine:
        """Load the bundle folder at ``path`` and make an engine for it.

        Parameters
        ----------
        path : str or pathlib.Path
            A model bundle folder (see :mod:`inference.bundle`).
        options : EngineOptions, optional
            As for :class:`Engine`.

        Returns
        -------
        Engine
            ``Engine(load_bundle(path), options)``.

        Raises
        ------
        inference.bundle.BundleError
            The folder is not a complete, consistent bundle.
        """
        return cls(load_bundle(path), options)

    # -- public API ---------------------------------------------------------------------------

    def run(self, study: StudyInput) -> StudyResult:
        """Encode one night and apply the heads.

        Parameters
        ----------
        study : StudyInput
            One preprocessed night.

        Returns
        -------
        StudyResult
            Its embeddings, hypnogram, hazards and the bundle identity.

        Raises
        ------
        InputError
            Unknown modalities, no channel in any modality, arrays that are not
            ``(channels, samples)``, NaN or infinite samples, modalities of different lengths, or
            less than one 30-s epoch of samples.
        """
        return self.run_many([study])[0]

    def run_many(
        self, studies: Sequence[StudyInput], progress: Callable[[int, int], None] | None = None
    ) -> list[StudyResult]:
        """Encode several nights with windows batched across them; results in input order.

        ``progress(done, total)`` is called after each encoder batch, counting windows.

        Parameters
        ----------
        studies : sequence of StudyInput
            The nights; all are checked before any is encoded.
        progress : callable, optional
            ``progress(done, total)``, in 5-minute windows over all studies and modalities.

        Returns
        -------
        list of StudyResult
            One per study, in input order.

        Raises
        ------
        InputError
            As for :meth:`run`, naming the study (its key, or its position).
        """
        checked = [_validate(study, i) for i, study in enumerate(studies)]
        # torch keeps a thread count per thread once it has run there: an engine made in one thread and
        # run in another (the daemon's workers, infer's loader) must set its count where it runs.
        if self.options.threads and torch.get_num_threads() != int(self.options.threads):
            torch.set_num_threads(int(self.options.threads))
        with torch.inference_mode(), self._autocast():
            t0 = time.perf_counter()
            windows, tokens = self._encode(checked, progress)
            # What the encoder's batches freed, glibc keeps (fragmented); handed back before the heads
            # allocate theirs (on the 8-hour night the heads' peak came on top of 40-100 MB of it).
            release_free_memory()
            t_encode = time.perf_counter() - t0
            results = []
            for i, study in enumerate(studies):
                t1 = time.perf_counter()
                result = self._finish(study, checked[i], windows[i], tokens[i])
                result.timings_s = {"encode": t_encode / len(studies), "heads": time.perf_counter() - t1}
                results.append(result)
        return results

    # -- encoder ------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.options.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _batches(self, jobs: list[_Window]) -> Iterator[list[_Window]]:
        """Windows of equal length, ``windows_per_batch`` at a time, longest windows first."""
        by_length: dict[int, list[_Window]] = defaultdict(list)
        for job in jobs:
            by_length[job.length].append(job)
        for length in sorted(by_length, reverse=True):
            same = by_length[length]
            for i in range(0, len(same), self.windows_per_batch):
                yield same[i : i + self.windows_per_batch]

    def _encode(self, checked, progress):
        """Returns per study: {modality: (N, E) window vectors}, {modality: (T, E) token embeddings}."""
        embed = self.bundle.encoder.cfg.embed_dim
        windows: list[dict[str, Tensor]] = []
        tokens: list[dict[str, Tensor]] = []
        jobs: list[_Window] = []
        for s, (signals, n_tokens) in enumerate(checked):
            plan = plan_windows(n_tokens)
            windows.append({m: torch.empty(len(plan), embed) for m in signals})
            tokens.append({m: torch.empty(n_tokens, embed) for m in signals})
            jobs += [_Window(s, m, i, start, length, keep)
                     for m in signals for i, (start, length, keep) in enumerate(plan)]
        total = len(jobs)
        done = 0
        for batch in self._batches(jobs):
            pooled, contextual = self._encode_batch(batch, checked)
            pooled, contextual = pooled.float().cpu(), contextual.float().cpu()
            for j, w in enumerate(batch):
                windows[w.study][w.modality][w.index] = pooled[j]
                tokens[w.study][w.modality][w.start + w.keep_from : w.start + w.length] = contextual[j, w.keep_from :]
            done += len(batch)
            if progress is not None:
                progress(done, total)
        return windows, tokens

    def _encode_batch(self, batch: list[_Window], checked) -> tuple[Tensor, Tensor]:
        encoder = self.bundle.encoder
        length = batch[0].length
        span = length * TOKEN_SAMPLES
        # All channels of all windows through the tokenizer in one pass.
        pieces = [
            checked[w.study][0][w.modality][:, w.start * TOKEN_SAMPLES : w.start * TOKEN_SAMPLES + span]
            for w in batch
        ]
        counts = [p.shape[0] for p in pieces]
        # float16 signals (the pipeline's storage) become float32 in the one copy that gathers them on CPU,
        # and on the device after the transfer (half the bytes) on a GPU
        gather = np.float32 if self.device.type == "cpu" else None
        patches = torch.from_numpy(np.concatenate(pieces, axis=0, dtype=gather)).to(self.device, non_blocking=True)
        patches = patches.float()
        channel_tokens = self._tokenizer(patches.reshape(-1, length, TOKEN_SAMPLES))
        per_window = torch.split(channel_tokens, counts, dim=0)  # each (C, L, E)
        # Channel pooling per group of windows with the same channel count.
        pooled_seq: list[Tensor | None] = [None] * len(batch)
        groups: dict[int, list[int]] = defaultdict(list)
        for j, c in enumerate(counts):
            groups[c].append(j)
        for members in groups.values():
            stacked = torch.stack([per_window[j] for j in members])  # (n, C, L, E)
            merged = encoder.pool_channels(stacked)
            for k, j in enumerate(members):
                pooled_seq[j] = merged[k]
        return encoder.contextualize(torch.stack(pooled_seq))  # type: ignore[arg-type]

    # -- heads --------------------------------------------------------------------------------

    def _finish(self, study: StudyInput, checked, windows, tokens) -> StudyResult:
        signals, n_tokens = checked
        present = [m for m in MODALITIES if m in signals]
        missing = [m for m in MODALITIES if m not in signals]
        embed = self.bundle.encoder.cfg.embed_dim
        # The release's windows: whole 5-minute windows (the end-aligned tail window overlaps the last
        # of them, so it stays out of the night vector), or the one short window of a short night.
        tail_start = release_tokens(n_tokens)
        n_whole = max(1, tail_start // TOKENS_PER_WINDOW)
        night = np.full(len(MODALITIES) * embed, np.nan, dtype=np.float32)
        for i, m in enumerate(MODALITIES):
            if m in windows:
                night[i * embed : (i + 1) * embed] = windows[m][:n_whole].mean(dim=0).numpy()
        stacked = torch.zeros(1, len(MODALITIES), n_tokens, embed)
        for i, m in enumerate(MODALITIES):
            if m in tokens:
                stacked[0, i] = tokens[m]
        stacked = stacked.to(self.device)
        modality_mask = torch.tensor([[m not in signals for m in MODALITIES]], device=self.device)

        age_feature, sex_feature = self.bundle.demographics.encode(study.age_years, study.sex)
        staging = None
        if self.bundle.staging is not None:
            probs = [self._stage(stacked[:, :, :tail_start], modality_mask)]
            if tail_start < n_tokens:
                probs.append(self._stage(stacked[:, :, tail_start:], modality_mask))
            staging = build_staging(np.concatenate(probs), tail_start)
        hazards = None
        diagnosis_tokens = 0
        if self.bundle.diagnosis is not None:
            diagnosis_tokens = min(tail_start, self.bundle.diagnosis.positional_encoding.max_length)
            demo = torch.tensor([[age_feature, sex_feature]], device=self.device)
            log_hazard = self.bundle.diagnosis(stacked[:, :, :diagnosis_tokens], demo, modality_mask)
            hazards = Hazards(log_hazard[0].float().cpu().numpy(), self.bundle.outcomes)
            if self.options.modality_attribution and len(present) > 1:
                hazards.attribution = self._attribution(stacked[:, :, :diagnosis_tokens], demo, modality_mask,
                                                        present, hazards.log_hazard)
        hazards, site_results = self._site_heads(study, night, tokens, hazards)
        return StudyResult(
            key=study.key,
            n_tokens=n_tokens,
            modalities=present,
            missing_modalities=missing,
            token_embeddings={m: tokens[m].numpy() for m in present},
            window_embeddings={m: windows[m].numpy() for m in present},
            night_vector=night,
            staging=staging,
            hazards=hazards,
            bundle=self.bundle.identity,
            demographics_used={
                "age_years": study.age_years, "sex": study.sex,
                "age_feature": age_feature, "sex_feature": sex_feature,
            },
            demographics_encoding=self.bundle.demographics.label,
            tail_start=tail_start,
            diagnosis_tokens=diagnosis_tokens,
            device=str(self.device),
            precision=self.options.precision,
            site_results=site_results,
        )

    def _site_heads(self, study: StudyInput, night: np.ndarray, tokens: dict[str, Tensor],
                    hazards: Hazards | None) -> tuple[Hazards | None, dict[str, dict]]:
        """The site's own heads on this night: Cox outcomes join the hazards (named by their head),
        the apnea head's result goes beside them."""
        if not self.bundle.site_heads:
            return hazards, {}
        from .site_heads import apply_apnea, apply_cox

        values = [] if hazards is None else list(hazards.log_hazard.astype(np.float32))
        outcomes = [] if hazards is None else list(hazards.outcomes)
        site: dict[str, dict] = {}
        for head in self.bundle.site_heads:
            if head.cox:
                for label, lp in apply_cox(head, night, study.age_years, study.sex):
                    outcomes.append(Outcome(len(outcomes), label, label, head.ident))
                    values.append(lp)
            if head.apnea is not None:
                site[head.name] = apply_apnea(head, night, {m: t.numpy() for m, t in tokens.items()})
        if not outcomes:
            return hazards, site
        attribution = {} if hazards is None else hazards.attribution
        return Hazards(np.asarray(values, dtype=np.float32), outcomes, attribution), site

    def _attribution(self, stacked: Tensor, demo: Tensor, modality_mask: Tensor, present: list[str],
                     log_hazard: np.ndarray) -> dict[str, np.ndarray]:
        """The diagnosis head once per present modality with that modality masked: how much each moved
        every log-hazard (the head masks a modality as it masks a missing one)."""
        head = self.bundle.diagnosis
        assert head is not None
        out: dict[str, np.ndarray] = {}
        for modality in present:
            mask = modality_mask.clone()
            mask[0, MODALITIES.index(modality)] = True
            without = head(stacked, demo, mask)[0].float().cpu().numpy()
            out[modality] = (log_hazard - without).astype(np.float32)
        return out

    def _stage(self, stacked: Tensor, modality_mask: Tensor) -> np.ndarray:
        """Stage probabilities per token; nights longer than the head's positional table go in
        equal segments that each fit it."""
        head = self.bundle.staging
        assert head is not None
        n_tokens = stacked.shape[2]
        limit = head.positional_encoding.max_length
        n_segments = -(-n_tokens // limit)
        bounds = np.linspace(0, n_tokens, n_segments + 1).round().astype(int)
        probs = [
            torch.softmax(head(stacked[:, :, a:b], modality_mask).float(), dim=-1)[0]
            for a, b in itertools.pairwise(bounds)
        ]
        out = torch.cat(probs).cpu().numpy()
        assert out.shape == (n_tokens, len(STAGES))
        return out
