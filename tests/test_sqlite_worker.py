"""libchat.sqlite.SQLiteWorker: one connection, one thread, calls in order."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from conftest import WAIT
from libchat.sqlite import SQLiteWorker, WorkerClosed


class Recorder:
    """A stand-in connection: records the thread each thing ran on."""

    def __init__(self) -> None:
        self.made_on = threading.get_ident()
        self.closed_on: int | None = None
        self.calls: list[tuple[int, int]] = []  # (argument, thread)

    def close(self) -> None:
        self.closed_on = threading.get_ident()


def record(conn: Recorder, n: int) -> int:
    conn.calls.append((n, threading.get_ident()))
    return n


async def test_calls_run_in_order_on_one_thread_off_the_loop() -> None:
    loop_thread = threading.get_ident()
    worker = await SQLiteWorker.open(Recorder)
    conn = worker.connection
    # Made all at once: they still run one by one, in the order made.
    results = await asyncio.wait_for(
        asyncio.gather(*(worker.call(record, n) for n in range(50))), WAIT
    )
    await asyncio.wait_for(worker.close(), WAIT)

    assert results == list(range(50))
    assert [n for n, _ in conn.calls] == list(range(50))
    threads = {thread for _, thread in conn.calls} | {conn.made_on, conn.closed_on}
    assert len(threads) == 1
    assert loop_thread not in threads


async def test_a_real_connection_is_made_and_used_on_the_worker_thread(tmp_path: Path) -> None:
    # sqlite3's same-thread check would raise if any call ran elsewhere.
    path = tmp_path / "chat.db"
    worker = await SQLiteWorker.open(lambda: sqlite3.connect(path, isolation_level=None))
    try:
        await worker.call(lambda db: db.execute("CREATE TABLE t (n INTEGER)"))
        for n in (1, 2, 3):
            await worker.call(lambda db, n: db.execute("INSERT INTO t VALUES (?)", (n,)), n)
        rows = await worker.call(lambda db: db.execute("SELECT n FROM t ORDER BY n").fetchall())
        assert rows == [(1,), (2,), (3,)]
    finally:
        await worker.close()


async def test_exceptions_propagate_and_the_worker_goes_on() -> None:
    worker = await SQLiteWorker.open(Recorder)

    def fail(conn: Recorder) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await asyncio.wait_for(worker.call(fail), WAIT)
    assert await asyncio.wait_for(worker.call(record, 7), WAIT) == 7
    await worker.close()


async def test_a_failing_connect_raises_and_stops_the_thread() -> None:
    def connect() -> Recorder:
        raise sqlite3.OperationalError("unable to open database file")

    with pytest.raises(sqlite3.OperationalError):
        await asyncio.wait_for(SQLiteWorker.open(connect), WAIT)


async def test_calls_after_close_are_refused_and_close_is_idempotent() -> None:
    worker = await SQLiteWorker.open(Recorder)
    conn = worker.connection
    await asyncio.wait_for(worker.close(), WAIT)
    assert worker.closed
    assert conn.closed_on is not None
    with pytest.raises(WorkerClosed):
        await worker.call(record, 1)
    with pytest.raises(WorkerClosed):
        worker.connection  # noqa: B018 -- the property raising is the point
    await asyncio.wait_for(worker.close(), WAIT)  # again: nothing happens
    assert conn.calls == []


async def test_close_waits_for_the_calls_made_before_it() -> None:
    worker = await SQLiteWorker.open(Recorder)
    conn = worker.connection
    # gather starts its tasks in order: the calls are made before close.
    *results, _ = await asyncio.wait_for(
        asyncio.gather(*(worker.call(record, n) for n in range(5)), worker.close()), WAIT
    )
    assert results == list(range(5))
    assert [n for n, _ in conn.calls] == list(range(5))
    assert conn.closed_on is not None
