"""The spool's naming and the claim manifest, shared by the drop folder (which claims files into the
spool) and the pipeline (which moves a finished study's files on, renamed after its key).

A claimed recording is named after its claim id, later its study key, with the original's extension when
the readers know it (else ``.dat``): a file name can hold a patient's name or MRN, so it never names a
file we create. ``claim.json`` beside it records the claim; its original path is dropped once the study
is registered (the database's ``input_name`` keeps the name).
"""

from __future__ import annotations

import json
from pathlib import Path

from .fsutil import atomic_write
from .readers import DICOM_SUFFIXES, EDF_SUFFIXES

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "forget_original", "spool_name", "write_manifest"]

MANIFEST_NAME = "claim.json"
MANIFEST_VERSION = 2  # 2: files renamed after the claim id, original path dropped once registered
# Extensions kept (lower-cased) on the spooled recording; any other becomes .dat, so that a name like
# "DOE.JANE" does not leave "JANE" behind. The readers sniff the content; these only help an EDF whose
# header is broken get the EDF reader's reason.
_KEPT_SUFFIXES = frozenset(EDF_SUFFIXES + DICOM_SUFFIXES)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(folder / MANIFEST_NAME, json.dumps(manifest, indent=2).encode("utf-8"))


def spool_name(original: str, base: str) -> str:
    """The name a recording called ``original`` gets in the gateway's folders: ``base`` (a claim id or a
    study key) and the original's extension when it is one the readers know, else ``.dat``."""
    suffix = Path(original).suffix.lower()
    return base + (suffix if suffix in _KEPT_SUFFIXES else ".dat")


def forget_original(folder: Path, renames: dict[str, str] | None = None) -> bool:
    """Drop the original path from the claim manifest in ``folder`` once the study is registered (the
    database's ``input_name`` keeps the name), and record ``renames`` (old file name -> new) of the
    recording and its sidecars. Returns True when the manifest was rewritten.

    A manifest that cannot be read is left as it is (a corrupt one is the operator's to look at).
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    renames = renames or {}
    before = dict(manifest)
    manifest.pop("original_path", None)
    if isinstance(manifest.get("recording"), str):
        manifest["recording"] = renames.get(manifest["recording"], manifest["recording"])
    if isinstance(manifest.get("sidecars"), list):
        manifest["sidecars"] = [renames.get(n, n) if isinstance(n, str) else n for n in manifest["sidecars"]]
    if manifest == before:
        return False
    manifest["version"] = MANIFEST_VERSION
    write_manifest(Path(folder), manifest)
    return True
