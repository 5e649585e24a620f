"""Framed connections over asyncio, TCP or TLS: one for each side.

:class:`Connection` wraps a StreamReader and StreamWriter; the client uses
it. :class:`ServerConnection` is an :class:`asyncio.BufferedProtocol`: the
server holds thousands of mostly idle connections, and a protocol costs no
StreamReader, StreamWriter or reader task per connection (a bare protocol
server measured 2.3 KiB per idle connection here, a streams one 5.2 KiB).
It keeps the bytes that arrive and tells its listener (the session) when a
whole frame is in; the session takes frames one at a time with
:meth:`ServerConnection.next_frame`, which decodes each as it is taken.
With TLS, the server admits a connection on TCP accept and then upgrades it
(:meth:`ServerConnection.start_tls`), so handshakes in progress count
against the connection limits.

Writing is the same on both sides and is coalesced: frames sent during one
loop iteration go out in a single ``write`` per connection at the end of it,
instead of one syscall per frame (measured 20-35x cheaper under broadcast).
One callback (a :class:`FlushQueue`) flushes every connection that has
something to send, rather than one callback per connection. The send queue
is bounded: a peer that stops reading is cut off once ``max_send_queue``
bytes wait for it, so it can never make the server buffer without end.

Closing is a "lingering close", as HTTP servers do it: queued frames go out,
then our side of the stream ends (FIN) and whatever the peer still sends is
read and thrown away for a moment. Closing a socket with unread input makes
the kernel send a reset, which can destroy the error frame that explains the
close before the peer reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable
from typing import Any, Protocol, cast

from .errors import ConnectionClosed, ProtocolError
from .protocol import Frame, FrameDecoder, encode_frame

log = logging.getLogger("libchat.connection")

#: Most bytes :class:`ServerConnection` reads at once: as much as asyncio's
#: own socket transport reads per call, so bulk data (file chunks) costs no
#: more reads than it would through a StreamReader.
READ_SIZE = 256 * 1024
#: Undecoded bytes :class:`ServerConnection` holds, whole frames among them,
#: before it stops reading and TCP pushes back; it reads on once the frames
#: taken bring them under half of this. Reading ahead keeps a bulk sender
#: (file chunks) busy while its last chunk waits for the recipient. Frames
#: stay bytes until the session takes them, one at a time: decoded, a
#: 24-byte frame costs some 370 bytes of objects, so a backlog of decoded
#: frames would cost 15 times its size.
READ_AHEAD = 4 * READ_SIZE
#: Most bytes :class:`Connection` takes from its StreamReader at once.
STREAM_READ_SIZE = 64 * 1024
#: Longest a close waits for the peer to finish sending (its input is discarded).
LINGER = 1.0


class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def set_nodelay(writer: _HasExtraInfo) -> None:
    """Turn Nagle off: chat is many small writes that must leave at once.
    ``writer`` is a StreamWriter or a transport."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def peer_name(writer: _HasExtraInfo) -> str:
    """``host:port`` of the other end, for logs."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer or "unknown")


#: The prefix an IPv6 host is counted by: a site gets a /64 at least, so one
#: machine may hold every address in one.
IPV6_PREFIX = 64


def address_key(host: str) -> str:
    """The key that per-address limits count ``host`` (an IP address, as a
    socket gives it) under: an IPv4 address itself; for IPv6, its /64
    network (``2001:db8:1:2::/64``), as one machine may use every address
    in it; an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) as the IPv4
    address it is. Anything else (a Unix socket path) is its own key."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # no zone (fe80::1%eth0)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def _host_of(writer: _HasExtraInfo) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


