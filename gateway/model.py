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
        from .heads.store import attach_site_heads

        attach_site_heads(bundle, model.site_heads, model.staging_head)
    return bundle
