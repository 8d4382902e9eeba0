"""Model bundles: a folder laid out like the public SleepFM release, plus our optional ``bundle.json``.

```
BUNDLE/
  bundle.json                 optional: name, version, validated, demographics encoding
  label_mapping.csv           optional: output index -> phecode -> phenotype (packaged copy otherwise)
  model_base/best.pt          + config.json   (required)
  model_sleep_staging/best.pth + config.json  (optional: no hypnogram without it)
  model_diagnosis/best.pth    + config.json   (optional: no hazards without it)
```

The only file I/O in ``inference``: reading (and, for the demo bundle, writing) checkpoints.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoints import CheckpointError, load_into, read_state_dict, sha256_file
from .identity import BundleError, BundleIdentity, Outcome  # re-exported: importers use this module
from .models import DiagnosisHead, EncoderConfig, HeadConfig, SleepEncoder, StagingHead

BASE_DIR, STAGING_DIR, DIAGNOSIS_DIR = "model_base", "model_sleep_staging", "model_diagnosis"
DEMO_BUNDLE_NAME = "sleepfm-demo-untrained"
DEMO_BUNDLE_VERSION = "1"


if TYPE_CHECKING:
    from .site_heads import SiteHead


@dataclass(frozen=True)
class DemographicsEncoding:
    """How age and sex become the diagnosis head's two inputs.

    The public release does not document its encoding; its example inputs are a normalised age
    (0.0306...) and a 0/1 sex. The default is ``(age - 50) / 20`` and male 1, female 0; a study with
    unknown sex gets ``sex_unknown`` and one with unknown age gets age feature 0 (the centre). A site
    with a trained bundle sets these in ``bundle.json`` (``"demographics": {...}``, with a ``name``)
    to what the bundle was trained with. ``declared`` is False when ``bundle.json`` says nothing:
    the default is then only a guess, and every output says ``unconfirmed``.

    Parameters
    ----------
    age_center, age_scale : float
        The age feature is ``(age_years - age_center) / age_scale``.
    sex_male, sex_female, sex_unknown : float
        The sex feature for ``M``, ``F`` and anything else.
    name : str
        What results call this encoding (its formula when empty).
    declared : bool
        Whether the bundle declared it (False: the default was assumed).
    """

    age_center: float = 50.0
    age_scale: float = 20.0
    sex_male: float = 1.0
    sex_female: float = 0.0
    sex_unknown: float = 0.5
    name: str = ""
    declared: bool = True

    @property
    def label(self) -> str:
        """What outputs and messages call this encoding: its name (or its formula when unnamed), or
        ``unconfirmed`` when the bundle does not declare one."""
        if not self.declared:
            return "unconfirmed"
        return self.name or self.formula

    @property
    def formula(self) -> str:
        """The encoding written out, e.g. ``age (50-centred, /20); sex M=1 F=0 unknown=0.5``."""
        return (f"age ({self.age_center:g}-centred, /{self.age_scale:g}); sex M={self.sex_male:g} "
                f"F={self.sex_female:g} unknown={self.sex_unknown:g}")

    def encode(self, age_years: float | None, sex: str | None) -> tuple[float, float]:
        """The diagnosis head's two demographic inputs for one study.

        Parameters
        ----------
        age_years : float or None
            Age at the study; ``None`` (unknown) gives the age feature 0, the centre.
        sex : str or None
            Only its first letter, upper-cased, is read: ``M``, ``F``, else unknown.

        Returns
        -------
        tuple of float
            ``(age feature, sex feature)``.
        """
        age = 0.0 if age_years is None else (float(age_years) - self.age_center) / self.age_scale
        code = {"M": self.sex_male, "F": self.sex_female}.get((sex or "").upper()[:1], self.sex_unknown)
        return age, code


@dataclass
class ModelBundle:
    """Loaded networks (eval mode, CPU) with their identity and settings.

    Parameters
    ----------
    identity : BundleIdentity
        Name, version, validation status, path and checkpoint hashes.
    encoder : SleepEncoder
        The base model (tokenizer, channel pooling, temporal transformer).
    staging : StagingHead or None
        The sleep-staging head; ``None`` when the bundle has no ``model_sleep_staging/``.
    diagnosis : DiagnosisHead or None
        The diagnosis (Cox) head; ``None`` when the bundle has no ``model_diagnosis/``.
    outcomes : list of Outcome
        The diagnosis head's outputs, in index order (empty without a diagnosis head).
    demographics : DemographicsEncoding
        How age and sex become the diagnosis head's inputs.
    modalities : tuple of str
        The modalities, in the order the heads take them.
    site_heads : list of SiteHead
        A site's own heads, applied by the engine after the bundle's (``psg-gateway heads``).
    """

    identity: BundleIdentity
    encoder: SleepEncoder
    staging: StagingHead | None
    diagnosis: DiagnosisHead | None
    outcomes: list[Outcome]
    demographics: DemographicsEncoding
    modalities: tuple[str, ...] = ("BAS", "RESP", "EKG", "EMG")
    site_heads: list[SiteHead] = field(default_factory=list)  # the site's own heads (psg-gateway heads)

    def is_calibrated(self, phecode: str) -> bool:
        """Whether the bundle declares the outcome's log-hazard calibrated to a baseline.

        Parameters
        ----------
        phecode : str
            The outcome's phecode (as in ``hazards.csv``).

        Returns
        -------
        bool
            True only for the bundle's own outcomes listed in ``calibrated_outcomes``.
        """
        return phecode in self.identity.calibrated_outcomes

    def modules(self) -> list[nn.Module]:
        """The networks present: the encoder, then the staging and diagnosis heads when loaded.

        Returns
        -------
        list of torch.nn.Module
            The encoder first; the heads that are not ``None`` after it.
        """
        return [m for m in (self.encoder, self.staging, self.diagnosis) if m is not None]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: missing") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def _checkpoint_in(folder: Path) -> Path:
    for name in ("best.pt", "best.pth"):
        if (folder / name).is_file():
            return folder / name
    raise BundleError(f"{folder}: no checkpoint (best.pt or best.pth)")


def _encoder_config(cfg: dict, source: Path) -> EncoderConfig:
    try:
        return EncoderConfig(
            embed_dim=int(cfg["embed_dim"]), num_heads=int(cfg["num_heads"]),
            num_layers=int(cfg["num_layers"]), pooling_head=int(cfg["pooling_head"]),
            dropout=float(cfg.get("dropout", 0.0)), patch_size=int(cfg.get("patch_size", 640)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{source}: bad or missing encoder setting {exc}") from exc


def _head_config(cfg: dict, source: Path) -> HeadConfig:
    params = cfg.get("model_params")
    if not isinstance(params, dict):
        raise BundleError(f"{source}: missing 'model_params'")
    try:
        return HeadConfig(
            embed_dim=int(params["embed_dim"]), num_heads=int(params["num_heads"]),
            num_layers=int(params["num_layers"]), num_classes=int(params["num_classes"]),
            pooling_head=int(params["pooling_head"]), dropout=float(params.get("dropout", 0.0)),
            max_seq_length=int(params.get("max_seq_length") or 20000),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{source}: bad or missing model_params setting {exc}") from exc


def read_outcomes(path: Path | None = None) -> list[Outcome]:
    """Read ``label_mapping.csv`` (``label_idx,phecode,phenotype``); the packaged copy by default.

    Parameters
    ----------
    path : pathlib.Path, optional
        A label mapping file; ``None`` reads the copy packaged with ``inference`` (the release's 1065
        outcomes).

    Returns
    -------
    list of Outcome
        One per row, ``index`` from ``label_idx``.

    Raises
    ------
    BundleError
        Missing columns, a non-integer ``label_idx``, or indices that do not run 0..N-1 in order.
    """
    if path is None:
        text = resources.files("inference").joinpath("data/label_mapping.csv").read_text(encoding="utf-8")
        source = "packaged label_mapping.csv"
    else:
        text, source = Path(path).read_text(encoding="utf-8"), str(path)
    rows = list(csv.DictReader(text.splitlines()))
    try:
        outcomes = [Outcome(int(r["label_idx"]), r["phecode"].strip(), r["phenotype"].strip()) for r in rows]
    except (KeyError, ValueError) as exc:
        raise BundleError(f"{source}: expected columns label_idx, phecode, phenotype ({exc})") from exc
    if [o.index for o in outcomes] != list(range(len(outcomes))):
        raise BundleError(f"{source}: label_idx must run 0..N-1 in order")
    return outcomes


def _load(model: nn.Module, ckpt: Path) -> nn.Module:
    try:
        load_into(model, read_state_dict(ckpt), source=str(ckpt))
    except CheckpointError as exc:
        raise BundleError(str(exc)) from exc
    return model.eval()


def load_bundle(path: str | os.PathLike) -> ModelBundle:
    """Load a bundle folder; heads whose folder is absent are left out (``None``).

    Checkpoints are read with ``torch.load(weights_only=True)`` onto the CPU, in any of the release's
    formats (see :mod:`inference.checkpoints`), and loaded strictly. The identity is validated only
    when ``bundle.json`` says ``"validated": true``.

    Parameters
    ----------
    path : str or os.PathLike
        The bundle folder (``~`` is expanded); its layout is in this module's docstring.

    Returns
    -------
    ModelBundle
        The networks in eval mode on the CPU, with the bundle's identity, outcomes (from the
        folder's ``label_mapping.csv`` or the packaged copy) and demographics encoding. Its
        ``site_heads`` list is empty.

    Raises
    ------
    BundleError
        The folder or ``model_base/`` is missing, a ``config.json`` or ``bundle.json`` is invalid,
        a checkpoint is missing, unreadable or does not fit its network, the label mapping does
        not match the diagnosis head's outputs, or ``bundle.json``'s ``demographics`` is malformed.

    References
    ----------
    .. [1] The public SleepFM release: the ``sleepfm-clinical`` repository of the Zou group
       (Stanford) on GitHub, ``sleepfm/checkpoints/``.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise BundleError(f"{root}: model bundle folder not found")
    meta = _read_json(root / "bundle.json") if (root / "bundle.json").exists() else {}
    checkpoints: dict[str, str] = {}

    base_dir = root / BASE_DIR
    if not base_dir.is_dir():
        raise BundleError(f"{root}: not a model bundle (no {BASE_DIR}/ folder)")
    base_ckpt = _checkpoint_in(base_dir)
    encoder = _load(SleepEncoder(_encoder_config(_read_json(base_dir / "config.json"), base_dir)), base_ckpt)
    checkpoints["base"] = sha256_file(base_ckpt)

    staging = None
    if (root / STAGING_DIR).is_dir():
        ckpt = _checkpoint_in(root / STAGING_DIR)
        cfg = _head_config(_read_json(root / STAGING_DIR / "config.json"), root / STAGING_DIR)
        staging = _load(StagingHead(cfg), ckpt)
        checkpoints["staging"] = sha256_file(ckpt)

    diagnosis, outcomes = None, []
    if (root / DIAGNOSIS_DIR).is_dir():
        ckpt = _checkpoint_in(root / DIAGNOSIS_DIR)
        cfg = _head_config(_read_json(root / DIAGNOSIS_DIR / "config.json"), root / DIAGNOSIS_DIR)
        diagnosis = _load(DiagnosisHead(cfg), ckpt)
        checkpoints["diagnosis"] = sha256_file(ckpt)
        labels = root / "label_mapping.csv"
        outcomes = read_outcomes(labels if labels.is_file() else None)
        if len(outcomes) != cfg.num_classes:
            raise BundleError(
                f"{root}: label mapping has {len(outcomes)} outcomes, diagnosis head has {cfg.num_classes}"
            )

    demo_cfg = meta.get("demographics")
    try:
        if demo_cfg is None:
            demographics = DemographicsEncoding(declared=False)
        elif not isinstance(demo_cfg, dict) or "declared" in demo_cfg:
            raise TypeError("expected an object of age_center, age_scale, sex_male, sex_female, "
                            "sex_unknown and name")
        else:
            demographics = DemographicsEncoding(**demo_cfg)
    except TypeError as exc:
        raise BundleError(f"{root / 'bundle.json'}: demographics: {exc}") from exc
    calibrated = _calibrated_outcomes(meta.get("calibrated_outcomes"), outcomes, root)
    identity = BundleIdentity(
        name=str(meta.get("name", root.name)),
        version=str(meta.get("version", "unknown")),
        # Only a site's explicit statement makes a bundle validated; random or unknown weights never are.
        validated=bool(meta.get("validated", False)),
        path=str(root),
        checkpoints=checkpoints,
        calibrated_outcomes=calibrated,
    )
    return ModelBundle(identity, encoder, staging, diagnosis, outcomes, demographics)


