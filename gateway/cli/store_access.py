"""Open the store for a CLI command that reads or changes it (``studies``, ``outbox``, ``hl7 preview``).

Such a command never creates or migrates a database: only ``psg-gateway run`` and ``psg-gateway db
upgrade`` do. Without this, ``studies list`` with no ``--config`` used the built-in defaults, created
``./var/psg-gateway.db`` wherever it was started and printed an empty table: an operator in the wrong
folder saw "no studies" instead of an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# sqlalchemy, alembic and the store load only when a command opens the database: ``--help``, ``infer``,
# ``config check`` and ``montage`` never pay for them (tests/test_cli_imports.py).
if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ..config import GatewayConfig
    from ..store.repo import Repo

__all__ = ["CONFIG_ENV", "StoreConfigOption", "open_store", "require_config", "shown_url"]

CONFIG_ENV = "PSG_CONFIG"

StoreConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", envvar=CONFIG_ENV,
    help=f"Configuration file (YAML or TOML); required, or {CONFIG_ENV}: the configured database is opened, "
         "never created")]

err = Console(stderr=True)


def _refuse(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # one line, any width
    raise typer.Exit(code)


def require_config(config: Path | None) -> GatewayConfig:
    """The configuration named by ``--config`` or ``PSG_CONFIG``; exit 2 when neither is given (the
    built-in defaults would point at a database under whatever folder the command runs in)."""
    from .service_cmd import load_or_exit  # here: service_cmd's ``db current`` imports this module

    if config is None and not os.environ.get(CONFIG_ENV):
        _refuse(f"no configuration: give --config FILE or set {CONFIG_ENV} "
                "(store commands never use the built-in defaults)", 2)
    return load_or_exit(config)


def shown_url(url: str) -> str:
    """The database URL as it may be printed: the password masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from ..store.db import normalise_url

    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable database URL)"


def _check_schema(engine: Engine, shown: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from ..store.db import current_revision, head_revision

    try:
        now = current_revision(engine)
    except SQLAlchemyError as exc:
        # the driver's first line says what failed (refused, authentication, unknown database)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0:1] or [type(exc).__name__]
        _refuse(f"cannot open database {shown}: {reason[0]}", 1)
    head = head_revision()
    if now is None:
        _refuse(f"database {shown} has no schema yet: create it with `psg-gateway db upgrade` "
                "(or start the daemon)", 1)
    if now != head:
        _refuse(f"database {shown} is at schema {now}, this version expects {head}: "
                "run `psg-gateway db upgrade`", 1)


def open_store(config: Path | None) -> tuple[GatewayConfig, Repo]:
    """The configuration and a repository on its database, for a command that needs the store.

    Refuses (exit 2) without ``--config``/``PSG_CONFIG`` and (exit 1) when the database does not exist,
    has no schema or is at another schema revision; never creates or migrates it. Prints the database it
    opened on stderr, so that ``--json`` output on stdout stays machine-readable.
    """
    from sqlalchemy.exc import ArgumentError

    from ..store.db import make_engine, sqlite_path
    from ..store.repo import Repo

    cfg = require_config(config)
    url = cfg.database_url
    shown = shown_url(url)
    # make_engine creates the SQLite file's folder and sqlite3 creates the file on connect: look first.
    file = sqlite_path(url)
    if file is not None and not file.is_file():
        _refuse(f"database {shown} does not exist: create it with `psg-gateway db upgrade` "
                "(or start the daemon)", 1)
    try:
        engine = make_engine(url)
    except ArgumentError:
        _refuse("the configured database URL cannot be parsed", 1)
    _check_schema(engine, shown)
    err.print(f"database: {shown}", style="dim", highlight=False, markup=False, soft_wrap=True)
    return cfg, Repo(engine)
