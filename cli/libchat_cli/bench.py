"""``chat bench``: load-test a running chat server, as redis-benchmark does Redis.

N clients join one room; S of them send M messages each, as fast as the
server takes them or at R messages a second in all. Every message text
starts with a stamp ``BNCH<run>|<sender>|<seq>|<send time, ns>|`` (padded to
the asked size), so each receiver can count what was lost, doubled or out of
order, and time every delivery, without decoding whole frames: received bytes
are scanned for stamps with one compiled regex, which keeps the generator
cheap enough not to be the bottleneck it measures (its own CPU use is
reported beside the figures, so nobody mistakes one for the other).

"As fast as the server takes them" is flow-controlled: a sender stops while
more than ``window`` of its messages are on their way to the receivers,
because a server that drops a client whose send queue overflows (libchat,
ngircd) would otherwise be flooded into dropping the generator's receivers
whenever the generator reads slower than the server writes.

Connections are raw asyncio protocols driven by an :class:`Adapter` that
knows one server's wire format: :class:`LibchatAdapter` (libchat.protocol)
here; ``benchmarks/`` adds IRC and line-based ones. With ``--processes`` the
clients are spread over several processes (receivers read in parallel);
they meet at a start line after connecting, and share progress counters
(shared memory) so a sender's window counts receivers in every process.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import resource
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection as Pipe
from typing import Any, Protocol

import click

import libchat
from libchat.protocol import MAGIC, PREFIX, PREFIX_SIZE, PROTOCOL_VERSION, encode_frame

#: Senders poll the shared progress counters this often while their window is full.
WINDOW_POLL = 0.0005
#: A stamp cut off at the end of a read is kept for the next; no stamp is longer.
MAX_STAMP = 80
#: Seconds between heartbeats: under any server's keepalive interval (libchat 30 s).
HEARTBEAT = 10.0


class BenchError(click.ClickException):
    """A run that cannot go on (refused, no server...); the message says why
    and, where it can, what to change."""


class Refused(Exception):
    """The server refused or closed a connection during its handshake."""


@dataclass(frozen=True, slots=True)
class Welcome:
    """What a handshake told about the server."""

    end: int  # bytes of the handshake in what was received
    server: str = ""
    limits: dict[str, Any] = field(default_factory=dict)


class Adapter(Protocol):
    """One server kind's wire format, as the load generator needs it."""

    name: str

    def hello(self, user: str, room: str) -> bytes:
        """Bytes a new connection sends to log in and join ``room``."""

    def handshake(self, data: bytes) -> Welcome | None:
        """Look at everything received so far: a Welcome once the client is
        in the room, ``None`` while more is needed; raise Refused if the
        server said no."""

    def message(self, room: str, text: str) -> bytes:
        """Bytes that send ``text`` (ASCII, no quotes) to ``room``."""

    def heartbeat(self) -> bytes | None:
        """Bytes every client sends now and then, so that a server never
        pings it (no chunk then needs scanning for pings); None: nothing."""

    def farewell(self, data: bytes) -> str | None:
        """The reason given if ``data`` (the last bytes received before the
        connection closed) holds the server's goodbye."""

    def advice(self, welcome: Welcome, config: BenchConfig) -> list[str]:
        """Warnings from the announced limits (throttling, message size)."""

    def refusal_hint(self, reason: str) -> str:
        """What the operator should change when connections are refused."""


# -- the libchat wire format ----------------------------------------------------------

_BYE_REASON = re.compile(rb'"type":"bye"[^}]*?"reason":"([^"]*)"')
_PING = encode_frame({"type": "ping"})


