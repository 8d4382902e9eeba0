"""``psg-gateway heads fit|evaluate|show`` end to end on synthetic exports with a planted signal, and a
deployed head in the daemon's pipeline (results, flags and the ORU name the head and its checksum)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli.main import app
from inference.bundle import ensure_demo_bundle, load_bundle

pytestmark = pytest.mark.slow

runner = CliRunner()


def _demo_hash() -> str:
    return load_bundle(ensure_demo_bundle()).identity.model_hash


def write_export(folder: Path, night: np.ndarray, patients: list[str] | None, *, age=None, sex=None,
                 model_hash=None, tokens: list[dict[str, np.ndarray]] | None = None) -> list[str]:
    """An export folder as ``batch --export --export-identifiers`` writes it (the columns heads use);
    ``patients`` None: as ``batch --export`` writes it, without a patient_id column."""
    n = len(night)
    keys = [f"st-{i:012x}" for i in range(n)]
    for i, key in enumerate(keys):
        d = folder / "embeddings" / key
        d.mkdir(parents=True)
        np.save(d / "night.npy", night[i].astype(np.float32))
        for m, arr in (tokens[i] if tokens else {}).items():
            np.save(d / f"{m}_tokens.npy", arr.astype(np.float32))
    pq.write_table(pa.table({
        "study_key": keys, **({"patient_id": patients} if patients is not None else {}),
        "age_years": list(age) if age is not None else [None] * n,
        "sex": list(sex) if sex is not None else [None] * n,
        "model_name": ["sleepfm-demo-untrained"] * n, "model_hash": [model_hash or _demo_hash()] * n,
        "model_validated": [False] * n,
    }), folder / "studies.parquet")
    return keys


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cox_data(tmp_path_factory):
    """600 studies of 400 patients; times from a Cox model on two planted directions of the embedding.

    Like real embeddings, the night vectors are low-rank (16 latent factors, plus noise); the two
    factors that carry the risk load on the BAS and the EKG columns only, so the modality ablation
    has a right answer."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("cox")
    n_pat = 400
    patient_of = np.concatenate([np.arange(n_pat), rng.integers(0, n_pat, 200)])
    latent = rng.normal(size=(len(patient_of), 16))
    loading = rng.normal(size=(16, 512)) / 4
    loading[0, 128:], loading[1, :256], loading[1, 384:] = 0, 0, 0  # factor 0 in BAS, factor 1 in EKG
    night = latent @ loading + 0.3 * rng.normal(size=(len(patient_of), 512))
    night[:20, 128:256] = np.nan  # some nights without RESP
    lp = 0.9 * latent[:, 0] - 0.7 * latent[:, 1]
    t_event = rng.exponential(1.0 / np.exp(lp)) * 3.0
    t_cens = rng.uniform(0.5, 8.0, len(lp))
    time, event = np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)
    sex = np.where(rng.random(len(lp)) < 0.5, "F", "M")
    age = rng.uniform(25, 80, len(lp))
    keys = write_export(root / "export", night, [f"P{p:04d}" for p in patient_of], age=age, sex=sex)
    labels = _write_csv(root / "labels.csv", ["study_key", "label", "time_to_event", "event"],
                        [[k, "HF-site", f"{t:.4f}", e] for k, t, e in zip(keys, time, event)])
    true_c = _harrell(time, event, lp)
    return root, labels, true_c


def _harrell(time, event, risk) -> float:
    from lifelines.utils import concordance_index

    return concordance_index(time, -risk, event)


