"""From a decoded :class:`Recording` to the engine's input: map channels, preprocess, assemble.

Channels are read and preprocessed one at a time straight into the 128 Hz arrays, so a night
never sits in memory at its native rates all at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from inference.preprocess import n_target_samples, preprocess_channel
from inference.results import StudyInput

from .montage import MontageMatch, MontageTable
from .recording import Recording


class MappingError(ValueError):
    """No channel of the recording maps to any modality."""


@dataclass
class PreparedStudy:
    study: StudyInput
    match: MontageMatch
    channels: dict[str, list[str]]  # modality -> labels used, in row order
    timings_s: dict[str, float] = field(default_factory=dict)


def prepare_study(
    recording: Recording,
    table: MontageTable,
    key: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PreparedStudy:
    """Map ``recording``'s channels with ``table`` and preprocess them for the engine.

    ``progress(done, total)`` is called after each channel.
    """
    labels = [ch.label for ch in recording.channels]
    match = table.map_labels(labels)
    if not any(match.groups.values()):
        raise MappingError(
            f"no channel maps to a modality (labels: {', '.join(labels) or 'none'}); "
            "add the site's labels to the montage table"
        )
    n_out = n_target_samples(recording.duration_s)
    total = sum(len(ix) for ix in match.groups.values())
    done, t_read, t_pre = 0, 0.0, 0.0
    signals: dict[str, np.ndarray] = {}
    used: dict[str, list[str]] = {}
    for modality, indices in match.groups.items():
        block = np.empty((len(indices), n_out), dtype=np.float32)
        for row, index in enumerate(indices):
            channel = recording.channels[index]
            t0 = time.perf_counter()
            samples = channel.read()
            t1 = time.perf_counter()
            block[row] = preprocess_channel(samples, channel.sampling_rate, n_out=n_out)
            t_pre += time.perf_counter() - t1
            t_read += t1 - t0
            del samples
            done += 1
            if progress is not None:
                progress(done, total)
        signals[modality] = block
        used[modality] = [recording.channels[i].label for i in indices]
    demographics = recording.demographics
    study = StudyInput(
        signals=signals,
        age_years=demographics.age_at(recording.start),
        sex=demographics.sex,
        key=key,
    )
    return PreparedStudy(study, match, used, {"read": t_read, "preprocess": t_pre})
