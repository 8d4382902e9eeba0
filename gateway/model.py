"""The model a deployment runs: the configured bundle with the site's own heads attached."""

from __future__ import annotations

from pathlib import Path

from inference.bundle import ModelBundle, ensure_demo_bundle, load_bundle

from .config import ModelConfig

__all__ = ["bundle_dir", "load_model"]


def bundle_dir(model: ModelConfig) -> Path:
    """The bundle folder (the demo bundle, generated on first use, for ``bundle: demo``)."""
    return Path(model.bundle) if model.bundle != "demo" else ensure_demo_bundle()


def load_model(model: ModelConfig) -> ModelBundle:
    """Load the bundle and attach ``model.site_heads`` and ``model.staging_head``.

    Raises the loaders' errors (BundleError, CheckpointError, HeadError, OSError) for the caller to
    report as a startup problem.
    """
    bundle = load_bundle(bundle_dir(model))
    if model.site_heads or model.staging_head is not None:
        from .heads.store import HeadError, attach_site_heads

        try:
            attach_site_heads(bundle, model.site_heads, model.staging_head)
        except HeadError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # A head.json that matches its checksum but is not a head (written by hand, or by another
            # version): name the configured folders, as a HeadError does, rather than a bare KeyError.
            folders = ", ".join(str(p) for p in [*model.site_heads, model.staging_head] if p is not None)
            raise HeadError(f"{folders}: not a usable head ({type(exc).__name__}: {exc})") from None
    return bundle
