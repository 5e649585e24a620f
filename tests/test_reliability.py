"""Robustness of the core server against bad input and faulty peers.

Each test drives an in-process :class:`libchat.Server` on a loopback port
with raw sockets that speak bytes (:class:`Raw`) beside ordinary libchat
clients, and checks two things: the offender gets a clear answer (an
``error`` frame with a stable code, then the connection closes, or a
structured error with its request id), and everybody else goes on chatting.
The cases follow ../shared/RELIABILITY.md. Every wait is bounded by WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme

import libchat
from conftest import WAIT, connect, next_of, running_server
from libchat import protocol
from libchat.connection import READ_AHEAD, READ_SIZE, ServerConnection
from libchat.errors import ConnectionClosed, RemoteError
from libchat.hub import LocalHub
from libchat.protocol import MAGIC, PREFIX, PROTOCOL_VERSION, Frame, FrameDecoder, encode_frame
from libchat.tls import client_context, server_context

# -- a raw client that speaks bytes -------------------------------------------------------


def _prefix(header: bytes, body_len: int = 0) -> bytes:
    return PREFIX.pack(MAGIC, len(header), body_len)


def raw_frame(header: bytes, body: bytes = b"") -> bytes:
    """A frame around a header given as bytes (which may be broken on purpose)."""
    return _prefix(header, len(body)) + header + body


class Raw:
    """A TCP connection to the server with nothing but bytes in between."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(max_frame_size=None)
        self.frames: list[Frame] = []
        self.eof = False

    @classmethod
    async def open(cls, server: libchat.Server, *, rcvbuf: int | None = None) -> Raw:
        """Connect; ``rcvbuf`` shrinks our receive buffer (set before the
        connection, so the TCP window really is that small)."""
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            return cls(reader, writer)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.write(encode_frame(header, body))

    async def hello(self, user: str, **fields: Any) -> dict[str, Any]:
        """Say hello; return the welcome."""
        self.send({"type": "hello", "version": PROTOCOL_VERSION, "user": user, **fields})
        welcome = await self.next_frame()
        assert welcome.type == "welcome", welcome.header
        return welcome.header

    async def _fill(self) -> None:
        """Read once more from the socket; end of stream (or a reset) sets ``eof``."""
        try:
            data = await self.reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
        else:
            self.frames.extend(self.decoder.feed(data))

    async def next_frame(self, *types: str) -> Frame:
        """The next frame (of one of ``types``, if given); AssertionError at EOF."""

        async def scan() -> Frame:
            while True:
                while self.frames:
                    frame = self.frames.pop(0)
                    if not types or frame.type in types:
                        return frame
                assert not self.eof, "the server closed the connection"
                await self._fill()

        return await asyncio.wait_for(scan(), WAIT)

    async def until_closed(self) -> list[Frame]:
        """Every frame until the server closes the connection."""

        async def drain() -> list[Frame]:
            while not self.eof:
                await self._fill()
            frames, self.frames = self.frames, []
            return frames

        frames = await asyncio.wait_for(drain(), WAIT)
        await self.close()  # as a real client does, so the server need not linger
        return frames

    async def refused(self, code: str) -> dict[str, Any]:
        """Assert that an ``error`` frame with ``code`` arrives and the server
        then closes the connection; return the error header."""
        frames = await self.until_closed()
        errors = [f.header for f in frames if f.type == "error"]
        assert errors, f"no error frame before the close: {[f.header for f in frames]}"
        assert errors[0]["code"] == code, errors[0]
        assert errors[0]["message"], "an error needs a reason"
        return errors[0]

    def abort(self, *, reset: bool = False) -> None:
        """Drop the connection at once; ``reset`` sends a TCP RST."""
        if reset:
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)


# -- shared helpers -----------------------------------------------------------------------


def limits(**overrides: Any) -> libchat.Limits:
    """Test limits: quick timeouts, no per-address cap (every test client
    comes from 127.0.0.1), no fakelag unless asked."""
    base: dict[str, Any] = {
        "handshake_timeout": 5.0,
        "max_connections_per_address": 0,
        "rate": 0,
    }
    return libchat.Limits(**{**base, **overrides})


@contextlib.asynccontextmanager
async def chat_server(**kwargs: Any) -> AsyncIterator[libchat.Server]:
    kwargs.setdefault("limits", limits())
    async with running_server(**kwargs) as server:
        yield server


async def pair(server: libchat.Server) -> tuple[libchat.Client, libchat.Client]:
    """Two libchat clients in the lobby, each having seen the other arrive."""
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    await next_of(alice, libchat.Presence, user="bob", event="joined")
    return alice, bob


async def still_chatting(a: libchat.Client, b: libchat.Client, text: str = "still here") -> None:
    """A message from ``a`` reaches ``b`` in the lobby, and ``b`` can answer."""
    await a.send(text, room="lobby", wait=True)
    message = await next_of(b, libchat.Message, text=text)
    assert message.sender == a.user
    await b.send(text + "!", room="lobby", wait=True)
    assert (await next_of(a, libchat.Message, text=text + "!")).sender == b.user


async def quit_all(*clients: libchat.Client) -> None:
    for client in clients:
        await client.quit()


