"""The recordings a montage is tried on (``psg-gateway montage test|unmapped|map|diff --labels``).

Found by the archive discovery (:func:`gateway.sources.archive.discover`, the batch's): a file named
directly is one study, whatever it holds (its reader says what is wrong with it); in a folder, every
EDF/BDF file and every DICOM study (files grouped by Study Instance UID). Each is decoded in turn and
named as the CLI shows it: the file, or the folder that holds a DICOM study's files.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..recording import Recording
from ..sources.archive import ArchiveItem, discover

__all__ = ["StudyRecording", "read_studies"]


@dataclass(frozen=True)
class StudyRecording:
    """One study under the paths given: its recording, or why it could not be read."""

    name: str  # the file, or the folder holding a DICOM study's files (" (study N)" when it holds several)
    recording: Recording | None = None
    error: str | None = None  # names the file and the reason


def read_studies(paths: Sequence[Path]) -> Iterator[StudyRecording]:
    """Every study under ``paths``, decoded one at a time; never stops early. DICOM files whose study
    cannot be known (unreadable headers) come first, as errors; then the studies in path order."""
    named: list[tuple[str, ArchiveItem]] = []
    for root in paths:
        # One discovery per path: DICOM studies are grouped within a path given, as they always were here.
        found = discover([root], files_as_items=True)
        for rel, reason in found.unreadable:
            file = root / rel
            yield StudyRecording(str(file), error=f"{file}: {reason}")
        names: Counter[str] = Counter()
        for item in found.items:
            named.append((_name(item, names), item))
    for name, item in named:
        try:
            recording = _read(item)
        except Exception as exc:  # noqa: BLE001 - report the file and go on with the next one
            yield StudyRecording(name, error=str(exc) or type(exc).__name__)
        else:
            yield StudyRecording(name, recording)


def _name(item: ArchiveItem, seen: Counter[str]) -> str:
    if item.kind != "dicom":
        return str(item.paths[0])
    common = os.path.commonpath([str(p.parent) for p in item.paths])
    seen[common] += 1
    return common if seen[common] == 1 else f"{common} (study {seen[common]})"


def _read(item: ArchiveItem) -> Recording:
    from ..readers import read_recording
    from ..readers.dicom_waveform import read_dicom_study

    if item.kind == "dicom":
        # A study folder may also hold reports or audio: the waveforms are what is mapped.
        return read_dicom_study(list(item.paths), ignore_unsupported=True)
    return read_recording(item.paths[0])