class LibchatAdapter:
    """libchat's framing, through libchat.protocol."""

    name = "libchat"

    def hello(self, user: str, room: str) -> bytes:
        return encode_frame(
            {
                "type": "hello",
                "version": PROTOCOL_VERSION,
                "client": f"libchat-bench/{libchat.__version__}",
                "user": user,
                "room": room,
            }
        )

    def handshake(self, data: bytes) -> Welcome | None:
        pos = 0
        while len(data) - pos >= PREFIX_SIZE:
            magic, hlen, blen = PREFIX.unpack_from(data, pos)
            if magic != MAGIC:
                raise Refused(f"not a libchat server (it sent {data[:16]!r}); wrong --port?")
            start, end = pos + PREFIX_SIZE, pos + PREFIX_SIZE + hlen + blen
            if len(data) < end:
                return None
            header = json.loads(data[start : start + hlen])
            kind = header.get("type")
            if kind == "welcome":
                return Welcome(end, str(header.get("server", "")), dict(header.get("limits", {})))
            if kind == "error":
                raise Refused(f"{header.get('code')}: {header.get('message')}")
            if kind == "bye":
                raise Refused(str(header.get("reason", "closed")))
            pos = end
        return None

    def message(self, room: str, text: str) -> bytes:
        header = f'{{"type":"msg","room":{json.dumps(room)},"text":"{text}"}}'.encode()
        return PREFIX.pack(MAGIC, len(header), 0) + header

    def heartbeat(self) -> bytes | None:
        return _PING

    def farewell(self, data: bytes) -> str | None:
        found = _BYE_REASON.search(data)
        return found.group(1).decode(errors="replace") if found else None

    def advice(self, welcome: Welcome, config: BenchConfig) -> list[str]:
        limits, notes = welcome.limits, []
        rate = float(limits.get("rate") or 0)
        per_sender = config.rate / config.senders if config.rate else math.inf
        if rate and per_sender > rate:
            notes.append(
                f"the server allows {rate:g} messages/s per connection (burst "
                f"{limits.get('rate_burst')}), so the senders will be throttled and the "
                "figures will measure the rate limit: start it with --rate-limit 0 for load tests"
            )
        size = int(limits.get("max_message_bytes") or 0)
        if size and config.size > size:
            notes.append(f"the server takes messages of up to {size} bytes: --max-message")
        return notes

    def refusal_hint(self, reason: str) -> str:
        if "too_many_connections" in reason:
            return (
                "the server limits connections (32 per address by default): start it with "
                "--max-per-address 0 (and --max-connections above --clients) for load tests, "
                "or spread clients over loopback addresses with --source"
            )
        return ""


