"""The client API: what programs, bots and the ``chat`` command use.

::

    async with libchat.connect("127.0.0.1", 12345, user="bot") as chat:
        await chat.send("hello")
        async for event in chat:
            if isinstance(event, libchat.Message):
                print(event.room, event.sender, event.text)

Events arrive in the order the server sent them. Replies to requests
(``join``, ``who``...) are matched by ``id`` and never show up as events.
Events are buffered until read: a program that never reads them should pass
``receive_events=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl as ssl_module
from collections.abc import AsyncIterator, Generator, Iterable
from types import TracebackType
from typing import Any

from . import __version__
from .connection import Connection
from .errors import ConnectionClosed, HandshakeError, ProtocolError, RemoteError, Timeout
from .events import Event, event_from_frame
from .plugins import PluginSpec, call_async, call_firstresult, make_plugin_manager
from .protocol import DEFAULT_ROOM, PROTOCOL_VERSION, check_room, fold
from .server import DEFAULT_HOST, DEFAULT_PORT
from .tls import tls_error

_CLOSED = object()
#: How much the stream reader buffers before it stops reading the socket (it
#: pauses at twice this). Frames are read 64 KiB at a time whatever their
#: size, so a small buffer is no limit on frame size; a large one would let
#: megabytes pile up (and be copied again on each refill) while a plugin is
#: busy with a file chunk.
READ_BUFFER = 256 << 10
log = logging.getLogger("libchat.client")


class Client:
    """A connected, logged-in client. Make one with :func:`connect`."""

    def __init__(
        self,
        conn: Connection,
        *,
        user: str,
        room: str | None,
        plugins: Iterable[PluginSpec] = (),
        receive_events: bool = True,
        request_timeout: float = 30.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.conn = conn
        self.requested_user = user
        self.user = user
        self.room: str | None = room
        self.rooms: dict[str, str] = {}
        self.welcome: dict[str, Any] = {}
        self.pm = make_plugin_manager(plugins)
        #: settings for client-side plugins (``accept_files``...)
        self.options: dict[str, Any] = dict(options or {})
        #: scratch space for client-side plugins, keyed by plugin name; it
        #: lives and dies with the client
        self.data: dict[str, Any] = {}
        self.receive_events = receive_events
        self.request_timeout = request_timeout
        self.close_reason = ""
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[Event | object] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    # -- opening ----------------------------------------------------------------------

    async def _handshake(self, extra: dict[str, Any], timeout: float) -> None:
        hello: dict[str, Any] = {
            "type": "hello",
            "version": PROTOCOL_VERSION,
            "client": f"libchat/{__version__}",
            "user": self.requested_user,
            "room": self.room,
            **extra,
        }
        await call_async(self.pm.hook.libchat_client_hello, client=self, hello=hello)
        self.conn.send(hello)
        try:
            frame = await asyncio.wait_for(self.conn.recv(), timeout)
        except TimeoutError:
            raise Timeout("the server did not answer the hello in time") from None
        if frame.type == "error":
            raise RemoteError(str(frame.header.get("code")), str(frame.header.get("message")))
        if frame.type != "welcome":
            raise HandshakeError(f"expected 'welcome', got {frame.type!r}")
        self.welcome = frame.header
        self.user = str(frame.header.get("user", self.user))
        self._reader = asyncio.create_task(self._read_loop(), name="libchat-client-reader")

    # -- reading ----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        conn = self.conn
        frame_hook = self.pm.hook.libchat_client_frame
        hooked = bool(frame_hook.get_hookimpls())
        try:
            while True:
                frame = await conn.recv()
                header = frame.header
                kind = frame.type
                request_id = header.get("id")
                # Our ids are strings; another type (even an unhashable one
                # from a broken server) matches no request.
                if (
                    kind in ("ok", "error", "pong")
                    and isinstance(request_id, str)
                    and request_id in self._pending
                ):
                    future = self._pending.pop(request_id)
                    if not future.done():
                        future.set_result(header)
                    continue
                if kind == "ping":
                    conn.send({"type": "pong"})
                    continue
                if kind == "bye":
                    self.close_reason = str(header.get("reason", ""))
                event = event_from_frame(frame)
                self._track(event)
                if hooked and await self._consumed(frame_hook, event):
                    continue
                if self.receive_events:
                    self._events.put_nowait(event)
        except ConnectionClosed as exc:
            self.close_reason = self.close_reason or exc.message
        except ProtocolError as exc:
            self.close_reason = f"protocol error: {exc.message}"
        except Exception as exc:
            # A frame this client could not handle (a server bug, or a newer
            # server): the connection ends with the reason; the error must
            # not escape through quit() or close() later.
            log.warning("closing: a frame from the server broke the client", exc_info=True)
            self.close_reason = f"protocol error: {type(exc).__name__}: {exc}"
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionClosed(self.close_reason or "connection closed"))
            self._pending.clear()
            self._events.put_nowait(_CLOSED)
            with contextlib.suppress(Exception):
                await conn.close()

    async def _consumed(self, hook: Any, event: Event) -> bool:
        """Offer ``event`` to the client-side plugins; a failing plugin is
        logged and the event is kept for the application."""
        try:
            return bool(await call_firstresult(hook, client=self, event=event))
        except Exception:
            log.exception("a plugin failed on %r", event.type)
            return False

    def _track(self, event: Event) -> None:
        """Keep ``rooms`` and ``room`` true as presence events arrive."""
        header = event.header
        if event.type != "presence" or fold(str(header.get("user"))) != fold(self.user):
            return
        room = str(header.get("room"))
        if header.get("event") == "joined":
            self.rooms[fold(room)] = room
            self.room = room
        elif header.get("event") == "left":
            self.rooms.pop(fold(room), None)
            if self.room is not None and fold(self.room) == fold(room):
                self.room = next(reversed(self.rooms.values()), None)

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event; ConnectionClosed once the connection is over."""
        try:
            item = await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            raise Timeout("no event in time") from None
        if item is _CLOSED:
            self._events.put_nowait(_CLOSED)
            raise ConnectionClosed(self.close_reason or "connection closed")
        assert isinstance(item, Event)
        return item

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            try:
                yield await self.next_event()
            except ConnectionClosed:
                return

    # -- requests ---------------------------------------------------------------------

    async def request(self, header: dict[str, Any], body: bytes = b"") -> dict[str, Any]:
        """Send a frame with a fresh ``id`` and wait for its reply; an error
        reply raises RemoteError with the server's code."""
        if self.conn.closed or (self._reader is not None and self._reader.done()):
            raise ConnectionClosed(self.close_reason or "connection closed")
        request_id = str(next(self._ids))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self.conn.send({**header, "id": request_id}, body)
        try:
            reply = await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError:
            raise Timeout(f"no reply to {header.get('type')!r} in time") from None
        finally:
            self._pending.pop(request_id, None)
        if reply.get("type") == "error":
            details = {k: v for k, v in reply.items() if k not in ("type", "id", "code", "message")}
            raise RemoteError(str(reply.get("code")), str(reply.get("message")), **details)
        return reply

    async def send_frame(self, header: dict[str, Any], body: bytes = b"") -> None:
        """Send one frame without waiting for a reply (but with backpressure)."""
        if self.conn.closed:
            raise ConnectionClosed(self.close_reason or "connection closed")
        self.conn.send(header, body)
        await self.conn.drain()

    def _room(self, room: str | None) -> str:
        room = room or self.room
        if room is None:
            raise ValueError("you are in no room; join one first")
        return room

    async def send(
        self, text: str, room: str | None = None, *, action: bool = False, wait: bool = False
    ) -> str | None:
        """Say ``text`` in ``room`` (default: the current room). With
        ``wait`` the server's acknowledgement is awaited and the message id
        returned; without it, errors arrive later as ErrorEvent."""
        header: dict[str, Any] = {"type": "msg", "room": self._room(room), "text": text}
        if action:
            header["action"] = True
        if wait:
            return str((await self.request(header))["mid"])
        await self.send_frame(header)
        return None

    async def private(self, user: str, text: str) -> str:
        """Send ``text`` to ``user`` alone (needs the ``dm`` plugin on the
        server); return the message id."""
        reply = await self.request({"type": "dm", "to": user, "text": text})
        return str(reply.get("mid", ""))

    async def join(self, room: str) -> list[str]:
        """Join ``room`` (it becomes the current room); return its members."""
        reply = await self.request({"type": "join", "room": check_room(room)})
        shown = str(reply.get("room", room))
        self.rooms[fold(shown)] = shown
        self.room = shown
        return list(reply.get("members", []))

    async def part(self, room: str | None = None) -> None:
        await self.request({"type": "part", "room": self._room(room)})

    async def who(self, room: str | None = None) -> list[str]:
        reply = await self.request({"type": "who", "room": self._room(room)})
        return list(reply.get("members", []))

    async def list_rooms(self) -> list[tuple[str, int]]:
        """Every room with its number of users, sorted; the server lists at
        most its ``max_list_items`` (the first, sorted)."""
        reply = await self.request({"type": "rooms"})
        rooms = reply.get("rooms")
        return [
            (r["room"], r["members"])
            for r in (rooms if isinstance(rooms, list) else [])
            if isinstance(r, dict)
            and isinstance(r.get("room"), str)
            and isinstance(r.get("members"), int)
        ]

    async def command(self, name: str, args: str = "", room: str | None = None) -> dict[str, Any]:
        """Run a server (plugin) slash command; return its reply."""
        header: dict[str, Any] = {"type": "command", "command": name, "args": args}
        if room or self.room:
            header["room"] = room or self.room
        return await self.request(header)

    async def ping(self) -> float:
        """Round trip time to the server, in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self.request({"type": "ping"})
        return loop.time() - start

    # -- closing ----------------------------------------------------------------------

    async def quit(self, reason: str = "quit", *, timeout: float = 5.0) -> None:
        """Leave cleanly: everything sent before is delivered first."""
        if not self.conn.closed:
            with contextlib.suppress(ConnectionClosed):
                self.conn.send({"type": "quit", "reason": reason})
                await self.conn.drain()
        await self.wait_closed(timeout)

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until the connection is over (cut it after ``timeout``).
        Never raises for what ended it: :attr:`close_reason` says."""
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            except TimeoutError:
                self._reader.cancel()
            except Exception:  # the reader's own failure: recorded, not ours to raise
                log.debug("the client's reader failed", exc_info=True)
        await self.conn.close()

    async def close(self) -> None:
        """Close at once, without a goodbye. Never raises for what ended the
        connection: :attr:`close_reason` says."""
        await self.conn.close()
        if self._reader is not None:
            try:
                await self._reader
            except asyncio.CancelledError:
                if not self._reader.cancelled():
                    raise  # we are cancelled ourselves
            except Exception:
                log.debug("the client's reader failed", exc_info=True)

    @property
    def closed(self) -> bool:
        return self.conn.closed


