"""The core server and client API, in one process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import libchat
from conftest import FAST, WAIT, connect, next_of, run_chat, running_server
from libchat import client as client_module
from libchat.connection import ServerConnection, address_key
from libchat.errors import BadRequest, RemoteError
from libchat.hub import LocalHub
from libchat.protocol import Frame, FrameDecoder, encode_frame


async def test_message_reaches_every_other_member(server: libchat.Server) -> None:
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    carol = await connect(server, "carol")
    await next_of(alice, libchat.Presence, user="carol", event="joined")
    await alice.send("hello")
    for client in (bob, carol):
        message = await next_of(client, libchat.Message)
        assert (message.room, message.sender, message.text) == ("lobby", "alice", "hello")
        assert message.mid and message.ts > 0
    # the sender does not get its own message back; its next event is bob's
    await bob.send("hi alice")
    message = await next_of(alice, libchat.Message)
    assert (message.sender, message.text) == ("bob", "hi alice")
    for client in (alice, bob, carol):
        await client.quit()


async def test_presence_on_join_and_leave(server: libchat.Server) -> None:
    alice = await connect(server, "alice")
    joined = await next_of(alice, libchat.Presence)
    assert (joined.room, joined.user, joined.event) == ("lobby", "alice", "joined")
    bob = await connect(server, "bob")
    await next_of(alice, libchat.Presence, user="bob", event="joined")
    await bob.quit()
    left = await next_of(alice, libchat.Presence, user="bob")
    assert left.event == "left"
    await alice.quit()


async def test_rooms_join_part_who(server: libchat.Server) -> None:
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    assert await alice.join("dev") == ["alice"]
    assert alice.room == "dev"
    assert await bob.join("DEV") == ["alice", "bob"]  # room names ignore case
    await next_of(alice, libchat.Presence, room="dev", user="bob", event="joined")
    assert sorted(await alice.list_rooms()) == [("dev", 2), ("lobby", 2)]
    await alice.send("in dev")
    message = await next_of(bob, libchat.Message)
    assert (message.room, message.text) == ("dev", "in dev")
    await bob.part("dev")
    left = await next_of(alice, libchat.Presence, room="dev", user="bob")
    assert left.event == "left"
    assert await alice.who("dev") == ["alice"]
    with pytest.raises(RemoteError) as err:
        await bob.send("not a member", room="dev", wait=True)
    assert err.value.remote_code == "not_found"
    await alice.quit()
    await bob.quit()


async def test_name_in_use_is_case_insensitive(server: libchat.Server) -> None:
    alice = await connect(server, "alice")
    with pytest.raises(RemoteError) as err:
        await connect(server, "ALICE")
    assert err.value.remote_code == "name_in_use"
    await alice.quit()


async def test_unknown_command_lists_available(server: libchat.Server) -> None:
    alice = await connect(server, "alice")
    with pytest.raises(RemoteError) as err:
        await alice.command("msg", "bob hi")
    assert err.value.remote_code == "unknown_command"
    assert "/join" in err.value.message and "/who" in err.value.message
    await alice.quit()


async def test_graceful_close_tells_clients() -> None:
    async with running_server() as server:
        alice = await connect(server, "alice")
        await next_of(alice, libchat.Presence, user="alice")
        await server.close()
        notice = await next_of(alice, libchat.Notice)
        assert "shutting down" in notice.text
        await asyncio.wait_for(alice.wait_closed(), 5)
        assert alice.close_reason == "server shutting down"
        await server.close()  # idempotent


async def test_welcome_announces_limits_and_plugins() -> None:
    async with running_server(plugins=["dm"]) as server:
        alice = await connect(server, "alice")
        limits = alice.welcome["limits"]
        for name in libchat.Limits.names():
            assert name in limits
        assert limits["max_message_bytes"] >= 4096
        assert "dm" in alice.welcome["plugins"]
        await alice.quit()


async def test_request_ids_must_be_strings_or_integers(server: libchat.Server) -> None:
    alice = await connect(server, "alice")
    await next_of(alice, libchat.Presence, user="alice")
    for bad in ([1], {"a": 1}, True, 1.5):
        await alice.send_frame({"type": "rooms", "id": bad})
        error = await next_of(alice, libchat.ErrorEvent)
        assert error.code == "bad_request" and "'id'" in error.message
    assert await alice.list_rooms() == [("lobby", 1)]  # the connection stays usable
    await alice.quit()


async def test_text_that_escapes_past_the_header_limit_is_refused() -> None:
    limits = libchat.Limits(max_message_bytes=60_000, max_connections_per_address=0)
    async with running_server(limits=limits) as server:
        alice = await connect(server, "alice")
        bob = await connect(server, "bob")
        with pytest.raises(RemoteError) as err:
            # The client's own frame fits in 64 KiB of JSON; the delivered frame,
            # with the server's stamps added, would not.
            await alice.send("\x01" * 10_910, wait=True)
        assert err.value.remote_code == "bad_request"
        await alice.send("still here", wait=True)
        message = await next_of(bob, libchat.Message)
        assert message.text == "still here"
        await alice.quit()
        await bob.quit()


async def test_who_answers_with_the_rooms_own_spelling(server: libchat.Server) -> None:
    alice = await connect(server, "alice")
    await alice.join("Dev")
    assert alice.room == "Dev"
    reply = await alice.request({"type": "who", "room": "DEV"})
    assert reply["room"] == "Dev" and reply["members"] == ["alice"]
    await alice.quit()


async def test_async_registration_hooks() -> None:
    class Plugin:
        @libchat.hookimpl
        async def libchat_commands(self, server: libchat.Server) -> list[libchat.Command]:
            return [libchat.Command("ping2", lambda s, args, req: s.reply(req, text="pong2"))]

        @libchat.hookimpl
        async def libchat_limits(self, server: libchat.Server) -> dict[str, int]:
            return {"max_widgets": 3}

    async with running_server(plugins=[Plugin()]) as server:
        alice = await connect(server, "alice")
        assert alice.welcome["limits"]["max_widgets"] == 3
        assert (await alice.command("ping2"))["text"] == "pong2"
        await alice.quit()


async def test_serve_forever_returns_when_closed_and_propagates_cancel() -> None:
    server = libchat.Server("127.0.0.1", 0, limits=FAST)
    await server.start()
    serving = asyncio.create_task(server.serve_forever())
    alice = await connect(server, "alice")
    await server.close()
    await asyncio.wait_for(serving, 5)
    await alice.close()

    other = libchat.Server("127.0.0.1", 0, limits=FAST)
    await other.start()
    task = asyncio.create_task(other.serve_forever())
    await asyncio.sleep(0)  # let it start waiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await other.close()


async def test_local_hub_user_data_lives_while_the_user_is_online() -> None:
    class Member:
        def __init__(self, name: str) -> None:
            self.name = name

        def deliver(self, data: bytes) -> None:
            pass

    hub = LocalHub()
    first, second = Member("Bob"), Member("Bob")
    assert await hub.set_user_data("bob", "k", "v") is False  # offline
    await hub.attach(first, shared=True)
    await hub.attach(second, shared=True)
    assert await hub.set_user_data("BOB", "k", "v") is True
    await hub.detach(first)
    assert await hub.user_data("bob", "k") == "v"  # one connection is left
    await hub.detach(second)
    assert await hub.user_data("bob", "k") is None


async def test_a_failed_start_undoes_what_started() -> None:
    events: list[str] = []

    class Hub(LocalHub):
        async def start(self, server: libchat.Server) -> None:
            events.append("hub start")

        async def close(self) -> None:
            events.append("hub close")

    class Plugin:
        @libchat.hookimpl
        def libchat_startup(self, server: libchat.Server) -> None:
            events.append("startup")

        @libchat.hookimpl
        def libchat_shutdown(self, server: libchat.Server) -> None:
            events.append("shutdown")

    async with running_server() as taken:  # the port is in use
        server = libchat.Server("127.0.0.1", taken.port, plugins=[Plugin()], hub=Hub())
        with pytest.raises(OSError):
            await server.start()
    assert events == ["hub start", "startup", "shutdown", "hub close"]


# -- a client survives a server that sends odd frames ----------------------------------------


class OddServer:
    """A fake server: welcomes, sends ``frames``, answers quit with bye."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        self.frames = frames
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    if frame.type == "hello":
                        welcome = {"type": "welcome", "version": 1, "server": "odd",
                                   "user": frame.header["user"], "plugins": [],
                                   "commands": [], "limits": {}}  # fmt: skip
                        writer.write(encode_frame(welcome))
                        for odd in self.frames:
                            writer.write(encode_frame(odd))
                    elif frame.type == "quit":
                        writer.write(encode_frame({"type": "bye", "reason": "bye"}))
                        await writer.drain()
                        return
        finally:
            writer.close()


