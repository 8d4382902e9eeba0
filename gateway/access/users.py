"""Users, roles and login throttling.

Three roles, each containing the one below it: ``viewer`` reads (worklist, study pages), ``operator``
also acts on studies and the outbox (retry, reprocess, replace, reviewed mark, outbox actions, montage
mapping), ``admin`` also manages users. Passwords are stored as Argon2id hashes (``passwords``).

Throttling: after ``max_failures`` consecutive failed logins the account is locked for
``lockout_seconds``; every further failure (while locked, or right after the lock ends) locks it again for
twice as long as the one before, at most an hour. A successful login resets the count. The lock is
per account, so it also holds against guesses spread over many addresses.
"""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..store.models import User as UserRow
from ..store.repo import Repo, aware, utcnow
from .passwords import hash_password, needs_rehash, verify_password

__all__ = ["LOCKOUT_CAP_SECONDS", "NAME_PATTERN", "ROLES", "User", "UserError", "UserStore", "role_allows"]

ROLES = ("viewer", "operator", "admin")  # each role may do everything the ones before it may
NAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
LOCKOUT_CAP_SECONDS = 3600


class UserError(ValueError):
    """A user change that cannot be made (bad or duplicate name, unknown user or role, weak password)."""


def role_allows(role: str, needed: str) -> bool:
    """Whether a user with ``role`` may do what needs ``needed`` (admin ⊇ operator ⊇ viewer).

    An unknown ``role`` allows nothing; an unknown ``needed`` is a programming error (ValueError).
    """
    if needed not in ROLES:
        raise ValueError(f"unknown role {needed!r}: one of {', '.join(ROLES)}")
    if role not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass(frozen=True)
class User:
    """A user as the console and the CLI see it: never the password hash."""

    name: str
    role: str
    disabled: bool
    last_login_at: datetime | None
    created_at: datetime
    locked_until: datetime | None = None

    @classmethod
    def of(cls, row: UserRow) -> User:
        return cls(name=row.name, role=row.role, disabled=bool(row.disabled),
                   last_login_at=aware(row.last_login_at), created_at=aware(row.created_at),
                   locked_until=aware(row.locked_until))


_dummy_lock = threading.Lock()
_dummy_hash: str | None = None


def _dummy() -> str:
    """A hash of a random password: an unknown or disabled user's login costs one verification too."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = hash_password(secrets.token_urlsafe(24))
        return _dummy_hash


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UserError(f"bad user name {name!r}: 1-64 characters of letters, digits and . _ - @")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def _hash(password: str) -> str:
    try:
        return hash_password(password)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


class UserStore:
    """The users table through a ``Repo``'s sessions; each method is one transaction."""

    def __init__(self, repo: Repo, *, max_failures: int = 5, lockout_seconds: int = 300) -> None:
        self.repo = repo
        self.sessions = repo.sessions
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds

    # ---- administration -----------------------------------------------------------------------
    def add(self, name: str, role: str, password: str) -> User:
        """Create a user; UserError for a bad or taken name, an unknown role or a weak password."""
        _check_name(name)
        _check_role(role)
        hashed = _hash(password)
        now = utcnow()
        try:
            with self.sessions.begin() as s:
                if s.scalar(select(UserRow.id).where(UserRow.name == name)) is not None:
                    raise UserError(f"user {name!r} exists already")
                row = UserRow(name=name, role=role, password_hash=hashed, disabled=False, failed_logins=0,
                              created_at=now, updated_at=now)
                s.add(row)
                s.flush()
                return User.of(row)
        except IntegrityError as exc:  # added at the same moment by someone else
            raise UserError(f"user {name!r} exists already") from exc

    def list(self) -> list[User]:
        """Every user, by name."""
        with self.sessions() as s:
            return [User.of(r) for r in s.scalars(select(UserRow).order_by(UserRow.name))]

    def get(self, name: str) -> User | None:
        with self.sessions() as s:
            row = s.scalar(select(UserRow).where(UserRow.name == name))
            return User.of(row) if row is not None else None

    def _change(self, name: str, **values: object) -> User:
        with self.sessions.begin() as s:
            row = s.scalar(select(UserRow).where(UserRow.name == name).with_for_update())
            if row is None:
                raise UserError(f"no user {name!r}")
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            s.flush()
            return User.of(row)

    def disable(self, name: str) -> User:
        """Refuse the user's logins from now on (the row, and the audit naming it, stay)."""
        return self._change(name, disabled=True)

    def enable(self, name: str) -> User:
        return self._change(name, disabled=False)

    def set_password(self, name: str, password: str) -> User:
        """Set a new password; also clears a lockout and the failure count."""
        hashed = _hash(password)
        return self._change(name, password_hash=hashed, failed_logins=0, locked_until=None)

    # ---- login --------------------------------------------------------------------------------
    def _lock_for(self, failures: int) -> timedelta:
        doublings = min(failures - self.max_failures, 12)  # 2**12 * 1 s is past the cap already
        return timedelta(seconds=min(self.lockout_seconds * 2 ** doublings, LOCKOUT_CAP_SECONDS))

    def authenticate(self, name: str, password: str, now: datetime | None = None) -> User | None:
        """The user when ``password`` is right and the account is enabled and not locked; else None.

        Every path costs one Argon2 verification (a dummy hash for an unknown or disabled user), so the
        time taken does not tell which names exist. The caller records ``login``/``login_failed`` in
        the access audit.
        """
        now = now or utcnow()
        with self.sessions.begin() as s:
            row = s.scalar(select(UserRow).where(UserRow.name == name).with_for_update()) \
                if isinstance(name, str) and NAME_PATTERN.fullmatch(name) else None
            if row is None or row.disabled:
                verify_password(_dummy(), password)
                return None
            ok = verify_password(row.password_hash, password)
            locked_until = aware(row.locked_until)
            locked = locked_until is not None and locked_until > now
            if ok and not locked:
                if needs_rehash(row.password_hash):
                    try:
                        row.password_hash = hash_password(password)
                    except ValueError:  # set under older rules: keep it until the user changes it
                        pass
                row.failed_logins = 0
                row.locked_until = None
                row.last_login_at = now
                row.updated_at = now
                s.flush()
                return User.of(row)
            if not ok:
                row.failed_logins = (row.failed_logins or 0) + 1
                if row.failed_logins >= self.max_failures:
                    row.locked_until = now + self._lock_for(row.failed_logins)
                row.updated_at = now
            return None  # a right password while locked is refused and not counted
