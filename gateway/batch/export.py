"""The researchers' export (``psg-gateway batch --export DIR``): embeddings as .npy files, one table per run.

```
DIR/
  studies.parquet                 one row per study (studies.csv too with --csv): see the columns below
  outcomes.csv                    phecode, phenotype: the outcomes the hazard columns are named after
  embeddings/<study key>/
    night.npy                     (512,)   float32  the night vector
    <MOD>.npy                     (N, 128) float32  one row per 5-minute window (MOD: BAS, RESP, EKG, EMG present)
    <MOD>_tokens.npy              (T, 128) float32  one row per 5-s token (only with tokens=True)
```

Table columns, in order: ``study_key``; with ``identifiers=True`` ``patient_id``, ``accession``, ``study_uid``,
``recording_start``; then ``source_kind``, ``state``, ``duration_s``, ``modalities``, ``montage_version``,
``model_name``, ``model_hash``, ``model_validated``, ``age_years``, ``sex``, ``demographics_encoding``,
``tail_tokens``, ``diagnosis_tokens``, ``ahi3``, ``ahi4``, ``odi3``, ``odi4`` (from the scoring file found beside
the recording; null without one), the sleep metrics as ``sleep_*``,
the staging agreement as ``agreement_*``, then one float32 log-hazard column per outcome named by its phecode.

An export is never rewritten with fewer identifier columns than it has without being asked: over an export
whose table holds ``patient_id`` (etc.), writing without ``identifiers`` raises :class:`ExportError` unless
``drop_identifiers`` says to drop them (then a stale ``studies.csv`` holding them is removed too). A
researcher who re-runs a batch without ``--export-identifiers`` would otherwise lose the patient column,
and ``heads fit`` would silently split by study instead of by patient.

The folders this creates are private (0700, or 0750 with a ``service.group``) and so are the files (0600/0640;
a hard link shares the stored output's mode, which is private too): the table holds identifiers with
``identifiers=True`` and the embeddings are a person's. A folder that already exists keeps its mode.

The study key is a random hex key, never PHI: paths carry nothing else. The npy files are hard links to the
gateway's stored outputs when both are on one file system (no space used, instant), copies otherwise; a
file already there with the same size is kept, so a resumed batch re-exports in seconds.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gateway.fsutil import atomic_write, atomic_write_with, private_mkdir
from gateway.pipeline.outputs import (
    HAZARDS_FILE,
    METRICS_FILE,
    NIGHT_FILE,
    HazardRow,
    read_hazards,
    read_metrics,
)
from gateway.store.models import Study

__all__ = ["RESPIRATORY_COLUMNS", "ExportError", "ExportReport", "check_export_dir", "check_identifiers_kept", "export_studies",
           "identifier_columns"]

TABLE_NAME = "studies.parquet"
CSV_NAME = "studies.csv"
OUTCOMES_NAME = "outcomes.csv"
EMBEDDINGS_DIR = "embeddings"

# Hazard rows are gathered in blocks of this many studies, each kept column-major, so a 100k x 1065 export
# holds the values once (float32, ~430 MB) and every column is handed to Arrow as contiguous chunks.
_BLOCK_ROWS = 4096

IDENTIFIER_COLUMNS = ("patient_id", "accession", "study_uid", "recording_start")
# From metrics.json's ``respiratory`` (a scoring file found beside the recording): events per hour of sleep.
RESPIRATORY_COLUMNS = ("ahi3", "ahi4", "odi3", "odi4")


class ExportError(Exception):
    """The export cannot go on (the folder is not writable, a write failed); the message is for the user."""


@dataclass
class ExportReport:
    studies: int  # rows in the table
    files_written: int  # npy files newly written (linked or copied)
    files_kept: int  # npy files already there (the same link, or a same-size copy no older than the source)
    table: Path  # studies.parquet
    csv: Path | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (study key, reason)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_export_dir(path: Path) -> Path:
    """Create the folder if needed and prove it is writable (write+fsync+delete a probe file).

    Raises :class:`ExportError` naming the folder and the OS reason otherwise; returns the resolved path.
    Called before any batch work starts, so an hours-long batch never fails at its very end.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ExportError(f"export folder {path} is a file, not a folder")
    try:
        private_mkdir(path)  # not the umask's 0755: the export holds embeddings (and maybe identifiers)
    except OSError as exc:
        raise ExportError(f"cannot create export folder {path}: {_reason(exc)}") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
    except OSError as exc:
        raise ExportError(f"export folder {path} is not writable: {_reason(exc)}") from exc
    try:
        # fsync too: a full or read-only-remounted disk may only refuse at that point.
        os.write(fd, b"probe\n")
        os.fsync(fd)
    except OSError as exc:
        raise ExportError(f"export folder {path} is not writable: {_reason(exc)}") from exc
    finally:
        os.close(fd)
        Path(probe).unlink(missing_ok=True)
    return path.resolve()


