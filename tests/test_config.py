"""The daemon's configuration: validation with key paths, YAML and TOML, environment overrides,
``config check``, and that the example file and docs/configuration.md document every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.config import ConfigError, GatewayConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        path = f"{prefix}{name}"
        ann = field.annotation
        is_list = getattr(ann, "__origin__", None) is list
        inner = getattr(ann, "__args__", (None,))[0] if is_list else ann
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out += _keys(inner, path + ("[]." if is_list else "."))
        else:
            out.append(path)
    return out


def test_empty_file_is_the_embedded_default(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("")
    cfg = load_config(f, env={})
    assert cfg.database_url == f"sqlite:///{tmp_path / 'var' / 'psg-gateway.db'}"
    assert cfg.paths.spool == tmp_path / "var" / "spool" and cfg.dicom.host == "127.0.0.1"


def test_errors_name_every_key_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "dicom": {"port": 70000, "ae_title": "A" * 17, "allowed_callers": [{"ae_title": "OK"}, {"host": "1.2.3.4"}],
                  "tls": {"enabled": True}},
        "pipeline": {"workers": 0},
        "model": {"precision": "int4"},
        "drop_folders": [{"path": "in", "filename_pattern": "(unclosed"}],
        "databse": {"url": "x"},
    }))
    with pytest.raises(ConfigError) as exc:
        load_config(f, env={})
    text = "\n".join(exc.value.problems)
    for key in ("dicom.port:", "dicom.ae_title:", "dicom.allowed_callers[1].ae_title: Field required",
                "dicom.tls: Value error, cert_file and key_file are required", "pipeline.workers:",
                "model.precision:", "drop_folders[0].filename_pattern: Value error, not a valid regular expression",
                "databse: Extra inputs are not permitted"):
        assert key in text, key


def test_toml_and_env_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('site = "lab"\n[dicom]\nport = 4242\n[[drop_folders]]\npath = "in"\n')
    cfg = load_config(f, env={"PSG__DICOM__PORT": "5555", "PSG_DATABASE_URL": "postgresql://u@h/db",
                              "PSG__DROP_FOLDERS__0__STABLE_SECONDS": "3.5", "UNRELATED": "x"})
    assert cfg.site == "lab" and cfg.dicom.port == 5555
    assert cfg.database_url == "postgresql://u@h/db"
    assert cfg.drop_folders[0].path == tmp_path / "in" and cfg.drop_folders[0].stable_seconds == 3.5
    with pytest.raises(ConfigError, match="dicom.port"):
        load_config(f, env={"PSG__DICOM__PORT": "not-a-port"})


def test_relative_sqlite_url_is_relative_to_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("database:\n  url: sqlite:///state/g.db\n")
    assert load_config(f, env={}).database_url == f"sqlite:///{tmp_path / 'state' / 'g.db'}"


def test_broken_yaml_is_reported_with_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dicom: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, env={})


def test_config_check_cli(tmp_path, monkeypatch):
    monkeypatch.delenv("PSG_CONFIG", raising=False)
    good = tmp_path / "good.yaml"
    good.write_text("paths:\n  var_dir: v\n")
    r = runner.invoke(app, ["config", "check", str(good)])
    assert r.exit_code == 0 and "ok" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  port: -1\nmontage:\n  table: missing.yaml\nmodel:\n  bundle: nowhere\n")
    r = runner.invoke(app, ["config", "check", str(bad)])
    assert r.exit_code == 1 and "dicom.port" in r.output
    bad.write_text("montage:\n  table: missing.yaml\nmodel:\n  bundle: nowhere\n")
    r = runner.invoke(app, ["config", "check", str(bad)])
    assert r.exit_code == 1
    assert "montage.table:" in r.output and "model.bundle:" in r.output


def test_config_check_connect_does_not_create_the_database(tmp_path, monkeypatch):
    monkeypatch.delenv("PSG_CONFIG", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text("paths:\n  var_dir: v\n")
    r = runner.invoke(app, ["config", "check", "--connect", str(f)])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "v" / "psg-gateway.db").exists()  # checking did not create an empty database
    f.write_text("database:\n  url: postgresql+psycopg://nobody@127.0.0.1:1/none\n")
    r = runner.invoke(app, ["config", "check", "--connect", str(f)])
    assert r.exit_code == 1 and "database.url: the database does not answer" in r.output


def test_config_show_masks_the_password(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("database:\n  url: postgresql+psycopg://psg:s3cret@db/psg\n")
    r = runner.invoke(app, ["config", "show", "--config", str(f)])
    assert r.exit_code == 0 and "s3cret" not in r.output and "***" in r.output


def test_example_config_is_valid_and_documents_every_key():
    example = ROOT / "deploy" / "config.example.yaml"
    cfg = load_config(example, env={})
    assert isinstance(cfg, GatewayConfig)
    text = example.read_text()
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for key in _keys(GatewayConfig):
        leaf = key.split(".")[-1]
        assert re.search(rf"^\s*#?\s*-?\s*{leaf}:", text, re.MULTILINE), f"{key} missing from config.example.yaml"
        assert f"`{key}`" in reference, f"{key} missing from docs/configuration.md"


@pytest.mark.parametrize("name", ["demo.yaml", "config.compose.yaml"])
def test_shipped_configs_validate(name):
    load_config(ROOT / "deploy" / name, env={})
