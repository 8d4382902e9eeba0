"""Bounded, sane identifiers (issue 15, item 4) and sidecars that must be regular, readable JSON objects (item 5).

Every value here is distinctive so that a test can say it appears nowhere it must not: in a warning, an
error's reason, the study's last_error or REASON.txt.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pipeline_env import pipeline_env, spool_file

import gateway.pipeline.identifiers as identifiers_module
from gateway.identifier_limits import FIELD_LIMITS, IdentifierError, apply_identifier_limits
from gateway.pipeline.identifiers import apply_site_identifiers
from gateway.pipeline.steps import decode_inputs
from gateway.readers.edf import read_edf
from gateway.readers.errors import ReaderError
from gateway.recording import Channel, Demographics, Recording
from gateway.store.models import State
from gateway.synthetic.dicom_study import write_psg_study
from gateway.synthetic.night import write_synthetic_night
from inference.bundle import DemographicsEncoding

HOURS = 0.1  # the pipeline's shortest night (two 5-minute windows), as tests/test_pipeline.py
LIMIT = {limit.attribute: limit.max_chars for limit in FIELD_LIMITS}
LONG_ID = "MRNQX" + "7" * 95  # 100 characters: over the patient id limit
LONG_NAME = "Zyxwvutsrq^" + "Qwertyname" * 999  # 10,000 characters


@pytest.fixture(scope="module")
def night_bytes(tmp_path_factory) -> bytes:
    return write_synthetic_night(tmp_path_factory.mktemp("n") / "n.edf", hours=HOURS, seed=5).read_bytes()


def _edf(tmp_path: Path, night_bytes: bytes, sidecar: dict | None = None, name: str = "night.edf") -> Path:
    path = tmp_path / name
    path.write_bytes(night_bytes)
    if sidecar is not None:
        (tmp_path / f"{name}.json").write_text(json.dumps(sidecar))
    return path


def _with_patient_field(night_bytes: bytes, field: str) -> bytes:
    """The EDF with its 80-character 'local patient identification' replaced."""
    data = bytearray(night_bytes)
    data[8:88] = field.encode("latin-1").ljust(80)
    return bytes(data)


def _no_value_in(texts: list[str] | str, *values: str) -> None:
    joined = "\n".join(texts) if isinstance(texts, list) else texts
    for value in values:
        assert value not in joined
        assert value[:12] not in joined  # nor a shortened copy


# ---- lengths, through the EDF reader and a sidecar -----------------------------------------------------------


def test_limits_are_within_the_database_columns():
    from gateway.store.models import Study

    column = {"patient_id": "patient_id", "patient_id_issuer": "patient_id_issuer", "admin_code": "accession",
              "study_uid": "study_uid", "patient_name": "patient_name", "scorer": "scorer"}
    for limit in FIELD_LIMITS:
        assert limit.max_chars <= Study.__table__.c[column[limit.attribute]].type.length, limit.attribute


def test_a_10000_character_name_is_cut_with_a_warning(tmp_path, night_bytes):
    path = _edf(tmp_path, night_bytes, {"patient_name": LONG_NAME})
    recording = decode_inputs([path])
    assert recording.identifiers.patient_name == LONG_NAME[: LIMIT["patient_name"]]
    assert "patient name longer than 199 characters: truncated" in recording.warnings
    _no_value_in(recording.warnings, LONG_NAME, "Zyxwvutsrq", "Qwertyname")
    assert recording.identifiers.patient_id.startswith("SYN-")  # the header's id, untouched


@pytest.mark.parametrize(("key", "label", "limit"), [
    ("patient_id", "patient id", 80),
    ("patient_id_issuer", "patient id issuer", 64),
    ("accession", "accession number", 64),
    ("study_uid", "study instance UID", 64),
])
def test_an_identifier_over_its_limit_is_refused_not_cut(tmp_path, night_bytes, key, label, limit):
    value = "IDQJ" + "8" * (limit - 3)  # one over
    path = _edf(tmp_path, night_bytes, {key: value})
    with pytest.raises(IdentifierError) as info:
        decode_inputs([path])
    assert isinstance(info.value, ReaderError) and info.value.kind == "identifiers"
    assert f"{label} longer than {limit} characters" in info.value.reason
    _no_value_in(info.value.reason, value)
    # exactly at the limit is kept whole
    (tmp_path / "night.edf.json").write_text(json.dumps({key: value[:limit]}))
    recording = decode_inputs([path])
    attribute = "admin_code" if key == "accession" else key
    assert getattr(recording.identifiers, attribute) == value[:limit] and not recording.warnings


def test_a_plain_edf_free_text_patient_field_fits_the_patient_id_limit(tmp_path, night_bytes):
    """An 80-character free-text patient field (no EDF+ layout) is one patient id: it is not refused."""
    field = "Patient of ward seven, referred by the night team for a study" + "x" * 19
    assert len(field) == 80
    path = tmp_path / "plain.edf"
    path.write_bytes(_with_patient_field(night_bytes, field))
    recording = decode_inputs([path])
    assert recording.identifiers.patient_id == field and len(recording.identifiers.patient_id) == 80


# ---- control characters ------------------------------------------------------------------------------------


def test_control_characters_are_removed_with_a_warning(tmp_path, night_bytes):
    path = _edf(tmp_path, night_bytes, {
        "patient_id": "MRN\u00003\r\n41\x1b5\x85",
        "patient_name": "Doe\r\nJane\x07\x9f",
        "accession": "ACC\t77",
    })
    recording = decode_inputs([path])
    ids = recording.identifiers
    assert (ids.patient_id, ids.patient_name, ids.admin_code) == ("MRN3415", "Doe Jane", "ACC77")
    assert {"control characters removed from the patient id", "control characters removed from the patient name",
            "control characters removed from the accession number"} <= set(recording.warnings)
    _no_value_in(recording.warnings, "MRN3415", "Doe", "ACC77")


def test_a_lone_surrogate_is_removed_and_hl7_delimiters_are_kept(tmp_path, night_bytes):
    path = tmp_path / "night.edf"
    path.write_bytes(night_bytes)
    # JSON can spell a lone surrogate, which no UTF-8 database or HL7 message can hold
    (tmp_path / "night.edf.json").write_text('{"patient_id": "PQ\\ud80012", "patient_name": "O\'Neil|A^B&C~D\\\\E"}')
    recording = decode_inputs([path])
    assert recording.identifiers.patient_id == "PQ12"
    assert recording.identifiers.patient_name == "O'Neil|A^B&C~D\\E"  # escaped by the ORU builder, not here
    assert recording.warnings.count("control characters removed from the patient id") == 1


def test_control_characters_in_the_edf_header_are_removed(tmp_path, night_bytes):
    path = tmp_path / "ctl.edf"
    path.write_bytes(_with_patient_field(night_bytes, "MRN\x0742 F 02-MAY-1951 Pqrst\x1bName"))
    recording = decode_inputs([path])
    assert recording.identifiers.patient_id == "MRN42" and recording.identifiers.patient_name == "Pqrst Name"
    assert "control characters removed from the patient id" in recording.warnings


# ---- birth date, age, sex ----------------------------------------------------------------------------------


@pytest.mark.parametrize("birth", ["2090-01-01", "1850-05-05"])
def test_an_implausible_birth_date_becomes_an_unknown_age(tmp_path, night_bytes, birth):
    path = _edf(tmp_path, night_bytes, {"birth_date": birth})
    recording = decode_inputs([path])
    assert recording.demographics.birth_date is None and recording.age_years is None
    assert "birth date implausible: age unknown" in recording.warnings
    _no_value_in(recording.warnings, birth, birth[:4])
    # the diagnosis head's demographics encoding takes an unknown age (the centre) without error
    assert DemographicsEncoding().encode(recording.age_years, recording.demographics.sex)[0] == 0.0


def test_a_birth_date_after_the_start_but_before_today_is_implausible_too(tmp_path, night_bytes):
    start = read_edf(_edf(tmp_path, night_bytes)).start
    assert start is not None and start.date() + timedelta(days=30) < date.today()
    later = start.date() + timedelta(days=30)  # the recording start is the reference, not today
    (tmp_path / "night.edf.json").write_text(json.dumps({"birth_date": later.isoformat()}))
    assert decode_inputs([tmp_path / "night.edf"]).demographics.birth_date is None
    # born on the night of the study: an age of 0 is plausible (newborn sleep studies exist)
    (tmp_path / "night.edf.json").write_text(json.dumps({"birth_date": start.date().isoformat()}))
    recording = decode_inputs([tmp_path / "night.edf"])
    assert recording.demographics.birth_date == start.date() and not recording.warnings


def test_an_implausible_birth_date_in_the_edf_header(tmp_path, night_bytes):
    path = tmp_path / "future.edf"
    path.write_bytes(_with_patient_field(night_bytes, "MRN-55 F 01-JAN-2090 Pqrst"))
    recording = decode_inputs([path])
    assert recording.demographics.sex == "F" and recording.demographics.birth_date is None
    assert "birth date implausible: age unknown" in recording.warnings


def test_an_implausible_birth_date_with_a_stated_age_keeps_the_age():
    recording = Recording(channels=[Channel.from_array("C3-M2", 2, np.zeros(4))], duration_s=2.0,
                          start=datetime(2024, 3, 1, 22, 0),
                          demographics=Demographics(birth_date=date(2090, 1, 1), age_years=47.0))
    bounded = apply_identifier_limits(recording)
    assert bounded.demographics.birth_date is None and bounded.age_years == 47.0
    assert bounded.warnings == ["birth date implausible: the stated age is used"]


def test_an_implausible_age_becomes_unknown(tmp_path, night_bytes):
    path = _edf(tmp_path, night_bytes, {"age_years": 212})
    recording = decode_inputs([path])
    assert recording.age_years is None and "age implausible: age unknown" in recording.warnings
    (tmp_path / "night.edf.json").write_text('{"age_years": -3}')  # not an age at all: the sidecar is wrong
    with pytest.raises(ReaderError, match="age_years must be a number of years, 0 or more"):
        decode_inputs([path])


def test_an_unrecognised_sex_code_in_the_edf_header_is_unknown_with_a_warning(tmp_path, night_bytes):
    path = tmp_path / "u.edf"
    path.write_bytes(_with_patient_field(night_bytes, "MRN-77 U 02-MAY-1951 Pqrst"))
    recording = decode_inputs([path])
    # the EDF+ layout is still recognised: the id is the code, not the whole field
    assert recording.identifiers.patient_id == "MRN-77" and recording.identifiers.patient_name == "Pqrst"
    assert recording.demographics.sex is None and recording.demographics.birth_date == date(1951, 5, 2)
    assert "sex code not recognised: sex unknown" in recording.warnings
    # a sidecar that states the sex replaces the header's code: no warning then
    (tmp_path / "u.edf.json").write_text('{"sex": "F"}')
    recording = decode_inputs([path])
    assert recording.demographics.sex == "F" and "sex code not recognised: sex unknown" not in recording.warnings


def test_bounding_is_idempotent_and_leaves_the_input_alone(tmp_path, night_bytes):
    path = _edf(tmp_path, night_bytes, {"patient_name": LONG_NAME, "birth_date": "2090-01-01"})
    original = read_edf(path)
    original.warnings.append("an earlier warning")
    merged = apply_site_identifiers(original, path, None)
    assert original.warnings == ["an earlier warning"]  # the reader's recording is not modified
    assert merged.warnings[0] == "an earlier warning" and len(merged.warnings) == 3
    again = apply_identifier_limits(merged)
    assert again.warnings == merged.warnings and again.identifiers == merged.identifiers
    assert again.demographics == merged.demographics


# ---- DICOM ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory) -> list[Path]:
    return write_psg_study(tmp_path_factory.mktemp("dcm"), hours=0.01, seed=4)


def _dicom_copy(files: list[Path], folder: Path, **values: str) -> list[Path]:
    """The study's instances copied into ``folder`` with the given Patient module values set in each."""
    folder.mkdir()
    out = []
    with warnings.catch_warnings():  # pydicom warns about values a conforming writer would not write
        warnings.simplefilter("ignore")
        for f in files:
            ds = pydicom.dcmread(f)
            for keyword, value in values.items():
                setattr(ds, keyword, value)
            ds.save_as(folder / f.name)
            out.append(folder / f.name)
    return out


