"""``bench/bench_gpu.py`` on CPU: the GPU box's throughput benchmark must run (and mean something) on
any machine, so that it is ready when a GPU is. Its runs go through the product's batch runner over a
tiny synthetic archive (e2e); its precision choice and its limiting-stage rule are checked in process."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench_gpu.py"
STAGES = ("hash", "decode", "preprocess", "spill", "check", "encode", "heads", "store", "report", "record")


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bench(tmp_path: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--hours", "0.1", "--keep", str(tmp_path),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.e2e
def test_cpu_smoke_run_reports_rate_stages_and_no_gpu_numbers(tmp_path):
    # One worker process, as on the GPU box: decode/preprocess beside the engine, signals spilled to it.
    doc = _run_bench(tmp_path, "--nights", "2", "--precision", "fp32", "--workers", "1")

    assert doc["precisions_run"] == ["fp32"]
    assert doc["machine"]["cores"] >= 1 and isinstance(doc["machine"]["torch"], str)
    assert set(doc["machine"]["cpu_flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx"}
    assert doc["machine"]["cuda_device"] is None
    run = doc["runs"]["fp32"]
    assert (run["nights"], run["failed"], run["status"], run["device"], run["workers"]) == (2, 0, "finished", "cpu", 1)
    assert run["nights_per_hour"] > 0
    assert run["nights_per_hour"] == pytest.approx(2 * 3600 / run["wall_s"], rel=0.01)
    stages = run["stage_seconds_per_night"]
    assert set(stages) == set(STAGES) == set(doc["stage_meaning"])
    assert all(v >= 0 for v in stages.values())
    for stage in ("decode", "preprocess", "encode", "heads", "store", "report"):  # each did real work
        assert stages[stage] > 0, stage
    assert all(0 <= v <= 1.05 for v in run["share_of_wall"].values()), run["share_of_wall"]
    engine = run["engine_thread"]
    assert engine["busy_s"] == pytest.approx((stages["check"] + stages["encode"] + stages["heads"]) * 2, abs=0.01)
    assert engine["startup_s"] > 0  # the worker process starts before the first night comes back
    assert engine["busy_s"] + engine["startup_s"] + engine["waiting_on_workers_s"] <= run["wall_s"] * 1.02
    assert run["peak_rss_mb"]["largest_worker"] > 0
    assert run["steady_nights_per_hour"] > 0
    assert run["limiting_stage"] in STAGES and doc["limiting_stage"] == run["limiting_stage"]
    assert run["gpu_memory"] is None and run["gpu_utilisation"] is None
    assert not doc.get("deviations")


@pytest.mark.slow  # ~38 s on 2 cores: emulated bf16 and two engine processes
@pytest.mark.e2e
def test_forced_bf16_deviates_from_fp32_by_little_and_fp16_is_skipped_on_cpu(tmp_path):
    doc = _run_bench(tmp_path, "--nights", "1", "--precision", "fp32,bf16,fp16", "--no-report")

    assert doc["precisions_run"] == ["fp32", "bf16"]
    assert any(n.startswith("fp16 skipped") for n in doc["notes"])
    assert doc["runs"]["bf16"]["nights"] == 1 and doc["runs"]["bf16"]["stage_seconds_per_night"]["report"] == 0
    dev = doc["deviations"]["bf16"]
    assert dev["nights_compared"] == 1
    numbers = {k: v for k, v in dev.items() if k != "nights_compared"}
    assert all(isinstance(v, float | int) and math.isfinite(v) for v in numbers.values()), numbers
    # bf16 really ran: its embeddings differ from fp32's (measured on a 2-core AVX2 EPYC, bf16 emulated:
    # log-hazard 0.0018, stage probability 0.0004, night embedding 0.6 % and token embeddings 1 % of their
    # largest value, every epoch staged alike); the bounds leave room for other CPUs' kernels.
    assert dev["night_embedding_max_abs"] > 0
    assert dev["log_hazard_max_abs"] < 0.05
    assert dev["staging_prob_max_abs"] < 0.05
    assert dev["night_embedding_max_rel"] < 0.05
    assert dev["token_embedding_max_rel"] < 0.1
    assert dev["hypnogram_agreement_min"] >= 0.75  # 12 epochs: a near-tie may flip, not a quarter of them


@pytest.mark.unit
def test_precisions_follow_the_device_and_the_cpus_bf16(monkeypatch):
    import inference.engine

    bench = _bench()
    monkeypatch.setattr(inference.engine, "cpu_has_native_bf16", lambda: False)
    chosen, notes = bench.choose_precisions(None, "cpu")
    assert chosen == ["fp32"] and any(n.startswith("bf16 skipped") for n in notes)
    assert bench.choose_precisions("bf16,fp32", "cpu")[0] == ["fp32", "bf16"]  # named: run, emulated
    monkeypatch.setattr(inference.engine, "cpu_has_native_bf16", lambda: True)
    assert bench.choose_precisions(None, "cpu") == (["fp32", "bf16"], [])
    assert bench.choose_precisions(None, "cuda") == (["fp32", "bf16", "fp16"], [])
    with pytest.raises(SystemExit):
        bench.choose_precisions("fp8", "cuda")


@pytest.mark.unit
def test_limiting_stage_is_the_workers_largest_when_the_engine_waited_on_them():
    bench = _bench()
    shares = {"decode": 0.3, "preprocess": 0.2, "encode": 0.35, "heads": 0.05}
    waiting = {"busy_share": 0.4, "waiting_share": 0.55}
    assert bench.limiting_stage(shares, waiting, workers=14)[0] == "decode"
    assert bench.limiting_stage(shares, {"busy_share": 0.9, "waiting_share": 0.05}, workers=14)[0] == "encode"
    assert bench.limiting_stage(shares, waiting, workers=0)[0] == "encode"  # inline: nothing to wait on
    assert bench.limiting_stage({}, waiting, workers=0)[0] is None
