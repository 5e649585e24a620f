"""``chat join`` in a real terminal, as a person uses it.

The client runs in a tmux pane of a private tmux server (its own socket);
keys go in with ``send-keys`` and ``capture-pane`` gives back the screen as
the terminal rendered it, escape sequences applied: the best proof that an
incoming message does not garble the line being typed. Other members are
pipe clients. Every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_cli import PipeClient, join

from conftest import WAIT, ServerProcess, chat_command

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (CI installs it); these tests read the screen through it",
)

WIDTH, HEIGHT = 100, 30
PROMPT = "[lobby] >"  # capture-pane drops the trailing space
_sockets = itertools.count()


class Pane:
    """One command in a WIDTH x HEIGHT tmux pane. A shell around it records
    its exit status in a file (tmux itself sometimes marks a pane dead
    without ever collecting the status); the pane stays on screen after."""

    def __init__(self, tmp_path: Path, argv: list[str]) -> None:
        self.socket = f"libchat-test-{os.getpid()}-{next(_sockets)}"
        # where `tmux -L` puts it (see tmux(1), -L and TMUX_TMPDIR)
        tmpdir = os.environ.get("TMUX_TMPDIR") or "/tmp"
        self.socket_path = Path(tmpdir, f"tmux-{os.getuid()}", self.socket)
        config = tmp_path / f"{self.socket}.conf"
        config.write_text("set -g remain-on-exit on\nset -g status off\n")
        self.status_file = tmp_path / f"{self.socket}.status"
        script = f'"$@"; echo "$?" > {shlex.quote(str(self.status_file))}'
        # A person's terminal: no asyncio debug mode, whose slow-callback
        # warnings would be printed onto the screen under test.
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONASYNCIODEBUG", "TMUX")}
        self.tmux("-f", str(config), "new-session", "-d", "-s", "chat",
                  "-x", str(WIDTH), "-y", str(HEIGHT),
                  shlex.join(["sh", "-c", script, "sh", *argv]))  # fmt: skip

    def tmux(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                                text=True, timeout=WAIT, env=self.env)  # fmt: skip
        assert result.returncode == 0, f"tmux {args}: {result.stderr}"
        return result.stdout

    def screen(self, *, colours: bool = False) -> list[str]:
        """The visible lines, trailing blank lines dropped."""
        text = self.tmux("capture-pane", "-p", *(["-e"] if colours else []), "-t", "chat")
        return text.rstrip("\n").splitlines()

    def display(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", "chat", fmt).strip()

    def wait_until(self, what: str, condition: Callable[[list[str]], bool]) -> list[str]:
        """Poll the screen until ``condition`` holds; fail after WAIT."""
        deadline = time.monotonic() + WAIT
        while True:
            lines = self.screen()
            if condition(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {what}:\n" + "\n".join(lines))
            time.sleep(0.05)  # the polling interval of a bounded wait

    def wait_line(self, line: str) -> list[str]:
        return self.wait_until(repr(line), lambda lines: line in lines)

    def wait_last(self, line: str) -> list[str]:
        """Wait until ``line`` is the last line shown (the input line)."""
        return self.wait_until(f"{line!r} last", lambda lines: bool(lines) and lines[-1] == line)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "chat", "-l", text)

    def press(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "chat", *keys)

    def exit_status(self) -> int:
        """The command's exit status, once it has exited."""
        deadline = time.monotonic() + WAIT
        while True:
            with contextlib.suppress(FileNotFoundError):
                status = self.status_file.read_text()
                if status.endswith("\n"):  # written in full
                    return int(status)
            assert time.monotonic() < deadline, "the command did not exit:\n" + "\n".join(
                self.screen()
            )
            time.sleep(0.05)  # the polling interval of a bounded wait

    def kill(self) -> None:
        """Stop the private tmux server and remove its socket."""
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=WAIT, env=self.env, check=False)  # fmt: skip
        with contextlib.suppress(OSError):
            self.socket_path.unlink()


@pytest.fixture
def clients() -> Iterator[list[PipeClient]]:
    """As in test_cli: pipe clients appended here are killed at the end."""
    started: list[PipeClient] = []
    yield started
    for client in started:
        client.kill()


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[[int, str], Pane]]:
    """``terminal(port, user)``: ``chat join`` in a pane, ready for input."""
    panes: list[Pane] = []

    def start(port: int, user: str) -> Pane:
        argv = [*chat_command(), "join", "--user", user, "--port", str(port)]
        pane = Pane(tmp_path, argv)
        panes.append(pane)
        pane.wait_line(f"[lobby] * {user} joined")
        pane.wait_last(PROMPT)
        return pane

    yield start
    for pane in panes:
        pane.kill()


