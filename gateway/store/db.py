"""Database engines and schema migrations.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL``: a study or instance that was
acknowledged is on disk, and readers (the CLI, /healthz) never block the daemon. PostgreSQL is used
through psycopg 3 (``postgresql+psycopg://``; a bare ``postgresql://`` URL is mapped to it).

The SQLite file holds names, MRNs, birth dates and the full HL7 text: it is created private (0600, or
0640 with a ``service.group``) before sqlite3 opens it, whatever the umask; SQLite gives its ``-wal`` and
``-shm`` files the database file's mode. The ``.migrate-lock`` beside it is private too.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from ..fsutil import make_private, open_private, private_mkdir

__all__ = ["SQLITE_SIDE_FILES", "current_revision", "head_revision", "make_engine", "normalise_url",
           "session_factory", "sqlite_path", "upgrade"]

MIGRATIONS = Path(__file__).with_name("migrations")
# The files SQLite (and the migration lock) keep beside the database: <file><suffix>.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal", ".migrate-lock")


def normalise_url(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for another backend, an in-memory database or a URI."""
    url = normalise_url(url)
    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except ArgumentError:  # make_engine says what is wrong with it
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, echo: bool = False) -> Engine:
    """An engine with the pragmas and pool settings each backend needs."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        database = sqlite_path(url)
        if database is not None:
            private_mkdir(database.parent)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})
        if database is not None:

            @event.listens_for(engine, "do_connect")
            def _private_file(_dialect, _record, _cargs, _cparams) -> None:
                # sqlite3 would create a missing file under the umask (0644 under 022): create it first.
                _create_private(database)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _create_private(path: Path) -> None:
    """Create ``path`` empty and private when it does not exist (an empty file is an empty database)."""
    try:
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    os.close(fd)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


# pg_advisory_xact_lock(key1, key2): key1 names psg-gateway's migrations, key2 the schema (tests and
# sites may keep several gateways in one database, one schema each).
_PG_MIGRATION_LOCK = 0x70736701


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent; safe on every start, and on several nodes at once).

    One process migrates at a time: on PostgreSQL under a transaction-scoped advisory lock taken before
    alembic reads the version (the others wait, then find the schema current); on SQLite under an
    exclusive lock on a file beside the database.
    """
    cfg = _alembic_config(engine)
    with _sqlite_migration_lock(engine), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(current_schema()))"),
                         {"k": _PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


@contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    path = engine.url.database if is_sqlite(engine) else None
    if not path or path == ":memory:":
        yield
        return
    fd = os.open(f"{path}.migrate-lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        make_private(fd)  # an older version's lock file was 0644; this one is private
    except OSError:
        pass  # another user's lock file (a migration run as root): locking it is all that is needed
    with os.fdopen(fd, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()
