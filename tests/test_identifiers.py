"""Site-supplied identifiers: sidecar JSON > file-name pattern > header."""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

from gateway.pipeline.identifiers import apply_site_identifiers, find_sidecar, from_filename, read_sidecar
from gateway.readers.errors import ReaderError
from gateway.recording import Channel, Demographics, Identifiers, Recording

PATTERN = r"^(?P<patient_id>\d{7})_(?P<accession>A\d+)(?:_(?P<sex>[MF]))?(?:_(?P<birth_date>\d{8}))?\.edf$"


def _recording(path: Path) -> Recording:
    return Recording(
        channels=[Channel.from_array("C3-M2", 2, np.zeros(4))],
        duration_s=2.0,
        start=datetime(2024, 3, 1, 22, 0),
        identifiers=Identifiers(patient_id="HDR-ID", patient_name="Header^Name", admin_code="HDR-ACC",
                                source_path=path),
        demographics=Demographics(sex="M", birth_date=date(1950, 1, 1)),
        format="EDF+C",
    )


def _file(tmp_path: Path, name: str = "0012345_A99.edf") -> Path:
    path = tmp_path / name
    path.write_bytes(b"0       ")
    return path


def test_no_site_source_keeps_the_header(tmp_path):
    path = _file(tmp_path)
    original = _recording(path)
    merged = apply_site_identifiers(original, path, None)
    assert merged.identifiers.patient_id == "HDR-ID" and merged.identifiers.admin_code == "HDR-ACC"
    assert merged.demographics.sex == "M" and merged.demographics.birth_date == date(1950, 1, 1)
    assert merged.identifiers is not original.identifiers and merged.channels == original.channels


def test_filename_pattern_overrides_the_header(tmp_path):
    path = _file(tmp_path, "0012345_A99_F_19610302.edf")
    merged = apply_site_identifiers(_recording(path), path, PATTERN)
    ids, demo = merged.identifiers, merged.demographics
    assert (ids.patient_id, ids.admin_code, ids.patient_name) == ("0012345", "A99", "Header^Name")
    assert demo.sex == "F" and demo.birth_date == date(1961, 3, 2)
    assert merged.age_years == pytest.approx((date(2024, 3, 1) - date(1961, 3, 2)).days / 365.2425)
    assert ids.source_path == path


def test_filename_without_optional_groups_and_non_matching_names(tmp_path):
    path = _file(tmp_path, "0012345_A99.edf")
    merged = apply_site_identifiers(_recording(path), path, PATTERN)
    assert merged.identifiers.patient_id == "0012345"
    assert merged.demographics.sex == "M"  # the group did not take part: header kept
    other = _file(tmp_path, "night.edf")
    assert apply_site_identifiers(_recording(other), other, PATTERN).identifiers.patient_id == "HDR-ID"


@pytest.mark.parametrize("sidecar_name", ["0012345_A99.edf.json", "0012345_A99.json"])
def test_sidecar_overrides_filename_and_header(tmp_path, sidecar_name):
    path = _file(tmp_path)
    (tmp_path / sidecar_name).write_text(json.dumps({
        "patient_id": "SIDE-ID", "patient_name": "Side^Car", "sex": "female", "age_years": 63.5,
        "SamplingFrequency": 256,  # an unrelated key (a BIDS sidecar): ignored
    }))
    assert find_sidecar(path) == tmp_path / sidecar_name
    merged = apply_site_identifiers(_recording(path), path, PATTERN)
    ids, demo = merged.identifiers, merged.demographics
    assert ids.patient_id == "SIDE-ID" and ids.patient_name == "Side^Car"
    assert ids.admin_code == "A99"  # the sidecar says nothing: the file name gives it
    assert demo.sex == "F"
    # age and birth date travel together: the sidecar's age replaces the header's birth date
    assert demo.birth_date is None and demo.age_years == 63.5 and merged.age_years == 63.5


def test_full_file_name_sidecar_wins_over_stem_sidecar(tmp_path):
    path = _file(tmp_path)
    (tmp_path / "0012345_A99.edf.json").write_text('{"patient_id": "FULL"}')
    (tmp_path / "0012345_A99.json").write_text('{"patient_id": "STEM"}')
    assert apply_site_identifiers(_recording(path), path, None).identifiers.patient_id == "FULL"


