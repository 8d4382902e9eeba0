"""The one way into the store for every source: what arrived is registered here, and nowhere else.

A drop folder hands over whole recordings it claimed into the spool (:meth:`StudyIntake.file_claimed`),
the DICOM receiver single instances (:meth:`StudyIntake.instance_received`); the database decides
duplicates and study versions, and a DICOM study becomes READY when no instance arrived for the stable
age (:meth:`StudyIntake.promote_stable`). Each arrival wakes the workers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..crashpoints import crashpoint
from ..logging import get_logger
from ..metrics import Metrics
from ..store.models import State
from ..store.repo import Repo
from .inputs import InputFiles

if TYPE_CHECKING:  # the sources depend on this protocol's side, not the other way round
    from ..sources.dicom.receiver import ReceivedInstance
    from ..sources.dropfolder import ClaimedFile

__all__ = ["StudyIntake"]

log = get_logger("psg.intake")


class StudyIntake:
    """Registers what the sources hand over (implements :class:`gateway.sources.base.Intake`)."""

    def __init__(self, repo: Repo, inputs: InputFiles, metrics: Metrics, *,
                 on_arrival: Callable[[], None] = lambda: None, actor: str = "scheduler") -> None:
        self.repo = repo
        self.inputs = inputs
        self.metrics = metrics
        self.on_arrival = on_arrival
        self.actor = actor

    # ---- files ---------------------------------------------------------------------------------
    def known_input(self, path: Path) -> bool:
        return self.repo.known_input(str(path))

    def file_claimed(self, claim: ClaimedFile) -> bool:
        crashpoint("receive.file")
        try:
            reg = self.repo.register_file(source=claim.source, path=str(claim.spool_path),
                                          name=claim.original_path.name, sha256=claim.sha256,
                                          filename_pattern=claim.filename_pattern, actor=claim.source)
        except Exception as exc:  # noqa: BLE001 - the claim stays in the spool; recovered on a later poll
            log.error("study.register_failed", claim_id=claim.claim_id, error=type(exc).__name__)
            return False
        if reg.duplicate:
            log.info("study.duplicate", study_key=reg.study.key, source=claim.source)
            self.metrics.study_transitions.labels(str(State.DUPLICATE)).inc()
            self.inputs.finalize(reg.study, State.DUPLICATE)
        else:
            log.info("study.received", study_key=reg.study.key, source=claim.source, size=claim.size)
            self.metrics.study_transitions.labels(str(State.READY)).inc()
            self.on_arrival()
        return True

    # ---- DICOM instances -----------------------------------------------------------------------
    def known_instance(self, sop_instance_uid: str) -> bool:
        return self.repo.known_instance(sop_instance_uid)

    def instance_received(self, instance: ReceivedInstance) -> None:
        crashpoint("receive.dicom")
        study, stored = self.repo.register_instance(
            study_uid=instance.study_uid, sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid, path=str(instance.path), folder=str(instance.path.parent),
            size=instance.size, calling_ae=instance.calling_ae)
        if not stored and Path(study.input_path or "") != instance.path.parent:
            # A concurrent duplicate: the first copy is recorded elsewhere, this one is surplus.
            instance.path.unlink(missing_ok=True)
        crashpoint("dicom.stored")

    def promote_stable(self, stable_age_seconds: float) -> int:
        promoted = self.repo.promote_stable(stable_age_seconds, actor=self.actor)
        for study in promoted:
            log.info("study.ready", study_key=study.key, source=study.source)
        if promoted:
            self.on_arrival()
        return len(promoted)
