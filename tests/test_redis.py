"""Several servers sharing rooms, presence and private messages through Redis.

Each test starts its own ``redis-server`` on a free loopback port (nothing
saved to disk) and runs nodes against it: in-process servers with a
RedisHub, and real ``chat serve --hub ...`` processes. Heartbeats are short
here so that a dead node is noticed within a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import libchat
from conftest import WAIT, PipeClient, ServerProcess, connect, next_of, run_chat, running_server
from libchat.errors import RemoteError
from libchat.protocol import encode_frame

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
)
HAVE_REDIS_PY = importlib.util.find_spec("redis") is not None

pytestmark = [
    pytest.mark.skipif(
        REDIS_SERVER is None,
        reason="redis-server is not installed (apt-get install redis-server); "
        "the Redis hub tests need a real one",
    ),
    pytest.mark.skipif(
        not HAVE_REDIS_PY, reason="redis-py is not installed: pip install 'libchat[redis]'"
    ),
]

#: Short liveness settings: a node silent for NODE_TTL seconds is dead, and
#: survivors look every HEARTBEAT seconds.
HEARTBEAT = 0.2
NODE_TTL = 1.5
SETTINGS = {"heartbeat": HEARTBEAT, "node_ttl": NODE_TTL, "max_backoff": 0.2}
#: Servers in subprocesses without their abuse limits: the tests send fast.
OPEN = ("--rate-limit", "0", "--max-per-address", "0")


# -- a real redis-server ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """``redis-server`` on a loopback port, in a folder of its own; it can be
    killed and started again on the same port (a restart, data lost)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert REDIS_SERVER is not None
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - kept for the process
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self._wait_for_ping()

    def _wait_for_ping(self) -> None:
        """Bounded: redis-server answers PING within WAIT seconds or the test fails."""
        assert self.proc is not None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)  # a process starting: nothing to wait on but the port
        raise AssertionError(f"redis-server did not answer PING in {WAIT} s: {self.log()}")

    def log(self) -> str:
        return (self.directory / "redis.log").read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """kill -9: connections drop, every key is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)

    def url(self, **settings: float) -> str:
        query = "&".join(f"{k}={v}" for k, v in settings.items())
        return f"redis://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def cluster() -> str:
    return "t" + uuid.uuid4().hex[:8]


def make_hub(redis_server: RedisProcess, cluster: str) -> Any:
    from libchat.redis_hub import RedisHub

    return RedisHub.from_url(redis_server.url(**SETTINGS), cluster=cluster)


@contextlib.asynccontextmanager
async def two_hubs(redis_server: RedisProcess, cluster: str) -> AsyncIterator[tuple[Any, Any]]:
    """Two started hubs on ``redis_server`` (two nodes of ``cluster``), closed afterwards."""
    hub_a, hub_b = make_hub(redis_server, cluster), make_hub(redis_server, cluster)
    await hub_a.start()
    try:
        await hub_b.start()
        try:
            yield hub_a, hub_b
        finally:
            await hub_b.close()
    finally:
        await hub_a.close()


@contextlib.asynccontextmanager
async def node(redis_server: RedisProcess, cluster: str, **kwargs: Any) -> AsyncIterator[Any]:
    """An in-process server whose hub is on ``redis_server``."""
    async with running_server(hub=make_hub(redis_server, cluster), **kwargs) as server:
        yield server


@contextlib.asynccontextmanager
async def clients(*specs: tuple[libchat.Server | int, str]) -> AsyncIterator[list[Any]]:
    """Clients (server or port, user), connected in order, closed afterwards."""
    opened: list[libchat.Client] = []
    try:
        for where, user in specs:
            port = where if isinstance(where, int) else where.port
            opened.append(await libchat.open_client("127.0.0.1", port, user=user))
        yield opened
    finally:
        for client in opened:
            await client.close()


async def chat_texts(client: libchat.Client, count: int) -> list[tuple[str, str]]:
    """The next ``count`` room messages as (sender, text); bounded by WAIT."""
    got: list[tuple[str, str]] = []

    async def scan() -> None:
        while len(got) < count:
            event = await client.next_event()
            if isinstance(event, libchat.Message):
                got.append((event.sender, event.text))

    await asyncio.wait_for(scan(), WAIT)
    return got


class Collector:
    """A hub member that records what it is given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()

    def deliver(self, data: bytes) -> None:
        self.frames.put_nowait(data)

    async def next(self) -> bytes:
        return await asyncio.wait_for(self.frames.get(), WAIT)

    async def read(self, size: int) -> bytes:
        """``size`` bytes, however they were split into deliveries (a node
        hands on consecutive frames for one room in one delivery)."""
        data = b""
        while len(data) < size:
            data += await self.next()
        return data


