"""The drop-folder source: stability rules, claims into the spool, sidecars, EXDEV fallback, recovery."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config import DropFolderConfig
from gateway.metrics import Metrics
from gateway.pipeline.identifiers import find_sidecar
from gateway.sources import dropfolder
from gateway.sources.dropfolder import ClaimedFile, DropFolderWatcher, recover_claims
from gateway.synthetic.night import SyntheticChannel, write_synthetic_night

_CHANNELS = (SyntheticChannel("C3-M2", 64, "eeg"), SyntheticChannel("SpO2", 1, "spo2", unit="%",
                                                                  physical_min=0.0, physical_max=100.0))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def edf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_synthetic_night(tmp_path_factory.mktemp("edf") / "night.edf", hours=0.02, seed=1,
                                 channels=_CHANNELS)
    return path.read_bytes()


@pytest.fixture(scope="module")
def bdf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_synthetic_night(tmp_path_factory.mktemp("bdf") / "night.bdf", hours=0.02, seed=2,
                                 channels=_CHANNELS)
    return path.read_bytes()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _folder(path: Path, **kw) -> DropFolderConfig:
    path.mkdir(parents=True, exist_ok=True)
    return DropFolderConfig(path=path, **kw)


def _write(path: Path, data: bytes, mtime_ns: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _bump_mtime(path: Path, delta_ns: int = 1_000_000_000) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + delta_ns))


def _counter(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("psg_dropfolder_files_total", {"result": result}) or 0.0


# ---- the basic claim ---------------------------------------------------------------------------------------


def test_complete_edf_claimed_after_stable_seconds(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=10, filename_pattern=r"^(?P<patient_id>\w+)\.edf$",
                   label="sleeplab")
    spool = tmp_path / "spool"
    metrics = Metrics()
    watcher = DropFolderWatcher([drop], spool, clock=clock, metrics=metrics)
    original = _write(drop.path / "night.edf", edf_bytes)

    assert watcher.scan() == []
    assert watcher.pending == 1
    clock.advance(9.9)
    assert watcher.scan() == []
    assert original.exists()
    clock.advance(0.2)
    [claim] = watcher.scan()

    assert isinstance(claim, ClaimedFile)
    assert claim.source == "sleeplab"
    assert claim.original_path == original
    # named after the claim id (the original name can hold an MRN), the extension kept
    assert claim.spool_path == spool / "incoming" / claim.claim_id / f"{claim.claim_id}.edf"
    assert claim.sidecars == ()
    assert claim.sha256 == hashlib.sha256(edf_bytes).hexdigest()
    assert claim.size == len(edf_bytes)
    assert claim.filename_pattern == r"^(?P<patient_id>\w+)\.edf$"
    assert len(claim.claim_id) == 32 and int(claim.claim_id, 16) >= 0
    assert not original.exists()
    assert claim.spool_path.read_bytes() == edf_bytes
    manifest = json.loads((claim.spool_path.parent / "claim.json").read_text())
    assert manifest["source"] == "sleeplab"
    assert manifest["version"] == 2
    assert manifest["original_path"] == str(original)  # until registered (no `known` here): recovery needs it
    assert manifest["recording"] == claim.spool_path.name
    assert manifest["sidecars"] == []
    assert manifest["filename_pattern"] == drop.filename_pattern
    assert manifest["claimed_at"]
    assert sorted(p.name for p in claim.spool_path.parent.iterdir()) == sorted(["claim.json", claim.spool_path.name])
    assert claim.spool_path.stat().st_mode & 0o777 == 0o600  # whatever mode it had in the drop folder
    assert watcher.pending == 0
    assert _counter(metrics, "claimed") == 1
    # Never seen again.
    clock.advance(100)
    assert watcher.scan() == []


def test_default_source_label_and_claim_ids_unique(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=0)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    for i in range(3):
        _write(drop.path / f"n{i}.edf", edf_bytes)
    claims = watcher.scan()
    assert len(claims) == 3
    assert {c.source for c in claims} == {f"folder:{drop.path}"}
    assert len({c.claim_id for c in claims}) == 3
    assert len({c.spool_path.parent for c in claims}) == 3


def test_slow_copy_not_claimed_until_complete(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=5)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock, incomplete_grace_seconds=3600)
    target = drop.path / "slow.edf"
    pieces = [int(len(edf_bytes) * f) for f in (0.4, 0.7, 0.99)]
    written = 0
    for mtime, end in enumerate(pieces, start=1):
        with open(target, "ab") as fh:
            fh.write(edf_bytes[written:end])
        written = end
        os.utime(target, ns=(mtime * 10**9, mtime * 10**9))
        assert watcher.scan() == []
        clock.advance(60)  # far beyond stable_seconds: the size disagrees with the header
        assert watcher.scan() == [], f"claimed at {end} of {len(edf_bytes)} bytes"
        assert watcher.pending == 1
    with open(target, "ab") as fh:
        fh.write(edf_bytes[written:])
    os.utime(target, ns=(9 * 10**9, 9 * 10**9))
    assert watcher.scan() == []  # complete, but the timer restarted
    clock.advance(5)
    [claim] = watcher.scan()
    assert claim.spool_path.read_bytes() == edf_bytes
    assert claim.sha256 == hashlib.sha256(edf_bytes).hexdigest()


def test_bdf_size_uses_three_bytes_a_sample(tmp_path: Path, clock: FakeClock, bdf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=1)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    # Two thirds of a BDF would be the full size if the samples were 2 bytes: must not pass.
    header_bytes = int(bdf_bytes[184:192])
    short = bdf_bytes[:header_bytes + (len(bdf_bytes) - header_bytes) * 2 // 3]
    target = _write(drop.path / "night.bdf", short)
    watcher.scan()
    clock.advance(10)
    assert watcher.scan() == []
    _write(target, bdf_bytes)
    watcher.scan()
    clock.advance(1)
    [claim] = watcher.scan()
    assert claim.size == len(bdf_bytes)


def test_trailing_bytes_and_unknown_record_count(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=2)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    _write(drop.path / "longer.edf", edf_bytes + b"\x00" * 100)
    never_closed = bytearray(edf_bytes[: len(edf_bytes) // 2])
    never_closed[236:244] = b"-1      "
    _write(drop.path / "open.edf", bytes(never_closed))
    assert watcher.scan() == []
    clock.advance(2)
    claims = watcher.scan()
    assert sorted(c.original_path.name for c in claims) == ["longer.edf", "open.edf"]


def test_change_of_size_or_mtime_resets_timer(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=10)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    target = _write(drop.path / "night.edf", edf_bytes, mtime_ns=10**18)
    watcher.scan()
    clock.advance(8)
    _bump_mtime(target)  # same size, new mtime
    assert watcher.scan() == []
    clock.advance(8)  # 16 s since first sighting, 8 since the change
    assert watcher.scan() == []
    with open(target, "ab") as fh:  # size change (trailing bytes are fine)
        fh.write(b"\x00")
    assert watcher.scan() == []
    clock.advance(9.5)
    assert watcher.scan() == []
    clock.advance(0.5)
    [claim] = watcher.scan()
    assert claim.size == len(edf_bytes) + 1


# ---- which files ------------------------------------------------------------------------------------------


def test_patterns_case_hidden_temporary_and_recursion(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    flat = _folder(tmp_path / "flat", stable_seconds=0, recursive=False, patterns=["*.edf"])
    deep = _folder(tmp_path / "deep", stable_seconds=0, recursive=True, patterns=["*.edf", "*.REC"])
    watcher = DropFolderWatcher([flat, deep], tmp_path / "spool", clock=clock)
    for name in ("NIGHT.EDF", "sub/nested.edf", ".hidden.edf", "copying.edf.part", "x.edf.tmp",
                 "y.edf~", "z.edf.crdownload", "notes.txt", "other.bdf", ".dot/inside.edf"):
        _write(flat.path / name, edf_bytes)
    for name in ("a/b/deep.edf", "top.rec", ".hidden/in.edf", "copy.EDF.PART"):
        _write(deep.path / name, edf_bytes)

    claims = watcher.scan()
    got = sorted((c.source, str(c.original_path.relative_to(tmp_path))) for c in claims)
    assert got == [
        (deep.source, "deep/a/b/deep.edf"),
        (deep.source, "deep/top.rec"),
        (flat.source, "flat/NIGHT.EDF"),
    ]
    assert (flat.path / "sub/nested.edf").exists()  # not recursive
    assert (flat.path / "copying.edf.part").exists()
    assert (deep.path / ".hidden/in.edf").exists()
    assert watcher.pending == 0


def test_multiple_folders_own_labels_and_patterns(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    a = _folder(tmp_path / "a", stable_seconds=0, label="lab-a", filename_pattern=r"(?P<patient_id>\d+)")
    b = _folder(tmp_path / "b", stable_seconds=30, label="lab-b")
    watcher = DropFolderWatcher([a, b], tmp_path / "spool", clock=clock)
    _write(a.path / "123.edf", edf_bytes)
    _write(b.path / "456.edf", edf_bytes)
    [first] = watcher.scan()
    assert (first.source, first.filename_pattern, first.original_path.name) == ("lab-a", a.filename_pattern, "123.edf")
    assert watcher.pending == 1
    clock.advance(30)
    [second] = watcher.scan()
    assert (second.source, second.filename_pattern, second.original_path.name) == ("lab-b", None, "456.edf")


def test_excluded_folders_and_spool_inside_watched_folder(tmp_path: Path, clock: FakeClock,
                                                          edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=0)
    spool = drop.path / "spool"  # the spool inside the watched folder: never rescanned
    processed = drop.path / "processed"
    watcher = DropFolderWatcher([drop], spool, clock=clock, exclude=[processed, drop.path / "quarantine"])
    _write(processed / "old.edf", edf_bytes)
    _write(drop.path / "quarantine" / "bad" / "bad.edf", edf_bytes)
    _write(drop.path / "new.edf", edf_bytes)
    [claim] = watcher.scan()
    assert claim.original_path.name == "new.edf"
    assert claim.spool_path.is_relative_to(spool)
    clock.advance(100)
    assert watcher.scan() == []
    assert claim.spool_path.exists()
    assert (processed / "old.edf").exists()
    assert watcher.pending == 0


# ---- sidecars ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "sidecar_name", "spooled", "spooled_sidecar"), [
    ("night.edf", "night.edf.json", "{c}.edf", "{c}.edf.json"),
    ("night.edf", "night.json", "{c}.edf", "{c}.json"),
    ("Night.EDF", "Night.EDF.json", "{c}.edf", "{c}.edf.json"),
    ("DOE.JANE", "DOE.JANE.json", "{c}.dat", "{c}.dat.json"),  # an unknown extension is not kept
    ("DOE.JANE", "DOE.json", "{c}.dat", "{c}.json"),
])
def test_sidecar_claimed_with_recording(tmp_path: Path, clock: FakeClock, edf_bytes: bytes, name: str,
                                        sidecar_name: str, spooled: str, spooled_sidecar: str) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=5, patterns=["*"])
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    _write(drop.path / name, edf_bytes)
    sidecar = _write(drop.path / sidecar_name, b'{"patient_id": "MRN1"}')
    watcher.scan()
    clock.advance(5)
    [claim] = [c for c in watcher.scan() if c.original_path.name == name]
    c = claim.claim_id
    # both renamed after the claim id, so that find_sidecar pairs them as it paired the originals
    assert claim.spool_path.name == spooled.format(c=c)
    assert claim.sidecars == (claim.spool_path.parent / spooled_sidecar.format(c=c),)
    assert find_sidecar(claim.spool_path) == claim.sidecars[0]
    assert claim.sidecars[0].read_bytes() == b'{"patient_id": "MRN1"}'
    assert not sidecar.exists()
    assert json.loads((claim.spool_path.parent / "claim.json").read_text())["sidecars"] == [claim.sidecars[0].name]


def test_recording_waits_for_changing_sidecar(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=5)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    _write(drop.path / "night.edf", edf_bytes)
    watcher.scan()
    clock.advance(4)
    sidecar = _write(drop.path / "night.edf.json", b'{"patient_id": "MRN')  # still being written
    watcher.scan()
    clock.advance(2)  # recording stable, sidecar only 2 s old
    assert watcher.scan() == []
    _write(sidecar, b'{"patient_id": "MRN1"}')
    clock.advance(4)
    assert watcher.scan() == []  # changed 0 s ago as far as the watcher saw
    clock.advance(5)
    [claim] = watcher.scan()
    assert claim.sidecars[0].read_bytes() == b'{"patient_id": "MRN1"}'


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_a_sidecar_that_is_not_a_regular_file_holds_the_recording(tmp_path: Path, clock: FakeClock,
                                                                   edf_bytes: bytes, kind: str) -> None:
    """Claimed without its sidecar, the study would go out under the header's identifiers: held instead,
    with the reason (no file name) in the log and in ``held``, until the sidecar is fixed."""
    drop = _folder(tmp_path / "drop", stable_seconds=5)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    recording = _write(drop.path / "night.edf", edf_bytes)
    real = _write(tmp_path / "elsewhere.json", b'{"patient_id": "MRN1"}')
    sidecar = drop.path / "night.edf.json"
    if kind == "symlink":
        sidecar.symlink_to(real)
    else:
        sidecar.mkdir()
    with capture_logs() as logs:
        watcher.scan()
        clock.advance(10)
        assert watcher.scan() == [] and watcher.scan() == []
    reason = "sidecar is a symbolic link" if kind == "symlink" else "sidecar is not a regular file"
    assert watcher.held == {recording: reason} and recording.exists()
    held = [e for e in logs if e["event"] == "dropfolder.held"]
    assert len(held) == 1 and held[0]["reason"] == reason  # once, not at every scan
    assert "night" not in json.dumps(held)
    # the site replaces it with a regular file: claimed with it
    sidecar.unlink() if kind == "symlink" else sidecar.rmdir()
    _write(sidecar, b'{"patient_id": "MRN1"}')
    watcher.scan()
    clock.advance(5)
    [claim] = watcher.scan()
    assert claim.sidecars[0].read_bytes() == b'{"patient_id": "MRN1"}' and watcher.held == {}


# ---- files that never complete, files that are not EDF -----------------------------------------------------


def test_truncated_file_claimed_after_grace(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=10)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock, incomplete_grace_seconds=600)
    truncated = edf_bytes[: len(edf_bytes) // 2]
    _write(drop.path / "cut.edf", truncated)
    _write(drop.path / "tiny.edf", edf_bytes[:100])  # not even the fixed header
    watcher.scan()
    clock.advance(599)
    assert watcher.scan() == []
    assert watcher.pending == 2
    clock.advance(1)
    claims = {c.original_path.name: c for c in watcher.scan()}
    assert set(claims) == {"cut.edf", "tiny.edf"}
    assert claims["cut.edf"].spool_path.read_bytes() == truncated
    assert watcher.pending == 0


def test_non_edf_claimed_after_stable_seconds(tmp_path: Path, clock: FakeClock) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=10)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    garbage = os.urandom(4096)
    _write(drop.path / "garbage.edf", b"PK\x03\x04" + garbage)
    watcher.scan()
    clock.advance(9)
    assert watcher.scan() == []
    clock.advance(1)
    [claim] = watcher.scan()
    assert claim.spool_path.read_bytes() == b"PK\x03\x04" + garbage


# ---- failures ----------------------------------------------------------------------------------------------


def test_exdev_falls_back_to_copy_and_unlink(tmp_path: Path, clock: FakeClock, edf_bytes: bytes,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename
    calls: list[tuple[str, str]] = []

    def cross_device_rename(src, dst):
        calls.append((str(src), str(dst)))
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(src, dst)

    monkeypatch.setattr(dropfolder, "_rename", cross_device_rename)
    drop = _folder(tmp_path / "drop", stable_seconds=0)
    watcher = DropFolderWatcher([drop], tmp_path / "spool", clock=clock)
    original = _write(drop.path / "night.edf", edf_bytes, mtime_ns=1_700_000_000 * 10**9)
    sidecar = _write(drop.path / "night.json", b"{}")
    [claim] = watcher.scan()
    assert not original.exists() and not sidecar.exists()
    assert claim.spool_path.read_bytes() == edf_bytes
    assert claim.sha256 == hashlib.sha256(edf_bytes).hexdigest()
    assert claim.spool_path.stat().st_mtime_ns == 1_700_000_000 * 10**9
    assert claim.sidecars[0].read_bytes() == b"{}"
    assert sorted(p.name for p in claim.spool_path.parent.iterdir()) == \
        sorted(["claim.json", claim.spool_path.name, f"{claim.claim_id}.json"])
    assert claim.spool_path.stat().st_mode & 0o777 == 0o600  # a copy is created private too
    assert any(Path(s).parent != Path(d).parent for s, d in calls)  # the cross-folder rename was tried


def test_vanished_and_permission_denied_never_crash_the_scan(tmp_path: Path, clock: FakeClock,
                                                            edf_bytes: bytes,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename

    def flaky_rename(src, dst):
        name = Path(src).name
        if name == "gone.edf":
            os.unlink(src)  # deleted by someone between the stat and the rename
            raise FileNotFoundError(errno.ENOENT, "gone", str(src))
        if name == "locked.edf":
            raise PermissionError(errno.EACCES, "denied", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(dropfolder, "_rename", flaky_rename)
    drop = _folder(tmp_path / "drop", stable_seconds=0)
    spool = tmp_path / "spool"
    metrics = Metrics()
    watcher = DropFolderWatcher([drop], spool, clock=clock, metrics=metrics)
    for name in ("gone.edf", "locked.edf", "fine.edf"):
        _write(drop.path / name, edf_bytes)
    [claim] = watcher.scan()
    assert claim.original_path.name == "fine.edf"
    assert (drop.path / "locked.edf").exists()
    assert _counter(metrics, "failed") == 1
    assert _counter(metrics, "claimed") == 1
    # Failed claims leave no claim folder behind.
    assert [p.name for p in (spool / "incoming").iterdir()] == [claim.claim_id]
    # The locked file is retried later (backoff), not on every scan.
    assert watcher.scan() == []
    assert _counter(metrics, "failed") == 1
    clock.advance(3600)
    watcher.scan()
    assert _counter(metrics, "failed") == 2
    monkeypatch.setattr(dropfolder, "_rename", real_rename)
    clock.advance(3600)
    [late] = watcher.scan()
    assert late.original_path.name == "locked.edf"


def test_sidecar_permission_denied_rolls_back_the_claim(tmp_path: Path, clock: FakeClock, edf_bytes: bytes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name == "night.json":
            raise PermissionError(errno.EACCES, "denied", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(dropfolder, "_rename", rename)
    drop = _folder(tmp_path / "drop", stable_seconds=0)
    spool = tmp_path / "spool"
    watcher = DropFolderWatcher([drop], spool, clock=clock)
    _write(drop.path / "night.edf", edf_bytes)
    _write(drop.path / "night.json", b"{}")
    assert watcher.scan() == []
    assert (drop.path / "night.edf").read_bytes() == edf_bytes  # moved back
    assert list((spool / "incoming").iterdir()) == []


# ---- crash recovery ----------------------------------------------------------------------------------------


def test_recover_claims_rebuilds_unregistered(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=0, label="lab", filename_pattern=r"(?P<patient_id>\w+)")
    spool = tmp_path / "spool"
    watcher = DropFolderWatcher([drop], spool, clock=clock)
    _write(drop.path / "one.edf", edf_bytes)
    _write(drop.path / "one.edf.json", b'{"patient_id": "1"}')
    _write(drop.path / "two.edf", edf_bytes[:-10])
    claims = {c.original_path.name: c for c in watcher.scan()}
    assert set(claims) == {"one.edf"}  # two.edf is short, waiting
    clock.advance(4000)
    claims.update({c.original_path.name: c for c in watcher.scan()})
    # A crash before the recording was moved in: only the manifest.
    stale = spool / "incoming" / "0000"
    stale.mkdir()
    (stale / "claim.json").write_text(json.dumps({"recording": "x.edf", "sidecars": []}))

    registered = {claims["two.edf"].spool_path}
    recovered = recover_claims(spool, lambda p: p in registered)
    assert recovered == [claims["one.edf"]]  # with its original path: the name for input_name
    assert not stale.exists()
    # a registered claim's manifest forgets the original path (the database has the name)
    two = json.loads((claims["two.edf"].spool_path.parent / "claim.json").read_text())
    assert "original_path" not in two and "two" not in json.dumps(two)
    assert recover_claims(spool, lambda p: True) == []
    assert recover_claims(tmp_path / "no-spool", lambda p: False) == []


def test_recover_finishes_an_interrupted_copy(tmp_path: Path, edf_bytes: bytes) -> None:
    spool = tmp_path / "spool"
    claim_dir = spool / "incoming" / "0190a1b2c3d47000800000000000abcd"
    original = _write(tmp_path / "drop" / "night.edf", edf_bytes)
    _write(claim_dir / "night.edf", edf_bytes)
    _write(claim_dir / ".night.json.copying", b"{")
    (claim_dir / "claim.json").write_text(json.dumps({
        "version": 1, "claim_id": claim_dir.name, "source": "lab", "original_path": str(original),
        "recording": "night.edf", "sidecars": ["night.json"], "claimed_at": "2024-01-01T00:00:00+00:00",
        "filename_pattern": None}))
    [claim] = recover_claims(spool, lambda p: False)
    assert claim == ClaimedFile(source="lab", original_path=original, spool_path=claim_dir / "night.edf",
                                sidecars=(), sha256=hashlib.sha256(edf_bytes).hexdigest(),
                                size=len(edf_bytes), claim_id=claim_dir.name, filename_pattern=None)
    assert not original.exists()  # identical original: the move is finished
    assert not (claim_dir / ".night.json.copying").exists()


def test_spool_on_same_filesystem_is_a_plain_rename(tmp_path: Path, clock: FakeClock, edf_bytes: bytes) -> None:
    drop = _folder(tmp_path / "drop", stable_seconds=0)
    original = _write(drop.path / "night.edf", edf_bytes)
    inode = original.stat().st_ino
    [claim] = DropFolderWatcher([drop], tmp_path / "spool", clock=clock).scan()
    assert claim.spool_path.stat().st_ino == inode
