"""End to end: ``psg-gateway infer`` on EDF/BDF files writes the documented outputs."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gateway.cli.main import _study_key, app
from gateway.synthetic.night import write_synthetic_night
from inference.bundle import make_demo_bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    return make_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo")


@pytest.fixture(scope="module")
def short_night(tmp_path_factory):
    # 17 min 25 s: 209 tokens, so the end-aligned tail window is exercised.
    return write_synthetic_night(tmp_path_factory.mktemp("night") / "night.edf", hours=1045 / 3600, seed=3)


def _infer(*args):
    result = runner.invoke(app, ["infer", *map(str, args)])
    return result


def test_infer_writes_every_output_with_documented_shapes(short_night, demo_bundle, tmp_path):
    out = tmp_path / "out"
    result = _infer(short_night, "--bundle", demo_bundle, "--out", out)
    assert result.exit_code == 0, result.output
    tokens = 1045 // 5
    for modality, n in (("BAS", 8), ("RESP", 6), ("EKG", 1), ("EMG", 3)):
        emb = np.load(out / "embeddings" / f"{modality}.npy")
        assert emb.shape == (tokens, 128) and emb.dtype == np.float32
        assert np.load(out / "embeddings" / f"{modality}_5min.npy").shape == (4, 128)
    night = np.load(out / "night.npy")
    assert night.shape == (512,) and night.dtype == np.float32 and np.isfinite(night).all()
    with open(out / "hypnogram.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == tokens // 6
    assert {r["stage"] for r in rows} <= {"W", "N1", "N2", "N3", "REM"}
    assert float(rows[1]["onset_s"]) == 30.0
    p = np.array([[float(r[f"p_{s}"]) for s in ("W", "N1", "N2", "N3", "REM")] for r in rows])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-3)
    with open(out / "hazards.csv") as fh:
        hazards = list(csv.DictReader(fh))
    assert len(hazards) == 1065
    assert hazards[410]["phenotype"] == "Myocardial infarction"
    assert float(hazards[0]["hazard_ratio"]) == pytest.approx(np.exp(float(hazards[0]["log_hazard"])), rel=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validated"] is False
    assert "NOT FOR CLINICAL USE" in metrics["notice"]
    assert metrics["model_bundle"]["name"] == "sleepfm-demo-untrained"
    assert metrics["montage"]["channels"]["EKG"] == ["ECG II"]
    assert metrics["missing_modalities"] == []
    assert metrics["sleep"]["tib_min"] == pytest.approx(len(rows) / 2)
    assert metrics["demographics_used"]["sex"] in ("M", "F")
    # 209 tokens: three whole 5-minute windows (the release's) and a 29-token tail, staged on its own
    assert metrics["windows"] == {"whole_windows": 3, "tail_start_token": 180, "tail_tokens": 29,
                                  "tail_window_index": 3}
    assert metrics["diagnosis_input"] == {"tokens_used": 180, "cut": False}
    assert metrics["demographics_encoding"] == "psg-gateway demo (age-50)/20"
    assert [r["tail"] for r in rows] == ["0"] * 30 + ["1"] * 4
    bas = np.load(out / "embeddings" / "BAS_5min.npy")
    np.testing.assert_allclose(night[:128], bas[:3].mean(axis=0), rtol=1e-6)


def test_logs_carry_no_phi(short_night, demo_bundle, tmp_path):
    from gateway.readers.edf import read_edf

    recording = read_edf(short_night)
    result = _infer(short_night, "--bundle", demo_bundle, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "study.inferred" in text
    assert recording.identifiers.patient_id and recording.identifiers.patient_id not in text
    birth = recording.demographics.birth_date
    assert birth is not None and birth.isoformat() not in text and birth.strftime("%d-%b-%Y") not in text


@pytest.mark.reference
@pytest.mark.parametrize("name", ["short_psg.edf", "short_psg.bdf"])
def test_real_sleep_edf_excerpt_with_missing_ekg(reference_dir, demo_bundle, tmp_path, name):
    out = tmp_path / "out"
    result = _infer(reference_dir / "real" / name, "--bundle", demo_bundle, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["missing_modalities"] == ["EKG"]
    assert metrics["tokens"] == 60
    assert sorted(metrics["montage"]["ignored"]) == ["Event marker", "Temp rectal"]
    assert len(metrics["montage"]["channels"]["BAS"]) == 3
    night = np.load(out / "night.npy")
    assert np.isnan(night[256:384]).all() and np.isfinite(night[:256]).all()
    assert not (out / "embeddings" / "EKG.npy").exists()


def test_unreadable_file_is_a_clear_error(tmp_path, demo_bundle):
    bad = tmp_path / "broken.edf"
    bad.write_bytes(b"0       " + b"x" * 300)
    result = _infer(bad, "--bundle", demo_bundle, "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "broken.edf" in result.output
    assert not (tmp_path / "o").exists()


def test_recording_without_mappable_channels_is_a_clear_error(tmp_path, demo_bundle):
    night = write_synthetic_night(tmp_path / "odd.edf", hours=0.05, seed=1)
    table = tmp_path / "empty.yaml"
    table.write_text("name: empty\nmodalities:\n  BAS: []\n  RESP: []\n  EKG: []\n  EMG: []\n")
    result = _infer(night, "--bundle", demo_bundle, "--montage", table, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "no channel maps to a modality" in result.output


def test_missing_bundle_is_a_clear_error(short_night, tmp_path):
    result = _infer(short_night, "--bundle", tmp_path / "nope", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "model bundle folder not found" in result.output


def test_bundle_commands(tmp_path):
    result = runner.invoke(app, ["bundle", "make-demo", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["bundle", "info", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["validated"] is False and info["outcomes"] == 1065
    assert info["heads"] == {"staging": True, "diagnosis": True}
    assert info["demographics_encoding"] == "psg-gateway demo (age-50)/20"


@pytest.mark.reference
def test_bundle_info_says_the_release_layout_has_an_unconfirmed_encoding(reference_dir):
    result = runner.invoke(app, ["bundle", "info", str(reference_dir / "sleepfm")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["demographics_encoding"] == "unconfirmed"


def test_a_malformed_demographics_declaration_is_refused(tmp_path):
    make_demo_bundle(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    meta["demographics"] = {"age_center": 50, "declared": True}
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["bundle", "info", str(tmp_path / "b")])
    assert result.exit_code == 2 and "demographics" in result.output


def test_montage_map_command(short_night):
    ok = runner.invoke(app, ["montage", "map", str(short_night)])
    assert ok.exit_code == 0, ok.output
    assert "E2-M1" in ok.output and "BAS" in ok.output
    unknown = runner.invoke(app, ["montage", "map", "C3-M2", "Mystery 7"])
    assert unknown.exit_code == 1
    assert "unmapped" in unknown.output


def test_outputs_are_private_under_the_usual_umask(short_night, demo_bundle, tmp_path):
    """A person's embeddings and metrics: 0600 in 0700 folders even under umask 022 (issue 15), and the
    caller's umask is left as it was (the command restores it when it ends)."""
    out = tmp_path / "perm"
    mask = os.umask(0o022)
    try:
        result = _infer(short_night, "--bundle", demo_bundle, "--out", out)
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(mask)
    assert result.exit_code == 0, result.output
    for path in [out / "night.npy", out / "metrics.json", out / "embeddings" / "BAS.npy"]:
        assert path.stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o700 and (out / "embeddings").stat().st_mode & 0o777 == 0o700
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