# -- in-process nodes ---------------------------------------------------------------------


async def test_a_room_message_reaches_every_node_once(
    redis_server: RedisProcess, cluster: str
) -> None:
    async with (
        node(redis_server, cluster) as a,
        node(redis_server, cluster) as b,
        clients((a, "alice"), (b, "bob"), (b, "carol")) as (alice, bob, carol),
    ):
        await next_of(alice, libchat.Presence, user="carol", event="joined")
        await alice.send("hello from a", room="lobby")
        await bob.send("hello from b", room="lobby")
        # No order between senders: bob's reaches carol (on his node) first.
        assert sorted(await chat_texts(carol, 2)) == [
            ("alice", "hello from a"),
            ("bob", "hello from b"),
        ]
        assert await chat_texts(alice, 1) == [("bob", "hello from b")]
        # Nothing doubled: a ping answered after the messages proves the
        # queue held nothing more for bob.
        assert await chat_texts(bob, 1) == [("alice", "hello from a")]
        await bob.ping()
        assert not [e for e in _pending(bob) if isinstance(e, libchat.Message)]


def _pending(client: libchat.Client) -> list[libchat.Event]:
    """Events already received and not yet read (without waiting)."""
    events = []
    with contextlib.suppress(asyncio.QueueEmpty):
        while True:
            events.append(client._events.get_nowait())  # type: ignore[attr-defined]
    return events


async def test_frames_cross_nodes_byte_for_byte(redis_server: RedisProcess, cluster: str) -> None:
    # The hub carries frames as they are: any bytes at all (here every byte
    # value, and a frame's raw binary body) reach the other node unchanged.
    async with two_hubs(redis_server, cluster) as (hub_a, hub_b):
        alice, bob = Collector("alice"), Collector("bob")
        await hub_a.attach(alice)
        await hub_b.attach(bob)
        assert await hub_a.join("Room", alice) == "Room"
        assert await hub_b.join("room", bob) == "Room"  # as the cluster first spelt it
        blob = bytes(range(256)) * 3
        frame = encode_frame({"type": "x", "n": 1}, blob)
        assert hub_a.publish("ROOM", blob) == 1  # local members counted
        hub_a.publish("room", frame, exclude=alice)
        assert await alice.next() == blob
        assert await bob.read(len(blob + frame)) == blob + frame
        assert await hub_b.members("room") == ["alice", "bob"]
        assert await hub_a.send_to_user("BOB", b"\x00direct\xff") == 1
        assert await bob.next() == b"\x00direct\xff"


async def test_who_and_rooms_list_the_members_of_every_node(
    redis_server: RedisProcess, cluster: str
) -> None:
    async with (
        node(redis_server, cluster) as a,
        node(redis_server, cluster) as b,
        clients((a, "alice"), (b, "bob")) as (alice, bob),
    ):
        await next_of(alice, libchat.Presence, user="bob", event="joined")
        assert await alice.who("lobby") == ["alice", "bob"]
        assert await bob.join("dev") == ["bob"]
        assert await alice.join("Dev") == ["alice", "bob"]
        assert await alice.list_rooms() == [("dev", 2), ("lobby", 2)]
        await alice.part("Dev")
        await next_of(bob, libchat.Presence, user="alice", event="left", room="dev")
        assert await bob.who("dev") == ["bob"]
        await bob.quit()
        await next_of(alice, libchat.Presence, user="bob", event="left")
        assert await alice.who("lobby") == ["alice"]
        assert await alice.list_rooms() == [("lobby", 1)]


