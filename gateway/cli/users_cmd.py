"""``psg-gateway users add|list|disable|enable|passwd`` and ``psg-gateway audit export``.

A password never appears on the command line (it would be in the shell history and in ``ps``): it is
read from standard input (``--password-stdin``), without echo when that is a terminal. Every change is
written to the access audit with the actor ``cli:<OS user>``.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..fsutil import atomic_write
from .store_access import StoreConfigOption, open_store
from .studies_cmd import JsonOption

if TYPE_CHECKING:  # the store (sqlalchemy) and argon2 load when a command opens the store, not with the CLI
    from ..access.audit import AuditRow
    from ..access.users import User

__all__ = ["audit_app", "users_app"]

users_app = typer.Typer(help="Web console users: add, list, disable, enable, set a password.",
                        no_args_is_help=True)
audit_app = typer.Typer(help="The access audit: who viewed or did what, when (export for the privacy office).",
                        no_args_is_help=True)
out = Console()
err = Console(stderr=True)

PasswordStdin = Annotated[bool, typer.Option(
    "--password-stdin", help="Read the password from standard input (one line; never on the command line)")]
CSV_COLUMNS = ("id", "at", "user", "action", "study_id", "study_key", "target", "detail", "remote_addr")


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_actor() -> str:
    """``cli:<OS user>``: who made a change from the command line, as the audit names them."""
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (a container)
        who = f"uid{os.getuid()}"
    return f"cli:{who}"[:64]


def _read_password(password_stdin: bool) -> str:
    if not password_stdin:
        _fail("give --password-stdin and the password on standard input (never on the command line)", 2)
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first and getpass.getpass("again: ") != first:
            _fail("the passwords differ", 2)
        password = first
    else:
        line = sys.stdin.readline() if sys.stdin is not None else ""
        password = line.rstrip("\r\n")
    if not password:
        _fail("no password on standard input (--password-stdin reads one line)", 2)
    return password


def _user_doc(u: User) -> dict[str, object]:
    return {"name": u.name, "role": u.role, "disabled": u.disabled,
            "locked_until": u.locked_until.isoformat() if u.locked_until else None,
            "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None,
            "created_at": u.created_at.isoformat()}


def _change(config: Path | None, action: str, name: str, change, detail: dict | None = None) -> User:
    """Open the store, make the change, audit it; a UserError is a one-line error (exit 1)."""
    from ..access.audit import AccessAudit
    from ..access.users import UserError, UserStore

    _, repo = open_store(config)
    try:
        user = change(UserStore(repo))
    except UserError as exc:
        _fail(str(exc))
    AccessAudit(repo).record(cli_actor(), action, target=name, detail=detail)
    return user


@users_app.command("add")
def users_add(name: Annotated[str, typer.Argument(help="Login name: letters, digits and . _ - @ (1-64)")],
              role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "viewer",
              password_stdin: PasswordStdin = False,
              config: StoreConfigOption = None) -> None:
    """Add a user with a role; the password (at least 10 characters) comes from standard input."""
    from ..access.users import ROLES

    if role not in ROLES:
        _fail(f"unknown role {role!r}: one of {', '.join(ROLES)}", 2)
    password = _read_password(password_stdin)
    user = _change(config, "user.add", name, lambda s: s.add(name, role, password), {"role": role})
    out.print(f"added user {user.name} ({user.role})", highlight=False, markup=False)


@users_app.command("list")
def users_list(config: StoreConfigOption = None, as_json: JsonOption = False) -> None:
    """Every user with role, state and last login (never a password hash)."""
    from ..access.users import UserStore

    _, repo = open_store(config)
    users = UserStore(repo).list()
    if as_json:
        print(json.dumps([_user_doc(u) for u in users], indent=2))
        return
    table = Table("name", "role", "state", "last login (UTC)", "created")
    now = datetime.now(UTC)
    for u in users:
        state = "disabled" if u.disabled else (
            f"locked until {u.locked_until:%Y-%m-%d %H:%M} UTC" if u.locked_until and u.locked_until > now
            else "active")
        last = f"{u.last_login_at:%Y-%m-%d %H:%M}" if u.last_login_at else "never"
        table.add_row(escape(u.name), u.role, state, last, f"{u.created_at:%Y-%m-%d}")
    out.print(table)


@users_app.command("disable")
def users_disable(name: str, config: StoreConfigOption = None) -> None:
    """Refuse the user's logins from now on (the user and their audit entries stay)."""
    _change(config, "user.disable", name, lambda s: s.disable(name))
    out.print(f"disabled user {name}", highlight=False, markup=False)


