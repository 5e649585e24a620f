"""libchat: an asyncio chat server and client, extensible with plugins.

Run a server::

    async with libchat.Server("127.0.0.1", 12345, plugins=["dm"]) as server:
        await server.serve_forever()

Connect a client (a bot)::

    async with libchat.connect("127.0.0.1", 12345, user="bot") as chat:
        async for event in chat:
            ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Client, connect, open_client
from .commands import ClientCommand, Command
from .errors import ChatError, ConnectionClosed, RemoteError
from .events import ErrorEvent, Event, Message, Notice, Presence, PrivateMessage
from .hookspecs import hookimpl
from .limits import Limits
from .protocol import DEFAULT_ROOM, PROTOCOL_VERSION
from .server import DEFAULT_HOST, DEFAULT_PORT, Server
from .session import Session

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_ROOM",
    "PROTOCOL_VERSION",
    "ChatError",
    "Client",
    "ClientCommand",
    "Command",
    "ConnectionClosed",
    "ErrorEvent",
    "Event",
    "Limits",
    "Message",
    "Notice",
    "Presence",
    "PrivateMessage",
    "RemoteError",
    "Server",
    "Session",
    "__version__",
    "connect",
    "hookimpl",
    "open_client",
]
