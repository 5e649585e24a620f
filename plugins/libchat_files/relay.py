"""The server side of file transfer: offers, answers and the chunk relay.

The server never holds a file. A chunk is forwarded to the recipient's
connection and the handler then waits for that connection to drain before
it returns; the sender's session reads its next frame only after that, so
TCP pushes back on a sender whose recipient is slower. Chunks are not
rate-limited like chat (``file.chunk`` is not a core frame type and the
relay never calls ``session.throttle()`` for it), and because each chunk
is one frame, chat frames on either connection interleave with them.

That wait is bounded: a recipient that takes nothing for
``file_stall_timeout`` seconds (it accepted, then stopped reading) gets the
transfer aborted on both sides, and the sender's session goes on. Without
the bound, the sender's session would wait forever, read none of its
frames (keepalive would take it for dead) and hold the recipient's lock
against every other sender.

Once a recipient connection has answered, the transfer is bound to that
connection. Across several servers (``chat serve --hub``) the transfer
lives on the *sender's* node (its id, ``node.n``, says which); the
recipient's node forwards the recipient's answers, results and aborts to
it (:meth:`Hub.send_route`), and chunks go to the recipient's connection
through :meth:`Hub.deliver_to` with ``drain``: the sender's node waits for
the recipient's node to say that connection drained, one chunk in flight
per transfer, so the backpressure holds end to end. Redis pub/sub delivers
at most once: a chunk or acknowledgement lost between nodes ends in the
stall timeout (the transfer is aborted), and a lost chunk that the stall
does not catch is caught by the recipient's SHA-256 check. See
docs/files.md.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from libchat import Server, Session
from libchat.errors import BadRequest, ConnectionClosed, NotFound, RateLimited
from libchat.plugins import InvalidPlugin
from libchat.protocol import Frame, check_nick, encode_frame, fold

from .errors import FileTooLarge

log = logging.getLogger("libchat.files")

#: The server's limit on one file unless ``config["max_file_size"]`` says
#: otherwise (0 turns it off).
DEFAULT_MAX_FILE_SIZE: Final = 2 << 30
#: Transfers one session may take part in at once.
DEFAULT_MAX_TRANSFERS: Final = 16
#: Seconds a recipient may take nothing before its transfer is aborted
#: (``config["file_stall_timeout"]``; 0 turns the bound off).
DEFAULT_STALL_TIMEOUT: Final = 30.0
#: The chunk size clients are told to use (a frame body, far under the
#: default 1 MiB frame limit).
CHUNK_SIZE: Final = 256 << 10
#: Longest file name the server relays, in UTF-8 bytes (receivers shorten
#: names further; this only bounds what passes through).
MAX_NAME_BYTES: Final = 1024
MAX_REASON_CHARS: Final = 200
#: Recently ended transfers a session remembers, so that the chunks still
#: in flight when a transfer is aborted are dropped without an error each.
_ENDED_MEMORY: Final = 64
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_CODE = re.compile(r"[a-z_]{1,32}")


class Stage(enum.Enum):
    OFFERED = "offered"
    ACCEPTED = "accepted"
    DONE = "done"  # every byte relayed; waiting for the recipient's verdict


@dataclass(eq=False)
class Transfer:
    tid: str
    sender: Session
    to: str  # the recipient's name as its holder spells it
    name: str
    size: int
    sha256: str
    stage: Stage = Stage.OFFERED
    #: the recipient connection, once it accepted: its session if it is on
    #: this node, else its address on another node (``hub.address``)
    receiver: Session | None = None
    remote: str | None = None
    #: the next byte the sender must send
    offset: int = 0


@dataclass
class _SessionFiles:
    """What the relay keeps on a session (``session.data["files"]``)."""

    tids: set[str] = field(default_factory=set)
    ended: deque[str] = field(default_factory=lambda: deque(maxlen=_ENDED_MEMORY))
    #: one chunk at a time towards this session, whoever sends it, so that
    #: several transfers to one recipient never pile up past its send queue
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _files(session: Session) -> _SessionFiles:
    files = session.data.get("files")
    if not isinstance(files, _SessionFiles):
        files = session.data["files"] = _SessionFiles()
    return files


def _config_int(server: Server, key: str, default: int) -> int:
    value = server.config.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidPlugin(f"files: config {key!r} must be a whole number >= 0, not {value!r}")
    return value


def _config_seconds(server: Server, key: str, default: float) -> float:
    value = server.config.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise InvalidPlugin(
            f"files: config {key!r} must be a number of seconds >= 0, not {value!r}"
        )
    return float(value)


#: What a hub needs for transfers between its nodes.
_ROUTING: Final = ("node", "address", "deliver_to", "route", "send_route")
#: The topic of the relays' node-to-node messages.
TOPIC: Final = "files"


def check_hub(server: Server) -> None:
    """Refuse to run on a hub that cannot route to one connection or
    between nodes (a third-party hub older than that part of the Hub
    protocol): an offer could be accepted but never served."""
    missing = [name for name in _ROUTING if not hasattr(server.hub, name)]
    if missing:
        raise InvalidPlugin(
            f"the files plugin needs a hub that routes to one connection "
            f"(missing: {', '.join(missing)})"
        )


def stall_timeout(server: Server) -> float:
    """How long a chunk may wait for its recipient: the configured
    ``file_stall_timeout``, but never so long that keepalive would drop the
    sender first (its frames are not read meanwhile, so it looks silent;
    keepalive drops it ``ping_interval + ping_timeout`` after its last frame
    was read). 0: no bound."""
    configured = _config_seconds(server, "file_stall_timeout", DEFAULT_STALL_TIMEOUT)
    interval, timeout = server.limits.ping_interval, server.limits.ping_timeout
    if interval > 0 and timeout > 0:
        keepalive = interval + timeout / 2
        return min(configured, keepalive) if configured else keepalive
    return configured


def _reason(header: dict[str, Any], default: str) -> str:
    reason = header.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return default
    return reason[:MAX_REASON_CHARS]


def _tid(header: dict[str, Any]) -> str:
    tid = header.get("tid")
    if not isinstance(tid, str) or not tid:
        raise BadRequest("'tid' must be a transfer id")
    return tid


def _offset(header: dict[str, Any], size: int) -> int:
    offset = header.get("offset")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= size:
        raise BadRequest(f"'offset' must be a whole number from 0 to {size}")
    return offset


class Relay:
    """Every transfer on one server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.max_file_size = _config_int(server, "max_file_size", DEFAULT_MAX_FILE_SIZE)
        self.max_transfers = _config_int(server, "max_file_transfers", DEFAULT_MAX_TRANSFERS)
        self.stall_timeout = stall_timeout(server)
        self.transfers: dict[str, Transfer] = {}
        #: transfers owned by another node that a session here accepted:
        #: tid -> (that session, its address)
        self.remote: dict[str, tuple[Session, str]] = {}
        self.node: str = getattr(server.hub, "node", "local")
        self._ids = itertools.count(1)
        self._background: set[asyncio.Future[Any]] = set()
        if hasattr(server.hub, "route"):
            server.hub.route(TOPIC, self.on_route)

    def limits(self) -> dict[str, Any]:
        return {
            "max_file_size": self.max_file_size,
            "max_file_transfers": self.max_transfers,
            "file_chunk_size": CHUNK_SIZE,
            "file_stall_timeout": self.stall_timeout,
        }

    def handlers(self) -> dict[str, Any]:
        return {
            "file.offer": self.on_offer,
            "file.accept": self.on_accept,
            "file.decline": self.on_decline,
            "file.chunk": self.on_chunk,
            "file.done": self.on_done,
            "file.result": self.on_result,
            "file.abort": self.on_abort,
        }

    # -- offer and answer -------------------------------------------------------------

    async def on_offer(self, session: Session, frame: Frame) -> None:
        await session.throttle()  # an offer is like a message; chunks are not
        request = frame.header
        name, size, sha256 = self._check_offer(request)
        to = check_nick(request.get("to"))
        recipient = await self.server.hub.online(to)
        if recipient is None:
            raise NotFound(f"{to} is not online", user=to)
        if fold(recipient) == fold(session.name):
            raise BadRequest("you cannot send a file to yourself")
        if len(_files(session).tids) >= self.max_transfers:
            raise RateLimited(f"you have {self.max_transfers} transfers going, the limit")
        tid = f"{self.node}.{next(self._ids)}"  # unique across the nodes of a hub
        transfer = Transfer(tid, session, recipient, name, size, sha256)
        offer = {
            "type": "file.offer",
            "tid": transfer.tid,
            "from": session.name,
            "name": name,
            "size": size,
            "sha256": sha256,
        }
        self._track(transfer, session)
        if not await self.server.hub.send_to_user(recipient, encode_frame(offer)):
            self._end(transfer)
            raise NotFound(f"{to} is not online", user=to)
        session.reply(request, tid=transfer.tid)

    def _check_offer(self, request: dict[str, Any]) -> tuple[str, int, str]:
        name, size, sha256 = request.get("name"), request.get("size"), request.get("sha256")
        if not isinstance(name, str) or len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES:
            raise BadRequest(f"'name' must be a string of at most {MAX_NAME_BYTES} bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest("'size' must be a whole number of bytes")
        if self.max_file_size and size > self.max_file_size:
            raise FileTooLarge(
                f"the file is {size} bytes; this server's limit is {self.max_file_size}",
                max_file_size=self.max_file_size,
            )
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise BadRequest("'sha256' must be 64 hexadecimal digits")
        return name, size, sha256.lower()

    def _offered_to(self, session: Session, header: dict[str, Any]) -> Transfer:
        """The transfer ``header`` names, offered to ``session`` and not yet
        answered. Another user's transfer is "not found", never "forbidden"."""
        transfer = self.transfers.get(_tid(header))
        if (
            transfer is None
            or transfer.stage is not Stage.OFFERED
            or transfer.sender is session
            or fold(transfer.to) != fold(session.name)
        ):
            raise NotFound("no such file offer (answered, withdrawn or never made)")
        return transfer

    def _owner(self, tid: str) -> str | None:
        """The node owning ``tid`` if it is another node, else None."""
        node = tid.rpartition(".")[0]
        return node if node and node != self.node else None

    async def on_accept(self, session: Session, frame: Frame) -> None:
        await session.throttle()
        owner = self._owner(_tid(frame.header))
        if owner is not None:
            await self._accept_remote(session, frame.header, owner)
            return
        transfer = self._offered_to(session, frame.header)
        offset = _offset(frame.header, transfer.size)
        transfer.stage = Stage.ACCEPTED
        transfer.receiver = session
        transfer.offset = offset
        self._track(transfer, session)
        transfer.sender.send({"type": "file.accept", "tid": transfer.tid, "offset": offset})
        session.reply(frame.header, tid=transfer.tid, offset=offset)

    async def on_decline(self, session: Session, frame: Frame) -> None:
        await session.throttle()
        tid = _tid(frame.header)
        owner = self._owner(tid)
        if owner is not None:
            reason = _reason(frame.header, "declined")
            await self._forward(owner, "decline", tid, session, reason=reason)
            session.reply(frame.header, tid=tid)
            return
        transfer = self._offered_to(session, frame.header)
        reason = _reason(frame.header, "declined")
        self._end(transfer)
        transfer.sender.send({"type": "file.decline", "tid": transfer.tid, "reason": reason})
        session.reply(frame.header, tid=transfer.tid)

    # -- the data ---------------------------------------------------------------------

    def _sending(self, session: Session, header: dict[str, Any]) -> Transfer | None:
        """The accepted transfer ``session`` sends; ``None`` for one that just
        ended (its chunks in flight are dropped quietly)."""
        tid = _tid(header)
        transfer = self.transfers.get(tid)
        if transfer is None or transfer.sender is not session:
            if tid in _files(session).ended:
                return None
            raise NotFound("no such transfer", tid=tid)
        if transfer.stage is not Stage.ACCEPTED:
            # Refused: no byte flows before the recipient said yes, nor after
            # the sender said it was done.
            why = "not accepted" if transfer.stage is Stage.OFFERED else "already done"
            self.abort(transfer, f"data sent for a transfer {why}", by=session)
            raise BadRequest(f"the transfer is {why}", tid=tid)
        return transfer

    async def on_chunk(self, session: Session, frame: Frame) -> None:
        transfer = self._sending(session, frame.header)
        if transfer is None:
            return
        data = frame.body
        offset = frame.header.get("offset")
        if type(offset) is not int or offset != transfer.offset:
            self.abort(transfer, f"chunk at offset {offset!r}, expected {transfer.offset}")
            return
        if not data:
            self.abort(transfer, "empty chunk")
            return
        if transfer.offset + len(data) > transfer.size:
            self.abort(transfer, "more bytes than declared")
            return
        if transfer.remote is not None:
            await self._relay_remote(transfer, transfer.remote, offset, data)
            return
        receiver = transfer.receiver
        assert receiver is not None
        # One deadline for the lock and the drain: this sender's frames are
        # not read until we return, whoever the recipient is waiting on.
        try:
            async with asyncio.timeout(self.stall_timeout or None):
                await self._relay(transfer, receiver, offset, data)
        except TimeoutError:
            self.abort(
                transfer,
                f"{receiver.name} stopped receiving: nothing taken for {self.stall_timeout:g} s",
            )

    async def _relay(self, transfer: Transfer, receiver: Session, offset: int, data: bytes) -> None:
        header = {"type": "file.chunk", "tid": transfer.tid, "offset": offset}
        async with _files(receiver).lock:
            if transfer.tid not in self.transfers:  # aborted while we waited
                return
            receiver.conn.send(header, data)
            transfer.offset += len(data)
            try:
                # The backpressure: this sender's next frame is read only once
                # the recipient has taken this one.
                await receiver.conn.drain()
            except ConnectionClosed:
                self.abort(transfer, f"{receiver.name} disconnected")

    async def _relay_remote(self, transfer: Transfer, to: str, offset: int, data: bytes) -> None:
        """A chunk for a connection on another node: returns once that node
        says the connection drained it (the backpressure), or aborts."""
        frame = encode_frame({"type": "file.chunk", "tid": transfer.tid, "offset": offset}, data)
        transfer.offset += len(data)
        # Always bounded here: an ack lost between nodes must not hold the
        # sender's session for ever, whatever the configuration says.
        timeout = self.stall_timeout or DEFAULT_STALL_TIMEOUT
        try:
            async with asyncio.timeout(timeout):
                delivered = await self.server.hub.deliver_to(to, frame, drain=True)
        except TimeoutError:
            self.abort(
                transfer, f"{transfer.to} stopped receiving: nothing taken for {timeout:g} s"
            )
            return
        if not delivered:
            self.abort(transfer, f"{transfer.to} disconnected")

    async def on_done(self, session: Session, frame: Frame) -> None:
        transfer = self._sending(session, frame.header)
        if transfer is None:
            return
        if transfer.offset != transfer.size:
            self.abort(transfer, f"incomplete: {transfer.offset} of {transfer.size} bytes sent")
            return
        transfer.stage = Stage.DONE
        done = {"type": "file.done", "tid": transfer.tid}
        if transfer.remote is not None:
            if not await self.server.hub.deliver_to(transfer.remote, encode_frame(done)):
                self.abort(transfer, f"{transfer.to} disconnected")
            return
        assert transfer.receiver is not None
        transfer.receiver.send(done)

    async def on_result(self, session: Session, frame: Frame) -> None:
        header = frame.header
        tid = _tid(header)
        if tid in self.remote and self.remote[tid][0] is session:
            self._forget_remote(tid)
            fields = {"ok": header.get("ok") is True, "error": header.get("error")}
            fields["code"] = header.get("code")
            await self._forward(tid.rpartition(".")[0], "result", tid, session, **fields)
            return
        transfer = self.transfers.get(tid)
        if transfer is None or transfer.receiver is not session or transfer.stage is not Stage.DONE:
            raise NotFound("no transfer waiting for a result", tid=header.get("tid"))
        self._finish(transfer, header)

    def _finish(self, transfer: Transfer, header: dict[str, Any]) -> None:
        """The recipient's verdict, passed on to the sender."""
        ok = header.get("ok") is True
        result: dict[str, Any] = {"type": "file.result", "tid": transfer.tid, "ok": ok}
        if not ok:
            result["error"] = _reason({"reason": header.get("error")}, "failed")
            code = header.get("code")
            if isinstance(code, str) and _CODE.fullmatch(code):
                result["code"] = code
        self._end(transfer)
        transfer.sender.send(result)

    async def on_abort(self, session: Session, frame: Frame) -> None:
        header = frame.header
        tid = _tid(header)
        if tid in self.remote and self.remote[tid][0] is session:
            self._forget_remote(tid)
            reason = _reason(header, "cancelled")
            await self._forward(tid.rpartition(".")[0], "abort", tid, session, reason=reason)
            return
        transfer = self.transfers.get(tid)
        if transfer is None or session not in (transfer.sender, transfer.receiver):
            if tid in _files(session).ended:
                return
            raise NotFound("no such transfer", tid=tid)
        self.abort(transfer, _reason(header, "cancelled"), by=session)

    # -- ending -----------------------------------------------------------------------

    def abort(self, transfer: Transfer, reason: str, *, by: Session | str | None = None) -> None:
        """End ``transfer`` and tell both sides (but ``by``: a session, or
        the address of a recipient on another node) why."""
        if transfer.tid not in self.transfers:
            return
        self._end(transfer)
        log.info("file transfer %s aborted: %s", transfer.tid, reason)
        notice = encode_frame({"type": "file.abort", "tid": transfer.tid, "reason": reason})
        if transfer.sender is not by:
            transfer.sender.deliver(notice)
        if transfer.remote is not None:
            if transfer.remote != by:
                self._spawn(self.server.hub.deliver_to(transfer.remote, notice))
        elif transfer.receiver is not None:
            if transfer.receiver is not by:
                transfer.receiver.deliver(notice)
        else:  # still an offer: withdraw it from every connection of the recipient
            self._spawn(self.server.hub.send_to_user(transfer.to, notice))

    async def session_closed(self, session: Session) -> None:
        """Abort every transfer of a session that ended."""
        for tid in list(_files(session).tids):
            if tid in self.remote:
                address = self.remote[tid][1]
                self._forget_remote(tid)
                reason = f"{session.name} disconnected"
                await self._forward(tid.rpartition(".")[0], "abort", tid, address, reason=reason)
                continue
            transfer = self.transfers.get(tid)
            if transfer is not None:
                self.abort(transfer, f"{session.name} disconnected", by=session)

    def _track(self, transfer: Transfer, session: Session) -> None:
        self.transfers[transfer.tid] = transfer
        _files(session).tids.add(transfer.tid)

    def _end(self, transfer: Transfer) -> None:
        self.transfers.pop(transfer.tid, None)
        for session in (transfer.sender, transfer.receiver):
            if session is not None:
                files = _files(session)
                files.tids.discard(transfer.tid)
                files.ended.append(transfer.tid)
        if transfer.remote is not None:
            # The recipient's node forgets it too (at most once: if this is
            # lost, it forgets when the recipient's session ends).
            message = json.dumps({"op": "ended", "tid": transfer.tid}).encode()
            self._spawn(self.server.hub.send_route(transfer.remote, TOPIC, message))

    # -- between nodes: the recipient's node ------------------------------------------

    async def _accept_remote(self, session: Session, header: dict[str, Any], owner: str) -> None:
        """``session`` accepts a transfer owned by node ``owner``: pass it on.
        The answer is "ok" at once; if the owner finds no such offer, a
        file.abort follows (the owner checks, this node cannot)."""
        tid = _tid(header)
        offset = header.get("offset")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise BadRequest("'offset' must be a whole number >= 0")
        if tid in self.remote:
            raise NotFound("no such file offer (answered, withdrawn or never made)")
        address = self.server.hub.address(session)
        self.remote[tid] = (session, address)
        _files(session).tids.add(tid)
        if not await self._forward(owner, "accept", tid, session, offset=offset):
            self._forget_remote(tid)
            raise NotFound("no such file offer (its sender's server is gone)")
        session.reply(header, tid=tid, offset=offset)

    async def _forward(
        self, owner: str, op: str, tid: str, who: Session | str, **fields: Any
    ) -> bool:
        """Send one of the recipient's answers to the transfer's node."""
        address = who if isinstance(who, str) else self.server.hub.address(who)
        user = who.name if isinstance(who, Session) else ""
        message = {"op": op, "tid": tid, "user": user, "address": address, **fields}
        return await self.server.hub.send_route(owner, TOPIC, json.dumps(message).encode())

    def _forget_remote(self, tid: str) -> None:
        entry = self.remote.pop(tid, None)
        if entry is not None:
            files = _files(entry[0])
            files.tids.discard(tid)
            files.ended.append(tid)

    # -- between nodes: the sender's node ---------------------------------------------

    def on_route(self, origin: str, data: bytes) -> None:
        """A message from another node's relay about a transfer (the hub's
        reader calls this: it must not block)."""
        try:
            message = json.loads(data)
            op, tid = str(message["op"]), str(message["tid"])
            address = str(message.get("address", ""))
        except (ValueError, KeyError, TypeError):
            log.warning("files: a malformed message from node %s", origin)
            return
        if op == "ended":
            self._forget_remote(tid)
            return
        transfer = self.transfers.get(tid)
        if op == "accept":
            self._remote_accept(transfer, tid, message, address)
        elif op == "decline":
            if transfer is not None and self._offered_to_user(transfer, message):
                self._end(transfer)
                reason = _reason(message, "declined")
                transfer.sender.send({"type": "file.decline", "tid": tid, "reason": reason})
        elif transfer is None or transfer.remote != address:
            return  # ended meanwhile: nothing to do
        elif op == "result" and transfer.stage is Stage.DONE:
            self._finish(transfer, message)
        elif op == "abort":
            self.abort(transfer, _reason(message, "cancelled"), by=address)

    def _offered_to_user(self, transfer: Transfer, message: dict[str, Any]) -> bool:
        user = message.get("user")
        return (
            transfer.stage is Stage.OFFERED
            and isinstance(user, str)
            and fold(transfer.to) == fold(user)
        )

    def _remote_accept(
        self, transfer: Transfer | None, tid: str, message: dict[str, Any], address: str
    ) -> None:
        offset = message.get("offset")
        if (
            transfer is None
            or not self._offered_to_user(transfer, message)
            or not isinstance(offset, int)
            or not 0 <= offset <= transfer.size
            or not address
        ):
            if not address:
                return
            why = "no such file offer (answered, withdrawn or never made)"
            notice = encode_frame({"type": "file.abort", "tid": tid, "reason": why})
            self._spawn(self.server.hub.deliver_to(address, notice))
            ended = json.dumps({"op": "ended", "tid": tid}).encode()
            self._spawn(self.server.hub.send_route(address, TOPIC, ended))
            return
        transfer.stage = Stage.ACCEPTED
        transfer.remote = address
        transfer.offset = offset
        transfer.sender.send({"type": "file.accept", "tid": tid, "offset": offset})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
