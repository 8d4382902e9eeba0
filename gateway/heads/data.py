"""The data a head is fitted and evaluated on: an export folder (``psg-gateway batch --export``) and a
site's label files, checked row by row.

Labels name studies by ``study_key`` (the export's key) or by ``patient_id`` (the export must then
have been written with ``--export-identifiers``; a patient's label applies to each of their studies).
Every problem in a label file is collected and reported together, with its row numbers (the header
is row 1), so an admin fixes the file once.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from inference.results import MODALITIES, STAGES

__all__ = ["ApneaLabels", "ExportData", "LabelsError", "StageLabels", "SurvivalLabels", "ahi_from_export",
           "file_sha256", "load_export", "read_ahi", "read_stages", "read_survival_labels"]

_MAX_LISTED = 20


class LabelsError(ValueError):
    """A label file that cannot be used; ``problems`` lists each offending row."""

    def __init__(self, source: Path | str, problems: Sequence[str]):
        self.source = str(source)
        self.problems = list(problems)
        shown = self.problems[:_MAX_LISTED]
        more = len(self.problems) - len(shown)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  " + "\n  ".join(shown)
                         + (f"\n  ... and {more} more" if more else ""))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ExportData:
    """The studies of an export: keys, groups (patients), night vectors and demographics."""

    folder: Path
    keys: list[str]
    patients: list[str | None]  # None: the export has no patient ids
    night: np.ndarray  # (n, 512) float32, NaN for a missing modality
    age: np.ndarray  # (n,) float64, NaN unknown
    sex: list[str | None]
    model_name: str | None
    model_hash: str | None
    model_validated: bool
    table_sha256: str
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.keys)}

    @property
    def groups(self) -> np.ndarray:
        """The split unit per study: the patient when known, else the study itself."""
        return np.asarray([p if p else f"study:{k}" for k, p in zip(self.keys, self.patients)], dtype=object)

    @property
    def has_patients(self) -> bool:
        return any(self.patients)

    def tokens(self, i: int, modalities: Sequence[str] = MODALITIES) -> dict[str, np.ndarray] | None:
        """The 5-s token embeddings of study ``i`` (exported with ``--export-tokens``), or None."""
        folder = self.folder / "embeddings" / self.keys[i]
        out = {m: np.load(folder / f"{m}_tokens.npy") for m in modalities if (folder / f"{m}_tokens.npy").is_file()}
        return out or None


def load_export(folder: Path) -> ExportData:
    """Read ``studies.parquet`` and every study's ``night.npy`` from an export folder."""
    folder = Path(folder)
    table_path = folder / "studies.parquet"
    if not table_path.is_file():
        raise LabelsError(folder, ["no studies.parquet: not an export folder (psg-gateway batch --export DIR)"])
    table = pq.read_table(table_path)
    cols = set(table.column_names)
    keys = [str(k) for k in table.column("study_key").to_pylist()]
    if not keys:
        raise LabelsError(table_path, ["the export holds no study"])
    patients = [None if p in (None, "") else str(p) for p in table.column("patient_id").to_pylist()] \
        if "patient_id" in cols else [None] * len(keys)
    age = np.asarray([np.nan if a is None else float(a) for a in table.column("age_years").to_pylist()]) \
        if "age_years" in cols else np.full(len(keys), np.nan)
    sex = [s or None for s in table.column("sex").to_pylist()] if "sex" in cols else [None] * len(keys)
    night = np.empty((len(keys), 512), dtype=np.float32)
    missing = []
    for i, key in enumerate(keys):
        path = folder / "embeddings" / key / "night.npy"
        if not path.is_file():
            missing.append(f"study {key}: {path.relative_to(folder)} is missing")
            continue
        night[i] = np.load(path)
    if missing:
        raise LabelsError(folder, missing)

    def first(name: str) -> object:
        return table.column(name)[0].as_py() if name in cols else None

    validated = first("model_validated")
    return ExportData(folder=folder, keys=keys, patients=patients, night=night, age=age, sex=sex,
                      model_name=first("model_name"), model_hash=first("model_hash"),  # type: ignore[arg-type]
                      model_validated=bool(validated), table_sha256=file_sha256(table_path))


