"""Importing the CLI stays light: the database stack (sqlalchemy, alembic), argon2, torch and matplotlib
load only in the commands that use them, so ``psg-gateway --help``, ``infer``, ``config check`` and
``montage`` start fast. The store commands' own tests (test_studies_cli.py, test_hl7_cli.py,
test_access.py, test_cli_store_access.py) prove the lazily imported names still resolve."""

from __future__ import annotations

import re
import subprocess
import sys

from typer.testing import CliRunner

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
