"""The ``inference`` package's import structure: result types load without torch, quickly, and the
package's modules import one another without a cycle and never import ``gateway``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "inference"
ROOT = PACKAGE.parent

# Modules a notebook imports for result types and light analysis: none of them may load torch.
TORCH_FREE = ("identity", "results", "hypnogram", "splits", "apnea", "site_heads", "survival",
              "survival_metrics", "preprocess", "gaps", "upsample", "iir", "heap", "quality", "inputs")

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import {module}
elapsed = time.perf_counter() - t0
print(json.dumps({{"elapsed": elapsed, "torch": "torch" in sys.modules,
                  "gateway": any(m == "gateway" or m.startswith("gateway.") for m in sys.modules)}}))
"""


def _probe(module: str) -> dict:
    """Import ``module`` in a fresh interpreter; how long it took and what it pulled in."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(module=module)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_results_import_is_fast_and_leaves_torch_out():
    # Best of three fresh interpreters: the bound is on the import, not on a busy machine's worst moment.
    probes = [_probe("inference.results") for _ in range(3)]
    assert not any(p["torch"] for p in probes), "import inference.results loaded torch"
    assert not any(p["gateway"] for p in probes), "import inference.results loaded gateway"
    best = min(p["elapsed"] for p in probes)
    assert best < 0.3, f"import inference.results took {best:.3f} s (best of 3), expected < 0.3 s"


def test_light_modules_leave_torch_out():
    code = ("import importlib, json, sys\n"
            f"first = None\nfor m in {TORCH_FREE!r}:\n"
            "    importlib.import_module('inference.' + m)\n"
            "    if first is None and 'torch' in sys.modules:\n"
            "        first = m\n"
            "print(json.dumps(first))\n")
    # One interpreter, in order: the first module whose import loads torch is the one reported.
    first = _last_json_line(code)
    assert first is None, f"importing inference.{first} loaded torch"


def _last_json_line(code: str):
    """Run ``code`` in a fresh interpreter; the JSON of its last line of output."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                         text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_preprocessing_loads_scipy_signal_beside_the_work_not_before_it():
    # scipy.signal takes ~0.8 s to import: the preprocessing modules leave it out, and the first channel
    # that the release upsamples (to a top rate above 128 Hz) loads it on a thread of its own, for the
    # channels at the top rate that filter in the time domain.
    code = ("import json, sys\n"
            "import numpy as np\n"
            "from inference import gaps, iir, preprocess, upsample\n"
            "at_import = 'scipy.signal' in sys.modules\n"
            "x = np.random.default_rng(0).standard_normal(256 * 600).astype(np.float32)\n"
            "preprocess.preprocess_channel(x, 256.0, recording_rate=512.0)\n"
            "loader = preprocess._KERNEL_LOADER\n"
            "loader.join(120)\n"
            "print(json.dumps({'at_import': at_import, 'loader': loader.name,\n"
            "                  'kernel': preprocess._KERNEL.get('kernel') is not None}))\n")
    got = _last_json_line(code)
    assert got == {"at_import": False, "loader": "psg-filter-kernel", "kernel": True}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (top level, in functions, under
    ``TYPE_CHECKING``), as absolute dotted names; ``from . import x`` counts as ``inference.x``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = "inference"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            # ``from . import x`` / ``from inference import x``: x may be a submodule.
            if module == package:
                names.update(f"{package}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in sorted(modules):
        targets = set()
        for imported in _imports(PACKAGE / f"{name}.py"):
            head, _, rest = imported.partition(".")
            if head == "inference" and rest:
                sub = rest.split(".")[0]
                if sub in modules and sub != name:
                    targets.add(sub)
        graph[name] = targets
    return graph


def test_inference_never_imports_gateway():
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        bad = sorted(m for m in _imports(path) if m == "gateway" or m.startswith("gateway."))
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"inference/ must not import gateway: {offenders}"


def test_inference_module_graph_is_acyclic():
    graph = _graph()
    assert "results" in graph and "bundle" in graph  # the parse found the package
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle in inference/: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_result_types_come_from_a_leaf_and_bundle_still_exports_them():
    graph = _graph()
    assert graph["identity"] == set()
    assert graph["results"] <= {"identity"}
    from inference import bundle, identity, results

    assert bundle.BundleIdentity is identity.BundleIdentity is results.BundleIdentity
    assert bundle.Outcome is identity.Outcome is results.Outcome
