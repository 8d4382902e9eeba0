"""A pipeline on a fresh database and var folder, and a file spooled as the drop folder would: what
the pipeline and export tests build their studies with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy import Engine as DbEngine

from gateway.config import PathsConfig, PipelineConfig
from gateway.fsutil import private_mkdir
from gateway.metrics import Metrics
from gateway.montage.holder import MontageHolder
from gateway.pipeline.runner import Pipeline
from gateway.store.db import make_engine, upgrade
from gateway.store.models import Study
from gateway.store.repo import Repo
from inference.bundle import ModelBundle
from inference.engine import Engine

FORCED = ("death", "Stroke")  # the outcomes tests force flags on


def calibrate(bundle_dir: Path, outcomes: tuple[str, ...] = FORCED) -> Path:
    """Declare ``outcomes`` calibrated in a test bundle's ``bundle.json``, so that an absolute threshold
    (``log_hazard: -1e9``, which every study passes: how tests force a flag) is accepted for them."""
    meta_path = Path(bundle_dir) / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["calibrated_outcomes"] = list(outcomes)
    meta_path.write_text(json.dumps(meta, indent=2))
    return Path(bundle_dir)


def forced_flags(outcomes: tuple[str, ...] = FORCED, **extra: object) -> dict:
    """A ``flags`` configuration section that flags ``outcomes`` on every study (needs :func:`calibrate`)."""
    return {"outcomes": [{"label": o, "log_hazard": -1e9, "percentile": None} for o in outcomes], **extra}


def pipeline_env(db_url: str, var: Path, bundle: ModelBundle, engine: Engine, *, reports: bool = False
                 ) -> tuple[DbEngine, Repo, Pipeline, PathsConfig]:
    """(database engine, repo, pipeline, paths) with retries 10 ms apart; dispose the engine after.

    ``reports``: write each study's report.html/pdf (off unless a test reads them: ~0.8 s a study)."""
    db = make_engine(db_url)
    upgrade(db)
    repo = Repo(db)
    paths = PathsConfig(var_dir=var).resolved(var)
    for p in (paths.spool, paths.outputs, paths.processed, paths.quarantine):
        assert not p.exists()
        private_mkdir(p)  # as the daemon's start creates them
    pipe = Pipeline(repo, bundle, MontageHolder(None), paths, PipelineConfig(retry_backoff_seconds=0.01, write_report=reports), Metrics(),
                    engine=engine)
    return db, repo, pipe, paths


def spool_file(paths: PathsConfig, name: str, data: bytes, repo: Repo, claim: str = "c1") -> Study:
    """``data`` claimed into the spool as ``name`` and registered (READY, or a duplicate)."""
    folder = paths.spool / "incoming" / claim
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data)
    (folder / "claim.json").write_text("{}")
    return repo.register_file(source="folder:/in", path=str(folder / name), name=name,
                              sha256=hashlib.sha256(data).hexdigest(), filename_pattern=None,
                              actor="folder:/in").study
