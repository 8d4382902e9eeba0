"""``psg-gateway run`` in its own process, for the tests that kill it, restart it or run two of them.

Each :class:`DaemonProc` has its own folder (var dir,
drop folder, config, log), its own DICOM and HTTP ports (kept across restarts, so a modality can send
again to the same port), a node name, optionally HL7 delivery to a given port, and any extra
environment (``PSG_CRASHPOINT``) per start. Several instances may share one database URL::

    d = DaemonProc(tmp_path / "a", db_url, bundle, node_name="node-a", hl7_port=peer.port)
    d.start(PSG_CRASHPOINT="decoded", allow_exit=True)   # may die by itself before it is healthy
    d.wait_exit()                                         # -9: it reached the crash point
    d.start()                                             # no crash point: wait for /healthz
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from peers import free_port

from gateway.store.db import make_engine
from gateway.store.repo import Repo

__all__ = ["EXE", "Daemon", "DaemonProc", "deep_update"]

EXE = Path(sys.executable).with_name("psg-gateway")


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base`` (nested dicts merged, anything else replaced); returns ``base``."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


class DaemonProc:
    """One gateway daemon: config written at construction, process started and restarted on demand."""

    def __init__(self, root: Path, db_url: str, bundle: Path, *, node_name: str = "testnode",
                 hl7_port: int | None = None, dicom: bool = True, stable_age_seconds: float = 1.0,
                 stable_seconds: float = 0.6, config: dict[str, Any] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url
        self.node_name = node_name
        self.drop = self.root / "drop"
        self.var = self.root / "var"
        self.dicom_port = free_port()
        self.http_port = free_port()
        cfg: dict[str, Any] = {
            "paths": {"var_dir": str(self.var)},
            "model": {"bundle": str(bundle), "device": "cpu"},
            "drop_folders": [{"path": str(self.drop), "stable_seconds": stable_seconds}],
            "dicom": {"enabled": dicom, "port": self.dicom_port, "ae_title": "PSGGATEWAY",
                      "stable_age_seconds": stable_age_seconds,
                      "allowed_callers": [{"ae_title": "STORESCU"}, {"ae_title": "PYNETDICOM"},
                                          {"ae_title": "ECHOSCU"}]},
            "http": {"port": self.http_port},
            # No per-study report unless a test asks for one: rendering it costs ~0.8 s a study and ~1.5 s of
            # imports per daemon process, and only the report tests read it.
            "pipeline": {"scan_interval_seconds": 0.2, "write_report": False},
            "service": {"shutdown_timeout_seconds": 20, "node_name": node_name},
            "logging": {"format": "json", "level": "info"},
        }
        if hl7_port is not None:
            cfg["hl7"] = {"enabled": True, "port": hl7_port, "timeout_seconds": 5, "retry_backoff_seconds": 0.3,
                          "retry_backoff_max_seconds": 1.0, "drain_interval_seconds": 0.2,
                          "mrn_assigning_authority": "HOSP"}
        deep_update(cfg, config or {})
        self.cfg = cfg
        self.config = self.root / "config.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = self.root / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        # The umask the daemon is launched with (None: this process's), as make run or a Dockerfile would.
        self.umask: int | None = None
        self._engine = make_engine(db_url)
        self.repo = Repo(self._engine)

    @property
    def engine(self):
        return self._engine

    # ---- process ------------------------------------------------------------------------------
    def launch(self, **env_extra: str) -> DaemonProc:
        """Start the process and return at once (see :meth:`wait_ready`)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PSG")}
        env["PSG__DATABASE__URL"] = self.db_url
        env.update(env_extra)
        self.starts += 1
        with open(self.log, "ab") as f:
            f.write(f"===== start {self.starts} {json.dumps(env_extra)} =====\n".encode())
        self.proc = subprocess.Popen([str(EXE), "run", "--config", str(self.config)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),  # noqa: SIM115
                                     umask=-1 if self.umask is None else self.umask)
        return self

    def wait_ready(self, timeout: float = 90, allow_exit: bool = False) -> bool:
        """Wait for /healthz 200; True when healthy. A process that exits first raises, or returns
        False with ``allow_exit`` (a crash point reached while resuming, before the endpoint was up)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if allow_exit:
                    return False
                raise AssertionError(f"{self.node_name}: daemon exited {self.proc.returncode}:\n{self.tail()}")
            code, _ = self.get("/healthz")
            if code == 200:
                return True
            time.sleep(0.1)
        raise AssertionError(f"{self.node_name}: daemon not healthy in {timeout}s:\n{self.tail()}")

    def start(self, timeout: float = 90, allow_exit: bool = False, **env_extra: str) -> bool:
        """launch() and wait_ready(); see there."""
        self.launch(**env_extra)
        return self.wait_ready(timeout, allow_exit=allow_exit)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 60, what: str = "the daemon to die by itself") -> int:
        """Wait for the process to end on its own; its return code (-9 for a crash point)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.node_name}: timed out after {timeout}s waiting for {what}; "
                                 f"{self.describe()}\n{self.tail()}") from None

    def kill(self) -> int:
        """SIGKILL (kill -9) now; the return code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._engine.dispose()

    # ---- observation --------------------------------------------------------------------------
    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def describe(self) -> str:
        with contextlib.suppress(Exception):
            return "studies: " + repr([(s.id, s.key, s.source_kind, s.state, s.version, s.last_error)
                                       for s in self.repo.list(limit=200)])
        return "studies: (database unavailable)"

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60, what: str = "condition",
                 interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.node_name}: daemon exited {self.proc.returncode} while waiting "
                                     f"for {what}; {self.describe()}\n{self.tail()}")
            time.sleep(interval)
        raise AssertionError(f"{self.node_name}: timed out after {timeout}s waiting for {what}; "
                             f"{self.describe()}\n{self.tail()}")

    def log_events(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


class Daemon(DaemonProc):
    """One daemon in ``root``, configured with ``section__key=value`` overrides; ``start()`` returns it."""

    def __init__(self, root: Path, db_url: str, bundle: Path, **overrides):
        config: dict = {}
        for key, value in overrides.items():
            section, leaf = key.split("__")
            config.setdefault(section, {})[leaf] = value
        super().__init__(root, db_url, bundle, config=config)

    def start(self, timeout: float = 60, **env_extra: str) -> Daemon:
        super().start(timeout, **env_extra)
        return self
