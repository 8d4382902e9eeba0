"""The console's Flask application: configuration, the secret key, security headers, and the request
hooks every page goes through (session, CSRF, role checks); the pages are in the modules beside it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Flask, abort, g, render_template
from flask.sessions import SecureCookieSessionInterface

from ..access import AccessAudit, Reviews, UserStore
from ..config import GatewayConfig
from ..fsutil import open_private, private_mkdir
from ..logging import get_logger
from ..store.repo import Repo
from .auth import install as install_auth
from .auth import wants_html

__all__ = ["ConsoleContext", "create_console"]

log = get_logger("psg.console")

HERE = Path(__file__).parent


@dataclass
class ConsoleContext:
    """What the console reads and acts on: the daemon's own objects (or a test's)."""

    cfg: GatewayConfig
    repo: Repo
    montage: Any = None  # MontageHolder: reloaded after a mapping; None: the table file is read as needed
    health: Callable[[], tuple[bool, dict[str, Any]]] | None = None
    metrics: Any = None
    users: UserStore = field(init=False)
    audit: AccessAudit = field(init=False)
    reviews: Reviews = field(init=False)

    def __post_init__(self) -> None:
        self.users = UserStore(self.repo)
        self.audit = AccessAudit(self.repo)
        self.reviews = Reviews(self.repo)


def secret_key(cfg: GatewayConfig) -> bytes:
    """The key that signs session cookies: ``console.secret_key_file``, created (private, 32 random bytes)
    when missing. Keep it private: whoever has it can forge a session."""
    path = Path(cfg.console.secret_key_file or Path(cfg.paths.var_dir) / "console-secret.key")
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        private_mkdir(path.parent)
        data = secrets.token_hex(32).encode()
        # Private like every file we create (0600, or 0640 of service.group), whatever the umask.
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data + b"\n")
        log.info("console.secret_key_created", file=path.name)
    if len(data) < 32:
        raise ValueError(f"{path}: the console's secret key is shorter than 32 characters")
    return data


class _Sessions(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure when this request came over HTTPS (directly, or from a
    trusted proxy that says so in X-Forwarded-Proto)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(getattr(g, "https", False))


CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; frame-src 'self'; "
       "form-action 'self'; frame-ancestors 'self'; base-uri 'none'; object-src 'none'")


def create_console(ctx: ConsoleContext) -> Flask:
    """The console as a WSGI application, to be mounted under ``/ui`` (SCRIPT_NAME ``/ui``)."""
    app = Flask("gateway.console", template_folder=str(HERE / "templates"), static_folder=str(HERE / "static"),
                static_url_path="/static")
    c = ctx.cfg.console
    app.config.update(
        SECRET_KEY=secret_key(ctx.cfg),
        SESSION_COOKIE_NAME="psg_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/ui",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=c.session_hours),
        SESSION_REFRESH_EACH_REQUEST=True,
        MAX_CONTENT_LENGTH=16 << 30,  # a replaced input: a whole night's EDF
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.session_interface = _Sessions()
    app.extensions["psg"] = ctx
    app.jinja_env.globals.update(site=ctx.cfg.site, fmt_time=fmt_time, fmt_age=fmt_age)
    app.jinja_env.filters.update(time=fmt_time, age=fmt_age, pct=fmt_pct)

    install_auth(app, ctx)
    from . import agreement, dashboard, montage, outbox, studies

    for module in (dashboard, studies, outbox, montage, agreement):
        app.register_blueprint(module.bp)

    @app.after_request
    def _headers(resp):  # type: ignore[no-untyped-def]
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "SAMEORIGIN"
        resp.headers["Referrer-Policy"] = "same-origin"
        if resp.mimetype == "text/html":
            resp.headers["Cache-Control"] = "no-store"  # pages show PHI: never kept by a shared cache
        return resp

    for code, title in ((400, "Bad request"), (403, "Not allowed"), (404, "Not found"), (413, "Too large"),
                        (429, "Too many attempts")):
        app.register_error_handler(code, _error_page(code, title))
    return app


def _error_page(code: int, title: str) -> Callable[[Any], Any]:
    def handler(exc: Any) -> Any:
        message = getattr(exc, "description", None) or title
        if not wants_html():
            return {"error": title, "message": message}, code
        return render_template("error.html", code=code, title=title, message=message), code
    return handler


def context() -> ConsoleContext:
    from flask import current_app

    return current_app.extensions["psg"]


def fmt_time(value: datetime | str | None) -> str:
    if not value:
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_age(seconds: float | None) -> str:
    if seconds is None or not isinstance(seconds, int | float):
        return ""
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def fmt_pct(value: float | None) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else ""


def require_post_role(needed: str) -> None:
    """403 unless the signed-in user's role allows ``needed`` (viewer < operator < admin)."""
    from ..access import role_allows

    user = getattr(g, "user", None)
    if user is None or not role_allows(user.role, needed):
        abort(403, f"your role does not allow this (needs {needed})")
