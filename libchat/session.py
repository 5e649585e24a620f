"""One client's session on the server: handshake, then frames until it ends.

A session owns its connection and nothing else; everything that reaches
other users goes through the server's Hub.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .connection import ServerConnection
from .errors import (
    BadRequest,
    ChatError,
    ConnectionClosed,
    HandshakeError,
    InternalError,
    NotFound,
    ProtocolError,
    Timeout,
    UnknownCommand,
)
from .plugins import call_async, call_each, call_firstresult
from .protocol import (
    DEFAULT_ROOM,
    MAX_ID_CHARS,
    PROTOCOL_VERSION,
    Frame,
    capped,
    check_nick,
    check_room,
    check_text,
    clean_reason,
    encode_frame,
    fold,
)
from .protocol import shown as quoted

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("libchat.server")


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class _Quit(Exception):
    """The client asked to leave."""


class TokenBucket:
    """``rate`` events a second with bursts of ``burst``. :meth:`take`
    returns how long the caller must wait first (fakelag: a flood is slowed
    down, never dropped)."""

    __slots__ = ("_last", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.tokens = self.burst
        self._last = time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate) - 1.0
        self._last = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


#: Frames a session handles before it lets the other tasks run.
FRAMES_PER_TURN = 64

#: Frame types that count against the message rate.
RATE_LIMITED = frozenset({"msg", "dm", "join", "part", "who", "rooms", "command"})


class Session:
    """A connected client, from hello to goodbye.

    A session has no task of its own while it is idle: its connection calls
    :meth:`_wake` when frames (or the end of the input) arrive, and a task
    then handles every frame waiting, one after the other, and ends. Frames
    from one client are therefore handled in order, each awaited before the
    next starts, and an idle session costs only its objects.

    A connection cut off (send queue exceeded, ping timeout) while a handler
    waits cancels that handler: whatever it waits for (another peer's drain,
    a plugin's future) may never come, and the session must still end,
    leave its rooms and free its name.
    """

    __slots__ = (
        "__weakref__",
        "_attached",
        "_bucket",
        "_busy",
        "_cut",
        "_expired",
        "_timer",
        "_worker",
        "authenticated",
        "conn",
        "data",
        "deliver",
        "name",
        "peer",
        "ping_sent",
        "rooms",
        "server",
        "state",
    )

    #: Queue encoded frame bytes for this client (the Hub calls this once per
    #: member per broadcast): the connection's own method, bound per instance
    #: to save a call on the hot path.
    deliver: Callable[[bytes], bool]

    def __init__(self, server: Server, conn: ServerConnection) -> None:
        self.server = server
        self.conn = conn
        self.deliver = conn.send_bytes
        self.peer = conn.peer
        self.name = ""
        self.state = State.HANDSHAKE
        self.authenticated = False
        #: folded room name -> room name as shown
        self.rooms: dict[str, str] = {}
        #: scratch space for plugins, keyed by plugin name
        self.data: dict[str, Any] = {}
        self.ping_sent: float | None = None
        self._attached = False
        limits = server.limits
        self._bucket = TokenBucket(limits.rate, limits.rate_burst) if limits.rate > 0 else None
        self._worker: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        #: the worker awaits a handler (the hello's or a request's)
        self._busy = False
        #: the worker was cancelled because the connection was cut off
        self._cut = False

    def __repr__(self) -> str:
        return f"<Session {self.name or '?'} {self.peer} {self.state.value}>"

    # -- output -----------------------------------------------------------------------

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        """Queue one frame for this client."""
        self.conn.send(header, body)

    def reply(self, request: dict[str, Any], **fields: Any) -> None:
        """Answer ``request`` with an ``ok`` frame, if it carried an ``id``."""
        if "id" in request:
            self.send({"type": "ok", "id": request["id"], **fields})

    async def drain(self) -> None:
        """Wait until what is queued for this client has been sent
        (backpressure for bulk data, such as relayed file chunks)."""
        await self.conn.drain()

    async def throttle(self) -> None:
        """Wait as long as the message rate asks (plugins call it for their
        own frame types)."""
        if self._bucket is not None:
            delay = self._bucket.take()
            if delay > 0:
                await asyncio.sleep(delay)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the handshake clock and handle frames as they arrive."""
        timeout = self.server.limits.handshake_timeout
        if timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._handshake_expired)
        self.conn.set_listener(self._wake)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.state is State.HANDSHAKE:
            self._expired = True
            self._wake()

    def _wake(self) -> None:
        """The connection has something new: make sure a task handles it, or
        stop the one that waits in a handler if the connection was cut off."""
        if self.state is State.CLOSED:
            return
        worker = self._worker
        if worker is None:
            self._worker = self.server.spawn(self._work(), name="libchat-session")
        elif (
            self._busy
            and self.conn.aborted
            and not self._cut
            and worker is not asyncio.current_task()
        ):
            # Only a worker waiting in a handler: one between frames sees the
            # connection closed at its next frame. And not from within: a
            # handler that cut its own connection sees it closed as soon as
            # it returns.
            self._cut = True
            worker.cancel()

    async def _work(self) -> None:
        """Handle the frames waiting; end the session if the input ended, a
        frame asked for that, or the connection was cut off meanwhile."""
        reason: str | None = None
        try:
            await self._handle_frames()
            self._worker = None  # idle again: the next frame starts a new task
        except asyncio.CancelledError:
            if not self._cut:
                raise  # the server's shutdown: clean up (finally), then end
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # our own cancel, handled: clean up normally
        except Exception as exc:
            reason = self._ended_by(exc)
        finally:
            if self._worker is not None:  # ending (or cancelled): clean up
                await self._cleanup(reason or self.conn.close_reason or "connection closed")

    async def _handle_frames(self) -> None:
        """The one loop of a session: the hello first, then requests, until
        no whole frame waits (or the input ends, which raises)."""
        next_frame = self.conn.next_frame
        handled = 0
        while True:
            if handled == FRAMES_PER_TURN:
                # Handlers that never wait (ping, pong, msg without hooks)
                # would let one peer's backlog hold the loop for as long as
                # it lasts: give the others their turn.
                handled = 0
                await asyncio.sleep(0)
            frame = next_frame()
            if frame is None:
                if self._expired and self.state is State.HANDSHAKE:
                    raise Timeout("handshake timed out")
                return
            handled += 1
            self._busy = True
            if self.state is State.HANDSHAKE:
                self._cancel_timer()
                await self._handshake(frame)
            else:
                await self._dispatch(frame)
            self._busy = False

    def _ended_by(self, exc: Exception) -> str:
        """Say goodbye as ``exc`` (which ends the session) asks; the reason."""
        if isinstance(exc, _Quit):
            return str(exc) or "quit"
        if isinstance(exc, ConnectionClosed):
            return exc.message
        if isinstance(exc, ChatError):
            log.info("closing %r: %r", self, exc.message)
            self._goodbye(exc)
            return exc.message
        # A bug (ours or a plugin's, in the handshake): this connection ends
        # with an error it can show; the server and the others go on.
        log.error("session %r failed", self, exc_info=exc)
        error = InternalError("the server failed to handle this connection")
        self._goodbye(error)
        return error.message

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _goodbye(self, error: ChatError) -> None:
        self._send_error(error, None)
        self.send({"type": "bye", "reason": clean_reason(error.message, error.code)})

    async def _handshake(self, frame: Frame) -> None:
        hello = frame.header
        if frame.type != "hello":
            raise ProtocolError(f"expected a 'hello' frame first, got {quoted(frame.type)}")
        version = hello.get("version")
        if version != PROTOCOL_VERSION:
            raise HandshakeError(
                f"protocol version {quoted(version)} is not supported; this server speaks "
                f"version {PROTOCOL_VERSION}"
            )
        wanted = check_nick(hello.get("user"))
        # "room": null asks for no room at first (a client that only sends
        # a file need not be announced in the lobby).
        first = hello.get("room", DEFAULT_ROOM)
        room = None if first is None else check_room(first)
        pm = self.server.pm
        granted = await call_firstresult(
            pm.hook.libchat_authenticate, server=self.server, hello=hello, peer=self.peer
        )
        self.authenticated = granted is not None
        self.name = check_nick(granted) if granted is not None else wanted
        await self.server.hub.attach(self, shared=self.authenticated)
        self._attached = True
        self.state = State.OPEN
        self.send(self.server.welcome(self))
        if room is not None:
            await self._join(room, None)
        await call_each(pm.hook.libchat_session_opened, session=self)

    async def _dispatch(self, frame: Frame) -> None:
        """Handle one frame of an open session; a failed request is answered
        with an error, a protocol violation ends the session."""
        kind = frame.type
        if self._bucket is not None and kind in RATE_LIMITED:
            await self.throttle()
        handler = self.server.handlers.get(kind)
        try:
            request_id = frame.header.get("id")
            if request_id is not None and (
                isinstance(request_id, bool) or not isinstance(request_id, str | int)
            ):
                raise BadRequest("'id' must be a string or an integer")
            if isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS:
                # Every reply repeats it: it must leave room in a header.
                raise BadRequest(f"'id' is over {MAX_ID_CHARS} characters")
            if handler is None:
                raise BadRequest(f"unknown frame type {quoted(kind)}")
            result = handler(self, frame)
            if inspect.isawaitable(result):
                await result
        except (_Quit, ConnectionClosed, ProtocolError):
            # A protocol violation ends the connection, not just the request.
            raise
        except ChatError as exc:
            self._send_error(exc, frame.header.get("id"))
        except Exception:
            log.exception("handler for %s failed in %r", quoted(kind), self)
            self._send_error(
                InternalError(f"the server failed to handle {quoted(kind)}"), frame.header.get("id")
            )

    def _send_error(self, exc: ChatError, request_id: Any) -> None:
        if not isinstance(request_id, str | int) or (
            isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS
        ):
            request_id = None
        header = exc.to_header(request_id)
        try:
            data = encode_frame(header)
        except ValueError:
            # Its message or details quote what the peer sent, too long for
            # a header (or not encodable): the code and a shortened message.
            header = {"type": "error", "code": exc.code}
            header["message"] = clean_reason(exc.message, exc.code)
            if request_id is not None:
                header["id"] = request_id
            data = encode_frame(header)
        self.deliver(data)

    async def close(self, reason: str, *, timeout: float = 2.0) -> None:
        """Say goodbye and close (cut off after ``timeout`` seconds if the
        peer does not take the goodbye); the session's own task then cleans
        up."""
        reason = clean_reason(reason, "closed by the server")
        if self.state is State.OPEN:
            self.send({"type": "notice", "text": reason})
        self.send({"type": "bye", "reason": reason})
        await self.conn.close(reason, timeout=timeout)

    async def _cleanup(self, reason: str) -> None:
        """Leave the rooms, release the name, close; then the plugins hear of
        it, whatever failed before."""
        reason = clean_reason(reason, "connection closed")
        was_open = self.state is State.OPEN
        self.state = State.CLOSED
        self._cancel_timer()
        self.server.forget(self)
        try:
            try:
                await self._leave_hub(reason)
            finally:
                # Whatever the hub does, the socket is not left behind.
                await self.conn.close(reason)
        finally:
            if was_open:
                log.info("%s (%s) left: %r", self.name, self.peer, reason)
                await call_each(
                    self.server.pm.hook.libchat_session_closed, session=self, reason=reason
                )

    async def _leave_hub(self, reason: str) -> None:
        """Release the name and leave every room; each room hears of it."""
        if not self._attached:
            return
        self._attached = False
        hub = self.server.hub
        try:
            rooms = await hub.detach(self)
        except Exception:  # a distributed hub's failure; this node goes on
            log.exception("detaching %r from the hub failed", self)
            rooms = list(self.rooms.values())
        self.rooms.clear()
        for room in rooms:
            try:
                hub.publish(room, self._presence(room, "left", reason))
            except Exception:  # one room's failure must not cost the others theirs
                log.exception("telling %r that %r left failed", room, self)

    # -- rooms ------------------------------------------------------------------------

    def _presence(self, room: str, event: str, reason: str = "") -> bytes:
        header = {"type": "presence", "room": room, "user": self.name, "event": event}
        if reason:
            header["reason"] = reason
        return encode_frame(header)

    def room_of(self, request: dict[str, Any]) -> str:
        """The room a request names, as shown; the session must be in it."""
        room = request.get("room")
        if room is None:
            raise BadRequest("'room' is missing")
        if not isinstance(room, str):
            raise BadRequest("'room' must be a string")
        shown = self.rooms.get(fold(room))
        if shown is None:
            raise NotFound(f"you are not in room {room!r}", room=room)
        return shown

    async def _join(self, room: str, request: dict[str, Any] | None) -> None:
        check_room(room)
        if (
            fold(room) not in self.rooms
            and len(self.rooms) >= self.server.limits.max_rooms_per_session
        ):
            raise BadRequest(f"you are in {len(self.rooms)} rooms, the limit")
        hub = self.server.hub
        shown = await hub.join(room, self)
        if shown is not None:
            self.rooms[fold(shown)] = shown
            hub.publish(shown, self._presence(shown, "joined"))
        else:
            shown = self.rooms[fold(room)]
        if request is not None:
            members, more = capped(await hub.members(shown) or [])
            self.reply(request, room=shown, members=members, **more)

    # -- core frame handlers (the server's table maps frame types to these) ------------

    async def on_msg(self, frame: Frame) -> None:
        request = frame.header
        room = self.room_of(request)
        text = check_text(request.get("text"), self.server.limits.max_message_bytes)
        message: dict[str, Any] = {"type": "msg", "room": room, "from": self.name, "text": text}
        if request.get("action"):
            message["action"] = True
        if self.server.has_message_hooks:
            await call_async(self.server.pm.hook.libchat_message, session=self, message=message)
            check_text(message.get("text"), self.server.limits.max_message_bytes)
        message["ts"] = round(time.time(), 3)
        message["mid"] = mid = self.server.next_mid()
        try:
            data = encode_frame(message)
        except ValueError:  # control characters escape to 6 bytes each in JSON
            raise BadRequest("message too long once encoded; send less text") from None
        self.server.hub.publish(room, data, exclude=self)
        self.reply(request, mid=mid, ts=message["ts"])

    async def on_join(self, frame: Frame) -> None:
        await self._join(check_room(frame.header.get("room")), frame.header)

    async def on_part(self, frame: Frame) -> None:
        request = frame.header
        room = self.room_of(request)
        await self.server.hub.part(room, self)
        del self.rooms[fold(room)]
        data = self._presence(room, "left", "part")
        self.server.hub.publish(room, data)
        self.deliver(data)
        self.reply(request, room=room)

    async def on_who(self, frame: Frame) -> None:
        request = frame.header
        room = check_room(request.get("room"))
        everyone = await self.server.hub.members(room)
        if everyone is None:
            raise NotFound(f"no room {room!r}", room=room)
        members, more = capped(everyone)
        # A member gets the room's own spelling back, as join answers.
        self.reply(request, room=self.rooms.get(fold(room), room), members=members, **more)

    async def on_rooms(self, frame: Frame) -> None:
        rooms, more = capped(await self.server.hub.rooms())
        self.reply(frame.header, rooms=[{"room": r, "members": n} for r, n in rooms], **more)

    async def on_command(self, frame: Frame) -> None:
        request = frame.header
        name, args = request.get("command"), request.get("args", "")
        if not isinstance(name, str) or not isinstance(args, str):
            raise BadRequest("'command' and 'args' must be strings")
        command = self.server.commands.get(name.lower().lstrip("/"))
        if command is None:
            available = ", ".join("/" + n for n in self.server.command_names())
            raise UnknownCommand(f"unknown command /{name}; available: {available}")
        result = command.handler(self, args, request)
        if inspect.isawaitable(result):
            await result

    def on_ping(self, frame: Frame) -> None:
        pong = {"type": "pong"}
        if "id" in frame.header:
            pong["id"] = frame.header["id"]
        self.send(pong)

    def on_pong(self, frame: Frame) -> None:
        self.ping_sent = None

    def on_quit(self, frame: Frame) -> None:
        # Capped and cleaned: it goes to every room the user was in.
        reason = clean_reason(frame.header.get("reason"))
        self.send({"type": "bye", "reason": reason})
        raise _Quit(reason)

    def on_hello(self, frame: Frame) -> None:
        raise ProtocolError("already said hello")