def session_of(server: libchat.Server, name: str) -> libchat.Session:
    (session,) = server.find_sessions(lambda s: s.name == name)
    return session


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll server state that has no event of its own (bounded by WAIT)."""

    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - the server offers no event to wait on
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT)


# -- 1. frames over the limit --------------------------------------------------------------


async def test_huge_declared_length_is_refused_on_the_prefix_alone() -> None:
    async with chat_server(limits=limits(max_frame_size=64 * 1024)) as server:
        alice, bob = await pair(server)
        raw = await Raw.open(server)
        await raw.hello("mallory")
        # Only the 8-byte prefix of a 4 GiB frame: the server cannot be
        # waiting for the rest, it must decide on the declared length.
        raw.write(PREFIX.pack(MAGIC, 100, 0xFFFFFFFF))
        error = await raw.refused("frame_too_large")
        assert "65536" in error["message"]
        left = await next_of(alice, libchat.Presence, user="mallory", event="left")
        assert "frame" in left.reason
        await still_chatting(alice, bob)
        await quit_all(alice, bob)


class RecordingDecoder(FrameDecoder):
    """Remembers the most bytes it ever held."""

    peak = 0

    def receive_data(self, data: bytes) -> None:
        super().receive_data(data)
        self.peak = max(self.peak, self.buffered)


async def test_frame_far_over_the_limit_closes_that_connection_only() -> None:
    async with chat_server(limits=limits(max_frame_size=64 * 1024)) as server:
        alice, bob = await pair(server)
        raw = await Raw.open(server)
        await raw.hello("mallory")
        decoder = RecordingDecoder(max_frame_size=64 * 1024)
        session_of(server, "mallory").conn.decoder = decoder
        # 2 MiB, written at once; no drain, the server may well cut us off
        # long before it is all sent.
        raw.write(raw_frame(b'{"type":"msg","room":"lobby"}', b"x" * (2 << 20)))
        await raw.refused("frame_too_large")
        await next_of(alice, libchat.Presence, user="mallory", event="left")
        assert await server.hub.members("lobby") == ["alice", "bob"]
        # refused on the first read: never more than one read's worth held
        assert 0 < decoder.peak <= READ_SIZE
        await still_chatting(alice, bob)
        await quit_all(alice, bob)


async def test_client_api_sees_why_its_frame_was_refused() -> None:
    # The server closes with our 2 MiB still arriving; the error frame must
    # survive that (no reset wiping it out before we read it).
    async with chat_server(limits=limits(max_frame_size=64 * 1024)) as server:
        alice, bob = await pair(server)
        with contextlib.suppress(libchat.ConnectionClosed):
            await alice.send_frame({"type": "msg", "room": "lobby", "text": "hi"}, b"x" * (2 << 20))
        error = await next_of(alice, libchat.ErrorEvent)
        assert error.code == "frame_too_large"
        await asyncio.wait_for(alice.wait_closed(), WAIT)
        assert "65536" in alice.close_reason
        await next_of(bob, libchat.Presence, user="alice", event="left")
        carol = await connect(server, "carol")
        await still_chatting(bob, carol)
        await quit_all(bob, carol)


async def test_frame_too_large_before_hello() -> None:
    async with chat_server(limits=limits(max_frame_size=1024)) as server:
        raw = await Raw.open(server)
        raw.write(PREFIX.pack(MAGIC, 2000, 0))
        await raw.refused("frame_too_large")


# -- 2. reassembly ---------------------------------------------------------------------------


async def test_frames_split_byte_by_byte() -> None:
    async with chat_server() as server:
        bob = await connect(server, "bob")
        raw = await Raw.open(server)
        data = encode_frame({"type": "hello", "version": PROTOCOL_VERSION, "user": "slow"})
        data += b"".join(
            encode_frame({"type": "msg", "room": "lobby", "text": f"m{i} \u00e9\u20ac"})
            for i in range(5)
        )
        for i in range(len(data)):
            raw.write(data[i : i + 1])
            await raw.writer.drain()
            await asyncio.sleep(0)  # let each byte be its own segment and read
        for i in range(5):
            message = await next_of(bob, libchat.Message)
            assert (message.sender, message.text) == ("slow", f"m{i} \u00e9\u20ac")
        await raw.close()
        await bob.quit()


async def test_many_frames_in_one_packet() -> None:
    async with chat_server() as server:
        bob = await connect(server, "bob")
        raw = await Raw.open(server)
        frames = [encode_frame({"type": "hello", "version": PROTOCOL_VERSION, "user": "fast"})]
        frames += [
            encode_frame({"type": "msg", "room": "lobby", "text": f"m{i}", "id": i})
            for i in range(300)
        ]
        raw.write(b"".join(frames))
        texts = [(await next_of(bob, libchat.Message, sender="fast")).text for _ in range(300)]
        assert texts == [f"m{i}" for i in range(300)]
        acks = [(await raw.next_frame("ok")).header["id"] for _ in range(300)]
        assert acks == list(range(300))
        await raw.close()
        await bob.quit()


# -- 3. bytes that are not the protocol ------------------------------------------------------

GARBAGE = {
    "garbage": (b"\x00\x9f\x13garbage\xff\xfe\x00\x01rubbish", "magic"),
    "bad magic": (b"XY" + encode_frame({"type": "hello"})[2:], "magic"),
    "http": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "plain text"),
    "tls": (bytes.fromhex("160301020001000" + "1fc0303") + bytes(32), "TLS"),
    "utf8": (raw_frame(b'{"type":"hello","user":"\xff\xfe"}'), "UTF-8"),
    "json": (raw_frame(b'{"type":"hello",'), "JSON"),
    "not an object": (raw_frame(b'["hello", 1]'), "object"),
    "no type": (raw_frame(b'{"user":"alice","version":1}'), "type"),
    "type not a string": (raw_frame(b'{"type":7}'), "type"),
    "empty header": (PREFIX.pack(MAGIC, 0, 0), "zero"),
    "nan": (raw_frame(b'{"type":"hello","version":NaN}'), "JSON"),
}


@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("case", list(GARBAGE))
async def test_bytes_that_are_not_the_protocol(case: str, after_hello: bool) -> None:
    data, reason = GARBAGE[case]
    async with chat_server() as server:
        alice, bob = await pair(server)
        raw = await Raw.open(server)
        if after_hello:
            await raw.hello("mallory")
        raw.write(data)
        error = await raw.refused("protocol_error")
        assert reason in error["message"]
        if after_hello:
            left = await next_of(alice, libchat.Presence, user="mallory", event="left")
            assert left.reason == error["message"]
        await still_chatting(alice, bob)
        assert len(server.sessions) == 2
        await quit_all(alice, bob)


# -- 4. malformed requests: an error with the id, the connection stays -----------------------

BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "msg", "room": "lobby", "text": ""}, "bad_request", "empty"),
    ({"type": "msg", "room": "lobby", "text": " \t "}, "bad_request", "empty"),
    ({"type": "msg", "room": "lobby"}, "bad_request", "text"),
    ({"type": "msg", "text": "hi"}, "bad_request", "room"),
    ({"type": "msg", "room": 5, "text": "hi"}, "bad_request", "room"),
    ({"type": "msg", "room": "lobby", "text": 42}, "bad_request", "text"),
    ({"type": "msg", "room": "lobby", "text": ["hi"]}, "bad_request", "text"),
    ({"type": "msg", "room": "lobby", "text": "x" * 1025}, "bad_request", "1024"),
    ({"type": "msg", "room": "elsewhere", "text": "hi"}, "not_found", "elsewhere"),
    ({"type": "join"}, "invalid_name", "room"),
    ({"type": "part", "room": "nowhere"}, "not_found", "nowhere"),
    ({"type": "who", "room": "nowhere"}, "not_found", "nowhere"),
    ({"type": "command", "command": 3}, "bad_request", "command"),
    ({"type": "no-such-type"}, "bad_request", "no-such-type"),
]


async def test_malformed_requests_get_errors_with_their_id() -> None:
    async with chat_server(limits=limits(max_message_bytes=1024)) as server:
        bob = await connect(server, "bob")
        raw = await Raw.open(server)
        await raw.hello("sloppy")
        await next_of(bob, libchat.Presence, user="sloppy", event="joined")
        for number, (request, code, words) in enumerate(BAD_REQUESTS):
            raw.send({**request, "id": f"r{number}"})
            error = (await raw.next_frame("error", "ok")).header
            assert error["type"] == "error", (request, error)
            assert (error["id"], error["code"]) == (f"r{number}", code), (request, error)
            assert words in error["message"], (request, error)
        # Still open, still heard; nothing malformed reached bob.
        raw.send({"type": "msg", "room": "lobby", "text": "x" * 1024, "id": 99})
        reply = (await raw.next_frame("ok", "error")).header
        assert (reply["type"], reply["id"]) == ("ok", 99)
        message = await next_of(bob, libchat.Message)
        assert (message.text, message.mid) == ("x" * 1024, reply["mid"])
        await raw.close()
        await bob.quit()


async def test_client_api_raises_the_structured_error() -> None:
    async with chat_server(limits=limits(max_message_bytes=100)) as server:
        alice, bob = await pair(server)
        for text in ("", "y" * 101):
            with pytest.raises(RemoteError) as err:
                await alice.send(text, wait=True)
            assert err.value.remote_code == "bad_request"
        await still_chatting(alice, bob)
        await quit_all(alice, bob)


# -- 5. flood: delayed, never dropped ----------------------------------------------------------


async def test_flood_is_delayed_not_dropped_and_others_unaffected() -> None:
    async with chat_server(limits=limits(rate=20, rate_burst=5)) as server:
        flooder = await connect(server, "flooder")
        member = await connect(server, "member")
        third = await connect(server, "third")
        await next_of(flooder, libchat.Presence, user="third", event="joined")
        for i in range(60):
            await flooder.send(f"flood {i}")
        for i in range(3):
            await third.send(f"third {i}", wait=True)
        received: list[tuple[str, str]] = []
        while len(received) < 63:
            message = await next_of(member, libchat.Message)
            received.append((message.sender, message.text))
        assert [t for s, t in received if s == "flooder"] == [f"flood {i}" for i in range(60)]
        assert [t for s, t in received if s == "third"] == [f"third {i}" for i in range(3)]
        # The third client was not held up behind the flood: its messages
        # overtook the tail of it.
        assert received.index(("third", "third 2")) < received.index(("flooder", "flood 59"))
        await quit_all(flooder, member, third)


# -- 6. a peer that stops reading ------------------------------------------------------------


async def test_stuck_reader_is_dropped_and_the_room_goes_on() -> None:
    queue_limit = 64 * 1024
    size = 16 * 1024
    count = 40
    async with chat_server(
        limits=limits(max_send_queue=queue_limit, max_message_bytes=size)
    ) as server:
        receiver = await connect(server, "receiver")
        stuck = await Raw.open(server, rcvbuf=4096)
        await stuck.hello("stuck")
        stuck_conn = session_of(server, "stuck").conn
        # Keep the kernel from hiding the backlog in a large socket buffer.
        stuck_conn.writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        senders = [await connect(server, f"sender{n}") for n in range(2)]
        await next_of(receiver, libchat.Presence, user="sender1", event="joined")

        async def flood(client: libchat.Client) -> None:
            for i in range(count):
                await client.send(f"{client.user} {i} " + "x" * (size - 20), wait=True)

        await asyncio.wait_for(asyncio.gather(*(flood(c) for c in senders)), WAIT)
        # The receiver got everything, each sender in order, and saw the
        # stuck one leave.
        got: dict[str, list[int]] = {"sender0": [], "sender1": []}
        reasons: list[str] = []

        async def watch() -> None:
            while sum(map(len, got.values())) < 2 * count or not reasons:
                event = await receiver.next_event()
                if isinstance(event, libchat.Message):
                    got[event.sender].append(int(event.text.split()[1]))
                elif isinstance(event, libchat.Presence) and event.event == "left":
                    reasons.append(f"{event.user}: {event.reason}")

        await asyncio.wait_for(watch(), WAIT)
        assert got == {"sender0": list(range(count)), "sender1": list(range(count))}
        assert reasons == ["stuck: send queue exceeded"]
        # So did each sender get the other's.
        for me, other in ((senders[0], "sender1"), (senders[1], "sender0")):
            numbers = [
                int((await next_of(me, libchat.Message, sender=other)).text.split()[1])
                for _ in range(count)
            ]
            assert numbers == list(range(count))
        # No connection ever held more than the limit plus one frame.
        frame = size + 200
        assert stuck_conn.peak_queued <= queue_limit + frame
        for session in server.sessions:
            assert session.conn.peak_queued <= queue_limit + frame
        assert stuck_conn.closed and stuck_conn.queued() == 0
        await stuck.close()
        await quit_all(receiver, *senders)


async def test_a_large_frame_into_an_empty_queue_is_not_a_stuck_reader() -> None:
    # A single frame bigger than the whole send queue must still go to a
    # reader that keeps up; only a backlog counts against the limit.
    async with chat_server(limits=limits(max_send_queue=1024, max_message_bytes=4096)) as server:
        alice, bob = await pair(server)
        await alice.send("z" * 4000, wait=True)
        assert (await next_of(bob, libchat.Message)).text == "z" * 4000
        await still_chatting(alice, bob)
        await quit_all(alice, bob)


# -- 7. slowloris ----------------------------------------------------------------------------


@pytest.mark.parametrize("half_hello", [False, True], ids=["silent", "half-hello"])
async def test_handshake_timeout(half_hello: bool) -> None:
    async with chat_server(limits=limits(handshake_timeout=0.3)) as server:
        alice, bob = await pair(server)
        raw = await Raw.open(server)
        if half_hello:
            hello = encode_frame({"type": "hello", "version": PROTOCOL_VERSION, "user": "lazy"})
            raw.write(hello[: len(hello) // 2])
        error = await raw.refused("timeout")
        assert "handshake" in error["message"]
        await still_chatting(alice, bob)
        assert {s.name for s in server.sessions} == {"alice", "bob"}
        await quit_all(alice, bob)


# -- 8. keepalive ----------------------------------------------------------------------------


async def test_silent_peer_is_dropped_and_a_live_client_stays() -> None:
    async with chat_server(limits=limits(ping_interval=0.2, ping_timeout=0.2)) as server:
        pongs: dict[str, int] = {}
        several = asyncio.Event()
        core_pong = server.handlers["pong"]

        def count_pong(session: libchat.Session, frame: Frame) -> Any:
            pongs[session.name] = pongs.get(session.name, 0) + 1
            if pongs.get("alice", 0) >= 4:
                several.set()
            return core_pong(session, frame)

        server.handlers["pong"] = count_pong
        alice = await connect(server, "alice")
        silent = await Raw.open(server)
        await silent.hello("silent")
        left = await next_of(alice, libchat.Presence, user="silent", event="left")
        assert left.reason == "ping timeout"
        assert any(f.type == "ping" for f in await silent.until_closed())
        # alice answers every ping and lives through several intervals.
        await asyncio.wait_for(several.wait(), WAIT)
        assert pongs.get("silent", 0) == 0
        assert not alice.closed
        assert await alice.who() == ["alice"]
        await alice.quit()


async def test_a_throttled_backlog_does_not_count_as_silence() -> None:
    # The server is still working through this peer's backlog (slowed down by
    # the rate limit): its pong would be queued behind it, so it must not be
    # dropped for a ping it has not yet been able to answer.
    async with chat_server(
        limits=limits(rate=40, rate_burst=1, ping_interval=0.2, ping_timeout=0.2)
    ) as server:
        bob = await connect(server, "bob")
        raw = await Raw.open(server)
        hello = encode_frame({"type": "hello", "version": PROTOCOL_VERSION, "user": "chatty"})
        backlog = b"".join(
            encode_frame({"type": "msg", "room": "lobby", "text": f"n{i}"}) for i in range(30)
        )
        raw.write(hello + backlog)
        # All of it arrives; then the peer really is silent, and goes.
        texts: list[str] = []
        while True:
            event = await asyncio.wait_for(bob.next_event(), WAIT)
            if isinstance(event, libchat.Message):
                texts.append(event.text)
            elif isinstance(event, libchat.Presence) and event.event == "left":
                assert event.reason == "ping timeout"
                break
        assert texts == [f"n{i}" for i in range(30)]
        await bob.quit()


# -- 9. connection limits --------------------------------------------------------------------


class SlowGoodbyes:
    """A session_closed hook that takes its time (until released)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    @libchat.hookimpl
    async def libchat_session_closed(self) -> None:
        await self.release.wait()


