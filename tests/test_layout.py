"""The package layout's rules (docs/architecture.md), read from the source with ``ast`` so that a new
import that breaks one fails here: no import cycle between gateway modules, readers only read, sources
hand arrivals to the intake and never reach into the pipeline or the store, the store knows only the
pipeline's state table, and ``inference`` never imports ``gateway``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path, name: str) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, *, run_time_only: bool) -> set[str]:
    """Modules ``path`` imports; ``run_time_only``: at import time only (not inside functions, not under
    ``if TYPE_CHECKING``), the imports that can make a cycle."""
    name = _module_name(path)
    package = _package_of(path, name)
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                if not run_time_only:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, package)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not run_time_only:
                    visit(node.body)
            elif isinstance(node, ast.ClassDef | ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []) or []:
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / package).rglob("*.py")}


GATEWAY = _modules("gateway")


def _graph(run_time_only: bool) -> dict[str, set[str]]:
    return {name: {m for m in _imports(path, run_time_only=run_time_only) if m in GATEWAY and m != name}
            for name, path in GATEWAY.items()}


def test_gateway_modules_import_each_other_without_a_cycle() -> None:
    graph = _graph(run_time_only=True)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize(("layer", "forbidden"), [
    # readers only read: no source, pipeline, store, HL7, daemon or CLI behind them
    ("gateway.readers", ("gateway.sources", "gateway.pipeline", "gateway.store", "gateway.hl7",
                         "gateway.batch", "gateway.daemon", "gateway.cli", "gateway.synthetic")),
    # sources hand arrivals to the Intake (sources.base); the store and the pipeline are on the other side
    ("gateway.sources", ("gateway.pipeline", "gateway.store", "gateway.hl7", "gateway.batch",
                         "gateway.daemon", "gateway.cli")),
    ("gateway.montage", ("gateway.pipeline", "gateway.store", "gateway.hl7", "gateway.batch",
                         "gateway.daemon", "gateway.cli")),
    ("gateway.pipeline", ("gateway.daemon", "gateway.cli", "gateway.batch")),
    ("gateway.synthetic", ("gateway.pipeline", "gateway.store", "gateway.daemon", "gateway.cli")),
])
def test_a_layer_does_not_reach_into_the_layers_above_it(layer: str, forbidden: tuple[str, ...]) -> None:
    graph = _graph(run_time_only=False)  # a function-level or TYPE_CHECKING import is a dependency too
    wrong = sorted(f"{module} -> {dep}" for module, deps in graph.items()
                   if module == layer or module.startswith(layer + ".")
                   for dep in deps if dep.startswith(forbidden))
    allowed = {"gateway.pipeline.intake -> gateway.sources.dicom.receiver",  # types only (TYPE_CHECKING)
               "gateway.pipeline.intake -> gateway.sources.dropfolder"}
    assert [w for w in wrong if w not in allowed] == []


def test_the_store_knows_only_the_state_table_of_the_pipeline() -> None:
    graph = _graph(run_time_only=False)
    reached = sorted({dep for module, deps in graph.items() if module.startswith("gateway.store")
                      for dep in deps if dep.startswith("gateway.pipeline")} - {"gateway.pipeline"})
    assert reached == ["gateway.pipeline.states"]


def test_inference_never_imports_gateway() -> None:
    for name, path in _modules("inference").items():
        assert not [m for m in _imports(path, run_time_only=False) if m.split(".")[0] == "gateway"], name
