"""ORU^R01 v2.5.1 of one study: read back by python-hl7 (an independent parser) and by hl7apy in STRICT mode."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta, timezone

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from gateway.hl7.oru import (
    DISCLAIMER,
    EQUIPMENT_MAX,
    UNVALIDATED_WARNING,
    OruError,
    OruFlag,
    OruMetric,
    OruPatient,
    OruSettings,
    OruStudy,
    build_oru,
)

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
START = datetime(2026, 3, 3, 22, 15, 0, tzinfo=timezone(timedelta(hours=-5)))
HASH = "0123456789abcdef" * 4
SPECIAL = "a|b^c~d\\e&f"  # every delimiter and the escape character


PATIENT = OruPatient(patient_id="MRN0042", issuer="HOSP-A", family_name="Doe", given_name="Jane",
                     birth_date=date(1950, 3, 4), sex="F")
STUDY = OruStudy(study_key="st-1a2b3c4d5e6f", study_id=7, accession="ACC123", study_uid="1.2.3.4",
                 observed_at=START, patient=PATIENT, model_name="sleepfm", model_version="1.0.0",
                 model_hash=HASH, validated=True, head="SleepFM diagnosis head (CoxPH)")


def _patient(**kw) -> OruPatient:
    return dataclasses.replace(PATIENT, **kw)


def _study(**kw) -> OruStudy:
    return dataclasses.replace(STUDY, **kw)


FLAGS = (
    OruFlag(code="PSG-HF", text="Heart failure risk (SleepFM)", phecode="428", hazard_ratio=2.31,
            percentile=97.5, reason="hazard ratio 2.31 >= 2.0"),
    OruFlag(code="PSG-AF", text="Atrial fibrillation risk (SleepFM)", phecode=None, hazard_ratio=1.8,
            percentile=None, reason="hazard ratio 1.8 >= 1.5"),
)
METRICS = (
    OruMetric(loinc="93832-4", local_code="PSG-TST", text="Total sleep time", value=401.5, units="min"),
    OruMetric(loinc="93829-0", local_code="PSG-REM", text="REM sleep duration", value=80.0, units="min"),
    OruMetric(loinc=None, local_code="PSG-SE", text="Sleep efficiency", value=88.25, units="%"),
)


def _build(study=None, flags=FLAGS, metrics=METRICS, settings=None, **kw) -> str:
    kw.setdefault("control_id", "PSG0000000000000001")
    kw.setdefault("now", NOW)
    return build_oru(study or _study(), flags, metrics, settings or OruSettings(), **kw)


def _strict(er7: str):
    msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()
    return msg


def _f(msg: hl7.Message, seg: str, field: int, comp: int = 1, n: int = 1, rep: int = 1) -> str:
    """One component, unescaped (python-hl7's extract_field decodes the escape sequences)."""
    return msg.extract_field(seg, n, field, rep, comp)


def _raw(seg, field: int) -> str:
    return str(seg[field]) if len(seg) > field else ""  # python-hl7 ends a segment at its last valued field


def _obx(msg: hl7.Message) -> list[dict]:
    out = []
    for i, seg in enumerate(msg.segments("OBX"), 1):
        out.append({"id": _f(msg, "OBX", 1, n=i), "type": _f(msg, "OBX", 2, n=i),
                    "code": tuple(_f(msg, "OBX", 3, c, n=i) for c in (1, 2, 3)), "sub": _f(msg, "OBX", 4, n=i),
                    "value": _raw(seg, 5), "units": _raw(seg, 6), "abnormal": _raw(seg, 8), "status": _raw(seg, 11),
                    "method": _raw(seg, 17), "equipment": _raw(seg, 18)})
    return out


def test_message_fields_read_back_by_python_hl7():
    er7 = _build(notes=["Percentile thresholds inactive: reference set too small"])
    assert "\n" not in er7 and er7.count("\r") == len(er7.split("\r")) - 1
    msg = hl7.parse(er7)
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "ORC", "OBR", "NTE", "NTE", "TQ1",
                                        "OBX", "OBX", "OBX", "NTE", "OBX", "OBX", "NTE", "OBX", "OBX", "OBX"]
    # MSH
    assert str(msg.segment("MSH")[2]) == "^~\\&"
    assert [_f(msg, "MSH", i) for i in (3, 4, 5, 6)] == ["PSG-GATEWAY", "SLEEPLAB", "EHR", "HOSPITAL"]
    assert _f(msg, "MSH", 7) == "20260304050607+0000"
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert _f(msg, "MSH", 10) == "PSG0000000000000001"
    assert _f(msg, "MSH", 11) == "P"
    assert _f(msg, "MSH", 12) == "2.5.1"
    assert _f(msg, "MSH", 18) == "UNICODE UTF-8"
    # PID / PV1
    assert str(msg.segment("PID")[3]) == "MRN0042^^^HOSP-A^MR"
    assert (_f(msg, "PID", 5, 1), _f(msg, "PID", 5, 2)) == ("Doe", "Jane")
    assert (_f(msg, "PID", 7), _f(msg, "PID", 8)) == ("19500304", "F")
    assert _f(msg, "PV1", 2) == "O"
    # ORC / OBR / TQ1
    assert [str(msg.segment("ORC")[i]) for i in (1, 2, 3, 5)] == ["RE", "ACC123", "ACC123^PSG-GATEWAY", "CM"]
    obr = msg.segment("OBR")
    assert (str(obr[2]), str(obr[3])) == ("ACC123", "ACC123^PSG-GATEWAY")
    assert str(obr[4]) == "90568-7^Polysomnography panel^LN"
    assert str(obr[7]) == "20260303221500-0500" and str(obr[22]) == "20260304050607+0000"
    assert str(obr[25]) == "F"
    assert str(msg.segment("TQ1")[9]) == "R^Routine^HL70485"
    # order notes
    notes = [_f(msg, "NTE", 3, n=i) for i in (1, 2)]
    assert notes == [DISCLAIMER, "Percentile thresholds inactive: reference set too small"]
    # OBX: per flag hazard ratio, percentile (when known) and the coded flag, then the metrics
    obx = _obx(msg)
    assert [o["id"] for o in obx] == [str(i) for i in range(1, 9)]
    assert [(o["type"], o["code"], o["sub"], o["value"], o["units"]) for o in obx] == [
        ("NM", ("PSG-HF-HR", "Heart failure risk (SleepFM) hazard ratio", "99PSG"), "1", "2.31", ""),
        ("NM", ("PSG-HF-PCT", "Heart failure risk (SleepFM) percentile", "99PSG"), "1", "97.5", ""),
        ("CWE", ("PSG-HF", "Heart failure risk (SleepFM)", "99PSG"), "1",
         "PSG-HF^Heart failure risk (SleepFM)^99PSG^428^Phecode 428^99PHECODE", ""),
        ("NM", ("PSG-AF-HR", "Atrial fibrillation risk (SleepFM) hazard ratio", "99PSG"), "2", "1.8", ""),
        ("CWE", ("PSG-AF", "Atrial fibrillation risk (SleepFM)", "99PSG"), "2",
         "PSG-AF^Atrial fibrillation risk (SleepFM)^99PSG", ""),
        ("NM", ("93832-4", "Total sleep time", "LN"), "", "401.5", "min^minutes^UCUM"),
        ("NM", ("93829-0", "REM sleep duration", "LN"), "", "80", "min^minutes^UCUM"),
        ("NM", ("PSG-SE", "Sleep efficiency", "99PSG"), "", "88.25", "%^percent^UCUM"),
    ]
    assert all(o["abnormal"] == "" and o["status"] == "F" for o in obx)
    flag_obx, metric_obx = obx[:5], obx[5:]
    assert all(o["method"] == "^SleepFM diagnosis head (CoxPH)~^sleepfm 1.0.0 0123456789abcdef" for o in flag_obx)
    assert all(o["equipment"] == "0123456789abcdef" for o in flag_obx)  # v2.5.1: OBX-18 at most 22
    assert all(o["method"] == "" and o["equipment"] == "" for o in metric_obx)
    # the reason follows each coded flag
    segs = [str(s[0]) for s in msg]
    reasons = [_f(msg, "NTE", 3, n=i) for i in (3, 4)]
    assert reasons == ["hazard ratio 2.31 >= 2.0", "hazard ratio 1.8 >= 1.5"]
    assert segs[11] == "NTE" and segs[10] == "OBX" and _f(msg, "OBX", 2, n=3) == "CWE"
    _strict(er7)


