"""The dm plugin: private messages, in process and through the real `chat`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import libchat
import libchat_dm
from conftest import WAIT, ServerProcess, chat_command, connect, run_chat, running_server
from libchat.errors import RemoteError
from libchat.protocol import fold
from libchat.session import RATE_LIMITED

# -- helpers --------------------------------------------------------------------------


async def next_chat(client: libchat.Client) -> libchat.Event:
    """The next room or private message (presence and notices skipped)."""

    async def scan() -> libchat.Event:
        while True:
            event = await client.next_event()
            if isinstance(event, libchat.Message | libchat.PrivateMessage):
                return event

    return await asyncio.wait_for(scan(), WAIT)


async def assert_next_chat_is(client: libchat.Client, sender: str, text: str) -> None:
    """The next message ``client`` sees is ``sender``'s ``text``: whatever
    was sent to it before that (a private message it must not get) fails."""
    event = await next_chat(client)
    assert (type(event), event.sender, event.text) == (libchat.Message, sender, text)  # type: ignore[attr-defined]


class Accounts:
    """A stand-in accounts plugin: names in ``known`` are accounts; a hello
    with the right password is authenticated (may connect several times)."""

    def __init__(self, *known: str) -> None:
        self.known = {fold(n) for n in known}
        #: while cleared, the account check waits: lets a test log someone
        #: in at the exact moment a message is being stored for them
        self.gate = asyncio.Event()
        self.gate.set()

    @libchat.hookimpl
    def libchat_authenticate(self, hello: dict[str, Any]) -> str | None:
        return str(hello["user"]) if hello.get("password") == "pw" else None

    @libchat.hookimpl(optionalhook=True)
    async def libchat_account_exists(self, name: str) -> bool:
        await self.gate.wait()
        return fold(name) in self.known


class Departures:
    """A plugin that tells when a user's session has ended (detached)."""

    def __init__(self) -> None:
        self.left: dict[str, asyncio.Event] = {}

    def event(self, name: str) -> asyncio.Event:
        return self.left.setdefault(fold(name), asyncio.Event())

    @libchat.hookimpl
    def libchat_session_closed(self, session: libchat.Session) -> None:
        self.event(session.name).set()


async def login(server: libchat.Server, user: str) -> libchat.Client:
    return await connect(server, user, hello={"password": "pw"})


@pytest.fixture
async def dm_server() -> AsyncIterator[libchat.Server]:
    async with running_server(plugins=["dm"]) as srv:
        yield srv


# -- delivery -------------------------------------------------------------------------


async def test_private_message_reaches_only_the_recipient(dm_server: libchat.Server) -> None:
    alice = await connect(dm_server, "alice")
    bob = await connect(dm_server, "bob")
    carol = await connect(dm_server, "carol")
    mid = await alice.private("bob", "psst")
    event = await next_chat(bob)
    assert isinstance(event, libchat.PrivateMessage)
    assert (event.sender, event.recipient, event.text, event.mid) == ("alice", "bob", "psst", mid)
    assert event.ts > 0
    await alice.send("public")
    await assert_next_chat_is(carol, "alice", "public")
    # the sender got an ok reply, not the message back as an event
    await carol.send("to all")
    await assert_next_chat_is(alice, "carol", "to all")
    for client in (alice, bob, carol):
        await client.quit()


async def test_msg_command_replies_with_a_line_to_print(dm_server: libchat.Server) -> None:
    alice = await connect(dm_server, "alice")
    bob = await connect(dm_server, "bob")
    usages = {c["name"]: c["usage"] for c in alice.welcome["commands"]}
    assert usages == {"msg": "/msg NAME TEXT", "reply": "/reply TEXT"}  # listed by /help
    reply = await alice.command("msg", "BOB hello  there")
    assert reply["to"] == "bob"  # as its holder spells it
    assert reply["mid"] and reply["ts"] > 0
    assert reply["text"] == "[private] alice -> bob: hello  there"
    event = await next_chat(bob)
    assert isinstance(event, libchat.PrivateMessage)
    assert (event.sender, event.recipient, event.text) == ("alice", "bob", "hello  there")
    assert event.mid == reply["mid"]
    # control characters are escaped in the line the sender's terminal prints
    reply = await alice.command("msg", "bob bell\x07")
    assert reply["text"] == "[private] alice -> bob: bell\\x07"
    # and so are the characters that reorder text or hide in it (the
    # terminal's own cleaning, libchat_cli.render.clean, is the one used)
    reply = await alice.command("msg", "bob txt.\u202eexe\u200b\u2067")
    assert reply["text"] == "[private] alice -> bob: txt.\\u202eexe\\u200b\\u2067"
    await alice.quit()
    await bob.quit()


