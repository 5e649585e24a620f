"""File transfer (the ``files`` plugin): names, progress, the relay and the
client API in one process, then the real ``chat serve`` and ``chat
send-file`` commands in subprocesses. Files are small (a few chunks); what
is checked is completeness and correctness, never speed."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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
    next_of,
    run_chat,
    running_server,
)
from libchat.errors import RemoteError
from libchat.hub import LocalHub
from libchat.plugins import InvalidPlugin
from libchat.protocol import PROTOCOL_VERSION, Frame, FrameDecoder, encode_frame
from libchat_cli.terminal import UNFINISHED_OPTION, Terminal
from libchat_files import (
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_STALL_TIMEOUT,
    Declined,
    FileTooLarge,
    HashMismatch,
    Incoming,
    Interrupted,
    NotOnline,
    TransferError,
    files_of,
    relay_of,
    safe_filename,
)
from libchat_files import transfers as transfers_module
from libchat_files.limits import ReceiveLimits
from libchat_files.names import MAX_NAME_BYTES, numbered, part_name
from libchat_files.progress import BarProgress, LineProgress, bar_for, human_size, human_time
from libchat_files.relay import CHUNK_SIZE, stall_timeout
from libchat_files.terminal import client_commands, format_event

CHUNK = CHUNK_SIZE


# -- helpers --------------------------------------------------------------------------


def make_file(path: Path, size: int, seed: int = 1) -> str:
    """Write ``size`` pseudo-random bytes to ``path``; return their SHA-256."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def tree(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@asynccontextmanager
async def files_server(**config: Any) -> AsyncIterator[libchat.Server]:
    async with running_server(plugins=["files"], config=config) as server:
        yield server


async def receiver(
    server: libchat.Server, user: str, folder: Path, *plugins: Any, **kwargs: Any
) -> libchat.Client:
    """A client that accepts every offer into ``folder`` (--accept-files)."""
    options = {"accept_files": str(folder)}
    return await connect(server, user, plugins=["files", *plugins], options=options, **kwargs)


async def sender(server: libchat.Server, user: str) -> libchat.Client:
    return await connect(server, user, plugins=["files"])


async def result(client: libchat.Client) -> Incoming:
    """The next incoming transfer of ``client`` that ended."""
    return await asyncio.wait_for(files_of(client).results.get(), WAIT)


ChunkAction = Callable[[int, libchat.Client, libchat.Event], Awaitable[bool | None]]


class ChunkHook:
    """A client plugin that sees every file.chunk before the files plugin
    does (registered after it, so pluggy calls it first); ``act`` gets the
    chunk's number (from 1) and may return True to swallow it."""

    def __init__(self, act: ChunkAction) -> None:
        self.act = act
        self.count = 0

    @libchat.hookimpl
    async def libchat_client_frame(self, client: libchat.Client, event: libchat.Event) -> Any:
        if event.type != "file.chunk":
            return None
        self.count += 1
        return await self.act(self.count, client, event)


class Mark:
    """A progress display that only notes that data moved."""

    def __init__(self, moved: asyncio.Event) -> None:
        self.moved = moved

    def update(self, done: int) -> None:
        self.moved.set()

    def finish(self, ok: bool) -> None:
        pass


async def raw_offer(client: libchat.Client, to: str, name: str, size: int, sha256: str) -> str:
    """Offer a file with raw frames (a client without the plugin: it may lie)."""
    offer = {"type": "file.offer", "to": to, "name": name, "size": size, "sha256": sha256}
    reply = await client.request(offer)
    return str(reply["tid"])


async def raw_stream(client: libchat.Client, tid: str, data: bytes) -> None:
    for offset in range(0, len(data), CHUNK):
        chunk = data[offset : offset + CHUNK]
        await client.send_frame({"type": "file.chunk", "tid": tid, "offset": offset}, chunk)
    await client.send_frame({"type": "file.done", "tid": tid})


def of_type(kind: str) -> dict[str, Any]:
    return {"type": kind}


# -- names ----------------------------------------------------------------------------

NASTY_NAMES = [
    "../../.bashrc",
    "/etc/passwd",
    "C:\\Windows\\system.ini",
    "C:x",
    "\\\\server\\share\\f",
    "a\x00b",
    "..",
    ".",
    "...",
    "",
    "   ",
    "/",
    "dir/",
    "a/../b",
    "CON",
    "con.txt",
    "Com1.log",
    "LPT9",
    "nul",
    "x" * 300,
    "é" * 150 + ".txt",
    "name. ",
    "\u202egnp.exe",
    "a\nb\r\tc",
    ".hidden",
    'a:b|c?d*e<f>g"h',
    "\ufeffbom",
]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_a_received_name_becomes_a_plain_visible_name(name: str) -> None:
    safe = safe_filename(name)
    assert safe and len(safe.encode("utf-8")) <= MAX_NAME_BYTES
    assert not set(safe) & set('/\\\x00:<>"|?*')
    assert safe.isprintable()
    assert not safe.startswith(".") and not safe.endswith((".", " "))
    assert not re.fullmatch(r"(CON|PRN|AUX|NUL|COM\d|LPT\d)(\..*)?", safe, re.I)
    assert (Path("/downloads") / safe).parent == Path("/downloads")
    assert safe_filename(safe) == safe  # already safe: unchanged


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("résumé final.txt", "résumé final.txt"),
        ("../../.bashrc", "bashrc"),
        ("/etc/passwd", "passwd"),
        ("C:\\x", "x"),
        ("a\x00b", "ab"),
        ("..", "file"),
        ("", "file"),
        (None, "file"),
        ("CON", "_CON"),
        ("con.txt", "_con.txt"),
        ("a:b", "a_b"),
        ("\u202egnp.exe", "gnp.exe"),
    ],
)
def test_safe_filename_examples(name: object, expected: str) -> None:
    assert safe_filename(name) == expected


def test_a_long_name_is_cut_keeping_its_extension() -> None:
    for stem in ("x" * 300, "é" * 300, "日本" * 100):
        safe = safe_filename(stem + ".tar.gz")
        assert safe.endswith(".gz") and len(safe.encode("utf-8")) <= MAX_NAME_BYTES
        assert safe.encode("utf-8").decode("utf-8") == safe


def test_numbered_and_part_names() -> None:
    assert numbered("a.txt", 1) == "a (1).txt"
    assert numbered("archive", 2) == "archive (2)"
    assert part_name("a.txt", "ab" * 32) == ".a.txt.abababababababab.part"


# -- progress -------------------------------------------------------------------------


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_bytes_rate_and_time_left_on_a_terminal_only() -> None:
    assert bar_for(io.StringIO(), "f", 100) is None
    assert bar_for(None, "f", 100) is None
    assert isinstance(bar_for(FakeTty(), "f", 100), BarProgress)
    now = [0.0]
    tty = FakeTty()
    bar = BarProgress(tty, "f -> bob", 4 << 20, clock=lambda: now[0])
    now[0] = 2.0
    bar.update(2 << 20)
    bar.finish(True)
    text = tty.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert "50%" in text and "2.0 MiB/4.0 MiB" in text and "1.0 MiB/s" in text
    assert "0:02 left" in text


def test_line_progress_prints_whole_lines_now_and_then() -> None:
    now = [0.0]
    lines: list[str] = []
    progress = LineProgress(lines.append, "f <- alice", 100, interval=5, clock=lambda: now[0])
    progress.update(10)
    assert lines == []
    now[0] = 6.0
    progress.update(60)
    assert len(lines) == 1 and "60%" in lines[0] and "\r" not in lines[0]