# ---- label files -----------------------------------------------------------------------------------
def _read_rows(path: Path, required: Sequence[str], one_of: Sequence[str]) -> tuple[list[dict[str, str]], list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise LabelsError(path, [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise LabelsError(path, ["not a UTF-8 text file"]) from None
    problems = [f"missing column '{c}'" for c in required if c not in header]
    if one_of and not any(c in header for c in one_of):
        problems.append(f"missing column: one of {', '.join(repr(c) for c in one_of)}")
    if problems:
        raise LabelsError(path, problems + [f"columns found: {', '.join(header) or 'none'}"])
    return rows, header


def _studies_of(row: dict[str, str], data: ExportData, by_patient: dict[str, list[int]]) -> list[int] | str:
    key = row.get("study_key", "")
    if key:
        return [data.index[key]] if key in data.index else f"unknown study_key '{key}'"
    pid = row.get("patient_id", "")
    if not pid:
        return "no study_key or patient_id"
    if not data.has_patients:
        return "patient_id given but the export has no patient ids (export with --export-identifiers)"
    return by_patient.get(pid) or f"unknown patient_id '{pid}'"


def _nonnegative(row: dict[str, str], column: str) -> float | str:
    """The column's value as a finite number >= 0, or what is wrong with it."""
    text = row[column]
    try:
        value = float(text)
    except ValueError:
        return f"{column} '{text}' is not a number"
    if not math.isfinite(value) or value < 0:
        return f"{column} {text} is negative or not finite"
    return value


def _by_patient(data: ExportData) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(data.patients):
        if p:
            out[p].append(i)
    return out


@dataclass
class SurvivalLabels:
    """Per label: study rows into the export, time to event and event indicator."""

    by_label: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    sha256: str


def read_survival_labels(path: Path, data: ExportData) -> SurvivalLabels:
    """``label, time_to_event, event`` and ``study_key`` or ``patient_id``: one row per study and label."""
    rows, _ = _read_rows(path, ("label", "time_to_event", "event"), ("study_key", "patient_id"))
    by_patient = _by_patient(data)
    problems: list[str] = []
    acc: dict[str, dict[int, tuple[float, int]]] = defaultdict(dict)
    for n, row in enumerate(rows, start=2):
        where = f"row {n}"
        studies = _studies_of(row, data, by_patient)
        if isinstance(studies, str):
            problems.append(f"{where}: {studies}")
            continue
        label = row.get("label", "")
        if not label:
            problems.append(f"{where}: empty label")
            continue
        t = _nonnegative(row, "time_to_event")
        if isinstance(t, str):
            problems.append(f"{where}: {t}")
            continue
        if row["event"] not in ("0", "1"):
            problems.append(f"{where}: event '{row['event']}' must be 0 or 1")
            continue
        for i in studies:
            if i in acc[label]:
                problems.append(f"{where}: study {data.keys[i]} has a second row for label '{label}'")
                continue
            acc[label][i] = (t, int(row["event"]))
    if problems:
        raise LabelsError(path, problems)
    if not acc:
        raise LabelsError(path, ["no label rows"])
    out = {}
    for label, per in acc.items():
        idx = np.asarray(sorted(per), dtype=np.int64)
        out[label] = (idx, np.asarray([per[i][0] for i in idx]), np.asarray([per[i][1] for i in idx]))
    return SurvivalLabels(out, file_sha256(path))


@dataclass
class ApneaLabels:
    index: np.ndarray
    ahi: np.ndarray
    sha256: str


def read_ahi(path: Path, data: ExportData) -> ApneaLabels:
    """``ahi`` (events/hour) and ``study_key`` (or ``patient_id`` for one-study patients) per row."""
    rows, _ = _read_rows(path, ("ahi",), ("study_key", "patient_id"))
    by_patient = _by_patient(data)
    problems: list[str] = []
    values: dict[int, float] = {}
    for n, row in enumerate(rows, start=2):
        studies = _studies_of(row, data, by_patient)
        if isinstance(studies, str):
            problems.append(f"row {n}: {studies}")
            continue
        ahi = _nonnegative(row, "ahi")
        if isinstance(ahi, str):
            problems.append(f"row {n}: {ahi}")
            continue
        if len(studies) > 1:
            problems.append(f"row {n}: patient has {len(studies)} studies: give study_key (AHI is per night)")
            continue
        if studies[0] in values:
            problems.append(f"row {n}: study {data.keys[studies[0]]} has a second AHI row")
            continue
        values[studies[0]] = ahi
    if problems:
        raise LabelsError(path, problems)
    if not values:
        raise LabelsError(path, ["no AHI rows"])
    idx = np.asarray(sorted(values), dtype=np.int64)
    return ApneaLabels(idx, np.asarray([values[i] for i in idx]), file_sha256(path))


def ahi_from_export(data: ExportData, rule: int = 3) -> ApneaLabels:
    """The AHI of every study whose scoring file the batch read (the export's ``ahi3`` or ``ahi4`` column,
    ``rule`` 3 or 4: hypopneas with >= 3 % desaturation or an arousal, or with >= 4 % desaturation);
    studies without one (null) are left out. The labels' checksum is the table's."""
    if rule not in (3, 4):
        raise ValueError(f"AHI rule {rule}: 3 or 4")
    column = f"ahi{rule}"
    table_path = data.folder / "studies.parquet"
    names = pq.read_schema(table_path).names
    if column not in names:
        again = "run psg-gateway batch --export again"
        raise LabelsError(table_path, [f"no {column} column: exported before scoring files were read; {again}"])
    table = pq.read_table(table_path, columns=["study_key", column])
    values: dict[int, float] = {}
    problems: list[str] = []
    for key, ahi in zip(table.column("study_key").to_pylist(), table.column(column).to_pylist()):
        if ahi is None or key not in data.index:
            continue
        if not math.isfinite(ahi) or ahi < 0:
            problems.append(f"study {key}: {column} {ahi} is not a number of events per hour")
            continue
        values[data.index[key]] = float(ahi)
    if problems:
        raise LabelsError(table_path, problems)
    if not values:
        where = "X-nsrr.xml, X-profusion.xml, X.xml, X.edf.xml"
        raise LabelsError(table_path, [f"no study has an {column}: no scoring file was found beside the recordings ({where})"])
    idx = np.asarray(sorted(values), dtype=np.int64)
    return ApneaLabels(idx, np.asarray([values[i] for i in idx]), data.table_sha256)


@dataclass
class StageLabels:
    by_study: dict[int, np.ndarray]  # export row -> (E,) stage index per 30-s epoch, -1 unscored
    sha256: str


_STAGE_ALIASES = {"W": 0, "WAKE": 0, "N1": 1, "S1": 1, "N2": 2, "S2": 2, "N3": 3, "S3": 3, "S4": 3, "N4": 3,
                  "R": 4, "REM": 4, "?": -1, "": -1, "UNSCORED": -1, "MOVEMENT": -1, "M": -1}


def read_stages(path: Path, data: ExportData) -> StageLabels:
    """``study_key, epoch, stage``: one row per scored 30-s epoch (W, N1, N2, N3, REM; R&K S3/S4 -> N3)."""
    rows, _ = _read_rows(path, ("study_key", "epoch", "stage"), ())
    problems: list[str] = []
    per: dict[int, dict[int, int]] = defaultdict(dict)
    for n, row in enumerate(rows, start=2):
        key = row["study_key"]
        if key not in data.index:
            problems.append(f"row {n}: unknown study_key '{key}'")
            continue
        try:
            epoch = int(row["epoch"])
        except ValueError:
            problems.append(f"row {n}: epoch '{row['epoch']}' is not an integer")
            continue
        stage = _STAGE_ALIASES.get(row["stage"].upper())
        if epoch < 0 or stage is None:
            problems.append(f"row {n}: " + (f"negative epoch {epoch}" if epoch < 0 else
                                            f"stage '{row['stage']}' is not one of {', '.join(STAGES)}"))
            continue
        per[data.index[key]][epoch] = stage
    if problems:
        raise LabelsError(path, problems)
    out = {}
    for i, epochs in per.items():
        labels = np.full(max(epochs) + 1, -1, dtype=np.int64)
        for e, s in epochs.items():
            labels[e] = s
        out[i] = labels
    if not out:
        raise LabelsError(path, ["no stage rows"])
    return StageLabels(out, file_sha256(path))