async def test_connections_per_address() -> None:
    slow = SlowGoodbyes()
    async with chat_server(limits=limits(max_connections_per_address=3), plugins=[slow]) as server:
        clients = [await connect(server, f"user{i}") for i in range(3)]
        raw = await Raw.open(server)
        error = await raw.refused("too_many_connections")
        assert "127.0.0.1" in error["message"] and "3" in error["message"]
        with pytest.raises(RemoteError) as err:
            await connect(server, "user3")
        assert err.value.remote_code == "too_many_connections"
        await clients.pop().quit()
        # The slot is free the moment the goodbye is complete, however long
        # plugins take to clean up after the session.
        clients.append(await connect(server, "user3"))
        await still_chatting(clients[0], clients[-1])
        slow.release.set()
        await quit_all(*clients)


async def test_max_connections() -> None:
    async with chat_server(limits=limits(max_connections=2)) as server:
        alice = await connect(server, "alice")
        lurker = await Raw.open(server)  # a handshake in progress counts too
        await wait_until(lambda: len(server.sessions) == 2)
        with pytest.raises(RemoteError) as err:
            await connect(server, "bob")
        assert err.value.remote_code == "too_many_connections"
        assert "full" in err.value.message
        await lurker.close()
        await wait_until(lambda: len(server.sessions) == 1)
        bob = await connect(server, "bob")
        await still_chatting(alice, bob)
        await quit_all(alice, bob)


