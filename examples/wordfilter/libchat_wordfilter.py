"""Word filter: banned words become ***; a message of nothing else is refused.

The banned words come from ``server.config["banned_words"]`` (a list, or one
comma-separated string), else the ``LIBCHAT_BANNED_WORDS`` environment
variable, else :data:`DEFAULT_WORDS`. Words match whole and ignoring case.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

import click

import libchat
from libchat.errors import Rejected

#: The name announced to clients (the entry point name, not the module's).
PLUGIN_NAME = "wordfilter"
DEFAULT_WORDS = ("darn", "heck")
MASK = "***"

log = logging.getLogger("libchat.wordfilter")


# -- the filter itself: plain functions, easy to test --------------------------------


def banned_words(config: dict[str, Any]) -> tuple[str, ...]:
    """The configured banned words, lower case, sorted, without duplicates."""
    words = config.get("banned_words")
    if words is None:
        words = os.environ.get("LIBCHAT_BANNED_WORDS")
    if words is None:
        words = DEFAULT_WORDS
    if isinstance(words, str):
        words = words.split(",")
    return tuple(sorted({str(word).strip().lower() for word in words if str(word).strip()}))


@functools.lru_cache(maxsize=32)
def _pattern(words: tuple[str, ...]) -> re.Pattern[str] | None:
    if not words:
        return None
    # Longest first, so "heckle" is not half-matched as "heck"+"le"; the
    # lookarounds (rather than \b) also work for words like "f*ck".
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def censor(text: str, words: tuple[str, ...]) -> str:
    """``text`` with each banned word replaced by ``***``. Raise Rejected
    when nothing but banned words (and spaces or punctuation) is left."""
    pattern = _pattern(words)
    if pattern is None:
        return text
    censored, count = pattern.subn(MASK, text)
    if count and not re.search(r"\w", pattern.sub("", text)):
        raise Rejected("message refused: it holds nothing but banned words")
    return censored


# -- server hooks ----------------------------------------------------------------------


@libchat.hookimpl
def libchat_startup(server: libchat.Server) -> None:
    # Read the setting once, so that a bad one fails at startup, not on the
    # first message; the message hook then reads the normalised tuple.
    server.config["banned_words"] = banned_words(server.config)
    log.info("word filter: %d banned words", len(server.config["banned_words"]))


@libchat.hookimpl
def libchat_message(session: libchat.Session, message: dict[str, Any]) -> None:
    words = session.server.config["banned_words"]
    censored = censor(message["text"], words)  # may raise Rejected: nobody gets it
    if censored != message["text"]:
        # session.data is per-connection scratch space, keyed by plugin name.
        state = session.data.setdefault(PLUGIN_NAME, {"censored": 0})
        state["censored"] += 1
        message["text"] = censored  # changed in place: this is what is delivered


async def _banned(session: libchat.Session, args: str, request: dict[str, Any]) -> None:
    """/banned: list the banned words (and how often you used them)."""
    words = list(session.server.config["banned_words"])
    censored = session.data.get(PLUGIN_NAME, {}).get("censored", 0)
    text = f"banned words: {', '.join(words) or 'none'} (you were censored {censored} times)"
    session.reply(request, text=text, words=words, censored=censored)


@libchat.hookimpl
def libchat_commands(server: libchat.Server) -> list[libchat.Command]:
    return [libchat.Command("banned", _banned, usage="/banned", help="list the banned words")]


# -- command line ----------------------------------------------------------------------


@libchat.hookimpl
def libchat_register_commands(cli: click.Group) -> None:
    @cli.command("wordfilter")
    @click.argument("text")
    @click.option("--words", default=None, help="Comma-separated banned words.")
    def wordfilter(text: str, words: str | None) -> None:
        """Show what the word filter makes of TEXT."""
        config = {} if words is None else {"banned_words": words}
        try:
            click.echo(censor(text, banned_words(config)))
        except Rejected as exc:
            raise click.ClickException(exc.message) from None