class FlushQueue:
    """The connections with frames waiting, flushed together by one
    callback at the end of the loop iteration in which the first was queued.

    A broadcast to a room of N makes N connections dirty; one ``call_soon``
    for all of them costs less than N handles, and each connection still
    gets exactly one ``write`` for everything queued to it meanwhile."""

    __slots__ = ("_dirty", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[BaseConnection] = []
        self._handle: asyncio.Handle | None = None

    def add(self, conn: BaseConnection) -> None:
        self._dirty.append(conn)
        if self._handle is None:
            self._handle = self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._handle = None
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            # A connection flushed early (drain, close) may be listed twice;
            # its second flush finds nothing to send.
            try:
                conn._flush()
            except Exception:  # a bug; it must not cost the others their data
                log.exception("flushing %s failed", conn.peer)
                conn.abort("internal error")


class BaseConnection:
    """What both kinds of connection share: bounded, coalesced writing and
    abort. Subclasses add reading, draining and closing."""

    __slots__ = (
        "_buffered",
        "_flusher",
        "_loop",
        "_pending",
        "_pending_size",
        "aborted",
        "address",
        "close_reason",
        "closed",
        "decoder",
        "last_received",
        "linger",
        "max_send_queue",
        "peak_queued",
        "peer",
        "transport",
    )

    transport: asyncio.Transport

    def __init__(
        self,
        *,
        max_frame_size: int | None,
        max_send_queue: int | None,
        linger: float,
        flusher: FlushQueue | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._flusher = flusher or FlushQueue(self._loop)
        self.decoder = FrameDecoder(max_frame_size=max_frame_size)
        self.max_send_queue = max_send_queue
        #: seconds :meth:`close` lets the peer finish sending; 0: no lingering
        self.linger = linger
        #: ``host:port`` of the peer, in full (logs)
        self.peer = "unknown"
        #: what per-address limits count the peer under (:func:`address_key`)
        self.address = "unknown"
        self._pending: list[bytes] = []
        self._pending_size = 0
        #: the transport's buffer as of our last write. It only grows through
        #: our writes (which refresh this), so between them it can only
        #: overstate: reading the real size on every frame is not needed.
        self._buffered = 0
        #: loop time of the last sign of life from the peer (keepalive)
        self.last_received = self._loop.time()
        #: the most bytes ever waiting for this peer at once
        self.peak_queued = 0
        self.closed = False
        #: closed by :meth:`abort` (cut off), not by :meth:`close`
        self.aborted = False
        self.close_reason = ""

    def _set_transport(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.peer = peer_name(transport)
        self.address = address_key(_host_of(transport))
        set_nodelay(transport)

    # -- writing ----------------------------------------------------------------------

    def queued(self) -> int:
        """Bytes waiting to go to the peer: ours plus the transport's."""
        return self._pending_size + self.transport.get_write_buffer_size()

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.send_bytes(encode_frame(header, body))

    def send_bytes(self, data: bytes) -> bool:
        """Queue encoded frame bytes; they leave at the end of this loop
        iteration together with anything else queued meanwhile. Never blocks.

        Once more than ``max_send_queue`` bytes wait for the peer, the next
        frame aborts the connection instead ("send queue exceeded"): no more
        than the limit plus one frame ever waits, and a peer that keeps up is
        never dropped for one frame larger than the limit. Returns whether
        the frame was queued (False: the connection is closed, or this frame
        closed it)."""
        # The hot path of every broadcast: one call per member per message.
        if self.closed:
            return False
        waiting = self._pending_size + self._buffered
        limit = self.max_send_queue
        if limit and waiting > limit:
            # The cached transport figure may be stale (too high): look again.
            self._buffered = self.transport.get_write_buffer_size()
            waiting = self._pending_size + self._buffered
            if waiting > limit:
                self.abort("send queue exceeded")
                return False
        pending = self._pending
        if not pending:
            self._flusher.add(self)
        pending.append(data)
        self._pending_size += len(data)
        if self._pending_size + self._buffered > self.peak_queued:
            self._new_peak()
        return True

    def _new_peak(self) -> None:
        """Record a new high of bytes waiting, measured, not estimated (rare:
        the peak only grows)."""
        self._buffered = self.transport.get_write_buffer_size()
        queued = self._pending_size + self._buffered
        if queued > self.peak_queued:
            self.peak_queued = queued

    def _flush(self) -> None:
        """Write everything queued, in one call."""
        pending = self._pending
        if not pending or self.closed:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pending_size = 0
        transport = self.transport
        if transport.is_closing():
            return  # lost already; the session will see it
        try:
            transport.write(data)
        except Exception:  # a broken transport; one peer's, never the others'
            log.debug("write to %s failed", self.peer, exc_info=True)
            self.abort("connection lost")
            return
        self._buffered = transport.get_write_buffer_size()

    def abort(self, reason: str) -> None:
        """Cut the connection now, dropping anything queued."""
        if self.closed:
            return
        self.closed = True
        self.aborted = True
        self.close_reason = reason
        self._pending.clear()
        self._pending_size = 0
        self.transport.abort()
        self._aborted()

    def _aborted(self) -> None:
        """Hook for subclasses: the connection was just cut."""

    # -- what each kind of connection implements -----------------------------------------

    async def recv(self) -> Frame:
        """The next frame; raises ConnectionClosed at end of stream and
        ProtocolError on bad bytes."""
        raise NotImplementedError

    async def drain(self) -> None:
        """Send what is queued and wait until the transport's buffer is
        below its high-water mark (backpressure for bulk data)."""
        raise NotImplementedError

    async def close(self, reason: str = "", *, timeout: float = 2.0) -> None:
        """Send what is queued, end our side, let the peer finish, then
        close; cut the connection if that takes over ``timeout`` seconds.
        Idempotent."""
        raise NotImplementedError


class Connection(BaseConnection):
    """One framed, bounded connection over a StreamReader and StreamWriter."""

    __slots__ = ("_reading", "reader", "writer")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_size: int | None = 1 << 20,
        max_send_queue: int | None = None,
        linger: float = LINGER,
        flusher: FlushQueue | None = None,
    ) -> None:
        super().__init__(
            max_frame_size=max_frame_size,
            max_send_queue=max_send_queue,
            linger=linger,
            flusher=flusher,
        )
        self.reader = reader
        self.writer = writer
        self._reading = False
        self._set_transport(cast(asyncio.Transport, writer.transport))

    # -- reading ----------------------------------------------------------------------

    async def recv(self) -> Frame:
        """The next frame; raises ConnectionClosed at end of stream and
        ProtocolError on bad bytes."""
        decoder = self.decoder
        while True:
            if self.closed:
                # A dropped peer is done: frames it sent before are not acted
                # on, and close() may be reading (lingering) itself.
                raise ConnectionClosed(self.close_reason or "connection closed")
            frame = decoder.next_frame()
            if frame is not None:
                break
            self._reading = True
            try:
                data = await self.reader.read(STREAM_READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise ConnectionClosed(f"connection lost: {exc}") from None
            finally:
                self._reading = False
            if not data:
                if decoder.buffered:
                    raise ConnectionClosed("connection closed in the middle of a frame")
                raise ConnectionClosed(self.close_reason or "connection closed by peer")
            decoder.receive_data(data)
        # Stamped per frame, not per read: while we still work through a
        # backlog (slowed by the rate limit), the peer's answer to a ping
        # waits behind it, so the peer is not silent.
        self.last_received = self._loop.time()
        return frame

    # -- draining and closing ------------------------------------------------------------

    async def drain(self) -> None:
        """Send what is queued and wait until the transport's buffer is
        below its high-water mark (backpressure for bulk data)."""
        self._flush()
        if self.closed:
            raise ConnectionClosed(self.close_reason or "connection closed")
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(f"connection lost: {exc}") from None

    async def close(self, reason: str = "", *, timeout: float = 2.0) -> None:
        """Send what is queued, end our side, let the peer finish, then
        close; cut the connection if that takes over ``timeout`` seconds.
        Idempotent."""
        if self.closed:
            return
        self._flush()
        self.closed = True
        self.close_reason = self.close_reason or reason
        deadline = self._loop.time() + timeout
        try:
            with contextlib.suppress(Exception):  # the peer may be gone already
                await self._linger(min(timeout, self.linger))
            with contextlib.suppress(Exception):
                self.writer.close()
            left = max(deadline - self._loop.time(), 0)
            try:
                await asyncio.wait_for(self.writer.wait_closed(), left)
            except Exception:  # timeout, connection or ssl errors on a broken peer
                self.transport.abort()
        except asyncio.CancelledError:
            self.transport.abort()  # never leave the socket open behind us
            raise

    async def _linger(self, timeout: float) -> None:
        """Half-close, then discard input until the peer closes too (or
        ``timeout``). Skipped where it cannot work: TLS has no half-close,
        and a task blocked in :meth:`recv` owns the reader (it will see the
        peer's close itself)."""
        transport = self.transport
        if timeout <= 0 or self._reading or transport.is_closing():
            return
        if not transport.can_write_eof():  # TLS
            return
        transport.write_eof()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._discard_input(), timeout)

    async def _discard_input(self) -> None:
        while await self.reader.read(STREAM_READ_SIZE):
            pass


class ServerConnection(BaseConnection, asyncio.BufferedProtocol):
    """The server's side of one connection, as an asyncio protocol.

    Bytes are kept as they arrive; the listener set with
    :meth:`set_listener` is called when there is something to take with
    :meth:`next_frame` (a whole frame, or the end: bad bytes, end of stream,
    a lost or closed connection), which decodes one frame at a time. Without
    a listener, :meth:`recv` waits for them.

    Input is read in chunks of at most :data:`READ_SIZE` bytes into one
    buffer shared by all the connections of a server (the loop reads one
    socket at a time), and each frame's declared length is checked before
    more than a read's worth of it is kept. Reading pauses once
    :data:`READ_AHEAD` undecoded bytes wait with a whole frame among them,
    so a peer whose requests take time (rate limit, backpressure from a file
    recipient, a handler that waits) is read little further than it is
    handled, and TCP pushes back on it. What one connection holds is then
    bounded in bytes: at most ``READ_AHEAD + READ_SIZE``, or one frame of
    ``max_frame_size`` still coming in plus a read.

    ``reader`` is ``None`` here (there is no StreamReader); ``writer`` is a
    StreamWriter over this connection's transport, made on first use.
    """

    __slots__ = (
        "_closed_waiter",
        "_drain_waiter",
        "_end",
        "_eof",
        "_error",
        "_listener",
        "_lost",
        "_on_open",
        "_paused",
        "_read_buffer",
        "_recv_waiter",
        "_write_paused",
        "_writer",
    )

    def __init__(
        self,
        on_open: Callable[[ServerConnection], None],
        *,
        read_buffer: memoryview | None = None,
        max_frame_size: int | None = 1 << 20,
        max_send_queue: int | None = None,
        linger: float = LINGER,
        flusher: FlushQueue | None = None,
    ) -> None:
        super().__init__(
            max_frame_size=max_frame_size,
            max_send_queue=max_send_queue,
            linger=linger,
            flusher=flusher,
        )
        self._on_open = on_open
        self._read_buffer = read_buffer if read_buffer is not None else new_read_buffer()
        self._listener: Callable[[], None] | None = None
        self._recv_waiter: asyncio.Future[None] | None = None
        #: what ends the input once the frames before it are taken
        self._end: ConnectionClosed | None = None
        #: where the peer's bytes stopped making sense (raised from then on)
        self._error: ProtocolError | None = None
        self._eof = False
        self._lost = False
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed_waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def reader(self) -> None:
        """No StreamReader: the protocol decodes what the transport reads."""
        return None

    @property
    def writer(self) -> asyncio.StreamWriter:
        """A StreamWriter over the transport (``get_extra_info``, ``drain``,
        ``wait_closed`` ...), made on first use. Frames go through
        :meth:`send`; bytes written here bypass the send queue's accounting."""
        if self._writer is None:
            self._writer = asyncio.StreamWriter(self.transport, self, None, self._loop)
        return self._writer

    async def start_tls(self, context: ssl_module.SSLContext, *, timeout: float | None) -> None:
        """Turn this new connection into the server side of a TLS one; the
        server calls it once it has admitted the peer, with reading paused
        since :meth:`connection_made`. Raises ConnectionClosed (the socket
        then closes) when the handshake fails or takes over ``timeout``
        seconds."""
        try:
            transport = await self._loop.start_tls(
                self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
            )
        except Exception as exc:  # OSError, ssl.SSLError, the handshake timeout
            # start_tls has closed the socket already.
            raise ConnectionClosed(f"TLS handshake failed: {exc or type(exc).__name__}") from None
        if transport is None:  # the loop closed meanwhile
            raise ConnectionClosed("TLS handshake failed: connection closed")
        self._set_transport(transport)

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener`` (soon after, not within, a send) whenever
        :meth:`next_frame` has something new to give; at once if it has
        already (bytes that came with the end of a TLS handshake)."""
        self._listener = listener
        if listener is not None and (self.decoder.ready() or self._end is not None or self.closed):
            listener()

    # -- asyncio.BufferedProtocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._set_transport(cast(asyncio.Transport, transport))
        try:
            self._on_open(self)
        except Exception:
            log.exception("setting up the connection from %s failed", self.peer)
            self.abort("internal error")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed or self._end is not None or self._error is not None:
            return  # lingering, or the input already ended: discard
        decoder = self.decoder
        # The decoder copies what it keeps (a bytearray ``+=``): hand it a
        # view of the shared buffer rather than another copy.
        decoder.receive_data(cast(bytes, self._read_buffer[:nbytes]))
        if decoder.ready():
            if decoder.buffered >= READ_AHEAD:
                # Whoever takes the frames is behind: stop reading until it
                # catches up. (Without a whole frame waiting, reading on is
                # the only way forward; the declared size bounds it.)
                self._pause()
            self._notify()

    def eof_received(self) -> bool:
        self._eof = True
        if self.closed:
            return False  # lingering: the peer is done too, close the transport
        # Whether it ended in the middle of a frame is known once the whole
        # frames before are taken (next_frame).
        self._end_input(ConnectionClosed(self.close_reason or "connection closed by peer"))
        # Keep our side open, so a goodbye may still go out; TLS cannot (and
        # asyncio warns when asked to).
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None:
            self._end_input(ConnectionClosed(f"connection lost: {exc}"))
        else:
            self._end_input(ConnectionClosed(self.close_reason or "connection closed"))
        self._pending.clear()
        self._pending_size = 0
        self._wake_writers(ConnectionClosed(self.close_reason or "connection lost"))
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers(None)

    # -- reading ------------------------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """The next frame received, or ``None`` if there is none yet. Raises
        ConnectionClosed once the connection is closed (frames not taken by
        then are dropped) or the peer's input has ended, and ProtocolError
        where its bytes stopped making sense."""
        if self.closed:
            raise ConnectionClosed(self.close_reason or "connection closed")
        if self._error is not None:
            raise self._error
        decoder = self.decoder
        try:
            frame = decoder.next_frame()
        except ProtocolError as exc:
            self._error = exc
            if not self._lost:
                self._pause()  # the rest of the stream is not worth reading
            raise
        if frame is not None:
            # Stamped per frame taken, not per read: while we still work
            # through a backlog (slowed by the rate limit), the peer's answer
            # to a ping waits behind it, so the peer is not silent.
            self.last_received = self._loop.time()
            if self._paused and self._end is None and decoder.buffered < READ_AHEAD // 2:
                self._resume()
            return frame
        end = self._end
        if end is not None:
            if self._eof and decoder.buffered:
                raise ConnectionClosed("connection closed in the middle of a frame")
            raise end
        if self._paused:
            self._resume()
        return None

    def backlog(self) -> int:
        """Bytes received from the peer and not yet taken as frames."""
        return self.decoder.buffered

    async def recv(self) -> Frame:
        """The next frame (for use without a listener); raises as
        :meth:`next_frame` does."""
        while True:
            frame = self.next_frame()
            if frame is not None:
                return frame
            waiter = self._recv_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None

    def _end_input(self, end: ConnectionClosed) -> None:
        if self._end is None:
            self._end = end
            if not self._lost:
                self._pause()
        self._notify()

    def _pause(self) -> None:
        if not self._paused and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        self._paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def _notify(self) -> None:
        if self._listener is not None:
            self._listener()
        elif self._recv_waiter is not None and not self._recv_waiter.done():
            self._recv_waiter.set_result(None)

    def _aborted(self) -> None:
        self._notify()

    # -- draining -----------------------------------------------------------------------

    async def drain(self) -> None:
        """Send what is queued and wait until the transport's buffer is
        below its high-water mark (backpressure for bulk data)."""
        self._flush()
        if self.closed:
            raise ConnectionClosed(self.close_reason or "connection closed")
        await self._drain_helper()

    async def _drain_helper(self) -> None:
        # StreamWriter.drain() calls this too.
        if self._lost:
            raise ConnectionClosed(self.close_reason or "connection lost")
        if not self._write_paused:
            return
        if self._drain_waiter is None:
            self._drain_waiter = self._loop.create_future()
        await asyncio.shield(self._drain_waiter)

    def _wake_writers(self, exc: Exception | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: nobody may be waiting any more

    def _get_close_waiter(self, stream: object) -> asyncio.Future[None]:
        # StreamWriter.wait_closed() awaits this.
        if self._closed_waiter is None:
            self._closed_waiter = self._loop.create_future()
            if self._lost:
                self._closed_waiter.set_result(None)
        return self._closed_waiter

    # -- closing ------------------------------------------------------------------------

    async def close(self, reason: str = "", *, timeout: float = 2.0) -> None:
        """Send what is queued, end our side, let the peer finish, then
        close; cut the connection if that takes over ``timeout`` seconds.
        Idempotent."""
        if self.closed:
            return
        self._flush()
        self.closed = True
        self.close_reason = self.close_reason or reason
        self._notify()
        deadline = self._loop.time() + timeout
        closed = self._get_close_waiter(self)
        try:
            with contextlib.suppress(Exception):  # the peer may be gone already
                await self._linger(min(timeout, self.linger), closed)
            self.transport.close()
            left = max(deadline - self._loop.time(), 0)
            try:
                await asyncio.wait_for(asyncio.shield(closed), left)
            except Exception:  # timeout, connection or ssl errors on a broken peer
                self.transport.abort()
        except asyncio.CancelledError:
            self.transport.abort()  # never leave the socket open behind us
            raise

    async def _linger(self, timeout: float, closed: asyncio.Future[None]) -> None:
        """Half-close, then discard input until the peer closes too (or
        ``timeout``). Only while reading is paused (frames not handled yet,
        or bytes that broke the protocol): a peer we kept reading has left
        nothing unread to provoke a reset, and need not hold a shutdown up.
        Skipped where it cannot work: TLS has no half-close."""
        transport = self.transport
        if timeout <= 0 or self._eof or self._lost or not self._paused or transport.is_closing():
            return
        if not transport.can_write_eof():  # TLS
            return
        transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()  # buffer_updated discards from now on
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(closed), timeout)


def new_read_buffer() -> memoryview:
    """A read buffer for :class:`ServerConnection`; a server shares one
    among all its connections (reads happen one at a time)."""
    return memoryview(bytearray(READ_SIZE))
