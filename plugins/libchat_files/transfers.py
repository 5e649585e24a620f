"""The client side of file transfer: sending, and receiving into a folder.

One :class:`FileTransfers` per client (:func:`files_of`). The plugin's
``libchat_client_frame`` hook hands it every ``file.*`` frame. Chunks are
written (in a worker thread) before the hook returns, and the client reads
its next frame only then: a receiver that cannot keep up slows the server,
which slows the sender.

Receiving: an offer is accepted into a folder, into the hidden file
``.NAME.<sha256 prefix>.part``; if that file is already there from an
interrupted attempt, the accept carries its length and the sender resumes
from there. Only when the SHA-256 of the whole file matches the offer is it
renamed to NAME (or ``NAME (1)``..., never over an existing file).

A client that accepts offers by itself (``accept_files``) does so within
its :class:`~libchat_files.limits.ReceiveLimits`: senders, size, and room
for ``.part`` files. Whenever a transfer fails, left-over ``.part`` files
past that room (or too old) are deleted, oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

from libchat import Client, ConnectionClosed, RemoteError
from libchat.errors import ChatError, Timeout
from libchat.events import Event
from libchat.protocol import check_nick

from .errors import (
    Declined,
    FileTooLarge,
    HashMismatch,
    Interrupted,
    NoAnswer,
    NotOnline,
    TransferError,
)
from .limits import ReceiveLimits
from .names import safe_filename
from .progress import LineProgress, Progress
from .storage import PartFile, PartInUse, Room, hash_file, open_source, tidy_parts

log = logging.getLogger("libchat.files")

#: The chunk size when the server does not announce one.
DEFAULT_CHUNK_SIZE: Final = 256 << 10
#: Room left in a frame for the chunk's JSON header.
_HEADER_ROOM: Final = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EARLY_MEMORY: Final = 64
_RESULTS_MEMORY: Final = 256
#: The ``client.options`` key where a client plugin lists work that quitting
#: would cut short (the terminal client waits for it, a while, before it
#: quits): callables returning None (nothing in progress) or a description
#: and an awaitable that completes once that work is over.
UNFINISHED_OPTION: Final = "unfinished"

ProgressFactory = Callable[[str, int, int], Progress | None]
"""``factory(label, total, start)``: a progress display, or None for quiet."""


@dataclass(eq=False)
class Incoming:
    """A file offered to us, and what became of it."""

    tid: str
    sender: str
    #: the name as offered (untrusted: for display, escaped)
    offered_name: str
    #: the name it is saved under (see :func:`libchat_files.names.safe_filename`)
    name: str
    size: int
    sha256: str
    #: offered, receiving, saved, failed or declined
    state: str = "offered"
    directory: Path | None = None
    received: int = 0
    #: bytes already held from an earlier attempt when this one began
    resumed_from: int = 0
    path: Path | None = None
    error: str | None = None
    part: PartFile | None = field(default=None, repr=False)
    progress: Progress | None = field(default=None, repr=False)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


@dataclass(eq=False)
class Outgoing:
    """A file we offered, while it is being sent."""

    tid: str
    to: str
    path: Path
    size: int
    sha256: str
    #: the byte the recipient asked us to start from (more than 0: a resume)
    resumed_from: int = 0
    sent: int = 0
    #: offered (waiting for an answer), then sending (until the verdict)
    state: str = "offered"
    #: set once :meth:`FileTransfers.send` is over, whatever the outcome
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: file.accept/decline/result/abort and errors for this transfer; None
    #: when the connection is gone
    inbox: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue, repr=False)


def files_of(client: Client) -> FileTransfers:
    """The file transfers of ``client`` (made on first use; kept in
    ``client.data``, so they go when the client goes)."""
    state = client.data.get("files")
    if state is None:
        state = client.data["files"] = FileTransfers(client)
    assert isinstance(state, FileTransfers)
    return state


class FileTransfers:
    """Every file transfer of one client, both ways."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.incoming: dict[str, Incoming] = {}
        self.outgoing: dict[str, Outgoing] = {}
        #: every incoming transfer that ended (saved, failed, interrupted), in order
        self.results: asyncio.Queue[Incoming] = asyncio.Queue(_RESULTS_MEMORY)
        #: how incoming transfers show progress; by default, lines on the
        #: interactive terminal that last ran a file command, else nothing
        self.progress: ProgressFactory | None = None
        #: the terminal client using us, if any (``.out``, ``.err``)
        self.terminal: Any = client.options.get("terminal")
        #: set as the client quits: offers are no longer accepted by themselves
        self.quitting = False
        self._early: dict[str, list[Event]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        client.options.setdefault(UNFINISHED_OPTION, []).append(self.unfinished)

    @property
    def accept_dir(self) -> Path | None:
        """Where every offer is accepted automatically (``--accept-files``)."""
        folder = self.client.options.get("accept_files")
        return Path(folder).expanduser() if folder else None

    def receive_limits(self) -> ReceiveLimits:
        """What this client accepts by itself (from ``client.options``;
        ValueError for a bad option)."""
        return ReceiveLimits.from_options(self.client.options)

    def offers(self) -> list[Incoming]:
        """Offers not answered yet."""
        return [t for t in self.incoming.values() if t.state == "offered"]

    def unfinished(self) -> tuple[str, Awaitable[None]] | None:
        """The client is about to quit: accept no more offers by ourselves,
        and say what is in progress (None: nothing), with an awaitable that
        completes once it is over (listed under :data:`UNFINISHED_OPTION`)."""
        self.quitting = True
        receiving = [t for t in self.incoming.values() if t.state in ("accepting", "receiving")]
        sending = [o for o in self.outgoing.values() if o.state == "sending"]
        count = len(receiving) + len(sending)
        if not count:
            return None
        events = [t.ended for t in receiving] + [o.done for o in sending]
        return f"{count} file transfer{'s' if count > 1 else ''}", _all_set(events)

    # -- frames from the server (the hook) ----------------------------------------------

    def on_event(self, event: Event) -> Awaitable[bool | None] | bool | None:
        """Handle a ``file.*`` frame (or an error about a transfer); True
        when consumed. Chunks return an awaitable: the client's read loop
        waits for the write."""
        kind, header = event.type, event.header
        tid = header.get("tid")
        if not isinstance(tid, str):
            return None
        incoming = self.incoming.get(tid)
        if kind == "file.offer":
            return self._on_offer(event)
        if incoming is not None:
            if kind == "file.chunk":
                return self._on_chunk(incoming, event)
            if kind == "file.done":
                return self._on_done(incoming, event)
            if kind == "file.abort":
                return self._on_abort(incoming, event)
            return None
        if kind == "file.chunk":
            return True  # not a transfer we accepted: refused, dropped
        if kind in ("file.accept", "file.decline", "file.result", "file.abort", "error"):
            return self._to_outgoing(tid, event)
        return None

    def _to_outgoing(self, tid: str, event: Event) -> bool | None:
        outgoing = self.outgoing.get(tid)
        if outgoing is not None:
            outgoing.inbox.put_nowait(event)
            return True
        if event.type == "error":
            return None
        # An answer can be read before send() has seen the offer's reply and
        # registered the transfer: keep it for a moment.
        self._early.setdefault(tid, []).append(event)
        while len(self._early) > _EARLY_MEMORY:
            del self._early[next(iter(self._early))]
        return True

    def _on_offer(self, event: Event) -> bool | None:
        incoming = _incoming_from(event.header)
        if incoming is None or incoming.tid in self.incoming:
            log.warning("ignoring an invalid file offer: %r", event.header)
            return True
        self.incoming[incoming.tid] = incoming
        local: dict[str, Any] = {"name": incoming.name}
        event.header["local"] = local
        folder = self.accept_dir
        if folder is None or self.quitting:
            return None  # the application shows the offer
        try:
            refusal = self.receive_limits().refusal(incoming.sender, incoming.size)
        except ValueError as exc:
            log.error("not accepting files by ourselves: %s", exc)
            return None
        if refusal is not None:
            local["declined"] = refusal
            self._spawn(self.decline(incoming.tid, refusal))
        else:
            local["accepting"] = str(folder)
            self._spawn(self._auto_accept(incoming.tid, folder))
        return None

    async def _auto_accept(self, tid: str, folder: Path) -> None:
        try:
            await self.accept(tid, folder, automatic=True)
        except TransferError as exc:
            # %r: the text may hold what the sender or server wrote
            log.warning("could not accept file transfer %s: %r", tid, exc.message)

    async def _on_chunk(self, incoming: Incoming, event: Event) -> bool:
        data = event.body
        async with incoming.lock:
            if incoming.state != "receiving" or incoming.part is None:
                return True
            if event.header.get("offset") != incoming.received:
                await self._abort(incoming, "chunk out of order")
                return True
            if incoming.received + len(data) > incoming.size:
                await self._abort(incoming, "more bytes than declared")
                return True
            try:
                await asyncio.to_thread(incoming.part.write, data)
            except OSError as exc:
                await self._abort(incoming, f"cannot write the file: {exc.strerror or exc}")
                return True
            incoming.received += len(data)
            if incoming.progress is not None:
                incoming.progress.update(incoming.received)
        return True

    async def _on_done(self, incoming: Incoming, event: Event) -> None:
        async with incoming.lock:
            if incoming.state == "receiving" and incoming.part is not None:
                await self._verify(incoming, incoming.part)
        event.header["local"] = _summary(incoming)
        return None  # the application shows the outcome

    async def _verify(self, incoming: Incoming, part: PartFile) -> None:
        incoming.part = None  # finished or discarded below, never written again
        if incoming.received != incoming.size:
            error, code = f"incomplete: {incoming.received} of {incoming.size} bytes", "incomplete"
        elif part.digest.hexdigest() != incoming.sha256:
            error = "hash mismatch: the data received is not the file offered"
            code = "hash_mismatch"
        else:
            try:
                incoming.path = await asyncio.to_thread(part.finish)
            except OSError as exc:
                error, code = f"cannot save the file: {exc.strerror or exc}", "write_failed"
            else:
                self._end(incoming, "saved")
                self._queue({"type": "file.result", "tid": incoming.tid, "ok": True})
                return
        await asyncio.to_thread(part.discard)
        self._end(incoming, "failed", error)
        result = {"type": "file.result", "tid": incoming.tid, "ok": False}
        self._queue({**result, "error": error, "code": code})

    async def _on_abort(self, incoming: Incoming, event: Event) -> None:
        reason = str(event.header.get("reason") or "aborted")
        async with incoming.lock:
            if incoming.state in ("offered", "accepting", "receiving"):
                await self._close_part(incoming)
                self._end(incoming, "failed", f"interrupted: {reason}")
        event.header["local"] = _summary(incoming)

    # -- receiving: the application's side ----------------------------------------------

    async def accept(
        self, tid: str, folder: str | Path | None = None, *, automatic: bool = False
    ) -> Incoming:
        """Accept offer ``tid`` into ``folder`` (default: ``accept_files``,
        else the current directory). Returns once the sender was told;
        ``await`` :meth:`wait` for the file. Raises TransferError.

        Left-over ``.part`` files in the folder past the receive limits are
        deleted first, oldest first; an ``automatic`` accept (not a person's
        decision) that still does not fit is declined."""
        incoming = self._offer(tid)
        directory = _directory(folder, self.accept_dir)
        incoming.state = "accepting"
        try:
            part = await asyncio.to_thread(
                PartFile, directory, incoming.name, incoming.sha256, incoming.size
            )
        except (OSError, PartInUse) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            incoming.state = "offered"
            await self.decline(tid, f"cannot write there: {why}")
            raise TransferError(f"cannot receive into {directory}: {why}") from None
        # Its room is reserved from now on: accepts into the same folder
        # meanwhile count it.
        incoming.part, incoming.directory = part, directory
        fits = await self._make_room(directory)
        if incoming.state != "accepting":  # withdrawn meanwhile (the .part is closed)
            raise Interrupted(incoming.error or "the offer was withdrawn")
        if automatic and not fits:
            incoming.part = None
            await asyncio.to_thread(part.close)
            room = self._room()
            reason = (
                f"no room: this receiver keeps at most {room.quota} bytes "
                f"in {room.max_files} partial files"
            )
            incoming.state = "offered"
            await self.decline(tid, reason)
            raise TransferError(f"declined file transfer {tid}: {reason}")
        incoming.received = incoming.resumed_from = part.offset
        incoming.state = "receiving"
        incoming.progress = self._progress_for(incoming)
        self._watch()
        try:
            await self.client.request({"type": "file.accept", "tid": tid, "offset": part.offset})
        except (RemoteError, ConnectionClosed, Timeout) as exc:
            async with incoming.lock:
                await self._close_part(incoming)
                self._end(incoming, "failed", f"interrupted: {exc.message}")
            raise Interrupted(exc.message) from None
        return incoming

    async def decline(self, tid: str, reason: str = "declined") -> None:
        """Decline offer ``tid``."""
        incoming = self._offer(tid)
        self._end(incoming, "declined", reason)
        with contextlib.suppress(RemoteError):
            await self.client.request({"type": "file.decline", "tid": tid, "reason": reason})

    async def wait(self, tid: str, timeout: float | None = None) -> Incoming:
        """The incoming transfer ``tid`` once it has ended (look at
        ``state``, ``path`` and ``error``)."""
        incoming = self.incoming.get(tid)
        if incoming is None:
            raise TransferError(f"no incoming transfer {tid}")
        await asyncio.wait_for(incoming.ended.wait(), timeout)
        return incoming

    def _offer(self, tid: str) -> Incoming:
        incoming = self.incoming.get(tid)
        if incoming is None or incoming.state != "offered":
            raise TransferError(f"no open file offer with id {tid}")
        return incoming

    def _progress_for(self, incoming: Incoming) -> Progress | None:
        label = f"{incoming.name} <- {incoming.sender}"
        if self.progress is not None:
            return self.progress(label, incoming.size, incoming.received)
        return self.terminal_progress(label, incoming.size, incoming.received)

    def terminal_progress(self, label: str, total: int, start: int) -> Progress | None:
        """Lines on the interactive terminal, if there is one (quiet when
        output is not a terminal)."""
        terminal = self.terminal
        if terminal is None or not _stdout_is_tty():
            return None
        return LineProgress(terminal.out, label, total, start)

    async def _abort(self, incoming: Incoming, reason: str) -> None:
        """Give up on an incoming transfer (caller holds its lock): the
        .part stays for a resume."""
        await self._close_part(incoming)
        self._end(incoming, "failed", reason)
        self._queue({"type": "file.abort", "tid": incoming.tid, "reason": reason})

    async def _close_part(self, incoming: Incoming) -> None:
        """Close the .part of a transfer that failed: it stays for a resume
        if it holds bytes and fits the receive limits with the newest
        leftovers (older ones go first)."""
        part, incoming.part = incoming.part, None
        if part is None:
            return
        await asyncio.to_thread(part.close)
        if part.offset:
            await self._make_room(part.directory)

    def _room(self) -> Room:
        try:
            limits = self.receive_limits()
        except ValueError:
            limits = ReceiveLimits()
        return Room(limits.part_quota, limits.max_part_files, limits.part_max_age)

    async def _make_room(self, directory: Path) -> bool:
        """Tidy ``directory``'s left-over .part files (see
        :func:`~libchat_files.storage.tidy_parts`), with room reserved for
        our transfers into it at their full size; whether they all fit."""
        writing = [(t.part, t.size) for t in self.incoming.values() if t.part is not None]
        in_use = [part.path for part, _ in writing if part.directory == directory]
        reserved = sum(size for part, size in writing if part.directory == directory)
        try:
            return await asyncio.to_thread(
                tidy_parts, directory, self._room(), in_use=in_use, reserved=reserved
            )
        except OSError as exc:
            log.warning("could not tidy the .part files of %s: %s", directory, exc)
            return False

    def _end(self, incoming: Incoming, state: str, error: str | None = None) -> None:
        if incoming.ended.is_set():
            return
        incoming.state, incoming.error = state, error
        if incoming.progress is not None:
            incoming.progress.finish(state == "saved")
        incoming.ended.set()
        self._forget_old()
        if self.results.full():
            self.results.get_nowait()
        self.results.put_nowait(incoming)

    def _forget_old(self) -> None:
        """Keep the outcome of the last transfers only (a long session may
        see many)."""
        ended = [tid for tid, t in self.incoming.items() if t.ended.is_set()]
        for tid in ended[: max(len(ended) - _RESULTS_MEMORY, 0)]:
            del self.incoming[tid]

    def _queue(self, header: dict[str, Any]) -> None:
        """Queue a small control frame without waiting for the connection to
        drain. This runs in the client's read loop: waiting there for our
        own output could deadlock two clients sending files to each other
        (each server session relaying to the other, each read loop waiting)."""
        if not self.client.closed:
            self.client.conn.send(header)

    # -- sending ------------------------------------------------------------------------

    async def send(
        self,
        to: str,
        path: str | Path,
        *,
        progress: ProgressFactory | None = None,
        answer_timeout: float | None = None,
        rate: float | None = None,
        on_offered: Callable[[Outgoing], None] | None = None,
    ) -> Outgoing:
        """Send the file at ``path`` to user ``to``; return once the
        recipient holds all of it and its SHA-256 matched. ``rate`` caps
        the bytes per second. Raises a :class:`TransferError`: Declined,
        NotOnline, FileTooLarge, NoAnswer, Interrupted or HashMismatch."""
        path = Path(path)
        check_nick(to)
        self._check_server()
        try:
            size, sha256 = await asyncio.to_thread(hash_file, path)
        except OSError as exc:
            raise TransferError(f"cannot read {path}: {exc.strerror or exc}") from None
        outgoing = await self._offer_file(to, path, size, sha256)
        try:
            if on_offered is not None:
                on_offered(outgoing)
            outgoing.resumed_from = await self._answer(outgoing, answer_timeout)
            outgoing.state = "sending"
            label = f"{path.name} -> {outgoing.to}"
            shown = progress(label, size, outgoing.resumed_from) if progress else None
            try:
                await self._stream(outgoing, shown, rate)
                await self._result(outgoing)
            except BaseException:
                if shown is not None:
                    shown.finish(False)
                raise
            if shown is not None:
                shown.finish(True)
            return outgoing
        except BaseException as exc:
            await self._withdraw(outgoing, exc)
            raise
        finally:
            self.outgoing.pop(outgoing.tid, None)
            outgoing.done.set()

    def _check_server(self) -> None:
        if "files" not in self.client.welcome.get("plugins", []):
            raise TransferError("this server does not run the files plugin")

    def _limit(self, name: str) -> int | None:
        value = self.client.welcome.get("limits", {}).get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    async def _offer_file(self, to: str, path: Path, size: int, sha256: str) -> Outgoing:
        limit = self._limit("max_file_size")
        if limit and size > limit:
            raise FileTooLarge(f"{path.name} is {size} bytes; the server's limit is {limit}")
        offer = {"type": "file.offer", "to": to, "name": path.name, "size": size}
        try:
            reply = await self.client.request({**offer, "sha256": sha256})
        except RemoteError as exc:
            raise _offer_error(exc, to) from None
        except ConnectionClosed as exc:
            raise Interrupted(exc.message) from None
        tid = str(reply.get("tid"))
        outgoing = self.outgoing[tid] = Outgoing(tid, to, path, size, sha256)
        for event in self._early.pop(tid, []):
            outgoing.inbox.put_nowait(event)
        self._watch()
        return outgoing

    async def _answer(self, outgoing: Outgoing, timeout: float | None) -> int:
        """The offset the recipient accepted from, or the reason it did not."""
        try:
            event = await asyncio.wait_for(outgoing.inbox.get(), timeout)
        except TimeoutError:
            raise NoAnswer(f"{outgoing.to} did not answer in {timeout:g} s") from None
        if event is not None and event.type == "file.decline":
            reason = str(event.header.get("reason") or "declined")
            raise Declined(f"{outgoing.to} declined the file: {reason}")
        if event is None or event.type != "file.accept":
            raise _interruption(event, self.client)
        offset = event.header.get("offset")
        if not isinstance(offset, int) or not 0 <= offset <= outgoing.size:
            raise Interrupted(f"the recipient asked for offset {offset!r}")
        return offset

    async def _stream(
        self, outgoing: Outgoing, progress: Progress | None, rate: float | None
    ) -> None:
        """Send the file from the accepted offset, one chunk frame at a
        time; each send waits for the connection to drain, so chat frames
        queued meanwhile go out between chunks."""
        chunk = self._chunk_size()
        position = outgoing.resumed_from
        source = await asyncio.to_thread(open_source, outgoing.path, position)
        began = time.monotonic()
        try:
            while position < outgoing.size:
                self._check_inbox(outgoing)
                data = await asyncio.to_thread(source.read, min(chunk, outgoing.size - position))
                if not data:
                    raise TransferError(f"{outgoing.path} shrank while it was being sent")
                header = {"type": "file.chunk", "tid": outgoing.tid, "offset": position}
                await self._send_data(header, data)
                position += len(data)
                outgoing.sent = position
                if progress is not None:
                    progress.update(position)
                if rate:
                    await _pace(began, position - outgoing.resumed_from, rate)
            await self._send_data({"type": "file.done", "tid": outgoing.tid})
        finally:
            await asyncio.to_thread(_close, source)

    async def _send_data(self, header: dict[str, Any], data: bytes = b"") -> None:
        try:
            await self.client.send_frame(header, data)
        except ConnectionClosed as exc:
            raise Interrupted(f"connection lost: {exc.message}") from None

    def _chunk_size(self) -> int:
        announced = self._limit("file_chunk_size") or DEFAULT_CHUNK_SIZE
        frame = self._limit("max_frame_size") or (1 << 20)
        return max(min(announced, frame - _HEADER_ROOM), 1)

    def _check_inbox(self, outgoing: Outgoing) -> None:
        """Stop sending at once if the transfer was aborted meanwhile."""
        while not outgoing.inbox.empty():
            event = outgoing.inbox.get_nowait()
            if event is None or event.type in ("file.abort", "error", "file.result"):
                raise _interruption(event, self.client)

    async def _result(self, outgoing: Outgoing) -> None:
        event = await outgoing.inbox.get()
        if event is None or event.type != "file.result":
            raise _interruption(event, self.client)
        if event.header.get("ok") is True:
            return
        error = str(event.header.get("error") or "the recipient could not verify the file")
        if event.header.get("code") == "hash_mismatch":
            raise HashMismatch(f"{outgoing.to} received the file but its SHA-256 differs: {error}")
        raise TransferError(f"{outgoing.to} could not save the file: {error}")

    async def _withdraw(self, outgoing: Outgoing, exc: BaseException) -> None:
        """Tell the server a transfer we gave up on is over. When it already
        ended there (aborted, or a failed result) the server drops this
        quietly."""
        if isinstance(exc, Declined) or self.client.closed:
            return
        reason = exc.message if isinstance(exc, ChatError) else "cancelled"
        with contextlib.suppress(ConnectionClosed):
            await asyncio.shield(
                self.client.send_frame(
                    {"type": "file.abort", "tid": outgoing.tid, "reason": reason[:200]}
                )
            )

    async def cancel(self, tid: str, reason: str = "cancelled") -> None:
        """Stop transfer ``tid``, either way (or decline it if still an offer)."""
        incoming = self.incoming.get(tid)
        if incoming is not None and incoming.state == "offered":
            await self.decline(tid, reason)
        elif incoming is not None and incoming.state == "receiving":
            async with incoming.lock:
                if incoming.state == "receiving":
                    await self._abort(incoming, reason)
        elif tid in self.outgoing:
            self._queue({"type": "file.abort", "tid": tid, "reason": reason})
            self.outgoing[tid].inbox.put_nowait(
                Event("file.abort", {"type": "file.abort", "tid": tid, "reason": reason})
            )
        else:
            raise TransferError(f"no transfer with id {tid}")

    # -- the connection's end -----------------------------------------------------------

    def _watch(self) -> None:
        """Once transfers exist, notice when the connection ends: pending
        sends fail as interrupted, open .part files are closed (and kept)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_close(), name="libchat-files-watch")

    async def _watch_close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.wait_closed()
        for outgoing in list(self.outgoing.values()):
            outgoing.inbox.put_nowait(None)
        reason = f"interrupted: {self.client.close_reason or 'connection closed'}"
        for incoming in list(self.incoming.values()):
            async with incoming.lock:
                if incoming.state in ("offered", "accepting", "receiving"):
                    await self._close_part(incoming)
                    self._end(incoming, "failed", reason)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background, kept alive until it ends (the
        terminal commands start transfers this way)."""
        self._spawn(coro)


def _incoming_from(header: dict[str, Any]) -> Incoming | None:
    """An offer from the server, checked: a hostile server gets no further
    than a bad name (made safe) or a refused offer."""
    tid, sender, name = header.get("tid"), header.get("from"), header.get("name")
    size, sha256 = header.get("size"), header.get("sha256")
    try:
        check_nick(sender)
    except ChatError:
        return None
    if (
        not isinstance(tid, str)
        or not isinstance(size, int)
        or isinstance(size, bool)
        or size < 0
        or not isinstance(sha256, str)
        or not _SHA256.fullmatch(sha256)
    ):
        return None
    shown = name if isinstance(name, str) else ""
    return Incoming(tid, str(sender), shown, safe_filename(name), size, sha256)


def _summary(incoming: Incoming) -> dict[str, Any]:
    """What the receiving client adds to file.done / file.abort events
    (``header["local"]``) for the application to show."""
    summary: dict[str, Any] = {
        "name": incoming.name,
        "from": incoming.sender,
        "size": incoming.size,
        "state": incoming.state,
        "received": incoming.received,
    }
    if incoming.path is not None:
        summary["path"] = str(incoming.path)
    if incoming.error:
        summary["error"] = incoming.error
    return summary


def _offer_error(exc: RemoteError, to: str) -> TransferError:
    if exc.remote_code == "not_found":
        return NotOnline(exc.message)
    if exc.remote_code == "file_too_large":
        return FileTooLarge(exc.message)
    return TransferError(f"the server refused the offer: {exc.message}")


def _interruption(event: Event | None, client: Client) -> TransferError:
    if event is None:
        return Interrupted(f"connection lost: {client.close_reason or 'connection closed'}")
    header = event.header
    if event.type == "error":
        return Interrupted(f"the server refused the transfer: {header.get('message')}")
    if event.type == "file.abort":
        return Interrupted(str(header.get("reason") or "aborted"))
    return Interrupted(f"unexpected {event.type!r} from the server")


async def _all_set(events: list[asyncio.Event]) -> None:
    for event in events:
        await event.wait()


async def _pace(began: float, sent: int, rate: float) -> None:
    """Sleep until ``sent`` bytes at ``rate`` bytes a second are due."""
    ahead = began + sent / rate - time.monotonic()
    if ahead > 0:
        await asyncio.sleep(ahead)


def _directory(folder: str | Path | None, fallback: Path | None) -> Path:
    if folder:
        return Path(folder).expanduser()
    return fallback or Path.cwd()


def _close(source: BinaryIO) -> None:
    source.close()


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False