# -- configuration and results --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchConfig:
    host: str = libchat.DEFAULT_HOST
    port: int = libchat.DEFAULT_PORT
    clients: int = 50
    senders: int = 1
    messages: int = 1000
    size: int = 64
    rate: float = 0.0  # messages/s in all; 0: as fast as the server takes them
    room: str = "bench"
    processes: int = 1
    window: int = 0  # messages in flight per sender; 0: chosen from the sizes
    connect_concurrency: int = 64
    connect_timeout: float = 15.0  # for one client's connect and handshake
    sources: tuple[str, ...] = ()
    drain_timeout: float = 5.0
    max_time: float = 300.0
    tag: str = ""

    def effective_window(self) -> int:
        if self.window:
            return self.window
        # About 256 KiB per receiver in flight from all senders together: far
        # below the send queue a server keeps per client (libchat 1 MiB), so a
        # generator that reads late is never cut off for it.
        return max(16, (256 * 1024) // (self.senders * (self.size + 80)))

    def workers_of(self, index: int) -> int:
        return index % self.processes

    def indices(self, worker: int) -> range:
        return range(worker, self.clients, self.processes)

    def receivers(self, worker: int, sender: int) -> int:
        """Clients of ``worker`` that receive ``sender``'s messages."""
        own = len(self.indices(worker))
        return own - (1 if self.workers_of(sender) == worker else 0)


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values (0 if there are none)."""
    if not ordered:
        return 0
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# -- one client -----------------------------------------------------------------------


class BenchClient(asyncio.Protocol):
    """One connection: handshake, then stamps counted as they arrive."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        self.adapter = worker.adapter
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[Welcome] = worker.loop.create_future()
        # once one client fails the run stops; the others' failures need no report
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.received = b""  # during the handshake only
        self.tail = b""
        self.last_data = b""  # kept (not copied) to read a goodbye's reason from
        #: per sender: the next sequence number expected, and gaps not yet filled
        self.next_seq = [0] * worker.config.senders
        self.missing: dict[int, set[int]] = {}
        self.closed_reason: str | None = None
        self._can_write: asyncio.Future[None] | None = None

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = self.worker.config
        transport.write(self.adapter.hello(f"b{config.tag}x{self.index}", config.room))

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self._handshake(data)
            return
        self.last_data = data
        self.worker.scan(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        said = self.adapter.farewell(self.last_data or self.received)
        reason = self.closed_reason or said or (str(exc) if exc else "closed by the server")
        self.closed_reason = reason
        if not self.ready.done():
            self.ready.set_exception(Refused(f"connection closed during the handshake: {reason}"))
        else:
            self.worker.lost_client(self, reason)
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = self.worker.loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    # -- helpers

    def _handshake(self, data: bytes) -> None:
        self.received += data
        try:
            welcome = self.adapter.handshake(self.received)
        except Refused as exc:
            self.ready.set_exception(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        except ValueError as exc:
            self.ready.set_exception(Refused(f"unreadable handshake: {exc}"))
            return
        if welcome is not None:
            rest = self.received[welcome.end :]
            self.received = b""
            self.ready.set_result(welcome)
            if rest:
                self.worker.scan(self, rest)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def writable(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        if self._can_write is not None:
            await self._can_write

    def note_irregular(self, sender: int, seq: int, expected: int) -> None:
        """A stamp other than the next expected one: a gap, a late one, a double."""
        worker = self.worker
        if seq > expected:
            self.missing.setdefault(sender, set()).update(range(expected, seq))
            self.next_seq[sender] = seq + 1
            return
        gaps = self.missing.get(sender)
        if gaps is not None and seq in gaps:
            gaps.discard(seq)
            worker.out_of_order += 1
        else:
            worker.doubled += 1

    def distinct(self, sender: int) -> int:
        return self.next_seq[sender] - len(self.missing.get(sender, ()))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# -- one process's share of the clients ------------------------------------------------


class Control(Protocol):
    async def connected(self, summary: dict[str, Any]) -> bool:
        """Every client is in: wait for the start line; False means stop."""


class Worker:
    """The clients one process drives, and what they counted."""

    def __init__(
        self,
        config: BenchConfig,
        adapter: Adapter,
        worker_id: int,
        progress: Any,
        sent: Any,
    ) -> None:
        self.config = config
        self.adapter = adapter
        self.id = worker_id
        self.loop = asyncio.get_running_loop()
        #: shared memory: deliveries counted per (worker, sender); ``sent[s]`` is how
        #: many messages sender s sent, ``sent[senders + s]`` is 1 once it is done
        self.progress = progress
        self.sent = sent
        self.clients: list[BenchClient] = []
        self.counts = [0] * config.senders
        self.latencies = array.array("q")
        self.deliveries = 0
        self.doubled = 0
        self.out_of_order = 0
        self.first_ns = 0
        self.last_ns = 0
        self.dropped: dict[str, int] = {}
        self.measuring = False
        self.progressed = asyncio.Event()
        self.send_first_ns = 0
        self.send_last_ns = 0
        self.stamp = re.compile(rb"BNCH" + config.tag.encode() + rb"\|(\d+)\|(\d+)\|(\d+)\|")
        self._findall = self.stamp.findall
        self._share = config.processes > 1
        self._base = worker_id * config.senders

    # -- receiving (the hot path)

    def scan(self, client: BenchClient, data: bytes) -> None:
        """Count every complete stamp in ``data``; keep a cut-off one."""
        now = time.monotonic_ns()
        if client.tail:
            data = client.tail + data
        pos = data.rfind(b"BNCH")
        if pos < 0:
            client.tail = data[-3:]
            return
        if self.stamp.match(data, pos) is None and len(data) - pos < MAX_STAMP:
            found = self._findall(data, 0, pos)
            client.tail = data[pos:]
        else:
            found = self._findall(data)
            client.tail = data[-3:]
        if found:
            self._count(client, found, now)

    def _count(
        self, client: BenchClient, found: list[tuple[bytes, bytes, bytes]], now: int
    ) -> None:
        # Whole columns at a time (map runs in C): this is the generator's
        # hot loop, and a Python statement per delivery would halve its speed.
        senders_b, seqs_b, sent_b = zip(*found, strict=True)
        self.latencies.extend(map(now.__sub__, map(int, sent_b)))
        seqs = list(map(int, seqs_b))
        n = len(seqs)
        first = senders_b[0]
        if senders_b.count(first) == n:
            sender = int(first)
            expected = client.next_seq[sender]
            if seqs[-1] == expected + n - 1 and seqs == list(range(expected, expected + n)):
                client.next_seq[sender] = expected + n
                self.counts[sender] += n
            else:
                self._walk(client, [sender] * n, seqs)
        else:
            self._walk(client, list(map(int, senders_b)), seqs)
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        self.deliveries += n
        if self._share:
            progress, base = self.progress, self._base
            for sender, count in enumerate(self.counts):
                progress[base + sender] = count
        self.progressed.set()

    def _walk(self, client: BenchClient, senders: list[int], seqs: list[int]) -> None:
        """One stamp at a time: several senders, or something out of line."""
        next_seq, counts = client.next_seq, self.counts
        for sender, seq in zip(senders, seqs, strict=True):
            counts[sender] += 1
            expected = next_seq[sender]
            if seq == expected:
                next_seq[sender] = seq + 1
            else:
                client.note_irregular(sender, seq, expected)

    def lost_client(self, client: BenchClient, reason: str) -> None:
        if self.measuring:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            self.progressed.set()

    # -- connecting

    async def connect_all(self) -> tuple[list[float], Welcome]:
        config = self.config
        gate = asyncio.Semaphore(config.connect_concurrency)
        welcomes: list[Welcome] = []

        async def one(index: int) -> float:
            async with gate:
                started = time.perf_counter()
                client, welcome = await self._connect(index)
                self.clients.append(client)
                welcomes.append(welcome)
                return time.perf_counter() - started

        tasks = [asyncio.create_task(one(i)) for i in config.indices(self.id)]
        try:
            times = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.clients.sort(key=lambda c: c.index)
        return list(times), welcomes[0]

    async def _connect(self, index: int) -> tuple[BenchClient, Welcome]:
        config = self.config
        sources = config.sources
        local = (sources[index % len(sources)], 0) if sources else None
        client = BenchClient(self, index)
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: client, config.host, config.port, local_addr=local
                ),
                config.connect_timeout,
            )
            welcome = await asyncio.wait_for(client.ready, config.connect_timeout)
        except ConnectionRefusedError:
            raise BenchError(f"nothing listens on {config.host}:{config.port}") from None
        except TimeoutError:
            client.close()
            raise BenchError(
                f"client {index} was not in the room {config.connect_timeout:g} s after "
                "connecting (--connect-timeout)"
            ) from None
        except Refused as exc:
            client.close()
            hint = self.adapter.refusal_hint(str(exc))
            raise BenchError(
                f"the server refused client {index}: {exc}" + (f"\nhint: {hint}" if hint else "")
            ) from None
        except OSError as exc:
            client.close()
            hint = ""
            if exc.errno == 99:  # EADDRNOTAVAIL: out of local ports for this source address
                hint = "\nhint: spread the clients over more source addresses with --source"
            raise BenchError(f"cannot connect client {index}: {exc}{hint}") from None
        return client, welcome

    # -- sending

    def _inflight(self, sender: int, sent: int) -> float:
        """Messages of ``sender`` not yet at the slowest process's receivers
        (per receiver, on average within a process)."""
        config = self.config
        slowest = math.inf
        for worker in range(config.processes):
            receivers = config.receivers(worker, sender)
            if not receivers:
                continue
            if worker == self.id:
                got = self.counts[sender]
            else:
                got = self.progress[worker * config.senders + sender]
            slowest = min(slowest, got / receivers)
        return 0.0 if slowest is math.inf else sent - slowest

    async def send_all(self, client: BenchClient, start_ns: int) -> None:
        config, sender = self.config, client.index
        adapter, room, tag = self.adapter, config.room, config.tag
        window = config.effective_window()
        interval = config.senders / config.rate if config.rate else 0.0
        offset = sender / config.rate if config.rate else 0.0
        deadline = start_ns + int(config.max_time * 1e9)
        for seq in range(config.messages):
            if interval:
                await self._wait_until(start_ns + int((offset + seq * interval) * 1e9))
            while self._inflight(sender, seq) >= window:
                if client.closed_reason is not None or time.monotonic_ns() > deadline:
                    return
                self.progressed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.progressed.wait(), WINDOW_POLL)
            if client.closed_reason is not None:
                return
            now = time.monotonic_ns()
            stamp = f"BNCH{tag}|{sender}|{seq}|{now}|"
            client.write(adapter.message(room, stamp.ljust(config.size, "x")))
            self.sent[sender] = seq + 1
            if not self.send_first_ns:
                self.send_first_ns = now
            self.send_last_ns = now
            await client.writable()

    async def _wait_until(self, when_ns: int) -> None:
        delay = (when_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)

    # -- the whole run

    def _expected(self) -> int:
        """Distinct deliveries this process should see, given what was sent."""
        sent = [self.sent[s] for s in range(self.config.senders)]
        return sum(
            sent[s] for client in self.clients for s in range(len(sent)) if s != client.index
        )

    def _senders_done(self) -> bool:
        senders = self.config.senders
        return all(self.sent[senders + s] for s in range(senders))

    def _distinct(self) -> int:
        return self.deliveries - self.doubled

    async def _drain(self) -> None:
        """Wait until every message sent has arrived, or none for a while."""
        config = self.config
        hard_stop = time.monotonic() + config.max_time
        quiet_since = time.monotonic()
        while time.monotonic() < hard_stop:
            finished = self._senders_done()
            if finished and self._distinct() >= self._expected():
                return
            self.progressed.clear()
            before = self.deliveries
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progressed.wait(), 0.05)
            if self.deliveries != before:
                quiet_since = time.monotonic()
            elif finished and time.monotonic() - quiet_since > config.drain_timeout:
                return

    async def run(self, control: Control) -> dict[str, Any]:
        heartbeats = asyncio.create_task(self._heartbeats())
        try:
            return await self._run(control)
        finally:
            heartbeats.cancel()
            self.close()

    async def _heartbeats(self) -> None:
        beat = self.adapter.heartbeat()
        if beat is None:
            return
        while True:
            await asyncio.sleep(HEARTBEAT)
            for client in list(self.clients):
                if client.closed_reason is None:
                    client.write(beat)

    async def _run(self, control: Control) -> dict[str, Any]:
        started = time.perf_counter()
        times, welcome = await self.connect_all()
        connect_wall = time.perf_counter() - started
        summary = {
            "server": welcome.server,
            "advice": self.adapter.advice(welcome, self.config),
            "connect_wall": connect_wall,
        }
        if not await control.connected(summary):
            return {}
        cpu_before = _cpu_seconds()
        self.measuring = True
        start_ns = time.monotonic_ns()
        senders = [c for c in self.clients if c.index < self.config.senders]
        tasks = [asyncio.create_task(self._send_and_count(c, start_ns)) for c in senders]
        await self._drain()
        self.measuring = False
        cpu = _cpu_seconds() - cpu_before
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return self._result(times, connect_wall, cpu, start_ns)

    async def _send_and_count(self, client: BenchClient, start_ns: int) -> None:
        try:
            await self.send_all(client, start_ns)
        finally:
            # one flag per sender, written by its owner only: no lost update
            # between processes
            self.sent[self.config.senders + client.index] = 1

    def _result(
        self, times: list[float], connect_wall: float, cpu: float, start_ns: int
    ) -> dict[str, Any]:
        senders = self.config.senders
        sent = [self.sent[s] for s in range(senders)]
        lost = sum(
            sent[s] - c.distinct(s) for c in self.clients for s in range(senders) if s != c.index
        )
        return {
            "worker": self.id,
            "connect_times": times,
            "connect_wall": connect_wall,
            "start_ns": start_ns,
            "send_first_ns": self.send_first_ns,
            "send_last_ns": self.send_last_ns,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "sent": sent if self.id == 0 else [],
            "deliveries": self.deliveries,
            "expected": self._expected(),
            "lost": lost,
            "doubled": self.doubled,
            "out_of_order": self.out_of_order,
            "dropped": dict(self.dropped),
            "cpu": cpu,
            "latencies": self.latencies.tobytes(),
        }

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- running workers: in this process, or in several ------------------------------------