def test_fit_cox_evaluate_and_show(cox_data, tmp_path):
    root, labels, true_c = cox_data
    head = tmp_path / "hf-head"
    r = runner.invoke(app, ["heads", "fit", "cox", "--export", str(root / "export"), "--labels", str(labels),
                            "--out", str(head), "--demographics"])
    assert r.exit_code == 0, r.output
    assert "fitted on demo (untrained) weights" in r.output
    doc = json.loads((head / "head.json").read_text())
    manifest = json.loads((head / "manifest.json").read_text())
    assert doc["kind"] == "cox" and doc["demo_weights"] is True and doc["base_model"]["hash"] == _demo_hash()
    assert manifest["checksum"] == (head / "head.sha256").read_text().split()[0]
    assert manifest["data"]["labels_sha256"] and manifest["libraries"]["numpy"]
    test_keys = set(manifest["split"]["HF-site"]["test_study_keys"])
    # the split is by patient: no patient on both sides
    table = pq.read_table(root / "export" / "studies.parquet").to_pydict()
    side = {}
    for key, pid in zip(table["study_key"], table["patient_id"]):
        side.setdefault(pid, set()).add(key in test_keys)
    assert all(len(s) == 1 for s in side.values())
    outcome = doc["outcomes"][0]
    assert outcome["test"]["harrell_c"] > 0.65 and abs(outcome["test"]["harrell_c"] - true_c) < 0.05

    report = tmp_path / "report"
    r = runner.invoke(app, ["heads", "evaluate", str(head), "--export", str(root / "export"), "--labels",
                            str(labels), "--report", str(report), "--bootstrap", "40"])
    assert r.exit_code == 0, r.output
    ev = json.loads((report / "evaluation.json").read_text())
    part = ev["cox"][0]
    assert ev["data"]["n_studies"] == len(test_keys) and part["n"] == len(test_keys)
    c, (lo, hi) = part["harrell_c"]["value"], part["harrell_c"]["ci"]
    assert lo <= c <= hi and c > 0.6
    assert part["uno_c"]["value"] > 0.6 and len(part["td_auc"]) == 3
    assert {s["group"] for s in part["subgroups"]} == {"sex", "age"}
    ablation = {a["modality"]: a["delta"] for a in part["ablation"]}
    # the planted directions are in BAS (column 3) and EKG (column 300): masking them costs C, RESP does not
    assert ablation["BAS"] < -0.03 and ablation["EKG"] < -0.03 and abs(ablation["RESP"]) < 0.02
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html and "NOT FOR CLINICAL USE" in html

    r = runner.invoke(app, ["heads", "show", str(head)])
    assert r.exit_code == 0 and json.loads(r.output)["outcomes"][0]["label"] == "HF-site"