async def open_client(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    user: str,
    room: str | None = DEFAULT_ROOM,
    ssl: ssl_module.SSLContext | None = None,
    server_hostname: str | None = None,
    hello: dict[str, Any] | None = None,
    plugins: Iterable[PluginSpec] = (),
    receive_events: bool = True,
    timeout: float = 10.0,
    max_frame_size: int | None = 16 << 20,
    options: dict[str, Any] | None = None,
) -> Client:
    """Connect, say hello, and return a logged-in :class:`Client`, in
    ``room`` (``None``: in no room, until it joins one)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=ssl,
                server_hostname=server_hostname,
                limit=READ_BUFFER,
            ),
            timeout,
        )
    except TimeoutError:
        raise Timeout(f"could not connect to {host}:{port} in {timeout:g} s") from None
    except ssl_module.SSLError as exc:  # before OSError, its base: say what TLS disliked
        raise tls_error(exc, server_hostname or host) from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConnectionClosed(f"cannot connect to {host}:{port}: {reason}") from None
    conn = Connection(reader, writer, max_frame_size=max_frame_size)
    client = Client(
        conn, user=user, room=room, plugins=plugins, receive_events=receive_events, options=options
    )
    try:
        await client._handshake(dict(hello or {}), timeout)
    except ConnectionClosed as exc:
        await conn.close()
        # A TLS server hangs up on a plaintext hello without a word.
        raise ConnectionClosed(
            f"{host}:{port} closed the connection without answering the hello ({exc.message})",
            stage="hello",
        ) from None
    except BaseException:
        await conn.close()
        raise
    return client


class connect:
    """``await connect(...)`` or ``async with connect(...) as client``; the
    context manager quits cleanly on exit. Arguments as :func:`open_client`."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **kwargs: Any) -> None:
        self._args = (host, port)
        self._kwargs = kwargs
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return open_client(*self._args, **self._kwargs).__await__()

    async def __aenter__(self) -> Client:
        self._client = await self
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            if exc_type is None:
                await self._client.quit()
            else:
                await self._client.close()