ODD_FRAMES: list[dict[str, Any]] = [
    {"type": "msg", "room": "lobby", "from": "x", "text": "hi", "ts": None, "mid": "1"},
    {"type": "ok", "id": [1]},  # an unhashable id
    {"type": "presence", "room": None, "user": 7, "event": ["joined"]},
    {"type": "dm", "from": "x", "to": "bob", "text": "psst", "ts": "yesterday"},
    {"type": "msg", "room": "lobby", "from": "x", "text": "last", "ts": 1.5, "mid": 2},
]


async def test_a_client_takes_odd_fields_in_its_stride() -> None:
    async with OddServer(ODD_FRAMES) as port:
        bob = await libchat.open_client("127.0.0.1", port, user="bob")
        first = await next_of(bob, libchat.Message)
        assert (first.text, first.ts) == ("hi", 0.0)
        presence = await next_of(bob, libchat.Presence)
        assert (presence.room, presence.user, presence.event) == ("", "7", "['joined']")
        assert (await next_of(bob, libchat.PrivateMessage)).ts == 0.0
        last = await next_of(bob, libchat.Message)
        assert (last.text, last.ts, last.mid) == ("last", 1.5, "2")
        await bob.quit()  # does not raise
        assert bob.close_reason == "bye"


async def test_a_frame_that_breaks_the_client_ends_it_with_a_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(frame: Frame) -> libchat.Event:
        raise TypeError("a bug in the client")

    monkeypatch.setattr(client_module, "event_from_frame", broken)
    async with OddServer(ODD_FRAMES[:1]) as port:
        bob = await libchat.open_client("127.0.0.1", port, user="bob")
        with pytest.raises(libchat.ConnectionClosed):
            await next_of(bob, libchat.Message)
        assert bob.close_reason == "protocol error: TypeError: a bug in the client"
        await bob.quit()  # neither raises
        await bob.close()
    async with OddServer(ODD_FRAMES[:1]) as port:
        carol = await libchat.open_client("127.0.0.1", port, user="carol")
        await asyncio.wait_for(carol.wait_closed(), WAIT)
        assert carol.close_reason.startswith("protocol error:")
        await carol.close()


