"""The audit log of a site's montage table: one JSON line per change, in ``<table>.audit.log`` beside it.

Each line holds the UTC time, the OS user (and who ran sudo), the action, the rule(s) and the table's
versions before and after. Labels and rules only: a table holds no patient data, and nothing else is
written. Each line is fsynced before the edit is reported done.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["append_audit_entry", "audit_log_path", "os_user"]


def audit_log_path(table_path: Path) -> Path:
    """The audit log beside a table: ``site.yaml`` -> ``site.yaml.audit.log``."""
    return table_path.with_name(table_path.name + ".audit.log")


def os_user() -> str:
    """Who is editing: the login name (``uid:N`` where there is none), with ``(sudo by X)`` under sudo."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (containers): the uid still says who
        user = f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


def append_audit_entry(table_path: Path, action: str, rules: list[dict[str, Any]], before: str | None,
                       after: str, user: str | None = None) -> None:
    """Append one JSON line to the table's audit log: UTC time, OS user (or ``user``: the web console's
    user), action, rule(s), table versions (``before`` None: the table was created)."""
    entry = {
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "user": user or os_user(),
        "action": action,
        "table": table_path.name, "rules": rules, "version_before": before, "version_after": after,
    }
    with open(audit_log_path(table_path), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
