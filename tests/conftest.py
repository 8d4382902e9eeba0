"""Shared test fixtures."""

from __future__ import annotations

import dis
import functools
import inspect
import os
import sys
import types
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


@pytest.fixture(scope="session")
def calibrated_model(tmp_path_factory):
    """Like ``model``, with death and Stroke declared calibrated in bundle.json: the tests that force a flag
    with an absolute threshold (``pipeline_env.forced_flags``) run on it."""
    from pipeline_env import calibrate

    from inference.bundle import load_bundle, make_demo_bundle
    from inference.engine import Engine, EngineOptions

    bundle = load_bundle(calibrate(make_demo_bundle(tmp_path_factory.mktemp("bundle") / "calibrated")))
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


@pytest.fixture
def repo(db_url: str):
    """A repository on a migrated database of each backend (``db_url``); a module may define its own."""
    from gateway.store.db import make_engine, upgrade
    from gateway.store.repo import Repo

    engine = make_engine(db_url)
    upgrade(engine)
    yield Repo(engine)
    engine.dispose()


# ---- test layers: unit, integration, e2e (tests/README.md) -------------------------------------------------
# Every collected test carries exactly one layer mark. An explicit mark (a module's ``pytestmark`` or a
# decorator) wins; otherwise the layer is the highest one among the things the test uses: its parameters,
# the fixtures it requests (and theirs), and the helper functions of the test folder they call, read from
# their code. `pytest --collect-only -q --layers` shows each test's layer and why.
LAYERS = ("unit", "integration", "e2e")
_RANK = {layer: rank for rank, layer in enumerate(LAYERS)}
TESTS_DIR = Path(__file__).resolve().parent
_LAYER_OF = pytest.StashKey[dict[str, tuple[str, str]]]()  # node id -> (layer, why)

# What a test uses -> its layer. A key is a module (anything from it) or a module-qualified name.
USES: dict[str, tuple[str, str]] = {
    "daemon_proc": ("e2e", "psg-gateway run in its own process (tests/daemon_proc.py)"),
    "mllp_peer": ("integration", "the independent MLLP listener (tests/mllp_peer.py)"),
    "peers.dcmtk": ("integration", "DCMTK tools (storescu, echoscu, storescp)"),
    "ray": ("integration", "a local Ray instance"),
    "gateway.sources.dicom.receiver.DicomReceiver": ("integration", "the DICOM receiver on a real port"),
    "gateway.http.OpsServer": ("integration", "the HTTP ops endpoint on a real port"),
    "gateway.hl7.listener.FileMllpListener": ("integration", "an MLLP listener on a real port"),
    "psg-gateway": ("integration", "the installed psg-gateway executable in its own process"),
    # the pipeline on a night: database, spool folders and the model together (tests/pipeline_env.py)
    "gateway.pipeline.runner.Pipeline": ("integration", "the pipeline with a database and the model"),
}
# A fixture parameter that is a real peer: the PostgreSQL variant of db_url.
PARAMS: dict[tuple[str, object], tuple[str, str]] = {
    ("db_url", "postgresql"): ("integration", "PostgreSQL"),
}
# The product's command line (in process or the installed executable) with a command that runs the whole
# product: the daemon, the demo, a batch over an archive, inference on a night.
CLI = ("gateway.cli.main.app", "psg-gateway")
E2E_COMMANDS = ("run", "demo", "batch", "infer")


def _object_key(obj: object) -> str | None:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    cli = sys.modules.get("gateway.cli.main")
    if cli is not None and obj is getattr(cli, "app", None):
        return "gateway.cli.main.app"
    if isinstance(obj, Path) and obj.name == "psg-gateway":
        return "psg-gateway"
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else None


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


@functools.cache
def _is_test_file(filename: str) -> bool:
    return Path(filename).resolve().parent == TESTS_DIR


def _in_tests_dir(func: object) -> bool:
    code = getattr(func, "__code__", None)
    return isinstance(code, types.CodeType) and _is_test_file(code.co_filename)


_IMPORT_NAME, _IMPORT_FROM, _EXTENDED_ARG = dis.opmap["IMPORT_NAME"], dis.opmap["IMPORT_FROM"], dis.EXTENDED_ARG


def _imports(code: types.CodeType) -> list[tuple[str, str | None]]:
    """What ``code`` imports: (module, None) for ``import module``, (module, name) for ``from module import
    name``; read from the bytecode (fast, unlike dis.get_instructions)."""
    found: list[tuple[str, str | None]] = []
    raw, extended, module = code.co_code, 0, None
    for i in range(0, len(raw), 2):
        op, arg = raw[i], raw[i + 1] | extended
        extended = arg << 8 if op == _EXTENDED_ARG else 0
        if op == _IMPORT_NAME:
            module = code.co_names[arg]
            found.append((module, None))
        elif op == _IMPORT_FROM and module is not None:
            found.append((module, code.co_names[arg]))
    return found


