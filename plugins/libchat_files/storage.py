"""File system work of a transfer. Every function here blocks: the async
code runs them in a worker thread (``asyncio.to_thread``), never on the
event loop. hashlib releases the GIL on large buffers, so hashing in a
thread also lets the loop go on meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .names import numbered, part_name

BLOCK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)

try:  # advisory lock: two receivers never write the same .part at once
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

except ImportError:  # pragma: no cover - Windows

    def _lock(fd: int) -> None:
        pass


#: What :func:`~libchat_files.names.part_name` makes: nothing else in a
#: folder is ever tidied away.
_PART_NAME = re.compile(r"\..+\.[0-9a-f]{16}\.part", re.S)


class PartInUse(Exception):
    """Another transfer is already writing this .part file."""


def hash_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 (hex) of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def open_source(path: Path, offset: int) -> BinaryIO:
    """The file to send, positioned at ``offset``."""
    f = path.open("rb")
    f.seek(offset)
    return f


class PartFile:
    """The ``.part`` file of one incoming transfer, with the running SHA-256
    of everything in it. Bytes are appended in order; the file gets its
    real name only through :meth:`finish`."""

    def __init__(self, directory: Path, name: str, sha256: str, size: int) -> None:
        """Open (or create) the .part file for ``name`` with hash ``sha256``;
        what it already holds is kept and hashed, so the transfer resumes
        from :attr:`offset`. A .part longer than ``size`` cannot belong to
        this file and starts over. Raises :class:`PartInUse` or OSError."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = name
        self.path = directory / part_name(name, sha256)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _BINARY, 0o666)
        try:
            _lock(fd)
        except BlockingIOError:
            os.close(fd)
            raise PartInUse(f"{self.path.name} is being received already") from None
        self._file: Any = os.fdopen(fd, "r+b")
        self.digest = hashlib.sha256()
        try:
            self.offset = self._rehash(size)
        except BaseException:
            self._file.close()
            raise

    def _rehash(self, size: int) -> int:
        f = self._file
        if os.fstat(f.fileno()).st_size > size:
            f.truncate(0)
        f.seek(0)
        offset = 0
        while block := f.read(BLOCK):
            self.digest.update(block)
            offset += len(block)
        return offset

    def write(self, data: bytes) -> None:
        """Append ``data`` and hash it."""
        self._file.write(data)
        self.digest.update(data)
        self.offset += len(data)

    def close(self) -> None:
        """Close the file, keeping what it holds for a resume; an empty one
        is removed (it would only clutter the folder)."""
        with contextlib.suppress(OSError):
            self._file.close()
        if self.offset == 0:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def discard(self) -> None:
        """Close and delete the .part file."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def finish(self) -> Path:
        """Flush to disk, then give the bytes their name: ``name``, or
        ``name (1)``, ``name (2)``... if taken. An existing file is never
        overwritten: the new name is claimed with O_EXCL first."""
        f = self._file
        f.flush()
        os.fsync(f.fileno())
        f.close()
        final = _claim(self.directory, self.name)
        try:
            os.replace(self.path, final)
        except OSError:
            with contextlib.suppress(OSError):
                final.unlink()
            raise
        return final


def _claim(directory: Path, name: str) -> Path:
    for n in range(10_000):
        candidate = directory / (numbered(name, n) if n else name)
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free name for {name!r} in {directory}")


# -- tidying left-over .part files ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Room:
    """Room for ``.part`` files in one folder (see :func:`tidy_parts`)."""

    quota: int
    max_files: int
    max_age: float


def tidy_parts(
    directory: Path, room: Room, *, in_use: Collection[Path] = (), reserved: int = 0
) -> bool:
    """Delete left-over ``.part`` files of ``directory`` (ones not in
    ``in_use`` and not locked by a transfer): those older than
    ``room.max_age``, then the oldest until the folder's ``.part`` files fit
    ``room``. ``in_use`` (this process's transfers) count as ``reserved``
    bytes in all, whatever their length now; files another process is
    writing count at their length and are never deleted. Return whether
    everything now fits."""
    now = time.time()
    keep = {path.name for path in in_use}
    leftovers: list[tuple[float, int, Path]] = []
    for path, size, mtime in _parts(directory):
        if path.name in keep:
            continue
        if now - mtime > room.max_age and _remove_unlocked(path):
            continue
        leftovers.append((mtime, size, path))
    leftovers.sort(reverse=True)  # newest first: the oldest go first
    used = reserved + sum(size for _, size, _ in leftovers)
    count = len(keep) + len(leftovers)
    for _mtime, size, path in reversed(leftovers):
        if used <= room.quota and count <= room.max_files:
            break
        if _remove_unlocked(path):
            used -= size
            count -= 1
    return used <= room.quota and count <= room.max_files


def _parts(directory: Path) -> list[tuple[Path, int, float]]:
    """The ``.part`` files of ``directory`` (regular files, not links), with
    their length and modification time."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        if not _PART_NAME.fullmatch(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((Path(entry.path), info.st_size, info.st_mtime))
    return found


def _remove_unlocked(path: Path) -> bool:
    """Delete ``path`` unless a transfer holds its lock; whether it went."""
    try:
        fd = os.open(path, os.O_RDWR | _NOFOLLOW | _BINARY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        _lock(fd)
    except BlockingIOError:
        return False
    else:
        # Unlinked while we hold the lock: a transfer that opened it just
        # before finds it locked and gives up (PartInUse) rather than write
        # to a file that is gone.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True
    finally:
        os.close(fd)