def test_dicom_values_are_bounded_for_a_study_of_several_instances(tmp_path, dicom_files):
    paths = _dicom_copy(dicom_files, tmp_path / "s", PatientName=LONG_NAME, PatientID="DCM\x1b-4411",
                        PatientBirthDate="20900101", PatientSex="Q")
    recording = decode_inputs(paths)  # several instances: the daemon's DICOM receiver path
    assert recording.identifiers.patient_name == LONG_NAME[:199]
    assert recording.identifiers.patient_id == "DCM-4411"
    assert recording.demographics.birth_date is None and recording.demographics.sex is None
    # the synthetic study states Patient's Age too: the age stays known from it
    assert recording.age_years is not None
    assert set(recording.warnings) >= {"patient name longer than 199 characters: truncated",
                                       "control characters removed from the patient id",
                                       "birth date implausible: the stated age is used",
                                       "sex code not recognised: sex unknown"}
    _no_value_in(recording.warnings, LONG_NAME, "DCM-4411", "20900101")


def test_dicom_birth_date_without_an_age_and_other_sex(tmp_path, dicom_files):
    paths = _dicom_copy(dicom_files, tmp_path / "s", PatientBirthDate="18500101", PatientAge="", PatientSex="O")
    recording = decode_inputs(paths)
    assert recording.age_years is None and "birth date implausible: age unknown" in recording.warnings
    assert recording.demographics.sex is None and "sex code not recognised: sex unknown" not in recording.warnings


