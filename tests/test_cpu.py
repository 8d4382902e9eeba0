"""The engine's thread count and the OpenMP wait policy (gateway.cpu): physical cores from the CPU
topology, the cgroup quota, the batch's worker processes subtracted, the choice logged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cpu import (
    CpuBudget,
    cgroup_quota,
    cpu_model_and_flags,
    default_wait_policy,
    engine_threads,
    physical_cores,
)

pytestmark = pytest.mark.unit


def _topology(root: Path, cpus: dict[int, tuple[int, int]]) -> Path:
    """A sysfs cpu folder: logical CPU -> (package, core)."""
    for cpu, (package, core) in cpus.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


def test_hyperthreads_and_packages_count_as_what_they_are(tmp_path):
    # two packages of two cores, each core with two hyper-threads: 8 logical, 4 physical
    sysfs = _topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1),
                                 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)})
    assert physical_cores(set(range(8)), sysfs) == 4
    assert physical_cores({0, 4}, sysfs) == 1  # an affinity of two siblings is one core
    assert physical_cores({0, 2}, sysfs) == 2  # core 0 of each package: two cores
    assert physical_cores({0, 1, 2}, tmp_path / "missing") == 3  # no topology: the logical count


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(v2) is None
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(v2) == 1.5
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path / "v1") is None
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_quota(tmp_path / "v1") == 3.0
    assert cgroup_quota(tmp_path / "nothing") is None


def test_cpu_model_and_flags_come_from_the_first_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512f amx_tile\n\n"
                       "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert cpu_model_and_flags(cpuinfo) == ("AMD EPYC 9654", frozenset({"fpu", "avx2", "avx512f", "amx_tile"}))
    assert cpu_model_and_flags(tmp_path / "missing") == (None, frozenset())


def test_engine_threads_leave_the_workers_their_cores():
    eight = CpuBudget(logical=16, physical=8, quota=None)
    assert engine_threads(None, budget=eight).threads == 8
    choice = engine_threads(0, workers=2, budget=eight)
    assert choice.threads == 6 and choice.reason == "8 physical cores of 16 logical, less 2 worker processes"
    assert engine_threads(None, workers=14, budget=eight).threads == 1  # never below one
    shared = engine_threads(None, runs=3, budget=eight)  # the daemon's pipeline workers run studies at once
    assert shared.threads == 2 and shared.reason.endswith("shared by 3 studies at once")
    quota = engine_threads(None, budget=CpuBudget(logical=16, physical=8, quota=2.5))
    assert quota.threads == 2 and "cgroup quota 2.5 CPUs" in quota.reason
    assert engine_threads(None, budget=CpuBudget(logical=4, physical=4, quota=0.5)).threads == 1
    forced = engine_threads(12, workers=3, budget=eight, source="--threads")
    assert (forced.threads, forced.reason) == (12, "--threads 12")  # an explicit count is taken as is
    fields = forced.log_fields()
    assert fields["physical_cores"] == 8 and fields["logical_cpus"] == 16 and "omp_wait_policy" in fields


def test_this_machine_budget_is_sane():
    choice = engine_threads(None)
    assert 1 <= choice.threads <= choice.budget.physical <= choice.budget.logical
    assert choice.budget.logical == len(os.sched_getaffinity(0))


def test_threads_spin_briefly_unless_the_environment_says_otherwise():
    env: dict[str, str] = {}
    assert default_wait_policy(env) == "GOMP_SPINCOUNT=3000" and env == {"GOMP_SPINCOUNT": "3000"}
    assert default_wait_policy({"OMP_WAIT_POLICY": "PASSIVE"}) == "OMP_WAIT_POLICY=PASSIVE"
    kept = {"GOMP_SPINCOUNT": "0"}
    assert default_wait_policy(kept) == "GOMP_SPINCOUNT=0" and kept == {"GOMP_SPINCOUNT": "0"}


@pytest.mark.parametrize("given, want", [
    ({}, "GOMP_SPINCOUNT=3000"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY=ACTIVE"),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10"}, "OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10"),
])
def test_the_command_line_sets_the_policy_before_torch_loads(given, want):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    code = ("import sys; import gateway.cli.main; assert 'torch' not in sys.modules; "
            "from gateway.cpu import wait_policy_label; print(wait_policy_label())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want
