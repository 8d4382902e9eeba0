"""The local operations endpoint: ``/healthz`` (JSON), ``/metrics`` (Prometheus text format) and, when
given one, the web console under ``/ui/`` (a WSGI application, :mod:`gateway.console`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["OpsServer"]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines would go to stderr unstructured; scrapes every 15 s are noise


class OpsServer:
    """``health()`` returns (healthy, document); unhealthy answers 503 so a load balancer or probe sees it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 health: Callable[[], tuple[bool, dict[str, Any]]], console: Callable | None = None):
        self.registry = registry
        self.health = health
        self.console = console  # a WSGI app mounted at /ui (SCRIPT_NAME /ui)
        self._server = make_server(host, port, self._app, server_class=_Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if self.console is not None and (path == "/ui" or path.startswith("/ui/")):
            if path == "/ui":
                start_response("308 Permanent Redirect", [("Location", "/ui/"), ("Content-Type", "text/plain")])
                return [b"/ui/\n"]
            environ = {**environ, "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + "/ui", "PATH_INFO": path[3:]}
            return self.console(environ, start_response)
        if path == "/metrics":
            body = generate_latest(self.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path in ("/healthz", "/health"):
            try:
                ok, doc = self.health()
            except Exception as exc:  # noqa: BLE001 - a health check must answer, not crash
                ok, doc = False, {"status": "error", "error": type(exc).__name__}
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [json.dumps(doc, default=str).encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz or /metrics\n"]