def _table_columns(path: Path) -> list[str]:
    """Column names of an existing studies.parquet or studies.csv; [] when absent or unreadable.

    Unreadable counts as no columns: a damaged table holds nothing a rewrite could lose.
    """
    try:
        if path.suffix == ".parquet":
            return list(pq.read_schema(path).names)
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), [])
    except (OSError, ValueError, pa.ArrowException, csv.Error):
        return []


def _has_identifiers(table: Path) -> bool:
    return any(c in IDENTIFIER_COLUMNS for c in _table_columns(table))


def identifier_columns(out_dir: Path) -> list[str]:
    """The identifier columns (patient_id, accession, ...) of the export already in ``out_dir``, in the
    table's order: those of its studies.parquet and of its studies.csv (an older run may have written it)."""
    found: dict[str, None] = {}
    for name in (TABLE_NAME, CSV_NAME):
        found.update(dict.fromkeys(c for c in _table_columns(Path(out_dir) / name) if c in IDENTIFIER_COLUMNS))
    return list(found)


def check_identifiers_kept(out_dir: Path, *, identifiers: bool, drop_identifiers: bool) -> None:
    """Raise :class:`ExportError` when writing into ``out_dir`` would drop identifier columns its export has.

    Nothing is dropped with ``identifiers`` (they are written again) and nothing is refused with
    ``drop_identifiers`` (the user asked). The message is one line naming both command-line flags.
    """
    if identifiers or drop_identifiers:
        return
    found = identifier_columns(out_dir)
    if found:
        raise ExportError(f"the export in {out_dir} has identifier columns ({', '.join(found)}) that this run "
                          "would drop: add --export-identifiers to keep them, or --drop-identifiers to drop them")


# ---- one study's stored outputs --------------------------------------------------------------------


@dataclass
class _StudyOutputs:
    """What the export needs from one study's output folder, read and checked before anything is written."""

    folder: Path
    metrics: dict[str, Any]
    modalities: list[str]
    hazards: list[HazardRow] | None


def _read_outputs(study: Study, tokens: bool) -> _StudyOutputs | str:
    """The study's stored outputs, or the reason it has none usable (a string: the study is skipped)."""
    if not study.output_path:
        return f"no stored outputs (state {study.state})"
    folder = Path(study.output_path)
    for name in (NIGHT_FILE, METRICS_FILE):
        if not (folder / name).is_file():
            return f"{name} missing from its output folder (state {study.state})"
    try:
        metrics = read_metrics(folder)
    except (OSError, ValueError) as exc:
        return f"{METRICS_FILE} unreadable: {exc}"
    if not isinstance(metrics, dict):
        return f"{METRICS_FILE} unreadable: not a JSON object"
    modalities = [str(m) for m in metrics.get("modalities") or []]
    for modality in modalities:
        needed = [f"{modality}_5min.npy", *([f"{modality}.npy"] if tokens else [])]
        for name in needed:
            if not (folder / EMBEDDINGS_DIR / name).is_file():
                return f"embeddings/{name} missing from its output folder"
    try:
        hazards = read_hazards(folder)
    except (OSError, ValueError, KeyError) as exc:
        return f"{HAZARDS_FILE} unreadable: {exc!r}"
    return _StudyOutputs(folder, metrics, modalities, hazards)


