"""Users and access (gateway.access, ``psg-gateway users`` / ``audit export``): Argon2 passwords, roles,
login throttling, the append-only access audit (refused by the database itself), reviewed marks."""

from __future__ import annotations

import csv
import io
import json
import stat
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from gateway.access import (
    AccessAudit,
    Reviews,
    UserError,
    UserStore,
    hash_password,
    needs_rehash,
    role_allows,
    verify_password,
)
from gateway.access.reviews import ReviewError
from gateway.cli.main import app
from gateway.cli.users_cmd import parse_when
from gateway.store.models import User as UserRow
from gateway.store.repo import Repo

PASSWORD = "correct horse battery"
runner = CliRunner()


def _study(repo: Repo, sha: str = "c" * 64) -> int:
    return repo.register_file(source="folder:/in", path="/spool/incoming/c1/n.edf", name="n.edf", sha256=sha,
                              filename_pattern=None, actor="folder:/in").study.id


# ---- passwords and roles --------------------------------------------------------------------------------
def test_argon2_hashes_verify_and_are_not_the_password() -> None:
    stored = hash_password(PASSWORD)
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert stored != hash_password(PASSWORD)  # salted
    assert verify_password(stored, PASSWORD)
    assert not verify_password(stored, PASSWORD + "!")
    assert not verify_password("not a hash", PASSWORD)
    assert not needs_rehash(stored)
    weak = "$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$" + "A" * 22
    assert needs_rehash(weak)


@pytest.mark.parametrize(("password", "why"), [("", "empty"), ("short-pw", "too short"),
                                               ("x" * 2000, "too long")])