async def test_a_name_is_unique_across_nodes(redis_server: RedisProcess, cluster: str) -> None:
    async with (
        node(redis_server, cluster) as a,
        node(redis_server, cluster) as b,
        clients((a, "alice"), (b, "bob")) as (alice, bob),
    ):
        for name in ("alice", "ALICE"):
            with pytest.raises(RemoteError) as refused:
                await connect(b, name)
            assert refused.value.remote_code == "name_in_use"
        assert await a.hub.online("Bob") == "bob"
        await alice.quit()
        # "left" leaves a after the name was released: then it is free on b.
        await next_of(bob, libchat.Presence, user="alice", event="left")
        assert await b.hub.online("alice") is None
        async with clients((b, "Alice")) as (again,):
            assert again.user == "Alice"
            assert await a.hub.online("alice") == "Alice"


async def test_an_account_may_be_on_several_nodes(redis_server: RedisProcess, cluster: str) -> None:
    # Authenticated connections attach with shared=True: one user, several
    # devices, on any nodes; an unauthenticated one cannot take the name.
    from libchat.errors import NameInUse

    async with two_hubs(redis_server, cluster) as (hub_a, hub_b):
        ann_a, ann_b, ann_b2 = Collector("ann"), Collector("Ann"), Collector("ann")
        await hub_a.attach(ann_a, shared=True)
        await hub_b.attach(ann_b, shared=True)
        await hub_b.attach(ann_b2, shared=True)
        with pytest.raises(NameInUse):
            await hub_a.attach(Collector("ANN"))
        # to every device of ann but the sending one, wherever they are
        assert await hub_a.send_to_user("ann", b"copy", exclude=ann_a) == 2
        assert await ann_b.next() == b"copy"
        assert await ann_b2.next() == b"copy"
        assert ann_a.frames.empty()
        await hub_b.detach(ann_b)
        assert await hub_a.send_to_user("ann", b"again") == 2
        assert await ann_a.next() == b"again"
        assert await ann_b2.next() == b"again"


async def test_user_data_is_shared_while_the_user_is_online(
    redis_server: RedisProcess, cluster: str
) -> None:
    # What the dm plugin needs for /reply across nodes: alice's node notes
    # on bob "alice wrote to you last"; bob's node reads it.
    async with two_hubs(redis_server, cluster) as (hub_a, hub_b):
        bob = Collector("bob")
        assert not await hub_a.set_user_data("bob", "dm.last_from", "alice")  # offline
        await hub_b.attach(bob)
        assert await hub_a.set_user_data("Bob", "dm.last_from", "alice")
        assert await hub_b.user_data("bob", "dm.last_from") == "alice"
        assert await hub_a.user_data("bob", "other") is None
        await hub_b.detach(bob)
        assert await hub_a.user_data("bob", "dm.last_from") is None  # gone with him
        await hub_b.attach(bob)
        assert await hub_b.user_data("bob", "dm.last_from") is None


async def presence_of(member: Collector, event: str) -> bytes:
    """The next frame ``member`` gets that is a presence ``event``."""
    while True:
        data = await member.next()
        if b'"type":"presence"' in data and f'"event":"{event}"'.encode() in data:
            return data


async def test_a_node_declared_dead_comes_back(redis_server: RedisProcess, cluster: str) -> None:
    # A node that stalled past its TTL is reaped (its members announced as
    # left, to everyone); at its next beat it finds its tombstone, registers
    # again and announces them as joined.
    import redis.asyncio as aioredis

    from libchat.redis_hub import RedisHub

    slow = RedisHub(redis_server.url(), cluster=cluster, heartbeat=30, node_ttl=60)
    watcher = make_hub(redis_server, cluster)
    await slow.start()
    await watcher.start()
    direct = aioredis.Redis(port=redis_server.port)
    try:
        alice, bob = Collector("alice"), Collector("bob")
        await slow.attach(alice)
        await slow.join("lobby", alice)
        await watcher.attach(bob)
        await watcher.join("lobby", bob)
        # The stall, as Redis sees it: the heartbeat key expires.
        await direct.delete(slow.keys.node(slow.node))
        left = await presence_of(bob, "left")  # the watcher's own look, in its heartbeat
        assert b'"user":"alice"' in left and b"server lost" in left
        assert b'"user":"alice"' in await presence_of(alice, "left")  # told too
        assert await watcher.members("lobby") == ["bob"]
        assert watcher.stats.reaped == 1
        await slow._beat()  # wakes up: its key is gone
        assert b'"user":"alice"' in await presence_of(bob, "joined")
        assert b'"user":"alice"' in await presence_of(alice, "joined")
        assert await watcher.members("lobby") == ["alice", "bob"]
        assert await watcher.online("ALICE") == "alice"
    finally:
        await direct.aclose()
        await slow.close()
        await watcher.close()


