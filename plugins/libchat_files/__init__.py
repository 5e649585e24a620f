"""Chunked file transfer: chat send-file, /send, /accept, resumable and verified.

The server relays files chunk by chunk without ever holding one, at the
pace of the recipient; the recipient writes a hidden ``.part`` file and
gives it its (sanitised) name only once the SHA-256 matches. See
docs/files.md for the protocol.

Library use::

    from libchat_files import files_of

    async with libchat.connect(host, port, user="alice", plugins=["files"]) as chat:
        await files_of(chat).send("bob", "report.pdf")

    # a receiver that accepts every offer into a folder, from alice only
    # (the limits: libchat_files.limits)
    bob = await libchat.open_client(host, port, user="bob", plugins=["files"],
                                    options={"accept_files": "downloads",
                                             "accept_files_from": "alice"})
    incoming = await files_of(bob).results.get()   # .state == "saved", .path
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from libchat import ClientCommand, Server, Session, hookimpl
from libchat.events import Event

from .errors import (
    Declined,
    FileTooLarge,
    HashMismatch,
    Interrupted,
    NoAnswer,
    NotOnline,
    TransferError,
)
from .names import safe_filename
from .relay import DEFAULT_MAX_FILE_SIZE, DEFAULT_STALL_TIMEOUT, Relay, check_hub
from .transfers import FileTransfers, Incoming, Outgoing, files_of

if TYPE_CHECKING:
    import click

    from libchat import Client

PLUGIN_NAME = "files"

__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_STALL_TIMEOUT",
    "PLUGIN_NAME",
    "Declined",
    "FileTooLarge",
    "FileTransfers",
    "HashMismatch",
    "Incoming",
    "Interrupted",
    "NoAnswer",
    "NotOnline",
    "Outgoing",
    "TransferError",
    "files_of",
    "safe_filename",
]


def relay_of(server: Server) -> Relay:
    """The server's relay (made on first use; kept in ``server.data``, so it
    goes when the server goes)."""
    relay = server.data.get(PLUGIN_NAME)
    if relay is None:
        relay = server.data[PLUGIN_NAME] = Relay(server)
    assert isinstance(relay, Relay)
    return relay


# -- server side ----------------------------------------------------------------------


@hookimpl
def libchat_startup(server: Server) -> None:
    # Refuse what cannot work, and read the configuration, now: a bad
    # max_file_size or a hub that cannot route stops the server before it
    # listens, not at the first offer.
    check_hub(server)
    relay_of(server)


@hookimpl
def libchat_frame_handlers(server: Server) -> dict[str, Any]:
    return relay_of(server).handlers()


@hookimpl
def libchat_limits(server: Server) -> dict[str, Any]:
    return relay_of(server).limits()


@hookimpl
async def libchat_session_closed(session: Session, reason: str) -> None:
    relay = session.server.data.get(PLUGIN_NAME)
    if isinstance(relay, Relay):
        await relay.session_closed(session)


# -- client side ----------------------------------------------------------------------


@hookimpl
def libchat_client_frame(client: Client, event: Event) -> Awaitable[bool | None] | bool | None:
    # Called for every frame the client reads: stay cheap for chat frames.
    kind = event.type
    if kind.startswith("file.") or (kind == "error" and "tid" in event.header):
        return files_of(client).on_event(event)
    return None


@hookimpl
def libchat_client_commands() -> list[ClientCommand]:
    from .terminal import client_commands

    return client_commands()


@hookimpl
def libchat_format_event(event: Event) -> str | None:
    if not event.type.startswith("file."):
        return None
    from .terminal import format_event

    return format_event(event)


@hookimpl
def libchat_register_commands(cli: click.Group) -> None:
    from .cli import send_file

    cli.add_command(send_file)
