"""The study pipeline in-process on SQLite and PostgreSQL: success, permanent and transient failures,
resume from a committed state, and input moves (processed/ or quarantine/, never deleted)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pipeline_env import pipeline_env, spool_file

from gateway.config import PipelineConfig
from gateway.montage.holder import MontageHolder
from gateway.store.db import make_engine, upgrade
from gateway.store.models import State
from gateway.store.repo import Repo
from gateway.synthetic.dicom_study import write_psg_study
from gateway.synthetic.night import write_synthetic_night
from inference.bundle import load_bundle, make_demo_bundle
from inference.engine import Engine, EngineOptions

HOURS = 0.1  # 6 minutes: two 5-minute windows, a hypnogram of 12 epochs


@pytest.fixture(scope="module")
def night_bytes(tmp_path_factory) -> bytes:
    return write_synthetic_night(tmp_path_factory.mktemp("n") / "n.edf", hours=HOURS, seed=5).read_bytes()


@pytest.fixture
def env(db_url, tmp_path, calibrated_model):
    db, repo, pipe, paths = pipeline_env(db_url, tmp_path, *calibrated_model)
    yield repo, pipe, paths
    db.dispose()



def test_file_study_goes_to_inferred_with_outputs_and_input_in_processed(env, night_bytes):
    repo, pipe, paths = env
    study = spool_file(paths, "night.edf", night_bytes, repo)
    assert pipe.run_once("n:1:w0")
    done = repo.get(study.id)
    assert done.state == State.FLAGGED and done.last_error is None and done.claimed_by is None
    out = Path(done.output_path)
    assert out == paths.outputs / study.key
    for name in ("night.npy", "hypnogram.csv", "metrics.json", "hazards.csv", "embeddings/BAS.npy"):
        assert (out / name).is_file(), name
    assert {o.name for o in repo.outputs(study.id)} >= {"night.npy", "metrics.json"}
    # input moved with its claim folder, bytes intact, spool emptied; named after the study key, the
    # name it arrived under kept in the database only
    moved = Path(done.input_path)
    assert moved == paths.processed / study.key / f"{study.key}.edf" and moved.read_bytes() == night_bytes
    assert done.input_name == "night.edf"
    assert (paths.processed / study.key / "claim.json").is_file()
    assert not (paths.spool / "incoming" / "c1").exists()
    events = [(e.event, e.to_state) for e in repo.events(study.id)]
    assert events[-4:] == [("study.decoded", "DECODED"), ("study.mapped", "MAPPED"), ("study.inferred", "INFERRED"),
                           ("study.flagged", "FLAGGED")]
    assert set(done.flags) == {"flags", "findings", "notes", "borderline", "outcomes", "risk_flags"}
    # the seven default outcomes, by percentile: no reference yet, so none is flagged and the notes say why
    assert [(o["percentile"], o["reference_size"], o["status"]) for o in done.flags["outcomes"]] == \
        [(None, 0, "not flagged")] * 7
    assert done.flags["risk_flags"] == {"suppressed": False, "reasons": [], "kinds": []}
    assert any(n.startswith("percentile thresholds inactive") for n in done.flags["notes"])
    assert done.montage_version and done.bundle_name == "sleepfm-demo-untrained" and len(done.bundle_hash) == 64
    assert set(done.timings) == {"decode_s", "map_s", "infer_s", "store_s"}
    assert not pipe.run_once("n:1:w0")  # nothing left


def test_dicom_study_decodes_all_instances(env, tmp_path):
    repo, pipe, paths = env
    files = write_psg_study(tmp_path / "src", hours=HOURS, seed=2)
    folder = paths.spool / "dicom" / "abc"
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        dst = folder / f"{i}.dcm"
        shutil.copy(f, dst)
        import pydicom

        ds = pydicom.dcmread(dst, stop_before_pixels=True)
        repo.register_instance(study_uid=ds.StudyInstanceUID, sop_instance_uid=ds.SOPInstanceUID,
                               sop_class_uid=ds.SOPClassUID, path=str(dst), folder=str(folder),
                               size=dst.stat().st_size, calling_ae="SENDER")
    [study] = repo.promote_stable(0)
    assert pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.FLAGGED, done.last_error
    assert done.patient_id == "SYN-0002" and done.accession == "SYNACC-0002"
    assert set(done.mapping["channels"]) == {"BAS", "RESP", "EKG", "EMG"}
    assert all(Path(i.path).parent == paths.processed / study.key for i in repo.instances_of(study.id))
    assert not any(folder.iterdir()) if folder.exists() else True


def test_corrupt_file_is_failed_and_quarantined_with_reason(env):
    repo, pipe, paths = env
    data = b"0       " + b"garbage" * 100
    study = spool_file(paths, "broken.edf", data, repo)
    pipe.run_once("w")
    failed = repo.get(study.id)
    assert failed.state == State.FAILED and failed.error_kind == "permanent"
    assert failed.last_error.startswith("unreadable input")
    q = paths.quarantine / study.key
    assert (q / f"{study.key}.edf").read_bytes() == data
    reason = (q / "REASON.txt").read_text()
    assert "unreadable input" in reason and f"studies retry {study.id}" in reason
    assert Path(failed.input_path) == q / f"{study.key}.edf"


def _zero_record_edf(night: bytes) -> bytes:
    """``night``'s header alone, declaring 0 data records."""
    data = bytearray(night)
    data[236:244] = b"0".ljust(8)
    return bytes(data[: int(data[184:192])])