def test_incoming_message_keeps_the_half_typed_line(
    chat_server: ServerProcess, clients: list[PipeClient], terminal: Callable[[int, str], Pane]
) -> None:
    alice = terminal(chat_server.port, "alice")
    bob = join(clients, chat_server.port, "bob")
    alice.wait_line("[lobby] * bob joined")
    alice.type("half typed")  # no Enter
    alice.wait_last(f"{PROMPT} half typed")
    bob.send("hello from bob")
    lines = alice.wait_line("[lobby] bob: hello from bob")
    # the message went above the input line; nothing was mixed into either
    assert [line for line in lines if line] == [
        "connected as alice; /help lists the commands, quit leaves",
        "[lobby] * alice joined",
        "[lobby] * bob joined",
        "[lobby] bob: hello from bob",
        f"{PROMPT} half typed",
    ]
    cursor = alice.display("#{cursor_x} #{cursor_y}").split()
    assert cursor == [str(len(f"{PROMPT} half typed")), str(len(lines) - 1)]
    alice.type(" and finished")
    alice.press("Enter")
    bob.wait_for(r"^\[lobby\] alice: half typed and finished$")
    alice.wait_last(PROMPT)
    assert f"{PROMPT} half typed and finished" in alice.screen()
    alice.type("/quit")
    alice.press("Enter")
    assert alice.exit_status() == 0
    bob.wait_for(r"^\[lobby\] \* alice left \(quit\)$")


def test_escape_sequences_from_others_are_shown_not_obeyed(
    chat_server: ServerProcess, clients: list[PipeClient], terminal: Callable[[int, str], Pane]
) -> None:
    alice = terminal(chat_server.port, "alice")
    title = alice.display("#{pane_title}")
    bob = join(clients, chat_server.port, "bob")
    # clear the screen, home the cursor, retitle the window, turn text red
    bob.send("\x1b[2J\x1b[H\x1b]2;owned\x07\x1b[31mred", "plain")
    lines = alice.wait_line("[lobby] bob: plain")
    assert r"[lobby] bob: \x1b[2J\x1b[H\x1b]2;owned\x07\x1b[31mred" in lines
    assert lines[0] == "connected as alice; /help lists the commands, quit leaves"  # not cleared
    assert alice.display("#{pane_title}") == title != "owned"
    shown = alice.screen(colours=True)
    assert not [line for line in shown if "bob: plain" in line and "\x1b[" in line], shown
    alice.press("C-d")
    assert alice.exit_status() == 0


@pytest.mark.parametrize(
    "keys", [["quit", "Enter"], ["/quit", "Enter"], ["C-d"]], ids=["quit", "/quit", "Ctrl-D"]
)
def test_leaving_exits_with_status_0(
    keys: list[str],
    chat_server: ServerProcess,
    clients: list[PipeClient],
    terminal: Callable[[int, str], Pane],
) -> None:
    bob = join(clients, chat_server.port, "bob")
    alice = terminal(chat_server.port, "alice")
    bob.wait_for(r"^\[lobby\] \* alice joined$")
    alice.press(*keys)
    assert alice.exit_status() == 0
    bob.wait_for(r"^\[lobby\] \* alice left \(quit\)$")
    assert not [line for line in alice.screen() if "Traceback" in line or "error" in line]


def test_a_paste_of_several_lines_sends_each(
    chat_server: ServerProcess, clients: list[PipeClient], terminal: Callable[[int, str], Pane]
) -> None:
    alice = terminal(chat_server.port, "alice")
    bob = join(clients, chat_server.port, "bob")
    alice.wait_line("[lobby] * bob joined")
    alice.tmux("set-buffer", "-b", "paste", "first pasted\nsecond pasted")
    alice.tmux("paste-buffer", "-p", "-b", "paste", "-t", "chat")  # as a bracketed paste
    alice.wait_until("the pasted text", lambda lines: "second pasted" in "\n".join(lines))
    alice.press("Enter")
    bob.wait_for(r"^\[lobby\] alice: second pasted$")
    said = [line for line in bob.out if line.startswith("[lobby] alice:")]
    assert said == ["[lobby] alice: first pasted", "[lobby] alice: second pasted"]
    alice.press("C-d")
    assert alice.exit_status() == 0


def test_help_and_a_mistake_in_the_terminal(
    chat_server: ServerProcess, terminal: Callable[[int, str], Pane]
) -> None:
    alice = terminal(chat_server.port, "alice")
    alice.type("/help")
    alice.press("Enter")
    alice.wait_until(
        "the help", lambda lines: any(re.match(r"  /who \[ROOM\] +", x) for x in lines)
    )
    alice.type("/nope")
    alice.press("Enter")
    alice.wait_until(
        "the error", lambda lines: any("error: unknown command /nope" in x for x in lines)
    )
    alice.type("/join dev")
    alice.press("Enter")
    alice.wait_line("[dev] members: alice")
    alice.wait_last("[dev] >")  # the prompt follows the current room
    alice.type("quit")
    alice.press("Enter")
    assert alice.exit_status() == 0


def test_server_shutdown_while_typing(tmp_path: Path, terminal: Callable[[int, str], Pane]) -> None:
    server = ServerProcess()
    try:
        alice = terminal(server.port, "alice")
        alice.type("never sent")
        alice.wait_last(f"{PROMPT} never sent")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(WAIT) == 0
    finally:
        server.stop()
    lines = alice.wait_line("disconnected: server shutting down")
    assert "[server] server shutting down" in lines
    assert alice.exit_status() == 1
    assert not [line for line in alice.screen() if "Traceback" in line]