def test_infer_on_a_dicom_study_folder(demo_bundle, tmp_path):
    from gateway.synthetic.dicom_study import write_psg_study

    write_psg_study(tmp_path / "study", hours=0.1, seed=2)
    out = tmp_path / "out"
    result = _infer(tmp_path / "study", "--bundle", demo_bundle, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["modalities"] == ["BAS", "RESP", "EKG", "EMG"]
    assert metrics["tokens"] == 72
    assert metrics["montage"]["channels"]["EKG"] == ["ECG II"]
    assert np.load(out / "embeddings" / "RESP.npy").shape == (72, 128)


@pytest.mark.reference
def test_scored_hypnogram_gives_agreement_and_rules_are_recorded(reference_dir, demo_bundle, tmp_path):
    out = tmp_path / "out"
    real = reference_dir / "real"
    result = _infer(real / "short_psg.edf", "--bundle", demo_bundle, "--out", out,
                    "--hypnogram", real / "SC4001EC-Hypnogram.edf")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    scoring = metrics["staging_agreement"]
    # 300 s = 10 epochs, all scored W in the real hypnogram's first 30 minutes.
    assert scoring["epochs"] == 10
    assert sum(scoring["confusion"]["W"].values()) == 10
    assert 0.0 <= scoring["accuracy"] <= 1.0
    mapping = {m["label"]: m for m in metrics["montage"]["mapping"]}
    assert mapping["EEG Fpz-Cz"]["modality"] == "BAS" and mapping["EEG Fpz-Cz"]["rule"]
    assert mapping["Temp rectal"]["status"] == "excluded"
    assert metrics["recording"]["format"] == "EDF"
    assert metrics["recording"]["warnings"] == []


def test_sidecar_identifiers_reach_the_study_not_the_logs(tmp_path, demo_bundle):
    night = write_synthetic_night(tmp_path / "n.edf", hours=0.05, seed=5)
    (tmp_path / "n.json").write_text(json.dumps({"patient_id": "MRN-778899", "sex": "F", "age_years": 71}))
    out = tmp_path / "out"
    result = _infer(night, "--bundle", demo_bundle, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["demographics_used"]["sex"] == "F"
    assert metrics["demographics_used"]["age_years"] == 71
    assert "MRN-778899" not in result.output


def test_failure_log_names_no_path(tmp_path, demo_bundle):
    folder = tmp_path / "Doe_Jane"
    folder.mkdir()
    bad = folder / "Doe_Jane_night.edf"
    bad.write_bytes(b"0       " + b"x" * 300)
    (folder / "Doe_Jane_night.json").write_text("{not json")
    result = _infer(bad, "--bundle", demo_bundle, "--out", tmp_path / "o")
    assert result.exit_code == 2
    log_lines = [line for line in result.output.splitlines() if "study.failed" in line]
    assert log_lines and not any("Doe_Jane" in line for line in log_lines)


def _one_error_line(result) -> str:
    """The refusal as the user sees it: exit code 2, exactly one ``error:`` line, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("kind", ["edf", "edf+d", "dicom"])
def test_recording_shorter_than_one_epoch_is_refused_in_one_line(tmp_path, demo_bundle, kind):
    """12 s: no 30-s epoch to stage. It used to fail with an internal numpy reshape error. An EDF+D file
    counts by its span (records at 0, 1 and 11 s: 12 s)."""
    from test_edf_discontinuous import Sig, edf_bytes, record_tals

    from gateway.synthetic.dicom_study import write_psg_study

    if kind == "edf":
        src = write_synthetic_night(tmp_path / "short.edf", hours=12 / 3600, seed=1)
    elif kind == "edf+d":
        noise = np.random.default_rng(0).integers(-1000, 1000, (3, 256))
        src = tmp_path / "short.edf"
        src.write_bytes(edf_bytes([Sig("C3-M2", 256), Sig("ECG II", 256)], [noise, noise],
                                  tals=[record_tals(t) for t in (0.0, 1.0, 11.0)], reserved="EDF+D"))
    else:
        write_psg_study(tmp_path / "study", hours=12 / 3600, seed=1)
        src = tmp_path / "study"
    result = _infer(src, "--bundle", demo_bundle, "--out", tmp_path / "o")
    assert _one_error_line(result) == "error: recording shorter than one 30-s epoch (12.0 s)"
    assert not (tmp_path / "o").exists()
    failed = [line for line in result.output.splitlines() if "study.failed" in line]
    assert failed and json.loads(failed[0])["error"] == "InputError"


def test_zero_record_edf_is_refused_in_one_line(tmp_path, demo_bundle):
    """A header with 0 data records used to give "internal error: ValueError: duration_s must be ..."."""
    night = write_synthetic_night(tmp_path / "n.edf", hours=0.01, seed=1)
    data = bytearray(night.read_bytes())
    data[236:244] = b"0".ljust(8)
    empty = tmp_path / "empty.edf"
    empty.write_bytes(bytes(data[: int(data[184:192])]))
    line = _one_error_line(_infer(empty, "--bundle", demo_bundle, "--out", tmp_path / "o"))
    assert line.endswith("empty.edf: 0 data records in the header: the recording holds no samples"), line


def test_recording_between_one_epoch_and_one_window_is_processed(tmp_path, demo_bundle):
    """45 s: shorter than the release's 5-minute window. Encoded as one short window: one scored epoch
    and hazards from that window, metrics.json saying no whole window was seen."""
    night = write_synthetic_night(tmp_path / "n.edf", hours=45 / 3600, seed=2)
    out = tmp_path / "out"
    result = _infer(night, "--bundle", demo_bundle, "--out", out)
    assert result.exit_code == 0, result.output
    with open(out / "hypnogram.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["windows"]["whole_windows"] == 0 and metrics["tokens"] == 9
    with open(out / "hazards.csv") as fh:
        assert all(np.isfinite(float(r["log_hazard"])) for r in csv.DictReader(fh))


@pytest.mark.e2e  # the installed entry point's code in a process of its own, inference on a night
def test_infer_as_a_process_skips_the_teardown_and_loses_nothing(short_night, demo_bundle, tmp_path):
    """The console entry point ends a finished ``infer`` without the interpreter's teardown (~0.5 s of
    torch and scipy): atexit hooks do not run, yet every output, the last log line and the summary are
    out, and the exit code is 0. A failing ``infer`` keeps the normal exit and its code."""
    marker = tmp_path / "teardown-ran"
    code = ("import atexit, pathlib, sys; "
            f"atexit.register(pathlib.Path({str(marker)!r}).touch); "
            "sys.argv[0] = 'psg-gateway'; from gateway.cli.main import main; main()")
    root = Path(__file__).resolve().parents[1]

    def run(*args):
        return subprocess.run([sys.executable, "-c", code, "infer", *map(str, args)], cwd=root,
                              capture_output=True, text=True, timeout=600, check=False)

    out = tmp_path / "out"
    done = run(short_night, "--bundle", demo_bundle, "--out", out, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert '"event": "study.inferred"' in done.stderr.splitlines()[-1]
    assert "outputs" in done.stdout and "sleep" in done.stdout  # the summary table
    assert np.load(out / "night.npy").shape == (512,)
    assert json.loads((out / "metrics.json").read_text())["validated"] is False
    with open(out / "hazards.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1065

    failed = run(tmp_path / "missing.edf", "--bundle", demo_bundle, "--out", tmp_path / "none")
    assert failed.returncode == 2 and "error:" in failed.stderr
    assert marker.exists()


def test_the_console_script_is_the_entry_point_that_exits_early():
    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["psg-gateway"] == "gateway.cli.main:main"


def test_study_key_is_the_content_hash(tmp_path: Path):
    # infer hashes the file in 32-MB reads (beside the read); the key is still the SHA-256 of the content
    data = os.urandom(3 << 20) + b"tail"
    one = tmp_path / "night.edf"
    one.write_bytes(data)
    assert _study_key(one) == hashlib.sha256(data).hexdigest()[:16]
    empty = tmp_path / "empty.edf"
    empty.write_bytes(b"")
    assert _study_key(empty) == hashlib.sha256(b"").hexdigest()[:16]
    folder = tmp_path / "study"
    (folder / "series").mkdir(parents=True)
    (folder / "b.dcm").write_bytes(b"bb")
    (folder / "series" / "a.dcm").write_bytes(b"a")
    want = hashlib.sha256(b"b.dcm\0bb" + b"series/a.dcm\0a").hexdigest()[:16]
    assert _study_key(folder) == want