async def test_clusters_on_one_redis_are_separate(redis_server: RedisProcess) -> None:
    async with (
        node(redis_server, "blue") as blue,
        node(redis_server, "green") as green,
        clients((blue, "alice"), (green, "alice"), (green, "bob")) as (alice, alice2, bob),
    ):
        await alice.send("blue only", room="lobby")
        await alice2.send("green only", room="lobby")
        assert await chat_texts(bob, 1) == [("alice", "green only")]
        assert await bob.who("lobby") == ["alice", "bob"]
        assert await alice.who("lobby") == ["alice"]


async def test_private_messages_across_nodes(redis_server: RedisProcess, cluster: str) -> None:
    async with (
        node(redis_server, cluster, plugins=["dm"]) as a,
        node(redis_server, cluster, plugins=["dm"]) as b,
        clients((a, "alice"), (b, "bob"), (b, "carol")) as (alice, bob, carol),
    ):
        await alice.private("Bob", "psst")
        event = await next_of(bob, libchat.PrivateMessage)
        assert (event.sender, event.recipient, event.text) == ("alice", "bob", "psst")
        await bob.private("alice", "yes?")
        event = await next_of(alice, libchat.PrivateMessage)
        assert (event.sender, event.text) == ("bob", "yes?")
        with pytest.raises(RemoteError) as refused:
            await alice.private("nobody", "hello?")
        assert refused.value.remote_code == "not_found"
        assert "nobody" in refused.value.message
        # carol saw neither: the next message she gets is the room one
        await alice.send("public", room="lobby")
        assert await chat_texts(carol, 1) == [("alice", "public")]
        assert not [e for e in _pending(carol) if isinstance(e, libchat.PrivateMessage)]


async def test_reply_across_nodes(redis_server: RedisProcess, cluster: str) -> None:
    async with (
        node(redis_server, cluster, plugins=["dm"]) as a,
        node(redis_server, cluster, plugins=["dm"]) as b,
        clients((a, "alice"), (b, "bob")) as (alice, bob),
    ):
        await alice.private("bob", "ping?")
        await next_of(bob, libchat.PrivateMessage, sender="alice")
        await bob.command("reply", "pong")
        event = await next_of(alice, libchat.PrivateMessage, sender="bob")
        assert event.text == "pong"


async def test_local_chat_survives_a_redis_restart(
    redis_server: RedisProcess, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="libchat.hub")
    async with (
        node(redis_server, cluster) as a,
        node(redis_server, cluster) as b,
        clients((a, "alice"), (a, "carol"), (b, "bob")) as (alice, carol, bob),
    ):
        await next_of(alice, libchat.Presence, user="bob", event="joined")
        redis_server.kill()
        # Asking Redis fails now: both nodes answer from what they know.
        assert await a.hub.members("lobby") == ["alice", "carol"]
        assert await b.hub.members("lobby") == ["bob"]
        assert not a.hub.is_up and not b.hub.is_up
        await alice.send("during the gap", room="lobby")
        assert await chat_texts(carol, 1) == [("alice", "during the gap")]
        async with clients((a, "dave")) as (dave,):
            assert dave.user == "dave"  # names checked on this node only meanwhile
            assert a.hub.stats.unchecked_names == 1
            assert a.hub.stats.not_sent >= 1
            redis_server.start()
            await a.hub.wait_connected(WAIT)
            await b.hub.wait_connected(WAIT)
            # Registered again: b sees a's members, a sees b's.
            assert await b.hub.members("lobby") == ["alice", "bob", "carol", "dave"]
            assert await bob.who("lobby") == ["alice", "bob", "carol", "dave"]
            await alice.send("after the gap", room="lobby")
            # What was sent during the gap is lost for bob (pub/sub keeps
            # nothing), and counted; what is sent after arrives.
            assert await chat_texts(bob, 1) == [("alice", "after the gap")]
    messages = [r.getMessage() for r in caplog.records if r.name == "libchat.hub"]
    assert any("lost Redis" in m for m in messages), messages
    assert any(re.search(r"connected again .* \d+ frames could not be sent", m) for m in messages)


