"""Sign-in for the console: password login (throttled per remote address, accounts lock in the user store),
optional single sign-on from a trusted reverse proxy's header, signed expiring sessions with an idle
timeout, a CSRF token on every POST, and the access audit of logins, page views and actions."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, abort, g, redirect, render_template, request, session, url_for

from ..logging import get_logger

if TYPE_CHECKING:
    from .app import ConsoleContext

log = get_logger("psg.console")

bp = Blueprint("auth", __name__)

PUBLIC = {"auth.login", "static"}


class LoginThrottle:
    """At most ``per_minute`` login attempts per remote address in any 60 s (on top of the store's lockout)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, addr: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._seen[addr]
            while q and now - q[0] >= 60:
                q.popleft()
            if len(q) >= self.per_minute:
                return False
            q.append(now)
            if len(self._seen) > 10000:  # forget idle addresses
                for key in [k for k, v in self._seen.items() if not v]:
                    del self._seen[key]
            return True


def wants_html() -> bool:
    """A browser's request (Accept names text/html): redirected to the login; anything else gets 401."""
    accept = request.headers.get("Accept", "")
    return "text/html" in accept or "application/xhtml+xml" in accept


def _ctx() -> ConsoleContext:
    from .app import context

    return context()


def _trusted(addr: str | None, networks: list[str]) -> bool:
    if not addr or not networks:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def remote_addr() -> str:
    return getattr(g, "remote_addr", None) or request.remote_addr or "unknown"


def audit(action: str, *, study: Any = None, target: str | None = None, detail: dict[str, Any] | None = None,
          user: str | None = None) -> None:
    """One access-audit row for the signed-in user (study key and id only; never PHI)."""
    name = user or (g.user.name if getattr(g, "user", None) else "anonymous")
    _ctx().audit.record(name, action, study_id=getattr(study, "id", None), study_key=getattr(study, "key", None),
                        target=target, detail=detail, remote_addr=remote_addr())


def audit_view(study: Any = None) -> None:
    """A page that shows PHI was viewed: the path only (a search's query string may hold a name)."""
    audit("view", study=study, target=request.script_root + request.path)


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _start_session(name: str) -> None:
    session.clear()
    session.permanent = True
    now = time.time()
    session.update(user=name, login_at=now, seen_at=now, csrf=secrets.token_urlsafe(32))


def install(app: Flask, ctx: ConsoleContext) -> None:
    c = ctx.cfg.console
    throttle = LoginThrottle(c.login_attempts_per_minute)
    app.extensions["psg_throttle"] = throttle
    app.jinja_env.globals["csrf_token"] = csrf_token

    @app.before_request
    def _gate():  # type: ignore[no-untyped-def]
        peer = request.environ.get("REMOTE_ADDR")
        from_proxy = _trusted(peer, c.trusted_proxies)
        g.https = request.scheme == "https" or (
            from_proxy and request.headers.get("X-Forwarded-Proto", "").lower() == "https")
        forwarded = request.headers.get("X-Forwarded-For", "")
        g.remote_addr = forwarded.split(",")[-1].strip() if from_proxy and forwarded else peer
        g.user = None
        if request.method == "POST":
            sent = request.form.get("csrf", "") or request.headers.get("X-CSRF-Token", "")
            expected = session.get("csrf", "")
            if not expected or not hmac.compare_digest(str(sent), str(expected)):
                abort(400, "the form's security token is missing or stale: reload the page and try again")
        if c.sso_header and from_proxy:
            header_user = request.headers.get(c.sso_header, "").strip()
            if header_user and session.get("user") != header_user:
                user = ctx.users.get(header_user)
                if user is None or user.disabled:
                    audit("login_failed", user=header_user[:64], detail={"via": "sso"})
                    abort(403, "single sign-on: no enabled console user of that name")
                _start_session(user.name)
                audit("login", user=user.name, detail={"via": "sso"})
        name = session.get("user")
        if name:
            now = time.time()
            idle = now - float(session.get("seen_at", 0))
            age = now - float(session.get("login_at", 0))
            if idle > c.idle_minutes * 60 or age > c.session_hours * 3600:
                session.clear()
            else:
                user = ctx.users.get(name)
                if user is None or user.disabled:
                    session.clear()
                else:
                    g.user = user
                    session["seen_at"] = now
        if g.user is None and request.endpoint not in PUBLIC:
            if wants_html():
                return redirect(url_for("auth.login", next=request.full_path if request.query_string
                                        else request.path))
            return {"error": "unauthorized", "message": "sign in at /ui/login"}, 401, \
                {"WWW-Authenticate": 'FormLogin realm="psg-gateway console"'}
        return None

    app.register_blueprint(bp)


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return request.script_root + target
    return url_for("dashboard.index")


@bp.route("/login", methods=["GET", "POST"])
def login():  # type: ignore[no-untyped-def]
    from flask import current_app

    ctx = _ctx()
    error = None
    status = 200
    if request.method == "GET" and getattr(g, "user", None) is not None:
        return redirect(_safe_next(request.args.get("next")))
    if request.method == "POST":
        name = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        if not current_app.extensions["psg_throttle"].allow(remote_addr()):
            audit("login_failed", user=name[:64] or "anonymous", detail={"reason": "throttled"})
            error, status = "Too many sign-in attempts from this address: wait a minute.", 429
        else:
            user = ctx.users.authenticate(name, password) if name and password else None
            if user is None:
                audit("login_failed", user=name[:64] or "anonymous")
                log.info("console.login_failed", remote=remote_addr())
                error, status = "Wrong user name or password, or the account is disabled or locked.", 401
            else:
                _start_session(user.name)
                audit("login", user=user.name)
                log.info("console.login", user=user.name)
                return redirect(_safe_next(request.form.get("next")))
    csrf_token()
    return render_template("login.html", error=error, next=request.values.get("next", "")), status


@bp.route("/logout", methods=["POST"])
def logout():  # type: ignore[no-untyped-def]
    if getattr(g, "user", None) is not None:
        audit("logout")
    session.clear()
    return redirect(url_for("auth.login"))
