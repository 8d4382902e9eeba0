"""``psg-gateway config check``: schema validation plus the checks a schema cannot make.

Each problem names the key path it is about. Checks beyond the schema: folders exist or can be
created, drop folders exist, the montage table loads, the model bundle folder holds a bundle, TLS files
are readable, the database answers (optional: it may not be up when the file is written).
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, GatewayConfig, load_config

__all__ = ["check_config"]


def _writable_or_creatable(path: Path) -> bool:
    p = path
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def semantic_problems(cfg: GatewayConfig, connect: bool = False) -> list[str]:
    problems: list[str] = []
    for key in ("var_dir", "spool", "outputs", "processed", "quarantine"):
        path = Path(getattr(cfg.paths, key))
        if not _writable_or_creatable(path):
            problems.append(f"paths.{key}: {path} cannot be created or written")
    for i, folder in enumerate(cfg.drop_folders):
        if folder.path.exists() and not folder.path.is_dir():
            problems.append(f"drop_folders[{i}].path: {folder.path} is not a folder")
        elif not _writable_or_creatable(folder.path):
            # The daemon moves files out of the folder (and creates it when missing).
            problems.append(f"drop_folders[{i}].path: {folder.path} cannot be created or written")
    if cfg.montage.table is not None:
        from .montage.table import MontageError, MontageTable

        try:
            MontageTable.load(cfg.montage.table)
        except (MontageError, OSError) as exc:
            problems.append(f"montage.table: {exc}")
    if cfg.model.bundle != "demo":
        bundle = Path(cfg.model.bundle)
        if not (bundle / "model_base").is_dir():
            problems.append(f"model.bundle: {bundle} is not a model bundle (no model_base/ folder)")
    tls = cfg.dicom.tls
    if cfg.dicom.enabled and tls.enabled:
        for key in ("cert_file", "key_file", "ca_file"):
            path = getattr(tls, key)
            if path is not None and not os.access(path, os.R_OK):
                problems.append(f"dicom.tls.{key}: {path} is not readable")
    if cfg.dicom.enabled and cfg.http.enabled and cfg.dicom.port == cfg.http.port \
            and cfg.dicom.port != 0 and cfg.dicom.host == cfg.http.host:
        problems.append(f"http.port: {cfg.http.port} is also dicom.port")
    if connect:
        from .store.db import make_engine, sqlite_path
        from .store.repo import Repo

        file = sqlite_path(cfg.database_url)
        if file is not None:
            # A check must not create what it checks: connecting would create an empty database file.
            if not file.is_file() and not _writable_or_creatable(file.parent):
                problems.append(f"database.url: {file.parent} cannot be created or written")
        elif not Repo(make_engine(cfg.database_url)).ping():
            problems.append("database.url: the database does not answer")
    return problems


def check_config(path: Path | None, connect: bool = False) -> tuple[GatewayConfig | None, list[str]]:
    """(config, problems): config is None when the file does not even validate."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return None, exc.problems
    return cfg, semantic_problems(cfg, connect=connect)
