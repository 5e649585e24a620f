"""The libchat wire protocol, free of I/O.

Nothing here touches a socket or asyncio: bytes go in through
:meth:`FrameDecoder.feed`, frames come out; :func:`encode_frame` turns a
frame back into bytes. docs/protocol.md is the specification and its test
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


def parse_header(raw: bytes) -> dict[str, Any]:
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

    ``max_frame_size`` bounds header plus body of one frame (``None``: no
    limit). Any violation raises :class:`ProtocolError` and leaves the decoder
    unusable, as the stream can no longer be trusted.
    """

    __slots__ = ("_buffer", "_failed", "max_frame_size")

    def __init__(self, *, max_frame_size: int | None = 1 << 20) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame they complete, in order."""
        if self._failed:
            raise ProtocolError("decoder already failed")
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= PREFIX_SIZE:
                magic, hlen, blen = PREFIX.unpack_from(buf, pos)
                self._check_prefix(magic, hlen, blen)
                total = PREFIX_SIZE + hlen + blen
                if end - pos < total:
                    break
                start = pos + PREFIX_SIZE
                header = parse_header(bytes(buf[start : start + hlen]))
                body = bytes(buf[start + hlen : pos + total]) if blen else b""
                frames.append(Frame(header, body))
                pos += total
            if pos < end and not MAGIC.startswith(buf[pos : pos + 2]):
                # Less than a prefix, but already not ours: say so now rather
                # than wait for bytes (a person typing "hi") that may never come.
                self._check_magic(bytes(buf[pos : pos + 2]))
        except ProtocolError:
            self._failed = True
            buf.clear()
            raise
        if pos:
            del buf[:pos]
        return frames

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


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
