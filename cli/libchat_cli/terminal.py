"""The terminal client behind ``chat join``.

Two faces over one command loop:

* interactive (stdin and stdout are a terminal): prompt_toolkit keeps the
  input line at the bottom; incoming events print above it without garbling
  what the user is typing;
* pipe (anything else): each input line is sent, a line starting with ``/``
  is a command; each event is printed as one flushed line (``--json``: one
  JSON object), errors go to stderr.

``quit``, ``/quit``, end of input (Ctrl-D) leave cleanly with status 0; a
session the server ends (shutdown, drop) exits with status 1.

A client that accepts files by itself (``--accept-files``, the
``accept_files`` option) is a receiver meant to run unattended (cron,
systemd, ``</dev/null``): in a pipe, the end of its input does not make it
leave; it runs until ``quit``, Ctrl-C, SIGTERM or the server ends the
session. Before leaving, any client gives work that quitting would cut short
(file transfers in progress, as plugins list it under
:data:`UNFINISHED_OPTION`) up to ``quit_wait`` seconds to finish, and says
what it leaves unfinished.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import io
import logging
import os
import re
import select
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

from libchat import ChatError, Client, ClientCommand, ConnectionClosed
from libchat.errors import UnknownCommand
from libchat.events import ErrorEvent, Event
from libchat.server import CORE_COMMANDS

from .render import as_json, clean, format_event

HELP = {
    "join": ("/join ROOM", "join ROOM (it becomes your current room)"),
    "part": ("/part [ROOM]", "leave ROOM (default: the current room)"),
    "who": ("/who [ROOM]", "list the members of ROOM"),
    "rooms": ("/rooms", "list the rooms and their sizes"),
    "me": ("/me ACTION", "say ACTION about yourself"),
    "help": ("/help", "this list"),
    "quit": ("/quit [REASON]", "leave (a plain 'quit' line does too)"),
}
assert set(HELP) == set(CORE_COMMANDS)

#: Lines of stdin read ahead of the network: a huge input file is read no
#: faster than it is sent, so memory stays bounded.
STDIN_BACKLOG = 64

# A paste of several lines arrives as one input: each line is sent on its own.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

#: Seconds a quitting client waits for unfinished work (file transfers).
QUIT_WAIT: Final = 30.0
#: The ``client.options`` key under which client plugins list work that
#: quitting would cut short: callables that return None (nothing in
#: progress) or ``(description, awaitable)``, the awaitable completing once
#: that work is over. Calling one also tells the plugin the client is
#: leaving (the files plugin then accepts no more offers by itself).
UNFINISHED_OPTION: Final = "unfinished"

log = logging.getLogger("libchat.cli")


class Quit(Exception):
    """The user asked to leave."""


class OutputClosed(Exception):
    """Whoever read our stdout went away (``chat join | head -3``)."""


class Terminal:
    """Runs user input against a client and prints what comes back."""

    def __init__(
        self,
        client: Client,
        *,
        json_mode: bool = False,
        out: Callable[[str], None] | None = None,
        err: Callable[[str], None] | None = None,
        quit_wait: float = QUIT_WAIT,
    ) -> None:
        self.client = client
        self.json_mode = json_mode
        self.out = out or _print_out
        self.err = err or _print_err
        self.quit_wait = quit_wait
        self.quit_requested = False
        #: set by a second SIGTERM: leave without waiting for unfinished work
        self._hurry = asyncio.Event()
        # Client plugins reach the terminal here (the files plugin shows the
        # progress of transfers it accepted by itself).
        client.options.setdefault("terminal", self)
        self.bye_shown = False
        self.output_closed = False
        self.local_commands = _local_commands(client)

    # -- output -----------------------------------------------------------------------

    def show_event(self, event: Event) -> None:
        if self.json_mode:
            self.out(as_json(event.header))
        elif isinstance(event, ErrorEvent) or event.type == "bye":
            if event.type == "bye":
                if self.quit_requested:
                    return
                self.bye_shown = True
            self.err(format_event(event, self.client.pm))
        else:
            self.out(format_event(event, self.client.pm))

    def info(self, header: dict[str, Any], text: str) -> None:
        """A command's result: JSON in --json mode, else a line of text."""
        self.out(as_json(header) if self.json_mode else text)

    async def print_events(self) -> None:
        """Print every event until the connection ends (or stdout does)."""
        try:
            async for event in self.client:
                self.show_event(event)
        except OutputClosed:
            self.output_closed = True

    # -- input ------------------------------------------------------------------------

    async def handle_line(self, line: str) -> None:
        """Run one line of input; raise Quit to leave, ConnectionClosed when
        the connection is gone. Every other error is printed and the client
        goes on."""
        line = line.rstrip("\r\n")
        if line.strip() == "quit":
            raise Quit("quit")
        if not line.strip():
            return
        try:
            if line.startswith("/") and not line.startswith("//"):
                await self.command(line[1:])
            else:
                await self.client.send(line[1:] if line.startswith("//") else line)
        except ConnectionClosed:
            raise
        except ChatError as exc:  # refused by the server, a bad name, a timeout
            self.err(f"error: {clean(exc.message)}")
        except ValueError as exc:  # a usage mistake caught before sending
            self.err(f"error: {clean(str(exc))}")

    async def command(self, text: str) -> None:
        name, _, args = text.partition(" ")
        name, args = name.lower(), args.strip()
        if name in CORE_COMMANDS:
            await self.core_command(name, args)
        elif name in self.local_commands:
            await self.local_command(self.local_commands[name], args)
        elif self.knows_server_commands() and name not in self.server_commands():
            available = ", ".join("/" + n for n in self.command_names())
            raise UnknownCommand(f"unknown command /{name}; available: {available}")
        else:
            reply = await self.client.command(name, args)
            if reply.get("text"):
                self.info(reply, clean(str(reply["text"])))

    async def core_command(self, name: str, args: str) -> None:
        client = self.client
        if name == "quit":
            raise Quit(args or "quit")
        if name == "join":
            if not args:
                raise ValueError("usage: /join ROOM")
            members = await client.join(args)
            self.show_members(client.room or args, members)
        elif name == "part":
            await client.part(args or None)
        elif name == "who":
            room = args or client.room
            if not room:
                raise ValueError("you are in no room: /who ROOM")
            reply = await client.request({"type": "who", "room": room})
            members = [str(m) for m in reply.get("members", [])]
            self.show_members(str(reply.get("room", room)), members, _more(reply, len(members)))
        elif name == "rooms":
            reply = await client.request({"type": "rooms"})
            rooms = [(str(r["room"]), int(r["members"])) for r in reply.get("rooms", [])]
            listing = ", ".join(f"{clean(r)} ({n})" for r, n in rooms) or "none"
            self.info(
                {"type": "rooms", "rooms": [{"room": r, "members": n} for r, n in rooms]},
                f"rooms: {listing}{_more(reply, len(rooms))}",
            )
        elif name == "me":
            if not args:
                raise ValueError("usage: /me ACTION")
            await client.send(args, action=True)
        elif name == "help":
            self.show_help()

    def show_members(self, room: str, members: list[str], more: str = "") -> None:
        self.info(
            {"type": "members", "room": room, "members": members},
            f"[{clean(room)}] members: {clean(', '.join(members))}{more}",
        )

    async def local_command(self, command: ClientCommand, args: str) -> None:
        """A plugin's client-side command (``/send``); a plugin bug is
        reported as an error line, never a crash of the client."""
        try:
            result = command.handler(self, args)
            if inspect.isawaitable(result):
                await result
        except (Quit, ChatError, ValueError):
            raise
        except Exception as exc:
            self.err(f"error: /{command.name} failed: {clean(repr(exc))}")

    # -- the list of commands ---------------------------------------------------------

    def knows_server_commands(self) -> bool:
        """Whether the server listed its commands in the welcome (it does):
        then an unknown command is reported at once, with the full list."""
        return isinstance(self.client.welcome.get("commands"), list)

    def server_commands(self) -> dict[str, dict[str, Any]]:
        """The server's plugin commands, by lower-case name."""
        found = self.client.welcome.get("commands")
        if not isinstance(found, list):
            return {}
        return {
            str(c.get("name", "")).lower(): c
            for c in found
            if isinstance(c, dict) and c.get("name")
        }

    def command_names(self) -> list[str]:
        return sorted({*CORE_COMMANDS, *self.local_commands, *self.server_commands()})

    def help_entries(self) -> list[tuple[str, str]]:
        entries = list(HELP.values())
        for name, cmd in sorted(self.server_commands().items()):
            entries.append((str(cmd.get("usage") or "/" + name), str(cmd.get("help", ""))))
        for name, local in sorted(self.local_commands.items()):
            entries.append((local.usage or "/" + name, local.help))
        return entries

    def show_help(self) -> None:
        entries = self.help_entries()
        if self.json_mode:
            listing = [{"usage": usage, "help": text} for usage, text in entries]
            self.out(as_json({"type": "help", "commands": listing}))
        else:
            self.out(self.help_text())

    def help_text(self) -> str:
        """The /help listing as plain text."""
        lines = ["commands:"]
        lines += [f"  {clean(usage):<18} {clean(text)}" for usage, text in self.help_entries()]
        lines.append("  (a line starting with // sends a line starting with /)")
        return "\n".join(lines)

    # -- the two faces ----------------------------------------------------------------

    @property
    def keeps_running(self) -> bool:
        """Whether the end of input leaves this client running: it accepts
        files by itself (a receiver that runs unattended)."""
        return bool(self.client.options.get("accept_files"))

    async def run_pipe(self) -> int:
        """Read lines from stdin until quit or end of input (for a client
        that :attr:`keeps_running`: until quit, SIGTERM or the server ends
        the session)."""
        _tolerant_stdout()
        lines = _StdinLines()
        printer = asyncio.create_task(self.print_events(), name="chat-printer")
        with self._sigterm_quits() as terminated:
            while True:
                try:
                    line = await self._next_input(lines, printer, terminated)
                    if line is None:  # the connection (or stdout) ended
                        return await self._printer_ended(printer)
                    await self.handle_line(line)
                except Quit as leave:
                    return await self._leave(str(leave), printer)
                except ConnectionClosed:
                    return self._lost()
                except OutputClosed:
                    self.output_closed = True
                    return await self._printer_ended(printer)

    async def _next_input(
        self, lines: _StdinLines, printer: asyncio.Task[None], terminated: asyncio.Future[None]
    ) -> str | None:
        """The next line of input; None once the printer ended (the
        connection or stdout did). Raises Quit at the end of input (unless
        the client :attr:`keeps_running`) and on SIGTERM."""
        while True:
            get = None if lines.ended else asyncio.create_task(lines.get())
            waiting: set[asyncio.Future[Any]] = {printer, terminated}
            if get is not None:
                waiting.add(get)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if get is not None and get in done:
                line = get.result()
                if line is not None:
                    return line
                if not self.keeps_running:
                    raise Quit("quit")
                continue  # input ended; wait for the connection or a signal
            if get is not None:
                await _cancel(get)
            if terminated in done:
                raise Quit("terminated")
            return None

    @contextlib.contextmanager
    def _sigterm_quits(self) -> Iterator[asyncio.Future[None]]:
        """For a client that :attr:`keeps_running`: SIGTERM resolves the
        future (the client quits as for ``quit``); a second one hurries the
        quit. Other clients keep the default (SIGTERM ends the process)."""
        loop = asyncio.get_running_loop()
        terminated: asyncio.Future[None] = loop.create_future()

        def on_sigterm() -> None:
            if terminated.done():
                self._hurry.set()
            else:
                terminated.set_result(None)

        installed = False
        if self.keeps_running:
            # Not in the main thread, or not on Unix: leave the default.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGTERM, on_sigterm)
                installed = True
        try:
            yield terminated
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGTERM)
            if not terminated.done():
                terminated.cancel()

    async def run_interactive(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        session: PromptSession[str] = PromptSession()
        # patch_stdout prints above the input line and redraws it after; not
        # raw, so it would also neuter an escape sequence that got past clean().
        with patch_stdout():
            user = clean(self.client.user)
            self.out(f"connected as {user}; /help lists the commands, quit leaves")
            printer = asyncio.create_task(self.print_events(), name="chat-printer")
            while True:
                ask = asyncio.create_task(session.prompt_async(self.prompt_text))
                done, _ = await asyncio.wait({ask, printer}, return_when=asyncio.FIRST_COMPLETED)
                if ask not in done:  # the server ended the session
                    await _cancel(ask)
                    return self._lost()
                try:
                    text = ask.result()
                except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
                    return await self._leave("quit", printer)
                try:
                    for line in _LINE_BREAK.split(text):
                        await self.handle_line(line)
                except Quit as leave:
                    return await self._leave(str(leave), printer)
                except ConnectionClosed:
                    return self._lost()

    def prompt_text(self) -> str:
        """The prompt, re-evaluated at each redraw: it follows the room."""
        return f"[{clean(self.client.room or '-')}] > "

    async def _leave(self, reason: str, printer: asyncio.Task[None]) -> int:
        """Say goodbye once unfinished work is over (or given up on);
        everything the server sent before is printed first."""
        self.quit_requested = True
        await self.finish_work()
        await self.client.quit(reason)
        with contextlib.suppress(TimeoutError):  # wait_for cancels it then
            await asyncio.wait_for(printer, 5)
        return 0

    async def finish_work(self) -> None:
        """Give the work that quitting would cut short (file transfers) up
        to :attr:`quit_wait` seconds to finish; say what is left over."""
        pending = self._unfinished()
        if not pending:
            return
        what = ", ".join(description for description, _ in pending)
        work: asyncio.Future[Any] = asyncio.gather(*(done for _, done in pending))
        hurry: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
        try:
            if self.client.closed:
                return  # nothing more can arrive; the plugins see the end themselves
            self.err(
                f"waiting for {what} to finish (at most {self.quit_wait:g} s; "
                "Ctrl-C or a second SIGTERM leaves now)"
            )
            await asyncio.wait(
                {work, hurry}, timeout=self.quit_wait, return_when=asyncio.FIRST_COMPLETED
            )
            if not work.done():
                self.err(f"leaving with {what} unfinished")
        finally:
            await _cancel(hurry)
            await _cancel(work)

    def _unfinished(self) -> list[tuple[str, Awaitable[Any]]]:
        """What the client plugins say is in progress (UNFINISHED_OPTION)."""
        found = []
        for check in list(self.client.options.get(UNFINISHED_OPTION) or ()):
            try:
                item = check()
            except Exception:  # a plugin bug must not keep the user from leaving
                log.exception("a plugin failed to say what it has in progress")
                continue
            if item is not None:
                found.append((clean(str(item[0])), item[1]))
        return found

    async def _printer_ended(self, printer: asyncio.Task[None]) -> int:
        if not self.output_closed:
            return self._lost()
        # Nobody reads us any more: leave politely and quietly.
        await self._leave("quit", printer)
        return 1

    def _lost(self) -> int:
        """The server ended the session (shutdown, drop, crash): exit 1."""
        if not self.bye_shown:
            self.err(f"disconnected: {clean(self.client.close_reason or 'connection closed')}")
        return 1


def _more(reply: dict[str, Any], shown: int) -> str:
    """ ", and 1,234 more" when the server cut a long list short."""
    total = reply.get("total")
    if reply.get("truncated") and isinstance(total, int) and total > shown:
        return f", and {total - shown:,} more"
    return ""


def _local_commands(client: Client) -> dict[str, ClientCommand]:
    """Client-side plugin commands by lower-case name; a core command's name
    cannot be taken."""
    found: dict[str, ClientCommand] = {}
    for commands in client.pm.hook.libchat_client_commands():
        for command in commands or ():
            name = command.name.lower().lstrip("/")
            if name not in CORE_COMMANDS:
                found.setdefault(name, command)
    return found


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and let it finish (a prompt restores the terminal)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class _StdinLines:
    """Lines of stdin, read by a daemon thread: works for pipes and regular
    files alike, never blocks the loop, never delays exit. The thread reads
    at most STDIN_BACKLOG lines ahead of the sender (backpressure: a huge
    input file does not fill memory). ``None`` marks the end of input."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._room = threading.Semaphore(STDIN_BACKLOG)
        self._loop = asyncio.get_running_loop()
        #: the end of input was handed out: nothing more will come
        self.ended = False
        threading.Thread(target=self._pump, name="stdin", daemon=True).start()

    async def get(self) -> str | None:
        item = await self._queue.get()
        self._room.release()
        if item is None:
            self.ended = True
        return item

    def _put(self, item: str | None) -> None:
        # Plain callbacks only: the thread never makes a coroutine that a
        # closing loop could leave un-awaited.
        self._room.acquire()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _pump(self) -> None:
        # Any failure (stdin closed, the loop gone at exit) ends the input.
        with contextlib.suppress(Exception):
            for line in _stdin_lines():
                self._put(line)
        with contextlib.suppress(Exception):
            self._put(None)


def _stdin_lines() -> Iterator[str]:
    """The lines of stdin, each with its newline (the last may lack one).

    Read with os.read on the file descriptor, not through sys.stdin: a daemon
    thread blocked inside sys.stdin holds its buffer's lock, and the
    interpreter aborts at exit ("could not acquire lock for <stdin> at
    interpreter shutdown") when it finds that lock taken."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):  # stdin replaced (tests) or closed
        yield from sys.stdin
        return
    # Decoded leniently: a stray invalid byte costs one replacement
    # character, not the rest of the input.
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    decoder = codecs.getincrementaldecoder(encoding)("replace")
    pending = ""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:  # someone made our stdin non-blocking
            select.select([fd], [], [])
            continue
        *complete, pending = (pending + decoder.decode(chunk, final=not chunk)).split("\n")
        for line in complete:
            yield line + "\n"
        if not chunk:
            if pending:
                yield pending
            return


def _tolerant_stdout() -> None:
    """Never die on a character the output encoding cannot show."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.reconfigure(errors="backslashreplace")


def _print_out(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not
        # fail again with "Exception ignored ... BrokenPipeError".
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        raise OutputClosed from None


def _print_err(text: str) -> None:
    with contextlib.suppress(BrokenPipeError):
        print(text, file=sys.stderr, flush=True)
