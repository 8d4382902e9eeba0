"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _reference_required() -> bool:
    return os.environ.get("PSG_REQUIRE_REFERENCE", "") not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference``; skips when absent, fails instead under PSG_REQUIRE_REFERENCE=1."""
    if not REFERENCE_DIR.is_dir():
        if _reference_required():
            pytest.fail(f"PSG_REQUIRE_REFERENCE=1 but {REFERENCE_DIR} is missing")
        pytest.skip(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """(the generated demo bundle, a CPU engine on it): what the in-process pipeline tests run; one per
    session (a module defining its own ``model`` uses that)."""
    from inference.bundle import load_bundle, make_demo_bundle
    from inference.engine import Engine, EngineOptions

    bundle = load_bundle(make_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo"))
    return bundle, Engine(bundle, EngineOptions(device="cpu"))


# ---- databases: every persistence/integration test runs on SQLite and on PostgreSQL ----------------
POSTGRES_ENV = "PSG_TEST_POSTGRES_URL"


def _pg_schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path):
    """A fresh, empty database URL: a SQLite file, or a private schema in PSG_TEST_POSTGRES_URL's database.

    Without PSG_TEST_POSTGRES_URL the PostgreSQL variant is skipped (reported as such, never passed).
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} not set: PostgreSQL tests skipped")
    import uuid

    from sqlalchemy import create_engine, text

    from gateway.store.db import normalise_url

    base = normalise_url(base)
    schema = f"psgtest_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield _pg_schema_url(base, schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
