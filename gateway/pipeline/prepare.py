"""From a decoded :class:`Recording` to the engine's input: map channels, preprocess, assemble.

Channels are read and preprocessed one at a time into the 128 Hz arrays (float16, the release's
storage: :data:`inference.preprocess.STORED_DTYPE`), so a night never sits in memory at its native
rates all at once. While a channel's raw samples and its float32 128 Hz row are in memory, the
signal-quality gate (:mod:`inference.quality`) measures it; the study's verdict goes with the ready
study into ``metrics.json`` (``quality``), where the flag step reads it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from inference.gaps import preprocess_with_gaps
from inference.heap import release_free_memory
from inference.inputs import check_duration
from inference.preprocess import STORED_DTYPE, n_target_samples
from inference.quality import (
    ChannelQuality,
    QualityThresholds,
    StudyQuality,
    assess_channel,
    assess_row,
    assess_study,
)
from inference.results import StudyInput

from ..montage.table import MontageMatch, MontageTable
from ..recording import Recording

if TYPE_CHECKING:
    from ..respiratory import ScoredNight


class MappingError(ValueError):
    """No channel of the recording maps to any modality."""


@dataclass
class ReadyStudy:
    """A study decoded, mapped and preprocessed: the one value the engine takes and the outputs describe.

    ``engine_input`` is what the encoder runs on; the rest says how it was made (the montage match,
    the rows used per modality, gaps and dropped channels, the signal quality of every mapped channel)
    for ``metrics.json``, the study's events and the batch tally. ``recording`` keeps the metadata only
    (its sample sources detached), so the value crosses process boundaries (an archive batch prepares in
    worker processes). :func:`prepare_study` always sets ``quality``.
    """

    engine_input: StudyInput
    recording: Recording
    table: MontageTable
    source: str | None
    match: MontageMatch
    channels: dict[str, list[str]]  # modality -> labels used, in row order
    timings_s: dict[str, float] = field(default_factory=dict)  # read, preprocess, quality (joined to the result's)
    gap_fraction: dict[str, float] = field(default_factory=dict)  # label -> share of the night in gaps
    dropped: dict[str, str] = field(default_factory=dict)  # label -> why it was not used
    stage_s: dict[str, float] = field(default_factory=dict)  # decode_s, map_s: the pipeline's stage timings
    quality: StudyQuality | None = None  # the signal-quality gate's verdict (inference.quality)
    # A scoring file read beside the recording (an archive batch: gateway.respiratory.ScoredNight) and its
    # naming form (X-nsrr.xml): the scored hypnogram for the agreement and the respiratory indices in metrics.json.
    scoring: ScoredNight | None = None
    scoring_name: str | None = None


def prepare_study(
    recording: Recording,
    table: MontageTable,
    key: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    source: str | None = None,
    quality: QualityThresholds | None = None,
) -> ReadyStudy:
    """Map ``recording``'s channels with ``table`` and preprocess them for the engine.

    ``source`` (``dicom:<AE title>``, ``folder:<path>``) selects the table's scoped rules.
    ``progress(done, total)`` is called after each channel. A recording shorter than one 30-s epoch is
    refused with :class:`~inference.engine.InputError` before any channel is read. ``quality``: the
    signal-quality gate's thresholds (None: the defaults); every mapped channel is measured, a dropped
    one included.
    """
    # Before mapping and preprocessing: a 0-s recording would otherwise fail in n_target_samples with an
    # internal ValueError, and a few seconds would be preprocessed only for the engine to refuse them.
    check_duration(recording.duration_s)
    labels = recording.channel_labels
    match = table.map_labels(labels, source=source, codes=recording.channel_codes)
    if not any(match.groups.values()):
        raise MappingError(
            f"no channel maps to a modality (labels: {', '.join(labels) or 'none'}); "
            "add the site's labels to the montage table"
        )
    n_out = n_target_samples(recording.duration_s)
    # The release's reader brings every channel up to the recording's highest rate first (mapped or
    # not, as MNE reads them all); preprocessing reproduces that, see inference.upsample.
    top_rate = recording.highest_rate
    total = sum(len(ix) for ix in match.groups.values())
    thresholds = quality or QualityThresholds()
    t_read, t_pre, t_quality = 0.0, 0.0, 0.0
    measured: dict[int, ChannelQuality] = {}
    gaps: dict[str, float] = {}
    dropped: dict[str, str] = {}
    # float16, as the release stores them: its model input, in half the memory (inference.preprocess).
    # Untouched pages of np.empty take no memory: a block grows as its rows are written.
    blocks = {m: np.empty((len(ix), n_out), dtype=STORED_DTYPE) for m, ix in match.groups.items() if ix}
    kept: dict[str, list[bool]] = {m: [False] * len(ix) for m, ix in match.groups.items()}
    # The order channels are taken in (their rows still go in the table's order): the longest first,
    # since each needs a few times its length in scratch while it is preprocessed, and taken first that
    # scratch does not come on top of the other channels' finished rows; and the channels that the
    # release upsamples before those at the top rate, whose time-domain filter needs scipy.signal: its
    # import then runs beside the upsampled channels' transforms (inference.preprocess). On the 8-hour
    # bench night this order and the trims below took infer's peak memory from 815-861 MB to 680-750 MB.
    def taken_first(job: tuple[str, int, int]) -> tuple[bool, int]:
        channel = recording.channels[job[2]]
        return top_rate is not None and channel.sampling_rate >= top_rate, -channel.n_samples

    order = sorted(((m, pos, index) for m, ix in match.groups.items() for pos, index in enumerate(ix)),
                   key=taken_first)
    for done, (modality, position, index) in enumerate(order, start=1):
        channel = recording.channels[index]
        t0 = time.perf_counter()
        samples = channel.read()
        valid = channel.read_valid()
        t1 = time.perf_counter()
        # Before preprocessing, which overwrites the samples in place.
        checked = assess_channel(channel.label, modality, samples, channel.sampling_rate, unit=channel.unit,
                                 valid=valid, physical_range=channel.physical_range, thresholds=thresholds)
        t2 = time.perf_counter()
        try:
            row, gap = preprocess_with_gaps(
                samples, valid, channel.sampling_rate, n_out, recording_rate=top_rate,
                overwrite_input=True)  # read() gave us our own copy
        except ValueError as exc:
            # One dead channel (all gap) must not sink the study; it is reported instead.
            dropped[channel.label] = str(exc)
            checked = dropped_channel(checked, str(exc))
            t3 = time.perf_counter()
        else:
            blocks[modality][position] = row
            kept[modality][position] = True
            if gap:
                gaps[channel.label] = round(gap, 6)
            t3 = time.perf_counter()
            checked = assess_row(checked, row)  # measured on the float32 row, before its storage
            del row
        measured[index] = checked
        t_quality += (t2 - t1) + (time.perf_counter() - t3)
        t_pre += t3 - t2
        t_read += t1 - t0
        del samples, valid
        release_free_memory()  # this channel's scratch, before the next channel's (inference.heap)
        if progress is not None:
            progress(done, total)
    signals: dict[str, np.ndarray] = {}
    used: dict[str, list[str]] = {}
    for modality, indices in match.groups.items():
        if not any(kept[modality]):
            continue
        block = blocks[modality]
        # (a dropped channel's row is left out: a copy of the block, only then)
        signals[modality] = block if all(kept[modality]) else block[np.asarray(kept[modality])]
        used[modality] = [recording.channels[i].label for i, k in zip(indices, kept[modality]) if k]
    measured_in_order = [measured[index] for indices in match.groups.values() for index in indices]
    if not signals:
        # Label and reason per channel, unquoted: a dict's repr would quote them, and quoted text is what
        # the pipeline's error scrubber removes (it stands for a value) - leaving nothing to read.
        raise MappingError("no usable channel: " + "; ".join(f"{label}: {why}" for label, why in dropped.items()))
    demographics = recording.demographics
    engine_input = StudyInput(
        signals=signals,
        age_years=demographics.age_at(recording.start),
        sex=demographics.sex,
        key=key,
    )
    t0 = time.perf_counter()
    verdict = assess_study(measured_in_order, thresholds)
    t_quality += time.perf_counter() - t0
    return ReadyStudy(engine_input, recording.detached(), table, source, match, used,
                      {"read": t_read, "preprocess": t_pre, "quality": t_quality}, gaps, dropped,
                      quality=verdict)


def dropped_channel(checked: ChannelQuality, why: str) -> ChannelQuality:
    """A mapped channel that preprocessing refused (no measured sample...): unusable, whatever the
    measures say, with the reason in its notes."""
    problems = checked.problems if "dropped" in checked.problems else [*checked.problems, "dropped"]
    return dataclasses.replace(checked, problems=problems, notes=[*checked.notes, f"dropped: {why}"])
