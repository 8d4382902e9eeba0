"""The study steps shared by ``psg-gateway infer`` and the daemon's pipeline: decode, map, infer, store.

One implementation whichever source fed the study, so a file run by hand and the same file dropped into
the daemon's folder give the same outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.engine import Engine
from inference.results import StudyResult

from ..identifier_limits import apply_identifier_limits
from ..montage.table import MontageTable
from ..readers import read_recording
from ..readers.dicom_waveform import read_dicom_study
from ..recording import Annotation, Recording
from .identifiers import apply_site_identifiers
from .outputs import write_study_outputs
from .prepare import PreparedStudy, prepare_study
from .scoring import agreement, reference_hypnogram

__all__ = [
    "Decoded",
    "decode_and_map",
    "decode_inputs",
    "infer_prepared",
    "outputs_extra",
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


def infer_prepared(engine: Engine, prepared: PreparedStudy, progress: Progress | None = None) -> StudyResult:
    result = engine.run_many([prepared.study], progress=progress)[0]
    result.timings_s = {**prepared.timings_s, **result.timings_s}
    return result


def shift_annotations(other: Recording, recording: Recording) -> list[Annotation]:
    """``other``'s annotations with onsets relative to ``recording``'s start (when both starts are known)."""
    shift = 0.0
    if other.start is not None and recording.start is not None:
        shift = (other.start - recording.start).total_seconds()
    return [Annotation(a.onset_s + shift, a.duration_s, a.text) for a in other.annotations]


def staging_agreement(result: StudyResult, annotations: Sequence[Annotation]) -> dict[str, Any] | None:
    """Agreement of the model's hypnogram with a scored one, when the recording carries stage annotations."""
    if result.staging is None:
        return None
    reference = reference_hypnogram(list(annotations), n_epochs=len(result.staging.hypnogram))
    return None if reference is None else agreement(result.staging.hypnogram, reference).to_dict()


def outputs_extra(table: MontageTable, source: str | None, prepared: PreparedStudy, recording: Recording,
                  scoring: dict[str, Any] | None) -> dict[str, Any]:
    """What metrics.json records beside the model's results: montage, gaps, recording, agreement."""
    return {
        "montage": {"name": table.name, "version": table.version, "source": source,
                    "channels": prepared.channels, "unmapped": prepared.match.unmapped,
                    "ignored": prepared.match.ignored,
                    "mapping": [c.as_dict() for c in prepared.match.channels]},
        "gaps": {"fraction_by_channel": prepared.gap_fraction, "dropped_channels": prepared.dropped},
        "recording": {"duration_s": recording.duration_s, "channels": len(recording.channels),
                      "format": recording.format, "warnings": recording.warnings},
        "staging_agreement": scoring,
    }


def store_outputs(result: StudyResult, out_dir: Path, table: MontageTable, source: str | None,
                  prepared: PreparedStudy, recording: Recording,
                  annotations: Sequence[Annotation] | None = None) -> list[Path]:
    """Write the study's output files (as ``psg-gateway infer`` does); returns the paths written."""
    scoring = staging_agreement(result, recording.annotations if annotations is None else annotations)
    return write_study_outputs(result, out_dir, extra=outputs_extra(table, source, prepared, recording, scoring))


def map_recording(recording: Recording, table: MontageTable, key: str, source: str | None,
                  progress: Progress | None = None) -> PreparedStudy:
    return prepare_study(recording, table, key=key, source=source, progress=progress)


@dataclass
class Decoded:
    """A study decoded and mapped, ready for the engine: the recording's metadata (its sample sources
    detached, so this crosses process boundaries), the engine's input and the table that mapped it."""

    recording: Recording
    prepared: PreparedStudy
    table: MontageTable
    timings: dict[str, float] = field(default_factory=dict)


def decode_and_map(paths: Sequence[Path], filename_pattern: str | None, table: MontageTable, key: str,
                   source: str | None, name: str | None = None) -> Decoded:
    """Decode the inputs and map and preprocess their channels: the CPU part of a study, which the
    daemon runs in its worker and an archive batch in worker processes."""
    t0 = time.perf_counter()
    recording = decode_inputs(paths, filename_pattern, name)
    t1 = time.perf_counter()
    prepared = map_recording(recording, table, key, source)
    t2 = time.perf_counter()
    return Decoded(recording.detached(), prepared, table,
                   {"decode_s": round(t1 - t0, 3), "map_s": round(t2 - t1, 3)})
