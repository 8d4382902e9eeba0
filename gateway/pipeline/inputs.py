"""Where a study's input files are: the spool while it is worked on, then ``processed/<study key>/`` or,
FAILED, ``quarantine/<study key>/`` with a ``REASON.txt``.

Inputs are moved, never deleted, renamed after the study key (``<study key>.edf``, sidecars
``<study key>.edf.json``/``<study key>.json``); the name a file arrived under (which can hold a name or
an MRN) is kept only in the database's ``input_name``. The move follows the committed state: a crash
between the commit and the move is finished by :meth:`InputFiles.reconcile` on the next start.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..config import PathsConfig
from ..fsutil import atomic_write, make_private, private_mkdir
from ..logging import get_logger
from ..spool import forget_original, spool_name
from ..store.models import PIPELINE_DONE, MessageState, State, Study
from ..store.repo import Repo

__all__ = ["InputFiles"]

log = get_logger("psg.pipeline")


@dataclass
class InputFiles:
    """Moves a finished study's input out of the spool to where its committed state says."""

    repo: Repo
    paths: PathsConfig

    def finalize(self, study: Study, state: State) -> None:
        """Move the input out of the spool (processed/ or quarantine/); a failure here is only logged:
        the study's state is already committed and ``reconcile`` finishes the move on the next start."""
        try:
            self._move_input(study, state)
        except OSError as exc:
            log.error("study.input_move_failed", study_key=study.key, error=exc.strerror)

    def _owned(self, path: Path) -> bool:
        roots = [Path(self.paths.spool), Path(self.paths.processed), Path(self.paths.quarantine)]
        return any(path.is_relative_to(r) for r in roots)

    def place(self, study_id: int) -> None:
        """Put a finished study's input where its committed state says (after delivery or a dead letter:
        FAILED in quarantine/ with REASON.txt, anything else in processed/)."""
        study = self.repo.get(study_id)
        if study is not None and study.state in [str(s) for s in PIPELINE_DONE]:
            self.finalize(study, State(study.state))

    def _move_input(self, study: Study, state: State) -> None:
        dest = Path(self.paths.quarantine if state == State.FAILED else self.paths.processed) / study.key
        if state == State.FAILED:
            private_mkdir(dest)
            dead = (self.repo.messages(state=str(MessageState.DEAD), study_id=study.id, limit=1)
                    if study.error_kind == "delivery" else [])
            _write_reason(dest / "REASON.txt", study, dead[0].id if dead else None)
        else:
            # Out of quarantine (a dead letter retried and delivered): its reason no longer holds.
            (Path(self.paths.quarantine) / study.key / "REASON.txt").unlink(missing_ok=True)
        if study.source_kind == "dicom":
            instances = self.repo.instances_of(study.id)
            if not any(self._owned(Path(i.path)) for i in instances):
                return  # an archive batch's study: its files stay in the archive
            private_mkdir(dest)
            for inst in instances:
                src = Path(inst.path)
                if src.parent == dest or not self._owned(src):
                    continue
                target = dest / src.name  # named by a hash of the SOP Instance UID: no PHI in it
                if src.exists():
                    shutil.move(src, target)
                    _make_private(target)
                if target.exists():
                    self.repo.move_instance(inst.id, str(target))
            if study.input_path:
                _remove_empty(Path(study.input_path))
            self.repo.set_fields(study, input_path=str(dest))
            return
        if not study.input_path:
            return
        src = Path(study.input_path)
        if src.parent == dest or not self._owned(src):
            return
        private_mkdir(dest)
        # The claim folder holds the recording, its sidecars and claim.json: they travel together, renamed
        # after the study key (a claim from an older version still has the original name: not kept).
        items = sorted(src.parent.iterdir()) if src.parent.exists() else []
        # The recording's and its sidecars' names too when already moved (a crash mid-way): the manifest,
        # moved last or not, then names what is there.
        renames = _key_names(src, study.key, [item.name for item in items]
                             + [src.name, src.name + ".json", src.stem + ".json"])
        for item in items:
            target = dest / renames.get(item.name, item.name)
            shutil.move(item, target)
            _make_private(target)
        forget_original(dest, renames)  # the manifest: new names, and no original path
        _remove_empty(src.parent)
        moved = dest / renames.get(src.name, src.name)
        if moved.exists():
            self.repo.set_fields(study, input_path=str(moved))

    def reconcile(self) -> int:
        """On start: finish input moves a crash interrupted (state committed, input not yet where it says)."""
        n = 0
        roots = [str(Path(r)) + "/" for r in (self.paths.spool, self.paths.processed, self.paths.quarantine)]
        for study in self.repo.misplaced_inputs(*roots):
            self._move_input(study, State(study.state))
            n += 1
        return n


def _write_reason(path: Path, study: Study, dead_message_id: int | None = None) -> None:
    text = (f"study: {study.key} (id {study.id}, version {study.version})\n"
            f"state: {study.state}\nwhen: {_now().isoformat()}\n"
            f"kind: {study.error_kind or 'permanent'}\nreason: {study.last_error or ''}\n")
    if dead_message_id is not None:  # the result exists; only its delivery failed
        text += f"retry: psg-gateway outbox retry {dead_message_id} (after fixing what the EHR refused)\n"
    else:
        text += (f"retry: psg-gateway studies retry {study.id}\n"
                 f"replace the input: psg-gateway studies replace {study.id} FILE\n")
    atomic_write(path, text.encode("utf-8"))


def _key_names(recording: Path, key: str, names: list[str]) -> dict[str, str]:
    """New names (old -> new) for the files of a claim folder whose recording is ``recording``: the study
    key for the recording's name or stem, so that find_sidecar still pairs the sidecars with it
    (``<file>.json`` -> ``<key><ext>.json``, ``<stem>.json`` -> ``<key>.json``)."""
    new = spool_name(recording.name, key)
    stem = recording.stem
    out: dict[str, str] = {}
    for name in names:
        if name == recording.name:
            out[name] = new
        elif name == recording.name + ".json":
            out[name] = new + ".json"
        elif name == stem + ".json":
            out[name] = Path(new).stem + ".json"
        elif stem and name.lstrip(".").startswith(stem) and name not in ("claim.json", "REASON.txt"):
            out[name] = name.replace(stem, key, 1)  # a leftover temporary named after it (.<name>.copying)
    return out


def _make_private(path: Path) -> None:
    """Private mode (and group) for a moved input; a file another user owns keeps its mode (the daemon's
    start counts it among those it could not tighten)."""
    try:
        make_private(path, is_dir=path.is_dir())
    except OSError:
        pass


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _now() -> datetime:
    return datetime.now(UTC)
