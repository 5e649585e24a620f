"""The offline mailbox: private messages waiting for an account to log in.

One SQLite table in the server's ``--db`` file, beside whatever other
plugins keep there. Every call runs on a single worker thread that the store
owns (a :class:`libchat.sqlite.SQLiteWorker`): the event loop never touches
SQLite, and one thread runs the calls one at a time, in the order they were
made, so stored messages keep their order. Taking is one write transaction,
so a message is taken by exactly one login (even with several servers
sharing the file). What was taken but could not be delivered is put back in
its place (:meth:`PendingStore.restore`): a message leaves the store for
good only once it has been handed over.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from libchat.sqlite import SQLiteWorker

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dm_pending (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient TEXT NOT NULL,  -- the user name, folded (lower case)
    header    TEXT NOT NULL   -- the dm frame header, as JSON
);
CREATE INDEX IF NOT EXISTS dm_pending_by_recipient ON dm_pending (recipient, id);
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """A stored message: its place in the store, and its dm frame header."""

    id: int
    header: dict[str, Any]


class PendingStore:
    """Private messages for offline users, oldest first. Open with
    :meth:`open`; every method is a coroutine that runs SQLite off the loop,
    on the store's :class:`~libchat.sqlite.SQLiteWorker`."""

    def __init__(self, path: str, *, max_per_user: int) -> None:
        self.path = path
        self.max_per_user = max_per_user
        self._worker: SQLiteWorker[sqlite3.Connection] | None = None

    @classmethod
    async def open(cls, path: str, *, max_per_user: int = 100) -> PendingStore:
        store = cls(path, max_per_user=max_per_user)
        store._worker = await SQLiteWorker.open(store._connect, name="libchat-dm-store")
        return store

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        if self._worker is None:
            raise RuntimeError("the dm store is closed")
        return await self._worker.call(func, *args)

    # -- the calls (each runs on the store's thread, given its connection) -------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        try:
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _put(self, db: sqlite3.Connection, recipient: str, header: dict[str, Any]) -> bool:
        with db:
            if self._count(db, recipient) >= self.max_per_user:
                return False
            db.execute(
                "INSERT INTO dm_pending (recipient, header) VALUES (?, ?)",
                (recipient, json.dumps(header, ensure_ascii=False)),
            )
        return True

    @staticmethod
    def _take(db: sqlite3.Connection, recipient: str) -> list[Pending]:
        # IMMEDIATE: the read and the delete are one write transaction, so
        # another process sharing the file cannot take the same rows.
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(
                "SELECT id, header FROM dm_pending WHERE recipient = ? ORDER BY id", (recipient,)
            ).fetchall()
            if rows:
                db.execute(
                    "DELETE FROM dm_pending WHERE recipient = ? AND id <= ?",
                    (recipient, rows[-1][0]),
                )
            db.commit()
        except BaseException:
            db.rollback()
            raise
        return [Pending(row_id, json.loads(header)) for row_id, header in rows]

    @staticmethod
    def _restore(db: sqlite3.Connection, recipient: str, rows: Sequence[Pending]) -> None:
        with db:
            # The original ids: the messages go back in their place, before
            # any stored since (ids only grow), and the order holds.
            db.executemany(
                "INSERT INTO dm_pending (id, recipient, header) VALUES (?, ?, ?)",
                [(row.id, recipient, json.dumps(row.header, ensure_ascii=False)) for row in rows],
            )

    @staticmethod
    def _count(db: sqlite3.Connection, recipient: str) -> int:
        query = "SELECT COUNT(*) FROM dm_pending WHERE recipient = ?"
        (count,) = db.execute(query, (recipient,)).fetchone()
        return int(count)

    # -- the async API ----------------------------------------------------------------

    async def put(self, recipient: str, header: dict[str, Any]) -> bool:
        """Keep ``header`` for ``recipient`` (a folded name); ``False`` when
        that user already has ``max_per_user`` messages waiting."""
        return await self._run(self._put, recipient, header)

    async def take(self, recipient: str) -> list[Pending]:
        """Every message waiting for ``recipient``, oldest first, removed
        from the store in the same transaction. Give back what could not be
        delivered with :meth:`restore`."""
        return await self._run(self._take, recipient)

    async def restore(self, recipient: str, rows: Sequence[Pending]) -> None:
        """Put messages :meth:`take` returned back, in their place. (They do
        not count against ``max_per_user``: they were already accepted.)"""
        if rows:
            await self._run(self._restore, recipient, list(rows))

    async def count(self, recipient: str) -> int:
        """How many messages wait for ``recipient``."""
        return await self._run(self._count, recipient)

    async def close(self) -> None:
        """Close the database and stop the worker thread. Idempotent."""
        if self._worker is not None:
            await self._worker.close()
