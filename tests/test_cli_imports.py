"""Importing the CLI stays light: the database stack (sqlalchemy, alembic), argon2, torch and matplotlib
load only in the commands that use them, so ``psg-gateway --help``, ``infer``, ``config check`` and
``montage`` start fast. The store commands' own tests (test_studies_cli.py, test_hl7_cli.py,
test_access.py, test_cli_store_access.py) prove the lazily imported names still resolve."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from gateway.cli import main as cli_main
from gateway.cli.main import app

HEAVY = ("sqlalchemy", "alembic", "argon2", "torch", "matplotlib")

# ``psg-gateway --help`` as it was when the imports were made lazy: the same commands, in this order.
COMMANDS = ["run", "demo", "batch", "infer", "example-night", "version", "bundle", "montage", "config", "db",
            "studies", "outbox", "hl7", "heads", "reference", "scoring", "users", "audit"]


def test_importing_the_cli_loads_no_heavy_module():
    code = f"import sys, gateway.cli.main; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    # rows of the Commands panel: "│ name   help text ... │"
    panel = result.output.split("Commands", 1)[1]
    names = [m.group(1) for m in re.finditer(r"^[│|] ([a-z][a-z0-9-]*) {2,}", panel, re.MULTILINE)]
    assert names == COMMANDS


def _leading_imports(function) -> list[str]:
    """The modules a function imports before its first other statement (relative names resolved)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0].body
    package = function.__module__.rsplit(".", 1)[0].split(".")
    modules = []
    for stmt in body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # the docstring
        if isinstance(stmt, ast.Import):
            modules += [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom):
            base = package[: len(package) - stmt.level + 1] if stmt.level else []
            modules.append(".".join(base + ([stmt.module] if stmt.module else [])))
        else:
            break
    return modules


def test_infer_starts_reading_before_torch_or_scipy_signal_load():
    # infer loads torch and the model on a thread beside the read, and scipy.signal loads beside the
    # preprocessing: what infer imports before it starts that thread must load neither.
    modules = _leading_imports(cli_main.infer)
    assert "gateway.pipeline.steps" in modules, modules
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'scipy.signal') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", (modules, done.stdout)