# -- 10. commands before the hello -----------------------------------------------------------


async def test_commands_before_hello_close_the_connection() -> None:
    async with chat_server() as server:
        bob = await connect(server, "bob")
        raw = await Raw.open(server)
        early = [
            encode_frame({"type": "msg", "room": "lobby", "text": f"early {i}"}) for i in range(20)
        ]
        hello = encode_frame({"type": "hello", "version": PROTOCOL_VERSION, "user": "eager"})
        raw.write(b"".join([*early, hello]))
        error = await raw.refused("protocol_error")
        assert "hello" in error["message"] and "'msg'" in error["message"]
        assert {s.name for s in server.sessions} == {"bob"}
        assert await server.hub.online("eager") is None
        # nothing of it reached the room
        alice = await connect(server, "alice")
        await still_chatting(alice, bob)
        await quit_all(alice, bob)


async def test_second_hello_is_a_protocol_error() -> None:
    async with chat_server() as server:
        bob = await connect(server, "bob")
        raw = await Raw.open(server)
        await raw.hello("twice")
        raw.send({"type": "hello", "version": PROTOCOL_VERSION, "user": "again", "id": 1})
        error = await raw.refused("protocol_error")
        assert "hello" in error["message"]
        await next_of(bob, libchat.Presence, user="twice", event="left")
        await bob.quit()


# -- 11. names -------------------------------------------------------------------------------

