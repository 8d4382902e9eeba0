"""The web console under ``/ui/`` of the ops endpoint: dashboard, studies and the review worklist, one
study, the outbox, montage mapping and scoring agreement, behind a login with roles and an access audit.

A Flask (WSGI) application, server-rendered from ``templates/`` with one vendored stylesheet (no JavaScript,
nothing fetched at run time); :class:`gateway.http.OpsServer` dispatches every path under ``/ui`` to it.
See docs/admin-guide.md, "Web console".
"""

from .app import ConsoleContext, create_console

__all__ = ["ConsoleContext", "create_console"]
