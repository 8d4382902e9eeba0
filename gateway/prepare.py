"""From a decoded :class:`Recording` to the engine's input: map channels, preprocess, assemble.

Channels are read and preprocessed straight into the 128 Hz arrays, one at a time per preprocessing
thread, so a night never sits in memory at its native rates all at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from inference.gaps import preprocess_with_gaps
from inference.preprocess import default_workers, n_target_samples
from inference.results import StudyInput

from .montage import MontageMatch, MontageTable
from .recording import Recording


class MappingError(ValueError):
    """No channel of the recording maps to any modality."""


@dataclass(frozen=True)
class _ChannelDone:
    label: str
    gap: float | None  # share of the channel in gaps; None when the channel was dropped
    error: str | None  # why the channel was dropped
    read_s: float
    preprocess_s: float


@dataclass
class PreparedStudy:
    study: StudyInput
    match: MontageMatch
    channels: dict[str, list[str]]  # modality -> labels used, in row order
    timings_s: dict[str, float] = field(default_factory=dict)
    gap_fraction: dict[str, float] = field(default_factory=dict)  # label -> share of the night in gaps
    dropped: dict[str, str] = field(default_factory=dict)  # label -> why it was not used


def prepare_study(
    recording: Recording,
    table: MontageTable,
    key: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    source: str | None = None,
) -> PreparedStudy:
    """Map ``recording``'s channels with ``table`` and preprocess them for the engine.

    ``source`` (``dicom:<AE title>``, ``folder:<path>``) selects the table's scoped rules.
    ``progress(done, total)`` is called after each channel.
    """
    labels = recording.channel_labels
    match = table.map_labels(labels, source=source)
    if not any(match.groups.values()):
        raise MappingError(
            f"no channel maps to a modality (labels: {', '.join(labels) or 'none'}); "
            "add the site's labels to the montage table"
        )
    n_out = n_target_samples(recording.duration_s)
    # The release's reader brings every channel up to the recording's highest rate first (mapped or
    # not, as MNE reads them all); preprocessing reproduces that, see inference.upsample.
    top_rate = recording.highest_rate
    jobs = [(modality, row, index) for modality, indices in match.groups.items() for row, index in enumerate(indices)]
    blocks = {m: np.empty((len(ix), n_out), dtype=np.float32) for m, ix in match.groups.items() if ix}
    # Channels are independent: with more than one preprocessing thread, that many run at once, one thread
    # each (the release-equal upsampling is FFT-bound and an FFT uses one core); a batch worker sets 1.
    threads = min(default_workers(), len(jobs))
    per_channel = 1 if threads > 1 else None

    def work(job: tuple[str, int, int]) -> _ChannelDone:
        modality, row, index = job
        channel = recording.channels[index]
        t0 = time.perf_counter()
        samples = channel.read()
        valid = channel.read_valid()
        t1 = time.perf_counter()
        try:
            blocks[modality][row], gap = preprocess_with_gaps(
                samples, valid, channel.sampling_rate, n_out, recording_rate=top_rate, workers=per_channel)
        except ValueError as exc:
            # One dead channel (all gap) must not sink the study; it is reported instead.
            return _ChannelDone(channel.label, None, str(exc), t1 - t0, time.perf_counter() - t1)
        return _ChannelDone(channel.label, gap, None, t1 - t0, time.perf_counter() - t1)

    t_start = time.perf_counter()
    done_list: list[_ChannelDone] = []
    with ThreadPoolExecutor(threads, thread_name_prefix="psg-channel") if threads > 1 else nullcontext() as pool:
        for done in (pool.map(work, jobs) if pool is not None else map(work, jobs)):
            done_list.append(done)
            if progress is not None:
                progress(len(done_list), len(jobs))
    wall = time.perf_counter() - t_start
    kept: dict[str, list[int]] = {m: [] for m in blocks}
    used: dict[str, list[str]] = {m: [] for m in blocks}
    gaps: dict[str, float] = {}
    dropped: dict[str, str] = {}
    for (modality, row, _), d in zip(jobs, done_list):
        if d.error is not None:
            dropped[d.label] = d.error
            continue
        kept[modality].append(row)
        used[modality].append(d.label)
        if d.gap:
            gaps[d.label] = round(d.gap, 6)
    signals = {m: blocks[m] if len(rows) == len(blocks[m]) else blocks[m][rows]
               for m, rows in kept.items() if rows}
    used = {m: labels for m, labels in used.items() if labels}
    t_read = sum(d.read_s for d in done_list)
    t_pre = sum(d.preprocess_s for d in done_list)
    if not signals:
        raise MappingError(f"no usable channel: {dropped}")
    demographics = recording.demographics
    study = StudyInput(
        signals=signals,
        age_years=demographics.age_at(recording.start),
        sex=demographics.sex,
        key=key,
    )
    # read and preprocess: seconds spent per channel, added up (with channel threads, more than the wall
    # time); prepare: the wall time of the whole step.
    timings = {"read": t_read, "preprocess": t_pre, "prepare": wall}
    return PreparedStudy(study, match, used, timings, gaps, dropped)