BAD_NAMES: list[Any] = [
    "a" * 33,
    "al\x00ice",
    "bob\n",
    "tab\there",
    "esc\x1b[31m",
    "",
    " alice",
    "9lives",
    "caf\u00e9",
    42,
    None,
    ["alice"],
    {"name": "alice"},
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
async def test_invalid_user_names(name: Any) -> None:
    async with chat_server() as server:
        alice = await connect(server, "alice")
        raw = await Raw.open(server)
        raw.send({"type": "hello", "version": PROTOCOL_VERSION, "user": name})
        error = await raw.refused("invalid_name")
        assert "user name" in error["message"]
        assert {s.name for s in server.sessions} == {"alice"}
        await alice.quit()


async def test_missing_user_name() -> None:
    async with chat_server() as server:
        raw = await Raw.open(server)
        raw.send({"type": "hello", "version": PROTOCOL_VERSION})
        await raw.refused("invalid_name")


@pytest.mark.parametrize("name", ["ALICE", "Alice", "aLiCe"])
async def test_names_collide_ignoring_case(name: str) -> None:
    async with chat_server() as server:
        alice, bob = await pair(server)
        raw = await Raw.open(server)
        raw.send({"type": "hello", "version": PROTOCOL_VERSION, "user": name})
        error = await raw.refused("name_in_use")
        assert "alice" in error["message"]
        # the holder is untouched
        await still_chatting(alice, bob)
        assert await server.hub.online("alice") == "alice"
        await quit_all(alice, bob)


BAD_ROOMS: list[Any] = ["", "a b", "x" * 49, "../etc", "#general", "r\x00", "caf\u00e9", 7, None]


async def test_invalid_room_names_on_join() -> None:
    async with chat_server() as server:
        alice, bob = await pair(server)
        for room in BAD_ROOMS:
            with pytest.raises(RemoteError) as err:
                await alice.request({"type": "join", "room": room})
            assert err.value.remote_code == "invalid_name", room
            assert "room name" in err.value.message
        assert alice.rooms == {"lobby": "lobby"}
        assert [r for r, _ in await alice.list_rooms()] == ["lobby"]
        await still_chatting(alice, bob)
        await quit_all(alice, bob)


@pytest.mark.parametrize("room", ["a b", 5, ""])
async def test_invalid_room_in_hello(room: Any) -> None:
    async with chat_server() as server:
        raw = await Raw.open(server)
        raw.send({"type": "hello", "version": PROTOCOL_VERSION, "user": "rover", "room": room})
        await raw.refused("invalid_name")
        assert await server.hub.online("rover") is None


# -- 12. plugins that fail -------------------------------------------------------------------


class FailingMessageHook:
    @libchat.hookimpl
    def libchat_message(self, session: libchat.Session, message: dict[str, Any]) -> None:
        if "boom" in message["text"]:
            raise RuntimeError("plugin bug")


class FailingSessionOpened:
    @libchat.hookimpl
    async def libchat_session_opened(self, session: libchat.Session) -> None:
        raise RuntimeError("plugin bug on open")


class FailingAuthenticate:
    @libchat.hookimpl
    def libchat_authenticate(self, hello: dict[str, Any]) -> str | None:
        if hello.get("user") == "crash":
            raise RuntimeError("plugin bug in authenticate")
        return None


async def events_until(client: libchat.Client, text: str) -> list[libchat.Event]:
    """Every event up to and including the message saying ``text``."""
    events: list[libchat.Event] = []

    async def scan() -> None:
        while True:
            events.append(await client.next_event())
            if isinstance(events[-1], libchat.Message) and events[-1].text == text:
                return

    await asyncio.wait_for(scan(), WAIT)
    return events


async def test_failing_plugin_hooks_hurt_only_the_request() -> None:
    plugins = [FailingMessageHook(), FailingSessionOpened(), FailingAuthenticate()]
    async with chat_server(plugins=plugins) as server:
        # session_opened raises for everyone: logged, the sessions still open.
        alice, bob = await pair(server)
        with pytest.raises(RemoteError) as err:
            await alice.send("boom", wait=True)
        assert err.value.remote_code == "internal_error"
        # Without waiting for a reply the error comes as an event.
        await alice.send("boom again")
        event = await next_of(alice, libchat.ErrorEvent)
        assert event.code == "internal_error"
        # Bob saw neither the failed messages nor any error.
        await alice.send("after the failure", wait=True)
        seen = await events_until(bob, "after the failure")
        assert [e.text for e in seen if isinstance(e, libchat.Message)] == ["after the failure"]
        assert not [e for e in seen if isinstance(e, libchat.ErrorEvent)]
        # A hello that makes a plugin fail: refused, the others go on.
        raw = await Raw.open(server)
        raw.send({"type": "hello", "version": PROTOCOL_VERSION, "user": "crash"})
        await raw.refused("internal_error")
        await still_chatting(bob, alice, "and again")
        assert {s.name for s in server.sessions} == {"alice", "bob"}
        await quit_all(alice, bob)


# -- 13. peers that vanish -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["mid-frame", "reset", "abort"])
async def test_vanishing_peer_is_cleaned_up(how: str) -> None:
    async with chat_server() as server:
        alice = await connect(server, "alice")
        raw = await Raw.open(server)
        await raw.hello("ghost")
        raw.send({"type": "join", "room": "dev", "id": 1})
        await raw.next_frame("ok")
        await alice.join("dev")
        if how == "mid-frame":
            frame = encode_frame({"type": "msg", "room": "lobby", "text": "never finished"})
            raw.write(frame[: len(frame) - 5])
            await raw.writer.drain()
            await raw.close()
        else:
            raw.abort(reset=how == "reset")
        for room in ("lobby", "dev"):
            left = await next_of(alice, libchat.Presence, room=room, user="ghost", event="left")
        if how == "mid-frame":
            assert "middle of a frame" in left.reason
        assert await server.hub.members("lobby") == ["alice"]
        assert await server.hub.members("dev") == ["alice"]
        assert await server.hub.online("ghost") is None
        assert {s.name for s in server.sessions} == {"alice"}
        # and the name is free again
        ghost = await connect(server, "ghost")
        await still_chatting(alice, ghost)
        await quit_all(alice, ghost)


class Member:
    def __init__(self, name: str, *, broken: bool = False) -> None:
        self.name = name
        self.broken = broken
        self.got: list[bytes] = []

    def deliver(self, data: bytes) -> None:
        if self.broken:
            raise RuntimeError("broken member")
        self.got.append(data)


async def test_one_failing_member_does_not_cost_the_others_a_message() -> None:
    hub = LocalHub()
    members = [Member("a"), Member("b", broken=True), Member("c")]
    for member in members:
        await hub.attach(member)
        await hub.join("lobby", member)
    assert hub.publish("lobby", b"frame") == 2
    assert await hub.send_to_user("B", b"direct") == 0
    assert [m.got for m in members] == [[b"frame"], [], [b"frame"]]


# -- 14. order, loss, duplicates -------------------------------------------------------------


async def test_concurrent_senders_no_loss_no_duplicates_in_order() -> None:
    senders_n, per_sender, receivers_n = 5, 200, 3
    async with chat_server() as server:
        receivers = [await connect(server, f"recv{i}") for i in range(receivers_n)]
        senders = [await connect(server, f"send{i}") for i in range(senders_n)]
        await next_of(receivers[0], libchat.Presence, user=f"send{senders_n - 1}")

        async def talk(client: libchat.Client) -> None:
            for i in range(per_sender):
                await client.send(f"{client.user}:{i}")

        async def collect(client: libchat.Client, expected: int) -> dict[str, list[int]]:
            seen: dict[str, list[int]] = {}
            for _ in range(expected):
                message = await next_of(client, libchat.Message)
                sender, number = message.text.split(":")
                assert sender == message.sender
                seen.setdefault(sender, []).append(int(number))
            return seen

        everyone = senders_n * per_sender
        results = await asyncio.gather(
            *(talk(s) for s in senders),
            *(collect(r, everyone) for r in receivers),
            *(collect(s, everyone - per_sender) for s in senders),
        )
        expected = list(range(per_sender))
        for seen in results[senders_n : senders_n + receivers_n]:
            assert seen == {f"send{i}": expected for i in range(senders_n)}
        for me, seen in zip(senders, results[senders_n + receivers_n :], strict=True):
            assert seen == {f"send{i}": expected for i in range(senders_n) if f"send{i}" != me.user}
        # and nothing more is on its way: a marker is the very next message
        await senders[0].send("marker", wait=True)
        for receiver in receivers:
            assert (await next_of(receiver, libchat.Message)).text == "marker"
        await quit_all(*receivers, *senders)


# -- 15. TCP_NODELAY -------------------------------------------------------------------------


async def test_tcp_nodelay_on_every_connection() -> None:
    async with chat_server() as server:
        alice, bob = await pair(server)
        raw = await Raw.open(server)
        await wait_until(lambda: len(server.sessions) == 3)
        for session in server.sessions:
            sock = session.conn.writer.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), session
        for client in (alice, bob):
            sock = client.conn.writer.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await raw.close()
        await quit_all(alice, bob)


