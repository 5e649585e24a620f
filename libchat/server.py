"""The chat server: listen, accept, keep sessions alive, shut down cleanly.

::

    async with Server("127.0.0.1", 0, plugins=["dm"]) as server:
        print(server.port)
        await server.serve_forever()

Lifecycle, in a fixed order: ``start()`` runs the startup hooks, collects
plugin commands and frame types (registration is frozen from then on) and
starts listening. ``close()`` stops accepting, tells every client, closes
their connections, waits for their sessions to end, then runs the shutdown
hooks, all within its ``timeout``. ``close()`` is idempotent, and a second
(or concurrent) call returns only once the first one has finished.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import ssl as ssl_module
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from . import __version__
from .commands import Command, FrameHandler
from .connection import FlushQueue, ServerConnection, new_read_buffer
from .errors import ChatError, ConnectionClosed, TooManyConnections
from .hub import Hub, LocalHub
from .limits import Limits
from .plugins import (
    InvalidPlugin,
    PluginSpec,
    call_async,
    call_each,
    make_plugin_manager,
    plugin_names,
)
from .protocol import (
    MAX_LIST_ITEMS,
    MAX_REASON_CHARS,
    NICK_RULE,
    PROTOCOL_VERSION,
    ROOM_RULE,
    encode_frame,
)
from .session import Session, State

log = logging.getLogger("libchat.server")

#: Commands every client handles (or maps to core frames) without plugins.
CORE_COMMANDS = ("join", "part", "who", "rooms", "me", "help", "quit")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345


class Server:
    """A libchat server. All limits are keyword-only with safe defaults."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        plugins: Iterable[PluginSpec] = (),
        limits: Limits | None = None,
        ssl: ssl_module.SSLContext | None = None,
        hub: Hub | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.limits = limits or Limits()
        self.ssl = ssl
        self.hub: Hub = hub or LocalHub()
        _limit_rooms(self.hub, self.limits.max_rooms)
        #: settings for plugins (``db``, ``allow_register``...), from the CLI
        self.config: dict[str, Any] = dict(config or {})
        #: scratch space for plugins' per-server state, keyed by plugin name;
        #: it lives and dies with the server
        self.data: dict[str, Any] = {}
        self.pm = make_plugin_manager(plugins)
        self.handlers: dict[str, FrameHandler] = {}
        self.commands: dict[str, Command] = {}
        self.extra_limits: dict[str, Any] = {}
        self.has_message_hooks = False
        self.sessions: set[Session] = set()
        #: every connection holding a slot (sessions, TLS handshakes), and
        #: the address key it counts under
        self._admitted: dict[ServerConnection, str] = {}
        self._per_address: dict[str, int] = {}
        self._upgrades: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._keepalive: asyncio.Task[None] | None = None
        #: set when serving ends (close() done); serve_forever waits for it
        self._closing: asyncio.Future[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._mids = itertools.count(1)
        self._epoch = os.urandom(4).hex()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Run startup hooks, freeze registration, start listening."""
        if self._server is not None:
            return
        if self._close_task is not None:
            raise RuntimeError("this server was closed; make a new one")
        # A hub with a lifecycle (a distributed one connects here).
        hub_start = getattr(self.hub, "start", None)
        if hub_start is not None:
            await hub_start(self)
        try:
            await call_async(self.pm.hook.libchat_startup, server=self)
            await self._collect_extensions()
            await self._listen()
        except BaseException:
            # Port in use, a plugin refusing its config...: undo what started,
            # so an embedding program leaks no store, thread or hub task.
            await call_each(self.pm.hook.libchat_shutdown, server=self)
            await self._close_hub()
            raise
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name="libchat-keepalive")
        log.info("listening on %s", ", ".join(self.addresses))

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        limits = self.limits
        # Every connection shares one read buffer (the loop reads one socket
        # at a time) and one flush callback per loop iteration.
        make_connection = functools.partial(
            ServerConnection,
            self._connection_made,
            read_buffer=new_read_buffer(),
            max_frame_size=limits.max_frame_size,
            max_send_queue=limits.max_send_queue,
            flusher=FlushQueue(loop),
        )
        # No ssl= here even with TLS: asyncio would tell us of a connection
        # only once its TLS handshake is over, so the connection limits could
        # not count the sockets of handshakes in progress (a peer that never
        # sends a ClientHello). Connections are admitted on accept, then
        # upgraded (_upgrade).
        self._server = await loop.create_server(make_connection, self.host, self.requested_port)

    async def _close_hub(self) -> None:
        hub_close = getattr(self.hub, "close", None)
        if hub_close is not None:
            await hub_close()

    async def _collect_extensions(self) -> None:
        core: dict[str, FrameHandler] = {
            kind: getattr(Session, "on_" + kind)
            for kind in (
                "msg",
                "join",
                "part",
                "who",
                "rooms",
                "command",
                "ping",
                "pong",
                "quit",
                "hello",
            )
        }
        self.handlers = dict(core)
        hook = self.pm.hook
        for extra in await call_async(hook.libchat_frame_handlers, server=self):
            for kind, handler in extra.items():
                if kind in self.handlers:
                    raise InvalidPlugin(f"frame type {kind!r} is registered twice")
                self.handlers[kind] = handler
        for commands in await call_async(hook.libchat_commands, server=self):
            for command in commands:
                name = command.name.lower()
                if name in self.commands or name in CORE_COMMANDS:
                    raise InvalidPlugin(f"command /{name} is registered twice")
                self.commands[name] = command
        for extra_limits in await call_async(hook.libchat_limits, server=self):
            self.extra_limits.update(extra_limits)
        # Skip the message hook entirely when no plugin implements it: the hot
        # path then costs nothing for plugins that are not there.
        self.has_message_hooks = bool(self.pm.hook.libchat_message.get_hookimpls())

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called (or the task is cancelled)."""
        await self.start()
        assert self._closing is None or not self._closing.done()
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        # Shielded: cancelling serve_forever must not resolve the future that
        # every close() call waits on.
        await asyncio.shield(self._closing)

    async def close(self, reason: str = "server shutting down", *, timeout: float = 5.0) -> None:
        """Stop accepting, tell clients, close them, run shutdown hooks.

        Sessions get ``timeout`` seconds in all to say goodbye and clean up;
        those still running then are cancelled. Idempotent: every call
        returns once the shutdown is complete."""
        if self._close_task is None:
            if self._server is None:
                return  # never started
            self._close_task = asyncio.create_task(
                self._shutdown(reason, timeout), name="libchat-shutdown"
            )
        await asyncio.shield(self._close_task)

    async def _shutdown(self, reason: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        if self._closing is None:
            self._closing = loop.create_future()
        deadline = loop.time() + timeout
        server, self._server = self._server, None
        assert server is not None
        server.close()
        for upgrade in list(self._upgrades):
            upgrade.cancel()  # a TLS handshake in progress need not finish
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)
        log.info("shutting down: %s", reason)
        # Each goodbye is cut short at the deadline: a peer that does not
        # read cannot hold the shutdown up.
        await asyncio.gather(
            *(s.close(reason, timeout=timeout) for s in list(self.sessions)),
            return_exceptions=True,
        )
        if self._tasks:
            left = max(deadline - loop.time(), 0)
            _done, pending = await asyncio.wait(set(self._tasks), timeout=left)
            for task in pending:
                task.cancel()
            if pending:
                # Cancelled sessions still close their sockets on the way out.
                await asyncio.wait(pending, timeout=1.0)
        await call_each(self.pm.hook.libchat_shutdown, server=self)
        await self._close_hub()
        if not self._closing.done():
            self._closing.set_result(None)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- addresses --------------------------------------------------------------------

    @property
    def sockets(self) -> list[Any]:
        return list(self._server.sockets) if self._server is not None else []

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        for sock in self.sockets:
            return int(sock.getsockname()[1])
        raise RuntimeError("the server is not listening")

    @property
    def addresses(self) -> list[str]:
        out = []
        for sock in self.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    # -- accepting --------------------------------------------------------------------

    def _connection_made(self, conn: ServerConnection) -> None:
        """A new TCP connection: admit it and start its session (after the
        TLS handshake, with TLS), or refuse it."""
        try:
            self._admit(conn)
        except ChatError as exc:
            log.warning("refused %s: %s", conn.peer, exc.message)
            if self.ssl is not None:
                # Nothing can be said before the TLS handshake, and making
                # one for a refusal would cost what the limit saves.
                conn.abort(exc.message)
                return
            conn.send(exc.to_header())
            self.spawn(conn.close(exc.message), name="libchat-refuse")
            return
        if self.ssl is None:
            self._start_session(conn)
            return
        # Not a byte read until the TLS layer is in place.
        conn.transport.pause_reading()
        task = self.spawn(self._upgrade(conn, self.ssl), name="libchat-tls")
        self._upgrades.add(task)
        task.add_done_callback(self._upgrades.discard)

    async def _upgrade(self, conn: ServerConnection, context: ssl_module.SSLContext) -> None:
        """The TLS handshake of an admitted connection, within
        ``handshake_timeout``; then its session starts."""
        started = False
        try:
            await conn.start_tls(context, timeout=self.limits.handshake_timeout or None)
            if self._close_task is None:
                self._start_session(conn)
                started = True
            else:
                conn.abort("server shutting down")
        except ConnectionClosed as exc:
            log.debug("no TLS with %s: %s", conn.peer, exc.message)
        finally:
            if not started:
                self._release(conn)

    def _start_session(self, conn: ServerConnection) -> None:
        session = Session(self, conn)
        self.sessions.add(session)
        session.start()

    def spawn(
        self, coro: Coroutine[Any, Any, None], *, name: str | None = None
    ) -> asyncio.Task[None]:
        """Run ``coro`` in a task that :meth:`close` waits for (and cancels
        once its timeout is up)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _admit(self, conn: ServerConnection) -> None:
        """Take a connection slot for ``conn`` or raise TooManyConnections.
        Connections count by :attr:`~ServerConnection.address`: an IPv6
        peer's /64, an IPv4 peer's address."""
        limits = self.limits
        if self._close_task is not None:
            # accepted just before the listener closed
            raise TooManyConnections("server shutting down")
        if limits.max_connections and len(self._admitted) >= limits.max_connections:
            raise TooManyConnections(f"server full ({limits.max_connections} connections)")
        address = conn.address
        count = self._per_address.get(address, 0)
        per_address = limits.max_connections_per_address
        if per_address and count >= per_address:
            raise TooManyConnections(f"too many connections from {address} (limit {per_address})")
        self._per_address[address] = count + 1
        self._admitted[conn] = address

    def _release(self, conn: ServerConnection) -> None:
        """Free the slot ``conn`` holds, if any (idempotent)."""
        address = self._admitted.pop(conn, None)
        if address is None:
            return
        count = self._per_address.get(address, 0) - 1
        if count > 0:
            self._per_address[address] = count
        else:
            self._per_address.pop(address, None)

    def forget(self, session: Session) -> None:
        """Drop a session from the books and free its connection slot; the
        session calls this as its cleanup begins, so its slot is free before
        its peer sees the connection close. Idempotent."""
        self.sessions.discard(session)
        self._release(session.conn)

    # -- keepalive --------------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        """One timer for all sessions: ping the silent, drop the dead."""
        interval, timeout = self.limits.ping_interval, self.limits.ping_timeout
        if interval <= 0:
            return
        shortest = min(interval, timeout) if timeout > 0 else interval
        tick = min(max(shortest / 4, 0.05), 5.0)
        loop = asyncio.get_running_loop()
        ping = encode_frame({"type": "ping"})
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for session in list(self.sessions):
                try:
                    self._keep_alive(session, now, ping)
                except Exception:  # one broken session must not stop the timer
                    log.exception("keepalive failed for %r", session)

    def _keep_alive(self, session: Session, now: float, ping: bytes) -> None:
        if session.state is not State.OPEN:
            return  # the handshake timeout watches those
        interval, timeout = self.limits.ping_interval, self.limits.ping_timeout
        conn = session.conn
        if session.ping_sent is not None:
            if conn.last_received >= session.ping_sent:
                session.ping_sent = None  # any sign of life answers a ping
            elif timeout > 0 and now - session.ping_sent >= timeout:
                log.info("%r: ping timeout", session)
                conn.abort("ping timeout")
            return
        if now - conn.last_received >= interval:
            session.ping_sent = now
            conn.send_bytes(ping)

    # -- helpers for sessions and plugins -----------------------------------------------

    def next_mid(self) -> str:
        """A message id unique on this server."""
        return f"{self._epoch}-{next(self._mids)}"

    def command_names(self) -> list[str]:
        return sorted({*CORE_COMMANDS, *self.commands})

    def welcome(self, session: Session) -> dict[str, Any]:
        return {
            "type": "welcome",
            "version": PROTOCOL_VERSION,
            "server": f"libchat/{__version__}",
            "user": session.name,
            "plugins": plugin_names(self.pm),
            "commands": [
                {"name": c.name, "usage": c.usage, "help": c.help}
                for c in sorted(self.commands.values(), key=lambda c: c.name)
            ],
            "limits": {
                **self.limits.as_dict(),
                "max_list_items": MAX_LIST_ITEMS,
                "max_reason_chars": MAX_REASON_CHARS,
                "nick": NICK_RULE,
                "room": ROOM_RULE,
                **self.extra_limits,
            },
        }

    def find_sessions(self, predicate: Callable[[Session], bool]) -> list[Session]:
        """This process's sessions that match ``predicate``."""
        return [s for s in self.sessions if predicate(s)]


def _limit_rooms(hub: Hub, max_rooms: int) -> None:
    """Give the hub the server's ``max_rooms``, unless it was built with a
    bound of its own. A hub that is not a LocalHub may hold one for this
    node's members (RedisHub's ``local``); that one holds the bound."""
    for candidate in (hub, getattr(hub, "local", None)):
        if isinstance(candidate, LocalHub) and candidate.max_rooms is None:
            candidate.max_rooms = max_rooms
