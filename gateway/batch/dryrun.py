"""``psg-gateway batch --dry-run``: what a run would process, with the montage coverage of each study.

Reads headers and the database only: nothing is registered, no model runs. Files not in the archive
cache are hashed (in threads; hashlib releases the GIL) so that a file the daemon or an earlier run
already processed shows as such.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..montage.table import MontageTable
from ..pipeline.steps import decode_inputs
from ..readers.errors import ReaderError
from ..sources.archive import ArchiveItem, Discovery
from ..store.batch_repo import BatchRepo
from ..store.models import PIPELINE_DONE, State, Study
from .work import hash_file

__all__ = ["PlanRow", "plan"]

_MODALITIES = ("BAS", "RESP", "EKG", "EMG")


@dataclass
class PlanRow:
    name: str
    kind: str
    recorded: str | None
    status: str  # new | resume | already processed | failed before | duplicate | daemon | unreadable
    study_key: str | None = None
    duration_h: float | None = None
    modalities: dict[str, int] = field(default_factory=dict)  # modality -> channels mapped
    unmapped: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def would_process(self) -> bool:
        return self.status in ("new", "resume")


def plan(found: Discovery, brepo: BatchRepo, table: MontageTable, *, restart: bool = False,
         limit: int | None = None, threads: int = 4) -> list[PlanRow]:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        rows = list(pool.map(lambda item: _row(item, brepo, table, restart), found.items))
    rows += [PlanRow(name, "dicom", None, "unreadable", problem=reason) for name, reason in found.unreadable]
    if limit is not None:
        queued = 0
        for row in rows:
            if row.would_process:
                queued += 1
                if queued > limit:
                    row.status = "not reached (--limit)"
    return rows


def _row(item: ArchiveItem, brepo: BatchRepo, table: MontageTable, restart: bool) -> PlanRow:
    row = PlanRow(item.name, "EDF/BDF" if item.kind == "file" else "DICOM",
                  item.recorded.isoformat() if item.recorded else None, "new")
    study = _known(item, brepo)
    if study is not None:
        row.study_key = study.key
        row.status = _status(study, restart)
    try:
        recording = decode_inputs(list(item.paths))
    except ReaderError as exc:
        row.problem = f"unreadable ({exc.kind}): {exc.reason}"
        return row
    except OSError as exc:
        row.problem = f"storage: {exc.strerror}"
        return row
    match = table.map_labels(recording.channel_labels, source=item.source, codes=recording.channel_codes)
    row.duration_h = round(recording.duration_s / 3600, 2)
    row.modalities = {m: len(match.groups.get(m, [])) for m in _MODALITIES if match.groups.get(m)}
    row.unmapped = list(match.unmapped)
    if not row.modalities:
        row.problem = "no channel maps to a modality: would fail"
    return row


def _known(item: ArchiveItem, brepo: BatchRepo) -> Study | None:
    if item.kind == "dicom":
        for ref in item.instances:
            study = brepo.study_of_instance(ref.sop_instance_uid)
            if study is not None:
                return study
        return None
    path = item.paths[0]
    st = path.stat()
    study = brepo.cached(str(path), st.st_size, st.st_mtime_ns)
    if study is None:
        study = brepo.original_of_hash(hash_file(str(path)).sha256)
    if study is not None and study.state == State.DUPLICATE and study.duplicate_of:
        study = brepo.repo.get(study.duplicate_of) or study
    return study


def _status(study: Study, restart: bool) -> str:
    final = study.state in [str(s) for s in PIPELINE_DONE]
    if study.batch_run_id is None and not final:
        return "daemon"
    if restart and study.batch_run_id is not None and final:
        return "resume"
    if study.state == State.FAILED:
        return "failed before"
    if final:
        return "already processed"
    return "resume"
