"""The study steps: decode, prepare (map + preprocess), infer, store.

``psg-gateway infer``, the daemon's workers and the archive batch call these same functions, so a file
run by hand, the same file dropped into the daemon's folder and the same file in an archive give the
same outputs. Each step takes and gives one value: paths -> :class:`~gateway.recording.Recording`
-> :class:`~gateway.pipeline.prepare.ReadyStudy` -> :class:`~inference.results.StudyResult` -> files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.quality import QualityThresholds
from inference.results import StudyResult

from ..identifier_limits import apply_identifier_limits
from ..montage.table import MontageTable
from ..readers import read_recording
from ..readers.dicom_waveform import read_dicom_study
from ..recording import Annotation, Recording
from .identifiers import apply_site_identifiers
from .outputs import write_study_outputs
from .prepare import ReadyStudy, prepare_study
from .scoring import agreement, reference_hypnogram

if TYPE_CHECKING:  # the engine (torch) loads only where a study is inferred
    from inference.engine import Engine

__all__ = [
    "ReadyStudy",
    "decode_and_prepare",
    "decode_inputs",
    "infer_ready",
    "outputs_extra",
    "prepare_study",
    "respiratory_summary",
    "scored_stage_annotations",
    "shift_annotations",
    "staging_agreement",
    "store_outputs",
]

Progress = Callable[[int, int], None]


def decode_inputs(paths: Sequence[Path], filename_pattern: str | None = None, name: str | None = None) -> Recording:
    """One EDF/BDF file or DICOM file/folder (site identifiers applied), or several DICOM instances.
    ``name``: the name the file arrived under, which ``filename_pattern`` reads (default: its own)."""
    if len(paths) == 1:
        path = Path(paths[0])
        return apply_site_identifiers(read_recording(path), path, filename_pattern, name)  # bounds them too
    # A received study has no sidecar, but its identifiers pass the same bounds before they are stored.
    return apply_identifier_limits(read_dicom_study(paths, ignore_unsupported=True), Path(paths[0]))


def infer_ready(engine: Engine, ready: ReadyStudy, progress: Progress | None = None) -> StudyResult:
    """Run the engine on a ready study; the result's timings include the read and preprocess times."""
    return with_ready_timings(engine.run_many([ready.engine_input], progress=progress)[0], ready)


def with_ready_timings(result: StudyResult, ready: ReadyStudy) -> StudyResult:
    """``result`` with ``ready``'s read, preprocess and quality seconds joined to its encode and heads."""
    result.timings_s = {**ready.timings_s, **result.timings_s}
    return result


def shift_annotations(other: Recording, recording: Recording) -> list[Annotation]:
    """``other``'s annotations with onsets relative to ``recording``'s start (when both starts are known)."""
    shift = 0.0
    if other.start is not None and recording.start is not None:
        shift = (other.start - recording.start).total_seconds()
    return [Annotation(a.onset_s + shift, a.duration_s, a.text) for a in other.annotations]


def staging_agreement(result: StudyResult, annotations: Sequence[Annotation]) -> dict[str, Any] | None:
    """Agreement of the model's hypnogram with a scored one, when the recording carries stage annotations;
    ``scored`` holds the scored stage of every epoch (None: unscored), what the study report overlays."""
    if result.staging is None:
        return None
    reference = reference_hypnogram(list(annotations), n_epochs=len(result.staging.hypnogram))
    if reference is None:
        return None
    return {**agreement(result.staging.hypnogram, reference).to_dict(), "scored": reference}


def outputs_extra(ready: ReadyStudy, scoring: dict[str, Any] | None) -> dict[str, Any]:
    """What metrics.json records beside the model's results: montage, gaps, recording, agreement, and the
    signal-quality gate's verdict (``quality``: ``interpretable``, ``reasons``, per-channel measures),
    which the flag step reads."""
    table, recording = ready.table, ready.recording
    return {
        "montage": {"name": table.name, "version": table.version, "source": ready.source,
                    "channels": ready.channels, "unmapped": ready.match.unmapped,
                    "ignored": ready.match.ignored,
                    "mapping": [c.as_dict() for c in ready.match.channels]},
        "gaps": {"fraction_by_channel": ready.gap_fraction, "dropped_channels": ready.dropped},
        "recording": {"duration_s": recording.duration_s, "channels": len(recording.channels),
                      "format": recording.format, "warnings": recording.warnings},
        "staging_agreement": scoring,
        "quality": ready.quality.as_dict() if ready.quality is not None else None,
    }


def scored_stage_annotations(stages: Sequence[str | None], epoch_s: float = 30.0) -> list[Annotation]:
    """A scoring file's hypnogram (one stage or None per epoch) as stage annotations, one per scored epoch."""
    return [Annotation(i * epoch_s, epoch_s, stage) for i, stage in enumerate(stages) if stage]


def respiratory_summary(ready: ReadyStudy) -> dict[str, Any] | None:
    """What metrics.json's ``respiratory`` records from the scoring file found beside the recording
    (None without one): AHI3, AHI4, ODI3, ODI4, total sleep time, the events by kind, the counts in
    sleep, and the file's form (``source``) and format."""
    night = ready.scoring
    if night is None:
        return None
    from ..respiratory import respiratory_indices

    ix = respiratory_indices(night)
    counted = {k: v for k, v in ix.to_dict().items() if k not in ("ahi3", "ahi4", "odi3", "odi4", "total_sleep_time_h")}
    return {"ahi3": ix.ahi3, "ahi4": ix.ahi4, "odi3": ix.odi3, "odi4": ix.odi4,
            "tst_h": ix.total_sleep_time_h, "events": night.event_counts(), "counted": counted,
            "source": ready.scoring_name, "format": night.source}


def store_outputs(result: StudyResult, out_dir: Path, ready: ReadyStudy,
                  annotations: Sequence[Annotation] | None = None) -> list[Path]:
    """Write the study's output files; returns the paths written. ``annotations``: a scored hypnogram
    to compare with (default: the stages of the scoring file found beside the recording when it scores
    any, else the recording's own stage annotations)."""
    if annotations is None:
        night = ready.scoring
        if night is not None and any(night.stages):
            annotations = scored_stage_annotations(night.stages, night.epoch_s)
        else:
            annotations = ready.recording.annotations
    scoring = staging_agreement(result, annotations)
    extra = outputs_extra(ready, scoring)
    respiratory = respiratory_summary(ready)
    if respiratory is not None:
        extra["respiratory"] = respiratory
    return write_study_outputs(result, out_dir, extra=extra)


def decode_and_prepare(paths: Sequence[Path], filename_pattern: str | None, table: MontageTable, key: str,
                       source: str | None, name: str | None = None,
                       quality: QualityThresholds | None = None) -> ReadyStudy:
    """Decode the inputs and map and preprocess their channels: the CPU part of a study, which the
    daemon runs in its worker and an archive batch in worker processes. ``quality``: the signal-quality
    gate's thresholds (the configuration's ``quality`` section; None: the defaults)."""
    t0 = time.perf_counter()
    recording = decode_inputs(paths, filename_pattern, name)
    t1 = time.perf_counter()
    ready = prepare_study(recording, table, key=key, source=source, quality=quality)
    ready.stage_s = {"decode_s": round(t1 - t0, 3), "map_s": round(time.perf_counter() - t1, 3)}
    return ready
