"""Private messages on one server: delivery, /reply targets, the offline store.

Other users are reached only through the Hub (``online``, ``send_to_user``),
never through their sessions, so a distributed hub can replace the local
one. The server builds every delivered frame itself: the sender is the
session's name, whatever the client put in its request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from libchat.errors import BadRequest, NotFound, Rejected
from libchat.plugins import call_firstresult
from libchat.protocol import check_nick, check_text, encode_frame, fold

from .store import Pending, PendingStore

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

#: Rounds of taking and delivering one :meth:`DirectMessages.flush` makes at
#: most when the user keeps coming and going while it runs.
FLUSH_ROUNDS = 3


async def ask_account_plugins(server: Server, name: str) -> bool:
    """The default account check: ask the plugins that implement
    ``libchat_account_exists(server, name)`` (first answer wins). With no
    such plugin nobody is known: offline users cannot be written to."""
    hook = getattr(server.pm.hook, ACCOUNT_HOOK, None)
    if hook is None or not hook.get_hookimpls():
        return False
    return bool(await call_firstresult(hook, server=server, name=name))


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
        connection the user has; return how many were delivered.

        A message leaves the store only once the hub has handed it to one of
        the user's connections at least: if the user left meanwhile, it and
        those after it go back, in their place, for the next login."""
        if self.store is None:
            return 0
        delivered = 0
        for _ in range(FLUSH_ROUNDS):
            sent, put_back = await self._deliver_stored(name)
            delivered += sent
            # Messages went back while the user is online again: their login
            # may have looked while the messages were out. Look for them.
            if not put_back or await self.server.hub.online(name) is None:
                break
        if delivered:
            log.info("delivered %d stored private messages to %s", delivered, name)
        return delivered

    async def _deliver_stored(self, name: str) -> tuple[int, int]:
        """Take what waits for ``name`` and deliver it in order, up to the
        first message nobody received; put that one and the rest back.
        Return how many were delivered and how many went back."""
        assert self.store is not None
        recipient, hub = fold(name), self.server.hub
        rows: list[Pending] = await self.store.take(recipient)
        sent = 0
        try:
            for row in rows:
                if not await hub.send_to_user(name, encode_frame(row.header)):
                    break  # nobody is connected any more
                sent += 1
                await hub.set_user_data(name, LAST_FROM, str(row.header.get("from", "")))
        finally:
            # Also when the delivery failed (or the server is shutting down):
            # whatever was not handed over is not lost.
            await self.store.restore(recipient, rows[sent:])
        return sent, len(rows) - sent

    async def session_opened(self, session: Session) -> None:
        # Only an authenticated session proves it is the account the mail is
        # for; anyone may take a free name on a server without accounts.
        if self.store is not None and session.authenticated:
            # Not in the session's own task: the session keeps handling its
            # connection while the store is read, so if the connection ends
            # meanwhile the user goes offline and the mail stays stored,
            # instead of being written to a connection that is gone.
            self.server.spawn(self._flush_quietly(session.name), name="libchat-dm-flush")

    async def _flush_quietly(self, name: str) -> None:
        try:
            await self.flush(name)
        except Exception:
            # What was not delivered is back in the store: the next login retries.
            log.exception("delivering stored private messages to %s failed", name)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