# -- `chat serve --hub` processes -----------------------------------------------------------


@pytest.fixture
def started() -> Iterator[list[ServerProcess | PipeClient]]:
    """Every server process and pipe client a test appends here is stopped
    at the end, pass or fail."""
    running: list[ServerProcess | PipeClient] = []
    yield running
    for proc in reversed(running):
        if isinstance(proc, PipeClient):
            proc.kill()
        else:
            proc.stop()


def serve(
    started: list[Any], redis_server: RedisProcess, cluster: str, *args: str
) -> ServerProcess:
    """``chat serve --hub ... --cluster ...`` on a free port."""
    proc = ServerProcess(
        "--hub", redis_server.url(**SETTINGS), "--cluster", cluster, *OPEN, *args
    )  # fmt: skip
    started.append(proc)
    proc.wait_for(r"hub: node \w+ in cluster")
    return proc


def join(started: list[Any], server: ServerProcess, user: str, *args: str) -> PipeClient:
    """``chat join`` in pipe mode, once it is in the lobby."""
    client = PipeClient(server.port, user, *args)
    started.append(client)
    client.wait_for(rf"^\[lobby\] \* {user} joined$")
    return client


@pytest.fixture
def three_nodes(
    started: list[Any], redis_server: RedisProcess, cluster: str
) -> list[ServerProcess]:
    # A sync fixture: starting processes blocks, which an async test must not.
    return [serve(started, redis_server, cluster) for _ in range(3)]


async def test_nodes_share_a_room_in_order_without_loss(three_nodes: list[ServerProcess]) -> None:
    # Three senders, one on each node, and a listener on each node: every
    # client gets every message of every other sender once, in order per sender.
    count = 300
    ports = [n.port for n in three_nodes]
    specs = [(p, f"s{i}") for i, p in enumerate(ports)] + [
        (p, f"r{i}") for i, p in enumerate(ports)
    ]
    async with clients(*specs) as everyone:
        senders, last = everyone[:3], everyone[-1]
        for client in everyone[:-1]:  # the last one in is seen on every node
            await next_of(client, libchat.Presence, user=last.user, event="joined")

        async def send_all(client: libchat.Client) -> None:
            for seq in range(count):
                await client.send(f"{client.user} {seq}", room="lobby")

        await asyncio.gather(*(send_all(s) for s in senders))
        for client in everyone:
            others = [s.user for s in senders if s is not client]
            got = await chat_texts(client, count * len(others))
            for sender in others:
                texts = [text for who, text in got if who == sender]
                assert texts == [f"{sender} {seq}" for seq in range(count)], client.user
            await client.ping()  # nothing more (no double) was on its way
            assert not [e for e in _pending(client) if isinstance(e, libchat.Message)]


def test_presence_who_and_rooms_across_processes(
    started: list[Any], redis_server: RedisProcess, cluster: str
) -> None:
    a = serve(started, redis_server, cluster)
    b = serve(started, redis_server, cluster)
    alice = join(started, a, "alice")
    bob = join(started, b, "bob")
    alice.wait_for(r"^\[lobby\] \* bob joined$")
    alice.send("/who")
    alice.wait_for(r"^\[lobby\] members: alice, bob$")
    bob.send("/join dev", "/rooms", "/join lobby", "hello")  # lobby is current again
    bob.wait_for(r"^rooms: dev \(1\), lobby \(2\)$")
    alice.wait_for(r"^\[lobby\] bob: hello$")
    assert bob.finish() == 0
    alice.wait_for(r"^\[lobby\] \* bob left")
    alice.send("/who")
    alice.wait_for(r"^\[lobby\] members: alice$")