def test_weak_passwords_are_refused_with_the_reason(password: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        hash_password(password)


def test_roles_contain_the_ones_below() -> None:
    assert role_allows("admin", "operator") and role_allows("admin", "viewer") and role_allows("admin", "admin")
    assert role_allows("operator", "viewer") and role_allows("operator", "operator")
    assert not role_allows("operator", "admin") and not role_allows("viewer", "operator")
    assert not role_allows("root", "viewer")
    with pytest.raises(ValueError):
        role_allows("admin", "superuser")


# ---- users ------------------------------------------------------------------------------------------------
def test_add_list_disable_enable_passwd(repo: Repo) -> None:
    users = UserStore(repo)
    added = users.add("tech.one@lab", "operator", PASSWORD)
    assert (added.name, added.role, added.disabled, added.last_login_at) == ("tech.one@lab", "operator", False, None)
    assert not hasattr(added, "password_hash")
    users.add("admin", "admin", PASSWORD + "2")
    assert [u.name for u in users.list()] == ["admin", "tech.one@lab"]
    with repo.sessions() as s:  # stored as a hash, never the password
        stored = s.query(UserRow).filter_by(name="admin").one().password_hash
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert users.disable("tech.one@lab").disabled
    assert users.authenticate("tech.one@lab", PASSWORD) is None
    assert not users.enable("tech.one@lab").disabled
    assert users.authenticate("tech.one@lab", PASSWORD) is not None
    users.set_password("tech.one@lab", "a brand new secret")
    assert users.authenticate("tech.one@lab", PASSWORD) is None
    assert users.authenticate("tech.one@lab", "a brand new secret").name == "tech.one@lab"
    assert users.get("nobody") is None
    with pytest.raises(UserError, match="no user"):
        users.disable("nobody")


def test_bad_names_are_refused(repo: Repo) -> None:
    for name in ("", "a b", "x" * 65, "rm;-rf", "émile", "a/b", "<b>"):
        with pytest.raises(UserError, match="bad user name"):
            UserStore(repo).add(name, "viewer", PASSWORD)
    assert UserStore(repo).list() == []


def test_duplicates_unknown_roles_and_weak_passwords_are_refused(repo: Repo) -> None:
    users = UserStore(repo)
    users.add("reader", "viewer", PASSWORD)
    with pytest.raises(UserError, match="exists already"):
        users.add("reader", "admin", PASSWORD)
    with pytest.raises(UserError, match="unknown role"):
        users.add("other", "root", PASSWORD)
    with pytest.raises(UserError, match="too short"):
        users.add("other", "viewer", "123456789")
    with pytest.raises(UserError, match="too short"):
        users.set_password("reader", "short")
    assert [u.name for u in users.list()] == ["reader"]


def test_authenticate_refuses_unknown_disabled_and_wrong(repo: Repo) -> None:
    users = UserStore(repo)
    users.add("doc", "viewer", PASSWORD)
    assert users.authenticate("ghost", PASSWORD) is None
    assert users.authenticate("", PASSWORD) is None
    assert users.authenticate("doc", "wrong password!") is None
    now = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    ok = users.authenticate("doc", PASSWORD, now=now)
    assert ok is not None and ok.last_login_at == now and users.get("doc").last_login_at == now


def test_lockout_after_five_failures_doubles_and_expires(repo: Repo) -> None:
    users = UserStore(repo)
    users.add("doc", "viewer", PASSWORD)
    t0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    for i in range(4):
        assert users.authenticate("doc", f"wrong guess {i}", now=t0) is None
    assert users.get("doc").locked_until is None
    assert users.authenticate("doc", PASSWORD, now=t0) is not None  # a success resets the count
    for i in range(5):
        assert users.authenticate("doc", f"wrong guess {i}", now=t0) is None
    assert users.get("doc").locked_until == t0 + timedelta(seconds=300)
    # locked: even the right password is refused (and not counted)
    assert users.authenticate("doc", PASSWORD, now=t0 + timedelta(seconds=299)) is None
    assert users.get("doc").locked_until == t0 + timedelta(seconds=300)
    # a further failure while locked doubles the lock
    t1 = t0 + timedelta(seconds=10)
    assert users.authenticate("doc", "again wrong", now=t1) is None
    assert users.get("doc").locked_until == t1 + timedelta(seconds=600)
    # expired: the right password works and resets everything
    t2 = t1 + timedelta(seconds=601)
    assert users.authenticate("doc", PASSWORD, now=t2) is not None
    with repo.sessions() as s:
        row = s.query(UserRow).filter_by(name="doc").one()
        assert (row.failed_logins, row.locked_until) == (0, None)


def test_lockout_is_capped_at_an_hour_and_passwd_lifts_it(repo: Repo) -> None:
    users = UserStore(repo, max_failures=2, lockout_seconds=1000)
    users.add("doc", "viewer", PASSWORD)
    t0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    for i in range(4):
        users.authenticate("doc", f"wrong guess {i}", now=t0)
    assert users.get("doc").locked_until == t0 + timedelta(hours=1)
    users.set_password("doc", "another good one")
    assert users.get("doc").locked_until is None
    assert users.authenticate("doc", "another good one", now=t0) is not None


def test_an_old_hash_is_replaced_on_login(repo: Repo) -> None:
    from argon2 import PasswordHasher

    users = UserStore(repo)
    users.add("doc", "viewer", PASSWORD)
    old = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    with repo.sessions.begin() as s:
        s.query(UserRow).filter_by(name="doc").one().password_hash = old
    assert users.authenticate("doc", PASSWORD) is not None
    with repo.sessions() as s:
        new = s.query(UserRow).filter_by(name="doc").one().password_hash
    assert new != old and not needs_rehash(new) and verify_password(new, PASSWORD)


# ---- the access audit -------------------------------------------------------------------------------------
def test_audit_is_append_only_in_the_database(repo: Repo) -> None:
    audit = AccessAudit(repo)
    study_id = _study(repo)
    audit.record("doc", "view", study_id=study_id, study_key="st-abc", target="/ui/studies/1",
                 remote_addr="10.0.0.7")
    for statement in ("UPDATE access_audit SET user_name = 'someone else'", "DELETE FROM access_audit"):
        with pytest.raises(DBAPIError, match="append-only"), repo.engine.begin() as conn:
            conn.execute(text(statement))
    rows = audit.rows(datetime(2000, 1, 1, tzinfo=UTC))
    assert [(r.user_name, r.action, r.study_id, r.study_key, r.target, r.remote_addr) for r in rows] == [
        ("doc", "view", study_id, "st-abc", "/ui/studies/1", "10.0.0.7")]
    assert not hasattr(audit, "delete") and not hasattr(audit, "update")


def test_audit_refuses_phi_in_detail(repo: Repo) -> None:
    with pytest.raises(ValueError, match="PHI: patient_name"):
        AccessAudit(repo).record("doc", "view", detail={"patient_name": "DOE^JANE"})
    assert AccessAudit(repo).rows(datetime(2000, 1, 1, tzinfo=UTC)) == []


def test_audit_rows_by_time_and_user(repo: Repo) -> None:
    audit = AccessAudit(repo)
    before = datetime.now(UTC) - timedelta(seconds=1)
    audit.record("doc", "login", remote_addr="10.0.0.7")
    audit.record("tech", "message.retry", target="42", detail={"message_id": 42})
    audit.record("doc", "logout")
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert [r.action for r in audit.rows(before)] == ["login", "message.retry", "logout"]
    assert [r.action for r in audit.rows(before, user="doc")] == ["login", "logout"]
    assert audit.rows(after) == []
    assert audit.rows(before - timedelta(days=1), until=before) == []
    # a bound in another zone is the same instant
    assert len(audit.rows(before.astimezone(timezone(timedelta(hours=-5))))) == 3
    retry = audit.rows(before, user="tech")[0]
    assert retry.detail == {"message_id": 42} and retry.as_dict()["at"].endswith("+00:00")


# ---- reviewed marks ---------------------------------------------------------------------------------------
def test_reviews_mark_of_latest(repo: Repo) -> None:
    reviews = Reviews(repo)
    a, b, c = _study(repo, "a" * 64), _study(repo, "b" * 64), _study(repo, "d" * 64)
    first = reviews.mark(a, "dr.sleep", "  scored, agrees  ")
    second = reviews.mark(a, "dr.other", "second look")
    reviews.mark(b, "dr.sleep", "")
    assert first.note == "scored, agrees" and first.reviewer == "dr.sleep" and first.reviewed_at.tzinfo
    assert [r.id for r in reviews.of(a)] == [first.id, second.id]
    latest = reviews.latest([a, b, c])
    assert set(latest) == {a, b} and latest[a].id == second.id and latest[b].note == ""
    assert reviews.latest([]) == {}
    assert repo.events(a)[-1].event == "study.reviewed"
    with pytest.raises(ReviewError, match="no study"):
        reviews.mark(999999, "dr.sleep", "x")


# ---- the command line -------------------------------------------------------------------------------------
@pytest.fixture
def cli(repo: Repo, db_url: str, tmp_path):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"paths:\n  var_dir: {tmp_path / 'var'}\ndatabase:\n  url: {json.dumps(db_url)}\n")

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [*args, "--config", str(cfg)], input=input, env={"PSG_CONFIG": None})

    return invoke