# -- 16. protocol versions -------------------------------------------------------------------


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, 0, "1", None])
async def test_protocol_version_mismatch_names_both_versions(version: Any) -> None:
    async with chat_server() as server:
        raw = await Raw.open(server)
        raw.send({"type": "hello", "version": version, "user": "future"})
        error = await raw.refused("handshake_failed")
        assert f"version {version!r}" in error["message"]
        assert f"version {PROTOCOL_VERSION}" in error["message"]
        assert await server.hub.online("future") is None


async def test_client_sees_version_mismatch() -> None:
    async with chat_server() as server:
        with pytest.raises(RemoteError) as err:
            await connect(server, "future", hello={"version": 99})
        assert err.value.remote_code == "handshake_failed"
        assert "99" in err.value.message and str(PROTOCOL_VERSION) in err.value.message


# -- Server.close ----------------------------------------------------------------------------


class Lifecycle:
    """Counts shutdowns; can make session_closed hang forever."""

    def __init__(self, *, hang: bool = False) -> None:
        self.shutdowns = 0
        self.hang = hang

    @libchat.hookimpl
    def libchat_shutdown(self) -> None:
        self.shutdowns += 1

    @libchat.hookimpl
    async def libchat_session_closed(self) -> None:
        if self.hang:
            await asyncio.Event().wait()


async def test_close_is_idempotent_even_when_concurrent() -> None:
    plugin = Lifecycle()
    server = libchat.Server("127.0.0.1", 0, limits=limits(), plugins=[plugin])
    await server.start()
    port = server.port
    alice = await connect(server, "alice")
    handshaking = await Raw.open(server)
    await wait_until(lambda: len(server.sessions) == 2)

    async def close() -> int:
        await server.close()
        return plugin.shutdowns

    # every call returns only once the shutdown is complete, and it runs once
    assert await asyncio.wait_for(asyncio.gather(close(), close(), close()), WAIT) == [1, 1, 1]
    assert not server.sessions
    await asyncio.wait_for(alice.wait_closed(), WAIT)
    assert alice.close_reason == "server shutting down"
    frames = await handshaking.until_closed()
    assert [f.header for f in frames if f.type == "bye"] == [
        {"type": "bye", "reason": "server shutting down"}
    ]
    await server.close()
    assert plugin.shutdowns == 1
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_close_honours_its_timeout() -> None:
    plugin = Lifecycle(hang=True)
    server = libchat.Server("127.0.0.1", 0, limits=limits(), plugins=[plugin])
    await server.start()
    alice = await connect(server, "alice")
    # A session whose cleanup never ends cannot hold the shutdown up forever.
    await asyncio.wait_for(server.close(timeout=0.3), WAIT)
    assert plugin.shutdowns == 1
    await asyncio.wait_for(alice.wait_closed(), WAIT)


async def test_close_with_a_stuck_reader_does_not_hang() -> None:
    server = libchat.Server("127.0.0.1", 0, limits=limits(max_message_bytes=60000))
    await server.start()
    stuck = await Raw.open(server, rcvbuf=4096)
    await stuck.hello("stuck")
    alice = await connect(server, "alice")
    conn = session_of(server, "stuck").conn
    conn.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for _ in range(5):
        await alice.send("w" * 50000, wait=True)
    assert conn.queued() > 0  # its goodbye cannot be delivered
    await asyncio.wait_for(server.close(timeout=0.3), WAIT)
    assert conn.closed
    await stuck.close()
    await asyncio.wait_for(alice.wait_closed(), WAIT)


# -- 17. reasons: capped, cleaned, never in the way ---------------------------------------


