"""How the terminal client shows events: one line each, plain or JSON.

Everything that came from the network is cleaned before it reaches the
terminal: a message must never be able to move the cursor, clear the
screen, retitle the window or forge a second line in its readers' terminals.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pluggy

from libchat.events import ErrorEvent, Event, Message, Notice, Presence, PrivateMessage

log = logging.getLogger("libchat.cli")

# The one list of what must not reach a terminal raw (the plugins' terminal
# output uses clean() too): C0 controls but tab (ESC starts every escape
# sequence; CR and LF could forge a line), DEL, the C1 controls (U+009B is a
# one-character CSI for terminals that honour 8-bit controls), the zero-width
# characters and the bidirectional marks (U+061C, U+200B-U+200F) that make
# two names look alike or reorder what follows, the Unicode line and paragraph
# separators, and the bidirectional embeddings, overrides and isolates that
# can make text display in an order other than the one it was sent in.
_UNSAFE = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def clean(text: str) -> str:
    """``text`` made safe to print: unsafe characters shown escaped (an ESC
    becomes the four characters ``\\x1b``, U+202E the six ``\\u202e``)."""
    return _UNSAFE.sub(lambda m: repr(m.group())[1:-1], text)


def format_event(event: Event, pm: pluggy.PluginManager | None = None) -> str:
    """The plain one-line form of ``event``, safe to print."""
    if pm is not None:
        try:
            line = pm.hook.libchat_format_event(event=event)
        except Exception as exc:
            # A broken formatter must not cost the user the event (or the
            # session): the core's plain form stands in. One line, no traceback.
            log.warning("a plugin failed to format %r: %s", event.type, clean(repr(exc)))
            line = None
        if isinstance(line, str):
            # A plugin formats text it received from others: clean it too.
            return clean(line)
    return _format_core(event)


def _format_core(event: Event) -> str:
    if isinstance(event, Message):
        where, who, text = clean(event.room), clean(event.sender), clean(event.text)
        return f"[{where}] * {who} {text}" if event.action else f"[{where}] {who}: {text}"
    if isinstance(event, PrivateMessage):
        who, to = clean(event.sender), clean(event.recipient)
        return f"[private] {who} -> {to}: {clean(event.text)}"
    if isinstance(event, Presence):
        why = f" ({clean(event.reason)})" if event.reason and event.event == "left" else ""
        return f"[{clean(event.room)}] * {clean(event.user)} {clean(event.event)}{why}"
    if isinstance(event, Notice):
        return f"[server] {clean(event.text)}"
    if isinstance(event, ErrorEvent):
        return f"error: {clean(event.message)}"
    if event.type == "bye":
        return f"disconnected: {clean(str(event.header.get('reason', '')))}"
    return f"[{clean(event.type)}] {clean(json.dumps(event.header, ensure_ascii=False))}"


def as_json(header: dict[str, Any]) -> str:
    """``header`` as one line of JSON, safe to print: non-ASCII text is kept
    readable, but no control character is written raw (the encoder escapes
    the C0 controls itself, but would write DEL, C1 and the rest out raw)."""
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