def test_a_dicom_patient_id_over_the_limit_is_refused_in_a_folder_and_as_instances(tmp_path, dicom_files):
    paths = _dicom_copy(dicom_files, tmp_path / "s", PatientID=LONG_ID)
    for inputs in ([tmp_path / "s"], paths):  # a study folder (infer, batch) and received instances
        with pytest.raises(IdentifierError, match="patient id longer than 80 characters") as info:
            decode_inputs(inputs)
        _no_value_in(info.value.reason, LONG_ID)


def test_a_dicom_folder_sidecar_replaces_an_over_long_header_id(tmp_path, dicom_files):
    _dicom_copy(dicom_files, tmp_path / "s", PatientID=LONG_ID)
    (tmp_path / "s.json").write_text('{"patient_id": "SITE-8"}')
    assert decode_inputs([tmp_path / "s"]).identifiers.patient_id == "SITE-8"


# ---- sidecars that are not regular, readable JSON objects --------------------------------------------------


def test_sidecar_kinds_are_refused_with_a_reason(tmp_path, night_bytes):
    path = _edf(tmp_path, night_bytes)
    sidecar = tmp_path / "night.edf.json"
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"patient_id": "LINKED"}')
    sidecar.symlink_to(elsewhere)
    with pytest.raises(ReaderError, match="sidecar is a symbolic link"):
        decode_inputs([path])
    sidecar.unlink()
    sidecar.symlink_to(tmp_path / "missing.json")  # a dangling link is found too, and refused
    with pytest.raises(ReaderError, match="sidecar is a symbolic link"):
        decode_inputs([path])
    sidecar.unlink()
    sidecar.mkdir()
    with pytest.raises(ReaderError, match=r"sidecar is not a regular file \(a directory\)"):
        decode_inputs([path])
    sidecar.rmdir()
    os.mkfifo(sidecar)  # opening it must not hang waiting for a writer
    with pytest.raises(ReaderError, match=r"sidecar is not a regular file \(a pipe\)"):
        decode_inputs([path])
    sidecar.unlink()
    sidecar.write_text('{"patient_id": "A1",\n "sex": }')
    with pytest.raises(ReaderError, match="sidecar is not valid JSON: line 2"):
        decode_inputs([path])


