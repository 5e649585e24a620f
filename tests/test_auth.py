"""The auth plugin: accounts in SQLite, bcrypt off the event loop, one answer
for every failure, brute-force and registration throttles, the ``chat user``
commands and ``chat join`` with a password (real subprocesses)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import logging
import os
import sqlite3
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import libchat
import libchat_auth
from conftest import WAIT, ServerProcess, chat_command, connect, next_of, run_chat, running_server
from libchat.errors import ChatError, RemoteError
from libchat.protocol import PROTOCOL_VERSION, FrameDecoder, encode_frame
from libchat_auth import passwords, service
from libchat_auth.costs import CostCensus
from libchat_auth.passwords import cost_of, hash_password, rounds_from, verify_password
from libchat_auth.store import SCHEMA_VERSION, StoreError, UserStore
from libchat_auth.throttle import LoginThrottle, Refusal, RegistrationThrottle

ROUNDS = 4  # bcrypt's minimum cost: about a millisecond per hash
FAST_ENV = {"CHAT_BCRYPT_ROUNDS": str(ROUNDS)}


# -- helpers ------------------------------------------------------------------------


def add_user(db: Path, name: str, password: str, rounds: int = ROUNDS) -> None:
    store = UserStore(db)
    try:
        store.add(name, hash_password(password, rounds))
    finally:
        store.close()


def stored_hash(db: Path, name: str) -> bytes:
    store = UserStore(db, create=False)
    try:
        account = store.get(name)
    finally:
        store.close()
    assert account is not None
    return account.hash


def names_in(db: Path) -> list[str]:
    store = UserStore(db)
    try:
        return store.names()
    finally:
        store.close()


@contextlib.asynccontextmanager
async def auth_server(db: Path, **config: Any) -> AsyncIterator[libchat.Server]:
    async with running_server(
        plugins=["auth"], config={"db": str(db), "bcrypt_rounds": ROUNDS, **config}
    ) as server:
        yield server


async def login(server: libchat.Server, user: str, password: str | None) -> libchat.Client:
    hello = {} if password is None else {"password": password}
    return await connect(server, user, hello=hello)


async def refused(server: libchat.Server, user: str, password: Any) -> RemoteError:
    """The error a login gets (it must fail)."""
    with pytest.raises(RemoteError) as info:
        client = await connect(server, user, hello={"password": password})
        await client.close()
    return info.value


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "users.db"


# -- logging in -----------------------------------------------------------------------


async def test_login_grants_the_account_name_as_stored(db: Path) -> None:
    add_user(db, "Alice", "correct horse")
    async with auth_server(db) as server:
        client = await login(server, "alice", "correct horse")
        assert client.user == "Alice"
        assert "auth" in client.welcome["plugins"]
        assert client.welcome["limits"]["max_password_bytes"] == 72
        await client.quit()


async def test_wrong_password_and_unknown_user_get_the_same_answer_and_cost(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_user(db, "alice", "right")
    checked: list[bytes] = []

    def counting_verify(password: str, hashed: bytes) -> bool:
        checked.append(hashed)
        return verify_password(password, hashed)

    monkeypatch.setattr(service, "verify_password", counting_verify)
    async with auth_server(db) as server:
        wrong = await refused(server, "alice", "wrong")
        assert len(checked) == 1
        unknown = await refused(server, "nobody", "wrong")
        assert len(checked) == 2  # a dummy bcrypt check, not a shortcut
    assert (wrong.remote_code, wrong.message) == ("auth_failed", "authentication failed")
    assert (unknown.remote_code, unknown.message) == (wrong.remote_code, wrong.message)
    # The dummy hash costs what a real one does.
    assert checked[1][:7] == checked[0][:7] == f"$2b$0{ROUNDS}$".encode()


async def test_hello_without_password_is_auth_required(db: Path) -> None:
    add_user(db, "alice", "pw")
    async with auth_server(db) as server:
        with pytest.raises(RemoteError) as info:
            await login(server, "alice", None)
    assert info.value.remote_code == libchat_auth.AUTH_REQUIRED == libchat_auth.AuthRequired.code


async def test_frames_before_the_hello_close_the_connection(db: Path) -> None:
    add_user(db, "alice", "pw")
    async with auth_server(db) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        early = encode_frame({"type": "msg", "room": "lobby", "text": "let me in"})
        hello = encode_frame(
            {"type": "hello", "version": PROTOCOL_VERSION, "user": "alice", "password": "pw"}
        )
        writer.write(early + hello)
        data = await asyncio.wait_for(reader.read(), WAIT)  # to end of stream: closed
        writer.close()
        types = [frame.type for frame in FrameDecoder(max_frame_size=None).feed(data)]
        assert types[0] == "error" and "welcome" not in types
        assert await server.hub.online("alice") is None


async def test_nobody_can_take_an_account_name(db: Path) -> None:
    add_user(db, "alice", "alice-pw")
    add_user(db, "bob", "bob-pw")
    async with auth_server(db) as server:
        assert (await refused(server, "alice", "bob-pw")).remote_code == "auth_failed"
        with pytest.raises(RemoteError):
            await login(server, "ALICE", None)
        assert await server.hub.online("alice") is None


async def test_one_account_may_log_in_from_several_connections(db: Path) -> None:
    add_user(db, "alice", "pw-a")
    add_user(db, "bob", "pw-b")
    async with auth_server(db) as server:
        laptop = await login(server, "alice", "pw-a")
        phone = await login(server, "Alice", "pw-a")
        bob = await login(server, "bob", "pw-b")
        await bob.send("hi alice", wait=True)
        for client in (laptop, phone):
            event = await next_of(client, libchat.Message, text="hi alice")
            assert event.sender == "bob"
        await laptop.send("from my laptop", wait=True)
        assert (await next_of(phone, libchat.Message, text="from my laptop")).sender == "alice"
        for client in (laptop, phone, bob):
            await client.quit()


async def test_password_over_72_bytes_fails_cleanly(db: Path) -> None:
    add_user(db, "alice", "a" * 72)
    async with auth_server(db) as server:
        error = await refused(server, "alice", "a" * 73)
        assert (error.remote_code, error.message) == ("auth_failed", "authentication failed")
        assert (await refused(server, "alice", 12345)).remote_code == "auth_failed"
        client = await login(server, "alice", "a" * 72)  # the server is fine
        await client.quit()
    with pytest.raises(ChatError, match="72 bytes"):
        hash_password("é" * 37, ROUNDS)  # 74 bytes of UTF-8, 37 characters


async def test_a_failing_store_is_an_internal_error_not_a_crash(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_user(db, "alice", "pw")
    async with auth_server(db) as server:
        auth = libchat_auth.authenticator(server)

        async def broken(name: str) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(auth.store, "get", broken)
        for _ in range(auth.config.auth_max_failures + 1):
            error = await refused(server, "alice", "pw")
            assert error.remote_code == "internal_error"
        monkeypatch.undo()
        # Store errors are not failed logins: alice is not locked out.
        client = await login(server, "alice", "pw")
        await client.quit()


def test_verify_refuses_over_72_bytes_even_where_bcrypt_would_truncate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hashed = hash_password("a" * 72, ROUNDS)
    real_hashpw = passwords.bcrypt.hashpw

    def bcrypt4_hashpw(password: bytes, salt: bytes) -> bytes:
        # bcrypt 4 (which pyproject allows) reads the first 72 bytes and
        # ignores the rest, where bcrypt 5 raises ValueError.
        return real_hashpw(password[: passwords.MAX_PASSWORD_BYTES], salt)

    monkeypatch.setattr(passwords.bcrypt, "hashpw", bcrypt4_hashpw)
    assert verify_password("a" * 72, hashed)
    assert not verify_password("a" * 72 + "b", hashed)
    assert not verify_password("a" * 72 + "é", hashed)
    with pytest.raises(ChatError, match="73 bytes"):
        hash_password("a" * 73, ROUNDS)  # never stored cut to 72


# -- bcrypt costs: an unknown name costs what a real one does -----------------------------


def record_costs(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The cost of every hash a login is checked against, in order."""
    costs: list[int | None] = []

    def recording_verify(password: str, hashed: bytes) -> bool:
        costs.append(cost_of(hashed))
        return verify_password(password, hashed)

    monkeypatch.setattr(service, "verify_password", recording_verify)
    return costs