@users_app.command("enable")
def users_enable(name: str, config: StoreConfigOption = None) -> None:
    """Allow a disabled user's logins again."""
    _change(config, "user.enable", name, lambda s: s.enable(name))
    out.print(f"enabled user {name}", highlight=False, markup=False)


@users_app.command("passwd")
def users_passwd(name: str, password_stdin: PasswordStdin = False, config: StoreConfigOption = None) -> None:
    """Set a user's password from standard input; also lifts a login lockout."""
    password = _read_password(password_stdin)
    _change(config, "user.passwd", name, lambda s: s.set_password(name, password))
    out.print(f"password of {name} set", highlight=False, markup=False)


# ---- audit export --------------------------------------------------------------------------------------
def parse_when(value: str, *, end: bool = False) -> datetime:
    """``YYYY-MM-DD[THH:MM[:SS]][±HH:MM]`` as an aware datetime; no offset means UTC. With ``end``, a bare
    date means the end of that day (``--until 2026-01-31`` includes the 31st)."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a date or time: {value!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if end and len(value) == 10:
        when += timedelta(days=1)
    return when


def _csv(rows: list[AuditRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r.id, r.at.isoformat(), r.user_name, r.action,
                         "" if r.study_id is None else r.study_id, r.study_key or "", r.target or "",
                         json.dumps(r.detail, sort_keys=True) if r.detail is not None else "",
                         r.remote_addr or ""])
    return buf.getvalue()


def _jsonl(rows: list[AuditRow]) -> str:
    return "".join(json.dumps(r.as_dict(), sort_keys=True) + "\n" for r in rows)


@audit_app.command("export")
def audit_export(
    since: Annotated[str, typer.Option(help="From this date or time, UTC unless an offset is given "
                                            "(YYYY-MM-DD or YYYY-MM-DDTHH:MM)")],
    until: Annotated[str | None, typer.Option(help="Before this time (a bare date: to the end of that day)")] = None,
    user: Annotated[str | None, typer.Option(help="Only this user's entries")] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl")] = "csv",
    out_file: Annotated[Path | None, typer.Option("--out", help="Write to this file (mode 0600) "
                                                                "instead of standard output")] = None,
    config: StoreConfigOption = None,
) -> None:
    """Export the access audit (views of PHI pages and every action) for the privacy office: study keys
    and ids, never patient names or identifiers."""
    from ..access.audit import AccessAudit

    if fmt not in ("csv", "jsonl"):
        _fail(f"unknown format {fmt!r}: csv or jsonl", 2)
    try:
        start = parse_when(since)
        stop = parse_when(until, end=True) if until else None
    except ValueError as exc:
        _fail(str(exc), 2)
    if stop is not None and stop <= start:
        _fail("--until is not after --since", 2)
    _, repo = open_store(config)
    audit = AccessAudit(repo)
    rows = audit.rows(start, stop, user)
    text = _csv(rows) if fmt == "csv" else _jsonl(rows)
    if out_file is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            atomic_write(out_file, text.encode("utf-8"), mode=0o600)
        except OSError as exc:
            _fail(f"cannot write {out_file}: {exc.strerror or exc}")
        err.print(f"wrote {len(rows)} audit entries to {out_file}", highlight=False, markup=False,
                  soft_wrap=True)
    detail = {"since": start.isoformat(), "until": stop.isoformat() if stop else None, "user": user,
              "format": fmt, "rows": len(rows)}
    audit.record(cli_actor(), "audit.export", target=str(out_file) if out_file else "stdout", detail=detail)
