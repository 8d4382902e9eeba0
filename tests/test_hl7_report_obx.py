"""The study report (PDF) in the ORU^R01 as one OBX of type ED (``hl7.embed_report``, opt-in): its layout,
hl7apy's STRICT validation, python-hl7 (an independent parser) reading the Base64 back byte for byte, and the
same through a real MLLP exchange with a message of a few MB."""

from __future__ import annotations

import base64
import dataclasses
import io
from datetime import UTC, date, datetime

import hl7
import numpy as np
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from mllp_peer import MllpPeer

from gateway.config import Hl7Config
from gateway.hl7.compose import build_study_message
from gateway.hl7.listener import FileMllpListener
from gateway.hl7.mllp import MllpClient, MllpDestination
from gateway.hl7.oru import (
    REPORT_CODE,
    REPORT_LOINC,
    REPORT_MAX_BYTES,
    OruAttachment,
    OruError,
    OruFlag,
    OruMetric,
    OruPatient,
    OruSettings,
    OruStudy,
    build_oru,
)
from gateway.pipeline.flags import FlagDecision
from gateway.store.models import Study

ENCODING_CHARACTERS = set("|^~\\&\r\n\x0b\x1c")
TINY_PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n%%EOF\n"  # Base64 under 199 characters: hl7apy's STRICT parser takes it
EVERY_BYTE = b"%PDF-1.7\n" + bytes(range(256)) * 4 + bytes(range(255, -1, -1))

STUDY = OruStudy(study_key="st-1a2b3c4d5e6f", study_id=7, accession="ACC123", study_uid="1.2.3.4",
                 observed_at=datetime(2026, 3, 3, 22, 15, tzinfo=UTC),
                 patient=OruPatient(patient_id="MRN0042", issuer="HOSP-A", family_name="Doe", given_name="Jane",
                                    birth_date=date(1950, 3, 4), sex="F"),
                 model_name="sleepfm", model_version="1.0.0", model_hash="0123456789abcdef" * 4, validated=True,
                 head="SleepFM diagnosis head (CoxPH)")
FLAGS = (OruFlag(code="PSG-HF", text="Heart failure risk (SleepFM)", phecode="428", hazard_ratio=2.31,
                 percentile=97.5, reason="percentile 97.5 >= 95"),)
METRICS = (OruMetric(loinc="93832-4", local_code="PSG-TST", text="Total sleep time", value=401.5, units="min"),
           OruMetric(loinc=None, local_code="PSG-SE", text="Sleep efficiency", value=88.25, units="%"))


