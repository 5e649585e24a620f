"""The core server and client API, in one process."""

from __future__ import annotations

import asyncio

import pytest

import libchat
from conftest import FAST, connect, next_of, running_server
from libchat.errors import RemoteError
from libchat.hub import LocalHub


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