def test_sidecar_values(tmp_path):
    sidecar = tmp_path / "x.json"
    sidecar.write_text(json.dumps({"patient_id": 12345, "accession": "ACC-1", "admin_code": "ignored",
                                   "sex": "U", "birth_date": "1970-12-31", "study_uid": "1.2.3",
                                   "patient_id_issuer": "HOSP", "patient_name": None}))
    site = read_sidecar(sidecar)
    assert site.identifiers == {"patient_id": "12345", "admin_code": "ACC-1", "study_uid": "1.2.3",
                                "patient_id_issuer": "HOSP"}
    assert site.sex is None and site.sex_given and site.birth_date == date(1970, 12, 31)
    assert "12345" not in repr(site) and "1970" not in repr(site)


def test_sidecar_stating_unknown_sex_overrides_the_header_null_does_not(tmp_path):
    path = _file(tmp_path)
    sidecar = tmp_path / "0012345_A99.json"
    sidecar.write_text('{"sex": "unknown"}')
    assert apply_site_identifiers(_recording(path), path, None).demographics.sex is None
    sidecar.write_text('{"sex": null, "birth_date": null}')
    merged = apply_site_identifiers(_recording(path), path, None)
    assert merged.demographics.sex == "M" and merged.demographics.birth_date == date(1950, 1, 1)


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "not valid JSON: line 1"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"sex": "Femme"}', "sex must be M, F or unknown"),
    ('{"birth_date": "02/03/1961"}', "birth_date must be a date"),
    ('{"birth_date": "1961-02-30"}', "birth_date must be a date"),
    ('{"age_years": -4}', "age_years must be a number"),
    ('{"age_years": "old"}', "age_years must be a number"),
    ('{"patient_id": {"nested": 1}}', "patient_id must be a string"),
    ('{"patient_id": true}', "patient_id must be a string"),
])
def test_invalid_sidecar_is_an_error_naming_the_sidecar(tmp_path, content, needle):
    path = _file(tmp_path)
    sidecar = tmp_path / "0012345_A99.json"
    sidecar.write_text(content)
    with pytest.raises(ReaderError) as info:
        apply_site_identifiers(_recording(path), path, None)
    assert str(sidecar) in str(info.value) and needle in str(info.value)
    for value in ("Femme", "02/03/1961", "1961-02-30", '"old"', "nested"):  # never the value itself
        assert value not in info.value.reason


def test_sidecar_not_utf8(tmp_path):
    sidecar = tmp_path / "x.json"
    sidecar.write_bytes(b'{"patient_name": "M\xfcller"}')
    with pytest.raises(ReaderError, match="not UTF-8"):
        read_sidecar(sidecar)


def test_bad_filename_values_and_bad_pattern(tmp_path):
    path = _file(tmp_path, "0012345_A99_F_19611399.edf")
    with pytest.raises(ReaderError, match="file-name pattern: birth_date must be a date") as info:
        from_filename(path, PATTERN)
    assert "19611399" not in info.value.reason
    with pytest.raises(ValueError, match="does not compile"):
        apply_site_identifiers(_recording(path), path, "(?P<patient_id>[")


def test_on_a_real_edf(tmp_path):
    from gateway.readers.edf import read_edf
    from gateway.synthetic.night import write_synthetic_night

    path = write_synthetic_night(tmp_path / "7654321_A12.edf", hours=0.01, seed=5)
    (tmp_path / "7654321_A12.edf.json").write_text('{"patient_name": "Site^Name"}')
    recording = read_edf(path)
    merged = apply_site_identifiers(recording, path, PATTERN)
    assert merged.identifiers.patient_id == "7654321" and merged.identifiers.admin_code == "A12"
    assert merged.identifiers.patient_name == "Site^Name"
    assert merged.demographics.birth_date == recording.demographics.birth_date  # header's, untouched
    assert recording.identifiers.patient_id.startswith("SYN-")  # the input is not modified
    np.testing.assert_array_equal(merged.channels[0].read(), recording.channels[0].read())
    assert "7654321" not in repr(merged) and "Site" not in repr(merged)
