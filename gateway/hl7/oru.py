"""The ORU^R01 (HL7 v2.5.1) of one study: a pure function from plain values to validated ER7 text.

Layout (segment order as the ORU_R01 structure has it)::

    MSH  |^~\\&  3/4 sending app/facility  5/6 receiving app/facility  7 now  9 ORU^R01^ORU_R01
         10 control id  11 P (T: unvalidated weights)  12 2.5.1  18 UNICODE UTF-8
    PID  1 "1"  3 MRN^^^authority^MR (no MRN: OruError)  5 family^given (unknown: ^^^^^^U)  7 birth date
         8 M/F/O (anything else U)
    PV1  1 "1"  2 O (outpatient: a sleep study is an outpatient procedure; the result is not a visit event)
    ORC  1 RE  2 placer  3 filler^sending app  5 CM
    OBR  1 "1"  2/3 as ORC  4 90568-7^Polysomnography panel^LN  7 recording start  22 now  25 P/F (C)
    NTE  1 set id  3 text: the AI disclaimer, the untrained-weights warning, then each caller note
    TQ1  9 priority (R^Routine^HL70485): v2.5.1 carries priority in TQ1; OBR-5 and OBR-27 are legacy only
    OBX  per flag n (OBX-4 = n ties the group): NM hazard ratio, NM percentile (when known), then
         CWE flag (code^text^99PSG^phecode^Phecode N^99PHECODE) followed by an NTE with the reason;
         8 abnormal flag (settings; empty by default)  17 ^method text~^model name version hash16
         18 hash16: the model checkpoint's first 16 hex digits (v2.5.1 limits OBX-18 to 22 characters;
         without a hash, the first 16 hex digits of SHA-256 of "name NUL version"), stable per model
    OBX  per sleep metric: NM with LOINC (else the local code), 6 unit^text^UCUM
    OBX  the study report when given (OruStudy.report, opt-in: hl7.embed_report): ED,
         3 PSG-REPORT^Sleep study report (AI-generated)^99PSG^28633-6^Polysomnography (sleep) study^LN,
         5 ^AP^PDF^Base64^<the file in Base64, one line>
    (every OBX: 1 set id  2 NM/CWE/ED  3 code^text^system  11 P/F, C on a correction; no OBX-14: OBR-7 applies)

Free text goes in as typed ST/FT objects (hl7apy escapes ``| ^ ~ &``); the escape character itself is
escaped here first (``\\`` -> ``\\E\\``) because hl7apy leaves text that already looks like an escape
sequence alone. Line breaks and other control characters become spaces.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException, MaxLengthReached
from hl7apy.v2_5_1 import get_base_datatypes

__all__ = [
    "DISCLAIMER",
    "PANEL_CODE",
    "PANEL_TEXT",
    "REPORT_CODE",
    "REPORT_LOINC",
    "REPORT_MAX_BYTES",
    "UNVALIDATED_WARNING",
    "OruAttachment",
    "OruError",
    "OruFlag",
    "OruMetric",
    "OruPatient",
    "OruSettings",
    "OruStudy",
    "build_oru",
]

_VERSION = "2.5.1"
_STRICT = VALIDATION_LEVEL.STRICT
_DT = get_base_datatypes()
_DTM = _DT["DTM"]


# Typed values for hl7apy: escaped on output, and STRICT so hl7apy checks their length.
def _ST(value: str) -> object:
    return _DT["ST"](value, validation_level=_STRICT)


def _FT(value: str) -> object:
    return _DT["FT"](value, validation_level=_STRICT)


def _ID(value: str) -> object:
    return _DT["ID"](value, validation_level=_STRICT)


def _IS(value: str) -> object:
    return _DT["IS"](value, validation_level=_STRICT)


_ST_MAX = 199  # hl7apy's ST limit (and the v2.5.1 component length of CE/CWE text)

PANEL_CODE, PANEL_TEXT, LOINC = "90568-7", "Polysomnography panel", "LN"
PATIENT_CLASS = "O"  # outpatient
DISCLAIMER = "AI-generated estimate, not a diagnosis."
UNVALIDATED_WARNING = "NOT FOR CLINICAL USE: untrained demonstration model weights."
HASH_CHARS = 16  # OBX-18 carries the model hash's first 16 hex digits (64 bits: unique enough to identify)
EQUIPMENT_MAX = 22  # v2.5.1's length of OBX-18 (Equipment Instance Identifier, EI), whole field
_PRIORITIES = {"S": "Stat", "A": "ASAP", "R": "Routine", "P": "Preop", "C": "Callback", "T": "Timing critical",
               "PRN": "As needed"}
_UNIT_TEXT = {"min": "minutes", "h": "hours", "s": "seconds", "%": "percent", "/h": "per hour",
              "1": "unity", "{beats}/min": "beats per minute", "/min": "per minute"}
_SEXES = {"M", "F", "O", "U", "A", "N"}  # HL7 table 0001

# The study report (a PDF) as one OBX of type ED. OBX-3: our local code first (it is our AI report, not the
# sleep physician's interpreted study), LOINC 28633-6 "Polysomnography (sleep) study" (a document code, the one
# LOINC names for the overall PSG report) as the alternate identifier.
REPORT_CODE, REPORT_TEXT = "PSG-REPORT", "Sleep study report (AI-generated)"
REPORT_LOINC, REPORT_LOINC_TEXT = "28633-6", "Polysomnography (sleep) study"
REPORT_MAX_BYTES = 8 * 1024 * 1024  # a report is 100-300 kB; a bigger file is a mistake, not a report
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


class OruError(ValueError):
    """The study cannot be expressed as a valid ORU^R01 (the message says which field and why, never the
    value: it is stored as the study's failure reason and logged, and the value can be a patient's MRN)."""


def _problem(exc: HL7apyException) -> str:
    """What hl7apy refused, without the value: its MaxLengthReached text quotes the whole value (a
    10,000-character patient id once filled a log line); its structure errors name elements only."""
    if isinstance(exc, MaxLengthReached):
        return f"exceeds its maximum length ({exc.limit} characters)"
    return f"is not valid ({type(exc).__name__})"


@dataclass(frozen=True)
class OruSettings:
    sending_application: str = "PSG-GATEWAY"
    sending_facility: str = "SLEEPLAB"
    receiving_application: str = "EHR"
    receiving_facility: str = "HOSPITAL"
    mrn_assigning_authority: str | None = None  # PID-3.4 when the study has no issuer of its own
    local_code_system: str = "99PSG"  # our own codes (flags, scores)
    phecode_system: str = "99PHECODE"  # phecodes as their own local system, never a standard one
    result_status: str = "F"  # P or F for an original result
    abnormal_flag: str | None = None  # OBX-8; empty by default (an abnormal flag can raise in-basket alerts)
    priority: str = "R"  # TQ1-9 (HL7 table 0485); routine


@dataclass(frozen=True)
class OruPatient:
    patient_id: str | None
    issuer: str | None
    family_name: str | None
    given_name: str | None
    birth_date: date | None
    sex: str | None  # "M" / "F" / None (-> "U")


@dataclass(frozen=True)
class OruFlag:
    code: str  # local code, e.g. "PSG-HF"
    text: str  # e.g. "Heart failure risk (SleepFM)"
    phecode: str | None  # e.g. "428"
    # exp(log-hazard) against the bundle's declared baseline; None (no -HR OBX) when the bundle does not
    # declare the outcome calibrated: a Cox head's exp(log-hazard) is then not a ratio to anything.
    hazard_ratio: float | None
    percentile: float | None  # None when percentile thresholds are not active
    reason: str  # e.g. "percentile 97.1 >= 95 (site reference of 412 studies)"
    head: str | None = None  # OBX-17 for this flag when not the study's head (a site head: name@checksum)


@dataclass(frozen=True)
class OruMetric:
    loinc: str | None  # e.g. "93832-4" (total sleep time); None -> local code
    local_code: str  # e.g. "PSG-TST"
    text: str  # e.g. "Total sleep time"
    value: float
    units: str  # UCUM: "min", "%"


@dataclass(frozen=True)
class OruAttachment:
    """A document carried in the message itself: OBX-2 ``ED``, OBX-5 ``^AP^<subtype>^Base64^<data>``."""

    data: bytes  # the file as it is (a PDF: starts with %PDF-)
    subtype: str = "PDF"  # ED-3 (HL7 table 0291, MIME subtypes): PDF for the study report
    type_of_data: str = "AP"  # ED-2 (HL7 table 0191): AP, application data


@dataclass(frozen=True)
class OruStudy:
    study_key: str  # our non-PHI key, e.g. "st-1a2b3c4d5e6f"
    study_id: int
    accession: str | None
    study_uid: str | None
    observed_at: datetime | None  # recording start (OBR-7)
    patient: OruPatient
    model_name: str
    model_version: str
    model_hash: str | None
    validated: bool
    head: str  # method, e.g. "SleepFM diagnosis head (CoxPH)"
    report: OruAttachment | None = None  # the study report (PDF), sent only when hl7.embed_report is on


# --- values -----------------------------------------------------------------------------------------------

def _clean(text: str | None) -> str:
    """One line of text: control characters (CR ends a segment) become spaces, outer blanks go."""
    if not text:
        return ""
    return "".join(" " if ord(c) < 32 or c == "\x7f" else c for c in text).strip()


def _esc(text: str) -> str:
    # The escape character first; hl7apy escapes | ^ ~ & itself and leaves \X\ sequences as they are.
    return text.replace("\\", "\\E\\")


def _text(text: str | None, limit: int = _ST_MAX) -> str:
    """Display text, cut to ``limit`` characters as hl7apy counts them (after escaping the escape char)."""
    out, used = [], 0
    for c in _clean(text):
        cost = 3 if c == "\\" else 1
        if used + cost > limit:
            break
        out.append(c)
        used += cost
    return _esc("".join(out).rstrip())


def _st(text: str | None) -> object:
    return _ST(_text(text))


def _ident(value: str | None, what: str, kind: Callable[[str], object] = _ST) -> object:
    """An identifier or code: never cut (a cut identifier names something else); too long is an error."""
    value = _clean(value)
    try:
        return kind(_esc(value))
    except HL7apyException as exc:
        raise OruError(f"{what} {_problem(exc)}") from None


def _nm(value: float, what: str) -> str:
    """An NM value: plain decimal (no exponent), at most 6 decimals, no trailing zeros."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OruError(f"{what} is not a number") from None
    if not math.isfinite(x):
        raise OruError(f"{what} is not a finite number")
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    s = "0" if s in ("", "-0") else s
    if len(s) > 16:
        raise OruError(f"{what} does not fit an NM value (16 characters)")
    return s