def _place(src: Path, dst: Path) -> bool:
    """Put ``src`` at ``dst``: kept when already there, else hard-linked or copied.

    "Already there": the same file (a link made by an earlier export), or a copy of the same size no older
    than ``src``. Size alone would keep a stale copy of a re-processed study (same length, same shapes);
    the gateway replaces outputs by a rename, so a re-processed file is a new inode with a newer mtime.
    Returns True when a file was written. Both ways replace ``dst`` by a rename, so a reader (or a crash)
    never sees half a file.
    """
    source = src.stat()
    try:
        target = dst.stat()
    except FileNotFoundError:
        pass
    else:
        same_inode = (target.st_dev, target.st_ino) == (source.st_dev, source.st_ino)
        if same_inode or (target.st_size == source.st_size and target.st_mtime_ns >= source.st_mtime_ns):
            return False
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:
        # Another file system (EXDEV), or one without hard links: copy instead.
        tmp.unlink(missing_ok=True)
    data = src.read_bytes()
    atomic_write(dst, data)
    return True


def _flatten(prefix: str, doc: Any) -> dict[str, Any]:
    """Scalar entries of ``doc`` as ``prefix + key``; a dict of scalars one level down becomes ``prefix_key_sub``.

    Deeper structures (the agreement's confusion matrix) are left to metrics.json: a table cell holds a scalar.
    """
    out: dict[str, Any] = {}
    if not isinstance(doc, dict):
        return out
    for key, value in doc.items():
        if isinstance(value, dict):
            if all(not isinstance(v, (dict, list)) for v in value.values()):
                out.update({f"{prefix}{key}_{sub}": v for sub, v in value.items()})
        elif not isinstance(value, list):
            out[f"{prefix}{key}"] = value
    return out


# ---- columns ---------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar_array(values: list[Any]) -> pa.Array:
    """One column from JSON scalars: bool, int64 or float64 when every value allows it, else strings.

    A column of nulls only is float64 (a metric no study has), not Arrow's null type that tools mishandle.
    """
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.bool_())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present) and present:
        return pa.array(values, type=pa.int64())
    if all(_is_number(v) for v in present):
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


class _HazardColumns:
    """Log hazards of every row, gathered block by block, column-major, as float32.

    The outcome list (and so the columns) is the first study's with hazards; a row is null for a study
    without hazards, and NaN where a study's hazards lack one of the outcomes.
    """

    def __init__(self) -> None:
        self.phecodes: list[str] | None = None
        self.phenotypes: list[str] = []
        self._index: dict[str, int] = {}
        self._blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (K, rows) values, (rows,) null mask
        self._values: np.ndarray | None = None
        self._null = np.zeros(_BLOCK_ROWS, dtype=bool)
        self._rows = 0  # rows in the current block
        self._leading_nulls = 0  # rows before the outcome list was known

    def add(self, hazards: list[HazardRow] | None) -> None:
        if self.phecodes is None:
            if not hazards:
                self._leading_nulls += 1
                return
            self.phecodes = [h.phecode for h in hazards]
            self.phenotypes = [h.phenotype for h in hazards]
            self._index = {code: i for i, code in enumerate(self.phecodes)}
            self._values = self._new_block()
            for _ in range(self._leading_nulls):
                self._append(None)
        self._append(hazards)

    def _new_block(self) -> np.ndarray:
        assert self.phecodes is not None
        return np.full((len(self.phecodes), _BLOCK_ROWS), np.nan, dtype=np.float32)

    def _append(self, hazards: list[HazardRow] | None) -> None:
        assert self._values is not None
        row = self._rows
        if hazards:
            self._null[row] = False
            for h in hazards:
                i = self._index.get(h.phecode)
                if i is not None:  # an outcome the first study did not have has no column
                    self._values[i, row] = h.log_hazard
        else:
            self._null[row] = True
        self._rows += 1
        if self._rows == _BLOCK_ROWS:
            self._flush()

    def _flush(self) -> None:
        assert self._values is not None
        if self._rows:
            self._blocks.append((self._values[:, : self._rows], self._null[: self._rows].copy()))
        self._values = self._new_block() if self._rows == _BLOCK_ROWS else None
        self._null = np.zeros(_BLOCK_ROWS, dtype=bool)
        self._rows = 0

    def columns(self) -> dict[str, pa.ChunkedArray]:
        if self.phecodes is None:
            return {}
        self._flush()
        out: dict[str, pa.ChunkedArray] = {}
        for k, code in enumerate(self.phecodes):
            chunks = [pa.array(np.ascontiguousarray(values[k]), type=pa.float32(),
                               mask=null if null.any() else None)
                      for values, null in self._blocks]
            out[code] = pa.chunked_array(chunks, type=pa.float32())
        # The blocks now live on in the Arrow chunks; drop our references so only one copy remains.
        self._blocks = []
        return out


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


