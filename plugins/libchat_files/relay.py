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
session: chunks go to that connection, in this process. The plugin
therefore refuses to start on a distributed hub (``chat serve --hub``); see
:func:`check_hub`.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from libchat import Server, Session
from libchat.errors import BadRequest, ConnectionClosed, NotFound, RateLimited
from libchat.hub import LocalHub
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
    receiver: Session | None = None
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


def check_hub(server: Server) -> None:
    """Refuse to run on a distributed hub: chunks go to the accepting
    connection in this process and transfer ids are per process, so an
    offer to a user on another server could be accepted but never served."""
    if not isinstance(server.hub, LocalHub):
        raise InvalidPlugin(
            "the files plugin does not work across several servers yet (--hub); "
            "run it on a single server"
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
        self._ids = itertools.count(1)
        self._background: set[asyncio.Future[Any]] = set()

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
        transfer = Transfer(str(next(self._ids)), session, recipient, name, size, sha256)
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

    async def on_accept(self, session: Session, frame: Frame) -> None:
        await session.throttle()
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

    async def on_done(self, session: Session, frame: Frame) -> None:
        transfer = self._sending(session, frame.header)
        if transfer is None:
            return
        if transfer.offset != transfer.size:
            self.abort(transfer, f"incomplete: {transfer.offset} of {transfer.size} bytes sent")
            return
        transfer.stage = Stage.DONE
        assert transfer.receiver is not None
        transfer.receiver.send({"type": "file.done", "tid": transfer.tid})

    async def on_result(self, session: Session, frame: Frame) -> None:
        header = frame.header
        transfer = self.transfers.get(_tid(header))
        if transfer is None or transfer.receiver is not session or transfer.stage is not Stage.DONE:
            raise NotFound("no transfer waiting for a result", tid=header.get("tid"))
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
        transfer = self.transfers.get(tid)
        if transfer is None or session not in (transfer.sender, transfer.receiver):
            if tid in _files(session).ended:
                return
            raise NotFound("no such transfer", tid=tid)
        self.abort(transfer, _reason(header, "cancelled"), by=session)

    # -- ending -----------------------------------------------------------------------

    def abort(self, transfer: Transfer, reason: str, *, by: Session | None = None) -> None:
        """End ``transfer`` and tell both sides (but ``by``) why."""
        if transfer.tid not in self.transfers:
            return
        self._end(transfer)
        log.info("file transfer %s aborted: %s", transfer.tid, reason)
        notice = encode_frame({"type": "file.abort", "tid": transfer.tid, "reason": reason})
        if transfer.sender is not by:
            transfer.sender.deliver(notice)
        if transfer.receiver is not None:
            if transfer.receiver is not by:
                transfer.receiver.deliver(notice)
        else:  # still an offer: withdraw it from every connection of the recipient
            self._spawn(self.server.hub.send_to_user(transfer.to, notice))

    async def session_closed(self, session: Session) -> None:
        """Abort every transfer of a session that ended."""
        for tid in list(_files(session).tids):
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