class ClosedSpy:
    """Records every session_closed hook call."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, str]] = []

    @libchat.hookimpl
    def libchat_session_closed(self, session: libchat.Session, reason: str) -> None:
        self.closed.append((session.name, reason))


@pytest.mark.parametrize("size", [65_000, 65_490])
async def test_a_huge_quit_reason_is_cut_and_kicks_nobody(
    size: int, caplog: pytest.LogCaptureFixture
) -> None:
    # 65,000 bytes of reason sent to 20 shared rooms used to overflow the
    # others' send queues (a kick); 65,490 made the 'left' frame too large
    # to encode, so nobody saw the user leave and no hook ran.
    spy = ClosedSpy()
    rooms = [f"room{i}" for i in range(20)]
    async with chat_server(plugins=[spy]) as server:
        victim = await connect(server, "victim")
        mallory = await connect(server, "mallory")
        for room in rooms:
            await victim.join(room)
            await mallory.join(room)
        caplog.set_level("INFO", logger="libchat.server")
        reason = "bye\nforged log line\x1b[31m " + "x" * size
        mallory.conn.send({"type": "quit", "reason": reason[:size]})
        await mallory.conn.drain()
        seen: dict[str, str] = {}
        while len(seen) < len(rooms) + 1:
            left = await next_of(victim, libchat.Presence, user="mallory", event="left")
            seen[left.room] = left.reason
        assert set(seen) == {"lobby", *rooms}
        (cut,) = set(seen.values())
        assert len(cut) == protocol.MAX_REASON_CHARS
        assert cut.startswith("bye forged log line [31m xxx") and cut.endswith("...")
        await asyncio.wait_for(mallory.wait_closed(), WAIT)
        assert mallory.close_reason == cut  # the bye says the same
        await wait_until(lambda: bool(spy.closed))
        assert spy.closed == [("mallory", cut)]
        # the victim is still there, and logs hold the reason on one line
        assert not victim.closed and await victim.who("room0") == ["victim"]
        assert [r.getMessage() for r in caplog.records if "left" in r.getMessage()] == [
            f"mallory ({session_peer(server, mallory)}) left: {cut!r}"
        ]
        await victim.quit()


def session_peer(server: libchat.Server, client: libchat.Client) -> str:
    host, port = client.conn.writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def test_overlong_fields_in_requests_are_errors_not_failures() -> None:
    # A frame type or an id of 64 KiB, quoted back in an error (or repeated
    # in every reply), would not fit in a header: the error is answered
    # with a short quote and the connection goes on.
    async with chat_server() as server:
        alice, bob = await pair(server)
        raw = await Raw.open(server)
        await raw.hello("mallory")
        raw.send({"type": "t" * 65_000, "id": "1"})
        error = (await raw.next_frame("error")).header
        assert (error["code"], error["id"]) == ("bad_request", "1")
        assert "unknown frame type 'ttt" in error["message"] and len(error["message"]) < 100
        raw.send({"type": "rooms", "id": "i" * 65_000})
        error = (await raw.next_frame("error")).header
        assert error["code"] == "bad_request" and "id" not in error
        assert "'id' is over 128 characters" in error["message"]
        raw.send({"type": "msg", "room": "r" * 65_000, "text": "hi", "id": 2})
        error = (await raw.next_frame("error")).header
        assert (error["code"], error["id"]) == ("not_found", 2)
        raw.send({"type": "rooms", "id": "i" * 128})
        assert (await raw.next_frame("ok")).header["id"] == "i" * 128
        await still_chatting(alice, bob)
        await raw.close()
        await quit_all(alice, bob)


async def test_a_huge_first_frame_type_is_refused_with_a_short_quote() -> None:
    async with chat_server() as server:
        raw = await Raw.open(server)
        raw.send({"type": "t" * 65_500})
        error = await raw.refused("protocol_error")
        assert "expected a 'hello' frame first" in error["message"]
        assert len(error["message"]) < 200
        future = await Raw.open(server)
        future.send({"type": "hello", "version": "9" * 65_400, "user": "future"})
        frames = await future.until_closed()
        assert [f.type for f in frames] == ["error", "bye"]
        assert frames[0].header["code"] == "handshake_failed"
        assert len(frames[1].header["reason"]) <= protocol.MAX_REASON_CHARS


# -- 18. a connection cut off while its handler waits --------------------------------------


class Stall:
    """A frame type whose handler waits for ever (as a file relay waiting
    for a recipient that never drains did)."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.cancelled = asyncio.Event()

    @libchat.hookimpl
    def libchat_frame_handlers(self, server: libchat.Server) -> dict[str, Any]:
        return {"stall": self.on_stall}

    async def on_stall(self, session: libchat.Session, frame: Frame) -> None:
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.mark.parametrize("cut", ["ping timeout", "send queue exceeded"])
async def test_a_cut_off_session_ends_even_while_its_handler_waits(cut: str) -> None:
    stall, spy = Stall(), ClosedSpy()
    keepalive = {"ping_interval": 0.2, "ping_timeout": 0.2} if cut == "ping timeout" else {}
    async with chat_server(limits=limits(**keepalive), plugins=[stall, spy]) as server:
        alice = await connect(server, "alice")
        raw = await Raw.open(server)
        await raw.hello("stuck")
        raw.send({"type": "join", "room": "dev", "id": 1})
        await raw.next_frame("ok")
        await alice.join("dev")
        raw.send({"type": "stall"})
        await asyncio.wait_for(stall.waiting.wait(), WAIT)
        if cut == "send queue exceeded":
            # what the send queue does to a peer that stopped reading
            session_of(server, "stuck").conn.abort(cut)
        # (with ping timeout: the raw peer stays silent and is dropped)
        for room in ("lobby", "dev"):
            left = await next_of(alice, libchat.Presence, room=room, user="stuck", event="left")
            assert left.reason == cut
        assert stall.cancelled.is_set()
        await wait_until(lambda: bool(spy.closed))
        assert spy.closed == [("stuck", cut)]
        assert {s.name for s in server.sessions} == {"alice"}
        assert await server.hub.online("stuck") is None
        # the name is free again
        again = await connect(server, "stuck")
        await still_chatting(alice, again)
        await raw.close()
        await quit_all(alice, again)


# -- 19. a flood of tiny frames is held as bytes, not objects -------------------------------


