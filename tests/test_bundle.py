"""Model bundles: the release layout, our bundle.json, the generated demo bundle."""

from __future__ import annotations

import json
import shutil

import pytest

from inference.bundle import (
    BundleError,
    DemographicsEncoding,
    ensure_demo_bundle,
    load_bundle,
    make_demo_bundle,
    read_outcomes,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_demo_bundle(tmp_path_factory.mktemp("b") / "demo")


def test_demo_bundle_is_in_release_layout_and_never_validated(demo_dir):
    for rel in ("model_base/best.pt", "model_base/config.json", "model_sleep_staging/best.pth",
                "model_diagnosis/best.pth", "label_mapping.csv", "bundle.json"):
        assert (demo_dir / rel).is_file(), rel
    bundle = load_bundle(demo_dir)
    assert bundle.identity.validated is False
    assert bundle.identity.name == "sleepfm-demo-untrained"
    assert len(bundle.outcomes) == 1065


def test_demo_bundle_is_deterministic(demo_dir, tmp_path):
    again = load_bundle(make_demo_bundle(tmp_path / "again"))
    assert again.identity.checkpoints == load_bundle(demo_dir).identity.checkpoints
    other = load_bundle(make_demo_bundle(tmp_path / "other", seed=1))
    assert other.identity.checkpoints["base"] != again.identity.checkpoints["base"]


def test_ensure_demo_bundle_generates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = ensure_demo_bundle()
    assert path.is_relative_to(tmp_path)
    stamp = (path / "model_base" / "best.pt").stat().st_mtime_ns
    assert ensure_demo_bundle() == path
    assert (path / "model_base" / "best.pt").stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left over


@pytest.mark.reference
def test_reference_bundle_loads_without_bundle_json(reference_dir):
    bundle = load_bundle(reference_dir / "sleepfm")
    assert bundle.identity.name == "sleepfm"
    assert bundle.identity.validated is False
    assert bundle.outcomes[410].name == "Myocardial infarction"


def test_heads_are_optional(demo_dir, tmp_path):
    base_only = tmp_path / "base_only"
    shutil.copytree(demo_dir, base_only)
    shutil.rmtree(base_only / "model_sleep_staging")
    shutil.rmtree(base_only / "model_diagnosis")
    bundle = load_bundle(base_only)
    assert bundle.staging is None and bundle.diagnosis is None
    assert set(bundle.identity.checkpoints) == {"base"}


def test_site_settings_in_bundle_json(demo_dir, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(demo_dir, site)
    meta = json.loads((site / "bundle.json").read_text())
    meta.update(name="site-model", validated=True, demographics={"age_center": 60, "age_scale": 10})
    (site / "bundle.json").write_text(json.dumps(meta))
    bundle = load_bundle(site)
    assert bundle.identity.validated is True and bundle.identity.name == "site-model"
    assert bundle.demographics.encode(70, "f") == (1.0, 0.0)


def test_calibrated_outcomes_are_declared_in_bundle_json_by_phecode_or_phenotype(demo_dir, tmp_path):
    assert load_bundle(demo_dir).identity.calibrated_outcomes == ()  # demo weights declare none
    site = tmp_path / "site"
    shutil.copytree(demo_dir, site)
    meta = json.loads((site / "bundle.json").read_text())
    meta["calibrated_outcomes"] = ["Heart Failure", "death", "DEATH"]
    (site / "bundle.json").write_text(json.dumps(meta))
    bundle = load_bundle(site)
    phecode = next(o.phecode for o in bundle.outcomes if o.name == "Heart Failure")
    assert bundle.identity.calibrated_outcomes == tuple(sorted({"death", phecode}))
    assert bundle.is_calibrated(phecode) and not bundle.is_calibrated("433")
    assert bundle.identity.as_dict()["calibrated_outcomes"] == bundle.identity.calibrated_outcomes
    for bad, message in ((["Not an outcome"], "not outcomes of the diagnosis head: Not an outcome"),
                         ("death", "expected a list of phecodes or phenotype names")):
        meta["calibrated_outcomes"] = bad
        (site / "bundle.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match=message):
            load_bundle(site)


def test_demographics_default_encoding():
    enc = DemographicsEncoding()
    assert enc.encode(50, "M") == (0.0, 1.0)
    assert enc.encode(30, "Female") == (-1.0, 0.0)
    assert enc.encode(None, None) == (0.0, 0.5)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: shutil.rmtree(d / "model_base"), "no model_base/ folder"),
        (lambda d: (d / "model_base" / "config.json").write_text("{nope"), "config.json: not valid JSON"),
        (lambda d: (d / "model_diagnosis" / "best.pth").unlink(), "no checkpoint"),
        (lambda d: (d / "label_mapping.csv").write_text("label_idx,phecode,phenotype\n0,8.0,x\n"),
         "label mapping has 1 outcomes, diagnosis head has 1065"),
        (lambda d: shutil.copy(d / "model_sleep_staging" / "best.pth", d / "model_diagnosis" / "best.pth"),
         "missing keys: demo_embedding"),
        (lambda d: (d / "bundle.json").write_text('{"demographics": {"age_mean": 3}}'), "demographics"),
    ],
)
def test_broken_bundles_give_clear_errors(demo_dir, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    damage(broken)
    with pytest.raises(BundleError, match=message):
        load_bundle(broken)


def test_missing_bundle_folder(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def test_packaged_label_mapping():
    outcomes = read_outcomes()
    assert len(outcomes) == 1065
    assert outcomes[447].name == "Atrial fibrillation and flutter"