# ---- the export ------------------------------------------------------------------------------------


def _outcomes_csv(phecodes: list[str], phenotypes: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["phecode", "phenotype"])
    writer.writerows(zip(phecodes, phenotypes))
    return buf.getvalue().encode("utf-8")


def export_studies(studies: Iterable[Study], out_dir: Path, *, identifiers: bool = False, csv: bool = False,
                   tokens: bool = False, drop_identifiers: bool = False) -> ExportReport:
    """Export the studies' stored outputs into ``out_dir`` (see the module docstring for the layout).

    Studies without usable outputs (failed, duplicates, a missing file) are listed in ``skipped``, never
    raised. Rows are ordered by study id. ``identifiers`` adds patient_id, accession, study_uid and
    recording_start (PHI: only for an export that may hold it); ``tokens`` adds the per-token embeddings.
    Raises :class:`ExportError` when the export folder cannot be written, and, before writing anything,
    when ``out_dir`` holds an export with identifier columns that this one would drop (neither
    ``identifiers`` nor ``drop_identifiers``).
    """
    out_dir = check_export_dir(out_dir)
    check_identifiers_kept(out_dir, identifiers=identifiers, drop_identifiers=drop_identifiers)
    emb_root = out_dir / EMBEDDINGS_DIR

    ordered = sorted({s.id: s for s in studies}.values(), key=lambda s: s.id)
    fixed: dict[str, list[Any]] = {name: [] for name in (
        "study_key", *(IDENTIFIER_COLUMNS if identifiers else ()), "source_kind", "state", "duration_s",
        "modalities", "montage_version", "model_name", "model_hash", "model_validated", "age_years", "sex",
        "demographics_encoding", "tail_tokens", "diagnosis_tokens", *RESPIRATORY_COLUMNS)}
    # Sleep and agreement keys: the union over the studies, in the order first seen.
    sleep_rows: list[dict[str, Any]] = []
    agreement_rows: list[dict[str, Any]] = []
    sleep_keys: dict[str, None] = {}
    agreement_keys: dict[str, None] = {}
    hazards = _HazardColumns()
    skipped: list[tuple[str, str]] = []
    written = kept = 0

    for study in ordered:
        found = _read_outputs(study, tokens)
        if isinstance(found, str):
            skipped.append((study.key, found))
            continue
        files = [("night.npy", found.folder / "night.npy")]
        for modality in found.modalities:
            files.append((f"{modality}.npy", found.folder / EMBEDDINGS_DIR / f"{modality}_5min.npy"))
            if tokens:
                files.append((f"{modality}_tokens.npy", found.folder / EMBEDDINGS_DIR / f"{modality}.npy"))
        dest = emb_root / study.key
        try:
            private_mkdir(dest)
        except OSError as exc:
            raise ExportError(f"cannot create {dest}: {_reason(exc)}") from exc
        for name, src in files:
            try:
                if _place(src, dest / name):
                    written += 1
                else:
                    kept += 1
            except OSError as exc:
                # The sources were checked just before; what fails here is nearly always the export side.
                raise ExportError(f"cannot export {src} to {dest / name}: {_reason(exc)}") from exc

        metrics = found.metrics
        recording = metrics.get("recording") or {}
        montage = metrics.get("montage") or {}
        bundle = metrics.get("model_bundle") or {}
        demographics = metrics.get("demographics_used") or {}
        fixed["study_key"].append(study.key)
        if identifiers:
            fixed["patient_id"].append(study.patient_id)
            fixed["accession"].append(study.accession)
            fixed["study_uid"].append(study.study_uid)
            fixed["recording_start"].append(_iso(study.recording_start))
        fixed["source_kind"].append(study.source_kind)
        fixed["state"].append(str(study.state))
        duration = recording.get("duration_s")
        fixed["duration_s"].append(float(duration) if _is_number(duration) else None)
        fixed["modalities"].append("|".join(found.modalities))
        # What metrics.json says describes these very files; the study row may have been re-mapped since.
        fixed["montage_version"].append(montage.get("version") or study.montage_version)
        fixed["model_name"].append(bundle.get("name") or study.bundle_name)
        fixed["model_hash"].append(study.bundle_hash)
        validated = metrics.get("validated", study.bundle_validated)
        fixed["model_validated"].append(None if validated is None else bool(validated))
        age = demographics.get("age_years")
        fixed["age_years"].append(float(age) if _is_number(age) and math.isfinite(age) else None)
        sex = demographics.get("sex")
        fixed["sex"].append(None if sex is None else str(sex))
        # outputs written before these were recorded have none: unconfirmed, unknown
        fixed["demographics_encoding"].append(str(metrics.get("demographics_encoding") or "unconfirmed"))
        windows = metrics.get("windows") or {}
        fixed["tail_tokens"].append(windows.get("tail_tokens"))
        fixed["diagnosis_tokens"].append((metrics.get("diagnosis_input") or {}).get("tokens_used"))
        respiratory = metrics.get("respiratory") or {}
        for name in RESPIRATORY_COLUMNS:  # null: no scoring file, or a night without sleep
            value = respiratory.get(name)
            fixed[name].append(float(value) if _is_number(value) and math.isfinite(value) else None)
        sleep = _flatten("sleep_", metrics.get("sleep"))
        agreement = _flatten("agreement_", metrics.get("staging_agreement"))
        sleep_keys.update(dict.fromkeys(sleep))
        agreement_keys.update(dict.fromkeys(agreement))
        sleep_rows.append(sleep)
        agreement_rows.append(agreement)
        hazards.add(found.hazards)

    columns: dict[str, Any] = {}
    for name, values in fixed.items():
        if name == "model_validated":
            columns[name] = pa.array(values, type=pa.bool_())
        elif name in ("duration_s", "age_years", *RESPIRATORY_COLUMNS):
            columns[name] = pa.array(values, type=pa.float64())
        elif name in ("tail_tokens", "diagnosis_tokens"):
            columns[name] = pa.array([v if isinstance(v, int) else None for v in values], type=pa.int64())
        else:
            columns[name] = pa.array(values, type=pa.string())
    for keys, rows in ((sleep_keys, sleep_rows), (agreement_keys, agreement_rows)):
        for key in keys:
            columns[key] = _scalar_array([row.get(key) for row in rows])
    del sleep_rows, agreement_rows
    hazard_columns = hazards.columns()
    clash = sorted(set(hazard_columns) & set(columns))
    if clash:
        raise ExportError(f"outcome phecodes {clash} clash with table columns of the same name")
    columns.update(hazard_columns)
    table = pa.table(columns)

    table_path = out_dir / TABLE_NAME
    csv_path = out_dir / CSV_NAME if csv else None
    try:
        atomic_write_with(table_path, lambda tmp: pq.write_table(table, tmp))
        if csv_path is not None:
            atomic_write_with(csv_path, lambda tmp: pacsv.write_csv(table, tmp))
        if hazards.phecodes is not None:
            atomic_write(out_dir / OUTCOMES_NAME, _outcomes_csv(hazards.phecodes, hazards.phenotypes))
        if csv_path is None and not identifiers and _has_identifiers(out_dir / CSV_NAME):
            # An older run's studies.csv would still hold the identifiers the user chose to drop.
            (out_dir / CSV_NAME).unlink()
    except OSError as exc:
        raise ExportError(f"cannot write the export table into {out_dir}: {_reason(exc)}") from exc
    return ExportReport(studies=table.num_rows, files_written=written, files_kept=kept, table=table_path,
                        csv=csv_path, skipped=skipped)