@pytest.mark.parametrize("case", ["full", "no_flags", "no_metrics", "empty", "unknown_patient", "correction",
                                  "unvalidated", "naive_times", "special_text"])
def test_hl7apy_strict_parse_validates(case):
    kw = {}
    study = _study()
    if case == "no_flags":
        kw["flags"] = ()
    elif case == "no_metrics":
        kw["metrics"] = ()
    elif case == "empty":
        kw.update(flags=(), metrics=())
        study = _study(model_hash=None, head="none", observed_at=None, accession=None)
    elif case == "unknown_patient":
        study = _study(patient=_patient(issuer=None, family_name=None, given_name=None, birth_date=None, sex=None))
    elif case == "correction":
        kw["correction"] = True
    elif case == "unvalidated":
        study = _study(validated=False)
    elif case == "naive_times":
        study = _study(observed_at=START.replace(tzinfo=None))
        kw["now"] = NOW.replace(tzinfo=None)
    elif case == "special_text":
        study = _study(head=SPECIAL, model_name=SPECIAL,
                       patient=_patient(family_name=SPECIAL, given_name=SPECIAL, issuer="A&B"))
        kw["flags"] = (dataclasses.replace(FLAGS[0], text=SPECIAL, reason=SPECIAL),)
        kw["notes"] = (SPECIAL,)
    er7 = _build(study, **kw)
    parsed = _strict(er7)
    assert parsed.to_er7() == er7  # hl7apy reads and writes it back unchanged
    assert _f(hl7.parse(er7), "MSH", 9, 3) == "ORU_R01"