def _dtm(value: datetime | date) -> object:
    """DTM to the second, with the UTC offset when the datetime has one; a date alone for a date."""
    if not isinstance(value, datetime):
        return _DTM(datetime(value.year, value.month, value.day), out_format="%Y%m%d")
    offset = ""
    delta = value.utcoffset()
    if delta is not None:
        minutes = int(delta.total_seconds() // 60)
        sign = "-" if minutes < 0 else "+"
        offset = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return _DTM(value.replace(tzinfo=None), out_format="%Y%m%d%H%M%S", offset=offset)


# --- segments ----------------------------------------------------------------------------------------------

def _msh(msg: Message, study: OruStudy, s: OruSettings, control_id: str, now: datetime) -> None:
    msh = msg.msh
    msh.msh_3.hd_1 = _ident(s.sending_application, "MSH-3 sending application", _IS)
    msh.msh_4.hd_1 = _ident(s.sending_facility, "MSH-4 sending facility", _IS)
    msh.msh_5.hd_1 = _ident(s.receiving_application, "MSH-5 receiving application", _IS)
    msh.msh_6.hd_1 = _ident(s.receiving_facility, "MSH-6 receiving facility", _IS)
    msh.msh_7.ts_1.value = _dtm(now)  # hl7apy pre-fills MSH-7 with its own clock
    msh.msh_9.msg_1 = _ID("ORU")
    msh.msh_9.msg_2 = _ID("R01")
    msh.msh_9.msg_3 = _ID("ORU_R01")
    if not _clean(control_id) or len(_clean(control_id)) > 20:
        raise OruError("MSH-10 control id must be 1 to 20 characters")
    msh.msh_10 = _ident(control_id, "MSH-10 control id")
    msh.msh_11.pt_1 = _ID("P" if study.validated else "T")
    msh.msh_18 = _ID("UNICODE UTF-8")


def _pid(group, patient: OruPatient, s: OruSettings) -> None:
    pid = group.add_segment("PID")
    pid.pid_1 = "1"
    if not _clean(patient.patient_id):
        raise OruError("PID-3: the study has no patient identifier; the EHR could not file the result")
    pid.pid_3.cx_1 = _ident(patient.patient_id, "PID-3.1 patient identifier")
    authority = _clean(patient.issuer) or _clean(s.mrn_assigning_authority)
    if authority:
        pid.pid_3.cx_4.hd_1 = _ident(authority, "PID-3.4 assigning authority", _IS)
    pid.pid_3.cx_5 = "MR"
    family, given = _text(patient.family_name), _text(patient.given_name)
    if family:
        pid.pid_5.xpn_1.fn_1 = _ST(family)
    if given:
        pid.pid_5.xpn_2 = _ST(given)
    if not family and not given:
        pid.pid_5.xpn_7 = _ID("U")  # name type "unspecified": PID-5 is required, the name is unknown
    if patient.birth_date is not None:
        pid.pid_7.ts_1 = _dtm(patient.birth_date if not isinstance(patient.birth_date, datetime)
                              else patient.birth_date.date())
    sex = (patient.sex or "").strip().upper()
    pid.pid_8 = _IS(sex if sex in _SEXES else "U")


def _order_numbers(study: OruStudy, s: OruSettings) -> tuple[str, str]:
    number = _clean(study.accession) or _clean(study.study_key)
    if not number:
        raise OruError("ORC-2/3: the study has neither an accession number nor a key")
    return number, _clean(s.sending_application)


def _ei(field, number: str, namespace: str | None, what: str) -> None:
    field.ei_1 = _ident(number, f"{what}.1 entity identifier")
    if namespace:
        field.ei_2 = _ident(namespace, f"{what}.2 namespace", _IS)


def _ce(field, code: str | None, text: str | None, system: str | None, what: str,
        alternate: tuple[str, str, str] | None = None) -> None:
    """CE/CWE components 1-3 of a CE or CWE field, and 4-6 (the alternate identifier) when given."""
    prefix = field.datatype.lower()
    if code:
        setattr(field, f"{prefix}_1", _ident(code, f"{what}.1 identifier"))
    if text:
        setattr(field, f"{prefix}_2", _st(text))
    if system:
        setattr(field, f"{prefix}_3", _ident(system, f"{what}.3 coding system", _ID))
    if alternate:
        alt_code, alt_text, alt_system = alternate
        setattr(field, f"{prefix}_4", _ident(alt_code, f"{what}.4 alternate identifier"))
        setattr(field, f"{prefix}_5", _st(alt_text))
        setattr(field, f"{prefix}_6", _ident(alt_system, f"{what}.6 alternate coding system", _ID))


def _nte(parent, set_id: int, text: str) -> None:
    nte = parent.add_segment("NTE")
    nte.nte_1 = str(set_id)
    nte.nte_3 = _FT(_text(text, limit=65536))


class _Obx:
    """OBX numbering and the fields every OBX of the message shares."""

    def __init__(self, order, study: OruStudy, s: OruSettings, status: str):
        self.order, self.study, self.s, self.status = order, study, s, status
        self.set_id = 0
        self.equipment = _equipment(study)

    def add(self, value_type: str, ident: tuple[str, ...], value: str | tuple[str | object | None, ...], *,
            sub_id: str | None = None, units: str | None = None, flag: bool = False, head: str | None = None):
        """One OBX in its own observation group. ``ident``: code, text, system (and an alternate code, text,
        system); ``value``: an NM string, or the components of a coded or ED value (text, or a typed value)."""
        self.set_id += 1
        group = self.order.add_group("ORU_R01_OBSERVATION")
        obx = group.add_segment("OBX")
        what = f"OBX {self.set_id}"
        obx.obx_1 = str(self.set_id)
        obx.obx_2 = value_type  # plain strings only for our own constants: cheaper than a typed value
        _ce(obx.obx_3, *ident[:3], what=f"{what} OBX-3", alternate=ident[3:6] or None)
        if sub_id:
            obx.obx_4 = sub_id  # digits
        if isinstance(value, str):
            obx.obx_5 = value  # an NM value from _nm: digits, sign and point only
        else:
            # OBX-5 has type "varies": hl7apy takes a component layout only from ER7, so lay out placeholders,
            # then put a typed (escaped) value into each component.
            parts = list(value)
            while parts and not parts[-1]:
                parts.pop()
            obx.obx_5 = "^".join("x" for _ in parts)
            for component, part in zip(obx.obx_5.children, parts, strict=True):
                component.children[0].value = _ST(part or "") if part is None or isinstance(part, str) else part
        if units:
            _ce(obx.obx_6, units, _UNIT_TEXT.get(units, units), "UCUM", f"{what} OBX-6")
        if flag and self.s.abnormal_flag:
            obx.obx_8 = _ident(self.s.abnormal_flag, f"{what} OBX-8 abnormal flag", _IS)
        obx.obx_11 = self.status  # checked: P, F or C
        if flag:
            method = head or self.study.head
            equipment, identity = self.equipment
            if _clean(method):
                obx.obx_17.ce_2 = _st(method)
            if identity:  # the full model identity: a second method (OBX-17 repeats), OBX-18 has no room
                (obx.add_field("OBX_17") if _clean(method) else obx.obx_17).ce_2 = _ST(identity)
            if equipment:
                obx.obx_18.ei_1 = _ST(equipment)
        return group


def _ed_value(report: OruAttachment) -> tuple[str, tuple[object, ...]]:
    """The Base64 text of the report and the components of its ED value (source application left empty).

    Base64 (RFC 4648, no line breaks) uses only ``A-Z a-z 0-9 + / =``: nothing to escape, no segment break.
    The data goes in as an hl7apy TX built without hl7apy's own 65,536-character cap on TX values: its v2.5.1
    reference gives ED.5 no maximum length, and REPORT_MAX_BYTES is the limit here."""
    data = bytes(report.data)
    if not data:
        raise OruError("OBX-5 report: the report file is empty")
    if len(data) > REPORT_MAX_BYTES:
        raise OruError(f"OBX-5 report: {len(data)} bytes, more than the {REPORT_MAX_BYTES} bytes a report may have")
    subtype, kind = _clean(report.subtype), _clean(report.type_of_data)
    if not subtype or not kind:
        raise OruError("OBX-5 report: type of data and subtype are required")
    if subtype.upper() == "PDF" and not data.startswith(b"%PDF-"):
        raise OruError("OBX-5 report: the data is not a PDF file (no %PDF- header)")
    encoded = base64.b64encode(data).decode("ascii")
    if not set(encoded) <= _BASE64_ALPHABET:  # cannot happen: Base64 is its alphabet; the ER7 depends on it
        raise OruError("OBX-5 report: the Base64 text holds a character outside its alphabet")
    return encoded, (None, _ident(kind, "OBX-5.2 type of data", _ID), _ident(subtype, "OBX-5.3 data subtype", _ID),
                     _ID("Base64"), _DT["TX"](encoded, validation_level=VALIDATION_LEVEL.TOLERANT))


def _equipment(study: OruStudy) -> tuple[str, str]:
    """(OBX-18.1, the full identity for OBX-17): a short identifier stable per model and within v2.5.1's 22
    characters: the checkpoint hash's first 16 hex digits (lowercase; without a hash, those of SHA-256 of the
    model name and version); the identity ``<model name> <version> <hash16>``, the name cut to fit ST."""
    name, version = _clean(study.model_name), _clean(study.model_version)
    hash16 = re.sub(r"[^0-9a-z]", "", _clean(study.model_hash).rsplit(":", 1)[-1].lower())[:HASH_CHARS]
    short = hash16 or (hashlib.sha256(f"{name}\0{version}".encode()).hexdigest()[:HASH_CHARS]
                       if name or version else "")
    tail = " ".join(p for p in (version, hash16) if p)
    room = _ST_MAX - (len(_esc(tail)) + 1 if tail else 0)
    identity = " ".join(p for p in (_text(study.model_name, limit=max(room, 0)), _esc(tail)) if p)
    return short[:EQUIPMENT_MAX], identity


# --- the message --------------------------------------------------------------------------------------------

def build_oru(study: OruStudy, flags: Sequence[OruFlag], metrics: Sequence[OruMetric], settings: OruSettings, *,
              control_id: str, now: datetime, correction: bool = False, notes: Sequence[str] = ()) -> str:
    """The ER7 text (``\\r`` between segments) of the study's ORU^R01, validated in hl7apy STRICT mode.

    ``correction``: OBR-25 and every OBX-11 ``C``; order numbers and OBX-3 codes stay those of the original
    so the EHR replaces it. Raises :class:`OruError` when the study cannot make a valid message.
    """
    s = settings
    if s.result_status not in ("P", "F"):
        raise OruError("result status (hl7.result_status): an original result is P or F")
    status = "C" if correction else s.result_status
    try:
        msg = Message("ORU_R01", version=_VERSION, validation_level=_STRICT)
        _msh(msg, study, s, control_id, now)
        result = msg.add_group("ORU_R01_PATIENT_RESULT")
        patient = result.add_group("ORU_R01_PATIENT")
        _pid(patient, study.patient, s)
        pv1 = patient.add_group("ORU_R01_VISIT").add_segment("PV1")
        pv1.pv1_1 = "1"
        pv1.pv1_2 = PATIENT_CLASS

        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        number, filler_ns = _order_numbers(study, s)
        orc = order.add_segment("ORC")
        orc.orc_1 = "RE"
        _ei(orc.orc_2, number, None, "ORC-2")
        _ei(orc.orc_3, number, filler_ns, "ORC-3")
        orc.orc_5 = "CM"
        obr = order.add_segment("OBR")
        obr.obr_1 = "1"
        _ei(obr.obr_2, number, None, "OBR-2")
        _ei(obr.obr_3, number, filler_ns, "OBR-3")
        _ce(obr.obr_4, PANEL_CODE, PANEL_TEXT, LOINC, "OBR-4")
        if study.observed_at is not None:
            obr.obr_7.ts_1 = _dtm(study.observed_at)
        obr.obr_22.ts_1 = _dtm(now)
        obr.obr_25 = status

        texts = [DISCLAIMER] + ([] if study.validated else [UNVALIDATED_WARNING]) + [n for n in notes if _clean(n)]
        for i, text in enumerate(texts, 1):
            _nte(order, i, text)

        tq1 = order.add_group("ORU_R01_TIMING_QTY").add_segment("TQ1")
        priority = _clean(s.priority) or "R"
        _ce(tq1.tq1_9, priority, _PRIORITIES.get(priority), "HL70485", "TQ1-9")

        obx = _Obx(order, study, s, status)
        system = s.local_code_system
        for n, flag in enumerate(flags, 1):
            code, text, sub = _clean(flag.code), _clean(flag.text), str(n)
            if not code:
                raise OruError(f"flag {n}: no code")
            if flag.hazard_ratio is not None:
                obx.add("NM", (f"{code}-HR", f"{text} hazard ratio", system),
                        _nm(flag.hazard_ratio, f"flag {code} hazard ratio"), sub_id=sub, flag=True, head=flag.head)
            if flag.percentile is not None:
                obx.add("NM", (f"{code}-PCT", f"{text} percentile", system),
                        _nm(flag.percentile, f"flag {code} percentile"), sub_id=sub, flag=True, head=flag.head)
            phecode = _clean(flag.phecode)
            value = (_esc(code), _text(text), _esc(_clean(system)),
                     _esc(phecode) if phecode else None, _text(f"Phecode {phecode}") if phecode else None,
                     _esc(_clean(s.phecode_system)) if phecode else None)
            group = obx.add("CWE", (code, text, system), value, sub_id=sub, flag=True, head=flag.head)
            if _clean(flag.reason):
                _nte(group, 1, flag.reason)

        for metric in metrics:
            ident = ((metric.loinc, metric.text, LOINC) if _clean(metric.loinc)
                     else (metric.local_code, metric.text, system))
            obx.add("NM", ident, _nm(metric.value, f"metric {metric.local_code}"),
                    units=_clean(metric.units) or None)

        encoded = None
        if study.report is not None:
            encoded, value = _ed_value(study.report)
            obx.add("ED", (REPORT_CODE, REPORT_TEXT, system, REPORT_LOINC, REPORT_LOINC_TEXT, LOINC), value)

        msg.validate()
        er7 = msg.to_er7()
        if encoded is not None and f"^Base64^{encoded}|" not in er7:
            raise OruError("OBX-5 of the report did not come out as the Base64 text it was given")
        return er7
    except OruError:
        raise
    except HL7apyException as exc:
        # Structure errors name segments and fields ("Missing required child ORU_R01.PID"), not values;
        # a value refused on assignment is told by kind only (_problem).
        detail = f"a value {_problem(exc)}" if isinstance(exc, MaxLengthReached) else f"{type(exc).__name__}: {exc}"
        raise OruError(f"ORU^R01 for study {study.study_key} is not valid HL7 v2.5.1: {detail}") from exc