def test_bad_labels_list_every_offending_row(cox_data, tmp_path):
    root, _labels, _ = cox_data
    bad = _write_csv(tmp_path / "bad.csv", ["study_key", "label", "time_to_event", "event"], [
        ["st-000000000000", "HF", "1.5", "1"],
        ["st-nope", "HF", "1.0", "0"],
        ["st-000000000001", "HF", "-2", "1"],
        ["st-000000000002", "HF", "3", "yes"],
    ])
    r = runner.invoke(app, ["heads", "fit", "cox", "--export", str(root / "export"), "--labels", str(bad),
                            "--out", str(tmp_path / "h")])
    assert r.exit_code == 2
    assert "row 3: unknown study_key 'st-nope'" in r.output
    assert "row 4: time_to_event -2 is negative" in r.output
    assert "row 5: event 'yes' must be 0 or 1" in r.output
    assert not (tmp_path / "h").exists()
    missing = _write_csv(tmp_path / "missing.csv", ["study_key", "time"], [["st-000000000000", "1"]])
    r = runner.invoke(app, ["heads", "fit", "cox", "--export", str(root / "export"), "--labels", str(missing),
                            "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and "missing column 'label'" in r.output and "missing column 'event'" in r.output


def test_fit_apnea_head(tmp_path):
    rng = np.random.default_rng(3)
    n = 500
    night = rng.normal(size=(n, 512))
    u = rng.normal(size=512)
    u /= np.linalg.norm(u)
    ahi = np.exp(2.0 + 1.3 * (night @ u) + rng.normal(scale=0.3, size=n)) - 1
    ahi = np.clip(ahi, 0, None)
    keys = write_export(tmp_path / "export", night, [f"P{i // 2}" for i in range(n)])
    ahi_csv = _write_csv(tmp_path / "ahi.csv", ["study_key", "ahi"], [[k, f"{a:.2f}"] for k, a in zip(keys, ahi)])
    head = tmp_path / "apnea"
    r = runner.invoke(app, ["heads", "fit", "apnea", "--export", str(tmp_path / "export"), "--ahi", str(ahi_csv),
                            "--out", str(head)])
    assert r.exit_code == 0, r.output
    doc = json.loads((head / "head.json").read_text())
    assert doc["token_statistics"] is False  # no tokens exported
    assert doc["test"]["presence"]["auroc"] > 0.85
    r = runner.invoke(app, ["heads", "evaluate", str(head), "--export", str(tmp_path / "export"), "--ahi",
                            str(ahi_csv), "--report", str(tmp_path / "rep"), "--bootstrap", "30"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "rep" / "evaluation.json").read_text())
    assert ev["apnea"]["presence"]["auroc"]["value"] > 0.85
    assert np.sum(ev["apnea"]["severity"]["confusion_matrix"]) == ev["apnea"]["n"]


def test_head_fitted_on_another_model_is_refused(tmp_path):
    other = tmp_path / "export"
    night = np.random.default_rng(1).normal(size=(60, 512))
    keys = write_export(other, night, [f"Q{i}" for i in range(60)], model_hash="0" * 64)
    rows = [[k, "X", "1.0", i % 2] for i, k in enumerate(keys)]
    lab = _write_csv(tmp_path / "l.csv", ["study_key", "label", "time_to_event", "event"], rows)
    head = tmp_path / "h"
    assert runner.invoke(app, ["heads", "fit", "cox", "--export", str(other), "--labels", str(lab),
                               "--out", str(head), "--test-fraction", "0"]).exit_code == 0
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"paths": {"var_dir": str(tmp_path / "var")},
                                   "model": {"site_heads": [str(head)]}}))
    from gateway.config import load_config
    from gateway.heads.store import HeadError
    from gateway.model import load_model

    with pytest.raises(HeadError, match="fitted on the embeddings of model 000000000000"):
        load_model(load_config(cfg).model)
    # and a head whose head.json was edited is refused by its checksum
    doc = json.loads((head / "head.json").read_text())
    doc["outcomes"][0]["label"] = "Y"
    (head / "head.json").write_text(json.dumps(doc))
    with pytest.raises(HeadError, match="does not match head.sha256"):
        load_model(load_config(cfg).model)


