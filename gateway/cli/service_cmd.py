"""``psg-gateway run``, ``config check|show`` and ``db upgrade|current``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..fsutil import set_private_mode
from .store_access import StoreConfigOption

if TYPE_CHECKING:  # pydantic and the config schema load when a command reads a configuration
    from ..config import GatewayConfig

err = Console(stderr=True)
out = Console()

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", envvar="PSG_CONFIG",
    help="Configuration file (YAML or TOML); default: built-in embedded defaults under ./var")]

config_app = typer.Typer(help="Check or show the daemon's configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema: upgrade to the current version, or show it.", no_args_is_help=True)


def load_or_exit(path: Path | None) -> GatewayConfig:
    """The configuration, or exit 2 with every problem. With ``service.group`` set, files this command
    creates from now on are 0640/0750 of that group (the app's callback made them 0600/0700)."""
    from ..config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]configuration error[/] in {escape(exc.source)}:", soft_wrap=True)
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)  # one line per problem
        raise typer.Exit(2) from None
    if cfg.service.group is not None:
        try:
            set_private_mode(cfg.service.group)
        except ValueError as exc:
            # An admin outside the group may still read (studies list, config show): this command's files
            # stay 0600, which is stricter; the daemon itself refuses to start instead.
            err.print(f"[yellow]warning:[/] {escape(str(exc))}; files this command writes are 0600",
                      soft_wrap=True, highlight=False)
    return cfg


def run(config: ConfigOption = None) -> None:
    """Run the gateway daemon: drop folders, DICOM receiver, study pipeline, ops endpoint."""
    cfg = load_or_exit(config)  # before importing the daemon (torch): a typo is reported at once
    from ..daemon import Daemon, DaemonLockedError, StartupError

    try:
        code = Daemon(cfg).run()
    except (DaemonLockedError, StartupError) as exc:
        # One line whatever the cause (a driver's or torch's message spans lines; rich would wrap at the
        # terminal's width), so the journal and a wrapper script see the whole reason on the error line.
        reason = " ".join(str(exc).split())
        err.print(f"[bold red]error:[/] {escape(reason)}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="Configuration file to check")],
    connect: Annotated[bool, typer.Option(help="Also connect to the database")] = False,
) -> None:
    """Validate FILE; print every problem with its key path. Exit 0 when usable, 1 when not."""
    from ..config_check import check_config

    cfg, problems = check_config(file, connect=connect)
    if problems:
        err.print(f"[bold red]{len(problems)} problem(s)[/] in {escape(str(file))}:", soft_wrap=True)
        for problem in problems:
            err.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)  # one line per problem
        raise typer.Exit(1)
    assert cfg is not None
    out.print(f"{file}: ok (database {cfg.database_url.split(':', 1)[0]}, "
              f"{len(cfg.drop_folders)} drop folder(s), DICOM {'on port ' + str(cfg.dicom.port) if cfg.dicom.enabled else 'off'})")


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file + environment + defaults) as JSON; the database URL's
    password is masked."""
    cfg = load_or_exit(config)
    doc = json.loads(cfg.model_dump_json())
    if cfg.database.url:
        from sqlalchemy.engine import make_url

        doc["database"]["url"] = make_url(cfg.database.url).render_as_string(hide_password=True)
    out.print_json(data=doc)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the database schema to this version (idempotent)."""
    from ..store.db import current_revision, make_engine, upgrade

    cfg = load_or_exit(config)
    engine = make_engine(cfg.database_url)
    before = current_revision(engine)
    upgrade(engine)
    out.print(f"database schema: {before or 'empty'} -> {current_revision(engine)}")


@db_app.command("current")
def db_current(config: StoreConfigOption = None) -> None:
    """Show the schema revision of the database and the one this version expects."""
    from ..store.db import current_revision, head_revision, make_engine, sqlite_path
    from .store_access import require_config

    cfg = require_config(config)
    file = sqlite_path(cfg.database_url)
    # looking must not create the database: sqlite3 creates a missing file on connect
    missing = file is not None and not file.is_file()
    now = None if missing else current_revision(make_engine(cfg.database_url))
    head = head_revision()
    state = "empty (no file yet)" if missing else now or "empty"
    out.print(f"database: {state}; this version: {head}" + ("" if now == head else "  (run: psg-gateway db upgrade)"),
              soft_wrap=True)
    raise typer.Exit(0 if now == head else 1)
