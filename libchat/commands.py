"""What plugins register: slash commands and frame handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocol import Frame
    from .session import Session

#: ``handler(session, args, request)``: ``args`` is the text after the command
#: name, ``request`` the whole ``command`` frame header (with its ``id`` and
#: the sender's current ``room``). Raise a ChatError to answer with an error.
CommandHandler = Callable[["Session", str, dict[str, Any]], Awaitable[Any] | Any]

#: ``handler(session, frame)`` for a plugin frame type.
FrameHandler = Callable[["Session", "Frame"], Awaitable[Any] | Any]


@dataclass(frozen=True, slots=True)
class Command:
    """A slash command run by the server (``/msg NAME TEXT``)."""

    name: str
    handler: CommandHandler
    usage: str = ""
    help: str = ""


#: ``handler(terminal, args)``: the terminal client (``terminal.client``,
#: ``terminal.out(text)``, ``terminal.err(text)``) and the text after the name.
ClientCommandHandler = Callable[[Any, str], Awaitable[Any] | Any]


@dataclass(frozen=True, slots=True)
class ClientCommand:
    """A slash command the terminal client runs itself (``/send NAME PATH``)."""

    name: str
    handler: ClientCommandHandler
    usage: str = ""
    help: str = ""