def test_processing_id_is_t_for_untrained_weights_with_a_warning():
    validated, unvalidated = hl7.parse(_build()), hl7.parse(_build(_study(validated=False)))
    assert _f(validated, "MSH", 11) == "P" and _f(unvalidated, "MSH", 11) == "T"
    order_notes = [_f(unvalidated, "NTE", 3, n=i) for i in (1, 2)]
    assert order_notes == [DISCLAIMER, UNVALIDATED_WARNING]
    assert UNVALIDATED_WARNING not in _build()


def test_correction_keeps_identifiers_and_marks_results_corrected():
    original = hl7.parse(_build(control_id="PSGORIGINAL"))
    corrected = hl7.parse(_build(control_id="PSGCORRECTION", correction=True,
                                 flags=(dataclasses.replace(FLAGS[0], hazard_ratio=2.5), FLAGS[1])))
    assert _f(original, "MSH", 10) != _f(corrected, "MSH", 10)
    for seg, field in (("ORC", 2), ("ORC", 3), ("OBR", 2), ("OBR", 3), ("OBR", 4)):
        assert str(original.segment(seg)[field]) == str(corrected.segment(seg)[field])
    assert _f(original, "OBR", 25) == "F" and _f(corrected, "OBR", 25) == "C"
    assert _f(corrected, "ORC", 1) == "RE"
    before, after = _obx(original), _obx(corrected)
    assert [(o["code"], o["sub"]) for o in before] == [(o["code"], o["sub"]) for o in after]
    assert {o["status"] for o in before} == {"F"} and {o["status"] for o in after} == {"C"}
    assert after[0]["value"] == "2.5"


def test_preliminary_result_status():
    msg = hl7.parse(_build(settings=OruSettings(result_status="P")))
    assert _f(msg, "OBR", 25) == "P" and {o["status"] for o in _obx(msg)} == {"P"}
    with pytest.raises(OruError, match="result status"):
        _build(settings=OruSettings(result_status="C"))


