"""Password hashing: bcrypt, and the rules a new password must follow.

These functions are CPU-bound by design (about 0.2 s each at cost 12); the
server only ever calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hmac
import os
import secrets

import bcrypt

from libchat.errors import ChatError

#: bcrypt's cost when nothing else is configured (2**12 rounds).
DEFAULT_ROUNDS = 12
#: Environment variable that sets the cost (tests use 4, the minimum).
ROUNDS_ENV = "CHAT_BCRYPT_ROUNDS"
MIN_ROUNDS, MAX_ROUNDS = 4, 31
#: bcrypt reads at most this many bytes of a password. bcrypt 5 refuses more,
#: bcrypt 4 silently ignores the rest; we check the length ourselves so that
#: both behave the same (a longer password is never cut to fit).
MAX_PASSWORD_BYTES = 72
#: The characters of bcrypt's base64 (salt and digest).
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


class PasswordRejected(ChatError):
    """A new password breaks the rules."""

    code = "bad_password"


def rounds_from(value: object = None) -> int:
    """The bcrypt cost: ``value`` if given, else $CHAT_BCRYPT_ROUNDS, else 12."""
    if value is None:
        value = os.environ.get(ROUNDS_ENV) or DEFAULT_ROUNDS
    try:
        rounds = int(str(value))
    except ValueError:
        rounds = -1
    if not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
        raise ChatError(f"bcrypt cost must be {MIN_ROUNDS}..{MAX_ROUNDS}, not {value!r}")
    return rounds


def encode(password: str) -> bytes:
    """The bytes bcrypt sees: UTF-8. Lone surrogates (possible in JSON)
    cannot be encoded; a login with one simply fails."""
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        raise PasswordRejected("the password is not valid Unicode") from None


def check_new_password(password: str) -> bytes:
    """The password's bytes if it may become a password, else PasswordRejected
    with a message saying why."""
    raw = encode(password)
    if not raw:
        raise PasswordRejected("the password is empty")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise PasswordRejected(
            f"the password is {len(raw)} bytes long; bcrypt uses at most "
            f"{MAX_PASSWORD_BYTES} bytes (UTF-8), so choose a shorter one"
        )
    return raw


def hash_password(password: str, rounds: int) -> bytes:
    """A new bcrypt hash of ``password`` (checked by check_new_password)."""
    return bcrypt.hashpw(check_new_password(password), bcrypt.gensalt(rounds))


def verify_password(password: str, hashed: bytes) -> bool:
    """Whether ``password`` matches ``hashed``. Never raises for bad input: a
    password bcrypt refuses (over 72 bytes, not encodable) does not match."""
    try:
        raw = encode(password)
        if len(raw) > MAX_PASSWORD_BYTES:
            # Checked here, not left to bcrypt: bcrypt 4 would compare only
            # the first 72 bytes, and a longer password would log in.
            return False
        # hashpw re-derives the hash with the stored salt and cost; the
        # comparison takes the same time wherever the first difference is.
        return hmac.compare_digest(bcrypt.hashpw(raw, hashed), hashed)
    except (ValueError, PasswordRejected):
        return False


def cost_of(hashed: bytes) -> int | None:
    """The cost a bcrypt hash (``$2b$12$...``) was made with; None if it is
    not one."""
    parts = hashed.split(b"$", 3)
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    return int(parts[2])


def dummy_hash(rounds: int) -> bytes:
    """A well-formed bcrypt hash at cost ``rounds`` that no password matches,
    to check unknown names against so that they cost as much time as a wrong
    password for a real account. Checking a password only uses the hash's
    cost and salt, so a fresh salt and a random digest do (and making it is
    free, at any cost)."""
    digest = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31))
    return bcrypt.gensalt(rounds) + digest.encode("ascii")