def test_human_units() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(5 << 30) == "5.0 GiB"
    assert human_time(75) == "1:15"
    assert human_time(3725) == "1:02:05"


# -- in one process: the client API ---------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK, 2 * CHUNK + 5])
async def test_a_file_arrives_whole_and_verified(tmp_path: Path, size: int) -> None:
    src = tmp_path / "report.bin"
    sha = make_file(src, size)
    inbox = tmp_path / "inbox"
    async with files_server() as server:
        alice = await sender(server, "alice")
        bob = await receiver(server, "bob", inbox)
        outgoing = await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        assert (outgoing.size, outgoing.sha256, outgoing.resumed_from) == (size, sha, 0)
        got = await result(bob)
        assert got.state == "saved" and got.path == inbox / "report.bin"
        assert sha256_of(got.path) == sha
        assert listing(inbox) == ["report.bin"]  # no .part left behind
        offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
        assert (offer.header["from"], offer.header["size"]) == ("alice", size)
        assert "accepting into" in (format_event(offer) or "")
        done = await next_of(bob, libchat.Event, **of_type("file.done"))
        assert done.header["local"]["path"] == str(inbox / "report.bin")
        assert "saved report.bin from alice" in (format_event(done) or "")
        await alice.quit()
        await bob.quit()


async def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    src = tmp_path / "notes.txt"
    sha = make_file(src, 1000)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "notes.txt").write_text("mine")
    (inbox / "notes (1).txt").write_text("mine too")
    async with files_server() as server:
        alice = await sender(server, "alice")
        bob = await receiver(server, "bob", inbox)
        await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        got = await result(bob)
        assert got.path == inbox / "notes (2).txt" and sha256_of(got.path) == sha
        assert (inbox / "notes.txt").read_text() == "mine"
        assert (inbox / "notes (1).txt").read_text() == "mine too"
        await alice.quit()
        await bob.quit()