def test_escaping_round_trips():
    study = _study(head=SPECIAL, patient=_patient(family_name=SPECIAL, given_name="Jo\\Ann", issuer="A&B"))
    flag = dataclasses.replace(FLAGS[0], text=SPECIAL, reason=SPECIAL, phecode="428")
    looks_escaped = "literal \\F\\ and \\E\\ and \\.br\\ stay text"
    er7 = _build(study, flags=(flag,), notes=(SPECIAL, looks_escaped))
    raw = er7.split("\r")
    assert len(raw) == len(hl7.parse(er7))
    pid = next(s for s in raw if s.startswith("PID|"))
    assert "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f" in pid and "Jo\\E\\Ann" in pid and "A\\T\\B" in pid
    msg = hl7.parse(er7)
    assert (_f(msg, "PID", 5, 1), _f(msg, "PID", 5, 2), _f(msg, "PID", 3, 4)) == (SPECIAL, "Jo\\Ann", "A&B")
    assert _f(msg, "OBX", 3, 2, n=1) == f"{SPECIAL} hazard ratio"
    assert _f(msg, "OBX", 5, 2, n=3) == SPECIAL  # the coded flag's text
    assert _f(msg, "OBX", 17, 2, n=1) == SPECIAL
    assert [_f(msg, "NTE", 3, n=i) for i in (2, 3, 4)] == [SPECIAL, looks_escaped, SPECIAL]
    # hl7apy reads the same text back (its values keep the escape sequences: decode them to compare)
    parsed = _strict(er7)
    nte = parsed.oru_r01_patient_result.oru_r01_order_observation.nte[1]
    decoded = hl7.parse("MSH|^~\\&|\rNTE|1||" + nte.nte_3.to_er7()).extract_field("NTE", 1, 3)
    assert decoded == SPECIAL


def test_line_breaks_and_control_characters_become_spaces():
    er7 = _build(notes=("line one\r\nline two\ttab",))
    msg = hl7.parse(er7)
    assert len(er7.split("\r")) == len(msg)
    assert _f(msg, "NTE", 3, n=2) == "line one  line two tab"


def test_no_flags_sends_metrics_only():
    er7 = _build(flags=())
    msg = hl7.parse(er7)
    obx = _obx(msg)
    assert [o["code"][0] for o in obx] == ["93832-4", "93829-0", "PSG-SE"]
    assert [o["sub"] for o in obx] == ["", "", ""]
    assert [str(s[0]) for s in msg].count("NTE") == 1
    _strict(er7)


def test_connectivity_test_message_without_results():
    study = _study(accession=None, observed_at=None, model_hash=None, head="none", validated=False,
                   patient=_patient(issuer=None, family_name="TEST", given_name="PSGGATEWAY", birth_date=None,
                                    sex=None))
    er7 = _build(study, flags=(), metrics=(), notes=["psg-gateway connectivity test: not a result"])
    msg = hl7.parse(er7)
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "ORC", "OBR", "NTE", "NTE", "NTE", "TQ1"]
    assert str(msg.segment("OBR")[7]) == ""
    _strict(er7)


def test_unknown_patient_fields_still_validate():
    study = _study(patient=_patient(issuer=None, family_name=None, given_name=None, birth_date=None, sex=None))
    er7 = _build(study)
    msg = hl7.parse(er7)
    assert str(msg.segment("PID")[3]) == "MRN0042^^^^MR"
    assert str(msg.segment("PID")[5]) == "^^^^^^U"  # name type "unspecified"
    assert str(msg.segment("PID")[7]) == "" and _f(msg, "PID", 8) == "U"
    _strict(er7)
    family_only = hl7.parse(_build(_study(patient=_patient(given_name=None, sex="X"))))
    assert str(family_only.segment("PID")[5]) == "Doe" and _f(family_only, "PID", 8) == "U"


def test_assigning_authority_falls_back_to_the_setting():
    settings = OruSettings(mrn_assigning_authority="HOSPMRN")
    own = hl7.parse(_build(settings=settings))
    fallback = hl7.parse(_build(_study(patient=_patient(issuer=None)), settings=settings))
    assert _f(own, "PID", 3, 4) == "HOSP-A" and _f(fallback, "PID", 3, 4) == "HOSPMRN"