def test_names_and_private_messages_across_processes(
    started: list[Any], redis_server: RedisProcess, cluster: str
) -> None:
    a = serve(started, redis_server, cluster, "--plugins", "dm")
    b = serve(started, redis_server, cluster, "--plugins", "dm")
    alice = join(started, a, "alice")
    bob = join(started, b, "bob")
    taken = run_chat("join", "--port", str(b.port), "--user", "ALICE", input="")
    assert taken.returncode != 0
    assert "in use" in taken.stderr, taken.stderr
    alice.send("/msg bob the build is green")
    bob.wait_for(r"^\[private\] alice -> bob: the build is green$")
    alice.wait_for(r"^\[private\] alice -> bob: the build is green$")
    bob.send("/msg Alice thanks")
    alice.wait_for(r"^\[private\] bob -> alice: thanks$")
    bob.send("/msg nobody hello?")
    bob.wait_for(r"nobody", err=True)


def test_a_killed_node_has_its_members_announced_left(
    started: list[Any], redis_server: RedisProcess, cluster: str
) -> None:
    a = serve(started, redis_server, cluster)
    b = serve(started, redis_server, cluster)
    alice = join(started, a, "alice")
    bob = join(started, b, "bob")
    bob.send("/join dev")
    alice.send("/join dev")
    bob.wait_for(r"^\[dev\] \* alice joined$")
    a.proc.send_signal(signal.SIGKILL)  # no goodbye: only the heartbeat tells
    a.proc.wait(WAIT)
    started_at = time.monotonic()
    bob.wait_for(r"^\[lobby\] \* alice left \(server lost\)$")
    bob.wait_for(r"^\[dev\] \* alice left \(server lost\)$")
    # Within the bound (heartbeat TTL plus a look), give or take a loaded machine.
    assert time.monotonic() - started_at < WAIT
    b.wait_for(r"hub: node \w+ stopped beating .* 2 room memberships")
    bob.send("/who")
    bob.wait_for(r"^\[dev\] members: bob$")
    # The dead node's names are free again.
    join(started, b, "alice")
    bob.wait_for(r"^\[lobby\] \* alice joined$")


def test_chat_goes_on_through_a_redis_restart(
    started: list[Any], redis_server: RedisProcess, cluster: str
) -> None:
    a = serve(started, redis_server, cluster)
    b = serve(started, redis_server, cluster)
    alice = join(started, a, "alice")
    carol = join(started, a, "carol")
    bob = join(started, b, "bob")
    carol.wait_for(r"^\[lobby\] \* bob joined$")
    redis_server.kill()
    a.wait_for(r"hub: lost Redis")
    b.wait_for(r"hub: lost Redis")
    alice.send("during the gap")  # local members still get it
    carol.wait_for(r"^\[lobby\] alice: during the gap$")
    redis_server.start()
    a.wait_for(r"hub: connected again")
    b.wait_for(r"hub: connected again")
    alice.send("after the gap")
    bob.wait_for(r"^\[lobby\] alice: after the gap$")
    assert "[lobby] alice: during the gap" not in bob.out  # at most once, and counted:
    assert re.search(r"connected again .*; [1-9]\d* frames could not be sent", "\n".join(a.lines))
    bob.send("/who")
    bob.wait_for(r"^\[lobby\] members: alice, bob, carol$")


def test_serve_hub_errors_are_one_line(redis_server: RedisProcess) -> None:
    quiet = {"PYTHONASYNCIODEBUG": ""}
    alone = run_chat("serve", "--port", "0", "--cluster", "x", env=quiet)
    assert alone.returncode == 2
    assert "--cluster needs --hub" in alone.stderr
    bad = run_chat("serve", "--port", "0", "--hub", "http://example.org/", env=quiet)
    assert bad.returncode == 2
    assert "unsupported hub URL" in bad.stderr
    nobody = run_chat(
        "serve", "--port", "0", "--hub", f"redis://127.0.0.1:{free_port()}/0", env=quiet
    )
    assert nobody.returncode == 1
    assert "cannot reach the hub at redis://127.0.0.1" in nobody.stderr
    assert "Traceback" not in nobody.stderr


