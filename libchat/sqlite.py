"""SQLite from asyncio: one connection, one thread, calls in order.

:class:`SQLiteWorker` runs every call on one SQLite connection in one
dedicated thread, in the order the calls were made. The event loop never
waits on SQLite (a busy database or a slow disk stalls only the worker), the
connection is made and used on the same thread (sqlite3's same-thread check
holds, and no lock is needed), and the order of the calls is the order of
the writes. The built-in plugins keep their stores this way; third-party
plugins may too::

    worker = await SQLiteWorker.open(lambda: sqlite3.connect(path, timeout=5.0))
    count = await worker.call(lambda db, key: db.execute(QUERY, (key,)).fetchone(), key)
    await worker.close()

The "connection" is whatever ``connect`` returns, as long as it has a
``close()``: a :class:`sqlite3.Connection`, or an object that owns one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["SQLiteWorker", "WorkerClosed"]

T = TypeVar("T")


class Closeable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closeable)


class WorkerClosed(RuntimeError):
    """A call was made to a worker that is closed (or closing)."""


class SQLiteWorker(Generic[C]):
    """Runs every call on one connection (made by ``connect``) in one
    dedicated thread, in order: ``await worker.call(fn, *args)`` runs
    ``fn(connection, *args)`` there; ``await worker.close()`` closes the
    connection on that thread and stops it. Make one with :meth:`open`."""

    def __init__(self, *, name: str = "libchat-sqlite") -> None:
        # One worker thread: its queue is first in, first out, so calls run
        # in the order they were made, and never two at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._connection: C | None = None
        self._closed = False

    @classmethod
    async def open(
        cls, connect: Callable[[], C], *, name: str = "libchat-sqlite"
    ) -> SQLiteWorker[C]:
        """Start a worker and run ``connect()`` on its thread. If ``connect``
        fails, the thread is stopped and the error raised."""
        worker: SQLiteWorker[C] = cls(name=name)
        try:
            worker._connection = await worker._submit(connect)
        except BaseException:
            worker._closed = True
            worker._executor.shutdown(wait=False)
            raise
        return worker

    @property
    def connection(self) -> C:
        """The connection: to be used only inside calls (on the worker's thread)."""
        if self._connection is None or self._closed:
            raise WorkerClosed("the SQLite worker is closed")
        return self._connection

    @property
    def closed(self) -> bool:
        return self._closed

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)``, run on the worker's thread after every
        call made before it; its exception is raised here. WorkerClosed once
        :meth:`close` has been called."""
        return await self._submit(functools.partial(fn, self.connection, *args))

    async def close(self) -> None:
        """Close the connection after the calls already made, and stop the
        thread. Idempotent; calls made from now on raise WorkerClosed."""
        if self._closed:
            return
        self._closed = True
        connection, self._connection = self._connection, None
        try:
            if connection is not None:
                await self._submit(connection.close)
        finally:
            self._executor.shutdown(wait=False)

    async def _submit(self, func: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)
