"""Chaos test (issue 14): the real daemon, an independent MLLP listener playing the EHR and DCMTK's
storescu playing a modality; the daemon is killed with SIGKILL at every boundary where a crash leaves
different committed state behind, restarted each time, and must lose no study and send nothing it
cannot account for.

The kills form one chain (each restart resumes the previous run's work and may itself reach the next
crash point), on SQLite and on PostgreSQL:

===  ==========================  ==============================================================
 #   how it dies                  what is fed / what happens
===  ==========================  ==============================================================
 1   receive.file                 EDF 0 dropped: in the spool, not registered
 2   claim                        EDF 1 dropped; the restart recovers EDF 0's claim, a worker claims
 3   decoded                      EDF 2 dropped
 4   mapped
 5   outputs                      output files written, INFERRED not committed
 6   inferred
 7   queued                       QUEUED + its message committed, input not moved
 8   delivery.recorded            the attempt row committed, no byte sent
 9   delivery.sent                the message written to the EHR, its ACK not read
10   kill -9 by the test          the EHR has the message and holds its ACK (PeerAction delay)
11   delivery.acked               the ACK read, not committed
12   receive.dicom                storescu sends study A: the first instance is in the spool, unregistered
13   dicom.stored@2               storescu sends study A again: 2 of 3 instances registered, then killed
     (down longer than stable_age: a daemon counting its downtime would send A with 2 instances)
14   random (seeded)              no crash point: storescu sends A again at once (a modality retrying),
                                  EDFs 3-5 and a copy of EDF 0 dropped, storescu sends study B in the
                                  background; SIGKILL at a seeded random moment
15   clean daemon                 storescu sends B again; everything settles; SIGTERM
===  ==========================  ==============================================================

Invariants checked at the end (every violation is listed, with the counts, in one assertion message):

1. no input lost: every fed EDF is a study (content_hash = its SHA-256) whose input is under
   var/processed or var/quarantine with the same bytes; every fed DICOM instance is in ``instances``
   with its file present;
2. every study DELIVERED, FAILED with a reason (input quarantined with REASON.txt), or DUPLICATE;
3. per control id: ACKED + NAKED attempts <= times the EHR received it <= attempts recorded; an
   INTERRUPTED attempt leaves a ``message.possible_duplicate`` event on its study;
4. nothing received by the EHR that is not in our outbox;
5. no partial DICOM study sent as final: no correction for a DICOM study, every ``study.ready`` of it
   counted all its instances;
6. every SENT message has an ACKED attempt.

A second test runs two daemons on one PostgreSQL schema (one deliverer per destination).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemon_proc import DaemonProc
from mllp_peer import MllpPeer, PeerAction
from peers import DCMTK_ENV, dcmtk
from pipeline_env import calibrate, forced_flags
from sqlalchemy import text

from gateway.synthetic.dicom_study import write_psg_study
from gateway.synthetic.night import write_synthetic_night
from inference.bundle import make_demo_bundle

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEED = int(os.environ.get("PSG_CHAOS_SEED", "14"))
STABLE_AGE = 3.0  # dicom.stable_age_seconds; the downtime after the mid-C-STORE kill is longer
CRASH_TIMEOUT = 60.0  # a daemon that does not reach its crash point in this time fails the test
SETTLE_TIMEOUT = 150.0

# Every study gets a message: send_mode always, and thresholds every hazard passes.
CHAOS_CONFIG = {
    "flags": forced_flags(send_mode="always"),
    "pipeline": {"retry_backoff_seconds": 0.5, "retry_backoff_max_seconds": 2.0, "write_report": False},
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The demo bundle with death and Stroke declared calibrated: flags forced by an absolute threshold."""
    return calibrate(make_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo"))


@dataclass
class Inputs:
    edfs: list[Path]
    dicom: dict[str, list[Path]]  # study name -> its instance files
    sop_uids: dict[str, list[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    from pydicom import dcmread

    root = tmp_path_factory.mktemp("chaos-inputs")
    # 0-5: the chain; 0-7: the two daemons (4 each)
    edfs = [write_synthetic_night(root / f"night{i}.edf", hours=0.1, seed=1400 + i) for i in range(8)]
    dicom = {name: write_psg_study(root / name, hours=0.1, seed=seed) for name, seed in (("A", 1451), ("B", 1452))}
    assert all(len(files) >= 3 for files in dicom.values())  # a mid-C-STORE kill needs >= 3 instances
    sop_uids = {name: [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
                for name, files in dicom.items()}
    return Inputs(edfs, dicom, sop_uids)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(engine, sql: str, **params) -> list:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params))


class Chaos:
    """The chain's bookkeeping: one daemon (restarted), the EHR, the fed inputs, a timeline."""

    def __init__(self, d: DaemonProc, peer: MllpPeer, inputs: Inputs):
        self.d = d
        self.peer = peer
        self.inputs = inputs
        self.timeline: list[str] = []
        self.t0 = time.monotonic()
        self.fed_edfs: dict[str, Path] = {}  # drop name -> source
        self.storescu_runs: list[tuple[str, int]] = []

    def note(self, what: str) -> None:
        line = f"{time.monotonic() - self.t0:6.1f}s  {what}"
        self.timeline.append(line)
        print(line, flush=True)

    # ---- feeding ------------------------------------------------------------------------------
    def drop_edf(self, i: int, name: str | None = None) -> None:
        name = name or f"n{i}.edf"
        self.d.drop.mkdir(parents=True, exist_ok=True)
        tmp = self.d.drop / f".{name}.part"  # not matched by the patterns until renamed
        shutil.copy(self.inputs.edfs[i], tmp)
        tmp.rename(self.d.drop / name)
        self.fed_edfs[name] = self.inputs.edfs[i]

    def storescu_args(self, study: str) -> list[str]:
        return [dcmtk("storescu"), "-R", "-aet", "STORESCU", "-aec", "PSGGATEWAY", "-to", "20", "-ta", "20",
                "-td", "20", "127.0.0.1", str(self.d.dicom_port), *map(str, self.inputs.dicom[study])]

    def storescu(self, study: str) -> int:
        r = subprocess.run(self.storescu_args(study), env=DCMTK_ENV, check=False, capture_output=True, timeout=90)
        self.storescu_runs.append((study, r.returncode))
        why = r.stderr.decode(errors="replace").strip().splitlines()[-1:] if r.returncode else []
        self.note(f"storescu study {study}: rc {r.returncode} {' '.join(why)}")
        return r.returncode

    # ---- dying ----------------------------------------------------------------------------------
    def crash_at(self, point: str, *feed, timeout: float = CRASH_TIMEOUT) -> None:
        """Start with PSG_CRASHPOINT=point, feed, and wait for the daemon to kill itself there."""
        healthy = self.d.start(allow_exit=True, PSG_CRASHPOINT=point)
        self.note(f"started with crash point {point} ({'healthy' if healthy else 'died while starting'})")
        for f in feed:
            f()
        rc = self.d.wait_exit(timeout, what=f"crash point {point}")
        assert rc == -signal.SIGKILL, f"daemon exited {rc} instead of dying at {point}:\n{self.d.tail()}"
        self.note(f"died at {point}")

    def kill_when_ehr_holds_the_ack(self, hold: float = 3.0, timeout: float = CRASH_TIMEOUT) -> None:
        """The EHR receives the next message and holds its ACK; the daemon is killed meanwhile."""
        before = len(self.peer.received)
        self.peer.script.append(PeerAction(delay=hold))
        self.d.start(allow_exit=False)
        self.note("started (EHR holds the next ACK)")
        assert self.peer.wait_for(before + 1, timeout=timeout), (
            f"no message reached the EHR in {timeout}s; {self.d.describe()}\n{self.d.tail()}")
        assert self.d.kill() == -signal.SIGKILL
        self.note(f"killed while the EHR held the ACK of {self.peer.control_ids[-1]}")


def _settled(d: DaemonProc, expected_studies: int, sop_uids: list[str]) -> bool:
    e = d.engine
    states = _rows(e, "SELECT state, input_path FROM studies")
    if len(states) < expected_studies:
        return False
    spool = str(d.var / "spool")
    if any(s not in ("DELIVERED", "FAILED", "DUPLICATE") or (p or "").startswith(spool) for s, p in states):
        return False
    if _rows(e, "SELECT id FROM outbox WHERE state = 'PENDING'"):
        return False
    have = {r[0] for r in _rows(e, "SELECT sop_instance_uid FROM instances")}
    return set(sop_uids) <= have


def _check_invariants(d: DaemonProc, peer: MllpPeer, chaos: Chaos) -> tuple[list[str], list[str]]:
    """(violations, report lines)."""
    e = d.engine
    problems: list[str] = []
    report: list[str] = []
    processed, quarantine = (d.var / "processed").resolve(), (d.var / "quarantine").resolve()

    def kept(path: str | None) -> bool:
        if not path:
            return False
        p = Path(path).resolve()
        return p.is_relative_to(processed) or p.is_relative_to(quarantine)

    studies = _rows(e, "SELECT id, key, state, source_kind, content_hash, input_path, last_error, duplicate_of, "
                       "version FROM studies ORDER BY id")
    report.append(f"studies: {len(studies)} {dict(Counter(s.state for s in studies))}")

    # (1) no input lost -------------------------------------------------------------------------
    for name, src in sorted(chaos.fed_edfs.items()):
        sha = _sha256(src)
        matches = [s for s in studies if s.content_hash == sha]
        originals = [s for s in matches if s.duplicate_of is None]
        if len(originals) != 1:
            problems.append(f"(1) EDF {name}: {len(originals)} original studies with its SHA-256 (want 1)")
        for s in matches:
            p = Path(s.input_path or "")
            if not kept(s.input_path) or not p.is_file():
                problems.append(f"(1) EDF {name}: study {s.key} ({s.state}) input {s.input_path!r} is not a file "
                                f"under var/processed or var/quarantine")
            elif _sha256(p) != sha:
                problems.append(f"(1) EDF {name}: study {s.key} input {p} has other bytes")
    fed_copies = Counter(_sha256(src) for src in chaos.fed_edfs.values())
    for sha, n in fed_copies.items():
        have = sum(1 for s in studies if s.content_hash == sha)
        if have != n:
            problems.append(f"(1) {n} copies of one EDF fed, {have} studies registered for them")
    instances = {r.sop_instance_uid: r for r in _rows(e, "SELECT sop_instance_uid, study_id, path FROM instances")}
    for study_name, uids in chaos.inputs.sop_uids.items():
        for uid in uids:
            row = instances.get(uid)
            if row is None:
                problems.append(f"(1) DICOM study {study_name}: instance {uid} not in the instances table")
            elif not kept(row.path) or not Path(row.path).is_file():
                problems.append(f"(1) DICOM study {study_name}: instance {uid} file {row.path!r} missing or not "
                                f"under processed/quarantine")

    # (2) every study finished ------------------------------------------------------------------
    for s in studies:
        if s.state in ("DELIVERED", "DUPLICATE"):
            continue
        if s.state == "FAILED":
            folder = Path(s.input_path or "")
            folder = folder if folder.is_dir() else folder.parent
            if not (s.last_error or "").strip():
                problems.append(f"(2) study {s.key} FAILED without last_error")
            if not kept(s.input_path) or not Path(s.input_path).resolve().is_relative_to(quarantine) \
                    or not (folder / "REASON.txt").is_file():
                problems.append(f"(2) study {s.key} FAILED but its input {s.input_path!r} is not in quarantine "
                                f"with REASON.txt")
            continue
        problems.append(f"(2) study {s.key} ({s.source_kind}) ended {s.state}")

    # (3) (4) (6) what the EHR received against the outbox and the attempts ------------------------
    outbox = _rows(e, "SELECT id, study_id, study_version, control_id, state, correction FROM outbox ORDER BY id")
    by_cid = {m.control_id: m for m in outbox}
    received = Counter(peer.control_ids)
    report.append(f"outbox: {len(outbox)} {dict(Counter(m.state for m in outbox))}; EHR received "
                  f"{len(peer.received)} messages ({len(received)} distinct control ids, "
                  f"{sum(n - 1 for n in received.values())} repeats, {len(peer.unparsable)} unparsable)")
    if peer.unparsable:
        problems.append(f"(4) the EHR received {len(peer.unparsable)} frames that are not HL7")
    for cid in received:
        if cid not in by_cid:
            problems.append(f"(4) the EHR received control id {cid} x{received[cid]}, which is not in the outbox")
    try:
        attempts = _rows(e, "SELECT a.message_id, o.control_id, a.attempt, a.outcome, a.ack_code, a.holder "
                            "FROM delivery_attempts a JOIN outbox o ON o.id = a.message_id ORDER BY a.id")
    except Exception as exc:  # noqa: BLE001 - the table is the feature under test
        attempts = None
        problems.append(f"(3)(6) delivery_attempts cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    if attempts is not None:
        outcomes = Counter(a.outcome for a in attempts)
        report.append(f"attempts: {len(attempts)} {dict(outcomes)}")
        per: dict[str, Counter] = {}
        for a in attempts:
            per.setdefault(a.control_id, Counter())[a.outcome] += 1
        for m in outbox:
            c = per.get(m.control_id, Counter())
            answered = c["ACKED"] + c["NAKED"]
            total = sum(c.values())
            got = received.get(m.control_id, 0)
            line = (f"  message {m.id} {m.control_id} {m.state}: EHR received {got}, attempts {total} "
                    f"{dict(c)}")
            report.append(line)
            if not answered <= got <= total:
                problems.append(f"(3) {m.control_id}: ACKED+NAKED {answered} <= received {got} <= attempts {total} "
                                f"does not hold ({dict(c)})")
            if m.state == "SENT" and c["ACKED"] < 1:
                problems.append(f"(6) message {m.id} {m.control_id} is SENT without an ACKED attempt ({dict(c)})")
            if c["INTERRUPTED"]:
                events = [ev.event for ev in d.repo.events(m.study_id)]
                if "message.possible_duplicate" not in events:
                    problems.append(f"(3) message {m.id} has {c['INTERRUPTED']} INTERRUPTED attempts but no "
                                    f"message.possible_duplicate event on its study")
        if outcomes["IN_FLIGHT"]:
            problems.append(f"(3) {outcomes['IN_FLIGHT']} attempts still IN_FLIGHT after a clean run")
    else:
        for m in outbox:
            report.append(f"  message {m.id} {m.control_id} {m.state}: EHR received {received.get(m.control_id, 0)}")

    # (5) no partial DICOM study sent as final --------------------------------------------------------
    dicom_studies = [s for s in studies if s.source_kind == "dicom"]
    if len(dicom_studies) != len(chaos.inputs.dicom):
        problems.append(f"(5) {len(dicom_studies)} DICOM studies, {len(chaos.inputs.dicom)} sent")
    for s in dicom_studies:
        n = sum(1 for r in instances.values() if r.study_id == s.id)
        readies = [ev.detail for ev in d.repo.events(s.id) if ev.event == "study.ready"]
        report.append(f"DICOM study {s.key}: version {s.version}, {n} instances, study.ready {readies}")
        for detail in readies:
            if (detail or {}).get("instances") != n:
                problems.append(f"(5) DICOM study {s.key} became ready with {detail} of its {n} instances")
        corrections = [m for m in outbox if m.study_id == s.id and m.correction]
        if corrections:
            problems.append(f"(5) DICOM study {s.key}: {len(corrections)} correction messages "
                            f"(outbox {[(m.id, m.study_version, m.state) for m in outbox if m.study_id == s.id]})")
    return problems, report


def test_kill9_at_every_crash_point_loses_nothing_and_sends_nothing_unaccounted(db_url, bundle, inputs, tmp_path):
    started = time.monotonic()
    rng = random.Random(SEED)
    with MllpPeer() as peer:
        d = DaemonProc(tmp_path / "gw", db_url, bundle, hl7_port=peer.port, stable_age_seconds=STABLE_AGE,
                       stable_seconds=0.3, config=CHAOS_CONFIG)
        chaos = Chaos(d, peer, inputs)
        try:
            # the pipeline
            chaos.crash_at("receive.file", lambda: chaos.drop_edf(0))
            chaos.crash_at("claim", lambda: chaos.drop_edf(1))
            chaos.crash_at("decoded", lambda: chaos.drop_edf(2))
            chaos.crash_at("mapped")
            chaos.crash_at("outputs")
            chaos.crash_at("inferred")
            chaos.crash_at("queued")
            # delivery
            chaos.crash_at("delivery.recorded")
            chaos.crash_at("delivery.sent")
            chaos.kill_when_ehr_holds_the_ack()
            chaos.crash_at("delivery.acked")
            # DICOM: killed before the first instance is registered, then mid-C-STORE
            chaos.crash_at("receive.dicom", lambda: chaos.storescu("A"))
            chaos.crash_at("dicom.stored@2", lambda: chaos.storescu("A"))
            assert all(rc != 0 for _, rc in chaos.storescu_runs[-2:]), chaos.storescu_runs  # both associations broke
            have = {r[0] for r in _rows(d.engine, "SELECT sop_instance_uid FROM instances")}
            partial = [u for u in inputs.sop_uids["A"] if u in have]
            assert len(partial) == 2, f"mid-C-STORE: {len(partial)} of study A's instances registered, want 2"
            time.sleep(STABLE_AGE + 1.5)  # down longer than stable_age: downtime must not count
            # random: the modality sends A again at once, more studies arrive, SIGKILL at a seeded moment
            d.start()
            chaos.note("started (no crash point)")
            assert chaos.storescu("A") == 0
            for i in (3, 4, 5):
                chaos.drop_edf(i)
            chaos.drop_edf(0, name="copy-of-n0.edf")  # the same recording again: a DUPLICATE
            sender = subprocess.Popen(chaos.storescu_args("B"), env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            pause = rng.uniform(0.5, 6.0)
            time.sleep(pause)
            assert d.kill() == -signal.SIGKILL
            chaos.storescu_runs.append(("B", sender.wait(timeout=60)))
            chaos.note(f"random kill after {pause:.2f}s (seed {SEED}); storescu B rc {chaos.storescu_runs[-1][1]}; "
                       f"left behind: studies {d.repo.counts_by_state()}, outbox {d.repo.outbox_counts()}")
            # a clean daemon: the modality sends B again (duplicates answered success), everything settles
            d.start()
            chaos.note("started clean")
            assert chaos.storescu("B") == 0
            all_uids = [u for uids in inputs.sop_uids.values() for u in uids]
            d.wait_for(lambda: _settled(d, len(chaos.fed_edfs) + len(inputs.dicom), all_uids),
                       timeout=SETTLE_TIMEOUT, what="every study finished and the outbox drained", interval=0.5)
            chaos.note("settled")
            assert d.stop() == 0
            chaos.note("stopped (SIGTERM)")
            problems, report = _check_invariants(d, peer, chaos)
        finally:
            d.close()
    elapsed = time.monotonic() - started
    header = f"chaos on {d.repo.engine.dialect.name}: {d.starts} starts, {elapsed:.0f}s (seed {SEED})"
    print("\n".join([header, *report]))  # the timeline was printed as it happened
    assert not problems, "\n".join([*problems, "", header, *chaos.timeline, *report])


# SQLite is one daemon per database file (a lock in the var folder): two daemons share only PostgreSQL.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_daemons_on_one_database_deliver_each_message_once_in_order(db_url, bundle, inputs, tmp_path):
    with MllpPeer() as peer:
        # A slow EHR (each ACK after 0.5 s, more than hl7.drain_interval_seconds): two deliverers draining
        # the same queue would both pick up the message in flight, and the EHR would get it twice.
        peer.script.extend(PeerAction(delay=0.5) for _ in range(40))
        nodes = [DaemonProc(tmp_path / name, db_url, bundle, node_name=name, hl7_port=peer.port,
                            stable_seconds=0.3, config=CHAOS_CONFIG) for name in ("node-a", "node-b")]
        try:
            for n in nodes:  # at the same moment, on a fresh (unmigrated) schema
                n.launch()
            for n in nodes:
                n.wait_ready()
            for k, n in enumerate(nodes):
                n.drop.mkdir(parents=True, exist_ok=True)
                for i in range(4):
                    src = inputs.edfs[4 * k + i]
                    shutil.copy(src, n.drop / f".n{i}.part")
                    (n.drop / f".n{i}.part").rename(n.drop / f"n{i}.edf")
            a = nodes[0]
            a.wait_for(lambda: len(_rows(a.engine, "SELECT id FROM studies WHERE state = 'DELIVERED'")) == 8
                       and not _rows(a.engine, "SELECT id FROM outbox WHERE state = 'PENDING'"),
                       timeout=SETTLE_TIMEOUT, what="8 studies DELIVERED", interval=0.5)
            time.sleep(1.0)  # a second deliverer sending the same message would do it now
            for n in nodes:
                assert n.stop() == 0
            outbox = _rows(a.engine, "SELECT id, control_id, state FROM outbox ORDER BY id")
            attempts = _rows(a.engine, "SELECT message_id, outcome, holder FROM delivery_attempts ORDER BY id")
            workers = Counter(r[0].split(":")[0] for r in _rows(a.engine, "SELECT actor FROM events "
                                                                   "WHERE event = 'study.decoded'"))
        finally:
            for n in nodes:
                n.close()
    got = Counter(peer.control_ids)
    print(f"two daemons: outbox {len(outbox)}, EHR received {len(peer.received)} ({peer.connections} connections), "
          f"studies decoded per node {dict(workers)}, attempts by holder {dict(Counter(r.holder for r in attempts))}")
    assert [m.state for m in outbox] == ["SENT"] * 8
    assert {cid: n for cid, n in got.items() if n != 1} == {}, "a message reached the EHR more than once"
    assert peer.control_ids == [m.control_id for m in outbox], "the EHR's receive order is not the outbox order"
    assert sorted((r.message_id, r.outcome) for r in attempts) == [(m.id, "ACKED") for m in outbox]