def _calibrated_outcomes(declared: object, outcomes: list[Outcome], root: Path) -> tuple[str, ...]:
    """The phecodes ``bundle.json``'s ``calibrated_outcomes`` names (by phecode or phenotype)."""
    if declared is None:
        return ()
    where = root / "bundle.json"
    if not isinstance(declared, list) or not all(isinstance(x, str) for x in declared):
        raise BundleError(f"{where}: calibrated_outcomes: expected a list of phecodes or phenotype names")
    by_label = {o.phecode.lower(): o.phecode for o in outcomes} | {o.name.lower(): o.phecode for o in outcomes}
    unknown = [x for x in declared if x.strip().lower() not in by_label]
    if unknown:
        raise BundleError(f"{where}: calibrated_outcomes: not outcomes of the diagnosis head: {', '.join(unknown)}")
    return tuple(sorted({by_label[x.strip().lower()] for x in declared}))


def _release_configs() -> dict[str, dict]:
    """The hyper-parameters of the public release's three config.json files (the parts we use)."""
    base = {"model": "SetTransformer", "in_channels": 1, "embed_dim": 128, "num_heads": 8, "num_layers": 6,
            "pooling_head": 8, "dropout": 0.3, "sampling_duration": 5, "sampling_freq": 128,
            "patch_size": 640, "modality_types": ["BAS", "RESP", "EKG", "EMG"]}
    staging = {"model": "SleepEventLSTMClassifier", "max_channels": 4, "sampling_freq": 128,
               "model_params": {"embed_dim": 128, "num_heads": 4, "num_layers": 1, "num_classes": 5,
                                "pooling_head": 4, "dropout": 0.3, "max_seq_length": 8196}}
    diagnosis = {"model": "DiagnosisFinetuneFullLSTMCOXPHWithDemo", "max_channels": 4, "sampling_freq": 128,
                 "model_params": {"embed_dim": 128, "num_heads": 8, "num_layers": 2, "num_classes": 1065,
                                  "pooling_head": 8, "dropout": 0.3, "max_seq_length": 6480}}
    return {BASE_DIR: base, STAGING_DIR: staging, DIAGNOSIS_DIR: diagnosis}


