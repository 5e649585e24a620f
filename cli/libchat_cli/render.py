"""How the terminal client shows events: one line each, plain or JSON."""

from __future__ import annotations

import json
import re
from typing import Any

import pluggy

from libchat.events import ErrorEvent, Event, Message, Notice, Presence, PrivateMessage

# C0 and C1 control characters other than tab: a message must never be able
# to move the cursor, clear the screen or retitle the terminal of its readers.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` made safe to print: control characters shown escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def format_event(event: Event, pm: pluggy.PluginManager | None = None) -> str:
    """The plain one-line form of ``event``."""
    if pm is not None:
        line = pm.hook.libchat_format_event(event=event)
        if line is not None:
            return str(line)
    if isinstance(event, Message):
        if event.action:
            return f"[{event.room}] * {event.sender} {clean(event.text)}"
        return f"[{event.room}] {event.sender}: {clean(event.text)}"
    if isinstance(event, PrivateMessage):
        return f"[private] {event.sender} -> {event.recipient}: {clean(event.text)}"
    if isinstance(event, Presence):
        why = f" ({clean(event.reason)})" if event.reason and event.event == "left" else ""
        return f"[{event.room}] * {event.user} {event.event}{why}"
    if isinstance(event, Notice):
        return f"[server] {clean(event.text)}"
    if isinstance(event, ErrorEvent):
        return f"error: {clean(event.message)}"
    if event.type == "bye":
        return f"disconnected: {clean(str(event.header.get('reason', '')))}"
    return f"[{event.type}] {clean(json.dumps(event.header, ensure_ascii=False))}"


def as_json(header: dict[str, Any]) -> str:
    return json.dumps(header, ensure_ascii=False, separators=(",", ":"))