async def test_every_connection_of_recipient_and_sender_devices() -> None:
    async with running_server(plugins=["dm", Accounts()]) as server:
        alice1, alice2 = await login(server, "alice"), await login(server, "alice")
        bob1, bob2 = await login(server, "bob"), await login(server, "bob")
        carol = await connect(server, "carol")
        reply = await alice1.request({"type": "dm", "to": "bob", "text": "to all of bob"})
        assert set(reply) >= {"id", "mid", "ts", "to"}
        for client in (bob1, bob2, alice2):  # alice2: the sender's other device
            event = await next_chat(client)
            assert isinstance(event, libchat.PrivateMessage)
            assert (event.sender, event.recipient, event.text) == ("alice", "bob", "to all of bob")
            assert event.mid == reply["mid"]
        await carol.send("after")
        await assert_next_chat_is(alice1, "carol", "after")
        for client in (alice1, alice2, bob1, bob2, carol):
            await client.quit()


async def test_sender_never_gets_its_own_message_back() -> None:
    # With the core LocalHub (no ``exclude`` yet) and a user on two devices.
    async with running_server(plugins=["dm", Accounts()]) as server:
        alice1, alice2 = await login(server, "alice"), await login(server, "alice")
        bob = await connect(server, "bob")
        await alice1.private("bob", "one")
        await alice1.private("alice", "note to self")
        event = await next_chat(bob)
        assert isinstance(event, libchat.PrivateMessage) and event.text == "one"
        await bob.send("after")
        await assert_next_chat_is(alice1, "bob", "after")
        for client in (alice1, alice2, bob):
            await client.quit()


async def test_sender_is_stamped_by_the_server(dm_server: libchat.Server) -> None:
    alice = await connect(dm_server, "alice")
    bob = await connect(dm_server, "bob")
    await connect(dm_server, "carol")
    await alice.request({"type": "dm", "from": "carol", "to": "bob", "text": "forged?"})
    await alice.request(
        {"type": "command", "command": "msg", "args": "bob forged too?", "from": "carol"}
    )
    for text in ("forged?", "forged too?"):
        event = await next_chat(bob)
        assert isinstance(event, libchat.PrivateMessage)
        assert (event.sender, event.text) == ("alice", text)
        assert event.header["from"] == "alice"
    await alice.quit()
    await bob.quit()


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "code", "words"),
    [
        ({"to": "zed", "text": "hi"}, "not_found", "zed"),
        ({"to": "b@d", "text": "hi"}, "invalid_name", "invalid user name"),
        ({"text": "hi"}, "invalid_name", "invalid user name"),
        ({"to": "bob", "text": "   "}, "bad_request", "empty"),
        ({"to": "bob"}, "bad_request", "text"),
        ({"to": "bob", "text": "x" * 101}, "bad_request", "limit is 100"),
    ],
)
async def test_bad_private_messages_are_refused(
    header: dict[str, Any], code: str, words: str
) -> None:
    limits = libchat.Limits(max_message_bytes=100, max_connections_per_address=0)
    async with running_server(plugins=["dm"], limits=limits) as server:
        alice = await connect(server, "alice")
        bob = await connect(server, "bob")
        with pytest.raises(RemoteError) as err:
            await alice.request({"type": "dm", **header})
        assert err.value.remote_code == code
        assert words in err.value.message
        if code == "not_found":
            assert err.value.details["user"] == "zed"
        await alice.send("after")  # nothing was delivered before this
        await assert_next_chat_is(bob, "alice", "after")
        await alice.quit()
        await bob.quit()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ("", "bad_request"),
        ("bob", "bad_request"),
        ("bob   ", "bad_request"),
        ("zed hi", "not_found"),
    ],
)
async def test_bad_msg_commands(dm_server: libchat.Server, args: str, code: str) -> None:
    alice = await connect(dm_server, "alice")
    with pytest.raises(RemoteError) as err:
        await alice.command("msg", args)
    assert err.value.remote_code == code
    assert ("usage: /msg NAME TEXT" if code == "bad_request" else "'zed'") in err.value.message
    await alice.quit()


def test_private_messages_count_against_the_rate_limit() -> None:
    # the session throttles these frame types before any handler runs
    assert {"dm", "command"} <= RATE_LIMITED


# -- /reply ---------------------------------------------------------------------------


