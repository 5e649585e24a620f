"""Shared fixtures: in-process servers on port 0, and the real ``chat``
command in subprocesses. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import libchat

# Asyncio debug mode in every loop the tests make, and in every subprocess:
# a blocking call on the event loop is reported and fails the test below.
os.environ["PYTHONASYNCIODEBUG"] = "1"

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0  # seconds: the bound on every wait in the tests


# -- asyncio debug: no slow callbacks -------------------------------------------------


class _SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing <...> took 0.6 seconds" reports."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        match = re.search(r"took (\d+\.\d+) seconds", message)
        # The machine is shared and noisy: only a stall far beyond scheduling
        # jitter counts as a blocking call.
        if match and float(match.group(1)) >= 0.5:
            self.records.append(message)


@pytest.fixture(autouse=True)
def no_blocking_calls() -> Iterator[None]:
    handler = _SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, f"the event loop was blocked: {handler.records}"


# -- in-process servers ---------------------------------------------------------------


FAST = libchat.Limits(handshake_timeout=5.0, max_connections_per_address=0)


@contextlib.asynccontextmanager
async def running_server(**kwargs: Any) -> AsyncIterator[libchat.Server]:
    """A server on a free loopback port, closed afterwards."""
    kwargs.setdefault("limits", FAST)
    server = libchat.Server("127.0.0.1", 0, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await asyncio.wait_for(server.close(), WAIT)


@pytest.fixture
async def server() -> AsyncIterator[libchat.Server]:
    async with running_server() as srv:
        yield srv


async def connect(server: libchat.Server, user: str, **kwargs: Any) -> libchat.Client:
    return await libchat.open_client("127.0.0.1", server.port, user=user, **kwargs)


async def next_of(client: libchat.Client, kind: type[Any], **match: Any) -> Any:
    """The next event of class ``kind`` whose fields equal ``match``; other
    events are skipped. Bounded by WAIT."""

    async def scan() -> Any:
        while True:
            event = await client.next_event()
            if isinstance(event, kind) and all(getattr(event, k) == v for k, v in match.items()):
                return event

    return await asyncio.wait_for(scan(), WAIT)


# -- the real `chat` command ----------------------------------------------------------


def chat_command() -> list[str]:
    exe = shutil.which("chat", path=os.path.dirname(sys.executable)) or shutil.which("chat")
    assert exe, "the chat command is not installed"
    return [exe]


class ServerProcess:
    """``chat serve`` in a subprocess; stderr is read by a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*chat_command(), "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        line = self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match
        self.port = int(match.group(1))

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = WAIT) -> str:
        """The first stderr line matching ``pattern`` (waits for it)."""
        regex = re.compile(pattern)
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(regex.search(line) for line in self.lines) or "<EOF>" in self.lines,
                timeout,
            )
            for line in self.lines:
                if regex.search(line):
                    return line
        raise AssertionError(f"no line matching {pattern!r} (found={found}): {self.lines}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(WAIT)


@pytest.fixture
def chat_server() -> Iterator[ServerProcess]:
    proc = ServerProcess()
    try:
        yield proc
    finally:
        proc.stop()


def run_chat(*args: str, input: str | None = None, timeout: float = 20,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``chat ARGS`` to completion, as a person would from a shell."""
    return subprocess.run(
        [*chat_command(), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=None if input is not None else subprocess.DEVNULL,
    )


class PipeClient:
    """``chat join`` with stdin a pipe the test holds open; stdout and stderr
    are collected line by line by threads."""

    def __init__(self, port: int, user: str, *args: str, stdin: Any = subprocess.PIPE) -> None:
        self.proc = subprocess.Popen(
            [*chat_command(), "join", "--port", str(port), "--user", user, *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True).start()

    def _pump(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            lines.append("<EOF>")
            self._changed.notify_all()

    def wait_for(self, pattern: str, *, err: bool = False) -> str:
        """The first stdout (or stderr) line matching ``pattern``."""
        lines, regex = (self.err if err else self.out), re.compile(pattern)

        def found() -> str | None:
            return next((line for line in lines if regex.search(line)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or "<EOF>" in lines, WAIT)
            line = found()
        assert line is not None, f"no line matching {pattern!r}: out={self.out} err={self.err}"
        return line

    def send(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(line + "\n" for line in lines))
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Close stdin (end of input) and wait for the exit status."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.wait()

    def wait(self) -> int:
        status = self.proc.wait(WAIT)
        with self._changed:  # let the readers drain what is left
            self._changed.wait_for(lambda: "<EOF>" in self.out and "<EOF>" in self.err, WAIT)
        return status

    def stderr(self) -> str:
        return "\n".join(line for line in self.err if line != "<EOF>")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