class Gate:
    """A frame type whose handler waits until the test opens the gate."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.open = asyncio.Event()

    @libchat.hookimpl
    def libchat_frame_handlers(self, server: libchat.Server) -> dict[str, Any]:
        return {"gate": self.on_gate}

    async def on_gate(self, session: libchat.Session, frame: Frame) -> None:
        self.reached.set()
        await self.open.wait()


async def test_a_flood_of_tiny_frames_costs_its_bytes_not_a_frame_object_each() -> None:
    gate = Gate()
    async with chat_server(plugins=[gate]) as server:
        pongs = 0
        core_pong = server.handlers["pong"]

        def count_pong(session: libchat.Session, frame: Frame) -> Any:
            nonlocal pongs
            pongs += 1
            return core_pong(session, frame)

        server.handlers["pong"] = count_pong
        alice = await connect(server, "alice")
        raw = await Raw.open(server)
        await raw.hello("flood")
        raw.send({"type": "gate"})
        await asyncio.wait_for(gate.reached.wait(), WAIT)
        conn = session_of(server, "flood").conn
        pong = encode_frame({"type": "pong"})  # 23 bytes
        count = (2 << 20) // len(pong)
        raw.write(pong * count)  # queued in our transport before the server reads any
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            # The handler waits; the server reads until it holds READ_AHEAD
            # bytes, then stops reading.
            await wait_until(lambda: not conn.transport.is_reading())
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # ~90,000 frames in 2 MiB: decoded at once they cost some 30 MB.
        assert held < 4 << 20, f"{held} bytes held for a 2 MiB flood"
        assert READ_AHEAD <= conn.backlog() <= READ_AHEAD + READ_SIZE
        bob = await connect(server, "bob")
        await still_chatting(alice, bob)
        gate.open.set()
        # Everything is handled, in order, once the handler lets go.
        await wait_until(lambda: pongs == count)
        assert conn.backlog() == 0 and conn.transport.is_reading()
        await raw.writer.drain()
        await raw.close()
        await alice.quit()
        await bob.quit()


# -- 20. replies that would not fit, and the room limit --------------------------------------


async def test_rooms_reply_is_cut_to_fit() -> None:
    # 1,000 rooms with the longest names: the whole list is over 64 KiB.
    async with chat_server(limits=limits(max_rooms_per_session=1001)) as server:
        alice = await connect(server, "alice", receive_events=False)
        names = [f"r{i:03d}" + "y" * 44 for i in range(1000)]
        await asyncio.wait_for(asyncio.gather(*(alice.join(n) for n in names)), WAIT)
        reply = await alice.request({"type": "rooms"})
        assert reply["truncated"] is True and reply["total"] == 1001
        assert [r["room"] for r in reply["rooms"]] == ["lobby", *names][: protocol.MAX_LIST_ITEMS]
        assert len(await alice.list_rooms()) == protocol.MAX_LIST_ITEMS
        # a list that fits says nothing more
        bob = await connect(server, "bob")
        assert "truncated" not in await bob.request({"type": "who", "room": "lobby"})
        await quit_all(alice, bob)


class Crowd:
    """A hub member with no connection (the hub is the seam: anything with a
    name and deliver() can be in a room)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def deliver(self, data: bytes) -> None:
        pass


async def test_who_and_join_replies_are_cut_to_fit() -> None:
    async with chat_server() as server:
        # 2,000 members with 32-character names: over 64 KiB of names.
        crowd = [Crowd(f"m{i:04d}" + "z" * 27) for i in range(2000)]
        for member in crowd:
            await server.hub.attach(member)
            await server.hub.join("crowd", member)
        alice = await connect(server, "alice")
        who = await alice.request({"type": "who", "room": "crowd"})
        assert who["truncated"] is True and who["total"] == 2000
        assert who["members"] == [m.name for m in crowd[: protocol.MAX_LIST_ITEMS]]
        joined = await alice.request({"type": "join", "room": "crowd"})
        assert joined["truncated"] is True and joined["total"] == 2001
        assert len(joined["members"]) == protocol.MAX_LIST_ITEMS
        assert alice.room == "crowd"
        await alice.quit()


async def test_max_rooms_bounds_the_rooms_on_the_server() -> None:
    async with chat_server(limits=limits(max_rooms=3)) as server:
        alice, bob = await pair(server)  # lobby is one
        assert alice.welcome["limits"]["max_rooms"] == 3
        await alice.join("one")
        await alice.join("two")
        with pytest.raises(RemoteError) as err:
            await bob.join("three")
        assert err.value.remote_code == "bad_request" and "max_rooms" in err.value.message
        assert await bob.join("two") == ["alice", "bob"]  # one that exists is fine
        await alice.part("one")  # empty: gone
        assert await bob.join("three") == ["bob"]
        await still_chatting(alice, bob)
        await quit_all(alice, bob)


# -- 21. TLS: connections count from the TCP accept ------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(folder / "server.pem"))
    return str(folder / "server.pem"), str(folder / "ca.pem")


async def test_tls_handshakes_in_progress_count_against_the_address_limit(
    tls_files: tuple[str, str],
) -> None:
    server_pem, ca_pem = tls_files
    context = server_context(server_pem)
    # A long handshake timeout: the silent sockets would be held that long.
    tls_limits = limits(max_connections_per_address=2, handshake_timeout=60.0)
    server = libchat.Server("127.0.0.1", 0, ssl=context, limits=tls_limits)
    await server.start()
    try:
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await wait_until(lambda: server._per_address.get("127.0.0.1") == 2)
        # The third is refused at once, without waiting for its ClientHello.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        with pytest.raises(ConnectionClosed):
            await connect(server, "alice", ssl=client_context(cafile=ca_pem))
        for _, silent_writer in silent:
            silent_writer.close()
        # Their slots are freed as the handshakes fail.
        await wait_until(lambda: not server._per_address)
        alice = await connect(server, "alice", ssl=client_context(cafile=ca_pem))
        bob = await connect(server, "bob", ssl=client_context(cafile=ca_pem))
        await still_chatting(alice, bob)
        await bob.quit()
        await wait_until(lambda: server._per_address.get("127.0.0.1") == 1)
        # A handshake in progress does not hold the shutdown up.
        await asyncio.open_connection("127.0.0.1", server.port)
        await wait_until(lambda: len(server._upgrades) == 1)
        await asyncio.wait_for(server.close(timeout=30.0), WAIT)
        await asyncio.wait_for(alice.wait_closed(), WAIT)
    finally:
        await server.close()


async def test_a_tls_handshake_timeout_frees_the_slot(tls_files: tuple[str, str]) -> None:
    server_pem, ca_pem = tls_files
    tls_limits = limits(max_connections_per_address=1, handshake_timeout=0.3)
    async with chat_server(ssl=server_context(server_pem), limits=tls_limits) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # dropped after 0.3 s
        writer.close()
        await wait_until(lambda: not server._per_address)
        alice = await connect(server, "alice", ssl=client_context(cafile=ca_pem))
        assert alice.welcome["user"] == "alice"
        await alice.quit()


class FakeTransport(asyncio.Transport):
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default


async def test_a_listener_hears_of_frames_that_arrived_before_it() -> None:
    # With TLS 1.3 a client may send its hello in the packet that ends the
    # handshake: it reaches the connection before the session listens, and
    # must not wait for the handshake timeout to be noticed.
    conn = ServerConnection(lambda conn: None)
    conn.connection_made(FakeTransport())
    data = encode_frame({"type": "ping"})
    conn.get_buffer(len(data))[: len(data)] = data
    conn.buffer_updated(len(data))
    woken: list[bool] = []
    conn.set_listener(lambda: woken.append(True))
    assert woken == [True]
    frame = conn.next_frame()
    assert frame is not None and frame.type == "ping"
