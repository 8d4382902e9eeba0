"""Walking a PSG archive: EDF/BDF files, and DICOM waveform files grouped into studies by StudyInstanceUID.

Only headers are read here (an EDF's 256 bytes, a DICOM file's top-level elements up to the waveform
data), so listing a large archive is quick. A file whose header cannot be read is not fatal: an EDF
goes on as an item and fails, with its reason, when it is decoded; a DICOM file that cannot be parsed
at all (so its study is unknown) is listed as unreadable.

``--include``/``--exclude`` patterns are shell globs matched against the path relative to the archive
root given on the command line (``*`` also matches ``/``, so ``*.edf`` matches at any depth);
``--since`` compares the recording's date (EDF start date, DICOM Study/Acquisition date) and falls
back to the file's modification date when the header has none.

A scoring file beside an EDF/BDF ``X.edf`` (NSRR/Profusion XML: ``X-nsrr.xml``, ``X-profusion.xml``,
``X.xml`` or Compumedics' ``X.edf.xml``, in that order of preference, any case) is attached to its item
(``ArchiveItem.scoring``); the batch reads it for the scored hypnogram and the respiratory indices.

Two callers: the batch (``psg-gateway batch``: archive folders, and files classified like those found in
them) and ``psg-gateway montage test|unmapped`` (``files_as_items``: a file named on the command line is
one study of its own, whatever it holds, and its reader says what is wrong with it).
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from ..readers import DICOM_SUFFIXES, EDF_SUFFIXES, sniff_format
from ..readers.dicom_waveform import ACCEPTED_SOP_CLASSES
from ..readers.edf_header import read_header
from ..readers.errors import ReaderError

__all__ = ["SCORING_SUFFIXES", "ArchiveItem", "DicomInstanceRef", "Discovery", "discover", "scoring_beside"]

_SKIP_SUFFIXES = (".part", ".tmp", "~", ".crdownload")
# What follows a recording's stem in the name of its scoring file, in order of preference (any case).
SCORING_SUFFIXES = ("-nsrr.xml", "-profusion.xml", ".xml")


@dataclass(frozen=True)
class DicomInstanceRef:
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    size: int


@dataclass(frozen=True)
class ArchiveItem:
    """One study found in the archive: an EDF/BDF file, or the DICOM instances of one study."""

    kind: str  # "file" | "dicom"
    root: Path  # the archive path given on the command line
    name: str  # relative to root (a DICOM study: its first instance's folder); for the summary only
    paths: tuple[Path, ...]
    recorded: date | None
    study_uid: str | None = None
    instances: tuple[DicomInstanceRef, ...] = ()
    scoring: Path | None = None  # a scoring file beside an EDF/BDF (see scoring_beside)

    @property
    def source(self) -> str:
        return f"archive:{self.root}"


@dataclass
class Discovery:
    items: list[ArchiveItem] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # why files were passed over -> count
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relative name, reason)


def discover(roots: Sequence[Path], *, since: date | None = None, include: Sequence[str] = (),
             exclude: Sequence[str] = (), files_as_items: bool = False) -> Discovery:
    """Every study under ``roots`` that passes the filters, in a stable order (path order).

    ``files_as_items``: a root that is a file is one item of kind ``"file"`` (not classified, not grouped
    with other DICOM files of its study, never skipped as "not a PSG file"): someone named it, so it is
    read, and fails with its reader's reason when it is no recording. Folders are walked as always.
    """
    found = Discovery()
    dicom: dict[str, list[DicomInstanceRef]] = {}
    dicom_meta: dict[str, tuple[Path, str, date | None]] = {}
    seen: set[Path] = set()
    listings: dict[Path, dict[str, str]] = {}
    for root in roots:
        root = Path(root)
        for path in _walk(root):
            real = path.resolve()
            if real in seen:  # the same file under two of the archive paths given
                continue
            seen.add(real)
            rel = path.relative_to(root).as_posix() if path != root else path.name
            if include and not any(fnmatch.fnmatchcase(rel, p) for p in include):
                found.skipped["not included (--include)"] += 1
                continue
            if any(fnmatch.fnmatchcase(rel, p) for p in exclude):
                found.skipped["excluded (--exclude)"] += 1
                continue
            kind = _kind(path)
            if kind == "edf" or (files_as_items and path == root):  # a file named directly: one study
                recorded = _edf_date(path) if kind == "edf" else None
                if since and (recorded or _mtime_date(path)) < since:
                    found.skipped["recorded before --since"] += 1
                    continue
                scoring = scoring_beside(path, listings) if kind == "edf" else None
                found.items.append(ArchiveItem("file", root, rel, (path,), recorded, scoring=scoring))
            elif kind == "dicom":
                meta = _dicom_meta(path)
                if isinstance(meta, str):
                    found.unreadable.append((rel, meta))
                    continue
                study_uid, sop_uid, sop_class, recorded = meta
                if sop_class not in ACCEPTED_SOP_CLASSES:
                    found.skipped["DICOM object that is not a PSG waveform"] += 1
                    continue
                if since and (recorded or _mtime_date(path)) < since:
                    found.skipped["recorded before --since"] += 1
                    continue
                ref = DicomInstanceRef(path, sop_uid, sop_class, path.stat().st_size)
                if study_uid not in dicom:
                    dicom[study_uid] = []
                    dicom_meta[study_uid] = (root, str(Path(rel).parent.as_posix()), recorded)
                    # Placeholder keeps the study at the position of its first instance.
                    found.items.append(ArchiveItem("dicom", root, study_uid, (), recorded, study_uid))
                dicom[study_uid].append(ref)
            else:
                found.skipped["not a PSG file"] += 1
    found.items = [_complete(item, dicom, dicom_meta) for item in found.items]
    return found


def scoring_beside(path: Path, listings: dict[Path, dict[str, str]] | None = None) -> Path | None:
    """The scoring file beside the recording ``path`` (``X.edf``): ``X-nsrr.xml``, ``X-profusion.xml``,
    ``X.xml`` or ``X.edf.xml``, the first found (names compared case-insensitively), or None.
    ``listings`` caches each folder's file names (lower case -> name) across calls."""
    folder = path.parent
    names = listings.get(folder) if listings is not None else None
    if names is None:
        try:
            names = {n.lower(): n for n in os.listdir(folder) if n.lower().endswith(".xml")}
        except OSError:
            names = {}
        if listings is not None:
            listings[folder] = names
    stem = path.stem.lower()
    for candidate in (*(stem + s for s in SCORING_SUFFIXES), path.name.lower() + ".xml"):
        found = names.get(candidate)
        if found is not None and (folder / found).is_file():
            return folder / found
    return None


