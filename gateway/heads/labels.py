"""Outcome labels for ``heads fit cox`` built from a site's diagnosis codes (``heads labels build``).

Inputs:

* the Phecode Map 1.2 tables the site downloads from phewascatalog.org (we ship no copy), format-checked:
  the ICD-9-CM map (``phecode_icd9_rolled.csv``: ``ICD9, ICD9 String, PheCode, Phenotype, Excl. Phecodes,
  ...``, or the unrolled ``icd9, phecode``), the ICD-10-CM map (``Phecode_map_v1_2_icd10cm_beta.csv``:
  ``icd10cm, icd10cm_str, phecode, phecode_str, exclude_range, ...``) and, for exclusion ranges a map
  lacks, the definitions (``phecode_definitions1.2.csv``: ``phecode, phenotype, phecode_exclude_range,
  ...``). Column names are matched case-insensitively.
* diagnoses: ``patient_id, code, code_system (ICD9CM|ICD10CM), date (YYYY-MM-DD)``;
* optional follow-up: ``patient_id, last_followup_date``;
* the export's ``studies.parquet`` (``batch --export --export-identifiers``): ``study_key, patient_id,
  recording_start``; the study date is the recording's calendar date.

Rules, per study and outcome phecode P (time in days from the study date):

1. a code matches P when its (code system, code without dots, upper-case) is a row of a map whose phecode
   is P (the map's rows are taken as given: no roll-up is added, no prefix matching);
2. *prevalent*: the patient's first code matching P is on or before the study date: no row;
3. the censoring date is the last follow-up (the follow-up file, else the patient's latest diagnosis
   of any code), capped at study date + horizon; a censoring date on or before the study date: no row
   (*no follow-up*);
4. *case*: the first code matching P is after the study and on or before the censoring date:
   ``time_to_event`` = days to it, ``event`` 1;
5. otherwise, *excluded by range*: the patient has a code, dated on or before the censoring date,
   mapping to a phecode other than P inside P's exclusion range (the Phecode method's control
   exclusion; cases are never excluded by it): no row;
6. otherwise a *control*: ``time_to_event`` = days to the censoring date, ``event`` 0 (a code for P after
   the censoring date counts as ``diagnosed_after_censoring``).

The output is exactly ``heads fit cox --labels``: ``study_key, label, time_to_event, event``, the label
being the phecode.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..fsutil import atomic_write
from .data import LabelsError, file_sha256

__all__ = ["CODE_SYSTEMS", "Diagnoses", "OutcomeCounts", "PhecodeMap", "StudyDate", "build_labels",
           "canonical_phecode", "normalise_code", "read_diagnoses", "read_export_studies", "read_follow_up",
           "read_phecode_map", "write_labels"]

CODE_SYSTEMS = ("ICD9CM", "ICD10CM")
LABEL_COLUMNS = ("study_key", "label", "time_to_event", "event")

_PHECODE = re.compile(r"^\d{1,4}(\.\d{1,2})?$")
_ICD = re.compile(r"^[A-Z0-9]{3,7}$")
# map format: (code column, code system, phenotype column, exclusion range column); all lower-case
_FORMATS = {
    "icd9": ("icd9", "ICD9CM", "phenotype", "excl. phecodes"),
    "icd10cm": ("icd10cm", "ICD10CM", "phecode_str", "exclude_range"),
    "definitions": (None, None, "phenotype", "phecode_exclude_range"),
}
_ACCEPTED = ("Phecode Map 1.2 tables from phewascatalog.org: the ICD-9-CM map (ICD9/icd9, PheCode/phecode), "
             "the ICD-10-CM map (icd10cm, phecode) or the definitions (phecode, phecode_exclude_range)")


def canonical_phecode(text: str) -> str | None:
    """``008.50`` -> ``8.5``; None when ``text`` is not a phecode (up to 4 digits, up to 2 decimals)."""
    text = text.strip()
    if not _PHECODE.match(text):
        return None
    whole, _, frac = text.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def normalise_code(text: str) -> str | None:
    """An ICD code without its dot, upper-case (``250.00`` and ``25000`` are one code); None if malformed."""
    code = text.strip().upper().replace(".", "")
    return code if _ICD.match(code) else None


def _code_system(text: str) -> str | None:
    system = text.strip().upper().replace("-", "").replace("_", "")
    return system if system in CODE_SYSTEMS else None


def _date(text: str) -> date | None:
    """``YYYY-MM-DD``, or an ISO date-time (its date)."""
    text = text.strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        return datetime.fromisoformat(text).date() if len(text) > 10 else None
    except ValueError:
        return None


def _ranges(text: str) -> tuple[tuple[float, float], ...] | None:
    """``008-010.99, 041-041.99`` -> ((8, 10.99), (41, 41.99)); a lone phecode is a range of one."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        lo_c, hi_c = canonical_phecode(lo), canonical_phecode(hi if sep else lo)
        if lo_c is None or hi_c is None or float(lo_c) > float(hi_c):
            return None
        out.append((float(lo_c), float(hi_c)))
    return tuple(out)


