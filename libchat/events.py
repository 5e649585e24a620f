"""What a client receives, as small frozen classes.

:func:`event_from_frame` turns a server frame into one of these; a frame type
the core does not know (a plugin's) becomes a plain :class:`Event` that still
carries the whole header and body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .protocol import Frame


@dataclass(frozen=True, slots=True)
class Event:
    """Any frame from the server. ``header`` is the frame's JSON header."""

    type: str
    header: dict[str, Any] = field(repr=False, compare=False)
    body: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Message(Event):
    """A chat message delivered in a room; ``sender`` is stamped by the
    server and cannot be forged by a client."""

    room: str = ""
    sender: str = ""
    text: str = ""
    ts: float = 0.0
    mid: str = ""
    action: bool = False


@dataclass(frozen=True, slots=True)
class PrivateMessage(Event):
    """A message for one user (the ``dm`` plugin). ``sender`` is stamped by
    the server; ``recipient`` is who it was for (the sender's own copy has
    the recipient's name)."""

    sender: str = ""
    recipient: str = ""
    text: str = ""
    ts: float = 0.0
    mid: str = ""


@dataclass(frozen=True, slots=True)
class Presence(Event):
    """``user`` ``joined`` or ``left`` ``room``."""

    room: str = ""
    user: str = ""
    event: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Notice(Event):
    """A message from the server itself (shutdown, warnings)."""

    text: str = ""


@dataclass(frozen=True, slots=True)
class ErrorEvent(Event):
    """An error the server reported that answered no pending request."""

    code: str = ""
    message: str = ""


def _text(value: Any) -> str:
    """A string field; ``null`` or a missing field is ``""``, another type
    its JSON-ish text (a server may be older, newer or broken)."""
    if isinstance(value, str):
        return value
    return "" if value is None else str(value)


def _number(value: Any) -> float:
    """A number field; anything else (``null``, a string) is ``0.0``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return 0.0


def event_from_frame(frame: Frame) -> Event:
    """The event a server frame stands for. Never raises on odd fields: a
    field of the wrong type reads as empty (``""``, ``0.0``), and the whole
    header is still there."""
    h = frame.header
    kind = frame.type
    get = h.get
    if kind == "msg":
        return Message(
            kind,
            h,
            frame.body,
            room=_text(get("room")),
            sender=_text(get("from")),
            text=_text(get("text")),
            ts=_number(get("ts")),
            mid=_text(get("mid")),
            action=get("action") is True,
        )
    if kind == "dm":
        return PrivateMessage(
            kind,
            h,
            frame.body,
            sender=_text(get("from")),
            recipient=_text(get("to")),
            text=_text(get("text")),
            ts=_number(get("ts")),
            mid=_text(get("mid")),
        )
    if kind == "presence":
        return Presence(
            kind,
            h,
            frame.body,
            room=_text(get("room")),
            user=_text(get("user")),
            event=_text(get("event")),
            reason=_text(get("reason")),
        )
    if kind == "notice":
        return Notice(kind, h, frame.body, text=_text(get("text")))
    if kind == "error":
        return ErrorEvent(
            kind, h, frame.body, code=_text(get("code")), message=_text(get("message"))
        )
    return Event(kind, h, frame.body)
