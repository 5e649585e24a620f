"""The terminal client behind ``chat join``.

Two faces over one command loop:

* interactive (stdin and stdout are a terminal): prompt_toolkit keeps the
  input line at the bottom; incoming events print above it without garbling
  what the user is typing;
* pipe (anything else): each input line is sent, a line starting with ``/``
  is a command; each event is printed as one flushed line (``--json``: one
  JSON object), errors go to stderr.

``quit``, ``/quit`` or end of input leave cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable
from typing import Any

from libchat import Client, ConnectionClosed, RemoteError
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


class Quit(Exception):
    """The user asked to leave."""


class Terminal:
    """Runs user input against a client and prints what comes back."""

    def __init__(
        self,
        client: Client,
        *,
        json_mode: bool = False,
        out: Callable[[str], None] | None = None,
        err: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.json_mode = json_mode
        self.out = out or _print_out
        self.err = err or _print_err
        self.quit_requested = False
        self.bye_shown = False

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
        async for event in self.client:
            self.show_event(event)

    # -- input ------------------------------------------------------------------------

    async def handle_line(self, line: str) -> None:
        """Run one line of input; raise Quit to leave. Errors are printed."""
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
        except RemoteError as exc:
            self.err(f"error: {clean(exc.message)}")
        except ValueError as exc:
            self.err(f"error: {exc}")

    async def command(self, text: str) -> None:
        name, _, args = text.partition(" ")
        name, args = name.lower(), args.strip()
        client = self.client
        if name == "quit":
            raise Quit(args or "quit")
        if name == "join":
            if not args:
                raise ValueError("usage: /join ROOM")
            members = await client.join(args)
            room = client.room or args
            self.info(
                {"type": "members", "room": room, "members": members},
                f"[{room}] members: {', '.join(members)}",
            )
        elif name == "part":
            await client.part(args or None)
        elif name == "who":
            room = args or client.room or ""
            members = await client.who(room or None)
            self.info(
                {"type": "members", "room": room, "members": members},
                f"[{room}] members: {', '.join(members)}",
            )
        elif name == "rooms":
            rooms = await client.list_rooms()
            listing = ", ".join(f"{r} ({n})" for r, n in rooms) or "none"
            self.info(
                {"type": "rooms", "rooms": [{"room": r, "members": n} for r, n in rooms]},
                f"rooms: {listing}",
            )
        elif name == "me":
            if not args:
                raise ValueError("usage: /me ACTION")
            await client.send(args, action=True)
        elif name == "help":
            self.out(self.help_text())
        else:
            reply = await client.command(name, args)
            if reply.get("text"):
                self.info(reply, str(reply["text"]))

    def help_text(self) -> str:
        lines = ["commands:"]
        for usage, text in HELP.values():
            lines.append(f"  {usage:<18} {text}")
        for cmd in self.client.welcome.get("commands", []):
            usage = cmd.get("usage") or "/" + cmd.get("name", "")
            lines.append(f"  {usage:<18} {cmd.get('help', '')}")
        lines.append("  (a line starting with // sends a line starting with /)")
        return "\n".join(lines)

    # -- the two faces ----------------------------------------------------------------

    async def run_pipe(self) -> int:
        """Read lines from stdin until quit or end of input."""
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        _read_stdin_in_thread(lines)
        printer = asyncio.create_task(self.print_events())
        while True:
            get = asyncio.create_task(lines.get())
            done, _ = await asyncio.wait({get, printer}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:  # the server closed the connection
                get.cancel()
                return self._lost()
            line = get.result()
            try:
                if line is None:
                    raise Quit("quit")
                await self.handle_line(line)
            except Quit as leave:
                return await self._leave(str(leave), printer)
            except ConnectionClosed:
                return self._lost()

    async def run_interactive(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        prompt: PromptSession[str] = PromptSession()
        with patch_stdout(raw=True):
            self.out(f"connected as {self.client.user}; /help lists the commands, quit leaves")
            printer = asyncio.create_task(self.print_events())
            while True:
                ask = asyncio.create_task(prompt.prompt_async(f"[{self.client.room or '-'}] > "))
                done, _ = await asyncio.wait({ask, printer}, return_when=asyncio.FIRST_COMPLETED)
                if ask not in done:
                    ask.cancel()
                    return self._lost()
                try:
                    line = ask.result()
                except (EOFError, KeyboardInterrupt):
                    return await self._leave("quit", printer)
                try:
                    await self.handle_line(line)
                except Quit as leave:
                    return await self._leave(str(leave), printer)
                except ConnectionClosed:
                    return self._lost()

    async def _leave(self, reason: str, printer: asyncio.Task[None]) -> int:
        self.quit_requested = True
        await self.client.quit(reason)
        try:
            await asyncio.wait_for(printer, 5)
        except TimeoutError:
            printer.cancel()
        return 0

    def _lost(self) -> int:
        """The server ended the session (shutdown, drop, crash): exit 1."""
        if not self.bye_shown:
            self.err(f"disconnected: {clean(self.client.close_reason or 'connection closed')}")
        return 1


def _read_stdin_in_thread(lines: asyncio.Queue[str | None]) -> None:
    """Feed stdin lines to ``lines`` from a daemon thread: works for pipes and
    regular files alike, never blocks the loop, never delays exit."""
    loop = asyncio.get_running_loop()

    def pump() -> None:
        try:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


def _print_out(text: str) -> None:
    print(text, flush=True)


def _print_err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
