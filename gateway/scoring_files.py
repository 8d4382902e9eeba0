"""Read scoring files into a :class:`~gateway.respiratory.ScoredNight`: NSRR annotation XML, Compumedics
Profusion XML, and EDF+ annotations.

* **NSRR XML** (``<PSGAnnotation><ScoredEvents><ScoredEvent>`` with ``<EventType>``, ``<EventConcept>``,
  ``<Start>``, ``<Duration>`` and, for SpO2 events, ``<SpO2Nadir>``/``<SpO2Baseline>``): stage events
  (``EventType`` ``Stages|Stages``, concepts ``Wake|0``, ``Stage 1 sleep|1`` .. ``Stage 4 sleep|4``,
  ``REM sleep|5``; anything else, such as ``Movement|6`` or ``Unscored|9``, is unscored) fill the 30-s
  epochs they cover; other events are read by their concept (:func:`gateway.respiratory.event_kind_of`).
* **Profusion XML** (``<CMPStudyConfig>`` with ``<EpochLength>``, ``<SleepStages><SleepStage>`` one per
  epoch, 0 W, 1-3 N1-N3, 4 N3, 5 REM, others unscored; ``<ScoredEvents><ScoredEvent>`` with ``<Name>``,
  ``<Start>``, ``<Duration>``, ``<LowestSpO2>`` and ``<Desaturation>``, the drop).
* **EDF+** (``.edf``/``.bdf``): the recording's annotations, read as in
  :func:`gateway.respiratory.night_from_annotations`.

XML is parsed by the standard library after refusing any ``<!DOCTYPE``/``<!ENTITY`` declaration, so no
entity (internal or external) is ever expanded or fetched; scoring files need none.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from .recording import Annotation
from .respiratory import ScoredEvent, ScoredNight, event_kind_of, make_event, night_from_annotations

__all__ = ["MAX_XML_BYTES", "ScoringFileError", "parse_scoring_xml", "read_scoring"]

MAX_XML_BYTES = 64 * 1024 * 1024
_EDF_SUFFIXES = (".edf", ".bdf", ".rec")
_STAGE_TEXT = {0: "Sleep stage W", 1: "Sleep stage 1", 2: "Sleep stage 2", 3: "Sleep stage 3",
               4: "Sleep stage 4", 5: "Sleep stage R"}


class ScoringFileError(ValueError):
    """A scoring file that cannot be read; ``str(error)`` is one line naming the file and the problem."""


def read_scoring(path: str | Path) -> ScoredNight:
    """Read an NSRR or Profusion XML scoring file, or an EDF+ file's annotations, into a scored night."""
    path = Path(path)
    if path.suffix.lower() in _EDF_SUFFIXES:
        from .readers import read_recording
        from .readers.errors import ReaderError

        try:
            recording = read_recording(path)
        except ReaderError as exc:
            raise ScoringFileError(str(exc)) from None
        return night_from_annotations(recording.annotations)
    try:
        size = path.stat().st_size
        if size > MAX_XML_BYTES:
            raise ScoringFileError(f"{path}: {size} bytes is larger than a scoring file ({MAX_XML_BYTES} at most)")
        data = path.read_bytes()
    except OSError as exc:
        raise ScoringFileError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return parse_scoring_xml(data, name=str(path))


def _refuse_declarations(data: bytes, name: str) -> None:
    texts = [data.lower()]
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            texts.append(data.decode("utf-16").lower().encode("utf-8"))
        except UnicodeDecodeError:
            raise ScoringFileError(f"{name}: not well-formed XML (bad UTF-16)") from None
    for text in texts:
        for decl in (b"<!doctype", b"<!entity"):
            if decl in text:
                raise ScoringFileError(f"{name}: refused: the XML holds a {decl[2:].decode().upper()} "
                                       "declaration (scoring files need none; entities are not expanded)")


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _number(element: ET.Element, name: str, where: str) -> float | None:
    text = _child_text(element, name)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ScoringFileError(f"{where}: <{name}> is not a number: {text[:40]!r}") from None
    if not math.isfinite(value):
        raise ScoringFileError(f"{where}: <{name}> is not a finite number: {text[:40]!r}")
    return value