def test_cli_users_add_list_disable_passwd_and_their_audit(cli, repo: Repo) -> None:
    added = cli("users", "add", "tech1", "--role", "operator", "--password-stdin", input=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    assert "added user tech1 (operator)" in added.stdout
    listed = cli("users", "list", "--json")
    assert listed.exit_code == 0, listed.output
    doc = json.loads(listed.stdout)
    assert [(u["name"], u["role"], u["disabled"]) for u in doc] == [("tech1", "operator", False)]
    assert "hash" not in listed.stdout and PASSWORD not in listed.stdout
    assert "tech1" in cli("users", "list").stdout
    assert cli("users", "disable", "tech1").exit_code == 0
    assert UserStore(repo).get("tech1").disabled
    assert cli("users", "enable", "tech1").exit_code == 0
    assert cli("users", "passwd", "tech1", "--password-stdin", input="the new password\n").exit_code == 0
    assert UserStore(repo).authenticate("tech1", "the new password") is not None
    rows = AccessAudit(repo).rows(datetime(2000, 1, 1, tzinfo=UTC))
    assert [(r.action, r.target) for r in rows] == [("user.add", "tech1"), ("user.disable", "tech1"),
                                                    ("user.enable", "tech1"), ("user.passwd", "tech1")]
    assert all(r.user_name.startswith("cli:") for r in rows) and rows[0].detail == {"role": "operator"}
    assert all(PASSWORD not in json.dumps(r.as_dict()) for r in rows)


def test_cli_refusals_are_one_line_errors(cli, repo: Repo) -> None:
    cases = [
        (("users", "add", "x1", "--role", "operator", "--password-stdin"), "", 2, "no password on standard input"),
        (("users", "add", "x1", "--role", "operator"), PASSWORD, 2, "--password-stdin"),
        (("users", "add", "x1", "--role", "root", "--password-stdin"), PASSWORD, 2, "unknown role"),
        (("users", "add", "bad name", "--password-stdin"), PASSWORD, 1, "bad user name"),
        (("users", "add", "x1", "--password-stdin"), "short\n", 1, "too short"),
        (("users", "disable", "ghost"), None, 1, "no user 'ghost'"),
        (("users", "passwd", "ghost", "--password-stdin"), PASSWORD, 1, "no user 'ghost'"),
        (("audit", "export", "--since", "yesterday"), None, 2, "not a date"),
        (("audit", "export", "--since", "2026-01-02", "--until", "2026-01-01"), None, 2, "not after"),
        (("audit", "export", "--since", "2026-01-01", "--format", "xml"), None, 2, "unknown format"),
    ]
    for args, stdin, code, message in cases:
        result = cli(*args, input=stdin)
        assert result.exit_code == code, (args, result.output)
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert cli("users", "add", "x2", "--password-stdin", input=PASSWORD).exit_code == 0
    again = cli("users", "add", "x2", "--password-stdin", input=PASSWORD)
    assert again.exit_code == 1 and "exists already" in again.stderr
    assert [u.name for u in UserStore(repo).list()] == ["x2"]


def test_cli_audit_export_csv_and_jsonl(cli, repo: Repo, tmp_path) -> None:
    audit = AccessAudit(repo)
    study_id = _study(repo)
    audit.record("doc", "view", study_id=study_id, study_key="st-1", target="/ui/studies/1")
    audit.record("tech", "study.retry", study_id=study_id, study_key="st-1", detail={"version": 2})
    today = datetime.now(UTC).date().isoformat()
    exported = cli("audit", "export", "--since", today)
    assert exported.exit_code == 0, exported.output
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(r["user"], r["action"], r["study_key"]) for r in table] == [("doc", "view", "st-1"),
                                                                         ("tech", "study.retry", "st-1")]
    assert list(table[0]) == ["id", "at", "user", "action", "study_id", "study_key", "target", "detail",
                              "remote_addr"]
    assert json.loads(table[1]["detail"]) == {"version": 2}
    only = cli("audit", "export", "--since", today, "--until", today, "--user", "tech", "--format", "jsonl")
    lines = [json.loads(ln) for ln in only.stdout.splitlines()]
    assert [(d["user_name"], d["action"], d["study_id"]) for d in lines] == [("tech", "study.retry", study_id)]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert cli("audit", "export", "--since", tomorrow, "--format", "jsonl").stdout == ""
    target = tmp_path / "audit.jsonl"
    written = cli("audit", "export", "--since", f"{today}T00:00", "--format", "jsonl", "--out", str(target))
    assert written.exit_code == 0, written.output
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    actions = [json.loads(ln)["action"] for ln in target.read_text().splitlines()]
    assert actions == ["view", "study.retry", "audit.export", "audit.export", "audit.export"]  # the ones above
    # exporting is itself audited
    assert [r.action for r in audit.rows(datetime(2000, 1, 1, tzinfo=UTC))][-1] == "audit.export"


def test_export_bounds() -> None:
    assert parse_when("2026-01-05") == datetime(2026, 1, 5, tzinfo=UTC)
    assert parse_when("2026-01-05", end=True) == datetime(2026, 1, 6, tzinfo=UTC)
    assert parse_when("2026-01-05T08:30") == datetime(2026, 1, 5, 8, 30, tzinfo=UTC)
    assert parse_when("2026-01-05T08:30+01:00") == datetime(2026, 1, 5, 7, 30, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_when("05/01/2026")
