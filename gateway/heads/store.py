"""A fitted head on disk, and putting deployed heads into a model bundle.

```
HEAD/
  head.json      what the daemon loads: kind, outcomes and coefficients (plain numbers), the base model
  head.sha256    SHA-256 of head.json: the head's checksum, named by every result and ORU it produces
  manifest.json  how to reproduce it: command options, seed, data hashes, split, library versions
  staging.pt     (staging heads only) the re-fitted weights; their SHA-256 is inside head.json
```

A head is loaded only when its checksum matches and it was fitted on the embeddings of the model
the bundle holds (same model hash): a head fitted on another model's embeddings would be silently wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from inference.bundle import ModelBundle

from ..fsutil import atomic_write

__all__ = ["HEAD_FORMAT", "HeadError", "attach_site_heads", "library_versions", "plain", "read_head", "write_head"]

HEAD_FORMAT = 1
KINDS = ("cox", "apnea", "staging")


class HeadError(ValueError):
    """A head folder that cannot be written or used."""


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("psg-gateway", "numpy", "scipy", "scikit-learn", "torch", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def plain(value: Any, *, strict: bool = False) -> Any:
    """``value`` with numpy scalars and arrays (and paths) as plain Python, ready for ``json.dumps``;
    ``strict``: NaN and infinities become null too (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): plain(v, strict=strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, strict=strict) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), strict=strict)
    if isinstance(value, np.generic):
        value = value.item()
    if strict and isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_head(folder: Path, doc: dict[str, Any], manifest: dict[str, Any], *,
               files: dict[str, bytes] | None = None, force: bool = False) -> str:
    """Write a head folder; returns its checksum. An existing head is replaced only with ``force``."""
    folder = Path(folder)
    if (folder / "head.json").exists() and not force:
        raise HeadError(f"{folder} already holds a head (--force replaces it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HeadError(f"cannot create {folder}: {exc.strerror}") from None
    doc = {"format": HEAD_FORMAT, **doc, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
           "files": {name: _sha256(data) for name, data in (files or {}).items()}}
    for name, data in (files or {}).items():
        atomic_write(folder / name, data)
    body = (json.dumps(doc, indent=1, allow_nan=True) + "\n").encode("utf-8")
    checksum = _sha256(body)
    atomic_write(folder / "head.json", body)
    atomic_write(folder / "head.sha256", f"{checksum}  head.json\n".encode())
    manifest = {**manifest, "checksum": checksum, "libraries": library_versions()}
    atomic_write(folder / "manifest.json", (json.dumps(manifest, indent=1, default=str) + "\n").encode("utf-8"))
    return checksum


def read_head(folder: Path) -> tuple[dict[str, Any], str]:
    """(head.json, checksum) after checking the checksum and every file the head names."""
    folder = Path(folder)
    try:
        body = (folder / "head.json").read_bytes()
        recorded = (folder / "head.sha256").read_text().split()[0]
    except (OSError, IndexError) as exc:
        raise HeadError(f"{folder}: not a head folder (head.json and head.sha256 needed): "
                        f"{getattr(exc, 'strerror', None) or exc}") from None
    checksum = _sha256(body)
    if checksum != recorded:
        raise HeadError(f"{folder}: head.json does not match head.sha256 (edited or damaged)")
    doc = json.loads(body)
    if doc.get("format") != HEAD_FORMAT or doc.get("kind") not in KINDS:
        raise HeadError(f"{folder}: unknown head format {doc.get('format')!r} or kind {doc.get('kind')!r}")
    for name, digest in doc.get("files", {}).items():
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            raise HeadError(f"{folder}: {name}: {exc.strerror}") from None
        if _sha256(data) != digest:
            raise HeadError(f"{folder}: {name} does not match the checksum in head.json")
    return doc, checksum


def site_head(doc: dict[str, Any], checksum: str):
    """A cox or apnea head.json as the engine's :class:`~inference.site_heads.SiteHead`."""
    from inference.apnea import ApneaModel
    from inference.site_heads import SiteHead
    from inference.survival import CoxModel

    base = doc.get("base_model") or {}
    common = {"name": doc["name"], "kind": doc["kind"], "checksum": checksum, "base_model_hash": base.get("hash"),
              "demo_weights": bool(doc.get("demo_weights")), "demographics": bool(doc.get("demographics"))}
    if doc["kind"] == "cox":
        return SiteHead(**common, cox={o["label"]: CoxModel.from_dict(o["model"]) for o in doc["outcomes"]})
    return SiteHead(**common, apnea=ApneaModel.from_dict(doc["model"]),
                    token_statistics=bool(doc.get("token_statistics")))


def attach_site_heads(bundle: ModelBundle, heads: Sequence[Path], staging_head: Path | None = None) -> None:
    """Load deployed heads into ``bundle`` (``model.site_heads`` and ``model.staging_head``)."""
    model_hash = bundle.identity.model_hash
    named = dict(bundle.identity.site_heads)
    for folder in heads:
        doc, checksum = read_head(folder)
        _check_base(folder, doc, model_hash)
        if doc["kind"] == "staging":
            raise HeadError(f"{folder}: a staging head goes in model.staging_head, not model.site_heads")
        if doc["name"] in named:
            raise HeadError(f"{folder}: a second head named '{doc['name']}'")
        bundle.site_heads.append(site_head(doc, checksum))
        named[doc["name"]] = checksum
    if staging_head is not None:
        doc, checksum = read_head(staging_head)
        _check_base(staging_head, doc, model_hash)
        if doc["kind"] != "staging":
            raise HeadError(f"{staging_head}: a {doc['kind']} head, not a staging head")
        if bundle.staging is None:
            raise HeadError(f"{staging_head}: the model bundle has no staging head to replace")
        import torch

        state = torch.load(io.BytesIO((Path(staging_head) / doc["weights"]).read_bytes()), map_location="cpu",
                           weights_only=True)
        try:
            bundle.staging.load_state_dict(state)
        except RuntimeError as exc:
            raise HeadError(f"{staging_head}: weights do not fit this bundle's staging head: {exc}") from None
        bundle.staging.eval()
        named[f"staging:{doc['name']}"] = checksum
    bundle.identity = dataclasses.replace(bundle.identity, site_heads=named)


def _check_base(folder: Path, doc: dict[str, Any], model_hash: str | None) -> None:
    fitted_on = (doc.get("base_model") or {}).get("hash")
    if fitted_on and model_hash and fitted_on != model_hash:
        raise HeadError(f"{folder}: fitted on the embeddings of model {fitted_on[:12]}, but this bundle is "
                        f"{model_hash[:12]}: re-fit the head on this model's export")