def test_an_oversized_sidecar_is_refused(tmp_path, night_bytes, monkeypatch):
    monkeypatch.setattr(identifiers_module, "SIDECAR_MAX_BYTES", 100)
    path = _edf(tmp_path, night_bytes, {"patient_name": "x" * 200})
    with pytest.raises(ReaderError, match="sidecar is larger than"):
        decode_inputs([path])


def _unreadable(monkeypatch, sidecar: Path) -> None:
    """Opening ``sidecar`` fails with EACCES (chmod 000 does not stop root, who runs some test machines)."""
    real_open = os.open

    def fake_open(file, flags, *args, **kwargs):
        if Path(file) == sidecar:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(identifiers_module.os, "open", fake_open)


# ---- end to end: the in-process pipeline -------------------------------------------------------------------


@pytest.fixture
def env(db_url, tmp_path, model):
    db, repo, pipe, paths = pipeline_env(db_url, tmp_path / "var", *model)
    yield repo, pipe, paths
    db.dispose()


def _quarantined(paths, study) -> tuple[bytes, bool]:
    """The quarantined recording's bytes, and whether its sidecar (file, link or folder) went with it.

    Names are not assumed: the pipeline may rename what it moves (to the study key)."""
    folder = paths.quarantine / study.key
    [recording] = [p for p in folder.iterdir() if p.name.endswith(".edf")]
    return recording.read_bytes(), any(p.name.endswith(".edf.json") for p in folder.iterdir())