def parse_scoring_xml(data: bytes, *, name: str = "<xml>") -> ScoredNight:
    """Parse NSRR (``PSGAnnotation``) or Profusion (``CMPStudyConfig``) XML bytes into a scored night."""
    _refuse_declarations(data, name)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ScoringFileError(f"{name}: not well-formed XML ({exc})") from None
    kind = _local(root.tag)
    if kind == "PSGAnnotation":
        return _nsrr(root, name)
    if kind == "CMPStudyConfig":
        return _profusion(root, name)
    raise ScoringFileError(f"{name}: not an NSRR (PSGAnnotation) or Profusion (CMPStudyConfig) scoring file "
                           f"(root element <{kind[:40]}>)")


def _scored_events(root: ET.Element) -> list[ET.Element]:
    return [e for e in root.iter() if _local(e.tag) == "ScoredEvent"]


def _timing(event: ET.Element, where: str) -> tuple[float, float | None]:
    start = _number(event, "Start", where)
    if start is None:
        raise ScoringFileError(f"{where}: no <Start>")
    return start, _number(event, "Duration", where)


def _nsrr(root: ET.Element, name: str) -> ScoredNight:
    stage_annotations: list[Annotation] = []
    events: list[ScoredEvent] = []
    for i, event in enumerate(_scored_events(root), 1):
        where = f"{name}: ScoredEvent {i}"
        event_type = (_child_text(event, "EventType") or "").lower()
        concept = _child_text(event, "EventConcept") or ""
        if event_type.startswith("stages"):
            start, duration = _timing(event, where)
            code = concept.rpartition("|")[2].strip()
            stage = _STAGE_TEXT.get(int(code)) if code.isdigit() else None
            stage_annotations.append(Annotation(start, duration, stage or "Sleep stage ?"))
            continue
        kind = event_kind_of(concept)
        if kind is None:
            continue
        start, duration = _timing(event, where)
        events.append(make_event(kind, start, duration, nadir=_number(event, "SpO2Nadir", where),
                                 baseline=_number(event, "SpO2Baseline", where), label=concept))
    night = night_from_annotations(stage_annotations, source="nsrr")
    events.sort(key=lambda e: (e.onset_s, e.kind))
    return ScoredNight(night.stages, events, "nsrr")


def _profusion(root: ET.Element, name: str) -> ScoredNight:
    epoch_length = _number(root, "EpochLength", name) or 30.0
    if epoch_length <= 0:
        raise ScoringFileError(f"{name}: <EpochLength> must be positive")
    stage_annotations: list[Annotation] = []
    stages_element = next((e for e in root if _local(e.tag) == "SleepStages"), None)
    for i, element in enumerate(stages_element if stages_element is not None else []):
        text = (element.text or "").strip()
        code = int(text) if text.isdigit() else None
        stage = _STAGE_TEXT.get(code) if code is not None else None
        stage_annotations.append(Annotation(i * epoch_length, epoch_length, stage or "Sleep stage ?"))
    events: list[ScoredEvent] = []
    for i, event in enumerate(_scored_events(root), 1):
        where = f"{name}: ScoredEvent {i}"
        label = _child_text(event, "Name") or ""
        kind = event_kind_of(label)
        if kind is None:
            continue
        start, duration = _timing(event, where)
        nadir = _number(event, "LowestSpO2", where)
        drop = _number(event, "Desaturation", where)
        baseline = nadir + drop if nadir is not None and drop is not None else None
        events.append(make_event(kind, start, duration, nadir=nadir, baseline=baseline, drop=drop, label=label))
    night = night_from_annotations(stage_annotations, source="profusion")
    events.sort(key=lambda e: (e.onset_s, e.kind))
    return ScoredNight(night.stages, events, "profusion")
