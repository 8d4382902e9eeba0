"""The batch on a Ray cluster (``psg-gateway batch --ray auto|ADDRESS``; extra ``psg-gateway[ray]``).

* hashing and decode/preprocess are Ray CPU tasks (one CPU each), spread over the cluster;
* inference runs in actors, one per GPU (``num_gpus=1``), or one CPU actor when the cluster has no GPU;
* a prepared night's signals stay in Ray's object store and go from the task's node to the actor's
  node directly; only the small metadata (labels, identifiers, mapping) comes back to this process,
  which commits every state to the database (use the site's PostgreSQL for a cluster run) and writes
  the outputs, exactly as the local backend does. Resume and dedupe are therefore the same.

Every node needs psg-gateway installed, and the archive, the model bundle and (for the outputs) the
var folder at the same paths (shared storage): tasks open the archive files by path.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import Future
from typing import Any

from ..config import ModelConfig
from ..montage.table import MontageTable
from .backends import InferOutcome
from .work import FileHash, Prepared, PrepareJob, WorkFailure, hash_file, prepare

__all__ = ["RayBackend"]


def _prepare_task(job: PrepareJob, table: MontageTable) -> tuple[Prepared | WorkFailure, dict[str, Any]]:
    """A Ray task: the prepared study's metadata, and its signals as a second object."""
    from inference.preprocess import set_default_workers

    set_default_workers(1)  # one CPU per task: Ray schedules the parallelism
    outcome = prepare(job, table)
    if isinstance(outcome, WorkFailure):
        return outcome, {}
    signals = outcome.ready.engine_input.signals
    outcome.ready.engine_input.signals = {}
    return outcome, signals


class _InferActor:
    """Holds one engine (one GPU, or the CPUs Ray gives it) for the whole run."""

    def __init__(self, model: ModelConfig, device: str) -> None:
        from inference.engine import Engine, EngineOptions

        from ..cpu import engine_threads
        from ..model import load_model

        # The same bundle and site heads as the driver (the paths are the same on every node).
        threads = engine_threads(model.threads)  # the cores of this node, as a local batch would
        self.engine = Engine(load_model(model), EngineOptions(device=device, precision=model.precision,
                                                              threads=threads.threads,
                                                              windows_per_batch=model.windows_per_batch))

    def infer(self, metas: list[Prepared], *signals: dict[str, Any]) -> list[InferOutcome]:
        from .backends import infer_many

        for meta, sig in zip(metas, signals):
            meta.ready.engine_input.signals = sig
        return infer_many(self.engine, [m.ready for m in metas])


class RayBackend:
    name = "ray"

    def __init__(self, address: str, table: MontageTable, model: ModelConfig, workers: int | None = None) -> None:
        import ray

        self.ray = ray
        self._started_here = False
        if not ray.is_initialized():
            if address == "auto" and not os.environ.get("RAY_ADDRESS"):
                try:
                    ray.init(address="auto", log_to_driver=False)
                except ConnectionError:  # no cluster running: a local instance for this run
                    ray.init(log_to_driver=False, include_dashboard=False)
                    self._started_here = True
            else:
                ray.init(address=None if address == "auto" else address, log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        self.table_ref = ray.put(table)
        actor_cls = ray.remote(num_gpus=1, num_cpus=1)(_InferActor) if gpus else \
            ray.remote(num_cpus=1)(_InferActor)
        device = model.device if gpus else "cpu"
        self.actors = [actor_cls.remote(model, device) for _ in range(max(1, gpus))]
        self._next_actor = itertools.cycle(self.actors)
        self.workers = workers or max(1, cpus - len(self.actors))
        self.infer_slots = 2 * len(self.actors)  # one running, one waiting per actor: the GPU never idles
        self._hash = ray.remote(num_cpus=1)(hash_file)
        self._prepare = ray.remote(num_cpus=1, num_returns=2)(_prepare_task)
        self._signals: dict[int, Any] = {}  # study id -> ObjectRef of its signals

    def hash(self, path: str) -> Future[FileHash]:
        return self._hash.remote(path).future()

    def prepare(self, job: PrepareJob) -> Future[Prepared | WorkFailure]:
        meta_ref, signals_ref = self._prepare.remote(job, self.table_ref)
        self._signals[job.study_id] = signals_ref
        return meta_ref.future()

    def infer(self, items: list[Prepared]) -> Future[list[InferOutcome]]:
        refs = [self._signals[p.job.study_id] for p in items]
        return next(self._next_actor).infer.remote(items, *refs).future()

    def release(self, item: Prepared | WorkFailure) -> None:
        self._signals.pop(item.job.study_id, None)  # the object store frees it once unreferenced

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self._signals.clear()
        if self._started_here:
            self.ray.shutdown()
