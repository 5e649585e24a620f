"""File system work of a transfer. Every function here blocks: the async
code runs them in a worker thread (``asyncio.to_thread``), never on the
event loop. hashlib releases the GIL on large buffers, so hashing in a
thread also lets the loop go on meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
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