class _LocalControl:
    def __init__(self, on_connected: Callable[[dict[str, Any]], None] | None) -> None:
        self.on_connected = on_connected
        self.summary: dict[str, Any] = {}

    async def connected(self, summary: dict[str, Any]) -> bool:
        self.summary = summary
        if self.on_connected is not None:
            # in a thread: the clients must go on reading meanwhile
            await asyncio.get_running_loop().run_in_executor(None, self.on_connected, summary)
        return True


class _PipeControl:
    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    async def connected(self, summary: dict[str, Any]) -> bool:
        self.pipe.send(("connected", summary))
        answer = await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)
        return bool(answer == "go")


def _shared_arrays(config: BenchConfig) -> tuple[Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.RawArray("q", config.processes * config.senders)
    sent = ctx.RawArray("q", 2 * config.senders)
    return progress, sent


def _worker_process(
    config: BenchConfig, adapter: Adapter, worker_id: int, progress: Any, sent: Any, pipe: Pipe
) -> None:
    async def main() -> dict[str, Any]:
        worker = Worker(config, adapter, worker_id, progress, sent)
        return await worker.run(_PipeControl(pipe))

    try:
        pipe.send(("result", asyncio.run(main())))
    except click.ClickException as exc:
        pipe.send(("error", exc.message))
    except Exception as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


def run_bench(
    config: BenchConfig,
    adapter: Adapter | None = None,
    *,
    on_connected: Callable[[dict[str, Any]], None] | None = None,
) -> BenchResult:
    """Run one benchmark and return what it measured. ``on_connected`` is
    called once every client is in the room, before the first message."""
    adapter = adapter or LibchatAdapter()
    if not config.tag:
        config = _with_tag(config)
    progress, sent = _shared_arrays(config)
    if config.processes == 1:
        control = _LocalControl(on_connected)

        async def main() -> dict[str, Any]:
            worker = Worker(config, adapter, 0, progress, sent)
            return await worker.run(control)

        parts = [asyncio.run(main())]
        summary = control.summary
    else:
        parts, summary = _run_processes(config, adapter, progress, sent, on_connected)
    return BenchResult.merge(config, adapter.name, summary, parts)


def _with_tag(config: BenchConfig) -> BenchConfig:
    return replace(config, tag=os.urandom(2).hex())


def _run_processes(
    config: BenchConfig,
    adapter: Adapter,
    progress: Any,
    sent: Any,
    on_connected: Callable[[dict[str, Any]], None] | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for worker_id in range(config.processes):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_process,
            args=(config, adapter, worker_id, progress, sent, theirs),
            daemon=True,
        )
        proc.start()
        theirs.close()
        pipes.append(ours)
        procs.append(proc)
    try:
        summaries = _collect(pipes, "connected", config.max_time)
        summary = dict(summaries[0])
        summary["connect_wall"] = max(s["connect_wall"] for s in summaries)
        if on_connected is not None:
            on_connected(summary)
        for pipe in pipes:
            pipe.send("go")
        parts = _collect(pipes, "result", config.max_time + 60)
        return parts, summary
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _collect(pipes: list[Pipe], kind: str, timeout: float) -> list[dict[str, Any]]:
    """One ``kind`` message from every worker; the first error stops the run."""
    deadline = time.monotonic() + timeout
    out: list[dict[str, Any]] = []
    for pipe in pipes:
        left = deadline - time.monotonic()
        if left <= 0 or not pipe.poll(left):
            raise BenchError(f"a generator process gave no {kind!r} report in time")
        try:
            what, payload = pipe.recv()
        except EOFError:
            raise BenchError("a generator process died") from None
        if what == "error":
            raise BenchError(str(payload))
        out.append(payload)
    return out


# -- results ----------------------------------------------------------------------------


@dataclass
class BenchResult:
    config: BenchConfig
    kind: str
    server: str
    advice: list[str]
    connect_wall: float
    connect_p50: float
    connect_p99: float
    sent: int
    send_seconds: float
    deliveries: int
    expected: int
    seconds: float
    lost: int
    doubled: int
    out_of_order: int
    dropped: dict[str, int]
    latency_ms: dict[str, float]
    generator_cpu: float
    generator_wall: float

    @property
    def clean(self) -> bool:
        """Nothing lost, doubled, reordered, or cut off."""
        return not (self.lost or self.doubled or self.out_of_order or self.dropped)

    @property
    def deliveries_per_second(self) -> float:
        return self.deliveries / self.seconds if self.seconds > 0 else 0.0

    @property
    def sent_per_second(self) -> float:
        return self.sent / self.send_seconds if self.send_seconds > 0 else 0.0

    @property
    def generator_load(self) -> float:
        """Generator CPU as a fraction of one core over the measured time."""
        return self.generator_cpu / self.generator_wall if self.generator_wall > 0 else 0.0

    @classmethod
    def merge(
        cls, config: BenchConfig, kind: str, summary: dict[str, Any], parts: list[dict[str, Any]]
    ) -> BenchResult:
        sent = sum(parts[0]["sent"])
        connect = sorted(t for p in parts for t in p["connect_times"])
        start = min(p["start_ns"] for p in parts)
        first_send = min((p["send_first_ns"] for p in parts if p["send_first_ns"]), default=start)
        last_send = max(p["send_last_ns"] for p in parts)
        last = max(p["last_ns"] for p in parts)
        latencies = array.array("q")
        for p in parts:
            latencies.frombytes(p["latencies"])
        ordered = sorted(latencies)
        dropped: dict[str, int] = {}
        for p in parts:
            for reason, count in p["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + count
        end = max(last, last_send)
        return cls(
            config=config,
            kind=kind,
            server=str(summary.get("server", "")),
            advice=list(summary.get("advice", [])),
            connect_wall=float(summary.get("connect_wall", 0.0)),
            connect_p50=percentile(connect, 50),
            connect_p99=percentile(connect, 99),
            sent=sent,
            send_seconds=(last_send - first_send) / 1e9,
            deliveries=sum(p["deliveries"] for p in parts),
            expected=sum(p["expected"] for p in parts),
            seconds=(last - first_send) / 1e9 if last else 0.0,
            lost=sum(p["lost"] for p in parts),
            doubled=sum(p["doubled"] for p in parts),
            out_of_order=sum(p["out_of_order"] for p in parts),
            dropped=dropped,
            latency_ms={
                name: percentile(ordered, pct) / 1e6
                for name, pct in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
            },
            generator_cpu=sum(p["cpu"] for p in parts),
            generator_wall=(end - start) / 1e9,
        )

    def warnings(self) -> list[str]:
        notes = list(self.advice)
        if self.dropped:
            reasons = ", ".join(f"{n} x {r!r}" for r, n in self.dropped.items())
            notes.append(
                f"the server disconnected clients during the run ({reasons}); if it cut "
                "slow readers, the generator fell behind: try --processes or a smaller --window"
            )
        cores = self.config.processes
        if self.generator_load > 0.9 * cores:
            notes.append(
                f"the generator used {self.generator_load:.0%} of a core per process: it may be "
                "the bottleneck, so these figures are a lower bound of what the server can do"
            )
        return notes

    def as_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "server": self.server,
            "kind": self.kind,
            "host": c.host,
            "port": c.port,
            "clients": c.clients,
            "senders": c.senders,
            "messages": c.messages,
            "size": c.size,
            "rate": c.rate,
            "processes": c.processes,
            "window": c.effective_window(),
            "connect_seconds": round(self.connect_wall, 4),
            "connect_p50_ms": round(self.connect_p50 * 1e3, 3),
            "connect_p99_ms": round(self.connect_p99 * 1e3, 3),
            "sent": self.sent,
            "sent_per_second": round(self.sent_per_second, 1),
            "deliveries": self.deliveries,
            "expected": self.expected,
            "seconds": round(self.seconds, 4),
            "deliveries_per_second": round(self.deliveries_per_second, 1),
            "lost": self.lost,
            "doubled": self.doubled,
            "out_of_order": self.out_of_order,
            "disconnected": self.dropped,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "generator_cpu_seconds": round(self.generator_cpu, 3),
            "generator_wall_seconds": round(self.generator_wall, 3),
            "generator_cpu_per_core": round(self.generator_load / c.processes, 3),
            "warnings": self.warnings(),
        }

    def report(self) -> str:
        c = self.config
        pace = f"{c.rate:g} messages/s in all" if c.rate else "as fast as the server takes them"
        lat = self.latency_ms
        lines = [
            f"{c.clients} clients in room {c.room!r}; {c.senders} sending {c.messages} messages "
            f"of {c.size} bytes each, {pace}",
            f"server      {self.server or self.kind} at {c.host}:{c.port}",
            f"connect     {c.clients} clients in {self.connect_wall:.2f} s "
            f"(each: p50 {self.connect_p50 * 1e3:.1f} ms, p99 {self.connect_p99 * 1e3:.1f} ms)",
            f"sent        {self.sent:,} messages in {self.send_seconds:.2f} s "
            f"({self.sent_per_second:,.0f}/s)",
            f"delivered   {self.deliveries:,} of {self.expected:,} in {self.seconds:.2f} s: "
            f"{self.deliveries_per_second:,.0f} deliveries/s",
            f"lost {self.lost}, doubled {self.doubled}, out of order {self.out_of_order}, "
            f"disconnected {sum(self.dropped.values())}",
            f"latency     p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, "
            f"p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms",
            f"generator   {self.generator_cpu:.2f} s CPU in {self.generator_wall:.2f} s "
            f"({self.generator_load:.0%} of one core; {c.processes} process"
            f"{'es' if c.processes > 1 else ''})",
        ]
        return "\n".join(lines)


# -- the command ------------------------------------------------------------------------


def _sources(value: str) -> tuple[str, ...]:
    """``127.0.0.1,127.0.0.2`` or ``8`` (127.0.0.1 to 127.0.0.8)."""
    value = value.strip()
    if not value:
        return ()
    if value.isdigit():
        return tuple(f"127.0.0.{i}" for i in range(1, min(int(value), 254) + 1))
    return tuple(v.strip() for v in value.split(",") if v.strip())


@click.command()
@click.option("--host", "-h", default=libchat.DEFAULT_HOST, show_default=True, envvar="CHAT_HOST")
@click.option(
    "--port",
    "-p",
    type=click.IntRange(1, 65535),
    default=libchat.DEFAULT_PORT,
    show_default=True,
    envvar="CHAT_PORT",
)
@click.option("--clients", "-n", type=click.IntRange(2), default=50, show_default=True,
              help="Clients in the room.")  # fmt: skip
@click.option("--senders", "-s", type=click.IntRange(1), default=1, show_default=True,
              help="How many of them send.")  # fmt: skip
@click.option("--messages", "-m", type=click.IntRange(1), default=1000, show_default=True,
              help="Messages each sender sends.")  # fmt: skip
@click.option("--size", "-b", type=click.IntRange(1, 60000), default=64, show_default=True,
              help="Bytes of text per message (at least its ~35-byte stamp).")  # fmt: skip
@click.option("--rate", "-r", type=click.FloatRange(0), default=0.0,
              help="Messages per second in all. Default: as fast as the server takes "
              "them.")  # fmt: skip
@click.option("--room", default="bench", show_default=True)
@click.option("--processes", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Generator processes the clients are spread over.")  # fmt: skip
@click.option("--window", type=click.IntRange(0), default=0,
              help="Messages one sender may have in flight. Default: ~256 KiB in all.")  # fmt: skip
@click.option("--source", "sources", default="", metavar="ADDRS|N",
              help="Local addresses to connect from, comma-separated, or N for "
              "127.0.0.1..127.0.0.N (more connections than one address has ports).")  # fmt: skip
@click.option("--drain-timeout", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds without a delivery, after the last send, before the rest "
              "counts as lost.")  # fmt: skip
@click.option("--connect-timeout", type=click.FloatRange(0.1), default=15.0, show_default=True,
              help="Seconds one client may take to connect and join.")  # fmt: skip
@click.option("--connect-concurrency", type=click.IntRange(1), default=64, show_default=True,
              help="Clients connecting at once, per process.")  # fmt: skip
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON object.")
def bench(
    host: str,
    port: int,
    clients: int,
    senders: int,
    messages: int,
    size: int,
    rate: float,
    room: str,
    processes: int,
    window: int,
    sources: str,
    drain_timeout: float,
    connect_timeout: float,
    connect_concurrency: int,
    json_mode: bool,
) -> None:
    """Load-test a running server: deliveries per second, loss, order, latency.

    For load tests start the server without its abuse limits, or they are what
    gets measured: chat serve --max-per-address 0 --rate-limit 0

    Exit status 1 if a message was lost, doubled or out of order, or the
    server cut a client off.
    """
    if senders > clients:
        raise click.BadParameter("more senders than clients", param_hint="--senders")
    config = BenchConfig(
        host=host,
        port=port,
        clients=clients,
        senders=senders,
        messages=messages,
        size=size,
        rate=rate,
        room=room,
        processes=min(processes, clients),
        window=window,
        sources=_sources(sources),
        drain_timeout=drain_timeout,
        connect_timeout=connect_timeout,
        connect_concurrency=connect_concurrency,
    )

    def announce(summary: dict[str, Any]) -> None:
        for note in summary.get("advice", []):
            click.echo(f"hint: {note}", err=True)

    result = run_bench(config, on_connected=announce)
    if json_mode:
        click.echo(json.dumps(result.as_dict()))
    else:
        click.echo(result.report())
        for note in result.warnings():
            if note not in result.advice:
                click.echo(f"hint: {note}", err=True)
    if not result.clean:
        raise SystemExit(1)