def test_deployed_cox_head_flags_and_names_itself_in_the_oru(cox_data, tmp_path, db_url):
    """A head fitted on the demo model's export, deployed by configuration: a batch study gets the
    head's outcome in hazards.csv, the flag policy flags it by label and percentile (the site reference
    keeps a site head's outcome per head version), and the held ORU's OBX-17 names the head and its
    checksum. An absolute threshold on a site head is refused: no bundle declares its baseline."""
    import hl7

    from gateway.batch.runner import BatchError, BatchOptions, BatchRunner
    from gateway.config import load_config
    from gateway.store.models import MessageState
    from gateway.synthetic.night import write_synthetic_night

    root, labels, _ = cox_data
    head = tmp_path / "hf-head"
    assert runner.invoke(app, ["heads", "fit", "cox", "--export", str(root / "export"), "--labels", str(labels),
                               "--out", str(head)]).exit_code == 0
    checksum = (head / "head.sha256").read_text().split()[0]
    archive = tmp_path / "archive"
    write_synthetic_night(archive / "n.edf", hours=0.1, seed=2)
    cfg_path = tmp_path / "g.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "paths": {"var_dir": str(tmp_path / "var")}, "database": {"url": db_url},
        "model": {"site_heads": [str(head)]},
        "flags": {"outcomes": [{"label": "HF-site", "code": "PSG-HFS", "percentile": 50}],
                  "percentile_min_reference": 1, "send_mode": "flagged_only"},
        "hl7": {"enabled": True, "host": "127.0.0.1", "port": 9},
    }))
    absolute = yaml.safe_load(cfg_path.read_text())
    absolute["flags"]["outcomes"][0].update(log_hazard=-1e9, percentile=None)
    (tmp_path / "absolute.yaml").write_text(yaml.safe_dump(absolute))
    refused = BatchRunner(load_config(tmp_path / "absolute.yaml"), BatchOptions(archives=[archive], progress=False))
    with pytest.raises(BatchError, match="'HF-site': log_hazard needs an outcome the model bundle declares"):
        refused.preflight()
    refused.close()

    batch = BatchRunner(load_config(cfg_path), BatchOptions(archives=[archive], progress=False))
    try:
        batch.preflight()
        # One earlier study in the reference, far below anything the head gives: this one is above it.
        earlier = batch.repo.register_file(source="folder:/in", path=str(tmp_path / "earlier.edf"), name="e.edf",
                                           sha256="0" * 64, filename_pattern=None, actor="t").study
        batch.repo.add_reference(earlier.id, batch.bundle.identity.model_hash, {f"HF-site@{checksum[:12]}": -1e9})
        outcome = batch.run()
        assert outcome.summary["processed_by_state"] == {"HELD": 1}
        study = batch.repo.list(limit=1)[0]
        with open(Path(study.output_path) / "hazards.csv", newline="") as fh:
            hazards = list(csv.DictReader(fh))
        site = [h for h in hazards if h["head"]]
        assert [h["phecode"] for h in site] == ["HF-site"] and site[0]["head"] == f"hf-head@{checksum[:12]}"
        assert len(hazards) > 1  # the diagnosis head's outcomes are still there
        metrics = json.loads((Path(study.output_path) / "metrics.json").read_text())
        assert metrics["model_bundle"]["site_heads"] == {"hf-head": checksum}
        msg = batch.repo.messages(study_id=study.id)[0]
        assert msg.state == MessageState.HELD
        parsed = hl7.parse(msg.message.replace("\n", "\r"))
        obx17 = {str(seg[17]) for seg in parsed.segments("OBX") if len(seg) > 17 and str(seg[17])}
        assert any(f"hf-head@{checksum[:12]}" in v for v in obx17), obx17
        assert not any(str(seg[3][0][0]).endswith("-HR") for seg in parsed.segments("OBX"))  # no baseline
        assert study.flags["flags"][0]["percentile"] == 100.0
    finally:
        batch.close()


def test_staging_refit_from_the_cli(tmp_path):
    """Tokens where the stage is linearly decodable: the re-fitted head beats the released (demo) one."""
    rng = np.random.default_rng(5)
    dirs = rng.normal(size=(5, 128))
    tokens, rows = [], []
    n_nights = 16
    for i in range(n_nights):
        epochs = 60  # 30 minutes
        stages = np.repeat(rng.integers(0, 5, epochs // 6), 6)[:epochs]
        tok = {m: rng.normal(scale=0.3, size=(epochs * 6, 128)) for m in ("BAS", "RESP")}
        tok["BAS"] += np.repeat(dirs[stages], 6, axis=0) * 2.0
        tokens.append(tok)
        rows += [[f"st-{i:012x}", e, ("W", "N1", "N2", "N3", "REM")[s]] for e, s in enumerate(stages)]
    write_export(tmp_path / "export", rng.normal(size=(n_nights, 512)), [f"P{i // 2}" for i in range(n_nights)],
                 tokens=tokens)
    stages_csv = _write_csv(tmp_path / "stages.csv", ["study_key", "epoch", "stage"], rows)
    head = tmp_path / "staging"
    r = runner.invoke(app, ["heads", "fit", "staging", "--export", str(tmp_path / "export"), "--stages",
                            str(stages_csv), "--out", str(head), "--epochs", "2", "--lr", "1e-3",
                            "--test-fraction", "0.25"])
    assert r.exit_code == 0, r.output
    doc = json.loads((head / "head.json").read_text())
    before, after = doc["report"]["before"], doc["report"]["after"]
    assert after["cohen_kappa"] > before["cohen_kappa"] + 0.3
    assert (head / "staging.pt").is_file() and "staging.pt" in doc["files"]
    # deployable: the configured bundle takes the re-fitted weights
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"paths": {"var_dir": str(tmp_path / "var")},
                                   "model": {"staging_head": str(head)}}))
    from gateway.config import load_config
    from gateway.model import load_model

    bundle = load_model(load_config(cfg).model)
    assert bundle.identity.site_heads == {"staging:staging": (head / "head.sha256").read_text().split()[0]}