@pytest.mark.parametrize(("case", "reason"), [
    ("short", "model input: recording shorter than one 30-s epoch (12.0 s)"),
    ("empty", "unreadable input (truncated): 0 data records in the header: the recording holds no samples"),
])
def test_short_and_empty_recordings_fail_permanently_with_a_clean_reason(env, night_bytes, tmp_path, case, reason):
    """The daemon's path: a recording under 30 s (it used to fail in a numpy reshape) and a 0-record EDF (it
    used to be "internal error: ValueError: duration_s ...") are FAILED, not retried, the reason one line
    naming no file, and the input is quarantined untouched beside REASON.txt."""
    repo, pipe, paths = env
    if case == "short":
        data = write_synthetic_night(tmp_path / "s.edf", hours=12 / 3600, seed=3).read_bytes()
    else:
        data = _zero_record_edf(night_bytes)
    study = spool_file(paths, "Doe_Jane.edf", data, repo)
    pipe.run_once("w")
    failed = repo.get(study.id)
    assert failed.state == State.FAILED and failed.error_kind == "permanent"
    assert failed.last_error == reason
    q = paths.quarantine / study.key
    assert (q / f"{study.key}.edf").read_bytes() == data
    assert not [p for p in q.iterdir() if "Doe_Jane" in p.name]
    text = (q / "REASON.txt").read_text()
    assert reason in text and "Doe_Jane" not in text


def test_unmapped_channels_fail_with_montage_reason_then_retry_after_fix(env, night_bytes, tmp_path):
    repo, pipe, paths = env
    table = tmp_path / "empty.yaml"
    table.write_text("name: site\nformat: 2\nrules: []\n")
    pipe.montage = MontageHolder(table)
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    failed = repo.get(study.id)
    assert failed.state == State.FAILED and "no channel maps to a modality" in failed.last_error
    # the admin fixes the table; the daemon reloads it; the study is retried from quarantine
    table.write_text("name: site\nformat: 2\nextends: default\nrules: []\n")
    assert pipe.montage.check()
    repo.retry(study.id, "cli")
    pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.FLAGGED
    assert Path(done.input_path) == paths.processed / study.key / f"{study.key}.edf"


def test_broken_montage_edit_keeps_previous_table(env, tmp_path):
    _, pipe, _ = env
    table = tmp_path / "t.yaml"
    table.write_text("name: site\nformat: 2\nextends: default\nrules: []\n")
    pipe.montage = MontageHolder(table)
    version = pipe.montage.table.version
    table.write_text("name: site\nformat: 2\nrules: [ {broken\n")
    assert not pipe.montage.check()
    assert pipe.montage.table.version == version


