"""Password hashing: Argon2id, a memory-hard hash, through argon2-cffi (MIT licence, as are its
bindings; the Argon2 reference code inside is CC0).

The parameters are argon2-cffi's defaults (RFC 9106 "low memory": 64 MiB, 3 passes, 4 lanes); a stored
hash made with older parameters still verifies, and ``needs_rehash`` says when to replace it.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["MAX_LENGTH", "MIN_LENGTH", "check_password_rules", "hash_password", "needs_rehash",
           "verify_password"]

MIN_LENGTH = 10
MAX_LENGTH = 1024  # hashing a megabyte "password" is work an attacker should not be able to ask for

_hasher = PasswordHasher()


def check_password_rules(password: str) -> None:
    """Raise ValueError saying why ``password`` may not be set (empty, shorter than 10, too long)."""
    if not password:
        raise ValueError("the password is empty")
    if len(password) < MIN_LENGTH:
        raise ValueError(f"the password is too short: at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"the password is too long: at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    """The Argon2id hash of ``password`` (a PHC string with its own salt and parameters).

    Raises ValueError for an empty password, one shorter than 10 characters or one over 1024.
    """
    check_password_rules(password)
    return _hasher.hash(password)


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches the stored hash; False for a mismatch or a malformed hash."""
    if not password or len(password) > MAX_LENGTH:
        return False
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """Whether the stored hash was made with other parameters than the current ones (rehash on login)."""
    try:
        return _hasher.check_needs_rehash(stored)
    except (InvalidHashError, ValueError):
        return True
