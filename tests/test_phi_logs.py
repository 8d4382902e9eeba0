"""PHI cannot reach a log by accident (issue 15, item 2).

Distinctive identifiers go into every input field the gateway reads (the EDF+ header, a sidecar JSON,
DICOM attributes, the file and folder names); studies are then driven in-process through every failure
path we can provoke (corrupt, truncated, a bad sidecar, no channel mapped, too short, a patient id too
long for the ORU^R01, an unexpected error quoting the values, a transient storage error) and to success,
with logging configured as the daemon configures it (JSON, the real processor chain). None of the
identifiers, nor their parts, may appear in the log output, in a ``REASON.txt``, in any events row or in
any study's ``last_error``. Unit tests pin the log processor and the error scrubber on their own.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import time
from datetime import date
from pathlib import Path

import pytest
import structlog
from pipeline_env import pipeline_env, spool_file
from sqlalchemy import select

from gateway.logging import (
    REDACTED,
    add_study_identifiers,
    bind_study,
    bound_identifiers,
    configure_logging,
    get_logger,
    scrub,
)
from gateway.montage.holder import MontageHolder
from gateway.pipeline.errors import classify
from gateway.store.models import Event, State, Study
from gateway.synthetic.dicom_study import write_psg_study
from gateway.synthetic.night import write_synthetic_night

HOURS = 0.1  # 6 minutes: the pipeline tests' night

FAMILY, GIVEN = "Zyxwvut", "Qqqplmn"
NAME = f"{FAMILY}^{GIVEN}"
MRN = "MRN-7731-ZQX"
BIRTH = date(1951, 7, 13)
ACCESSION = "ACC-99173-ZZ"
LONG_ID = "ZZLONGID" * 1250  # 10,000 characters: hl7apy's error once quoted all of it
FILE = f"{MRN}_night.edf"  # a vendor export that names the file after the MRN

# Every text that must not appear (compared without regard to case), parts included. Bare digit runs of
# the MRN/accession are left out: "7731" or "99173" can occur in a timing or a hash by chance.
PHI = [MRN, "MRN-7731", "7731-ZQX", "ZQX", FAMILY, GIVEN, NAME, f"{FAMILY}_{GIVEN}", f"{FAMILY} {GIVEN}",
       "1951-07-13", "19510713", "13-JUL-1951", "13.07.1951", "13/07/1951", "07/13/1951", "date(1951, 7, 13)",
       ACCESSION, "ACC-99173", "99173-ZZ", "ZZLONGID"]


def _leaks(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    low = text.lower()
    return [p for p in (*PHI, *extra) if p.lower() in low]


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture
def logs():
    """Logging configured as the daemon does (JSON lines, every processor), into a buffer; restored after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers = list(root.handlers)
    buf = io.StringIO()
    configure_logging("debug", json=True, stream=buf)
    yield buf
    structlog.configure(**saved)
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)


@pytest.fixture
def env(db_url, tmp_path, calibrated_model):
    db, repo, pipe, paths = pipeline_env(db_url, tmp_path / "var", *calibrated_model, reports=True)
    yield repo, pipe, paths
    db.dispose()


def _phi_edf(path: Path, seed: int, hours: float = HOURS) -> bytes:
    """A synthetic night whose EDF+ header carries the patient: ``code sex birthdate name`` and the
    recording's ``Startdate date admincode ...`` (edf_header.patient_fields / admin_code)."""
    data = bytearray(write_synthetic_night(path, hours=hours, seed=seed).read_bytes())
    patient = f"{MRN} F {BIRTH.strftime('%d-%b-%Y').upper()} {FAMILY}_{GIVEN}"
    startdate = data[88:168].decode("ascii").split()[1]
    recording = f"Startdate {startdate} {ACCESSION} X psg-gateway_synthetic"
    data[8:88] = patient.ljust(80).encode("ascii")
    data[88:168] = recording.ljust(80).encode("ascii")
    return bytes(data)


def _sidecar(paths, claim: str, name: str, **values) -> None:
    """``<file>.json`` beside the spooled file (gateway.pipeline.identifiers)."""
    doc = {"patient_id": MRN, "patient_name": NAME, "accession": ACCESSION, "birth_date": BIRTH.isoformat(),
           "sex": "F", **values}
    (paths.spool / "incoming" / claim / f"{name}.json").write_text(json.dumps(doc))