def test_transient_error_is_retried_with_backoff_then_succeeds(env, night_bytes, monkeypatch):
    repo, pipe, paths = env
    import gateway.pipeline.runner as pl

    real = pl.infer_ready
    calls = {"n": 0}

    def flaky(engine, prepared, progress=None):
        calls["n"] += 1
        if calls["n"] == 1:  # a GPU out-of-memory cannot be produced on demand on a CPU machine
            raise MemoryError()
        return real(engine, prepared, progress)

    monkeypatch.setattr(pl, "infer_ready", flaky)
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    waiting = repo.get(study.id)
    assert waiting.state == State.MAPPED and waiting.error_kind == "transient"
    assert "out of memory" in waiting.last_error and waiting.next_attempt_at is not None
    import time

    time.sleep(0.05)
    pipe.run_once("w")
    assert repo.get(study.id).state == State.FLAGGED
    assert any(e.event == "study.retry_scheduled" for e in repo.events(study.id))


def test_transient_error_gives_up_after_max_attempts(env, night_bytes, monkeypatch):
    repo, pipe, paths = env
    import gateway.pipeline.runner as pl

    monkeypatch.setattr(pl, "infer_ready", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    pipe.cfg = PipelineConfig(retry_backoff_seconds=0.001, max_attempts=2)
    study = spool_file(paths, "night.edf", night_bytes, repo)
    import time

    for _ in range(3):
        pipe.run_once("w")
        time.sleep(0.01)
    failed = repo.get(study.id)
    assert failed.state == State.FAILED and "gave up after 2 attempts" in failed.last_error
    assert (paths.quarantine / study.key / f"{study.key}.edf").is_file()


def test_resume_from_mapped_after_crash_and_reconcile_moves(env, night_bytes):
    repo, pipe, paths = env
    study = spool_file(paths, "night.edf", night_bytes, repo)
    claimed = repo.claim("n:1:w0", 600)
    claimed = repo.transition(claimed, State.DECODED, "n:1:w0", "study.decoded")
    repo.transition(claimed, State.MAPPED, "n:1:w0", "study.mapped")
    # the process dies here; the next start releases its leases and resumes
    assert repo.release_leases("n:") == 1
    assert pipe.run_once("n:2:w0")
    done = repo.get(study.id)
    assert done.state == State.FLAGGED
    states = [e.to_state for e in repo.events(study.id)]
    assert states.count("DECODED") == 1 and states.count("MAPPED") == 1 and states.count("INFERRED") == 1


def test_reconcile_finishes_a_move_interrupted_by_a_crash(env, night_bytes):
    repo, pipe, paths = env
    study = spool_file(paths, "night.edf", night_bytes, repo)
    c = repo.claim("w", 60)
    for s in (State.DECODED, State.MAPPED, State.INFERRED, State.FLAGGED):
        c = repo.transition(c, s, "w", f"study.{s.lower()}")
    # committed FLAGGED, crashed before the move
    assert pipe.inputs.reconcile() == 1
    assert (paths.processed / study.key / f"{study.key}.edf").read_bytes() == night_bytes
    assert repo.get(study.id).input_path == str(paths.processed / study.key / f"{study.key}.edf")


def test_error_reasons_never_quote_file_names():
    from gateway.pipeline.errors import classify

    err = classify(FileNotFoundError(2, "No such file or directory", "/drop/1234567_DOE_JANE.edf"))
    assert "DOE" not in str(err) and "No such file" in str(err) and not err.transient
    full = classify(OSError(28, "No space left on device", "/spool/1234567_DOE_JANE.edf"))
    assert full.transient and "DOE" not in str(full)


# ---- flag step and outbox (the HL7 part of the pipeline) -------------------------------------------------
def _hl7_pipe(pipe, send_mode="flagged_only", threshold=-1e9, outcomes=("death", "Stroke")):
    """Flags on the calibrated outcomes by an absolute log-hazard threshold (every study passes -1e9)."""
    from gateway.config import FlagOutcome, FlagsConfig, Hl7Config

    pipe.flags = FlagsConfig(outcomes=[FlagOutcome(label=o, log_hazard=threshold, percentile=None) for o in outcomes],
                             send_mode=send_mode)
    pipe.hl7 = Hl7Config(enabled=True, port=2575, mrn_assigning_authority="HOSP")
    return pipe


def test_flagged_study_is_queued_with_its_message_in_one_step(env, night_bytes):
    import hl7

    repo, pipe, paths = env
    _hl7_pipe(pipe)
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.QUEUED and [f["label"] for f in done.flags["flags"]] == ["death", "Stroke"]
    [msg] = repo.messages(study_id=study.id)
    assert msg.state == "PENDING" and msg.destination == "127.0.0.1:2575" and not msg.correction
    parsed = hl7.parse(msg.message)
    assert str(parsed.segment("MSH")[10]) == msg.control_id
    assert str(parsed.segment("MSH")[11]) == "T"  # demo weights: a test message
    assert str(parsed.segment("PID")[3][0][0]) == "SYN-0005"
    notes = [str(seg[3]) for seg in parsed.segments("NTE")]
    assert "Age/sex inputs encoded as: psg-gateway demo (age-50)/20 (declared by the model bundle)." in notes
    events = [e.event for e in repo.events(study.id)]
    assert events[-2:] == ["study.inferred", "study.queued"]
    assert Path(done.input_path).parent == paths.processed / study.key
    # the reference now holds this study's watched hazards
    assert repo.percentile("death", done.bundle_hash, 1e9)[1] == 1


def test_a_study_in_the_second_look_band_is_listed_for_review_not_flagged(env, night_bytes, tmp_path, db_url):
    """A reference of 20 earlier studies (19 far below, 1 far above) puts this night at percentile 95.0:
    under a threshold of 96 and inside the band from 90. Not flagged; borderline in its stored flags,
    named in the message's NTE (send_mode always), counted, and listed by studies list --second-look."""
    import hl7
    from typer.testing import CliRunner

    from gateway.cli.main import app
    from gateway.config import FlagOutcome, FlagsConfig, Hl7Config

    repo, pipe, paths = env
    model_hash = pipe.bundle.identity.model_hash
    for i in range(20):
        earlier = repo.register_file(source="folder:/in", path=f"/elsewhere/{i}.edf", name=f"{i}.edf",
                                     sha256=f"{i:064x}", filename_pattern=None, actor="t").study
        repo.add_reference(earlier.id, model_hash, {"death": 1e6 if i == 0 else -1e6})
        repo.transition(repo.claim("t", 60), State.FAILED, "t", "study.failed")  # done: no worker takes it
    pipe.flags = FlagsConfig(outcomes=[FlagOutcome(label="death", percentile=96, second_look_percentile=90)],
                             percentile_min_reference=20, send_mode="always")
    pipe.hl7 = Hl7Config(enabled=True, port=2575)
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.QUEUED and done.flags["flags"] == []
    [borderline] = done.flags["borderline"]
    assert (borderline["code"], borderline["percentile"], borderline["reference_size"]) == ("PSG-DEATH", 95.0, 20)
    notes = [str(seg[3]) for seg in hl7.parse(repo.messages(study_id=study.id)[0].message).segments("NTE")]
    assert any(n.startswith("Second look (not flagged): death: percentile 95.0 in the second-look band 90 to 96")
               for n in notes), notes
    assert pipe.metrics.registry.get_sample_value("psg_flag_outcomes_total", {"decision": "second_look"}) == 1
    assert [e.detail.get("second_look") for e in repo.events(study.id) if e.event == "study.queued"] == [["PSG-DEATH"]]

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths:\n  var_dir: {tmp_path / 'var-cli'}\n")
    runner = CliRunner()
    env_vars = {"PSG__DATABASE__URL": db_url, "PSG_CONFIG": None}
    listed = runner.invoke(app, ["studies", "list", "--second-look", "--json", "--config", str(cfg)], env=env_vars)
    assert listed.exit_code == 0, listed.output
    import json

    rows = json.loads(listed.stdout)
    assert [(r["key"], r["second_look"]) for r in rows] == [(study.key, ["PSG-DEATH"])]


def test_nothing_flagged_ends_flagged_without_message(env, night_bytes):
    repo, pipe, paths = env
    _hl7_pipe(pipe, threshold=1e9)
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    assert repo.get(study.id).state == State.FLAGGED and repo.messages(study_id=study.id) == []


def test_shadow_mode_stores_but_never_queues(env, night_bytes):
    repo, pipe, paths = env
    _hl7_pipe(pipe, send_mode="shadow")
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    assert repo.get(study.id).state == State.SHADOW
    [msg] = repo.messages(study_id=study.id)
    assert msg.state == "SHADOW" and repo.next_message("127.0.0.1:2575") is None


def test_reprocessing_a_delivered_study_sends_a_correction(env, night_bytes):
    import hl7

    repo, pipe, paths = env
    _hl7_pipe(pipe, send_mode="always")
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    first = repo.next_message("127.0.0.1:2575")
    assert repo.hold_delivery("127.0.0.1:2575", "test:1", 60) == []
    repo.message_sent(first, repo.begin_attempt(first, "test:1", 60), "AA", None, actor="test")
    assert repo.get(study.id).state == State.DELIVERED
    repo.reprocess(study.id, "cli")
    pipe.run_once("w")
    again = repo.get(study.id)
    assert again.state == State.QUEUED and again.version == 2
    second = repo.next_message("127.0.0.1:2575")
    assert second.correction and second.control_id != first.control_id
    a, b = hl7.parse(first.message), hl7.parse(second.message)
    assert str(a.segment("OBR")[25]) == "F" and str(b.segment("OBR")[25]) == "C"
    assert str(a.segment("ORC")[2]) == str(b.segment("ORC")[2]) and str(a.segment("ORC")[3]) == str(b.segment("ORC")[3])
    assert [str(s[3]) for s in a.segments("OBX")] == [str(s[3]) for s in b.segments("OBX")]


def test_resume_at_inferred_runs_only_the_flag_step(env, night_bytes, monkeypatch):
    repo, pipe, paths = env
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")  # FLAGGED with outputs
    done = repo.get(study.id)
    # pretend the process died right after committing INFERRED: back to INFERRED, model must not run
    with repo.sessions.begin() as s:
        row = s.get(type(done), done.id)
        row.state = "INFERRED"
    import gateway.pipeline.runner as pl

    monkeypatch.setattr(pl, "infer_ready", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-ran")))
    _hl7_pipe(pipe)
    pipe.run_once("w")
    assert repo.get(study.id).state == State.QUEUED


def test_retention_deletes_only_old_processed_inputs_when_configured(db_url, tmp_path):
    import os

    from gateway.config import GatewayConfig, RetentionConfig, resolve_paths
    from gateway.daemon import Daemon

    cfg = resolve_paths(GatewayConfig(retention=RetentionConfig(processed_days=30)), tmp_path)
    cfg.database.url = db_url
    daemon = Daemon(cfg, configure_logs=False)
    engine = make_engine(db_url)
    upgrade(engine)
    daemon.repo = Repo(engine)
    study = daemon.repo.register_file(source="t", path=str(cfg.paths.processed / "x" / "a.edf"), name="a.edf",
                                      sha256="e" * 64, filename_pattern=None, actor="t").study
    old = cfg.paths.processed / study.key
    new = cfg.paths.processed / "st-recent"
    kept = cfg.paths.quarantine / "st-old-failed"  # quarantine_days not set: kept for ever
    for folder in (old, new, kept):
        folder.mkdir(parents=True)
        (folder / "a.edf").write_bytes(b"x")
    long_ago = os.stat(old).st_mtime - 31 * 86400
    for folder in (old, kept):
        os.utime(folder, (long_ago, long_ago))
    daemon.apply_retention()
    assert not old.exists() and new.exists() and kept.exists()
    assert daemon.repo.get(study.id).input_path is None
    engine.dispose()


def test_a_bundle_without_a_declared_encoding_says_unconfirmed_in_outputs_and_message(db_url, tmp_path, night_bytes):
    """The release's own age/sex encoding is not public: a bundle that does not declare one must say so in
    metrics.json and in the message, never silently use a guess."""
    import json
    import shutil

    import hl7

    bare = tmp_path / "bundle"
    shutil.copytree(make_demo_bundle(tmp_path / "demo"), bare)
    meta = json.loads((bare / "bundle.json").read_text())
    del meta["demographics"]
    meta["calibrated_outcomes"] = ["death", "Stroke"]
    (bare / "bundle.json").write_text(json.dumps(meta))
    bundle = load_bundle(bare)
    db, repo, pipe, paths = pipeline_env(db_url, tmp_path / "var", bundle, Engine(bundle, EngineOptions()))
    try:
        _hl7_pipe(pipe, send_mode="always")
        study = spool_file(paths, "night.edf", night_bytes, repo)
        pipe.run_once("w")
        done = repo.get(study.id)
        metrics = json.loads((Path(done.output_path) / "metrics.json").read_text())
        assert metrics["demographics_encoding"] == "unconfirmed"
        [msg] = repo.messages(study_id=study.id)
        notes = [str(seg[3]) for seg in hl7.parse(msg.message).segments("NTE")]
        assert any(n.startswith("Age/sex encoding UNCONFIRMED") for n in notes)
    finally:
        db.dispose()


def test_a_dead_letter_quarantines_its_input_with_the_delivery_reason(env, night_bytes):
    """One FAILED contract: a study FAILED by its message's dead letter has its input in quarantine/
    with REASON.txt, like every other FAILED study; delivered after `outbox retry`, it goes back."""
    from mllp_peer import MllpPeer, PeerAction

    from gateway.config import Hl7Config
    from gateway.hl7.delivery import Deliverer

    repo, pipe, paths = env
    with MllpPeer() as peer:
        peer.start()
        _hl7_pipe(pipe, send_mode="always")
        pipe.hl7 = Hl7Config(enabled=True, port=peer.port, mrn_assigning_authority="HOSP", timeout_seconds=2)
        study = spool_file(paths, "night.edf", night_bytes, repo)
        pipe.run_once("w")
        assert Path(repo.get(study.id).input_path).parent == paths.processed / study.key
        deliverer = Deliverer(repo, pipe.hl7, holder="t:1", on_finished=pipe.inputs.place)
        peer.script.append(PeerAction.ack("AE", text="unknown patient"))
        assert deliverer.drain() == 1
        failed = repo.get(study.id)
        assert failed.state == State.FAILED and failed.last_error.startswith("delivery: AE")
        quarantined = paths.quarantine / study.key
        assert Path(failed.input_path) == quarantined / f"{study.key}.edf"
        assert Path(failed.input_path).read_bytes() == night_bytes
        reason = (quarantined / "REASON.txt").read_text()
        assert "delivery: AE: unknown patient" in reason and "outbox retry" in reason
        assert not (paths.processed / study.key).exists()

        [msg] = repo.messages(study_id=study.id)
        repo.message_requeue(msg.id, "cli", resend=False)
        assert deliverer.drain() == 1
        delivered = repo.get(study.id)
        assert delivered.state == State.DELIVERED
        assert Path(delivered.input_path) == paths.processed / study.key / f"{study.key}.edf"
        assert not quarantined.exists()
        deliverer.close()


def test_outputs_are_on_disk_before_inferred_is_committed(env, night_bytes, monkeypatch):
    """Each output file is fsynced before its rename and its folder after, all before INFERRED."""
    import os

    repo, pipe, paths = env
    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", str(dst)))
        return real_replace(src, dst)

    original_transition = repo.transition

    def transition(study, to_state, *a, **kw):
        log.append(("state", str(to_state)))
        return original_transition(study, to_state, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(repo, "transition", transition)
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    out = paths.outputs / study.key
    inferred_at = log.index(("state", "INFERRED"))
    for name in ("hazards.csv", "metrics.json", "night.npy", "hypnogram.csv"):
        target = str(out / name)
        renamed = log.index(("replace", target))
        assert renamed < inferred_at
        # the temporary file was fsynced just before the rename, the folder just after it
        assert log[renamed - 1][0] == "fsync" and Path(log[renamed - 1][1]).parent == out
        assert log[renamed + 1] == ("fsync", str(out))


# ---- the study report: written with every study, embedded in the ORU on request ---------------------------
def test_every_study_gets_its_report_and_embed_report_attaches_the_same_pdf(env, night_bytes):
    """report.html and report.pdf are written into the outputs with the decision the message carries and
    recorded with the outputs; with hl7.embed_report the ORU's ED OBX decodes to report.pdf byte for byte."""
    import base64

    import hl7

    repo, pipe, paths = env
    _hl7_pipe(pipe)
    pipe.cfg = pipe.cfg.model_copy(update={"write_report": True})  # the harness turns reports off
    pipe.hl7 = pipe.hl7.model_copy(update={"embed_report": True})
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    done = repo.get(study.id)
    out = Path(done.output_path)
    html, pdf = (out / "report.html").read_text(), (out / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and "PSG-DEATH" in html and "FLAGGED" in html.upper()
    assert {"report.html", "report.pdf"} <= {o.name for o in repo.outputs(study.id)}
    [msg] = repo.messages(study_id=study.id)
    [ed] = [seg for seg in hl7.parse(msg.message).segments("OBX") if str(seg[2]) == "ED"]
    assert str(ed[3][0][0]) == "PSG-REPORT" and str(ed[5][0][2]) == "PDF" and str(ed[5][0][3]) == "Base64"
    assert base64.b64decode(str(ed[5][0][4])) == pdf


def test_reports_can_be_turned_off(env, night_bytes):
    repo, pipe, paths = env
    assert PipelineConfig().write_report  # on unless turned off
    pipe.cfg = pipe.cfg.model_copy(update={"write_report": False})
    study = spool_file(paths, "night.edf", night_bytes, repo)
    pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.FLAGGED and not (Path(done.output_path) / "report.pdf").exists()


def test_embed_report_needs_reports_written():
    from gateway.config import GatewayConfig

    with pytest.raises(ValueError, match="hl7.embed_report needs pipeline.write_report"):
        GatewayConfig.model_validate({"hl7": {"embed_report": True}, "pipeline": {"write_report": False}})


# ---- risk flags withheld: a study the heads cannot speak for ------------------------------------------------
def test_a_study_missing_a_modality_keeps_its_results_but_gets_no_risk_flag(env, tmp_path):
    """Flags forced on death and Stroke (every study passes the threshold), send_mode always: a night
    without EMG channels is still staged and embedded, but no risk flag is raised; the message says why
    (NTE), the outcomes are listed as withheld, the counter counts it and the reference does not keep it."""
    import hl7

    from gateway.synthetic.night import DEFAULT_BENCH_CHANNELS

    repo, pipe, paths = env
    _hl7_pipe(pipe, send_mode="always")
    no_emg = [c for c in DEFAULT_BENCH_CHANNELS if not c.kind.startswith("emg")]
    data = write_synthetic_night(tmp_path / "no_emg.edf", hours=HOURS, seed=5, channels=no_emg).read_bytes()
    study = spool_file(paths, "night.edf", data, repo)
    pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.QUEUED and done.flags["flags"] == []
    assert done.flags["risk_flags"]["kinds"] == ["modality"]
    assert [o["status"] for o in done.flags["outcomes"]] == ["withheld", "withheld"]
    assert (Path(done.output_path) / "hypnogram.csv").is_file()  # the night's own results stand
    [msg] = repo.messages(study_id=study.id)
    notes = [str(seg[3]) for seg in hl7.parse(msg.message).segments("NTE")]
    assert any(n.startswith("no risk flags for this study: modality missing (EMG)") for n in notes), notes
    assert not any(str(seg[3][0][0]).startswith("PSG-DEATH") for seg in hl7.parse(msg.message).segments("OBX"))
    assert pipe.metrics.risk_flags_withheld.labels("modality")._value.get() == 1
    assert repo.percentile("death", done.bundle_hash, 1e9) is None  # kept out of the site reference