async def test_chat_join_shows_no_traceback_for_odd_frames() -> None:
    async with OddServer(ODD_FRAMES) as port:
        result = await asyncio.to_thread(
            run_chat, "join", "--port", str(port), "--user", "carol", input=""
        )
    assert "Traceback" not in result.stderr, result.stderr
    assert "hi" in result.stdout and "last" in result.stdout, result.stdout
    assert result.returncode == 0, result.stderr


# -- hello without a room --------------------------------------------------------------------


async def test_hello_with_room_null_joins_no_room(server: libchat.Server) -> None:
    alice = await connect(server, "alice")
    await next_of(alice, libchat.Presence, user="alice")
    bob = await connect(server, "bob", room=None)
    assert bob.room is None and bob.rooms == {}
    assert await server.hub.members("lobby") == ["alice"]
    with pytest.raises(ValueError, match="no room"):
        await bob.send("anyone?")
    # nobody saw bob arrive: alice's next presence is carol's
    carol = await connect(server, "carol")
    assert (await next_of(alice, libchat.Presence)).user == "carol"
    assert await bob.join("lobby") == ["alice", "bob", "carol"]
    assert (await next_of(alice, libchat.Presence)).user == "bob"
    await bob.send("here now", wait=True)
    assert (await next_of(alice, libchat.Message)).text == "here now"
    for client in (alice, bob, carol):
        await client.quit()