def _pdf(points: int = 200) -> bytes:
    """A real PDF (matplotlib's PdfPages, paths not simplified): ~13 kB with 200 points, ~400 kB with 40,000."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    buf = io.BytesIO()
    with matplotlib.rc_context({"path.simplify": False}), PdfPages(buf) as pages:
        fig = Figure(figsize=(8.27, 11.69))
        ax = fig.add_subplot()
        ax.set_title("Sleep study report (test)")
        ax.plot(np.arange(points), np.random.default_rng(7).standard_normal(points), lw=0.3)
        pages.savefig(fig)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pdf() -> bytes:
    return _pdf()


def _build(report: OruAttachment | None = None, flags=FLAGS, metrics=METRICS, settings=None, **kw) -> str:
    kw.setdefault("control_id", "PSG0000000000000001")
    kw.setdefault("now", datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC))
    study = STUDY if report is None else dataclasses.replace(STUDY, report=report)
    return build_oru(study, flags, metrics, settings or OruSettings(), **kw)


def _with_report(data: bytes, subtype: str = "PDF", **kw) -> str:
    return _build(OruAttachment(data, subtype=subtype), **kw)


def _ed_segments(msg: hl7.Message) -> list:
    return [seg for seg in msg if str(seg[0]) == "OBX" and str(seg[2]) == "ED"]


def _decoded(er7: str) -> bytes:
    """The report as python-hl7 reads it: the one ED OBX, its fifth component Base64-decoded (strictly)."""
    msg = hl7.parse(er7)
    (seg,) = _ed_segments(msg)
    n = [str(s[2]) for s in msg.segments("OBX")].index("ED") + 1
    encoded = msg.extract_field("OBX", n, 5, 1, 5)
    assert encoded == str(seg[5][0][4])  # nothing was escaped
    return base64.b64decode(encoded, validate=True)


def _hl7apy_warnings(er7: str, tmp_path, name: str) -> list[str]:
    """hl7apy's validator (the STRICT rules) on the message; it raises on the first error, and lists what it
    only warns about (values outside HL7 tables) in its report file."""
    report = tmp_path / f"{name}.txt"
    parsed = parse_message(er7, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)
    parsed.validate(report_file=str(report))
    assert parsed.to_er7() == er7
    lines = report.read_text().splitlines()
    assert not [line for line in lines if line.startswith("Error")]
    return sorted(lines)


# ---- layout and the round trip ---------------------------------------------------------------------------

def test_the_report_is_one_ed_obx_after_the_results(pdf):
    er7 = _with_report(pdf)
    msg = hl7.parse(er7)
    segments = [str(s[0]) for s in msg]
    obx = list(msg.segments("OBX"))
    assert segments[-1] == "OBX" and str(obx[-1][2]) == "ED"  # after every result, in the same OBR
    assert segments.count("OBR") == 1
    assert [str(s[1]) for s in obx] == [str(i) for i in range(1, len(obx) + 1)]
    ed = obx[-1]
    assert str(ed[3]) == f"{REPORT_CODE}^Sleep study report (AI-generated)^99PSG^{REPORT_LOINC}^" \
                         "Polysomnography (sleep) study^LN"
    assert str(ed[4]) == ""  # no sub-id: the report belongs to no flag
    assert [str(c) for c in ed[5][0]] == ["", "AP", "PDF", "Base64", base64.b64encode(pdf).decode()]
    assert str(ed[11]) == "F"
    assert len(ed) == 12  # nothing after OBX-11: no abnormal flag, method or equipment on the report
    assert _decoded(er7) == pdf
    # the rest of the message is the message without the report
    without = _build()
    assert er7.startswith(without + "\r") and er7.count("\r") == without.count("\r") + 1


def test_the_segment_in_full_with_a_short_payload():
    er7 = _with_report(TINY_PDF)
    set_id = len(list(hl7.parse(er7).segments("OBX")))
    assert set_id == 3 + len(METRICS) + 1  # hazard ratio, percentile, coded flag; the metrics; the report
    assert er7.split("\r")[-1] == (
        f"OBX|{set_id}|ED|PSG-REPORT^Sleep study report (AI-generated)^99PSG^28633-6^Polysomnography (sleep) study^LN"
        "||^AP^PDF^Base64^JVBERi0xLjQKJeLjz9MKJSVFT0YK||||||F")


@pytest.mark.parametrize(("data", "subtype"), [(EVERY_BYTE, "PDF"), (bytes(range(256)), "Octet-stream"),
                                               (b"%PDF-" + bytes(range(255, -1, -1)) * 3 + b"\x00", "PDF")],
                         ids=["pdf-header-every-byte", "octet-stream-every-byte", "padding"])
def test_every_byte_value_round_trips(data, subtype):
    er7 = _with_report(data, subtype=subtype)
    assert _decoded(er7) == data
    (ed,) = _ed_segments(hl7.parse(er7))
    assert str(ed[5][0][2]) == subtype


def test_a_real_pdf_of_a_few_hundred_kb_round_trips_and_no_encoding_character_appears():
    big = _pdf(40_000)
    assert len(big) > 250_000
    er7 = _with_report(big)
    encoded = er7.split("\r")[-1].split("|")[5].split("^")[4]
    assert len(encoded) == 4 * ((len(big) + 2) // 3)
    assert not set(encoded) & ENCODING_CHARACTERS  # one line, no delimiter, nothing to escape
    assert len(er7.split("\r")) == len(hl7.parse(er7))
    assert _decoded(er7) == big


def test_correction_and_preliminary_status_apply_to_the_report(pdf):
    corrected = hl7.parse(_with_report(pdf, correction=True))
    assert str(_ed_segments(corrected)[0][11]) == "C"
    preliminary = hl7.parse(_with_report(pdf, settings=OruSettings(result_status="P")))
    assert str(_ed_segments(preliminary)[0][11]) == "P"


def test_a_report_without_flags_or_metrics_still_makes_a_message(pdf):
    er7 = _with_report(pdf, flags=(), metrics=())
    msg = hl7.parse(er7)
    assert [str(s[1]) for s in msg.segments("OBX")] == ["1"]
    assert _decoded(er7) == pdf


def test_no_report_no_ed_obx():
    assert Hl7Config().embed_report is False  # opt-in
    for er7 in (_build(), _build(flags=(), metrics=()), _build(correction=True)):
        assert not _ed_segments(hl7.parse(er7))
        assert "|ED|" not in er7 and "Base64" not in er7


@pytest.mark.parametrize(("data", "subtype", "match"), [
    (b"", "PDF", "empty"),
    (b"<html>not a pdf</html>", "PDF", "not a PDF"),
    (None, "PDF", "more than"),
    (TINY_PDF, "", "subtype"),
], ids=["empty", "not-a-pdf", "too-big", "no-subtype"])
def test_unusable_reports_are_a_clear_error(data, subtype, match):
    if data is None:
        data = b"%PDF-" + bytes(REPORT_MAX_BYTES)
    with pytest.raises(OruError, match=match):
        _with_report(data, subtype=subtype)


# ---- hl7apy STRICT ---------------------------------------------------------------------------------------

def test_hl7apy_strict_parse_with_a_short_payload():
    er7 = _with_report(TINY_PDF)
    parsed = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    parsed.validate()
    assert parsed.to_er7() == er7
    obx = parsed.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation[-1].obx
    assert obx.obx_2.to_er7() == "ED"
    assert [c.to_er7() for c in obx.obx_5.children] == ["", "AP", "PDF", "Base64", base64.b64encode(TINY_PDF).decode()]


def test_hl7apy_validates_the_message_with_a_real_report(pdf, tmp_path):
    """hl7apy's STRICT parser types every component of a "varies" OBX-5 as ST (at most 199 characters) and its
    TX as at most 65,536, so it refuses any real report when parsing; the builder validates the message in
    STRICT mode with the real data, and here hl7apy's validator (the STRICT rules) checks it as parsed."""
    plain = _hl7apy_warnings(_build(), tmp_path, "plain")
    with_report = _hl7apy_warnings(_with_report(pdf), tmp_path, "report")
    big = _hl7apy_warnings(_with_report(b"%PDF-1.7\n" + bytes(range(256)) * 1200), tmp_path, "big")
    assert with_report == big
    # The report's OBX adds one warning, the one every OBX with a local code has (99PSG is no HL7 table value).
    added = list(with_report)
    for line in plain:
        added.remove(line)
    assert added == ["Warning: Value 99PSG not in table HL70396 in element OBX_3.CE_3"]


