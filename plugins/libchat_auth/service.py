"""The login decision for one server: throttles, store, bcrypt.

Every answer a client can see is one of: the account's name (logged in),
``authentication failed`` (wrong password *or* unknown name: the same words
and, thanks to a dummy bcrypt check at the cost of the stored hashes, the
same time; see :mod:`libchat_auth.costs`), ``auth_required`` (no
password at all), or ``rate_limited`` (too many failures; this is keyed by the
name asked for whether or not it exists, so it reveals nothing either).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, fields
from typing import Any

from libchat.connection import address_key
from libchat.errors import AuthenticationFailed, ChatError, RateLimited
from libchat.protocol import check_nick, fold

from .costs import CostCensus
from .errors import AuthRequired
from .passwords import (
    MAX_PASSWORD_BYTES,
    PasswordRejected,
    cost_of,
    dummy_hash,
    hash_password,
    rounds_from,
    verify_password,
)
from .store import Account, AccountExists, AsyncUserStore
from .throttle import LoginThrottle, RegistrationThrottle

log = logging.getLogger("libchat.auth")

FAILED = "authentication failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """The plugin's settings, read from ``server.config`` (keys as below)."""

    #: SQLite file of accounts (``--db``); ``":memory:"`` for a throwaway store.
    db: str
    #: Let an unknown name create its account at first login (``--allow-register``).
    allow_register: bool = False
    #: bcrypt cost for new hashes (``--bcrypt-rounds``, $CHAT_BCRYPT_ROUNDS; default 12).
    bcrypt_rounds: int = 12
    #: Failed logins one account may have before it is locked out; 0: no limit.
    auth_max_failures: int = 5
    #: Failed logins one address may have before it is locked out; 0: no limit.
    auth_max_failures_per_address: int = 20
    #: First lockout, in seconds; each further failure doubles it.
    auth_lockout: float = 1.0
    #: Longest lockout; also how long failures are remembered.
    auth_max_lockout: float = 300.0
    #: New accounts one address may create per window; 0: no limit.
    register_limit: int = 3
    #: The registration window, in seconds.
    register_window: float = 600.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AuthConfig:
        db = config.get("db")
        if not db:
            raise ChatError("the auth plugin needs a user database: pass --db PATH")
        values: dict[str, Any] = {"db": str(db)}
        for field in fields(cls):
            if field.name in ("db", "bcrypt_rounds"):
                continue
            value = config.get(field.name)
            if value is not None:
                values[field.name] = _typed(field.name, value, type(getattr(_DEFAULTS, field.name)))
        values["bcrypt_rounds"] = rounds_from(config.get("bcrypt_rounds"))
        return cls(**values)


_DEFAULTS = AuthConfig(db=":memory:")


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ChatError(f"auth setting {name} must be true or false, not {value!r}")
        return value
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise ChatError(f"auth setting {name} must be a number, not {value!r}") from None
    if converted < 0:
        raise ChatError(f"auth setting {name} must not be negative")
    return converted


def address_of(peer: str) -> str:
    """What login throttling counts per: the address part of ``host:port`` /
    ``[v6]:port``, keyed as the server's connection limits key it (an IPv6
    /64 is one address, an IPv4-mapped address is its IPv4 one)."""
    host = peer.rsplit(":", 1)[0].strip("[]") if ":" in peer else peer
    return address_key(host)


