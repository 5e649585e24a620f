"""The ``chat`` command end to end, as scripts and shells use it: the real
command in subprocesses (``chat serve`` and ``chat join`` with stdin a pipe
or a file), every wait bounded."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import libchat
from conftest import (
    WAIT,
    PipeClient,
    ServerProcess,
    chat_command,
    connect,
    run_chat,
    running_server,
)
from libchat import ClientCommand, Message, Notice, Presence, hookimpl
from libchat.events import ErrorEvent, Event
from libchat_cli.render import as_json, clean, format_event
from libchat_cli.terminal import Quit, Terminal

# -- a `chat join` we can talk to ------------------------------------------------------


@pytest.fixture
def clients() -> Iterator[list[PipeClient]]:
    """Every PipeClient a test appends here is killed at the end, pass or fail."""
    started: list[PipeClient] = []
    yield started
    for client in started:
        client.kill()


def join(clients: list[PipeClient], port: int, user: str, *args: str) -> PipeClient:
    """A pipe client, once it is in the lobby."""
    client = PipeClient(port, user, *args)
    clients.append(client)
    client.wait_for(rf"{user}\W.*joined" if "--json" in args else rf"^\[lobby\] \* {user} joined$")
    return client


# For the commands whose whole stderr is checked: asyncio's debug mode (set
# for every subprocess by conftest) reports slow callbacks on stderr, and on
# a loaded machine such a report would be mistaken for a second error line.
QUIET = {"PYTHONASYNCIODEBUG": ""}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (and no traceback)."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- chat serve ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_shuts_down_gracefully(sig: signal.Signals, clients: list[PipeClient]) -> None:
    server = ServerProcess()
    try:
        listening = [line for line in server.lines if "listening on" in line]
        assert len(listening) == 1
        assert re.search(rf"listening on 127\.0\.0\.1:{server.port}$", listening[0])
        bob = join(clients, server.port, "bob")
        server.proc.send_signal(sig)
        assert server.proc.wait(WAIT) == 0
    finally:
        server.stop()
    # bob was told why, then the session ended: status 1, no traceback
    assert bob.wait() == 1
    assert "disconnected: server shutting down" in bob.err
    assert "[server] server shutting down" in bob.out
    assert "Traceback" not in bob.stderr()
    server.wait_for(r"shutting down")
    assert not [line for line in server.lines if "Traceback" in line]


def test_serve_on_a_port_in_use_is_a_one_line_error(chat_server: ServerProcess) -> None:
    result = run_chat("serve", "--port", str(chat_server.port), env=QUIET)
    error = one_line_error(result)
    assert f"127.0.0.1:{chat_server.port}" in error and "address already in use" in error


# -- chat join, pipe mode -------------------------------------------------------------


def test_two_pipe_clients_talk(chat_server: ServerProcess, clients: list[PipeClient]) -> None:
    bob = join(clients, chat_server.port, "bob")
    alice = join(clients, chat_server.port, "alice")
    bob.wait_for(r"^\[lobby\] \* alice joined$")
    alice.send("hello", "  spaces kept  ", "third")
    bob.wait_for(r"^\[lobby\] alice: third$")
    said = [line for line in bob.out if line.startswith("[lobby] alice:")]
    assert said == [
        "[lobby] alice: hello",
        "[lobby] alice:   spaces kept  ",
        "[lobby] alice: third",
    ]
    bob.send("hi alice")
    alice.wait_for(r"^\[lobby\] bob: hi alice$")
    alice.send("quit")
    assert alice.wait() == 0
    bob.wait_for(r"^\[lobby\] \* alice left \(quit\)$")
    # the sender does not see its own lines echoed back
    assert not [line for line in alice.out if line.startswith("[lobby] alice:")]
    assert bob.finish() == 0
    assert "Traceback" not in alice.stderr() + bob.stderr()


def test_end_of_input_leaves_with_status_0(
    chat_server: ServerProcess, clients: list[PipeClient]
) -> None:
    bob = join(clients, chat_server.port, "bob")
    port = str(chat_server.port)
    result = run_chat("join", "--user", "alice", "--port", port, input="hi\n", env=QUIET)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "[lobby] * alice joined"
    assert result.stderr == ""
    bob.wait_for(r"^\[lobby\] alice: hi$")
    bob.wait_for(r"^\[lobby\] \* alice left \(quit\)$")


def test_json_mode_prints_one_object_per_line(
    chat_server: ServerProcess, clients: list[PipeClient]
) -> None:
    bob = join(clients, chat_server.port, "bob", "--json")
    port = str(chat_server.port)
    result = run_chat("join", "--user", "alice", "--port", port, "--json", input="hello\n/who\n")
    assert result.returncode == 0, result.stderr
    mine = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"type": "members", "room": "lobby", "members": ["alice", "bob"]} in mine
    bob.wait_for(r'"event":"left"')
    assert bob.finish() == 0
    events = [json.loads(line) for line in bob.out if line != "<EOF>"]
    message = next(e for e in events if e["type"] == "msg")
    assert (message["room"], message["from"], message["text"]) == ("lobby", "alice", "hello")
    assert message["mid"] and message["ts"] > 0
    presence = [(e["user"], e["event"]) for e in events if e["type"] == "presence"]
    assert presence == [("bob", "joined"), ("alice", "joined"), ("alice", "left")]


def test_a_killed_client_is_seen_leaving(
    chat_server: ServerProcess, clients: list[PipeClient]
) -> None:
    bob = join(clients, chat_server.port, "bob")
    carol = join(clients, chat_server.port, "carol")
    bob.wait_for(r"^\[lobby\] \* carol joined$")
    carol.proc.kill()  # SIGKILL: no goodbye, the server notices the dead socket
    bob.wait_for(r"^\[lobby\] \* carol left")
    assert bob.finish() == 0


def test_commands_in_pipe_mode(chat_server: ServerProcess, clients: list[PipeClient]) -> None:
    bob = join(clients, chat_server.port, "bob")
    alice = join(clients, chat_server.port, "alice")
    alice.send("/who")
    alice.wait_for(r"^\[lobby\] members: alice, bob$")
    alice.send("/rooms")
    alice.wait_for(r"^rooms: lobby \(2\)$")
    alice.send("/me waves")
    bob.wait_for(r"^\[lobby\] \* alice waves$")
    alice.send("/join dev", "in dev")
    alice.wait_for(r"^\[dev\] \* alice joined$")
    alice.wait_for(r"^\[dev\] members: alice$")
    alice.send("/part", "back in the lobby")  # /part leaves the current room
    alice.wait_for(r"^\[dev\] \* alice left \(part\)$")
    bob.wait_for(r"^\[lobby\] alice: back in the lobby$")
    assert not [line for line in bob.out if "in dev" in line]
    alice.send("/help")
    alice.wait_for(r"^commands:$")
    for usage in ("/join ROOM", "/part", "/who", "/rooms", "/me ACTION", "/help", "/quit"):
        alice.wait_for(rf"^  {re.escape(usage)}")
    alice.send("/frobnicate now", "still here")
    error = alice.wait_for(r"unknown command", err=True)
    assert error.startswith("error: unknown command /frobnicate; available: ")
    assert all(f"/{name}" in error for name in ("join", "part", "who", "rooms", "me", "help"))
    bob.wait_for(r"^\[lobby\] alice: still here$")  # the client kept going
    alice.send("/join", "/join not a room!", "after the mistakes")
    alice.wait_for(r"^error: usage: /join ROOM$", err=True)
    alice.wait_for(r"^error: invalid room name 'not a room!'", err=True)
    bob.wait_for(r"^\[lobby\] alice: after the mistakes$")
    alice.send("//slash at the start", "/QUIT bye now")
    bob.wait_for(r"^\[lobby\] alice: /slash at the start$")
    assert alice.wait() == 0
    bob.wait_for(r"^\[lobby\] \* alice left \(bye now\)$")
    assert "Traceback" not in alice.stderr()


def test_stdin_may_be_a_regular_file(
    chat_server: ServerProcess, clients: list[PipeClient], tmp_path: Path
) -> None:
    bob = join(clients, chat_server.port, "bob")
    script = tmp_path / "lines.txt"
    script.write_bytes(b"from a file\n/who\nbad byte \xff here\nno newline at the end")
    with script.open("rb") as stdin:
        alice = PipeClient(chat_server.port, "alice", stdin=stdin)
        clients.append(alice)
        assert alice.wait() == 0
    assert "[lobby] members: alice, bob" in alice.out
    bob.wait_for(r"^\[lobby\] alice: from a file$")
    bob.wait_for(r"^\[lobby\] alice: bad byte \ufffd here$")
    bob.wait_for(r"^\[lobby\] alice: no newline at the end$")
    bob.wait_for(r"^\[lobby\] \* alice left \(quit\)$")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--user", "bob"], "the name 'bob' is in use"),
        (["--user", "BOB"], "the name 'bob' is in use"),
        (["--user", "1bad"], "invalid user name '1bad'"),
        (["--user", "alice", "--room", "no spaces"], "invalid room name 'no spaces'"),
    ],
    ids=["taken", "taken-other-case", "invalid-name", "invalid-room"],
)
def test_refused_joins_are_one_line_errors(
    args: list[str], expected: str, chat_server: ServerProcess, clients: list[PipeClient]
) -> None:
    join(clients, chat_server.port, "bob")
    result = run_chat("join", "--port", str(chat_server.port), *args, input="hello\n", env=QUIET)
    assert expected in one_line_error(result)
    assert result.stdout == ""


def test_no_server_is_a_one_line_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_chat("join", "--user", "alice", "--port", str(port), input="hi\n", env=QUIET)
    assert f"cannot connect to 127.0.0.1:{port}" in one_line_error(result)


def test_control_characters_are_escaped(
    chat_server: ServerProcess, clients: list[PipeClient]
) -> None:
    bob = join(clients, chat_server.port, "bob")
    carol = join(clients, chat_server.port, "carol", "--json")
    evil = "\x1b[2J\x1b]0;owned\x07red\x1b[31m \x9b1m \u202eabc \x7f\x00"
    result = run_chat("join", "--user", "alice", "--port", str(chat_server.port), input=evil + "\n")
    assert result.returncode == 0, result.stderr
    line = bob.wait_for(r"^\[lobby\] alice: ")
    assert line == r"[lobby] alice: \x1b[2J\x1b]0;owned\x07red\x1b[31m \x9b1m \u202eabc \x7f\x00"
    # JSON keeps the exact text, with every control character escaped
    raw = carol.wait_for(r'"type":"msg"')
    assert json.loads(raw)["text"] == evil
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202e]", raw)


def test_stdout_closed_by_the_reader(chat_server: ServerProcess, clients: list[PipeClient]) -> None:
    """``chat join | head -1``: no traceback, a polite goodbye, status 1."""
    bob = join(clients, chat_server.port, "bob")
    argv = [*chat_command(), "join", "--user", "alice", "--port", str(chat_server.port)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as alice:  # fmt: skip
        assert alice.stdin is not None and alice.stdout is not None
        try:
            # read the first line, as `head -1` does, then go away
            ready, _, _ = select.select([alice.stdout], [], [], WAIT)
            assert ready and alice.stdout.readline() == b"[lobby] * alice joined\n"
            alice.stdout.close()
            alice.stdin.write(b"/who\n/rooms\n/who\n")
            alice.stdin.flush()
            assert alice.wait(WAIT) == 1
        finally:
            if alice.poll() is None:
                alice.kill()
        stderr = alice.communicate(timeout=WAIT)[1].decode()
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    bob.wait_for(r"^\[lobby\] \* alice left \(quit\)$")


# -- render: what a message can do to a terminal ----------------------------------------


def test_clean_escapes_every_control_character() -> None:
    assert clean("plain text, tabs\tand ünïcödé ✓") == "plain text, tabs\tand ünïcödé ✓"
    assert clean("a\nb\rc\x1b[H\x07\x9b\x85\u2028\u202e\u2066") == (
        r"a\nb\rc\x1b[H\x07\x9b\x85\u2028\u202e\u2066"
    )
    for code in [*range(0x20), *range(0x7F, 0xA0)]:
        if code != 0x09:
            assert chr(code) not in clean(f"x{chr(code)}y")


def test_format_event_cleans_every_field() -> None:
    def message(**header: Any) -> Event:
        header = {"type": "msg", "room": "lobby", "from": "bob", "text": "hi", **header}
        return Message("msg", header, room=header["room"], sender=header["from"],
                       text=header["text"], action=bool(header.get("action")))  # fmt: skip

    assert format_event(message()) == "[lobby] bob: hi"
    assert format_event(message(action=True, text="waves")) == "[lobby] * bob waves"
    assert format_event(message(room="x\x1b[2J", text="\x1b]0;t\x07")) == (
        r"[x\x1b[2J] bob: \x1b]0;t\x07"
    )
    left = Presence("presence", {}, room="lobby", user="bob", event="left", reason="bye\x1b")
    assert format_event(left) == r"[lobby] * bob left (bye\x1b)"
    assert format_event(Notice("notice", {}, text="stop\n")) == r"[server] stop\n"
    assert format_event(ErrorEvent("error", {}, message="no\x07")) == r"error: no\x07"
    assert format_event(Event("bye", {"reason": "shutdown\x1b"})) == r"disconnected: shutdown\x1b"
    assert "\x1b" not in format_event(Event("custom\x1b", {"type": "custom\x1b", "x": "\x1b"}))


def test_a_plugin_formatter_is_cleaned_and_may_fail() -> None:
    from libchat.plugins import make_plugin_manager

    class Loud:
        @hookimpl
        def libchat_format_event(self, event: Event) -> str | None:
            return "\x1b[31mRED\x1b[0m" if isinstance(event, Notice) else None

    class Broken:
        @hookimpl
        def libchat_format_event(self, event: Event) -> str | None:
            if isinstance(event, Presence):
                raise RuntimeError("formatter bug")
            return None

    pm = make_plugin_manager([Loud(), Broken()])
    assert format_event(Notice("notice", {}, text="x"), pm) == r"\x1b[31mRED\x1b[0m"
    joined = Presence("presence", {}, room="lobby", user="bob", event="joined")
    assert format_event(joined, pm) == "[lobby] * bob joined"


def test_as_json_escapes_what_the_encoder_would_write_raw() -> None:
    header = {"type": "msg", "text": "é ✓ \x1b \x7f \x9b \u202e"}
    line = as_json(header)
    assert json.loads(line) == header
    assert "é ✓" in line
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202e]", line)


# -- the command loop in-process: plugin commands, --json help ---------------------------


class Shout:
    """A client plugin with two local commands: one works, one is buggy."""

    @hookimpl
    def libchat_client_commands(self) -> list[ClientCommand]:
        async def shout(terminal: Terminal, args: str) -> None:
            terminal.out(args.upper())

        def boom(terminal: Terminal, args: str) -> None:
            raise RuntimeError("plugin bug")

        return [
            ClientCommand("shout", shout, usage="/shout TEXT", help="say it loud, locally"),
            ClientCommand("boom", boom),
        ]


async def test_plugin_client_commands_run_locally(server: libchat.Server) -> None:
    client = await connect(server, "alice", plugins=[Shout()])
    out: list[str] = []
    err: list[str] = []
    terminal = Terminal(client, out=out.append, err=err.append)
    await terminal.handle_line("/SHOUT hello there")
    assert out == ["HELLO THERE"]
    await terminal.handle_line("/boom")
    assert err == ["error: /boom failed: RuntimeError('plugin bug')"]
    await terminal.handle_line("/help")
    assert "  /shout TEXT        say it loud, locally" in out[-1].splitlines()
    await terminal.handle_line("/nope")
    assert err[-1].startswith("error: unknown command /nope; available: ")
    assert "/shout" in err[-1] and "/boom" in err[-1] and "/who" in err[-1]
    with pytest.raises(Quit):
        await terminal.handle_line("/quit")
    await client.quit()


async def test_json_mode_help_is_one_object(server: libchat.Server) -> None:
    client = await connect(server, "alice")
    out: list[str] = []
    terminal = Terminal(client, json_mode=True, out=out.append, err=out.append)
    await terminal.handle_line("/help")
    await terminal.handle_line("/rooms")
    help_reply, rooms = (json.loads(line) for line in out)
    assert help_reply["type"] == "help"
    assert {"usage": "/who [ROOM]", "help": "list the members of ROOM"} in help_reply["commands"]
    assert rooms == {"type": "rooms", "rooms": [{"room": "lobby", "members": 1}]}
    await client.quit()


async def test_who_and_rooms_say_how_many_the_server_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import libchat.protocol

    monkeypatch.setattr(libchat.protocol, "MAX_LIST_ITEMS", 2)
    async with running_server() as server:
        clients = [await connect(server, name) for name in ("ann", "bea", "cid")]
        for i, client in enumerate(clients):
            await client.join(f"room{i}")
        out: list[str] = []
        terminal = Terminal(clients[0], out=out.append, err=out.append)
        await terminal.command("who lobby")
        await terminal.command("rooms")
        assert out == [
            "[lobby] members: ann, bea, and 1 more",
            "rooms: lobby (3), room0 (1), and 2 more",
        ]
        for client in clients:
            await client.quit()