# ---- compose ---------------------------------------------------------------------------------------------

def _study_row() -> Study:
    return Study(id=7, key="st-1a2b3c4d5e6f", patient_id="MRN0042", patient_id_issuer="HOSP-A",
                 patient_name="DOE^JANE", accession="ACC123", bundle_name="sleepfm", bundle_version="1.0.0",
                 bundle_hash="ab" * 32, recording_start=datetime(2026, 3, 3, 22, 15, tzinfo=UTC))


def test_build_study_message_takes_the_report(pdf):
    kw = {"control_id": "PSG0000000000000001", "now": datetime(2026, 3, 4, tzinfo=UTC), "correction": False,
          "validated": True}
    sleep = {"tst_min": 401.5}
    cfg = Hl7Config(enabled=True, embed_report=True)
    plain = build_study_message(_study_row(), FlagDecision(), sleep, cfg, **kw)
    with_report = build_study_message(_study_row(), FlagDecision(), sleep, cfg, report_pdf=pdf, **kw)
    assert not _ed_segments(hl7.parse(plain))
    assert with_report.startswith(plain + "\r")
    assert _decoded(with_report) == pdf
    assert [str(s[3][0][0]) for s in hl7.parse(with_report).segments("OBX")] == ["93832-4", REPORT_CODE]


# ---- through MLLP ----------------------------------------------------------------------------------------

def test_mllp_to_the_independent_peer_byte_for_byte():
    real = _pdf(40_000)  # ~400 kB
    few_mb = b"%PDF-1.7\n" + bytes(range(256)) * 12_000  # 3 MB: a 4 MB message
    messages = {"PSGREPORT1": real, "PSGREPORT2": few_mb}
    with MllpPeer() as peer, \
            MllpClient(MllpDestination("127.0.0.1", peer.port, timeout_seconds=30)) as client:
        for control_id, data in messages.items():
            er7 = _with_report(data, control_id=control_id)
            ack = client.send(er7)
            assert ack.accepted and ack.control_id == control_id
        assert peer.wait_for(2)
        assert peer.control_ids == list(messages) and not peer.unparsable
        assert peer.connections == 1  # one connection for both: the big frame left the stream in sync
        for received, data in zip(peer.received, messages.values(), strict=True):
            assert _decoded(received) == data
        assert len(peer.received[1]) > 4_000_000


def test_mllp_to_the_listener_writes_the_report_byte_for_byte(tmp_path):
    data = b"%PDF-1.7\n" + bytes(range(256)) * 12_000  # 3 MB: a 4 MB message
    listener = FileMllpListener("127.0.0.1", 0, tmp_path / "inbox").start()
    try:
        with MllpClient(MllpDestination("127.0.0.1", listener.port, timeout_seconds=30)) as client:
            sent = _with_report(data, control_id="PSGREPORT3")
            ack = client.send(sent)
            assert ack.accepted and ack.control_id == "PSGREPORT3"
            assert client.send(_build(control_id="PSGAFTER")).accepted  # the same connection goes on
    finally:
        listener.stop()
    stored = (tmp_path / "inbox" / "PSGREPORT3.hl7").read_bytes().decode("utf-8")  # ER7 as sent: CR, no LF
    assert stored == sent and "\n" not in stored and _decoded(stored) == data
    assert (tmp_path / "inbox" / "PSGAFTER.hl7").exists()
