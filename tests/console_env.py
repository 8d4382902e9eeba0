"""What the web console's tests build on: a configuration, studies made by repo transitions with
hand-written outputs, users, and a client that talks to the console mounted under /ui."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from gateway.config import GatewayConfig, resolve_paths
from gateway.store.models import MessageState, State, Study
from gateway.store.repo import Repo

PASSWORD = "correct horse battery"
HTML = {"Accept": "text/html,application/xhtml+xml"}


def console_cfg(tmp_path: Path, db_url: str, **sections: Any) -> GatewayConfig:
    cfg = GatewayConfig(paths={"var_dir": tmp_path / "var"}, database={"url": db_url}, **sections)
    cfg = resolve_paths(cfg, tmp_path)
    Path(cfg.paths.var_dir).mkdir(parents=True, exist_ok=True)
    return cfg


def outcome(label: str, percentile: float | None, status: str = "not flagged") -> dict[str, Any]:
    code = f"PSG-{label.upper()}"[:20]
    return {"label": label, "code": code, "phecode": label, "phenotype": label, "log_hazard": 0.1,
            "percentile": percentile, "reference_size": 40 if percentile is not None else 0, "status": status}


def decision(outcomes: list[dict[str, Any]], *, withheld: str | None = None) -> dict[str, Any]:
    """A stored flag decision as the flag step writes it."""
    flags = [{"label": o["label"], "code": o["code"], "percentile": o["percentile"]}
             for o in outcomes if o["status"] == "flagged"]
    borderline = [{"label": o["label"], "code": o["code"], "percentile": o["percentile"], "reference_size": 40}
                  for o in outcomes if o["status"] == "borderline"]
    return {"flags": flags, "findings": [], "notes": [], "borderline": borderline, "outcomes": outcomes,
            "risk_flags": {"suppressed": withheld is not None, "reasons": [withheld] if withheld else [],
                           "kinds": ["quality"] if withheld else []}}


_n = [0]


def hand_study(repo: Repo, tmp_path: Path, flags: dict[str, Any] | None = None, *, fail: str | None = None,
               unmapped: list[str] | None = None, name: str = "DOE^JANE", agreement: dict | None = None,
               scorer: str | None = None, dead: bool = False) -> Study:
    """A study moved through the states by hand: FLAGGED with ``flags`` and an outputs folder holding a
    metrics.json (channel map included), or FAILED with ``fail`` as its reason."""
    _n[0] += 1
    i = _n[0]
    s = repo.register_file(source="folder:/in", path=f"/p/{i}.edf", name=f"{i}.edf",
                           sha256=hashlib.sha256(f"{tmp_path}{i}".encode()).hexdigest(), filename_pattern=None,
                           actor="t").study
    s = repo.claim("w", 60)
    if fail is not None:
        return repo.transition(s, State.FAILED, "w", "study.failed", last_error=fail, error_kind="permanent")
    s = repo.transition(s, State.DECODED, "w", "study.decoded", patient_id=f"MRN{i:04d}", patient_name=name)
    s = repo.transition(s, State.MAPPED, "w", "study.mapped", montage_name="site", montage_version="abc123",
                        mapping={"channels": {"BAS": ["C3-M2"]}, "unmapped": unmapped or [], "ignored": []})
    out = tmp_path / "outputs" / s.key
    out.mkdir(parents=True)
    mapping = [{"index": 0, "label": "C3-M2", "modality": "BAS", "status": "mapped",
                "rule": 'normalised "C3-M2"', "where": "default:12"}]
    mapping += [{"index": k + 1, "label": lab, "modality": None, "status": "unmapped", "rule": None, "where": None}
                for k, lab in enumerate(unmapped or [])]
    (out / "metrics.json").write_text(json.dumps({
        "sleep": {"tst_min": 400.0, "stage_min": {}}, "model_bundle": {"calibrated_outcomes": []},
        "montage": {"name": "site", "version": "abc123", "mapping": mapping, "unmapped": unmapped or []},
        "staging_agreement": agreement}))
    (out / "hazards.csv").write_text("index,phecode,phenotype,log_hazard,hazard_ratio\n1041,death,death,0.9,2.46\n")
    fields: dict[str, Any] = {"scorer": scorer} if scorer else {}
    s = repo.transition(s, State.INFERRED, "w", "study.inferred", output_path=str(out), bundle_name="sleepfm",
                        bundle_version="1", bundle_validated=False, **fields)
    if dead:  # queued with its message, which the EHR refused: a dead letter
        er7 = f"MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|PSGUI{i:04d}|P|2.5.1\rPID|1||MRN{i:04d}"
        s, m = repo.queue_message(s, State.QUEUED, "w", "study.queued", None, destination="127.0.0.1:2575",
                                  control_id=f"PSGUI{i:04d}", er7=er7, message_state=MessageState.PENDING,
                                  correction=False, flags=flags or decision([]))
        repo.message_dead(m, None, "AE: unknown patient", "AE", actor="t")
        return repo.get(s.id)
    return repo.transition(s, State.FLAGGED, "w", "study.flagged", flags=flags or decision([]))


def dead_letter_of(repo: Repo, study: Study):
    [m] = repo.messages(study_id=study.id)
    return m


def ui_client(app) -> Client:  # type: ignore[no-untyped-def]
    """A test client for the console mounted under /ui, as the ops endpoint mounts it."""
    return Client(DispatcherMiddleware(NotFound(), {"/ui": app}))


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(client: Client, name: str, password: str = PASSWORD) -> str:
    """Sign in; returns the session's CSRF token."""
    page = client.get("/ui/login", headers=HTML)
    r = client.post("/ui/login", data={"username": name, "password": password, "csrf": csrf_of(page.text)},
                    headers=HTML)
    assert r.status_code == 302, r.text
    return csrf_of(client.get("/ui/", headers=HTML).text)