async def test_reply_answers_the_last_sender(dm_server: libchat.Server) -> None:
    alice = await connect(dm_server, "alice")
    bob = await connect(dm_server, "bob")
    carol = await connect(dm_server, "carol")
    with pytest.raises(RemoteError) as err:
        await bob.command("reply", "to whom?")
    assert err.value.remote_code == "bad_request"
    assert "nobody" in err.value.message
    await alice.private("bob", "from alice")
    await next_chat(bob)
    reply = await bob.command("reply", "hi alice")
    assert reply["to"] == "alice"
    assert reply["text"] == "[private] bob -> alice: hi alice"
    event = await next_chat(alice)
    assert isinstance(event, libchat.PrivateMessage)
    assert (event.sender, event.text) == ("bob", "hi alice")
    # alice answers by /reply too: it goes back to bob
    await alice.command("reply", "back to you")
    event = await next_chat(bob)
    assert isinstance(event, libchat.PrivateMessage) and event.text == "back to you"
    await carol.private("bob", "from carol")
    await next_chat(bob)
    await bob.command("reply", "hi carol")
    event = await next_chat(carol)
    assert isinstance(event, libchat.PrivateMessage) and event.text == "hi carol"
    await carol.quit()
    with pytest.raises(RemoteError) as err:
        await bob.command("reply", "still there?")
    assert err.value.remote_code == "not_found"
    assert err.value.details["user"] == "carol"
    await alice.quit()
    await bob.quit()


# -- offline delivery with a store --------------------------------------------------


async def test_stored_for_an_offline_account_delivered_once_in_order(tmp_path: Path) -> None:
    config = {"db": str(tmp_path / "chat.db")}
    async with running_server(plugins=["dm", Accounts("bob")], config=config) as server:
        alice = await connect(server, "alice")
        assert alice.welcome["limits"]["dm_max_pending"] == 100
        sent = []
        for text in ("first", "second", "third"):
            reply = await alice.command("msg", f"bob {text}")
            assert reply["stored"] is True
            assert "offline" in reply["text"]
            sent.append(reply["mid"])
        bob = await login(server, "bob")
        for mid, text in zip(sent, ("first", "second", "third"), strict=True):
            event = await next_chat(bob)
            assert isinstance(event, libchat.PrivateMessage)
            assert (event.sender, event.text, event.mid) == ("alice", text, mid)
            assert event.header["stored"] is True
        # the stored messages count as written to bob: /reply answers alice
        await bob.command("reply", "got them")
        event = await next_chat(alice)
        assert isinstance(event, libchat.PrivateMessage) and event.text == "got them"
        await bob.quit()
        bob = await login(server, "bob")  # exactly once: nothing waits any more
        await alice.send("live")
        await assert_next_chat_is(bob, "alice", "live")
        await alice.quit()
        await bob.quit()


async def test_stored_mail_survives_a_recipient_who_leaves_during_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    departures = Departures()
    config = {"db": str(tmp_path / "chat.db")}
    async with running_server(plugins=["dm", Accounts("bob"), departures], config=config) as server:
        alice = await connect(server, "alice")
        assert (await alice.command("msg", "bob the key is 42"))["stored"] is True
        store = libchat_dm.state(server).store
        assert store is not None
        # Hold bob's first delivery right after the mail left the store (in
        # production: the executor hop and SQLite), until bob is gone.
        taken, go = asyncio.Event(), asyncio.Event()
        real_take = store.take

        async def held_take(recipient: str) -> Any:
            rows = await real_take(recipient)
            if rows and not taken.is_set():
                taken.set()
                await go.wait()
            return rows

        monkeypatch.setattr(store, "take", held_take)
        bob = await login(server, "bob")
        await asyncio.wait_for(taken.wait(), WAIT)
        await bob.close()  # the laptop lid closes right after login
        await asyncio.wait_for(departures.event("bob").wait(), WAIT)
        go.set()
        # Delivered to nobody, so not lost: bob gets it at his next login...
        bob = await login(server, "bob")
        event = await next_chat(bob)
        assert isinstance(event, libchat.PrivateMessage) and event.text == "the key is 42"
        await bob.quit()
        # ...once.
        bob = await login(server, "bob")
        await alice.send("live")
        await assert_next_chat_is(bob, "alice", "live")
        assert await store.count("bob") == 0
        await alice.quit()
        await bob.quit()


async def test_a_flush_that_reaches_nobody_keeps_the_mail_in_order(tmp_path: Path) -> None:
    config = {"db": str(tmp_path / "chat.db")}
    async with running_server(plugins=["dm", Accounts("bob")], config=config) as server:
        alice = await connect(server, "alice")
        for text in ("one", "two"):
            await alice.private("bob", text)
        dm = libchat_dm.state(server)
        assert dm.store is not None
        # bob is offline: the hub hands the messages to nobody (send_to_user
        # answers 0), so they must stay where they were.
        assert await dm.flush("bob") == 0
        assert await dm.store.count("bob") == 2
        await alice.private("bob", "three")
        bob = await login(server, "bob")
        texts = [(await next_chat(bob)).text for _ in range(3)]  # type: ignore[attr-defined]
        assert texts == ["one", "two", "three"]
        await alice.quit()
        await bob.quit()


