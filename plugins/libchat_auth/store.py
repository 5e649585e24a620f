"""The account store: one SQLite table of names and bcrypt hashes.

Synchronous on purpose: the ``chat user`` commands call it directly, and the
server calls it through :class:`AsyncUserStore`, which runs every call on one
dedicated thread, a :class:`libchat.sqlite.SQLiteWorker` (SQLite never runs on
the event loop, and one connection used by one thread needs no lock).

The file is created on first use (``create=False`` refuses a missing file
instead: ``chat user list --db typo.db`` must not make an empty database).
Its schema version lives in ``PRAGMA
user_version``; a file written by a newer libchat is refused rather than
misread. WAL journaling lets ``chat user add`` write while a server reads, and
a busy timeout makes the two wait for each other instead of failing.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from libchat.errors import ChatError
from libchat.protocol import fold
from libchat.sqlite import SQLiteWorker

#: The schema this code reads and writes (``PRAGMA user_version``).
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    key     TEXT PRIMARY KEY,  -- the name folded: names are case-insensitive
    name    TEXT NOT NULL,     -- the name as its owner spells it
    hash    TEXT NOT NULL,     -- bcrypt hash, "$2b$12$..."
    created REAL NOT NULL,     -- unix time
    changed REAL NOT NULL      -- unix time of the last password change
)
"""

#: Seconds a writer waits for another process's lock before giving up.
BUSY_TIMEOUT = 5.0


class StoreError(ChatError):
    """The database cannot be opened, or holds what we cannot read."""

    code = "store_error"


class AccountExists(ChatError):
    code = "account_exists"


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    hash: bytes


class UserStore:
    """Accounts in the SQLite file at ``path`` (``":memory:"`` for tests).
    With ``create=False`` a missing file is a StoreError, not a new store."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = str(path)
        try:
            self._db = _connect(self.path, create=create)
        except sqlite3.Error as exc:
            if not create and not Path(self.path).exists():
                raise StoreError(
                    f"there is no user database {self.path} (`chat user add` creates one)"
                ) from None
            raise StoreError(f"cannot open the user database {self.path}: {exc}") from None
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"cannot use the user database {self.path}: {exc}") from None
        except StoreError:
            self._db.close()
            raise

    def _migrate(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL, much faster
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the user database {self.path} has schema version {version}; this libchat "
                f"reads version {SCHEMA_VERSION} (upgrade libchat)"
            )
        if version < SCHEMA_VERSION:
            # BEGIN IMMEDIATE: two processes creating the file at once
            # serialise here instead of both running the migration.
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # -- reading ----------------------------------------------------------------------

    def get(self, name: str) -> Account | None:
        row = self._db.execute("SELECT name, hash FROM users WHERE key = ?", (fold(name),))
        found = row.fetchone()
        return None if found is None else Account(found[0], found[1].encode("ascii"))

    def names(self) -> list[str]:
        rows = self._db.execute("SELECT name FROM users ORDER BY key")
        return [row[0] for row in rows]

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def costs(self) -> dict[int, int]:
        """How many accounts have a hash of each bcrypt cost."""
        # "$2b$12$...": the cost is characters 5-6 (SQLite counts from 1).
        rows = self._db.execute("SELECT substr(hash, 5, 2), COUNT(*) FROM users GROUP BY 1")
        return {int(cost): count for cost, count in rows if str(cost).isdigit()}

    # -- writing ----------------------------------------------------------------------

    def add(self, name: str, hashed: bytes) -> Account:
        """Create an account; AccountExists if the name (in any case) is taken."""
        now = time.time()
        try:
            self._db.execute(
                "INSERT INTO users (key, name, hash, created, changed) VALUES (?, ?, ?, ?, ?)",
                (fold(name), name, hashed.decode("ascii"), now, now),
            )
        except sqlite3.IntegrityError:
            raise AccountExists(f"user {name!r} already exists") from None
        return Account(name, hashed)

    def set_hash(self, name: str, hashed: bytes) -> bool:
        """Change a password hash; False if there is no such account."""
        cursor = self._db.execute(
            "UPDATE users SET hash = ?, changed = ? WHERE key = ?",
            (hashed.decode("ascii"), time.time(), fold(name)),
        )
        return cursor.rowcount > 0

    def replace_hash(self, name: str, old: bytes, new: bytes) -> bool:
        """Change the hash of ``name`` to ``new`` only if it still is ``old``
        (a password changed meanwhile by ``chat user passwd`` stays); return
        whether it did."""
        cursor = self._db.execute(
            "UPDATE users SET hash = ? WHERE key = ? AND hash = ?",
            (new.decode("ascii"), fold(name), old.decode("ascii")),
        )
        return cursor.rowcount > 0

    def remove(self, name: str) -> bool:
        """Delete an account; False if there was none."""
        cursor = self._db.execute("DELETE FROM users WHERE key = ?", (fold(name),))
        return cursor.rowcount > 0

    def close(self) -> None:
        self._db.close()


def _connect(path: str, *, create: bool) -> sqlite3.Connection:
    if create or path == ":memory:":
        return sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    # mode=rw opens an existing file and fails on a missing one, in one step
    # (checking first and opening after would race with a file removed between).
    uri = "file:" + urllib.parse.quote(str(Path(path).absolute())) + "?mode=rw"
    return sqlite3.connect(uri, timeout=BUSY_TIMEOUT, isolation_level=None, uri=True)


class AsyncUserStore:
    """A :class:`UserStore` used from asyncio: every call runs on one
    dedicated thread (a :class:`~libchat.sqlite.SQLiteWorker`), which owns
    the SQLite connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._worker: SQLiteWorker[UserStore] | None = None

    @property
    def store(self) -> UserStore:
        return self._open_worker().connection

    def _open_worker(self) -> SQLiteWorker[UserStore]:
        if self._worker is None:
            raise StoreError("the user database is not open")
        return self._worker

    async def open(self) -> None:
        path = self.path
        self._worker = await SQLiteWorker.open(lambda: UserStore(path), name="libchat-auth-db")

    async def get(self, name: str) -> Account | None:
        return await self._open_worker().call(UserStore.get, name)

    async def add(self, name: str, hashed: bytes) -> Account:
        return await self._open_worker().call(UserStore.add, name, hashed)

    async def costs(self) -> dict[int, int]:
        return await self._open_worker().call(UserStore.costs)

    async def replace_hash(self, name: str, old: bytes, new: bytes) -> bool:
        return await self._open_worker().call(UserStore.replace_hash, name, old, new)

    async def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await worker.close()