# ---- small samples, undefined metrics, exports that changed or lack patient ids -------------------------------
NO_PATIENTS = "splits and bootstrap resample studies, not patients: a patient with several nights can be in " \
              "training and held-out"


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning:")]


def _tiny_apnea(root: Path, patients: bool = True) -> tuple[Path, Path, list[str], np.ndarray]:
    """30 studies of 30 patients whose held-out studies (seed 0, 20 %) all have AHI >= 5: the held-out
    presence AUROC is undefined. The training side has both classes and four severities."""
    from gateway.heads.fit import split

    n = 30
    rng = np.random.default_rng(11)
    pids = [f"P{i:02d}" for i in range(n)]
    _train, test = split(np.asarray(pids, dtype=object), 0.2, 0)
    ahi = np.array([(1.0, 2.0, 8.0, 20.0, 40.0)[i % 5] for i in range(n)])
    ahi[test] = 22.0
    keys = write_export(root / "export", rng.normal(size=(n, 512)), pids if patients else None)
    ahi_csv = _write_csv(root / "ahi.csv", ["study_key", "ahi"], [[k, a] for k, a in zip(keys, ahi)])
    return root / "export", ahi_csv, keys, test


def test_fit_apnea_with_a_one_class_held_out_set_says_n_a_and_warns(tmp_path):
    """It used to write the head and then crash formatting the undefined AUROC (NoneType.__format__)."""
    export, ahi_csv, _keys, test = _tiny_apnea(tmp_path)
    head = tmp_path / "apnea"
    r = runner.invoke(app, ["heads", "fit", "apnea", "--export", str(export), "--ahi", str(ahi_csv),
                            "--out", str(head)])
    assert r.exit_code == 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "presence AUROC n/a (one class only: every study has AHI >= 5)" in r.output
    assert f"({len(test)} studies)" in r.output and (head / "head.json").is_file()
    warnings = "\n".join(_warnings(r.output))
    assert f"apnea: only {len(test)} held-out studies (fewer than 20)" in warnings
    assert "apnea: the held-out studies are of one class (every study has AHI >= 5): the presence AUROC is " \
           "undefined" in warnings
    assert "apnea presence: " in warnings and "studies in the smaller class for 512 features" in warnings
    assert NO_PATIENTS not in warnings  # this export has patient ids
    manifest = json.loads((head / "manifest.json").read_text())
    assert manifest["warnings"] and all(w in warnings for w in manifest["warnings"])

    report = tmp_path / "rep"
    r = runner.invoke(app, ["heads", "evaluate", str(head), "--export", str(export), "--ahi", str(ahi_csv),
                            "--report", str(report), "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    assert "AUROC n/a (one class only: every study has AHI >= 5)" in r.output
    warnings = "\n".join(_warnings(r.output))
    assert f"apnea: only {len(test)} evaluated studies" in warnings and "one class" in warnings
    assert "is not the one the head was fitted on" not in warnings  # the same export
    ev = json.loads((report / "evaluation.json").read_text())
    assert ev["apnea"]["presence"]["auroc"]["value"] is None
    assert any("one class" in note for note in ev["notes"])
    assert "n/a" in (report / "report.html").read_text()


def test_an_export_without_patient_ids_is_warned_about_on_fit_and_evaluate(tmp_path):
    export, ahi_csv, _keys, _test = _tiny_apnea(tmp_path, patients=False)
    head = tmp_path / "apnea"
    r = runner.invoke(app, ["heads", "fit", "apnea", "--export", str(export), "--ahi", str(ahi_csv),
                            "--out", str(head)])
    assert r.exit_code == 0, r.output
    no_patients = [w for w in _warnings(r.output) if NO_PATIENTS in w]
    assert len(no_patients) == 1 and "patient_id" in no_patients[0]  # said once, naming the column
    r = runner.invoke(app, ["heads", "evaluate", str(head), "--export", str(export), "--ahi", str(ahi_csv),
                            "--report", str(tmp_path / "rep"), "--bootstrap", "10"])
    assert r.exit_code == 0, r.output
    assert len([w for w in _warnings(r.output) if NO_PATIENTS in w]) == 1


def test_evaluate_warns_when_the_export_is_not_the_one_the_head_was_fitted_on(tmp_path):
    export, ahi_csv, _keys, _test = _tiny_apnea(tmp_path)
    head = tmp_path / "apnea"
    assert runner.invoke(app, ["heads", "fit", "apnea", "--export", str(export), "--ahi", str(ahi_csv),
                               "--out", str(head)]).exit_code == 0
    recorded = json.loads((head / "manifest.json").read_text())["data"]["studies_parquet_sha256"]
    table = pq.read_table(export / "studies.parquet")
    pq.write_table(table.set_column(table.column_names.index("sex"), "sex", pa.array(["F"] * table.num_rows)),
                   export / "studies.parquet")  # the export re-written since the fit
    args = ["heads", "evaluate", str(head), "--export", str(export), "--ahi", str(ahi_csv), "--report",
            str(tmp_path / "rep"), "--bootstrap", "10"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    changed = [w for w in _warnings(r.output) if "is not the one the head was fitted on" in w]
    assert len(changed) == 1 and f"({recorded[:12]})" in changed[0]
    # --split all evaluates an external data set: another export is expected there
    r = runner.invoke(app, [*args, "--split", "all"])
    assert r.exit_code == 0, r.output
    assert not [w for w in _warnings(r.output) if "fitted on" in w]


def test_fit_cox_with_no_held_out_event_says_n_a_and_warns(tmp_path):
    """Every held-out study censored: the held-out C-index is undefined (it printed "nan")."""
    from gateway.heads.fit import split

    n = 40
    rng = np.random.default_rng(4)
    pids = [f"P{i:02d}" for i in range(n)]
    _train, test = split(np.asarray(pids, dtype=object), 0.2, 0)
    time = rng.uniform(1, 5, n)
    event = (np.arange(n) % 2).astype(int)
    event[test] = 0
    keys = write_export(tmp_path / "export", rng.normal(size=(n, 512)), pids)
    labels = _write_csv(tmp_path / "l.csv", ["study_key", "label", "time_to_event", "event"],
                        [[k, "HF", f"{t:.3f}", e] for k, t, e in zip(keys, time, event)])
    r = runner.invoke(app, ["heads", "fit", "cox", "--export", str(tmp_path / "export"), "--labels", str(labels),
                            "--out", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    assert f"held-out C n/a (no event among these studies) ({len(test)} studies, 0 events)" in r.output
    warnings = "\n".join(_warnings(r.output))
    assert "label 'HF': the held-out studies are of one class (none has an event)" in warnings
    assert f"label 'HF': {int(event.sum())} events for 512 features" in warnings
    assert f"label 'HF': only {len(test)} held-out studies" in warnings


def test_fit_apnea_on_one_class_is_a_clear_error(tmp_path):
    """A fit that cannot be made (every training study has apnea) is exit code 2 and one line, not a traceback."""
    keys = write_export(tmp_path / "export", np.random.default_rng(2).normal(size=(12, 512)),
                        [f"P{i}" for i in range(12)])
    ahi_csv = _write_csv(tmp_path / "ahi.csv", ["study_key", "ahi"], [[k, 30.0] for k in keys])
    r = runner.invoke(app, ["heads", "fit", "apnea", "--export", str(tmp_path / "export"), "--ahi", str(ahi_csv),
                            "--out", str(tmp_path / "h")])
    assert r.exit_code == 2, r.output
    assert "apnea: cannot fit on these studies" in r.output and "both classes are needed" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "h").exists()