def test_missing_patient_identifier_is_an_error():
    with pytest.raises(OruError, match="PID-3"):
        _build(_study(patient=_patient(patient_id=None)))


def test_order_numbers_come_from_the_study_key_without_accession():
    msg = hl7.parse(_build(_study(accession=None)))
    assert str(msg.segment("ORC")[2]) == "st-1a2b3c4d5e6f"
    assert str(msg.segment("OBR")[3]) == "st-1a2b3c4d5e6f^PSG-GATEWAY"


def test_settings_addressing_coding_and_abnormal_flag():
    settings = OruSettings(sending_application="PSG", sending_facility="SLEEP2", receiving_application="EPIC",
                           receiving_facility="MAIN", local_code_system="99LOC", phecode_system="99PHE",
                           abnormal_flag="A", priority="S")
    msg = hl7.parse(_build(settings=settings))
    assert [_f(msg, "MSH", i) for i in (3, 4, 5, 6)] == ["PSG", "SLEEP2", "EPIC", "MAIN"]
    assert str(msg.segment("TQ1")[9]) == "S^Stat^HL70485"
    obx = _obx(msg)
    assert obx[0]["code"][2] == "99LOC" and obx[2]["value"].endswith("^428^Phecode 428^99PHE")
    assert [o["abnormal"] for o in obx] == ["A"] * 5 + [""] * 3  # results of the flags only, not the metrics
    assert obx[7]["code"][2] == "99LOC"


def test_equipment_identifier_fits():
    """OBX-18 within v2.5.1's 22 characters, stable per model; the full identity in OBX-17's second method."""
    no_hash = hl7.parse(_build(_study(model_hash=None))).segment("OBX")
    short = str(no_hash[18])
    assert len(short) == 16 and set(short) <= set("0123456789abcdef")
    assert str(hl7.parse(_build(_study(model_hash=None))).segment("OBX")[18]) == short  # stable
    assert str(no_hash[17]).endswith("~^sleepfm 1.0.0")
    other = hl7.parse(_build(_study(model_hash=None, model_version="1.0.1"))).segment("OBX")
    assert str(other[18]) != short  # another model, another identifier
    long_name = _build(_study(model_name="m" * 400))
    obx = hl7.parse(long_name).segment("OBX")
    assert str(obx[18]) == "0123456789abcdef" and len(str(obx[18])) <= EQUIPMENT_MAX == 22
    identity = str(obx[17]).split("~")[1]
    assert len(identity) == 200 and identity.endswith(" 1.0.0 0123456789abcdef")  # "^" + 199 characters
    _strict(long_name)


def test_long_text_is_cut_to_fit_and_still_validates():
    flag = dataclasses.replace(FLAGS[0], text="x" * 500, reason="r" * 5000)
    er7 = _build(flags=(flag,), notes=("n" * 3000,))
    msg = hl7.parse(er7)
    assert len(_f(msg, "OBX", 5, 2, n=3)) == 199 and len(_f(msg, "OBX", 3, 2, n=1)) == 199
    assert _f(msg, "NTE", 3, n=2) == "n" * 3000
    _strict(er7)


@pytest.mark.parametrize(("value", "shown"), [(2.0, "2"), (2.3100000001, "2.31"), (-0.0, "0"), (1e-7, "0"),
                                              (123456.5, "123456.5")])
def test_numbers_are_plain_decimals(value, shown):
    msg = hl7.parse(_build(flags=(dataclasses.replace(FLAGS[0], hazard_ratio=value),), metrics=()))
    assert str(msg.segment("OBX")[5]) == shown


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_numbers_are_an_error(bad):
    with pytest.raises(OruError, match="hazard ratio"):
        _build(flags=(dataclasses.replace(FLAGS[0], hazard_ratio=bad),))


def test_values_too_long_for_their_field_are_a_clear_error():
    with pytest.raises(OruError, match="MSH-3"):
        _build(settings=OruSettings(sending_application="A" * 21))
    with pytest.raises(OruError, match="MSH-10"):
        _build(control_id="X" * 21)
