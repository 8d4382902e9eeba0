"""How many CPU threads the engine runs, chosen so that it does not oversubscribe the machine.

Torch's default is one thread per logical CPU it sees, whatever else runs: hyper-threads, a container's
CPU quota and our own decode/preprocess worker processes all count as free cores. And OpenMP threads
spin while they wait for each other: on a 2-core AVX2 machine beside one CPU-bound process, two spinning
engine threads took 3.0 s for a 1-hour night against 1.96 s for two sleeping ones, and under heavier
load spinning was 3-7x slower; idle, spinning gains ~10 % (``bench/bench_threads.py``). So:

* the engine gets the **physical cores** it may run on (affinity, then the cgroup CPU quota), less
  one per worker process of the batch; ``model.threads`` or ``--threads`` overrides that;
* OpenMP threads **spin briefly, then sleep** when they wait (``GOMP_SPINCOUNT=3000`` with the wait
  policy left to the runtime), set by the command line before torch loads unless the environment sets
  ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (see :mod:`gateway.cli`). Sleeping at once (``PASSIVE``,
  the default until 2026-12-07) costs a wake-up at every hand-over. On a 2-core AVX-512 machine, 1-hour
  night, three runs: idle, 3,000 spins (about 0.1 ms) took 0.71-0.80 s against 0.83-0.93 s sleeping at
  once (spinning 0.68-0.82 s); beside one CPU-bound process 1.47-1.56 s against 1.38-1.46 s (spinning
  1.97-2.05 s, the runtime's default of 300,000 spins 2.47-5.66 s). torch's wheels use GNU OpenMP,
  which reads ``GOMP_SPINCOUNT``; other OpenMP runtimes ignore it. A dedicated machine can set
  ``OMP_WAIT_POLICY=ACTIVE`` in the service's environment;
* the choice and its reasons are logged once, when the engine is made (``engine.threads``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSFS_CPU = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")
CPUINFO = Path("/proc/cpuinfo")
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPIN_COUNT_ENV = "GOMP_SPINCOUNT"
DEFAULT_SPIN_COUNT = "3000"


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use: logical CPUs (affinity), distinct physical cores among them, and
    the cgroup CPU quota in CPUs (``None``: no quota)."""

    logical: int
    physical: int
    quota: float | None

    @property
    def cores(self) -> int:
        """Physical cores, capped by the quota (at least 1)."""
        if self.quota is None:
            return max(1, self.physical)
        return max(1, min(self.physical, math.floor(self.quota)))


@dataclass(frozen=True)
class ThreadChoice:
    """The engine's torch threads, why, and the CPUs it was chosen from."""

    threads: int
    reason: str
    budget: CpuBudget

    def log_fields(self) -> dict[str, Any]:
        """The ``engine.threads`` log line's fields."""
        return {"threads": self.threads, "reason": self.reason, "logical_cpus": self.budget.logical,
                "physical_cores": self.budget.physical, "cpu_quota": self.budget.quota,
                "omp_wait_policy": wait_policy_label()}


def _affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sysfs: Path = SYSFS_CPU) -> int:
    """Distinct (package, core) pairs among ``cpus``; ``len(cpus)`` where the topology is not readable."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """The CPU quota in CPUs (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``); ``None`` without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def cpu_model_and_flags(cpuinfo: Path = CPUINFO) -> tuple[str | None, frozenset[str]]:
    """The CPU's model name and feature flags (``avx2``, ``avx512f``, ``amx_tile`` ...) as the first CPU of
    ``/proc/cpuinfo`` lists them; ``(None, frozenset())`` where that file is not readable. What a benchmark
    names its machine by: the CPUs under a deployment differ, and these flags decide the engine's speed."""
    model: str | None = None
    flags: frozenset[str] = frozenset()
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_budget(sysfs: Path = SYSFS_CPU, cgroup: Path = CGROUP) -> CpuBudget:
    """This process's CPUs now."""
    cpus = _affinity()
    return CpuBudget(logical=len(cpus), physical=physical_cores(cpus, sysfs), quota=cgroup_quota(cgroup))


def engine_threads(configured: int | None, *, workers: int = 0, runs: int = 1, budget: CpuBudget | None = None,
                   source: str = "model.threads") -> ThreadChoice:
    """Torch threads for the engine: ``configured`` when it is set (> 0), else the physical cores less
    the ``workers`` processes that decode and preprocess beside it, shared by the ``runs`` studies the
    engine may run at once (the daemon's ``pipeline.workers``), at least 1."""
    budget = budget or cpu_budget()
    if configured:
        return ThreadChoice(int(configured), f"{source} {configured}", budget)
    threads = max(1, (budget.cores - workers) // max(1, runs))
    parts = [f"{budget.physical} physical core{'s' if budget.physical != 1 else ''} of {budget.logical} logical"]
    if budget.quota is not None and budget.cores < budget.physical:
        parts.append(f"cgroup quota {budget.quota:g} CPUs")
    if workers:
        parts.append(f"less {workers} worker process{'es' if workers != 1 else ''}")
    if runs > 1:
        parts.append(f"shared by {runs} studies at once")
    return ThreadChoice(threads, ", ".join(parts), budget)


def default_wait_policy(environ: dict[str, str] | None = None) -> str:
    """Set ``GOMP_SPINCOUNT`` to 3000 unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set; returns
    :func:`wait_policy_label`. Must run before torch (and its OpenMP runtime) loads, which reads them once."""
    env = os.environ if environ is None else environ
    if WAIT_POLICY_ENV not in env and SPIN_COUNT_ENV not in env:
        env[SPIN_COUNT_ENV] = DEFAULT_SPIN_COUNT
    return wait_policy_label(env)


def wait_policy_label(environ: dict[str, str] | None = None) -> str:
    """How OpenMP threads wait, as the environment sets it: ``OMP_WAIT_POLICY=...`` and/or
    ``GOMP_SPINCOUNT=...``, or ``unset (OpenMP default)``."""
    env = os.environ if environ is None else environ
    parts = [f"{name}={env[name]}" for name in (WAIT_POLICY_ENV, SPIN_COUNT_ENV) if name in env]
    return " ".join(parts) or "unset (OpenMP default)"
