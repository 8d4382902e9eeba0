"""``psg-gateway reference seed ARCHIVE``: fill the site reference from an archive before go-live.

Percentile flags compare a study with the site's own earlier studies of the same model, and stay
inactive until ``flags.percentile_min_reference`` of them exist. Seeding runs the archive batch with
messages off: every readable study goes through the daemon's own pipeline (the same outputs, the same
quality gate), ends FLAGGED with nothing built or sent, and its watched log-hazards join the reference.
A later ``psg-gateway batch`` over the same archive skips what seeding already did, and the other way
round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import GatewayConfig
from .runner import BatchOptions, BatchOutcome, BatchRunner

__all__ = ["SeedOutcome", "seed_reference"]


@dataclass
class SeedOutcome:
    batch: BatchOutcome
    model_hash: str
    sizes: dict[str, int]  # watched outcome label -> studies in the reference for this model
    needed: int  # flags.percentile_min_reference

    @property
    def active(self) -> bool:
        return bool(self.sizes) and min(self.sizes.values()) >= self.needed


def seed_reference(cfg: GatewayConfig, archives: list[Path], *, limit: int | None = None,
                   workers: int | None = None, progress: bool = False) -> SeedOutcome:
    """Run ``archives`` through the pipeline with messages off; return the reference it leaves.

    Raises :class:`~gateway.batch.runner.BatchError` for a problem before any work (as the batch does).
    """
    quiet = cfg.model_copy(update={"hl7": cfg.hl7.model_copy(update={"enabled": False})})
    runner = BatchRunner(quiet, BatchOptions(archives=list(archives), limit=limit, workers=workers, send=False,
                                             progress=progress))
    try:
        runner.preflight()
        outcome = runner.run(runner.discover())
        model_hash = runner.bundle.identity.model_hash or ""
        sizes = runner.repo.reference_sizes(model_hash)
    finally:
        runner.close()
    return SeedOutcome(outcome, model_hash, sizes, cfg.flags.percentile_min_reference)