class Authenticator:
    """Logs connections in against the store; one per server."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.store = AsyncUserStore(config.db)
        self.accounts = LoginThrottle(
            config.auth_max_failures, config.auth_lockout, config.auth_max_lockout
        )
        self.addresses = LoginThrottle(
            config.auth_max_failures_per_address, config.auth_lockout, config.auth_max_lockout
        )
        self.registrations = RegistrationThrottle(config.register_limit, config.register_window)
        #: The bcrypt costs in the store: what an unknown name is checked at.
        self.costs = CostCensus(config.bcrypt_rounds)
        self._dummy = dummy_hash(config.bcrypt_rounds)

    async def open(self) -> None:
        await self.store.open()
        await self._refresh_costs()
        self._report_costs()

    def _report_costs(self) -> None:
        others = self.costs.others()
        if not others:
            return
        listed = ", ".join(f"{n} at cost {cost}" for cost, n in others.items())
        log.warning(
            "bcrypt: some stored password hashes (%s) differ from this server's cost %d; "
            "each is rehashed at its owner's next login. Until then unknown names are "
            "checked at cost %d, the most common, and accounts at another cost can be "
            "told apart from names that do not exist by how long a failed login takes",
            listed,
            self.config.bcrypt_rounds,
            self.costs.dummy_cost(),
        )

    async def close(self) -> None:
        await self.store.close()

    def limits(self) -> dict[str, Any]:
        return {
            "max_password_bytes": MAX_PASSWORD_BYTES,
            "login_failures": self.config.auth_max_failures,
            "registration": self.config.allow_register,
        }

    # -- the login --------------------------------------------------------------------

    async def authenticate(self, hello: dict[str, Any], peer: str) -> str:
        """The account name this hello logs in as; else raise AuthRequired,
        AuthenticationFailed or RateLimited."""
        name = check_nick(hello.get("user"))
        password = hello.get("password")
        if password is None:
            raise AuthRequired("this server requires a password")
        address = address_of(peer)
        account_key = fold(name)
        self._check_throttles(name, address)
        self.accounts.begin(account_key)
        self.addresses.begin(address)
        try:
            granted = await self._verify(name, password, address)
        except AuthenticationFailed:
            self._failed(name, address)
            raise
        except BaseException:
            # Not an answer about the password (the store failed, the
            # client left): no failure counted, the attempt just ends.
            self.accounts.release(account_key)
            self.addresses.release(address)
            raise
        if granted is None:
            self._failed(name, address)
            raise AuthenticationFailed(FAILED)
        self.accounts.succeeded(account_key)
        self.addresses.succeeded(address)
        log.info("%s logged in from %s", granted, address)
        return granted

    def _failed(self, name: str, address: str) -> None:
        by_name = self.accounts.failed(fold(name))
        by_address = self.addresses.failed(address)
        # Never the password: not even a wrong one (it is often a typo of the right one).
        log.warning(
            "login failed for %r from %s (failures in a row: %d for the name, %d from the address)",
            name,
            address,
            by_name,
            by_address,
        )

    async def _verify(self, name: str, password: object, address: str) -> str | None:
        """The account's name if ``password`` is right, else None."""
        valid = isinstance(password, str)
        text = password if isinstance(password, str) else ""
        # Before the lookup, for known and unknown names alike.
        await self._refresh_costs()
        account = await self.store.get(name)
        if account is None and self.config.allow_register:
            return await self._register(name, text, address)
        # An unknown name, or a password that is not even a string, is still
        # checked (it cannot match): the same cost, the same answer.
        hashed = account.hash if account is not None else self._dummy_hash()
        matched = await asyncio.to_thread(verify_password, text, hashed)
        if not (matched and valid and account is not None):
            return None
        await self._rehash_if_needed(account, text)
        return account.name

    def _dummy_hash(self) -> bytes:
        """A hash no password matches, at the cost most stored hashes have."""
        cost = self.costs.dummy_cost()
        if cost_of(self._dummy) != cost:
            self._dummy = dummy_hash(cost)
        return self._dummy

    async def _refresh_costs(self) -> None:
        """Read the store's bcrypt costs again if the census is stale."""
        if self.costs.stale():
            self.costs.replace(await self.store.costs())

    async def _rehash_if_needed(self, account: Account, password: str) -> None:
        """After a successful login, store the password hashed at the
        configured cost if its hash has another one: the store converges to
        one cost, the one unknown names are then checked at. A failure here
        costs the login nothing."""
        old_cost, rounds = cost_of(account.hash), self.config.bcrypt_rounds
        if old_cost == rounds:
            return
        try:
            new = await asyncio.to_thread(hash_password, password, rounds)
            # Only if the hash is still the one just checked: a password
            # changed meanwhile (chat user passwd) is not overwritten.
            replaced = await self.store.replace_hash(account.name, account.hash, new)
        except PasswordRejected:
            return  # a password the rules would not take today: leave it be
        except Exception as exc:
            log.warning("could not rehash the password of %s: %s", account.name, exc)
            return
        if replaced:
            self.costs.changed(old_cost, rounds)
            log.info("rehashed %s's password at cost %d (was %s)", account.name, rounds, old_cost)

    def _check_throttles(self, name: str, address: str) -> None:
        refusals = [
            r
            for r in (self.accounts.refusal(fold(name)), self.addresses.refusal(address))
            if r is not None
        ]
        if not refusals:
            return
        wait = math.ceil(max(r.retry_after for r in refusals))
        if all(r.busy for r in refusals):
            log.warning("login for %r from %s refused: too many at once", name, address)
            raise RateLimited(f"too many logins at once; try again in {wait} s")
        log.warning("login for %r from %s refused: too many failures", name, address)
        raise RateLimited(f"too many failed logins; try again in {wait} s")

    async def _register(self, name: str, password: str, address: str) -> str | None:
        """Create ``name`` with ``password``; the new name, or None when
        someone else created it first with another password."""
        wait = self.registrations.retry_after(address)
        if wait > 0:
            log.warning("registration of %r from %s refused: too many new accounts", name, address)
            raise RateLimited(f"too many new accounts from your address; try again in "
                              f"{math.ceil(wait)} s")  # fmt: skip
        try:
            hashed = await asyncio.to_thread(hash_password, password, self.config.bcrypt_rounds)
        except PasswordRejected as exc:
            raise AuthenticationFailed(f"cannot register {name!r}: {exc.message}") from None
        self.registrations.record(address)
        try:
            account = await self.store.add(name, hashed)
        except AccountExists:
            # Two first logins raced: the loser must know the winner's password.
            existing = await self.store.get(name)
            if existing is None or not await asyncio.to_thread(
                verify_password, password, existing.hash
            ):
                return None
            return existing.name
        self.costs.added(self.config.bcrypt_rounds)
        log.info("registered %s from %s", name, address)
        return account.name
