"""The core server and client API, in one process."""

from __future__ import annotations

import asyncio

import pytest

import libchat
from conftest import connect, next_of, running_server
from libchat.errors import RemoteError


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