async def test_chunks_fit_a_small_frame_limit(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    sha = make_file(src, 200_000)
    limits = libchat.Limits(
        max_frame_size=1 << 16, handshake_timeout=5.0, max_connections_per_address=0
    )
    async with running_server(plugins=["files"], limits=limits) as server:
        alice = await sender(server, "alice")
        bob = await receiver(server, "bob", tmp_path / "in")
        await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        got = await result(bob)
        assert got.state == "saved" and got.path is not None and sha256_of(got.path) == sha
        await alice.quit()
        await bob.quit()


async def test_limits_are_announced_and_checked_at_startup() -> None:
    async with files_server() as server:
        alice = await connect(server, "alice")
        limits = alice.welcome["limits"]
        assert limits["max_file_size"] == DEFAULT_MAX_FILE_SIZE == 2 << 30
        assert 0 < limits["file_chunk_size"] < limits["max_frame_size"]
        assert "files" in alice.welcome["plugins"]
        await alice.quit()
    server = libchat.Server("127.0.0.1", 0, plugins=["files"], config={"max_file_size": "big"})
    with pytest.raises(ValueError, match="max_file_size"):
        await server.start()


async def test_declined(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    make_file(src, 100)
    async with files_server() as server:
        alice = await sender(server, "alice")
        bob = await connect(server, "bob", plugins=["files"])
        sending = asyncio.create_task(files_of(alice).send("bob", src))
        offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
        tid = offer.header["tid"]
        assert f"/accept {tid} [DIR] or /decline {tid}" in (format_event(offer) or "")
        await files_of(bob).decline(tid, "not now")
        with pytest.raises(Declined, match="bob declined the file: not now"):
            await asyncio.wait_for(sending, WAIT)
        with pytest.raises(TransferError):  # an answered offer cannot be accepted
            await files_of(bob).accept(tid, tmp_path / "in")
        await alice.quit()
        await bob.quit()


async def test_offline_too_large_and_malformed_offers_are_refused(tmp_path: Path) -> None:
    small, big = tmp_path / "small", tmp_path / "big"
    make_file(small, 10)
    make_file(big, 1001)
    async with files_server(max_file_size=1000) as server:
        alice = await sender(server, "alice")
        bob = await receiver(server, "bob", tmp_path / "in")
        assert alice.welcome["limits"]["max_file_size"] == 1000
        with pytest.raises(NotOnline, match="carol is not online"):
            await files_of(alice).send("carol", small)
        with pytest.raises(FileTooLarge, match="limit is 1000"):
            await files_of(alice).send("bob", big)
        offer = {"type": "file.offer", "to": "bob", "name": "x", "size": 10, "sha256": "0" * 64}
        bad = [
            ({"size": 1001}, "file_too_large"),  # the server checks, whatever the client did
            ({"size": -1}, "bad_request"),
            ({"size": "10"}, "bad_request"),
            ({"size": True}, "bad_request"),
            ({"sha256": "xyz"}, "bad_request"),
            ({"name": 5}, "bad_request"),
            ({"name": "x" * 2000}, "bad_request"),
            ({"to": "alice"}, "bad_request"),  # not to yourself
            ({"to": "../bob"}, "invalid_name"),
            ({"to": "carol"}, "not_found"),
        ]
        for change, code in bad:
            with pytest.raises(RemoteError) as err:
                await alice.request({**offer, **change})
            assert err.value.remote_code == code, change
        await alice.quit()
        await bob.quit()
        assert not (tmp_path / "in").exists() or listing(tmp_path / "in") == []


async def test_the_server_refuses_data_it_did_not_agree_to(tmp_path: Path) -> None:
    data = b"x" * 1000
    sha = hashlib.sha256(data).hexdigest()
    async with files_server() as server:
        alice = await connect(server, "alice")
        bob = await connect(server, "bob")
        carol = await connect(server, "carol")
        tid = await raw_offer(alice, "bob", "x.txt", len(data), sha)
        await next_of(bob, libchat.Event, **of_type("file.offer"))
        # carol cannot answer an offer made to bob, nor send for alice
        with pytest.raises(RemoteError) as err:
            await carol.request({"type": "file.accept", "tid": tid, "offset": 0})
        assert err.value.remote_code == "not_found"
        await carol.send_frame({"type": "file.chunk", "tid": tid, "offset": 0}, data)
        error = await next_of(carol, libchat.ErrorEvent)
        assert (error.code, error.header["tid"]) == ("not_found", tid)
        # a chunk before bob accepted is refused, and ends the transfer
        await alice.send_frame({"type": "file.chunk", "tid": tid, "offset": 0}, data)
        error = await next_of(alice, libchat.ErrorEvent)
        assert error.header["tid"] == tid and "not accepted" in error.message
        abort = await next_of(bob, libchat.Event, **of_type("file.abort"))
        assert abort.header["tid"] == tid
        with pytest.raises(RemoteError):
            await bob.request({"type": "file.accept", "tid": tid, "offset": 0})
        # a transfer that never existed
        await alice.send_frame({"type": "file.chunk", "tid": "nope", "offset": 0}, b"x")
        error = await next_of(alice, libchat.ErrorEvent)
        assert error.code == "not_found"
        for client in (alice, bob, carol):
            await client.quit()


@pytest.mark.parametrize(
    ("offset", "extra", "reason"),
    [
        (0, b"more", "more bytes than declared"),
        (5, b"", "chunk at offset 5, expected 0"),
        ("0", b"", "chunk at offset '0', expected 0"),
        (0, None, "empty chunk"),
    ],
)
async def test_bad_chunks_abort_the_transfer_on_both_sides(
    tmp_path: Path, offset: Any, extra: bytes | None, reason: str
) -> None:
    data = random.Random(3).randbytes(1000)
    inbox = tmp_path / "in"
    async with files_server() as server:
        alice = await connect(server, "alice")
        bob = await receiver(server, "bob", inbox)
        tid = await raw_offer(alice, "bob", "x.bin", len(data), hashlib.sha256(data).hexdigest())
        await next_of(alice, libchat.Event, **of_type("file.accept"))
        body = b"" if extra is None else data + extra
        await alice.send_frame({"type": "file.chunk", "tid": tid, "offset": offset}, body)
        abort = await next_of(alice, libchat.Event, **of_type("file.abort"))
        assert abort.header["reason"] == reason
        got = await result(bob)
        assert got.state == "failed" and reason in (got.error or "")
        assert not (inbox / "x.bin").exists()
        await alice.quit()
        await bob.quit()


@pytest.mark.parametrize(
    ("offset", "extra", "reason"),
    [(0, b"more", "more bytes than declared"), (7, b"", "chunk out of order")],
)
async def test_the_receiver_checks_chunks_itself(
    tmp_path: Path, offset: int, extra: bytes, reason: str
) -> None:
    """What a hostile or broken server might relay is refused by the
    receiving client too (the chunk is handed straight to its hook)."""
    data = b"y" * 100
    inbox = tmp_path / "in"
    async with files_server() as server:
        alice = await connect(server, "alice")
        bob = await receiver(server, "bob", inbox)
        tid = await raw_offer(alice, "bob", "x.bin", len(data), hashlib.sha256(data).hexdigest())
        await next_of(alice, libchat.Event, **of_type("file.accept"))
        header = {"type": "file.chunk", "tid": tid, "offset": offset}
        handled = files_of(bob).on_event(libchat.Event("file.chunk", header, data + extra))
        assert handled is not None and not isinstance(handled, bool)
        assert await handled is True
        got = await result(bob)
        assert (got.state, got.error) == ("failed", reason)
        abort = await next_of(alice, libchat.Event, **of_type("file.abort"))
        assert abort.header["reason"] == reason
        assert listing(inbox) == []  # nothing was written: not even an empty .part
        await alice.quit()
        await bob.quit()


async def test_a_lying_sender_gets_a_hash_mismatch_and_nothing_is_kept(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(CHUNK + 100)
    lie = hashlib.sha256(b"another file").hexdigest()
    inbox = tmp_path / "in"
    async with files_server() as server:
        alice = await connect(server, "alice")
        bob = await receiver(server, "bob", inbox)
        tid = await raw_offer(alice, "bob", "x.bin", len(data), lie)
        await next_of(alice, libchat.Event, **of_type("file.accept"))
        await raw_stream(alice, tid, data)
        verdict = await next_of(alice, libchat.Event, **of_type("file.result"))
        assert verdict.header["ok"] is False and verdict.header["code"] == "hash_mismatch"
        got = await result(bob)
        assert got.state == "failed" and "hash mismatch" in (got.error or "")
        assert listing(inbox) == []  # the .part is discarded, nothing saved
        done = await next_of(bob, libchat.Event, **of_type("file.done"))
        assert "failed: hash mismatch" in (format_event(done) or "")
        await alice.quit()
        await bob.quit()


async def test_the_sender_reports_a_failed_verification(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    make_file(src, 5000)
    async with files_server() as server:
        alice = await sender(server, "alice")
        bob = await connect(server, "bob")  # answers with raw frames
        sending = asyncio.create_task(files_of(alice).send("bob", src))
        offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
        tid = offer.header["tid"]
        await bob.request({"type": "file.accept", "tid": tid, "offset": 0})
        await next_of(bob, libchat.Event, **of_type("file.done"))
        verdict = {"type": "file.result", "tid": tid, "ok": False, "code": "hash_mismatch"}
        await bob.send_frame({**verdict, "error": "hash mismatch"})
        with pytest.raises(HashMismatch, match="SHA-256 differs"):
            await asyncio.wait_for(sending, WAIT)
        await alice.quit()
        await bob.quit()


@pytest.mark.parametrize(
    ("name", "saved"),
    [
        ("../../evil.sh", "evil.sh"),
        ("/etc/passwd", "passwd"),
        ("C:\\x", "x"),
        ("..", "file"),
        ("", "file"),
        (".bashrc", "bashrc"),
        ("CON", "_CON"),
        ("a\x00b", "ab"),
        ("n" * 300, "n" * MAX_NAME_BYTES),
    ],
)
async def test_a_name_from_the_network_never_chooses_the_path(
    tmp_path: Path, name: str, saved: str
) -> None:
    inbox = tmp_path / "a" / "inbox"
    data = b"payload"
    async with files_server() as server:
        alice = await connect(server, "alice")
        bob = await receiver(server, "bob", inbox)
        tid = await raw_offer(alice, "bob", name, len(data), hashlib.sha256(data).hexdigest())
        await next_of(alice, libchat.Event, **of_type("file.accept"))
        await raw_stream(alice, tid, data)
        verdict = await next_of(alice, libchat.Event, **of_type("file.result"))
        assert verdict.header["ok"] is True
        got = await result(bob)
        assert got.path == inbox / saved and got.path.read_bytes() == data
        assert tree(tmp_path) == [tmp_path / "a", inbox, inbox / saved]
        await alice.quit()
        await bob.quit()


async def test_a_dropped_receiver_keeps_a_part_and_the_next_send_resumes(tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    size = 6 * CHUNK + 10
    sha = make_file(src, size)
    inbox = tmp_path / "in"

    async def pull_the_plug(count: int, client: libchat.Client, event: libchat.Event) -> Any:
        if count >= 3:  # chunks 1 and 2 were written
            client.conn.abort("pulled the plug")
            return True
        return None

    async with files_server() as server:
        alice = await sender(server, "alice")
        bob = await receiver(server, "bob", inbox, ChunkHook(pull_the_plug))
        with pytest.raises(Interrupted, match="bob disconnected"):
            await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        # nothing that looks complete: only the hidden .part with what arrived
        assert listing(inbox) == [part_name("big.bin", sha)]
        assert (inbox / part_name("big.bin", sha)).stat().st_size == 2 * CHUNK
        got = await result(bob)
        assert got.state == "failed" and (got.error or "").startswith("interrupted")
        bob = await receiver(server, "bob", inbox)
        outgoing = await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        assert outgoing.resumed_from == 2 * CHUNK
        got = await result(bob)
        assert got.resumed_from == 2 * CHUNK and got.path is not None
        assert sha256_of(got.path) == sha
        assert listing(inbox) == ["big.bin"]
        await alice.quit()
        await bob.quit()


async def test_a_part_that_does_not_fit_starts_over(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    sha = make_file(src, 3000)
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / part_name("f.bin", sha)).write_bytes(b"z" * 5000)  # longer than the file
    async with files_server() as server:
        alice = await sender(server, "alice")
        bob = await receiver(server, "bob", inbox)
        outgoing = await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        assert outgoing.resumed_from == 0
        got = await result(bob)
        assert got.path is not None and sha256_of(got.path) == sha
        # a .part of the right length but wrong content: the final hash decides
        (inbox / part_name("f.bin", sha)).write_bytes(b"z" * 1000)
        with pytest.raises(HashMismatch):
            await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        assert listing(inbox) == ["f.bin"]  # the bad .part is gone; a retry starts over
        await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        assert listing(inbox) == ["f (1).bin", "f.bin"]
        await alice.quit()
        await bob.quit()


async def test_an_offer_is_withdrawn_when_the_sender_leaves(tmp_path: Path) -> None:
    async with files_server() as server:
        alice = await connect(server, "alice")
        bob = await connect(server, "bob", plugins=["files"])
        tid = await raw_offer(alice, "bob", "x", 10, "0" * 64)
        await next_of(bob, libchat.Event, **of_type("file.offer"))
        assert [t.tid for t in files_of(bob).offers()] == [tid]
        await alice.close()
        abort = await next_of(bob, libchat.Event, **of_type("file.abort"))
        assert abort.header["reason"] == "alice disconnected"
        assert "failed: interrupted: alice disconnected" in (format_event(abort) or "")
        assert files_of(bob).offers() == []
        with pytest.raises(TransferError):
            await files_of(bob).accept(tid, tmp_path)
        await bob.quit()


async def test_transfers_both_ways_while_chat_goes_on(tmp_path: Path) -> None:
    a_src, b_src, c_src = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    shas = [make_file(p, 10 * CHUNK, seed) for seed, p in enumerate((a_src, b_src, c_src))]
    async with files_server() as server:
        alice = await receiver(server, "alice", tmp_path / "alice")
        bob = await receiver(server, "bob", tmp_path / "bob")
        carol = await sender(server, "carol")
        moving = asyncio.Event()
        sends = [
            files_of(alice).send("bob", a_src, progress=lambda *_: Mark(moving)),
            files_of(bob).send("alice", b_src),
            files_of(carol).send("bob", c_src),
        ]
        tasks = [asyncio.create_task(s) for s in sends]
        await asyncio.wait_for(moving.wait(), WAIT)
        for i in range(20):
            await alice.send(f"a{i}")
            await bob.send(f"b{i}")

        async def seen_by(client: libchat.Client, prefix: str, file_from: str) -> list[str]:
            """What ``client`` saw, until every message and the file arrived."""
            seen: list[str] = []
            while len([s for s in seen if s.startswith(prefix)]) < 20 or "done" not in seen:
                event = await client.next_event(WAIT)
                if isinstance(event, libchat.Message):
                    seen.append(event.text)
                elif event.type == "file.done" and event.header["local"]["from"] == file_from:
                    seen.append("done")
            return seen

        at_bob = await asyncio.wait_for(seen_by(bob, "a", "alice"), WAIT)
        at_alice = await asyncio.wait_for(seen_by(alice, "b", "bob"), WAIT)
        assert [s for s in at_bob if s != "done"] == [f"a{i}" for i in range(20)]
        assert [s for s in at_alice if s != "done"] == [f"b{i}" for i in range(20)]
        # alice's messages were not stuck behind her file: they came first
        assert at_bob.index("a0") < at_bob.index("done")
        outgoing = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        assert [o.sha256 for o in outgoing] == shas
        saved = {p.name: sha256_of(p) for p in (tmp_path / "bob").iterdir()}
        assert saved == {"a.bin": shas[0], "c.bin": shas[2]}
        assert sha256_of(tmp_path / "alice" / "b.bin") == shas[1]
        for client in (alice, bob, carol):
            await client.quit()


class Sampler:
    """A progress display that samples what waits for a connection."""

    def __init__(self, moved: asyncio.Event, queued: Callable[[], int], seen: list[int]) -> None:
        self.moved, self.queued, self.seen = moved, queued, seen

    def update(self, done: int) -> None:
        self.moved.set()
        self.seen.append(self.queued())

    def finish(self, ok: bool) -> None:
        pass


async def test_many_senders_to_a_stalled_receiver_never_overflow_its_queue(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()

    async def hold(count: int, client: libchat.Client, event: libchat.Event) -> Any:
        if count == 1:
            await gate.wait()  # bob's read loop stops at his first chunk
        return None

    n = 5
    async with files_server() as server:
        plugins = ["files", ChunkHook(hold)]
        bob = await connect(server, "bob", plugins=plugins, max_frame_size=1 << 20)
        (bob_session,) = server.find_sessions(lambda s: s.name == "bob")
        clients = [await sender(server, f"s{i}") for i in range(n)]
        marks = [asyncio.Event() for _ in range(n)]
        seen: list[int] = []  # bytes waiting for bob on the server, sampled
        tasks = []
        for i, client in enumerate(clients):
            src = tmp_path / f"f{i}.bin"
            make_file(src, 8 * CHUNK, seed=i)
            progress = (lambda m: lambda *_: Sampler(m, bob_session.conn.queued, seen))(marks[i])
            tasks.append(asyncio.create_task(files_of(client).send("bob", src, progress=progress)))
        offers = [await next_of(bob, libchat.Event, **of_type("file.offer")) for _ in range(n)]
        accepting = [
            asyncio.create_task(files_of(bob).accept(o.header["tid"], tmp_path / "in"))
            for o in offers
        ]
        # every sender is streaming while bob takes nothing
        await asyncio.wait_for(asyncio.gather(*(m.wait() for m in marks)), WAIT)
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks, *accepting), WAIT)
        results = [await result(bob) for _ in range(n)]
        assert sorted(r.name for r in results if r.state == "saved") == [
            f"f{i}.bin" for i in range(n)
        ]
        # one chunk at a time towards bob, whoever sends it
        assert seen and max(seen) <= 2 * CHUNK
        for client in (*clients, bob):
            await client.quit()


# -- a recipient that stops reading (review finding 1) --------------------------------


class SilentReceiver:
    """A raw connection that accepts the first file offer, then reads
    nothing more yet stays alive (a ping every 0.2 s). Its socket buffers
    are tiny on both ends, so the server feels the stall after a few chunks
    instead of megabytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(max_frame_size=None)
        self.frames: list[Frame] = []
        self._pinger: asyncio.Task[None] | None = None

    async def frame(self, kind: str) -> Frame:
        """Read until a frame of type ``kind`` (bounded by WAIT)."""

        async def scan() -> Frame:
            while True:
                for i, frame in enumerate(self.frames):
                    if frame.type == kind:
                        del self.frames[: i + 1]
                        return frame
                self.frames.clear()
                data = await self.reader.read(1 << 16)
                assert data, "connection closed"
                self.frames += self.decoder.feed(data)

        return await asyncio.wait_for(scan(), WAIT)

    async def accept_and_stall(self, offers: int = 1) -> None:
        """Accept the next ``offers`` offers, then read no more."""
        for _ in range(offers):
            tid = (await self.frame("file.offer")).header["tid"]
            self.writer.write(encode_frame({"type": "file.accept", "tid": tid, "offset": 0}))
        self._pinger = asyncio.create_task(self._ping())

    async def _ping(self) -> None:
        # The peer's behaviour, not a synchronisation: alive, never reading.
        while True:
            await asyncio.sleep(0.2)
            self.writer.write(encode_frame({"type": "ping"}))

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        self.writer.close()


@asynccontextmanager
async def silent_receiver(server: libchat.Server, user: str) -> AsyncIterator[SilentReceiver]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    peer = SilentReceiver(reader, writer)
    writer.write(encode_frame({"type": "hello", "version": PROTOCOL_VERSION, "user": user}))
    await peer.frame("welcome")
    (session,) = server.find_sessions(lambda s: s.name == user)
    server_socket = session.conn.transport.get_extra_info("socket")
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        yield peer
    finally:
        await peer.close()


def test_the_stall_timeout_stays_under_keepalive() -> None:
    def timeout(interval: float, ping_timeout: float, **config: Any) -> float:
        limits = libchat.Limits(ping_interval=interval, ping_timeout=ping_timeout)
        return stall_timeout(libchat.Server(limits=limits, config=config))

    assert timeout(30, 20) == DEFAULT_STALL_TIMEOUT == 30
    assert timeout(30, 20, file_stall_timeout=5) == 5
    # keepalive drops a silent sender ping_interval + ping_timeout after its
    # last frame was read: the stall is always cut well before that
    assert timeout(1, 1) == 1.5
    assert timeout(1, 1, file_stall_timeout=0) == 1.5
    assert timeout(0, 20, file_stall_timeout=0) == 0  # no keepalive: no bound at all
    assert timeout(30, 0, file_stall_timeout=7.5) == 7.5
    with pytest.raises(ValueError, match="file_stall_timeout"):
        timeout(30, 20, file_stall_timeout=-1)


async def test_a_recipient_that_stops_reading_cannot_hold_the_sender(tmp_path: Path) -> None:
    """The review's r_stall.py: mallory accepts, then reads nothing but
    answers keepalive. alice's transfer is aborted after the stall timeout,
    on both sides; alice's session goes on (and is not dropped by keepalive),
    and her name is hers to leave and take again."""
    src = tmp_path / "big.bin"
    make_file(src, 4 << 20)
    limits = libchat.Limits(
        ping_interval=1.0, ping_timeout=1.0, handshake_timeout=5.0, max_connections_per_address=0
    )
    async with (
        running_server(plugins=["files"], limits=limits) as server,
        silent_receiver(server, "mallory") as mallory,
    ):
        alice = await sender(server, "alice")
        assert alice.welcome["limits"]["file_stall_timeout"] == 1.5
        sending = asyncio.create_task(files_of(alice).send("mallory", src))
        await mallory.accept_and_stall()
        reason = "mallory stopped receiving: nothing taken for 1.5 s"
        with pytest.raises(Interrupted, match=re.escape(reason)):
            await asyncio.wait_for(sending, WAIT)
        assert not alice.closed and await alice.ping() >= 0
        assert "alice" in {s.name for s in server.sessions}
        abort = await mallory.frame("file.abort")  # behind the chunks she never read
        assert abort.header["reason"] == reason
        await alice.quit()
        again = await sender(server, "alice")
        await again.quit()


async def test_other_senders_to_a_stalled_recipient_are_not_blocked_for_ever(
    tmp_path: Path,
) -> None:
    """Every sender to mallory waits on her (one chunk at a time towards a
    recipient); each gets its transfer aborted, none hangs."""
    src = tmp_path / "f.bin"
    make_file(src, 2 << 20)
    async with (
        files_server(file_stall_timeout=0.5) as server,
        silent_receiver(server, "mallory") as mallory,
    ):
        alice, carol = await sender(server, "alice"), await sender(server, "carol")
        sends = [
            asyncio.create_task(files_of(client).send("mallory", src)) for client in (alice, carol)
        ]
        await mallory.accept_and_stall(offers=2)
        for sending in sends:
            with pytest.raises(Interrupted, match="stopped receiving"):
                await asyncio.wait_for(sending, WAIT)
        assert await alice.ping() >= 0 and await carol.ping() >= 0
        await alice.quit()
        await carol.quit()


# -- a distributed hub (review finding 4) ---------------------------------------------


class ForwardingHub:
    """A hub that is not the in-process LocalHub; with ``routing=False`` it
    lacks the calls that reach one connection or another node (a
    third-party hub written before them)."""

    _ROUTING = ("node", "address", "deliver_to", "route", "send_route")

    def __init__(self, *, routing: bool = True) -> None:
        self._hub = LocalHub()
        self._routing = routing

    def __getattr__(self, name: str) -> Any:
        if not self._routing and name in self._ROUTING:
            raise AttributeError(name)
        return getattr(self._hub, name)


async def test_the_files_plugin_refuses_a_hub_that_cannot_route() -> None:
    server = libchat.Server("127.0.0.1", 0, plugins=["files"], hub=ForwardingHub(routing=False))  # type: ignore[arg-type]
    with pytest.raises(InvalidPlugin, match=r"needs a hub that routes to one connection"):
        await server.start()
    assert server.sockets == []  # it never listened
    async with running_server(plugins=["dm"], hub=ForwardingHub(routing=False)) as other:
        assert other.port  # other plugins are not affected


async def test_the_files_plugin_runs_on_any_hub_that_routes(tmp_path: Path) -> None:
    async with running_server(plugins=["files"], hub=ForwardingHub()) as server:
        alice = await sender(server, "alice")
        bob = await receiver(server, "bob", tmp_path / "in")
        src = tmp_path / "a.bin"
        sha = make_file(src, 3 * CHUNK + 5)
        outgoing = await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
        assert outgoing.tid.startswith("local.")  # node.serial: unique across nodes
        got = await result(bob)
        assert got.state == "saved" and sha256_of(tmp_path / "in" / "a.bin") == sha
        await alice.quit()
        await bob.quit()


# -- the receiver's limits (review finding 2) -----------------------------------------


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.part"))


async def half_sent(mallory: libchat.Client, to: str, size: int, name: str = "notes.txt") -> str:
    """The review's r_partfill.py round: offer a file under a fresh SHA-256,
    send all of it but the last byte, abort."""
    tid = await raw_offer(mallory, to, name, size, secrets.token_hex(32))
    accept = await next_of(mallory, libchat.Event, **of_type("file.accept"))
    assert accept.header["tid"] == tid
    data = os.urandom(size - 1)
    for offset in range(0, len(data), CHUNK):
        chunk = data[offset : offset + CHUNK]
        await mallory.send_frame({"type": "file.chunk", "tid": tid, "offset": offset}, chunk)
    await mallory.send_frame({"type": "file.abort", "tid": tid, "reason": "oops"})
    return tid


async def test_a_sender_cannot_fill_the_receivers_disk_with_part_files(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    size = 100_000
    quota = 250_000
    async with files_server() as server:
        bob = await receiver(server, "bob", inbox)
        bob.options["part_quota"] = quota
        mallory = await connect(server, "mallory")
        for _ in range(6):
            await half_sent(mallory, "bob", size)
            got = await result(bob)
            assert got.state == "failed" and got.received == size - 1
            assert sum(p.stat().st_size for p in parts(inbox)) <= quota
        # the newest leftovers are kept, for a resume
        assert len(parts(inbox)) == 2
        assert [p.name for p in inbox.iterdir() if not p.name.startswith(".")] == []
        # and the number of .part files is capped too
        bob.options.update(part_quota=10 * size, max_part_files=3)
        for _ in range(4):
            await half_sent(mallory, "bob", 1000)
            assert (await result(bob)).state == "failed"
            assert len(parts(inbox)) <= 3
        await mallory.quit()
        await bob.quit()


async def test_a_part_over_the_quota_is_not_kept_even_for_a_person(tmp_path: Path) -> None:
    """A person may accept a file larger than the quota; if it fails, its
    .part does not stay behind."""
    inbox = tmp_path / "in"
    async with files_server() as server:
        bob = await connect(server, "bob", plugins=["files"], options={"part_quota": 50_000})
        mallory = await connect(server, "mallory")
        sending = asyncio.create_task(half_sent(mallory, "bob", 100_000))
        offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
        await files_of(bob).accept(offer.header["tid"], inbox)
        await asyncio.wait_for(sending, WAIT)
        got = await files_of(bob).wait(offer.header["tid"], WAIT)
        assert got.state == "failed" and got.received == 99_999
        assert parts(inbox) == []
        await mallory.quit()
        await bob.quit()


async def test_an_automatic_accept_that_does_not_fit_is_declined(tmp_path: Path) -> None:
    """Two offers at once, room for one: one is accepted (and its room
    reserved at once), the other declined."""
    inbox = tmp_path / "in"
    async with files_server() as server:
        bob = await receiver(server, "bob", inbox)
        bob.options["part_quota"] = 150_000
        mallory = await connect(server, "mallory")
        offers = [
            await raw_offer(mallory, "bob", name, 100_000, secrets.token_hex(32))
            for name in ("a.bin", "b.bin")
        ]
        answers = {}
        while len(answers) < 2:
            event = await mallory.next_event(WAIT)
            if event.type in ("file.accept", "file.decline"):
                answers[event.header["tid"]] = event
        assert sorted(answers) == sorted(offers)
        kinds = sorted(event.type for event in answers.values())
        assert kinds == ["file.accept", "file.decline"]
        (decline,) = [e for e in answers.values() if e.type == "file.decline"]
        assert decline.header["reason"] == (
            "no room: this receiver keeps at most 150000 bytes in 32 partial files"
        )
        await mallory.quit()
        await bob.quit()


async def test_only_the_senders_and_sizes_allowed_are_accepted(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    small, big = tmp_path / "small.txt", tmp_path / "big.bin"
    sha = make_file(small, 500)
    make_file(big, 2000)
    async with files_server() as server:
        bob = await receiver(server, "bob", inbox)
        bob.options.update(accept_files_from="Alice, dave", max_file_size=1000)
        alice, carol = await sender(server, "alice"), await sender(server, "carol")
        with pytest.raises(Declined, match="not accepting files from you"):
            await asyncio.wait_for(files_of(carol).send("bob", small), WAIT)
        offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
        assert "declined: not accepting files from you" in (format_event(offer) or "")
        with pytest.raises(Declined, match="this receiver's limit is 1000"):
            await asyncio.wait_for(files_of(alice).send("bob", big), WAIT)
        await asyncio.wait_for(files_of(alice).send("bob", small), WAIT)
        assert sha256_of(inbox / "small.txt") == sha
        assert listing(inbox) == ["small.txt"]
        for client in (alice, carol, bob):
            await client.quit()


async def test_old_part_files_expire_and_nothing_else_is_touched(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    sha = "ab" * 32
    old = time.time() - 2 * 24 * 3600
    expired = inbox / part_name("old.bin", sha)
    locked = inbox / part_name("busy.bin", sha)  # another receiver is writing it
    others = [inbox / "mine.txt", inbox / ".bashrc", inbox / "x.part", inbox / ".a.b.part"]
    for path in (expired, locked, *others):
        path.write_bytes(b"x" * 10)
        os.utime(path, (old, old))
    src = tmp_path / "new.bin"
    make_file(src, 100)
    with locked.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        async with files_server() as server:
            bob = await receiver(server, "bob", inbox)
            alice = await sender(server, "alice")
            await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
            await alice.quit()
            await bob.quit()
    assert not expired.exists()
    assert locked.exists() and all(path.exists() for path in others)


def test_receive_limits_from_options() -> None:
    limits = ReceiveLimits.from_options({"accept_files_from": "Alice, bob,", "max_file_size": 10})
    assert limits.accept_from == {"alice", "bob"} and limits.max_file_size == 10
    assert limits.refusal("ALICE", 10) is None
    assert limits.refusal("carol", 1) == "not accepting files from you"
    assert ReceiveLimits.from_options({"accept_files_from": ["x"]}).refusal("X", 1) is None
    assert ReceiveLimits.from_options({}).refusal("anyone", 4 << 30) is None
    for bad in (
        {"max_file_size": -1},
        {"part_quota": "1G"},
        {"max_part_files": True},
        {"part_max_age": -5},
        {"accept_files_from": "../x"},
    ):
        with pytest.raises(ValueError):
            ReceiveLimits.from_options(bad)


# -- the terminal client's commands ---------------------------------------------------


class FakeTerminal:
    """What a client command handler gets: ``client``, ``out``, ``err``."""

    def __init__(self, client: libchat.Client) -> None:
        self.client = client
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def out(self, text: str) -> None:
        self.lines.append(text)
        self._changed.set()

    def err(self, text: str) -> None:
        self.out("error: " + text)

    async def run(self, line: str) -> None:
        name, _, args = line.removeprefix("/").partition(" ")
        command = {c.name: c for c in client_commands()}[name]
        outcome = command.handler(self, args)
        if outcome is not None:
            await outcome

    async def line(self, needle: str) -> str:
        async def scan() -> str:
            while True:
                for text in self.lines:
                    if needle in text:
                        return text
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(scan(), WAIT)


async def test_terminal_commands_send_accept_decline_cancel(tmp_path: Path) -> None:
    src = tmp_path / "my file.txt"
    sha = make_file(src, 3 * CHUNK)
    inbox = tmp_path / "in"
    assert {c.name for c in client_commands()} == {
        "send",
        "accept",
        "decline",
        "cancel",
        "transfers",
    }
    async with files_server() as server:
        alice = await connect(server, "alice", plugins=["files"])
        bob = await connect(server, "bob", plugins=["files"])
        ta, tb = FakeTerminal(alice), FakeTerminal(bob)
        await ta.run(f'/send bob "{src}"')
        await ta.line("waiting for an answer")
        offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
        tid = offer.header["tid"]
        await tb.run("/transfers")
        assert re.search(rf"{tid} <- alice .*my file\.txt.* offered", tb.lines[-1])
        await tb.run(f"/accept {tid} {inbox}")
        await tb.line(f"receiving my file.txt from alice into {inbox}")
        await ta.line("SHA-256 verified")
        done = await next_of(bob, libchat.Event, **of_type("file.done"))
        assert "saved my file.txt" in (format_event(done) or "")
        assert sha256_of(inbox / "my file.txt") == sha
        # declined, and cancelled by the sender while waiting
        for action in ("decline", "cancel"):
            ta.lines.clear()
            await ta.run(f"/send bob {src}")
            offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
            tid = offer.header["tid"]
            if action == "decline":
                await tb.run(f"/decline {tid} busy")
                await ta.line("declined the file: busy")
            else:
                await ta.line("waiting for an answer")
                await ta.run(f"/cancel {tid}")
                await ta.line("failed: cancelled")
                abort = await next_of(bob, libchat.Event, **of_type("file.abort"))
                assert abort.header["reason"] == "cancelled"
        with pytest.raises(ValueError, match="usage"):
            await ta.run("/send bob")
        with pytest.raises(ValueError, match="no file at"):
            await ta.run(f"/send bob {tmp_path / 'missing'}")
        with pytest.raises(ValueError, match="no open file offer"):
            await tb.run("/accept 999")
        with pytest.raises(ValueError, match="no transfer"):
            await tb.run("/cancel 999")
        await alice.quit()
        await bob.quit()


# -- end to end: the real commands ----------------------------------------------------


async def chat(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``chat ARGS`` in a subprocess without blocking the event loop
    (an in-process server or receiver may be serving it)."""
    proc = await asyncio.create_subprocess_exec(
        *chat_command(),
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 2 * WAIT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def send_file(port: int, path: Path, *extra: str, to: str = "bob") -> list[str]:
    return ["send-file", "--user", "alice", "--to", to, str(path), "--port", str(port), *extra]


def test_chat_send_file_end_to_end(tmp_path: Path) -> None:
    """The real commands on both ends: ``chat serve --plugins files``,
    ``chat join --accept-files DIR`` and ``chat send-file``."""
    src = tmp_path / "photo.jpg"
    sha = make_file(src, 3 * CHUNK + 7)
    inbox = tmp_path / "in"
    server = ServerProcess("--plugins", "files", "--max-file-size", str(4 * CHUNK))
    bob = PipeClient(server.port, "bob", "--accept-files", str(inbox))
    try:
        bob.wait_for(r"^\[lobby\] \* bob joined$")
        sent = run_chat(*send_file(server.port, src))
        assert sent.returncode == 0, sent.stderr
        assert f"sha256 {sha} verified" in sent.stdout
        assert sent.stderr == ""  # quiet when not on a terminal
        bob.wait_for(r"^\[file\] saved photo\.jpg from alice")
        assert sha256_of(inbox / "photo.jpg") == sha
        assert not list(inbox.glob("*.part")) and not list(inbox.glob(".*"))
        offline = run_chat(*send_file(server.port, src, to="nobody"))
        assert offline.returncode == 4 and "nobody is not online" in offline.stderr
        make_file(src, 4 * CHUNK + 1)  # over the server's --max-file-size
        too_large = run_chat(*send_file(server.port, src))
        assert too_large.returncode == 5, too_large.stderr
        bob.send("quit")  # the end of input alone does not stop a receiver
        assert bob.finish() == 0
    finally:
        bob.kill()
        assert server.stop() == 0


async def test_chat_send_file_failures_have_reasons_and_exit_codes(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    make_file(src, 500)
    async with files_server(max_file_size=1000) as server:
        code, _, err = await chat(*send_file(server.port, src))
        assert code == 4 and "bob is not online" in err
        bob = await connect(server, "bob", plugins=["files"])
        make_file(src, 2000)
        code, _, err = await chat(*send_file(server.port, src))
        assert code == 5 and "limit is 1000" in err
        await bob.quit()
    make_file(src, 500)
    async with files_server() as server:
        bob = await connect(server, "bob")  # raw frames: declines, then lies

        async def answer(verdict: str) -> None:
            offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
            tid = offer.header["tid"]
            if verdict == "decline":
                await bob.request({"type": "file.decline", "tid": tid, "reason": "no thanks"})
                return
            await bob.request({"type": "file.accept", "tid": tid, "offset": 0})
            await next_of(bob, libchat.Event, **of_type("file.done"))
            lie = {"type": "file.result", "tid": tid, "ok": False, "code": "hash_mismatch"}
            await bob.send_frame({**lie, "error": "hash mismatch"})

        for verdict, expected, reason in [
            ("decline", 3, "bob declined the file: no thanks"),
            ("lie", 7, "SHA-256 differs"),
        ]:
            answering = asyncio.create_task(answer(verdict))
            code, out, err = await chat(*send_file(server.port, src))
            await asyncio.wait_for(answering, WAIT)
            assert (code, out) == (expected, "") and reason in err
        code, _, err = await chat(*send_file(server.port, src, "--wait", "0.2"))
        assert code == 8 and "did not answer" in err
        await bob.quit()


async def test_a_killed_sender_leaves_a_part_and_sending_again_resumes(tmp_path: Path) -> None:
    src = tmp_path / "video.bin"
    size = 8 * CHUNK
    sha = make_file(src, size)
    inbox = tmp_path / "in"
    first_chunk = asyncio.Event()

    async def note(count: int, client: libchat.Client, event: libchat.Event) -> None:
        first_chunk.set()

    async with files_server() as server:
        bob = await receiver(server, "bob", inbox, ChunkHook(note))
        # a slow sender (a chunk a second) is killed once bob has its first chunk
        proc = await asyncio.create_subprocess_exec(
            *chat_command(),
            *send_file(server.port, src, "--limit-rate", "256K"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.wait_for(first_chunk.wait(), WAIT)
        finally:
            proc.kill()
            await proc.wait()
        got = await result(bob)
        assert got.state == "failed" and got.error == "interrupted: alice disconnected"
        part = inbox / part_name("video.bin", sha)
        assert listing(inbox) == [part.name]  # nothing that looks complete
        assert 0 < part.stat().st_size < size
        code, out, err = await chat(*send_file(server.port, src))
        assert code == 0, err
        assert "resumed at" in out
        got = await result(bob)
        assert got.resumed_from > 0 and got.path == inbox / "video.bin"
        assert sha256_of(got.path) == sha
        assert listing(inbox) == ["video.bin"]
        await bob.quit()


async def test_send_file_logs_in_and_any_connection_of_the_recipient_may_accept(
    tmp_path: Path,
) -> None:
    """With accounts (the auth plugin), ``chat send-file`` logs in with
    $CHAT_PASSWORD; bob on two connections sees the offer on both, and the
    first to accept gets the file."""
    from libchat_auth.passwords import hash_password
    from libchat_auth.store import UserStore

    db = tmp_path / "users.db"
    store = UserStore(db)
    store.add("alice", hash_password("pw-a", 4))
    store.add("bob", hash_password("pw-b", 4))
    store.close()
    src = tmp_path / "f.bin"
    sha = make_file(src, CHUNK + 1)
    config = {"db": str(db), "bcrypt_rounds": 4}
    async with running_server(plugins=["auth", "files"], config=config) as server:
        password = {"password": "pw-b"}
        laptop = await connect(server, "bob", plugins=["files"], hello=password)
        phone = await receiver(server, "bob", tmp_path / "phone", hello=password)
        code, _, err = await chat(*send_file(server.port, src))
        assert code == 1 and "password" in err  # none given, and stdin is no terminal
        code, out, err = await chat(*send_file(server.port, src), env={"CHAT_PASSWORD": "pw-a"})
        assert code == 0, err
        assert f"sha256 {sha} verified" in out
        got = await result(phone)
        assert got.path is not None and sha256_of(got.path) == sha
        offer = await next_of(laptop, libchat.Event, **of_type("file.offer"))
        with pytest.raises(Interrupted, match="no such file offer"):
            await files_of(laptop).accept(offer.header["tid"], tmp_path / "laptop")
        assert listing(tmp_path / "laptop") == []  # nothing left behind
        await laptop.quit()
        await phone.quit()


# -- chat send-file prints nothing raw from the peer (review finding 3) ---------------

EVIL = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mfake: transfer verified OK\x1b[0m\r\n\x9b1m\u202e"


async def test_send_file_never_prints_the_peers_text_raw(tmp_path: Path) -> None:
    """A decline reason, a verdict's error and an abort reason come from the
    recipient: escape sequences in them reach the sender's terminal escaped."""
    src = tmp_path / "f.bin"
    make_file(src, 500)
    async with files_server() as server:
        bob = await connect(server, "bob")  # raw frames

        async def answer(how: str) -> None:
            offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
            tid = offer.header["tid"]
            if how == "decline":
                await bob.request({"type": "file.decline", "tid": tid, "reason": EVIL})
                return
            await bob.request({"type": "file.accept", "tid": tid, "offset": 0})
            if how == "abort":
                await bob.send_frame({"type": "file.abort", "tid": tid, "reason": EVIL})
                return
            await next_of(bob, libchat.Event, **of_type("file.done"))
            await bob.send_frame({"type": "file.result", "tid": tid, "ok": False, "error": EVIL})

        for how, status in [("decline", 3), ("abort", 6), ("result", 1)]:
            answering = asyncio.create_task(answer(how))
            code, out, err = await chat(*send_file(server.port, src))
            await asyncio.wait_for(answering, WAIT)
            assert code == status, (how, err)
            assert r"\x1b]0;PWNED\x07\x1b[2J" in err, (how, err)
            for raw in ("\x1b", "\x07", "\r", "\x9b", "\u202e"):
                assert raw not in out + err, (how, raw, err)
        await bob.quit()


def test_the_plugin_uses_the_one_sanitizer() -> None:
    offer = libchat.Event(
        "file.offer",
        {"type": "file.offer", "tid": "1\x1b[2J", "from": "x", "name": EVIL, "size": 3},
    )
    line = format_event(offer) or ""
    assert r"\x1b]0;PWNED" in line and r"1\x1b[2J" in line
    assert not set(line) & set("\x1b\x07\r\n\x9b\u202e")


# -- chat send-file: connecting (review finding 5) ------------------------------------


async def test_send_file_explains_a_name_held_by_the_senders_chat_session(
    tmp_path: Path,
) -> None:
    """The README flow without accounts: alice chats in `chat join`, then runs
    `chat send-file --user alice`: her name is taken, and she is told why and
    what to do instead."""
    src = tmp_path / "my report.pdf"
    make_file(src, 100)
    async with files_server() as server:
        alice = await connect(server, "alice")
        bob = await receiver(server, "bob", tmp_path / "in")
        code, out, err = await chat(*send_file(server.port, src))
        assert code == 1 and out == ""
        assert "the name 'alice' is in use" in err
        assert (
            f'hint: alice is connected elsewhere: use /send bob "{src}" in your chat session, '
            "or run the server with accounts (--plugins auth)"
        ) in err
        await alice.quit()
        await bob.quit()


async def test_send_file_joins_no_room(tmp_path: Path) -> None:
    """Nobody in the lobby sees `chat send-file` come and go."""
    src = tmp_path / "f.bin"
    make_file(src, 100)
    async with files_server() as server:
        watcher = await connect(server, "watcher")
        bob = await receiver(server, "bob", tmp_path / "in")
        code, _, err = await chat(*send_file(server.port, src))
        assert code == 0, err
        marker = await connect(server, "marker")  # joins after send-file left
        seen = []
        while (event := await next_of(watcher, libchat.Presence)).user != "marker":
            seen.append(event.user)
        assert seen == ["watcher", "bob"]  # and no alice
        for client in (watcher, bob, marker):
            await client.quit()


def test_send_file_shares_the_clis_connection_options() -> None:
    from libchat_cli import join
    from libchat_files.cli import _plugins
    from libchat_files.cli import send_file as command

    def described(cmd: Any) -> dict[str, tuple[Any, ...]]:
        return {
            p.name: (tuple(p.opts), p.envvar, p.default, p.required, getattr(p, "help", None))
            for p in cmd.params
            if p.name in ("host", "port", "user")
        }

    assert described(command) == described(join) and len(described(join)) == 3
    plugins = _plugins()
    assert plugins[0].__name__ == "libchat_files"  # always this one, first
    assert len(plugins) == len(set(map(id, plugins)))  # and once


# -- an unattended receiver (review finding 6) ----------------------------------------


def test_the_terminal_and_the_plugin_agree_on_the_unfinished_option() -> None:
    assert UNFINISHED_OPTION == transfers_module.UNFINISHED_OPTION


async def test_quitting_waits_a_while_for_transfers_in_progress(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(3 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    inbox = tmp_path / "in"
    async with files_server() as server:
        alice = await connect(server, "alice")  # raw frames: sends when told
        bob = await receiver(server, "bob", inbox)
        said: list[str] = []
        terminal = Terminal(bob, out=said.append, err=said.append, quit_wait=WAIT)
        tid = await raw_offer(alice, "bob", "x.bin", len(data), sha)
        await next_of(alice, libchat.Event, **of_type("file.accept"))
        await next_of(bob, libchat.Event, **of_type("file.offer"))
        # the transfer finishes while the terminal waits for it
        finishing = asyncio.create_task(terminal.finish_work())
        await raw_stream(alice, tid, data)
        await asyncio.wait_for(finishing, 2 * WAIT)
        assert said[0].startswith("waiting for 1 file transfer to finish (at most 10 s")
        assert len(said) == 1 and sha256_of(inbox / "x.bin") == sha
        # a quitting receiver accepts nothing more by itself
        await raw_offer(alice, "bob", "y.bin", 10, "0" * 64)
        offer = await next_of(bob, libchat.Event, **of_type("file.offer"))
        assert "accepting" not in offer.header["local"]
        await alice.quit()
        await bob.quit()


async def test_quitting_waits_for_a_stalled_transfer_no_longer_than_its_bound(
    tmp_path: Path,
) -> None:
    async with files_server() as server:
        alice = await connect(server, "alice")
        bob = await receiver(server, "bob", tmp_path / "in")
        said: list[str] = []
        terminal = Terminal(bob, out=said.append, err=said.append, quit_wait=0.2)
        await raw_offer(alice, "bob", "x.bin", 10, "0" * 64)
        await next_of(alice, libchat.Event, **of_type("file.accept"))  # then nothing
        await asyncio.wait_for(terminal.finish_work(), WAIT)
        assert said == [
            "waiting for 1 file transfer to finish (at most 0.2 s; "
            "Ctrl-C or a second SIGTERM leaves now)",
            "leaving with 1 file transfer unfinished",
        ]
        await alice.quit()
        await bob.quit()


async def test_an_accepting_receiver_runs_on_after_its_input_ends(tmp_path: Path) -> None:
    """`chat join --accept-files DIR </dev/null` (cron, systemd): the end of
    input does not make it leave; it receives files until SIGTERM, and then
    leaves cleanly."""
    src = tmp_path / "f.bin"
    sha = make_file(src, CHUNK + 1)
    inbox = tmp_path / "in"
    async with files_server() as server:
        watcher = await connect(server, "watcher")
        bob = PipeClient(server.port, "bob", "--accept-files", str(inbox), stdin=subprocess.DEVNULL)
        try:
            await asyncio.to_thread(bob.wait_for, r"^\[lobby\] \* bob joined$")
            alice = await sender(server, "alice")
            await asyncio.wait_for(files_of(alice).send("bob", src), WAIT)
            await asyncio.to_thread(bob.wait_for, r"^\[file\] saved f\.bin from alice")
            assert sha256_of(inbox / "f.bin") == sha
            assert bob.proc.poll() is None
            bob.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(bob.wait) == 0
            left = await next_of(watcher, libchat.Presence, user="bob", event="left")
            assert left.reason == "terminated"
            assert "Traceback" not in bob.stderr()
            await alice.quit()
        finally:
            bob.kill()
        await watcher.quit()


async def test_sigterm_lets_a_transfer_in_progress_finish(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    sha = make_file(src, 4 * CHUNK)
    inbox = tmp_path / "in"
    async with files_server() as server:
        bob = PipeClient(server.port, "bob", "--accept-files", str(inbox), stdin=subprocess.DEVNULL)
        try:
            await asyncio.to_thread(bob.wait_for, r"^\[lobby\] \* bob joined$")
            alice = await sender(server, "alice")
            moving = asyncio.Event()
            sending = asyncio.create_task(
                files_of(alice).send("bob", src, progress=lambda *_: Mark(moving), rate=2 * CHUNK)
            )
            await asyncio.wait_for(moving.wait(), WAIT)
            bob.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(
                bob.wait_for, r"^waiting for 1 file transfer to finish", err=True
            )
            outgoing = await asyncio.wait_for(sending, WAIT)
            assert outgoing.sha256 == sha
            assert await asyncio.to_thread(bob.wait) == 0
            assert sha256_of(inbox / "f.bin") == sha
            assert "unfinished" not in bob.stderr()
            await alice.quit()
        finally:
            bob.kill()


async def test_file_state_goes_with_its_client_and_server() -> None:
    import gc
    import weakref

    async with files_server() as server:
        relay = weakref.ref(relay_of(server))
        bob = await connect(server, "bob", plugins=["files"])
        transfers = weakref.ref(files_of(bob))
        await bob.quit()
        del bob
        gc.collect()
        assert transfers() is None  # the client's transfers went with it
    del server
    gc.collect()
    assert relay() is None