# -- the hub -----------------------------------------------------------------------------------


class CountedMember:
    """A hub member that counts how often the hub hashes it (once per
    dictionary lookup: how many rooms it looked in)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hashes = 0

    def __hash__(self) -> int:
        self.hashes += 1
        return id(self) >> 4

    def deliver(self, data: bytes) -> None:
        pass


async def test_detach_looks_only_at_the_members_own_rooms() -> None:
    hub = LocalHub()
    others = [CountedMember(f"u{i}") for i in range(300)]
    for i, member in enumerate(others):
        await hub.attach(member)
        await hub.join(f"room{i}", member)
    leaving = CountedMember("leaving")
    await hub.attach(leaving)
    for room in ("room1", "room2", "Mine"):
        await hub.join(room, leaving)
    leaving.hashes = 0
    assert await hub.detach(leaving) == ["room1", "room2", "Mine"]
    # a lookup or two per room of its own, not one per room on the server
    assert leaving.hashes <= 20
    assert await hub.members("room1") == ["u1"] and await hub.members("Mine") is None
    assert await hub.online("leaving") is None
    assert await hub.detach(leaving) == []  # twice is harmless


async def test_local_hub_max_rooms() -> None:
    hub = LocalHub(max_rooms=2)
    member = CountedMember("a")
    await hub.join("one", member)
    await hub.join("two", member)
    with pytest.raises(BadRequest, match="max_rooms"):
        await hub.join("three", member)
    assert await hub.join("ONE", CountedMember("b")) == "one"
    await hub.part("two", member)
    assert await hub.join("three", member) == "three"


# -- per-address keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("/run/chat.sock", "/run/chat.sock"),
    ],
)
def test_address_key(host: str, key: str) -> None:
    assert address_key(host) == key


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[Any, ...]) -> None:
        super().__init__()
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


async def test_connection_counts_ipv6_by_its_64_and_logs_the_full_peer() -> None:
    conn = ServerConnection(lambda conn: None)
    conn.connection_made(FakeTransport(("2001:db8::5", 4242, 0, 0)))
    assert conn.peer == "[2001:db8::5]:4242"
    assert conn.address == "2001:db8::/64"
    mapped = ServerConnection(lambda conn: None)
    mapped.connection_made(FakeTransport(("::ffff:198.51.100.7", 4243, 0, 0)))
    assert (mapped.peer, mapped.address) == ("[::ffff:198.51.100.7]:4243", "198.51.100.7")


def test_the_server_gives_its_room_limit_to_the_hub() -> None:
    class Wrapping(LocalHub):
        """Like RedisHub: a hub that keeps this node's members in a LocalHub."""

        def __init__(self) -> None:
            super().__init__(max_rooms=0)
            self.local = LocalHub()

    limits = libchat.Limits(max_rooms=7)
    assert libchat.Server(limits=limits).hub.max_rooms == 7  # type: ignore[attr-defined]
    wrapping = Wrapping()
    libchat.Server(limits=limits, hub=wrapping)
    assert (wrapping.max_rooms, wrapping.local.max_rooms) == (0, 7)  # its own bound is kept
    own = LocalHub(max_rooms=3)
    libchat.Server(limits=limits, hub=own)
    assert own.max_rooms == 3


async def test_send_to_user_counts_only_connections_that_took_the_frame(
    server: libchat.Server,
) -> None:
    from libchat.protocol import encode_frame

    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    data = encode_frame({"type": "notice", "text": "hi"})
    assert await server.hub.send_to_user("bob", data) == 1
    session = next(s for s in server.sessions if s.name == "bob")
    session.conn.abort("cut off by the test")
    # Not detached yet (its cleanup runs later), but its connection is gone:
    assert await server.hub.online("bob") == "bob"
    assert await server.hub.send_to_user("bob", data) == 0
    await alice.quit()
    await bob.close()
