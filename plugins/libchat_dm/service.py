"""Private messages on one server: delivery, /reply targets, the offline store.

Other users are reached only through the Hub (``online``, ``send_to_user``),
never through their sessions, so a distributed hub can replace the local
one. The server builds every delivered frame itself: the sender is the
session's name, whatever the client put in its request.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from libchat.errors import BadRequest, NotFound, Rejected
from libchat.plugins import call_firstresult
from libchat.protocol import check_nick, check_text, encode_frame, fold

from .store import PendingStore

if TYPE_CHECKING:
    from libchat import Server, Session

log = logging.getLogger("libchat.dm")

#: ``check(server, name)``: is ``name`` a known account (one that may get
#: messages while offline)?
AccountCheck = Callable[["Server", str], Awaitable[bool]]

#: The hub's per-user key for /reply's target: who last wrote to the user.
LAST_FROM = "dm.last_from"

#: The hook an accounts plugin implements to answer :data:`AccountCheck`.
ACCOUNT_HOOK = "libchat_account_exists"

_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


async def ask_account_plugins(server: Server, name: str) -> bool:
    """The default account check: ask the plugins that implement
    ``libchat_account_exists(server, name)`` (first answer wins). With no
    such plugin nobody is known: offline users cannot be written to."""
    hook = getattr(server.pm.hook, ACCOUNT_HOOK, None)
    if hook is None or not hook.get_hookimpls():
        return False
    return bool(await call_firstresult(hook, server=server, name=name))


def printable(text: str) -> str:
    """``text`` with control characters shown escaped, for a line a
    terminal prints as is (the command reply's ``text``)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class DirectMessages:
    """The dm plugin's state and logic for one server."""

    def __init__(
        self,
        server: Server,
        store: PendingStore | None = None,
        *,
        account_exists: AccountCheck = ask_account_plugins,
    ) -> None:
        self.server = server
        self.store = store
        self.account_exists = account_exists

    # -- sending ----------------------------------------------------------------------

    async def send(self, session: Session, to: object, text: object) -> dict[str, Any]:
        """Deliver ``text`` from ``session`` to user ``to``; return the
        fields of the sender's ``ok`` reply. Raise InvalidName, BadRequest,
        or NotFound (offline and not storable) and deliver nothing."""
        name = check_nick(to)
        text = check_text(text, self.server.limits.max_message_bytes)
        hub = self.server.hub
        shown = await hub.online(name)
        header: dict[str, Any] = {
            "type": "dm",
            "from": session.name,
            "to": shown or name,
            "text": text,
            "ts": round(time.time(), 3),
            "mid": self.server.next_mid(),
        }
        data = encode_frame(header)
        if fold(name) == fold(session.name):
            pass  # a note to self: the sender's other connections get it below
        elif shown is not None and await hub.send_to_user(shown, data):
            # /reply's target lives in the hub, per user (all of the user's
            # devices got the message), on whichever node the user is.
            await hub.set_user_data(shown, LAST_FROM, session.name)
        else:
            header["stored"] = True
            data = encode_frame(header)
            await self._keep(name, header)
        await self._echo(session, data)
        fields = {"to": header["to"], "mid": header["mid"], "ts": header["ts"]}
        if header.get("stored"):
            fields["stored"] = True
        return fields

    async def reply(self, session: Session, text: object) -> dict[str, Any]:
        """Send ``text`` to whoever last wrote to ``session``'s user."""
        target = await self.server.hub.user_data(session.name, LAST_FROM)
        if target is None:
            raise BadRequest("nobody has sent you a private message to reply to")
        return await self.send(session, target, text)

    async def _echo(self, session: Session, data: bytes) -> None:
        """Show the sent message on the sender's other connections (their
        other devices); the sending connection gets the ``ok`` reply."""
        await self.server.hub.send_to_user(session.name, data, exclude=session)

    # -- the offline store --------------------------------------------------------------

    async def _keep(self, name: str, header: dict[str, Any]) -> None:
        """Store a message for offline user ``name``, or raise NotFound."""
        if self.store is None:
            raise NotFound(f"no user named {name!r} is online", user=name)
        if not await self.account_exists(self.server, name):
            raise NotFound(f"no user named {name!r} is online or has an account", user=name)
        if not await self.store.put(fold(name), header):
            limit = self.store.max_per_user
            raise Rejected(f"{name} already has {limit} messages waiting; try later", user=name)
        # They may have logged in while the message was being stored, after
        # their login fetched what was waiting: fetch again for them.
        if await self.server.hub.online(name) is not None:
            await self.flush(name)

    async def flush(self, name: str) -> int:
        """Deliver, oldest first, every stored message for ``name`` to every
        connection the user has; return how many there were."""
        if self.store is None:
            return 0
        headers = await self.store.take(fold(name))
        for header in headers:
            await self.server.hub.send_to_user(name, encode_frame(header))
            await self.server.hub.set_user_data(name, LAST_FROM, str(header.get("from", "")))
        if headers:
            log.info("delivered %d stored private messages to %s", len(headers), name)
        return len(headers)

    async def session_opened(self, session: Session) -> None:
        # Only an authenticated session proves it is the account the mail is
        # for; anyone may take a free name on a server without accounts.
        if self.store is not None and session.authenticated:
            await self.flush(session.name)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