async def test_unknown_names_are_checked_at_the_cost_of_the_stored_hashes(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # `chat user add` made these at another cost than the server's (as its
    # default 12 against a server run with --bcrypt-rounds 4): an unknown
    # name checked at the server's cost would fail faster than a real one.
    for name in ("alice", "bob"):
        add_user(db, name, "pw", rounds=ROUNDS + 1)
    add_user(db, "carol", "pw", rounds=ROUNDS)
    costs = record_costs(monkeypatch)
    caplog.set_level(logging.WARNING, logger="libchat.auth")
    async with auth_server(db, bcrypt_rounds=ROUNDS) as server:
        await refused(server, "alice", "wrong")
        await refused(server, "nobody", "wrong")
        await refused(server, "carol", "wrong")
        assert costs == [ROUNDS + 1, ROUNDS + 1, ROUNDS]  # the most common cost
        assert libchat_auth.authenticator(server).costs.counts == {ROUNDS + 1: 2, ROUNDS: 1}
    assert "some stored password hashes (2 at cost 5) differ from this server's cost 4" in (
        caplog.text
    )


async def test_a_login_rehashes_the_password_at_the_configured_cost(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_user(db, "alice", "alice-pw", rounds=ROUNDS + 1)
    costs = record_costs(monkeypatch)
    async with auth_server(db, bcrypt_rounds=ROUNDS) as server:
        await refused(server, "alice", "wrong")  # a failure changes nothing
        assert cost_of(stored_hash(db, "alice")) == ROUNDS + 1
        alice = await login(server, "alice", "alice-pw")
        await alice.quit()
        assert cost_of(stored_hash(db, "alice")) == ROUNDS
        assert verify_password("alice-pw", stored_hash(db, "alice"))
        # The census follows: the only account is now at the server's cost,
        # and so is the check of a name that does not exist.
        await refused(server, "nobody", "wrong")
        assert costs == [ROUNDS + 1, ROUNDS + 1, ROUNDS]
        alice = await login(server, "alice", "alice-pw")  # still the same password
        await alice.quit()


def test_a_rehash_never_overwrites_a_password_changed_meanwhile(db: Path) -> None:
    add_user(db, "alice", "old-pw", rounds=ROUNDS + 1)
    store = UserStore(db)
    try:
        checked = store.get("alice")
        assert checked is not None
        store.set_hash("alice", hash_password("new-pw", ROUNDS + 1))  # chat user passwd
        assert not store.replace_hash("alice", checked.hash, hash_password("old-pw", ROUNDS))
        account = store.get("alice")
        assert account is not None and verify_password("new-pw", account.hash)
        assert store.costs() == {ROUNDS + 1: 1}
    finally:
        store.close()


async def test_the_census_follows_accounts_added_while_the_server_runs(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_user(db, "alice", "pw", rounds=ROUNDS)
    costs = record_costs(monkeypatch)
    async with auth_server(db, bcrypt_rounds=ROUNDS) as server:
        census = libchat_auth.authenticator(server).costs
        await refused(server, "nobody", "x")
        for name in ("bob", "carol"):  # `chat user add` beside the running server
            add_user(db, name, "pw", rounds=ROUNDS + 1)
        await refused(server, "nobody", "x")  # not read again yet
        census.refresh_after = 0.0
        await refused(server, "nobody", "x")
    assert costs == [ROUNDS, ROUNDS, ROUNDS + 1]


def test_cost_census() -> None:
    clock = FakeClock()
    census = CostCensus(12, refresh_after=60.0, clock=clock)
    assert census.stale() and census.dummy_cost() == 12  # empty: the configured cost
    census.replace({10: 3, 11: 3, 4: 1, 9: 0})
    assert not census.stale() and census.dummy_cost() == 11  # a tie: the higher
    assert census.others() == {4: 1, 10: 3, 11: 3}
    census.changed(11, 12)
    census.added(12)
    assert census.dummy_cost() == 10 and census.counts[12] == 2
    clock.now += 60.0
    assert census.stale()
    assert cost_of(b"$2b$07$" + b"x" * 53) == 7 and cost_of(b"not a hash") is None
    assert cost_of(passwords.dummy_hash(5)) == 5
    assert not verify_password("", passwords.dummy_hash(ROUNDS))


# -- registration ---------------------------------------------------------------------


async def test_unknown_names_cannot_register_by_default(db: Path) -> None:
    async with auth_server(db) as server:
        assert (await refused(server, "carol", "pw")).message == "authentication failed"
    assert names_in(db) == []


async def test_allow_register_creates_the_account_and_it_survives_a_restart(db: Path) -> None:
    async with auth_server(db, allow_register=True, bcrypt_rounds=5) as server:
        carol = await login(server, "Carol", "carol-pw")
        assert carol.user == "Carol"
        await carol.quit()
        assert (await refused(server, "carol", "not-carol")).remote_code == "auth_failed"
    store = UserStore(db)
    account = store.get("carol")
    store.close()
    assert account is not None and account.hash.startswith(b"$2b$05$")  # the configured cost
    async with auth_server(db) as server:  # a restart: the account is still there
        carol = await login(server, "carol", "carol-pw")
        assert carol.user == "Carol"
        await carol.quit()


async def test_registration_rejects_a_password_bcrypt_cannot_take(db: Path) -> None:
    async with auth_server(db, allow_register=True) as server:
        error = await refused(server, "carol", "x" * 80)
    assert "72 bytes" in error.message
    assert names_in(db) == []


async def test_registration_spam_is_throttled_per_address(db: Path) -> None:
    async with auth_server(db, allow_register=True, register_limit=2) as server:
        for name in ("spam1", "spam2"):
            await (await login(server, name, "pw")).quit()
        error = await refused(server, "spam3", "pw")
        assert error.remote_code == "rate_limited"
        assert "new accounts" in error.message
        # Existing accounts still log in: only creation is throttled.
        await (await login(server, "spam1", "pw")).quit()
    assert names_in(db) == ["spam1", "spam2"]


async def test_concurrent_logins_and_registrations_keep_the_store_consistent(db: Path) -> None:
    add_user(db, "alice", "pw")
    async with auth_server(db, allow_register=True, register_limit=0) as server:
        names = [f"user{i}" for i in range(15)]
        clients = await asyncio.gather(
            *(login(server, name, f"pw-{name}") for name in names),
            *(login(server, "alice", "pw") for _ in range(5)),
        )
        assert sorted(c.user for c in clients) == sorted([*names, *["alice"] * 5])
        # Two first logins of one new name with different passwords: one wins.
        races = await asyncio.gather(
            login(server, "dave", "one"), login(server, "dave", "two"), return_exceptions=True
        )
        assert sorted(type(r).__name__ for r in races) == ["Client", "RemoteError"]
        for client in [*clients, *(r for r in races if isinstance(r, libchat.Client))]:
            await client.close()
    assert names_in(db) == sorted(["alice", "dave", *names])


# -- brute force ----------------------------------------------------------------------


async def test_failed_logins_lock_the_account_and_a_success_resets_it(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_user(db, "alice", "the-real-password")
    caplog.set_level(logging.INFO, logger="libchat.auth")
    config = {"auth_max_failures": 3, "auth_max_failures_per_address": 0, "auth_lockout": 4.0}
    async with auth_server(db, **config) as server:
        clock = FakeClock()
        libchat_auth.authenticator(server).accounts.clock = clock
        for guess in ("guess-1", "guess-2", "guess-3"):
            assert (await refused(server, "alice", guess)).remote_code == "auth_failed"
        locked = await refused(server, "alice", "the-real-password")
        assert locked.remote_code == "rate_limited"
        assert locked.message == "too many failed logins; try again in 4 s"
        clock.now += 4.0
        alice = await login(server, "alice", "the-real-password")
        await alice.quit()
        # The success forgot the failures: three more guesses before a lockout.
        for guess in ("guess-4", "guess-5", "guess-6"):
            assert (await refused(server, "Alice", guess)).remote_code == "auth_failed"
        assert (await refused(server, "alice", "guess-7")).remote_code == "rate_limited"
    log = caplog.text
    assert "login failed for 'alice' from 127.0.0.1" in log
    assert "refused: too many failures" in log
    for secret in ("the-real-password", "guess-1", "guess-6"):
        assert secret not in log


async def test_unknown_names_are_throttled_like_real_ones(db: Path) -> None:
    config = {"auth_max_failures": 2, "auth_max_failures_per_address": 0}
    async with auth_server(db, **config) as server:
        libchat_auth.authenticator(server).accounts.clock = FakeClock()
        for _ in range(2):
            assert (await refused(server, "ghost", "x")).remote_code == "auth_failed"
        # The lockout says nothing about whether "ghost" exists.
        assert (await refused(server, "ghost", "x")).remote_code == "rate_limited"


async def test_failures_from_one_address_lock_the_address(db: Path) -> None:
    add_user(db, "alice", "pw")
    config = {"auth_max_failures": 0, "auth_max_failures_per_address": 3}
    async with auth_server(db, **config) as server:
        libchat_auth.authenticator(server).addresses.clock = FakeClock()
        for name in ("alice", "bob", "carol"):  # credential stuffing: many names
            assert (await refused(server, name, "guess")).remote_code == "auth_failed"
        assert (await refused(server, "alice", "pw")).remote_code == "rate_limited"


async def test_parallel_guesses_cannot_outrun_the_throttle(db: Path) -> None:
    add_user(db, "alice", "pw")
    config = {"auth_max_failures": 3, "auth_max_failures_per_address": 0}
    async with auth_server(db, **config) as server:
        libchat_auth.authenticator(server).accounts.clock = FakeClock()
        results = await asyncio.gather(
            *(login(server, "alice", f"guess-{i}") for i in range(10)), return_exceptions=True
        )
    answers = sorted(r.message for r in results if isinstance(r, RemoteError))
    assert (
        answers == ["authentication failed"] * 3 + ["too many logins at once; try again in 1 s"] * 7
    )


def test_login_throttle_doubles_the_lockout_caps_it_and_forgets() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(2, 1.0, 8.0, clock=clock, max_keys=3)
    assert [throttle.delay(n) for n in range(7)] == [0, 0, 1, 2, 4, 8, 8]
    for expected in (1, 2):
        assert throttle.refusal("k") is None
        throttle.begin("k")
        assert throttle.failed("k") == expected
    assert throttle.refusal("k") == Refusal(1.0, busy=False)
    clock.now += 0.25
    assert throttle.refusal("k") == Refusal(0.75, busy=False)
    clock.now += 0.75
    assert throttle.refusal("k") is None
    throttle.begin("k")  # after a lockout, one attempt at a time
    assert throttle.refusal("k") == Refusal(1.0, busy=True)
    throttle.failed("k")
    assert throttle.refusal("k") == Refusal(2.0, busy=False)  # doubled
    clock.now += 8.0  # quiet for max_delay: forgotten
    assert throttle.refusal("k") is None and throttle.failures("k") == 0
    for key in "abcd":  # memory is bounded: the idlest key goes
        throttle.begin(key)
        throttle.failed(key)
    assert throttle.failures("a") == 0 and throttle.failures("d") == 1
    throttle.begin("d")
    throttle.succeeded("d")
    assert throttle.failures("d") == 0 and throttle.refusal("d") is None
    throttle.begin("e")
    throttle.release("e")  # an error, not an answer: no failure
    assert throttle.failures("e") == 0
    off = LoginThrottle(0, 1.0, 8.0)
    for _ in range(100):
        off.begin("k")
        off.failed("k")
    assert off.refusal("k") is None


def test_login_throttle_bounds_attempts_in_flight() -> None:
    throttle = LoginThrottle(3, 1.0, 8.0, clock=FakeClock())
    for _ in range(3):
        assert throttle.refusal("k") is None
        throttle.begin("k")
    assert throttle.refusal("k") == Refusal(1.0, busy=True)
    throttle.succeeded("k")
    assert throttle.refusal("k") is None


def test_registration_throttle_is_a_sliding_window() -> None:
    clock = FakeClock()
    throttle = RegistrationThrottle(2, 60.0, clock=clock)
    throttle.record("1.2.3.4")
    clock.now += 10
    throttle.record("1.2.3.4")
    assert throttle.retry_after("1.2.3.4") == 50.0
    assert throttle.retry_after("5.6.7.8") == 0
    clock.now += 50
    assert throttle.retry_after("1.2.3.4") == 0


# -- bcrypt stays off the event loop --------------------------------------------------


async def test_chat_flows_during_a_burst_of_logins(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten logins at cost 10 are held inside bcrypt while alice and bob chat.
    If bcrypt ran on the event loop, the held call would stall the loop and
    no message could arrive."""
    slow = [f"slow{i}" for i in range(10)]
    hashes = await asyncio.gather(*(asyncio.to_thread(hash_password, n, 10) for n in slow))
    store = UserStore(db)
    for name, hashed in zip(slow, hashes, strict=True):
        store.add(name, hashed)
    store.close()
    add_user(db, "alice", "pw-a")
    add_user(db, "bob", "pw-b")

    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    gate = threading.Event()
    entered = asyncio.Event()
    on_loop: list[bool] = []

    def held_verify(password: str, hashed: bytes) -> bool:
        on_loop.append(threading.get_ident() == loop_thread)
        loop.call_soon_threadsafe(entered.set)
        gate.wait(WAIT)  # bounded: a stalled test fails instead of hanging
        return verify_password(password, hashed)

    async with auth_server(db) as server:
        alice = await login(server, "alice", "pw-a")
        bob = await login(server, "bob", "pw-b")
        monkeypatch.setattr(service, "verify_password", held_verify)
        burst = [asyncio.create_task(login(server, name, name)) for name in slow]
        try:
            await asyncio.wait_for(entered.wait(), WAIT)
            for i in range(5):
                await alice.send(f"ping {i}")
                await next_of(bob, libchat.Message, text=f"ping {i}")
                await bob.send(f"pong {i}")
                await next_of(alice, libchat.Message, text=f"pong {i}")
            assert not any(task.done() for task in burst)  # all still in bcrypt or queued
        finally:
            gate.set()
        # Released, they run at cost 10 for real; the chat keeps flowing meanwhile.
        await alice.send("during the burst")
        await next_of(bob, libchat.Message, text="during the burst")
        clients = await asyncio.wait_for(asyncio.gather(*burst), WAIT)
        assert sorted(c.user for c in clients) == slow
        for client in (alice, bob, *clients):
            await client.close()
    assert len(on_loop) == 10 and not any(on_loop)


# -- the store --------------------------------------------------------------------------


def test_store_is_created_with_a_schema_version_and_wal(db: Path) -> None:
    assert not db.exists()
    store = UserStore(db)
    assert store.schema_version() == SCHEMA_VERSION == 1
    store.add("Alice", hash_password("pw", ROUNDS))
    store.close()
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        raw.close()
    store = UserStore(db)  # reopened: nothing lost, nothing migrated twice
    account = store.get("ALICE")
    assert account is not None and account.name == "Alice"
    assert not store.remove("nobody") and store.remove("alice")
    store.close()


def test_store_refuses_a_newer_schema_and_a_non_database(db: Path, tmp_path: Path) -> None:
    UserStore(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version=99")
    raw.close()
    with pytest.raises(StoreError, match="schema version 99"):
        UserStore(db)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot use the user database"):
        UserStore(junk)


async def test_server_with_auth_needs_a_usable_database(tmp_path: Path) -> None:
    with pytest.raises(ChatError, match="needs a user database"):
        async with running_server(plugins=["auth"]):
            pass
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"nope" * 1000)
    with pytest.raises(ChatError, match="cannot use the user database"):
        async with auth_server(junk):
            pass


def test_bcrypt_rounds_come_from_config_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(passwords.ROUNDS_ENV, raising=False)
    assert rounds_from(None) == 12
    monkeypatch.setenv(passwords.ROUNDS_ENV, "6")
    assert rounds_from(None) == 6
    assert rounds_from(8) == 8
    for bad in (3, 32, "many"):
        with pytest.raises(ChatError, match="bcrypt cost"):
            rounds_from(bad)


def test_auth_warns_when_passwords_would_cross_a_network_in_clear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="libchat.auth")
    assert not libchat_auth.warn_if_plaintext(libchat.Server("127.0.0.1", 0))
    assert not libchat_auth.warn_if_plaintext(libchat.Server("localhost", 0))
    assert libchat_auth.warn_if_plaintext(libchat.Server("0.0.0.0", 0))  # never started
    assert "without TLS" in caplog.text
    tls_server = libchat.Server("0.0.0.0", 0, ssl=ssl.create_default_context())
    assert not libchat_auth.warn_if_plaintext(tls_server)


# -- the `chat user` commands (real subprocesses) ---------------------------------------


def test_user_commands(db: Path) -> None:
    env = {**FAST_ENV, "CHAT_PASSWORD": "first-pw"}
    added = run_chat("user", "add", "Alice", "--db", str(db), env=env)
    assert added.returncode == 0, added.stderr
    assert added.stdout == "added user Alice\n"
    again = run_chat("user", "add", "alice", "--db", str(db), env=env)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert run_chat("user", "add", "bob", "--db", str(db), env=env).returncode == 0
    listed = run_chat("user", "list", "--db", str(db))
    assert listed.stdout.split() == ["Alice", "bob"]

    store = UserStore(db)
    before = store.get("alice")
    changed = run_chat(
        "user", "passwd", "ALICE", "--db", str(db), env={**env, "CHAT_PASSWORD": "second-pw"}
    )
    after = store.get("alice")
    store.close()
    assert changed.returncode == 0 and changed.stdout == "changed the password of Alice\n"
    assert before is not None and after is not None
    assert verify_password("second-pw", after.hash) and not verify_password("first-pw", after.hash)

    removed = run_chat("user", "remove", "bob", "--db", str(db))
    assert removed.returncode == 0 and removed.stdout == "removed user bob\n"
    missing = run_chat("user", "remove", "bob", "--db", str(db))
    assert missing.returncode == 1 and "no user 'bob'" in missing.stderr
    assert run_chat("user", "passwd", "bob", "--db", str(db), env=env).returncode == 1
    assert names_in(db) == ["Alice"]


def test_only_user_add_creates_the_database(tmp_path: Path) -> None:
    typo = tmp_path / "typo.db"
    env = {**FAST_ENV, "CHAT_PASSWORD": "pw"}
    for args in (["list"], ["passwd", "alice"], ["remove", "alice"]):
        result = run_chat("user", *args, "--db", str(typo), env=env)
        assert result.returncode == 1, args
        assert result.stderr == (
            f"Error: there is no user database {typo} (`chat user add` creates one)\n"
        )
        assert not typo.exists(), args
    assert run_chat("user", "add", "alice", "--db", str(typo), env=env).returncode == 0
    assert run_chat("user", "list", "--db", str(typo)).stdout == "alice\n"
    with pytest.raises(StoreError, match="no user database"):
        UserStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_user_add_refuses_bad_input(db: Path) -> None:
    too_long = run_chat("user", "add", "carol", "--db", str(db),
                        env={**FAST_ENV, "CHAT_PASSWORD": "x" * 73})  # fmt: skip
    assert too_long.returncode == 1
    assert "73 bytes long; bcrypt uses at most 72 bytes" in too_long.stderr
    no_password = run_chat("user", "add", "carol", "--db", str(db), env={"CHAT_PASSWORD": ""})
    assert no_password.returncode == 1 and "set CHAT_PASSWORD" in no_password.stderr
    bad_name = run_chat("user", "add", "no spaces", "--db", str(db), env={"CHAT_PASSWORD": "x"})
    assert bad_name.returncode == 2 and "invalid user name" in bad_name.stderr
    # A password is never a bare argument.
    as_argument = run_chat("user", "add", "carol", "hunter2", "--db", str(db))
    assert as_argument.returncode == 2
    assert names_in(db) == []


def _environ_without_password() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CHAT_PASSWORD"}
    return {**env, **FAST_ENV}


def test_user_add_asks_twice_at_a_hidden_prompt(db: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        chat_command()[0],
        ["user", "add", "dora", "--db", str(db)],
        env=_environ_without_password(),
        encoding="utf-8",
        timeout=WAIT,
    )
    child.logfile_read = transcript = io.StringIO()
    child.expect("New password for dora: ")
    child.sendline("one")
    child.expect("Repeat the password: ")
    child.sendline("two")
    child.expect("do not match")
    child.expect("New password for dora: ")
    child.sendline("s3cret")
    child.expect("Repeat the password: ")
    child.sendline("s3cret")
    child.expect("added user dora")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "s3cret" not in transcript.getvalue()  # hidden: never echoed
    store = UserStore(db)
    account = store.get("dora")
    store.close()
    assert account is not None and verify_password("s3cret", account.hash)


# -- serve and join end to end ------------------------------------------------------------


@pytest.fixture
def auth_chat_server(db: Path) -> Iterator[ServerProcess]:
    add_user(db, "alice", "alice-pw")
    add_user(db, "bob", "bob-pw")
    proc = ServerProcess("--plugins", "auth", "--db", str(db), env=FAST_ENV)
    try:
        yield proc
    finally:
        proc.stop()


def join(proc: ServerProcess, *args: str, input: str = "", **env: str) -> Any:
    return run_chat("join", "--port", str(proc.port), *args, input=input, env=env)


async def test_join_with_a_password_from_the_environment(
    auth_chat_server: ServerProcess,
) -> None:
    port = auth_chat_server.port
    bob = await libchat.open_client("127.0.0.1", port, user="bob", hello={"password": "bob-pw"})
    result = await asyncio.to_thread(
        join, auth_chat_server, "--user", "ALICE", input="hello from alice\n",
        CHAT_PASSWORD="alice-pw",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    message = await next_of(bob, libchat.Message, text="hello from alice")
    assert message.sender == "alice"
    await bob.quit()


def test_join_failures_look_alike(auth_chat_server: ServerProcess) -> None:
    wrong = join(auth_chat_server, "--user", "alice", CHAT_PASSWORD="nope")
    unknown = join(auth_chat_server, "--user", "mallory", CHAT_PASSWORD="nope")
    assert wrong.returncode == unknown.returncode == 1
    assert wrong.stderr == unknown.stderr == "Error: authentication failed\n"
    assert wrong.stdout == unknown.stdout == ""
    # ...and the server logged both, without the password.
    auth_chat_server.wait_for(r"login failed for 'mallory'")
    assert not any("nope" in line for line in auth_chat_server.lines)


def test_join_without_a_password_and_no_terminal_is_a_clear_error(
    auth_chat_server: ServerProcess,
) -> None:
    result = run_chat(
        "join", "--port", str(auth_chat_server.port), "--user", "alice",
        env={"CHAT_PASSWORD": ""},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "Error: the server requires a password: set CHAT_PASSWORD "
        "(stdin is not a terminal, so it cannot be asked for)\n"
    )


def test_join_asks_for_the_password_at_a_hidden_prompt(auth_chat_server: ServerProcess) -> None:
    pexpect = pytest.importorskip("pexpect")
    # --json keeps the session line-based (stdin is still a terminal, so the
    # password is asked for) and the test independent of the full-screen UI.
    child = pexpect.spawn(
        chat_command()[0],
        ["join", "--port", str(auth_chat_server.port), "--user", "alice", "--json"],
        env=_environ_without_password(),
        encoding="utf-8",
        timeout=WAIT,
    )
    child.logfile_read = transcript = io.StringIO()
    child.expect("Password for alice: ")
    child.sendline("alice-pw")
    child.expect('"type":"presence","room":"lobby","user":"alice","event":"joined"')
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "alice-pw" not in transcript.getvalue()  # hidden: never echoed


def test_serve_allow_register(db: Path) -> None:
    proc = ServerProcess("--plugins", "auth", "--db", str(db), "--allow-register", env=FAST_ENV)
    try:
        first = join(proc, "--user", "newbie", input="hi\n", CHAT_PASSWORD="fresh-pw")
        assert first.returncode == 0, first.stderr
        second = join(proc, "--user", "newbie", CHAT_PASSWORD="other-pw")
        assert second.returncode == 1 and second.stderr == "Error: authentication failed\n"
    finally:
        proc.stop()
    assert names_in(db) == ["newbie"]


# -- one definition of each shared name ---------------------------------------------------


def test_the_password_variable_and_auth_required_code_are_defined_once() -> None:
    root = Path(__file__).resolve().parent.parent  # the source tree, installed or not
    defined = {
        (path.relative_to(root).as_posix(), target.id)
        for path in sorted((root / "cli").rglob("*.py")) + sorted((root / "plugins").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text("utf-8")))
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id in ("PASSWORD_ENV", "AUTH_REQUIRED")
    }
    assert defined == {
        ("cli/libchat_cli/options.py", "PASSWORD_ENV"),
        ("cli/libchat_cli/options.py", "AUTH_REQUIRED"),
    }
    assert libchat_auth.AuthRequired.code == libchat_auth.AUTH_REQUIRED == "auth_required"


def test_login_throttling_counts_an_ipv6_64_as_one_address() -> None:
    assert service.address_of("[2001:db8:1:2:aaaa::1]:5000") == service.address_of(
        "[2001:db8:1:2:bbbb::9]:6000"
    )
    assert service.address_of("[2001:db8:1:3::1]:5000") != service.address_of(
        "[2001:db8:1:2::1]:5000"
    )
    assert service.address_of("[::ffff:192.0.2.7]:1") == service.address_of("192.0.2.7:2")
