"""The libchat wire protocol, free of I/O.

Nothing here touches a socket or asyncio: bytes go in through
:meth:`FrameDecoder.receive_data`, frames come out of
:meth:`FrameDecoder.next_frame` one at a time (or all at once from
:meth:`FrameDecoder.feed`); :func:`encode_frame` turns a frame back into
bytes. docs/protocol.md is the specification and its test
vectors are checked against this module byte for byte.

A frame is::

    offset  size  field
    0       2     magic, the ASCII bytes "LC"
    2       2     header length H, unsigned big-endian (1..65535)
    4       4     body length B, unsigned big-endian (0..2**32-1)
    8       H     header: a JSON object, UTF-8, with a string "type"
    8+H     B     body: raw bytes (file chunks), never base64

The declared lengths are checked against ``max_frame_size`` as soon as the
8-byte prefix is in, before any of the frame is buffered, so a peer that
claims a 4 GiB frame costs us 8 bytes of memory. A wrong magic is reported
from the first byte that differs, so plain text or a TLS handshake sent to
this port fails at once instead of waiting for a prefix that never comes.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import BadRequest, FrameTooLarge, InvalidName, ProtocolError

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"LC"
PREFIX: Final = struct.Struct(">2sHI")
PREFIX_SIZE: Final = PREFIX.size
MAX_HEADER_SIZE: Final = 0xFFFF
MAX_BODY_SIZE: Final = 0xFFFFFFFF

DEFAULT_ROOM: Final = "lobby"
#: Longest reason (``quit``, ``presence`` ``left``, ``bye``) the server
#: passes on, in characters, once control characters are gone: a reason is
#: copied into a frame for every room its user was in.
MAX_REASON_CHARS: Final = 200
#: Most items a reply's list holds (``rooms``, ``who``, ``join``); a longer
#: list is cut, sorted, to its first items, and the reply says so with
#: ``"truncated": true`` and the ``total``. 500 room entries of the longest
#: names fit in a header (65535 bytes) with room to spare.
MAX_LIST_ITEMS: Final = 500
#: Longest string ``id`` a request may carry: every reply repeats it.
MAX_ID_CHARS: Final = 128

_NICK_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_ROOM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")
NICK_RULE: Final = "1-32 characters: a letter, then letters, digits, '_' or '-'"
ROOM_RULE: Final = "1-48 characters: a letter or digit, then letters, digits, '_', '.' or '-'"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: a JSON header and an optional binary body."""

    header: dict[str, Any]
    body: bytes = field(default=b"", repr=False)

    @property
    def type(self) -> str:
        return str(self.header["type"])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # "1e400" parses to inf, which our own encoder then refuses: a header we
    # could never echo back (an ``id``) must be refused on the way in.
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


_decode_json = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float).decode
# A "\uD800".."\uDFFF" escape may leave a lone surrogate in a decoded string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def encode_header(header: Mapping[str, Any]) -> bytes:
    """Serialise a header the one canonical way: compact JSON, UTF-8, keys in
    the order given. Raises ``ValueError`` for what JSON or UTF-8 cannot carry
    (NaN, lone surrogates)."""
    try:
        return _encode_json(header).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("header holds text that is not valid Unicode") from exc


def encode_frame(header: Mapping[str, Any], body: bytes = b"") -> bytes:
    """Return the bytes of one frame."""
    raw = encode_header(header)
    if not raw or len(raw) > MAX_HEADER_SIZE:
        raise ValueError(f"frame header is {len(raw)} bytes; the limit is {MAX_HEADER_SIZE}")
    if len(body) > MAX_BODY_SIZE:
        raise ValueError(f"frame body is {len(body)} bytes; the limit is {MAX_BODY_SIZE}")
    return b"".join((PREFIX.pack(MAGIC, len(raw), len(body)), raw, body))