async def test_pending_store_puts_back_in_place(tmp_path: Path) -> None:
    from libchat_dm.store import PendingStore

    store = await PendingStore.open(str(tmp_path / "chat.db"), max_per_user=10)
    try:
        for n in (1, 2, 3):
            assert await store.put("bob", {"text": str(n)})
        rows = await store.take("bob")
        assert [r.header["text"] for r in rows] == ["1", "2", "3"]
        assert await store.take("bob") == []  # taken once
        assert await store.put("bob", {"text": "4"})
        await store.restore("bob", rows[1:])  # "1" was delivered, the rest was not
        assert [r.header["text"] for r in await store.take("bob")] == ["2", "3", "4"]
    finally:
        await store.close()


async def test_stored_messages_survive_a_restart(tmp_path: Path) -> None:
    config = {"db": str(tmp_path / "chat.db")}
    async with running_server(plugins=["dm", Accounts("bob")], config=config) as server:
        alice = await connect(server, "alice")
        await alice.private("bob", "while you were out")
        await alice.quit()
    async with running_server(plugins=["dm", Accounts("bob")], config=config) as server:
        bob = await login(server, "bob")
        event = await next_chat(bob)
        assert isinstance(event, libchat.PrivateMessage)
        assert (event.sender, event.recipient, event.text) == ("alice", "bob", "while you were out")
        await bob.quit()


async def test_only_the_authenticated_account_gets_its_stored_mail(tmp_path: Path) -> None:
    config = {"db": str(tmp_path / "chat.db")}
    async with running_server(plugins=["dm", Accounts("bob")], config=config) as server:
        alice = await connect(server, "alice")
        await alice.private("bob", "secret")
        impostor = await connect(server, "bob")  # no password: not the account
        await alice.send("marker")
        await assert_next_chat_is(impostor, "alice", "marker")
        await impostor.quit()
        bob = await login(server, "bob")
        event = await next_chat(bob)
        assert isinstance(event, libchat.PrivateMessage) and event.text == "secret"
        await alice.quit()
        await bob.quit()


async def test_login_while_a_message_is_being_stored(tmp_path: Path) -> None:
    accounts = Accounts("bob")
    config = {"db": str(tmp_path / "chat.db")}
    async with running_server(plugins=["dm", accounts], config=config) as server:
        alice = await connect(server, "alice")
        accounts.gate.clear()  # the account check for bob waits...
        sending = asyncio.create_task(alice.private("bob", "just in time"))
        bob = await login(server, "bob")  # ...while bob logs in and finds nothing
        accounts.gate.set()
        await asyncio.wait_for(sending, WAIT)
        event = await next_chat(bob)
        assert isinstance(event, libchat.PrivateMessage) and event.text == "just in time"
        await alice.quit()
        await bob.quit()


async def test_offline_errors_with_a_store(tmp_path: Path) -> None:
    config: dict[str, Any] = {"db": str(tmp_path / "chat.db"), "dm_max_pending": 2}
    async with running_server(plugins=["dm", Accounts("bob")], config=config) as server:
        alice = await connect(server, "alice")
        with pytest.raises(RemoteError) as err:
            await alice.private("zed", "no such account")
        assert err.value.remote_code == "not_found"
        assert "'zed'" in err.value.message and err.value.details["user"] == "zed"
        await alice.private("bob", "1")
        await alice.private("bob", "2")
        with pytest.raises(RemoteError) as err:
            await alice.private("bob", "3")
        assert err.value.remote_code == "rejected"
        assert "bob" in err.value.message
        await alice.quit()


@pytest.mark.parametrize("with_db", [False, True])
async def test_offline_user_is_not_found_without_store_or_accounts(
    tmp_path: Path, with_db: bool
) -> None:
    # no --db: nothing can be stored; --db without an accounts plugin:
    # nobody is known to be an account
    config = {"db": str(tmp_path / "chat.db")} if with_db else {}
    plugins: list[Any] = ["dm"] if with_db else ["dm", Accounts("bob")]
    async with running_server(plugins=plugins, config=config) as server:
        alice = await connect(server, "alice")
        with pytest.raises(RemoteError) as err:
            await alice.private("bob", "anyone?")
        assert err.value.remote_code == "not_found"
        assert err.value.details["user"] == "bob"
        await alice.quit()


