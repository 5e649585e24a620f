"""Private messages: /msg NAME TEXT and /reply TEXT.

Written as any third-party plugin would be: hooks from
:mod:`libchat.hookspecs`, the Server and Session API, and the Hub. It adds

* the ``dm`` frame type: ``{"type": "dm", "to": NAME, "text": TEXT, "id": ...}``
  (what :meth:`libchat.Client.private` sends). The server delivers
  ``{"type": "dm", "from", "to", "text", "ts", "mid"}`` to every connection
  of NAME and to the sender's other connections, and answers the request
  with ``ok`` carrying ``to``, ``mid`` and ``ts``;
* the slash commands ``/msg NAME TEXT`` and ``/reply TEXT`` (the ``ok``
  reply also carries a ``text`` line for the terminal to print).

With ``--db``, a message to an offline user who has an account (a plugin
answers ``libchat_account_exists(server, name)``, see
:func:`libchat_dm.service.ask_account_plugins`) is stored and delivered, in
order and once, when that user next logs in. Server settings (``config``):
``db`` (the SQLite file) and ``dm_max_pending`` (messages kept per offline
user, default 100).
"""

from __future__ import annotations

import sqlite3
import weakref
from typing import TYPE_CHECKING, Any

from libchat import Command, hookimpl
from libchat.errors import BadRequest, ChatError
from libchat_cli.render import clean

from .service import DirectMessages
from .store import PendingStore

if TYPE_CHECKING:
    from libchat import Server, Session
    from libchat.commands import FrameHandler
    from libchat.protocol import Frame

PLUGIN_NAME = "dm"
DEFAULT_MAX_PENDING = 100

#: One state per server: a process may run several servers (the tests do).
_STATE: weakref.WeakKeyDictionary[Server, DirectMessages] = weakref.WeakKeyDictionary()


def state(server: Server) -> DirectMessages:
    """The plugin's state on ``server`` (made by the startup hook)."""
    return _STATE[server]


# -- lifecycle ---------------------------------------------------------------------


@hookimpl
async def libchat_startup(server: Server) -> None:
    store = None
    path = server.config.get("db")
    if path:
        max_pending = int(server.config.get("dm_max_pending", DEFAULT_MAX_PENDING))
        try:
            store = await PendingStore.open(str(path), max_per_user=max_pending)
        except sqlite3.Error as exc:
            raise ChatError(f"cannot open the private message store {path}: {exc}") from None
    _STATE[server] = DirectMessages(server, store)


@hookimpl
async def libchat_shutdown(server: Server) -> None:
    dm = _STATE.pop(server, None)
    if dm is not None:
        await dm.close()


@hookimpl
def libchat_limits(server: Server) -> dict[str, Any] | None:
    dm = _STATE.get(server)
    if dm is None or dm.store is None:
        return None
    return {"dm_max_pending": dm.store.max_per_user}


@hookimpl
async def libchat_session_opened(session: Session) -> None:
    await state(session.server).session_opened(session)


# -- what clients can ask -----------------------------------------------------------


@hookimpl
def libchat_frame_handlers(server: Server) -> dict[str, FrameHandler] | None:
    return {"dm": on_dm_frame}


@hookimpl
def libchat_commands(server: Server) -> list[Command] | None:
    return [
        Command("msg", msg_command, "/msg NAME TEXT", "send TEXT to NAME alone"),
        Command("reply", reply_command, "/reply TEXT", "answer the last private message"),
    ]


async def on_dm_frame(session: Session, frame: Frame) -> None:
    request = frame.header
    # Only "to" and "text" are read: a "from" in the request is ignored.
    sent = await state(session.server).send(session, request.get("to"), request.get("text"))
    session.reply(request, **sent)


async def msg_command(session: Session, args: str, request: dict[str, Any]) -> None:
    name, _, text = args.strip().partition(" ")
    if not name or not text.strip():
        raise BadRequest("usage: /msg NAME TEXT")
    text = text.lstrip(" ")
    sent = await state(session.server).send(session, name, text)
    session.reply(request, **sent, text=_confirmation(session, sent, text))


async def reply_command(session: Session, args: str, request: dict[str, Any]) -> None:
    if not args.strip():
        raise BadRequest("usage: /reply TEXT")
    text = args.strip()
    sent = await state(session.server).reply(session, text)
    session.reply(request, **sent, text=_confirmation(session, sent, text))


def _confirmation(session: Session, sent: dict[str, Any], text: str) -> str:
    """The line the sender's terminal prints, as the recipient's shows it."""
    note = " (offline: delivered when they next log in)" if sent.get("stored") else ""
    return f"[private] {session.name} -> {sent['to']}{note}: {clean(text)}"