def _failed_without_identifiers(repo, paths, study, needle: str, *values: str) -> str:
    failed = repo.get(study.id)
    assert failed.state == State.FAILED and failed.error_kind == "permanent", failed.last_error
    assert needle in failed.last_error
    # the header's identifiers were not used in its place: none stored, no message built
    assert failed.patient_id is None and failed.patient_name is None and failed.birth_date is None
    assert repo.messages(study_id=study.id) == []
    reason = (paths.quarantine / study.key / "REASON.txt").read_text()
    assert needle in reason
    for value in values:
        assert value not in failed.last_error and value not in reason
    return failed.last_error


def test_pipeline_fails_an_over_long_patient_id_without_quoting_it(env, night_bytes):
    repo, pipe, paths = env
    study = spool_file(paths, "night.edf", night_bytes, repo)
    Path(study.input_path + ".json").write_text(json.dumps({"patient_id": LONG_ID}))
    pipe.run_once("w")
    reason = _failed_without_identifiers(repo, paths, study, "patient id longer than 80 characters", LONG_ID,
                                         "MRNQX")
    assert reason.startswith("unreadable input (identifiers): ")
    # quarantined with its sidecar, for `studies replace` / `retry` once fixed
    assert _quarantined(paths, study) == (night_bytes, True)


def test_pipeline_stores_a_10000_character_name_cut_with_a_warning(env, night_bytes):
    repo, pipe, paths = env
    study = spool_file(paths, "night.edf", night_bytes, repo)
    Path(study.input_path + ".json").write_text(json.dumps({"patient_name": LONG_NAME}))
    pipe.run_once("w")
    done = repo.get(study.id)
    assert done.state == State.FLAGGED, done.last_error
    assert done.patient_name == LONG_NAME[:199] and done.patient_id.startswith("SYN-")
    metrics = json.loads((Path(done.output_path) / "metrics.json").read_text())
    warnings = metrics["recording"]["warnings"]
    assert "patient name longer than 199 characters: truncated" in warnings
    _no_value_in(warnings, LONG_NAME, "Zyxwvutsrq", "Qwertyname")
    decoded = next(e for e in repo.events(study.id) if e.event == "study.decoded")
    assert decoded.detail["warnings"] >= 1


@pytest.mark.parametrize(("case", "needle"), [
    ("symlink", "sidecar is a symbolic link"),
    ("directory", "sidecar is not a regular file"),
    ("unreadable", "cannot read the identifier sidecar: Permission denied"),
    ("invalid", "sidecar is not valid JSON: line 3"),
    ("array", "sidecar must hold a JSON object, not an array"),
])
def test_pipeline_fails_a_sidecar_it_cannot_use(env, night_bytes, tmp_path, monkeypatch, case, needle):
    repo, pipe, paths = env
    study = spool_file(paths, "night.edf", night_bytes, repo)
    sidecar = Path(study.input_path + ".json")
    if case == "symlink":
        target = tmp_path / "target.json"
        target.write_text('{"patient_id": "LINKQ-1"}')
        sidecar.symlink_to(target)
    elif case == "directory":
        sidecar.mkdir()
    elif case == "unreadable":
        sidecar.write_text('{"patient_id": "UNREADQ-1"}')
        _unreadable(monkeypatch, sidecar)
    elif case == "invalid":
        sidecar.write_text('{\n  "patient_id": "BROKENQ-1",\n  "sex" "F"\n}')
    else:
        sidecar.write_text('["ARRAYQ-1"]')
    pipe.run_once("w")
    _failed_without_identifiers(repo, paths, study, needle, "LINKQ", "UNREADQ", "BROKENQ", "ARRAYQ",
                                str(tmp_path))
    # the recording (and what was beside it) is quarantined, nothing deleted
    assert _quarantined(paths, study) == (night_bytes, True)