_SCANNED: dict[types.CodeType, tuple[set[str], set[str]]] = {}


def _references(func: types.FunctionType, seen: set[types.CodeType] | None = None) -> tuple[set[str], set[str]]:
    """(keys of what ``func`` refers to: its globals and what it imports, the CLI's e2e commands it names),
    following the functions of the test folder it calls. A command counts only where the same function
    refers to the CLI."""
    if func.__code__ in _SCANNED:
        return _SCANNED[func.__code__]
    seen = set() if seen is None else seen
    seen.add(func.__code__)
    names: set[str] = set()
    strings = {d for d in func.__defaults__ or () if isinstance(d, str)}
    imports: list[tuple[str, str | None]] = []
    for code in _codes(func.__code__):
        names.update(code.co_names)  # the globals it reads (and attribute names: a harmless excess)
        strings.update(c for c in code.co_consts if isinstance(c, str))
        imports.extend(_imports(code))
    keys: set[str] = set()
    helpers: list[types.FunctionType] = []
    for name in names:
        obj = func.__globals__.get(name)
        if isinstance(obj, types.FunctionType) and _in_tests_dir(obj):
            helpers.append(obj)
        if obj is not None and (key := _object_key(obj)) is not None:
            keys.add(key)
    for module_name, name in imports:  # import module_name / from module_name import name
        module = sys.modules.get(module_name)
        obj = getattr(module, name, None) if module is not None and name is not None else None
        keys.add(module_name if name is None else (_object_key(obj) or f"{module_name}.{name}"))
    if "psg-gateway" in strings and "with_name" in names:  # Path(sys.executable).with_name("psg-gateway")
        keys.add("psg-gateway")
    commands = strings & set(E2E_COMMANDS) if any(c in keys for c in CLI) else set()
    for helper in helpers:
        if helper.__code__ not in seen:
            more_keys, more_commands = _references(helper, seen)
            keys |= more_keys
            commands |= more_commands
    _SCANNED[func.__code__] = (keys, commands)
    return keys, commands


def _uses(key: str) -> tuple[str, str] | None:
    for prefix, found in USES.items():
        if key == prefix or key.startswith(prefix + "."):
            return found
    return None


def detect_layer(item: pytest.Item) -> tuple[str, str]:
    """The layer that what ``item`` uses calls for, and why."""
    found: list[tuple[str, str]] = []
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        for (name, value), hit in PARAMS.items():
            if callspec.params.get(name) == value:
                found.append((hit[0], f"{hit[1]} (the {name}[{value}] parameter)"))
    funcs: list[tuple[str, object]] = [("the test", getattr(item, "function", None))]
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        defs = fixtureinfo.name2fixturedefs.get(name) if fixtureinfo is not None else None
        if defs:
            funcs.append((f"fixture {name}", inspect.unwrap(defs[-1].func)))
    for where, func in funcs:
        if not (isinstance(func, types.FunctionType) and _in_tests_dir(func)):
            continue
        keys, commands = _references(func)
        for key in keys:
            if (hit := _uses(key)) is not None:
                found.append((hit[0], f"{hit[1]} ({where})"))
        for command in sorted(commands):
            found.append(("e2e", f"psg-gateway {command} ({where})"))
    if not found:
        return "unit", "no real peer, no whole product"
    return max(found, key=lambda hit: _RANK[hit[0]])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--layers", action="store_true", default=False,
                     help="print each collected test's layer (unit, integration, e2e) and why")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks given here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong: list[str] = []
    layers = config.stash.setdefault(_LAYER_OF, {})
    for item in items:
        explicit = {m.name for m in item.iter_markers() if m.name in _RANK}
        if len(explicit) == 1:
            layer, why = explicit.pop(), "explicit mark"
        elif not explicit:
            layer, why = detect_layer(item)
            item.add_marker(getattr(pytest.mark, layer))
        else:
            wrong.append(f"{item.nodeid}: {' and '.join(sorted(explicit))}")
            continue
        layers[item.nodeid] = (layer, why)
        marks = [m.name for m in item.iter_markers() if m.name in _RANK]
        if len(set(marks)) != 1:
            wrong.append(f"{item.nodeid}: {' and '.join(sorted(set(marks))) or 'no layer'}")
    if wrong:
        raise pytest.UsageError("every test needs exactly one layer mark (unit, integration or e2e):\n  "
                                + "\n  ".join(wrong))


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.config.getoption("--layers"):
        return
    layers = session.config.stash[_LAYER_OF]
    for item in session.items:
        layer, why = layers[item.nodeid]
        print(f"{layer:<11} {item.nodeid}  [{why}]")