# -- the real `chat` command --------------------------------------------------------


class JoinProcess:
    """``chat join`` in pipe mode; stdout lines are collected by a thread."""

    def __init__(self, port: int, user: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*chat_command(), "join", "--port", str(port), "--user", user, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    def wait_for(self, pattern: str) -> list[str]:
        """Every line up to and including the first matching ``pattern``."""
        regex = re.compile(pattern)

        def upto() -> list[str] | None:
            for i, line in enumerate(self.lines):
                if regex.search(line):
                    return self.lines[: i + 1]
            return None

        with self._changed:
            self._changed.wait_for(lambda: upto() is not None or "<EOF>" in self.lines, WAIT)
            found = upto()
        assert found is not None, f"no line matching {pattern!r}: {self.lines}"
        return found

    def quit(self) -> tuple[int, str]:
        """Type quit; return the exit status and stderr."""
        _out, err = self.proc.communicate("quit\n", timeout=WAIT)
        return self.proc.returncode, err


@pytest.fixture
def dm_chat_server() -> Any:
    proc = ServerProcess("--plugins", "dm")
    try:
        yield proc
    finally:
        proc.stop()


def test_pipe_msg_reaches_only_the_recipient(dm_chat_server: ServerProcess) -> None:
    port = str(dm_chat_server.port)
    bob = JoinProcess(dm_chat_server.port, "bob")
    carol = JoinProcess(dm_chat_server.port, "carol")
    try:
        bob.wait_for(r"\* bob joined")
        carol.wait_for(r"\* carol joined")
        alice = run_chat("join", "--port", port, "--user", "alice", input="/msg bob hi\nafter\n")
        assert alice.returncode == 0, alice.stderr
        assert "[private] alice -> bob: hi" in alice.stdout.splitlines()
        assert "[private] alice -> bob: hi" in bob.wait_for(r"\[lobby\] alice: after")
        seen = carol.wait_for(r"\[lobby\] alice: after")
        assert not [line for line in seen if "private" in line], seen
    finally:
        for client in (bob, carol):
            assert client.quit()[0] == 0


def test_pipe_json_marks_private_and_errors_name_the_user(dm_chat_server: ServerProcess) -> None:
    port = str(dm_chat_server.port)
    bob = JoinProcess(dm_chat_server.port, "bob", "--json")
    try:
        bob.wait_for(r'"event":"joined"')
        alice = run_chat(
            "join", "--port", port, "--user", "alice", "--json", input="/msg bob hi there\n"
        )
        assert alice.returncode == 0, alice.stderr
        replies = [json.loads(line) for line in alice.stdout.splitlines()]
        ok = next(r for r in replies if r.get("type") == "ok")
        assert ok["to"] == "bob" and ok["mid"]
        line = bob.wait_for(r'"type":"dm"')[-1]
        frame = json.loads(line)
        assert (frame["type"], frame["from"], frame["to"], frame["text"]) == (
            "dm",
            "alice",
            "bob",
            "hi there",
        )
        assert frame["mid"] == ok["mid"]
        missing = run_chat("join", "--port", port, "--user", "alice", input="/msg zed hi\n")
        assert missing.returncode == 0
        assert "error: no user named 'zed' is online" in missing.stderr
    finally:
        code, err = bob.quit()
        assert code == 0, err


def test_pipe_msg_without_the_plugin_is_an_unknown_command(chat_server: ServerProcess) -> None:
    result = run_chat(
        "join", "--port", str(chat_server.port), "--user", "alice", input="/msg bob hi\n"
    )
    assert result.returncode == 0
    assert "unknown command /msg" in result.stderr
    assert "/join" in result.stderr and "/who" in result.stderr


def test_interactive_msg(dm_chat_server: ServerProcess) -> None:
    pexpect = pytest.importorskip("pexpect")
    bob = JoinProcess(dm_chat_server.port, "bob")
    try:
        bob.wait_for(r"\* bob joined")
        exe, *rest = chat_command()
        args = [*rest, "join", "--port", str(dm_chat_server.port), "--user", "alice"]
        alice = pexpect.spawn(exe, args, encoding="utf-8", timeout=WAIT, dimensions=(24, 100))
        try:
            alice.expect("connected as alice")
            alice.sendline("/msg bob hi from a terminal")
            alice.expect(re.escape("[private] alice -> bob: hi from a terminal"))
            bob.wait_for(re.escape("[private] alice -> bob: hi from a terminal"))
            alice.sendline("/quit")
            alice.expect(pexpect.EOF)
        finally:
            alice.close(force=True)
        assert alice.exitstatus == 0
    finally:
        bob.quit()