def _rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The lower-cased header and (line number, cells) of every non-empty row."""
    line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = []
            for row in reader:
                line = reader.line_num
                if any(c.strip() for c in row):
                    rows.append((line, [c.strip() for c in row]))
    except OSError as exc:
        raise LabelsError(path, [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise LabelsError(path, ["not a UTF-8 text file"]) from None
    except csv.Error as exc:
        raise LabelsError(path, [f"line {line + 1}: not CSV ({exc})"]) from None
    return header, rows


def _require(path: Path, header: list[str], columns: Sequence[str]) -> dict[str, int]:
    missing = [c for c in columns if c not in header]
    if missing:
        raise LabelsError(path, [(f"line 1: missing column(s) {', '.join(missing)} (columns found: "
                                  f"{', '.join(header) or 'none'})")])
    return {c: header.index(c) for c in header}


def _cell(row: list[str], col: dict[str, int], name: str) -> str:
    i = col.get(name)
    return row[i] if i is not None and i < len(row) else ""


# ---- the phecode map ------------------------------------------------------------------------------
@dataclass
class PhecodeMap:
    """(code system, normalised code) -> phecodes; phecode -> phenotype and exclusion ranges."""

    codes: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    names: dict[str, str] = field(default_factory=dict)
    exclude: dict[str, set[tuple[float, float]]] = field(default_factory=lambda: defaultdict(set))
    sources: list[dict[str, Any]] = field(default_factory=list)

    def in_range(self, outcome: str, phecode: str) -> bool:
        value = float(phecode)
        return phecode != outcome and any(lo <= value <= hi for lo, hi in self.exclude.get(outcome, ()))


def read_phecode_map(paths: Iterable[Path]) -> PhecodeMap:
    """Read and check one or more Phecode Map 1.2 files (see the module docstring) into one map."""
    pmap = PhecodeMap()
    for path in paths:
        path = Path(path)
        header, rows = _rows(path)
        kind = next((k for k in ("icd9", "icd10cm") if k in header), None)
        if kind is None and "icd10" in header:
            raise LabelsError(path, [("line 1: the ICD-10 (WHO) phecode map; diagnoses are ICD-10-CM: use "
                                      "Phecode_map_v1_2_icd10cm_beta.csv")])
        if kind is None and "phecode_exclude_range" in header:
            kind = "definitions"
        if kind is None or "phecode" not in header:
            raise LabelsError(path, [(f"line 1: not a phecode map (columns found: {', '.join(header) or 'none'}); "
                                      f"expected one of the {_ACCEPTED}")])
        code_col, system, name_col, excl_col = _FORMATS[kind]
        col = {c: header.index(c) for c in header}
        problems: list[str] = []
        mapped = 0
        for line, row in rows:
            raw_phecode = _cell(row, col, "phecode")
            if not raw_phecode and code_col:
                continue  # an ICD code the map leaves without a phecode
            phecode = canonical_phecode(raw_phecode)
            if phecode is None:
                problems.append(f"line {line}: phecode '{raw_phecode}' is not a phecode (e.g. 250.2)")
                continue
            if code_col and system:
                code = normalise_code(_cell(row, col, code_col))
                if code is None:
                    problems.append(f"line {line}: {code_col} '{_cell(row, col, code_col)}' is not an ICD code")
                    continue
                pmap.codes[(system, code)].add(phecode)
                mapped += 1
            name = _cell(row, col, name_col)
            if name:
                pmap.names.setdefault(phecode, name)
            ranges = _ranges(_cell(row, col, excl_col))
            if ranges is None:
                problems.append(f"line {line}: {excl_col} '{_cell(row, col, excl_col)}' is not a list of "
                                "phecode ranges (e.g. 249-250.99, 256-256.99)")
                continue
            pmap.exclude[phecode].update(ranges)
        if problems:
            raise LabelsError(path, problems)
        if not rows:
            raise LabelsError(path, ["no rows"])
        pmap.sources.append({"path": str(path), "format": kind, "rows": len(rows), "codes": mapped,
                             "sha256": file_sha256(path)})
    if not pmap.codes:
        raise LabelsError("--map", ["no ICD-to-phecode map given (only definitions)"])
    return pmap


# ---- diagnoses, follow-up, studies ----------------------------------------------------------------
@dataclass
class Diagnoses:
    """Per patient: phecode -> sorted dates of the codes mapping to it, and the latest diagnosis date."""

    by_patient: dict[str, dict[str, list[date]]]
    last_date: dict[str, date]
    rows: int
    unmapped_rows: int
    unmapped_codes: dict[str, int]  # "ICD10CM:Z9989" -> rows
    sha256: str


def read_diagnoses(path: Path, pmap: PhecodeMap) -> Diagnoses:
    header, rows = _rows(path)
    col = _require(path, header, ("patient_id", "code", "code_system", "date"))
    problems: list[str] = []
    by_patient: dict[str, dict[str, list[date]]] = defaultdict(lambda: defaultdict(list))
    last: dict[str, date] = {}
    unmapped: dict[str, int] = defaultdict(int)
    for line, row in rows:
        pid, raw_code = _cell(row, col, "patient_id"), _cell(row, col, "code")
        raw_system, raw_date = _cell(row, col, "code_system"), _cell(row, col, "date")
        system, code, when = _code_system(raw_system), normalise_code(raw_code), _date(raw_date)
        wrong = ("empty patient_id" if not pid else
                 f"code_system '{raw_system}' is not ICD9CM or ICD10CM" if system is None else
                 f"code '{raw_code}' is not an ICD code" if code is None else
                 f"date '{raw_date}' is not a date (YYYY-MM-DD)" if when is None else None)
        if wrong:
            problems.append(f"line {line}: {wrong}")
            continue
        assert system and code and when
        last[pid] = max(last.get(pid, when), when)
        phecodes = pmap.codes.get((system, code))
        if not phecodes:
            unmapped[f"{system}:{code}"] += 1
            continue
        for phecode in phecodes:
            by_patient[pid][phecode].append(when)
    if problems:
        raise LabelsError(path, problems)
    for per in by_patient.values():
        for dates in per.values():
            dates.sort()
    return Diagnoses({p: dict(v) for p, v in by_patient.items()}, last, len(rows), sum(unmapped.values()),
                     dict(unmapped), file_sha256(path))


def read_follow_up(path: Path) -> dict[str, date]:
    header, rows = _rows(path)
    col = _require(path, header, ("patient_id", "last_followup_date"))
    out: dict[str, date] = {}
    problems: list[str] = []
    for line, row in rows:
        pid, raw = _cell(row, col, "patient_id"), _cell(row, col, "last_followup_date")
        when = _date(raw)
        if not pid or when is None:
            problems.append(f"line {line}: " + ("empty patient_id" if not pid else
                                                f"last_followup_date '{raw}' is not a date (YYYY-MM-DD)"))
        elif pid in out:
            problems.append(f"line {line}: a second row for patient '{pid}'")
        else:
            out[pid] = when
    if problems:
        raise LabelsError(path, problems)
    return out


@dataclass(frozen=True)
class StudyDate:
    key: str
    patient_id: str | None
    day: date | None


def read_export_studies(folder: Path) -> list[StudyDate]:
    """``study_key, patient_id, recording_start`` of an export written with ``--export-identifiers``."""
    table_path = Path(folder) / "studies.parquet"
    if not table_path.is_file():
        raise LabelsError(folder, ["no studies.parquet: not an export folder (psg-gateway batch --export DIR)"])
    table = pq.read_table(table_path)
    missing = [c for c in ("study_key", "patient_id", "recording_start") if c not in table.column_names]
    if missing:
        raise LabelsError(table_path, [f"no {', '.join(missing)} column: export with --export-identifiers"])
    out = []
    for key, pid, start in zip(*(table.column(c).to_pylist() for c in ("study_key", "patient_id",
                                                                        "recording_start"))):
        day = start.date() if isinstance(start, datetime) else start if isinstance(start, date) else \
            _date(str(start)) if start else None
        out.append(StudyDate(str(key), str(pid) if pid not in (None, "") else None, day))
    if not out:
        raise LabelsError(table_path, ["the export holds no study"])
    return out


# ---- the labels ------------------------------------------------------------------------------------
@dataclass
class OutcomeCounts:
    phecode: str
    phenotype: str
    cases: int = 0
    controls: int = 0
    censored_at_followup: int = 0
    censored_at_horizon: int = 0
    diagnosed_after_censoring: int = 0
    excluded_prevalent: int = 0
    excluded_range: int = 0
    excluded_no_followup: int = 0


def build_labels(studies: Sequence[StudyDate], dx: Diagnoses, pmap: PhecodeMap, *,
                 follow_up: dict[str, date] | None = None, horizon_days: int | None = None,
                 outcomes: Sequence[str] | None = None) -> tuple[list[tuple[str, str, int, int]], dict[str, Any]]:
    """The label rows ``(study_key, phecode, days, event)`` and the count report (module docstring rules).

    ``outcomes``: the phecodes to label (default: every phecode a diagnosis maps to)."""
    known = set(pmap.names) | {p for ps in pmap.codes.values() for p in ps}
    if outcomes:
        chosen, bad = [], []
        for text in outcomes:
            p = canonical_phecode(text)
            (chosen if p in known else bad).append(p or text)
        if bad:
            raise LabelsError("--outcome", [f"'{b}' is not a phecode of the map" for b in bad])
        chosen = list(dict.fromkeys(chosen))
    else:
        chosen = sorted({p for per in dx.by_patient.values() for p in per}, key=float)
    follow_up = follow_up or {}
    # Per patient and outcome: the earliest code mapping into the outcome's exclusion range (not itself).
    reached = {q for per in dx.by_patient.values() for q in per}
    ranged = {q: [o for o in chosen if pmap.in_range(o, q)] for q in reached}
    range_first: dict[str, dict[str, date]] = {}
    for pid, per in dx.by_patient.items():
        firsts: dict[str, date] = {}
        for q, dates in per.items():
            for outcome in ranged[q]:
                if outcome not in firsts or dates[0] < firsts[outcome]:
                    firsts[outcome] = dates[0]
        range_first[pid] = firsts
    counts = {p: OutcomeCounts(p, pmap.names.get(p, "")) for p in chosen}
    rows: list[tuple[str, str, int, int]] = []
    unlabelled = 0
    for study in studies:
        if study.patient_id is None or study.day is None:
            unlabelled += 1
            continue
        pid, day = study.patient_id, study.day
        last = follow_up.get(pid) or dx.last_date.get(pid)
        censor, at_horizon = last, False
        if last is not None and horizon_days is not None and day + timedelta(days=horizon_days) < last:
            censor, at_horizon = day + timedelta(days=horizon_days), True
        per = dx.by_patient.get(pid, {})
        for outcome in chosen:
            c = counts[outcome]
            dates = per.get(outcome)
            if dates and dates[0] <= day:
                c.excluded_prevalent += 1
            elif censor is None or censor <= day:
                c.excluded_no_followup += 1
            elif dates and dates[0] <= censor:
                c.cases += 1
                rows.append((study.key, outcome, (dates[0] - day).days, 1))
            elif (first := range_first.get(pid, {}).get(outcome)) is not None and first <= censor:
                c.excluded_range += 1
            else:
                c.controls += 1
                c.censored_at_horizon += at_horizon
                c.censored_at_followup += not at_horizon
                c.diagnosed_after_censoring += bool(dates)
                rows.append((study.key, outcome, (censor - day).days, 0))
    in_export = {s.patient_id for s in studies if s.patient_id}
    report = {
        "outcomes": [asdict(c) for c in counts.values()],
        "studies": len(studies),
        "studies_without_patient_or_date": unlabelled,
        "diagnoses": {"rows": dx.rows, "unmapped_rows": dx.unmapped_rows,
                      "unmapped_codes": len(dx.unmapped_codes),
                      "patients_not_in_export": len(set(dx.last_date) - in_export), "sha256": dx.sha256},
        "follow_up": "file" if follow_up else "latest diagnosis date",
        "horizon_days": horizon_days,
        "maps": pmap.sources,
    }
    return rows, report


def write_labels(rows: Sequence[tuple[str, str, int, int]], report: dict[str, Any], out: Path) -> Path:
    """``out`` (the labels CSV) and the report beside it (``<stem>.report.json``); returns the report path.
    Study keys with diagnoses are health information: both files are written private and atomically."""
    out = Path(out)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LABEL_COLUMNS)
    writer.writerows(rows)
    atomic_write(out, buf.getvalue().encode("utf-8"))
    report_path = out.with_name(out.stem + ".report.json")
    atomic_write(report_path, (json.dumps({**report, "labels": str(out)}, indent=2) + "\n").encode("utf-8"))
    return report_path