# -- routing to one connection, and file transfers between nodes ---------------------------


class DrainingMember(Collector):
    """A member whose connection drains only when the test says so."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.draining = asyncio.Event()
        self.drained = asyncio.Event()

    async def drain(self) -> None:
        self.draining.set()
        await self.drained.wait()


async def test_deliver_to_waits_for_the_other_nodes_connection_to_drain(
    redis_server: RedisProcess, cluster: str
) -> None:
    async with two_hubs(redis_server, cluster) as (hub_a, hub_b):
        bob = DrainingMember("bob")
        await hub_b.attach(bob)
        address = hub_b.address(bob)
        assert address.startswith(hub_b.node + "/") and hub_b.address(bob) == address
        frame = encode_frame({"type": "file.chunk"}, b"\x00\xff" * 100)
        sending = asyncio.create_task(hub_a.deliver_to(address, frame, drain=True))
        assert await bob.next() == frame
        await asyncio.wait_for(bob.draining.wait(), WAIT)
        # bob's node acks only after the drain: the sender is still held
        assert not sending.done()
        bob.drained.set()
        assert await asyncio.wait_for(sending, WAIT) is True
        assert await asyncio.wait_for(hub_a.deliver_to(address, b"x"), WAIT) is True
        assert await bob.next() == b"x"
        await hub_b.detach(bob)
        # gone: bob's node answers no at once, with or without drain
        assert await asyncio.wait_for(hub_a.deliver_to(address, b"y", drain=True), WAIT) is False
        assert await hub_a.deliver_to("000000000000/1", b"y", drain=True) is False  # no node
        assert hub_a._acks == {}  # nothing left waiting


async def test_send_route_reaches_the_topic_handler_of_another_node(
    redis_server: RedisProcess, cluster: str
) -> None:
    async with two_hubs(redis_server, cluster) as (hub_a, hub_b):
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        hub_b.route("t", lambda origin, data: got.put_nowait((origin, data)))
        assert await hub_a.send_route(hub_b.node, "t", b"\x00hi") is True
        assert await asyncio.wait_for(got.get(), WAIT) == (hub_a.node, b"\x00hi")
        assert await hub_a.send_route(hub_b.node + "/7", "t", b"by address") is True
        assert await asyncio.wait_for(got.get(), WAIT) == (hub_a.node, b"by address")
        assert await hub_a.send_route("000000000000", "t", b"x") is False  # nobody there
        assert await hub_b.send_route(hub_b.node, "t", b"self") is True  # its own node
        assert await asyncio.wait_for(got.get(), WAIT) == (hub_b.node, b"self")


def file_of(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def test_a_file_crosses_nodes_verified_one_chunk_in_flight(
    redis_server: RedisProcess, cluster: str, tmp_path: Path
) -> None:
    from libchat_files import files_of
    from libchat_files.relay import CHUNK_SIZE

    async with (
        node(redis_server, cluster, plugins=["files"]) as a,
        node(redis_server, cluster, plugins=["files"]) as b,
    ):
        # Count chunks in flight from a to b: each waits for b's drain.
        in_flight, most = 0, 0
        deliver_to = a.hub.deliver_to

        async def counting(address: str, data: bytes, *, drain: bool = False) -> bool:
            nonlocal in_flight, most
            in_flight += drain
            most = max(most, in_flight)
            try:
                return bool(await deliver_to(address, data, drain=drain))
            finally:
                in_flight -= drain

        a.hub.deliver_to = counting
        inbox = tmp_path / "in"
        alice = await libchat.open_client("127.0.0.1", a.port, user="alice", plugins=["files"])
        bob = await libchat.open_client(
            "127.0.0.1", b.port, user="bob", plugins=["files"],
            options={"accept_files": str(inbox)},
        )  # fmt: skip
        try:
            src = tmp_path / "big.bin"
            sha = file_of(src, 5 * CHUNK_SIZE + 123)
            outgoing = await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
            assert outgoing.tid.startswith(a.hub.node + ".")  # owned by the sender's node
            got = await asyncio.wait_for(files_of(bob).results.get(), WAIT)
            assert got.state == "saved" and got.path is not None
            assert hashlib.sha256(got.path.read_bytes()).hexdigest() == sha
            assert most == 1  # one chunk at a time: the sender waits for bob's drain
            assert a.hub.stats.sent >= 6 and b.hub.stats.received >= 6
        finally:
            await alice.close()
            await bob.close()


async def test_a_file_offer_declined_on_another_node(
    redis_server: RedisProcess, cluster: str, tmp_path: Path
) -> None:
    from libchat_files import Declined, TransferError, files_of

    async with (
        node(redis_server, cluster, plugins=["files"]) as a,
        node(redis_server, cluster, plugins=["files"]) as b,
    ):
        alice = await libchat.open_client("127.0.0.1", a.port, user="alice", plugins=["files"])
        bob = await libchat.open_client("127.0.0.1", b.port, user="bob", plugins=["files"])
        try:
            src = tmp_path / "f.bin"
            file_of(src, 100)
            sending = asyncio.create_task(files_of(alice).send("bob", src))
            offer = await next_of(bob, libchat.Event, type="file.offer")
            await files_of(bob).decline(offer.header["tid"], "not now")
            with pytest.raises(Declined, match="bob declined the file: not now"):
                await asyncio.wait_for(sending, WAIT)
            with pytest.raises(TransferError):  # an answered offer cannot be accepted
                await files_of(bob).accept(offer.header["tid"], tmp_path / "in")
        finally:
            await alice.close()
            await bob.close()


async def test_file_transfers_between_nodes_abort_from_either_side(
    redis_server: RedisProcess, cluster: str
) -> None:
    # Raw frames: a transfer accepted on node b, owned by node a, then
    # aborted by the recipient, by the sender, and by the recipient leaving.
    data = b"chunk"
    sha = hashlib.sha256(data * 2).hexdigest()
    offer = {"type": "file.offer", "to": "bob", "name": "x", "size": 10, "sha256": sha}

    async def accepted(alice: libchat.Client, bob: libchat.Client) -> str:
        tid = str((await alice.request(offer))["tid"])
        assert (await next_of(bob, libchat.Event, type="file.offer")).header["tid"] == tid
        await bob.request({"type": "file.accept", "tid": tid, "offset": 0})
        accept = await next_of(alice, libchat.Event, type="file.accept")
        assert accept.header == {"type": "file.accept", "tid": tid, "offset": 0}
        await alice.send_frame({"type": "file.chunk", "tid": tid, "offset": 0}, data)
        chunk = await next_of(bob, libchat.Event, type="file.chunk")
        assert chunk.header["tid"] == tid and chunk.body == data
        return tid

    async with (
        node(redis_server, cluster, plugins=["files"]) as a,
        node(redis_server, cluster, plugins=["files"]) as b,
        clients((a, "alice"), (b, "bob")) as (alice, bob),
    ):
        tid = await accepted(alice, bob)
        await bob.send_frame({"type": "file.abort", "tid": tid, "reason": "no room"})
        abort = await next_of(alice, libchat.Event, type="file.abort")
        assert abort.header == {"type": "file.abort", "tid": tid, "reason": "no room"}
        tid = await accepted(alice, bob)
        await alice.send_frame({"type": "file.abort", "tid": tid, "reason": "changed my mind"})
        abort = await next_of(bob, libchat.Event, type="file.abort")
        assert abort.header["reason"] == "changed my mind"
        # b forgot it before passing the abort on: a result now is refused
        with pytest.raises(RemoteError, match="no transfer waiting"):
            await bob.request({"type": "file.result", "tid": tid, "ok": True})
        tid = await accepted(alice, bob)
        await bob.close()
        abort = await next_of(alice, libchat.Event, type="file.abort")
        assert abort.header == {"type": "file.abort", "tid": tid, "reason": "bob disconnected"}