def parse_header(raw: bytes | bytearray) -> dict[str, Any]:
    """Decode and check one frame header.

    Whatever this accepts, :func:`encode_header` can encode again: a header
    holding a lone surrogate or an infinite number is refused here, not
    later when the server echoes a field back."""
    try:
        header = _decode_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame header is not valid UTF-8: {exc.reason}") from None
    except RecursionError:
        raise ProtocolError("frame header is nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError(f"frame header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        try:
            encode_header(header)
        except ValueError:
            raise ProtocolError("frame header holds a lone surrogate (not valid Unicode)") from None
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("frame header needs a string 'type'")
    return header


class FrameDecoder:
    """Turns a byte stream into frames, however the stream is split.

    Bytes go in with :meth:`receive_data` and stay bytes until
    :meth:`next_frame` decodes the next frame, one at a time, as the reader
    is ready for it: a backlog costs its size in bytes, not a ``Frame``
    object per 24-byte frame (about 15 times that). :meth:`feed` does both
    at once and returns every whole frame.

    ``max_frame_size`` bounds header plus body of one frame (``None``: no
    limit). Any violation raises :class:`ProtocolError` and leaves the decoder
    unusable, as the stream can no longer be trusted.
    """

    __slots__ = ("_buffer", "_failed", "_pos", "max_frame_size")

    def __init__(self, *, max_frame_size: int | None = 1 << 20) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        #: where the next frame starts in ``_buffer`` (what lies before it
        #: was decoded already and goes at the next receive_data)
        self._pos = 0
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded (after :meth:`feed`: the start
        of a frame still incomplete)."""
        return len(self._buffer) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; decode nothing yet."""
        if self._failed:
            raise ProtocolError("decoder already failed")
        buf = self._buffer
        if self._pos:
            del buf[: self._pos]  # one move per read, not one per frame
            self._pos = 0
        buf += data

    def next_frame(self) -> Frame | None:
        """Decode and return the next whole frame, or ``None`` until more
        bytes arrive. Raises ProtocolError where the bytes stop making sense,
        checking a frame's declared length before its bytes are needed."""
        if self._failed:
            raise ProtocolError("decoder already failed")
        buf = self._buffer
        pos = self._pos
        try:
            if len(buf) - pos < PREFIX_SIZE:
                self._check_partial(buf, pos)
                return None
            magic, hlen, blen = PREFIX.unpack_from(buf, pos)
            self._check_prefix(magic, hlen, blen)
            start = pos + PREFIX_SIZE
            end = start + hlen + blen
            if end > len(buf):
                return None
            header = parse_header(buf[start : start + hlen])
        except ProtocolError:
            self._fail()
            raise
        self._pos = end
        return Frame(header, bytes(buf[start + hlen : end]) if blen else b"")

    def ready(self) -> bool:
        """Whether :meth:`next_frame` has something to give now: a whole frame,
        or an error (bytes that already broke the protocol)."""
        if self._failed:
            return True
        buf, pos = self._buffer, self._pos
        try:
            lengths = self._lengths(buf, pos)
        except ProtocolError:
            return True
        return lengths is not None and pos + PREFIX_SIZE + sum(lengths) <= len(buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame they complete, in order."""
        self.receive_data(data)
        frames: list[Frame] = []
        next_frame = self.next_frame
        while (frame := next_frame()) is not None:
            frames.append(frame)
        return frames

    def _lengths(self, buf: bytearray, pos: int) -> tuple[int, int] | None:
        """Header and body length of the frame at ``pos``, ``None`` until its
        prefix is in; raises ProtocolError for a prefix that breaks the rules
        as soon as the bytes that break them are in."""
        if len(buf) - pos < PREFIX_SIZE:
            self._check_partial(buf, pos)
            return None
        magic, hlen, blen = PREFIX.unpack_from(buf, pos)
        self._check_prefix(magic, hlen, blen)
        return hlen, blen

    def _check_partial(self, buf: bytearray, pos: int) -> None:
        """Less than a prefix, but already not ours? Say so now rather than
        wait for bytes (a person typing "hi") that may never come."""
        if len(buf) > pos and not MAGIC.startswith(buf[pos : pos + 2]):
            self._check_magic(bytes(buf[pos : pos + 2]))

    def _fail(self) -> None:
        self._failed = True
        self._buffer.clear()
        self._pos = 0

    @staticmethod
    def _check_magic(magic: bytes) -> None:
        if magic != MAGIC:
            hint = ""
            if magic[:1] == b"\x16":
                hint = " (a TLS handshake? this port speaks plaintext)"
            elif magic.isascii() and magic.isalpha():
                hint = " (plain text? this port speaks the libchat framing)"
            raise ProtocolError(f"not a libchat frame: bad magic {magic!r}{hint}")

    def _check_prefix(self, magic: bytes, hlen: int, blen: int) -> None:
        self._check_magic(magic)
        if hlen == 0:
            raise ProtocolError("frame header length is zero")
        if self.max_frame_size is not None and hlen + blen > self.max_frame_size:
            raise FrameTooLarge(
                f"frame of {hlen + blen} bytes declared; the limit is {self.max_frame_size}"
            )


# -- field checks shared by both ends -------------------------------------------------


def check_nick(name: object) -> str:
    """Return ``name`` if it follows the nick rules, else raise InvalidName."""
    if not isinstance(name, str) or not _NICK_RE.fullmatch(name):
        raise InvalidName(f"invalid user name {_shown(name)}: {NICK_RULE}")
    return name


def check_room(name: object) -> str:
    """Return ``name`` if it follows the room rules, else raise InvalidName."""
    if not isinstance(name, str) or not _ROOM_RE.fullmatch(name):
        raise InvalidName(f"invalid room name {_shown(name)}: {ROOM_RULE}")
    return name


def fold(name: str) -> str:
    """The key names are compared by: ASCII case-insensitive."""
    return name.lower()


def check_text(text: object, max_bytes: int) -> str:
    """Return message text if it is a non-empty string within ``max_bytes``
    of UTF-8, else raise BadRequest."""
    if not isinstance(text, str):
        raise BadRequest("'text' must be a string")
    if not text.strip():
        raise BadRequest("empty message")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("message text is not valid Unicode") from None
    if size > max_bytes:
        raise BadRequest(f"message is {size} bytes; the limit is {max_bytes}")
    return text


# C0, DEL, C1 (category Cc) and the line and paragraph separators: they
# would break a log line or a terminal line in two.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def clean_reason(reason: object, default: str = "quit") -> str:
    """A reason fit to pass on: a string without control characters (each
    run of them becomes one space), at most :data:`MAX_REASON_CHARS` long;
    ``default`` when nothing is left."""
    if not isinstance(reason, str):
        return default
    text = _CONTROL.sub(" ", reason).strip()
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 3].rstrip() + "..."
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a local caller)
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text or default


def capped(items: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """``items`` cut to :data:`MAX_LIST_ITEMS`, and the fields a reply adds
    when it was cut (``truncated``, ``total``), so a reply always fits."""
    if len(items) <= MAX_LIST_ITEMS:
        return items, {}
    return items[:MAX_LIST_ITEMS], {"truncated": True, "total": len(items)}


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters: for messages that quote
    what a peer sent, which may be 64 KiB long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_shown = shown