def _hl7(pipe, authority: str | None = "HOSP") -> None:
    """Every finished study builds its ORU^R01 (send_mode always), as in test_pipeline._hl7_pipe;
    ``authority=None``: PID-3.4 is the study's own issuer."""
    from gateway.config import FlagOutcome, FlagsConfig, Hl7Config

    pipe.flags = FlagsConfig(outcomes=[FlagOutcome(label="death", log_hazard=-1e9, percentile=None)],
                             send_mode="always")
    pipe.hl7 = Hl7Config(enabled=True, port=2575, mrn_assigning_authority=authority)


def _run(pipe, repo, study: Study) -> Study:
    pipe.run_once("w")
    return repo.get(study.id)


# ---- end to end: every failure path and a success, then grep everything -------------------------------------

def test_no_identifier_reaches_logs_reasons_events_or_last_error(env, logs, tmp_path, monkeypatch):
    repo, pipe, paths = env
    _hl7(pipe)
    outcomes: dict[str, Study] = {}

    # 1. corrupt bytes, under the MRN's file name, with a sidecar
    study = spool_file(paths, FILE, b"0       " + b"garbage" * 100, repo, claim="corrupt")
    _sidecar(paths, "corrupt", FILE)
    outcomes["corrupt"] = _run(pipe, repo, study)

    # 2. a header full of PHI that declares 0 data records (truncated)
    night = _phi_edf(tmp_path / "empty.edf", seed=21)
    empty = bytearray(night)
    empty[236:244] = b"0".ljust(8)
    study = spool_file(paths, FILE, bytes(empty[: int(empty[184:192])]), repo, claim="empty")
    outcomes["empty"] = _run(pipe, repo, study)

    # 3. a sidecar whose values are of the wrong kind (and themselves PHI)
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "bad.edf", seed=22), repo, claim="badsidecar")
    _sidecar(paths, "badsidecar", FILE, birth_date=f"{BIRTH:%d/%m/%Y} {FAMILY}")
    outcomes["bad sidecar"] = _run(pipe, repo, study)

    # 4. a recording too short for one epoch
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "short.edf", seed=23, hours=12 / 3600), repo, claim="short")
    outcomes["short"] = _run(pipe, repo, study)

    # 5. no channel mapped (a site table with no rules)
    table = tmp_path / "empty.yaml"
    table.write_text("name: site\nformat: 2\nrules: []\n")
    default = pipe.montage
    pipe.montage = MontageHolder(table)
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "unmapped.edf", seed=24), repo, claim="unmapped")
    _sidecar(paths, "unmapped", FILE)
    outcomes["unmapped"] = _run(pipe, repo, study)
    pipe.montage = default

    # 6. a 10,000-character patient id: refused where identifiers are bounded (gateway.identifier_limits),
    # else by the ORU^R01 builder or the database column; whichever, the reason must not quote it
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "long.edf", seed=25), repo, claim="long")
    _sidecar(paths, "long", FILE, patient_id=LONG_ID)
    outcomes["long id"] = _run(pipe, repo, study)

    # 6b. an issuer that the ORU^R01 cannot carry (PID-3.4 holds 20 characters): hl7apy's error quoted it
    _hl7(pipe, authority=None)
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "issuer.edf", seed=31), repo, claim="issuer")
    _sidecar(paths, "issuer", FILE, patient_id_issuer=f"{FAMILY} practice of {GIVEN} {MRN}")
    outcomes["oru"] = _run(pipe, repo, study)
    _hl7(pipe)

    # 7. an unexpected error whose message quotes the patient (as a library's would)
    def leaky(engine, prepared, progress=None):
        raise ValueError(f"cannot score {MRN!r} ({NAME}, born {BIRTH}, {ACCESSION}) from /spool/{FILE}")

    monkeypatch.setattr("gateway.pipeline.runner.infer_ready", leaky)
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "internal.edf", seed=26), repo, claim="internal")
    _sidecar(paths, "internal", FILE)
    outcomes["internal"] = _run(pipe, repo, study)
    monkeypatch.undo()

    # 8. a transient storage error naming the file, then success (the retry's reason is stored too)
    from gateway.pipeline import runner as pipeline_module

    real, calls = pipeline_module.infer_ready, []

    def full_disk(engine, prepared, progress=None):
        if not calls:
            calls.append(1)
            raise OSError(errno.ENOSPC, "No space left on device", f"/var/psg/outputs/{FILE}")
        return real(engine, prepared, progress)

    monkeypatch.setattr("gateway.pipeline.runner.infer_ready", full_disk)
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "retry.edf", seed=27), repo, claim="retry")
    _sidecar(paths, "retry", FILE)
    retry = _run(pipe, repo, study)
    assert retry.state == State.MAPPED and retry.last_error.startswith("storage: ENOSPC")  # retried later
    time.sleep(0.05)
    outcomes["retried"] = _run(pipe, repo, study)
    monkeypatch.undo()

    # 9. success from the header alone, and 10. from the header and a sidecar
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "ok.edf", seed=28), repo, claim="ok")
    outcomes["ok (header)"] = _run(pipe, repo, study)
    study = spool_file(paths, FILE, _phi_edf(tmp_path / "ok2.edf", seed=29), repo, claim="ok2")
    _sidecar(paths, "ok2", FILE)
    outcomes["ok (sidecar)"] = _run(pipe, repo, study)

    # 11. a DICOM study with the patient in its attributes and in its file and folder names
    import pydicom

    folder = paths.spool / "dicom" / MRN
    folder.mkdir(parents=True)
    study_uid = None
    for i, src in enumerate(write_psg_study(tmp_path / "dcm", hours=HOURS, seed=30)):
        ds = pydicom.dcmread(src)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, MRN, BIRTH.strftime("%Y%m%d")
        ds.AccessionNumber = ACCESSION
        dst = folder / f"{MRN}_{i}.dcm"
        ds.save_as(dst)
        study_uid = str(ds.StudyInstanceUID)
        repo.register_instance(study_uid=study_uid, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                               path=str(dst), folder=str(folder), size=dst.stat().st_size, calling_ae="SENDER")
    [study] = repo.promote_stable(0)
    outcomes["dicom"] = _run(pipe, repo, study)
    assert study_uid

    # The paths were taken: each failure for its own reason, the others to the end.
    states = {k: str(s.state) for k, s in outcomes.items()}
    assert all(states[k] == State.FAILED for k in ("corrupt", "empty", "bad sidecar", "short", "unmapped",
                                                   "long id", "oru", "internal")), states
    assert all(states[k] == State.QUEUED for k in ("retried", "ok (header)", "ok (sidecar)", "dicom")), states
    reasons = {k: s.last_error for k, s in outcomes.items() if s.state == State.FAILED}
    assert reasons["corrupt"].startswith("unreadable input")
    assert reasons["bad sidecar"].startswith("unreadable input") and "birth_date" in reasons["bad sidecar"]
    assert reasons["short"].startswith("model input: recording shorter than one 30-s epoch")
    assert reasons["unmapped"].startswith("montage: no channel maps to a modality")
    assert reasons["long id"].startswith(("unreadable input (identifiers): patient id longer than",  # bounded
                                          "result message: PID-3.1 patient identifier exceeds its maximum",
                                          "database: DataError (StringDataRightTruncation)")), reasons
    assert reasons["oru"] == "result message: PID-3.4 assigning authority exceeds its maximum length (20 characters)"
    assert reasons["internal"].startswith("internal error: ValueError: cannot score <value>")
    assert all(len(r) <= 300 for r in reasons.values())
    # the DICOM study really carried the patient (so its absence below means something)
    assert outcomes["dicom"].patient_id == MRN and outcomes["ok (sidecar)"].patient_name == NAME

    # Everything the gateway wrote about these studies, outside the studies' own identifier columns and
    # the outbox (whose ORU^R01 is meant to carry them).
    text = logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(e["event"] == "study.failed" for e in lines) and any(e["event"] == "study.queued" for e in lines)
    reason_files = {p: p.read_text() for p in paths.quarantine.rglob("REASON.txt")}
    assert len(reason_files) == 8
    with repo.sessions() as s:
        details = [json.dumps(e.detail) for e in s.scalars(select(Event)).all()]
        last_errors = [st.last_error or "" for st in s.scalars(select(Study)).all()]
    assert any("No space left" in d for d in details)  # the retry's reason is in the events too
    extra = (study_uid,)
    assert _leaks(text, extra) == [], [line for line in text.splitlines() if _leaks(line, extra)][:3]
    for path, body in reason_files.items():
        assert _leaks(body, extra) == [], (path, body)
    assert [d for d in details if _leaks(d, extra)] == []
    assert [e for e in last_errors if _leaks(e, extra)] == []
    # Every study event in the log names its study by key; the identifier set is never rendered.
    assert all("study_key" in e for e in lines if e["event"].startswith("study."))
    assert "_study_identifiers" not in text