def make_demo_bundle(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a deterministic, untrained bundle (``validated: false``) in the release's file formats.

    Lets the product run end to end where a site has no official weights yet; its outputs mean
    nothing clinically and every result says so. Nothing is downloaded.

    The networks have the release's hyper-parameters and torch's own initialisation under ``seed``
    (the caller's torch RNG state is left as it was); the checkpoints are written as the release
    writes them (``module.`` prefixes; the base model under ``"state_dict"``). The folder is written
    under a temporary name and renamed into place, replacing any folder already at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        Where the bundle folder goes; its parent is created if needed.
    seed : int, default 0
        Torch seed of the initialisation (the version becomes ``"1-seed<seed>"``).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    root = Path(path)
    configs = _release_configs()
    # torch's own initialisation under a fixed seed, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {
            BASE_DIR: SleepEncoder(_encoder_config(configs[BASE_DIR], root)),
            STAGING_DIR: StagingHead(_head_config(configs[STAGING_DIR], root)),
            DIAGNOSIS_DIR: DiagnosisHead(_head_config(configs[DIAGNOSIS_DIR], root)),
        }
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    for folder, model in models.items():
        # The release's own formats: DataParallel prefixes; base nested under "state_dict".
        state = {"module." + name: tensor.clone() for name, tensor in model.state_dict().items()}
        (tmp / folder).mkdir(exist_ok=True)
        if folder == BASE_DIR:
            torch.save({"state_dict": state}, tmp / folder / "best.pt")
        else:
            torch.save(state, tmp / folder / "best.pth")
        (tmp / folder / "config.json").write_text(json.dumps(configs[folder], indent=2) + "\n")
    (tmp / "label_mapping.csv").write_text(
        resources.files("inference").joinpath("data/label_mapping.csv").read_text(encoding="utf-8")
    )
    meta = {
        "name": DEMO_BUNDLE_NAME,
        "version": f"{DEMO_BUNDLE_VERSION}-seed{seed}",
        "validated": False,
        "description": "Untrained demo weights generated locally by psg-gateway. NOT FOR CLINICAL USE.",
        "demographics": {**{k: v for k, v in asdict(DemographicsEncoding()).items() if k != "declared"},
                         "name": "psg-gateway demo (age-50)/20"},
    }
    (tmp / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    # Publish atomically so a crash never leaves a half-written bundle under the final name.
    if root.exists():
        shutil.rmtree(root)
    try:
        tmp.rename(root)
    except OSError:
        # Another process published the same deterministic bundle first; keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "bundle.json").is_file():
            raise
    return root


def default_demo_bundle_dir() -> Path:
    """Where the generated demo bundle is kept: ``$XDG_CACHE_HOME/psg-gateway/bundles/...``.

    Returns
    -------
    pathlib.Path
        ``$XDG_CACHE_HOME`` (default ``~/.cache``) ``/psg-gateway/bundles/sleepfm-demo-untrained-v1``.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "psg-gateway" / "bundles" / f"{DEMO_BUNDLE_NAME}-v{DEMO_BUNDLE_VERSION}"


def ensure_demo_bundle(path: Path | None = None) -> Path:
    """Return the demo bundle folder, generating it first if it is not there.

    Parameters
    ----------
    path : pathlib.Path, optional
        The folder; :func:`default_demo_bundle_dir` when ``None``.

    Returns
    -------
    pathlib.Path
        The folder, holding a ``bundle.json`` (generated with :func:`make_demo_bundle`, seed 0, when
        it had none).
    """
    path = path or default_demo_bundle_dir()
    if not (path / "bundle.json").is_file():
        make_demo_bundle(path)
    return path