def _complete(item: ArchiveItem, dicom: dict[str, list[DicomInstanceRef]],
              meta: dict[str, tuple[Path, str, date | None]]) -> ArchiveItem:
    if item.kind != "dicom":
        return item
    refs = tuple(sorted(dicom[item.name], key=lambda r: str(r.path)))
    root, folder, recorded = meta[item.name]
    return ArchiveItem("dicom", root, f"{folder}/ ({len(refs)} DICOM object{'s' if len(refs) != 1 else ''})",
                       tuple(r.path for r in refs), recorded, item.name, refs)


def _walk(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for folder, dirs, files in os.walk(root, onerror=None):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(_SKIP_SUFFIXES):
                continue
            yield Path(folder) / name


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in EDF_SUFFIXES:
        return "edf"
    if suffix in (".json", ".csv", ".txt", ".tsv", ".xml"):  # sidecars, scoring exports
        return None
    sniffed = sniff_format(path)
    if sniffed is None and suffix in DICOM_SUFFIXES:
        return "dicom"  # a .dcm without the preamble: the header parse decides
    return sniffed


def _edf_date(path: Path) -> date | None:
    try:
        start = read_header(path).start
    except (ReaderError, OSError):
        return None  # decoding will fail and say why; it is still an item of the archive
    return start.date() if start else None


def _mtime_date(path: Path) -> date:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).date()


def _dicom_meta(path: Path) -> tuple[str, str, str, date | None] | str:
    """(study UID, SOP instance UID, SOP class UID, date) from the header, or why it cannot be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size="4 KB",
                             specific_tags=["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "StudyDate",
                                            "AcquisitionDateTime", "ContentDate"])
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return f"not a readable DICOM file: {type(exc).__name__}"
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not study_uid or not sop_uid or not sop_class:
        return "DICOM file without StudyInstanceUID, SOPInstanceUID or SOPClassUID"
    text = str(ds.get("StudyDate", "") or ds.get("AcquisitionDateTime", "") or ds.get("ContentDate", "") or "")
    return study_uid, sop_uid, sop_class, _da(text)


def _da(text: str) -> date | None:
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None

