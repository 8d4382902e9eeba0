"""A batch run's tally and its summary: counts by outcome, failures by reason (with file names),
unmapped channel labels, modality coverage and time per stage.

The summary file is an operator's document, written with mode 0600 beside the database's files: it
names archive files (which may carry patient names), so it is never logged. Log lines carry counts.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write

__all__ = ["OUTCOMES", "Tally"]

# outcome -> what the summary calls it
OUTCOMES = {
    "processed": "processed in this run",
    "failed": "failed in this run",
    "already_done": "already processed (earlier run or the daemon)",
    "failed_before": "failed in an earlier run (psg-gateway studies retry, or --restart)",
    "duplicate": "same content as another study (not processed again)",
    "daemon": "being processed by the daemon",
    "unreadable": "unreadable DICOM file (study unknown)",
    "not_reached": "not reached (--limit)",
    "interrupted": "interrupted (resumes on the next run)",
    "superseded": "changed by another process during the run",
}

_MODALITIES = ("BAS", "RESP", "EKG", "EMG")


@dataclass
class Tally:
    total: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    final_states: Counter[str] = field(default_factory=Counter)  # processed studies by final state
    failures: list[dict[str, str]] = field(default_factory=list)
    unmapped: Counter[str] = field(default_factory=Counter)
    modalities: Counter[str] = field(default_factory=Counter)
    coverage: Counter[str] = field(default_factory=Counter)  # "BAS+RESP+EKG" -> studies
    stage_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    recorded_hours: float = 0.0
    retries: int = 0
    export_error: str | None = None  # --export failed (the results are stored; run the export again)

    @property
    def done(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failed(self) -> int:
        return self.outcomes["failed"]

    def add(self, outcome: str, n: int = 1) -> None:
        self.outcomes[outcome] += n

    def fail(self, name: str, key: str | None, reason: str) -> None:
        self.outcomes["failed"] += 1
        self.failures.append({"file": name, "study_key": key or "", "reason": reason})

    def mapped(self, channels: dict[str, list[str]], unmapped: list[str]) -> None:
        present = [m for m in _MODALITIES if channels.get(m)]
        for m in present:
            self.modalities[m] += 1
        self.coverage["+".join(present) or "none"] += 1
        self.unmapped.update(unmapped)

    def timed(self, timings: dict[str, float]) -> None:
        for k, v in timings.items():
            self.stage_seconds[k.removesuffix("_s")] += float(v)

    def document(self, *, run_id: int, wall_s: float, options: dict[str, Any], status: str) -> dict[str, Any]:
        processed = self.outcomes["processed"]
        by_reason: dict[str, list[dict[str, str]]] = defaultdict(list)
        for f in self.failures:
            by_reason[f["reason"]].append(f)
        return {
            "run": run_id,
            "status": status,
            "options": options,
            "wall_seconds": round(wall_s, 1),
            "studies": {"found": self.total, **{k: self.outcomes[k] for k in OUTCOMES if self.outcomes[k]}},
            "processed_by_state": dict(self.final_states),
            "nights_per_hour": round(3600 * processed / wall_s, 1) if wall_s > 0 and processed else 0.0,
            "recorded_hours": round(self.recorded_hours, 1),
            "transient_retries": self.retries,
            "failures_by_reason": [{"reason": r, "count": len(v), "studies": v}
                                   for r, v in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))],
            "unmapped_labels": dict(self.unmapped.most_common()),
            "modality_coverage": {"studies_with": {m: self.modalities[m] for m in _MODALITIES},
                                  "combinations": dict(self.coverage.most_common())},
            "stage_seconds": {k: round(v, 1) for k, v in sorted(self.stage_seconds.items())},
            "stage_seconds_per_study": ({k: round(v / processed, 3) for k, v in sorted(self.stage_seconds.items())}
                                        if processed else {}),
        }


def render_text(doc: dict[str, Any]) -> str:
    """The summary as plain text (the terminal's and the .txt file's)."""
    head = (f"psg-gateway batch run {doc['run']}: {doc['status']}, {doc['wall_seconds']} s, "
            f"{doc['nights_per_hour']} nights/hour")
    lines = [head, ""]
    lines.append(f"studies found: {doc['studies']['found']}")
    for key, label in OUTCOMES.items():
        if doc["studies"].get(key):
            lines.append(f"  {doc['studies'][key]:>7}  {label}")
    if doc["processed_by_state"]:
        lines.append("processed, by result: " + ", ".join(f"{k} {v}" for k, v in doc["processed_by_state"].items()))
    if doc["failures_by_reason"]:
        lines += ["", "failures by reason:"]
        for group in doc["failures_by_reason"]:
            lines.append(f"  {group['count']} x {group['reason']}")
            for f in group["studies"][:20]:
                lines.append(f"      {f['file']}  ({f['study_key'] or 'no study'})")
            if group["count"] > 20:
                lines.append(f"      ... and {group['count'] - 20} more (summary.json has them all)")
    if doc["unmapped_labels"]:
        lines += ["", "unmapped channel labels (add them to the montage table if they carry signal):"]
        lines += [f"  {n:>6}  {label}" for label, n in list(doc["unmapped_labels"].items())[:30]]
    cov = doc["modality_coverage"]
    if cov["combinations"]:
        lines += ["", "modality coverage: " + ", ".join(f"{m} {n}" for m, n in cov["studies_with"].items())]
        lines += [f"  {n:>6}  {combo}" for combo, n in cov["combinations"].items()]
    if doc.get("export_error"):
        lines += ["", f"export failed: {doc['export_error']}"]
    if doc["stage_seconds_per_study"]:
        lines += ["", "seconds per processed study: " + ", ".join(
            f"{k} {v}" for k, v in doc["stage_seconds_per_study"].items())]
    return "\n".join(lines) + "\n"


def write_summary(doc: dict[str, Any], path: Path) -> tuple[Path, Path]:
    """``path`` (JSON) and the same name with ``.txt``, private to the service user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text_path = path.with_suffix(".txt")
    atomic_write(path, (json.dumps(doc, indent=2, default=str) + "\n").encode("utf-8"))
    atomic_write(text_path, render_text(doc).encode("utf-8"))
    for p in (path, text_path):
        os.chmod(p, 0o600)
    return path, text_path