# ---- the log processor ----------------------------------------------------------------------------------------

def _events(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_identifier_fields_are_redacted_at_any_depth(logs):
    get_logger("t").info("x", patient_name=NAME, PatientID=MRN, birth_date=BIRTH, input_name=FILE, study_uid="1.2.3",
                         detail={"accession": ACCESSION, "ok": 1, "rows": [{"mrn": MRN}]}, empty_name=None, name=None)
    [e] = _events(logs)
    assert e["patient_name"] == e["PatientID"] == e["birth_date"] == e["input_name"] == e["study_uid"] == REDACTED
    assert e["detail"] == {"accession": REDACTED, "ok": 1, "rows": [{"mrn": REDACTED}]}
    assert e["name"] is None  # nothing there: nothing to hide
    assert _leaks(logs.getvalue()) == []


def test_bound_identifiers_are_redacted_inside_any_string_and_only_while_bound(logs):
    log = get_logger("t")
    with bind_study("k1", MRN, NAME, BIRTH, Path(f"/spool/{FILE}")):
        log.warning(f"study of {GIVEN.upper()} {FAMILY}", error=f"born 13-Jul-1951, file {FILE}",
                    note=["x", f"id {MRN}"], when=BIRTH)
        add_study_identifiers(ACCESSION)  # learnt later (a decoded header)
        log.info("late", error=f"order {ACCESSION}")
        with bind_study("k2", "OTHER-ID-42"):  # a nested binding (the batch runner's step) and back
            log.info("inner", error="OTHER-ID-42")
        log.info("back", error=f"order {ACCESSION}")
        with bind_study("k1"):  # the same study again (a runner step): what is known stays bound
            log.info("same", error=f"{MRN} {ACCESSION}")
    log.info("after", error="OTHER-ID-42")
    assert bound_identifiers() == frozenset()
    add_study_identifiers(MRN)  # outside a study: binds nothing that would outlive it
    assert bound_identifiers() == frozenset()
    first, late, inner, back, same, after = _events(logs)
    assert same["error"] == f"{REDACTED} {REDACTED}"
    assert first["event"] == f"study of {REDACTED} {REDACTED}" and first["study_key"] == "k1"
    assert first["error"] == f"born {REDACTED}, file {REDACTED}" and first["note"] == ["x", f"id {REDACTED}"]
    assert first["when"] == REDACTED
    assert late["error"] == back["error"] == f"order {REDACTED}" and back["study_key"] == "k1"
    assert inner["error"] == REDACTED and inner["study_key"] == "k2"
    assert after["error"] == "OTHER-ID-42" and "study_key" not in after
    assert _leaks(logs.getvalue()) == [] and "_study_identifiers" not in logs.getvalue()


def test_long_values_are_cut_and_tracebacks_keep_their_end_scrubbed(logs):
    log = get_logger("t")
    log.info("x" * 2000, reason="y" * 10_000)
    try:
        raise ValueError(f"refused {MRN!r}")
    except ValueError:
        log.exception("failed")
    first, failed = _events(logs)
    assert len(first["event"]) < 560 and len(first["reason"]) < 560 and "more characters" in first["reason"]
    assert "Traceback" in failed["exception"] and failed["exception"].endswith("ValueError: refused <value>")
    assert _leaks(logs.getvalue()) == []


def test_stdlib_records_pass_through_the_same_processors(logs):
    with bind_study("k1", MRN, NAME):
        logging.getLogger("hl7apy").warning("cannot encode %s for %s", MRN, FAMILY)
        logging.getLogger("pynetdicom.assoc").error("dataset of 'Somebody^Else' id 1234567 at /in/x/%s", FILE)
    logging.getLogger("pydicom.x").critical("value %r is invalid", ACCESSION)
    logging.getLogger("quiet").info("below WARNING: library chatter stays out")
    hl7, dicom, pydicom_event = _events(logs)
    assert hl7["event"] == f"cannot encode {REDACTED} for {REDACTED}" and hl7["logger"] == "hl7apy"
    assert hl7["study_key"] == "k1" and hl7["level"] == "warning"
    assert dicom["event"] == "dataset of <value> id <n> at <path>"
    assert pydicom_event["event"] == "value <value> is invalid" and "study_key" not in pydicom_event
    assert _leaks(logs.getvalue(), ("Somebody", "1234567")) == []


# ---- error reasons ----------------------------------------------------------------------------------------------

def test_scrub_removes_values_paths_long_numbers_and_bound_identifiers():
    text = f"bad 'x' and \"y\" b'z' 1234567 at /a/b/{FILE}; the site's table; 12.5 s; Zyxwvut"
    assert scrub(text, identifiers=[FAMILY]) == \
        f"bad <value> and <value> <value> <n> at <path>; the site's table; 12.5 s; {REDACTED}"
    assert scrub("value 'cut off", identifiers=[]) == "value <value>"
    assert len(scrub("a " * 1000)) == 300


def test_classify_reduces_library_errors_to_kind_and_field():
    from hl7apy.exceptions import MaxLengthReached
    from pydantic import BaseModel
    from sqlalchemy.exc import DataError

    from gateway.hl7.oru import OruError

    with bind_study("k", MRN, NAME):
        hl7 = classify(MaxLengthReached(LONG_ID, 199))
        assert str(hl7) == "internal error: MaxLengthReached: a value exceeds its maximum length (199)"

        class Sidecar(BaseModel):
            patient_id: int

        try:
            Sidecar(patient_id=MRN)
        except Exception as exc:  # noqa: BLE001
            pyd = classify(exc)
        assert str(pyd) == "internal error: ValidationError: patient_id (int_parsing)"
        db = classify(DataError("UPDATE studies SET patient_id=%(p)s", {"p": LONG_ID}, Exception("too long")))
        assert str(db) == "database: DataError (Exception)" and not db.transient
        uni = classify(UnicodeDecodeError("utf-8", MRN.encode() + b"\xff", 12, 13, "invalid start byte"))
        assert str(uni) == "internal error: UnicodeDecodeError: invalid start byte"
        plain = classify(KeyError(f"{FAMILY} {GIVEN}"))
        assert _leaks(str(plain)) == [] and str(plain).startswith("internal error: KeyError")
        oru = classify(OruError("PID-3.1 patient identifier exceeds its maximum length (199 characters)"))
        assert str(oru) == "result message: PID-3.1 patient identifier exceeds its maximum length (199 characters)"


def test_an_over_long_patient_id_makes_a_value_free_oru_error():
    from datetime import UTC, datetime

    from gateway.hl7.oru import OruError, OruPatient, OruSettings, OruStudy, build_oru

    study = OruStudy(study_key="k", study_id=1, accession=ACCESSION, study_uid=None, observed_at=None,
                     patient=OruPatient(patient_id=LONG_ID, issuer="HOSP", family_name=FAMILY, given_name=GIVEN,
                                        birth_date=BIRTH, sex="F"),
                     model_name="m", model_version="1", model_hash=None, validated=False, head="h")
    with pytest.raises(OruError) as err:
        build_oru(study, [], [], OruSettings(), control_id="PSG1", now=datetime.now(UTC))
    assert str(err.value) == "PID-3.1 patient identifier exceeds its maximum length (199 characters)"


def test_the_dicom_folder_and_file_names_are_bound_with_the_study(tmp_path):
    from gateway.pipeline.runner import study_logging

    study = Study(key="abc", input_name=FILE, input_path=str(tmp_path / MRN), patient_id=None,
                  patient_name=NAME, birth_date=BIRTH, accession=ACCESSION, study_uid=None, dicom_study_uid="1.2.3.4")
    with study_logging(study):
        assert {FILE, f"{MRN}_night", MRN, FAMILY, GIVEN, ACCESSION, "1951-07-13", "1.2.3.4"} <= bound_identifiers()
    assert bound_identifiers() == frozenset()


def test_without_configure_logging_the_default_chain_redacts_too(capsys):
    """A CLI command or a test that logs before (or without) configure_logging(): structlog's default chain,
    with the redaction in front of its renderer; the identifier set is never in the context it renders."""
    from gateway.logging import _redacting_defaults

    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        _redacting_defaults()
        with bind_study("st-k", MRN, NAME):
            get_logger("t").info(f"study of {MRN}", patient_id=MRN, note=FAMILY)
    finally:
        structlog.configure(**saved)
    out = capsys.readouterr().out
    assert "st-k" in out and REDACTED in out and _leaks(out) == [], out
