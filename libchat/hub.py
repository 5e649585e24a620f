"""The Hub: who is online, which rooms exist, and delivery to them.

This is the seam for scale-out. Sessions and plugins reach other users only
through the :class:`Hub` interface, never through each other, so a
distributed implementation (several servers sharing rooms through Redis)
can replace :class:`LocalHub` without touching them. Calls that a
distributed hub must make over the network are ``async``; ``publish`` is a
fire-and-forget send and stays synchronous on the hot path.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from .errors import BadRequest, ConnectionClosed, NameInUse
from .protocol import fold

log = logging.getLogger("libchat.server")


class Member(Protocol):
    """What the hub needs of a session."""

    name: str

    def deliver(self, data: bytes) -> bool | None:
        """Queue encoded frame bytes for this member (never blocks). False:
        not queued, the connection is closed."""


#: What a plugin registers with :meth:`Hub.route`: called with the sending
#: node's id and the message's bytes, on the event loop; it must not block.
RouteHandler = Callable[[str, bytes], None]


def node_of(address: str) -> str:
    """The node part of an address made by :meth:`Hub.address`."""
    return address.partition("/")[0]


async def drain_member(member: Member) -> bool:
    """Wait until ``member``'s connection has sent what is queued for it
    (``Session.drain``); False if the connection closed. A member with
    nothing to drain has nothing queued."""
    drain = getattr(member, "drain", None)
    if drain is None:
        return True
    try:
        await drain()
    except (ConnectionClosed, ConnectionError, OSError):
        return False
    return True


class Hub(Protocol):
    #: This server's id among the servers sharing the hub (one for all
    #: connections of this process); part of every :meth:`address`.
    node: str

    async def attach(self, member: Member, *, shared: bool = False) -> None:
        """Claim ``member.name``; raise NameInUse if another holds it. With
        ``shared`` (an authenticated account) one user may hold several
        connections, all of which attached with ``shared``."""

    async def detach(self, member: Member) -> list[str]:
        """Release the name and leave every room; return those rooms."""

    async def join(self, room: str, member: Member) -> str | None:
        """Add ``member`` to ``room`` (created on first join). Return the
        room's display name, or ``None`` if ``member`` was already in it.
        Raise BadRequest if the room would be new and the hub holds as many
        rooms as it may (the server's ``max_rooms``)."""

    async def part(self, room: str, member: Member) -> str | None:
        """Remove ``member``; return the room's name, ``None`` if not in it."""

    def publish(self, room: str, data: bytes, exclude: Member | None = None) -> int:
        """Deliver ``data`` to every member of ``room`` but ``exclude``;
        return how many local members it was queued for."""

    async def send_to_user(self, name: str, data: bytes, exclude: Member | None = None) -> int:
        """Deliver ``data`` to every connection of user ``name`` but
        ``exclude``; return how many received it (0: offline)."""

    async def members(self, room: str) -> list[str] | None:
        """Names in ``room``, sorted; ``None`` if there is no such room."""

    async def rooms(self) -> list[tuple[str, int]]:
        """Every room with its member count, sorted by name."""

    async def online(self, name: str) -> str | None:
        """The name as its holder spells it, or ``None`` if offline."""

    async def set_user_data(self, name: str, key: str, value: str) -> bool:
        """Keep ``value`` under ``key`` for online user ``name`` (plugins'
        per-user state, such as /reply's target), wherever the user is
        connected; it lives until the user's last connection leaves. Return
        False if ``name`` is offline."""

    async def user_data(self, name: str, key: str) -> str | None:
        """What :meth:`set_user_data` kept (``None``: nothing, or offline)."""

    # -- routing to one connection, and between nodes (plugins' bulk data) --------

    def address(self, member: Member) -> str:
        """A route to this one connection of ``member`` (``"node/serial"``),
        valid while it stays attached, from any node."""

    async def deliver_to(self, address: str, data: bytes, *, drain: bool = False) -> bool:
        """Deliver ``data`` to the connection at ``address``, wherever it is.
        With ``drain``, return only once that connection has sent it on (its
        node's ``conn.drain()``): one call in flight per stream carries TCP's
        backpressure from the recipient to the caller. False: no such
        connection (gone, its node unreachable) or it closed. The caller
        bounds the wait (an acknowledgement between nodes may be lost)."""

    def route(self, topic: str, handler: RouteHandler) -> None:
        """Call ``handler(origin_node, data)`` for every :meth:`send_route`
        to this node on ``topic`` (one handler per topic)."""

    async def send_route(self, node: str, topic: str, data: bytes) -> bool:
        """Send ``data`` to the ``topic`` handler of ``node`` (an id, or an
        address, whose node is used). At most once; False if ``node`` is
        known to be unreachable."""


def _deliver(member: Member, data: bytes) -> int:
    """Queue ``data`` for one member; 1 if it was queued. A member whose
    connection is closed (``deliver`` returns False) counts 0; one that fails
    is logged and skipped, so one broken connection never costs the others a
    message."""
    try:
        return 0 if member.deliver(data) is False else 1
    except Exception:
        log.exception("delivery to %r failed", member)
        return 0


class _Room:
    """A room: its name as first spelt, and its members in join order."""

    __slots__ = ("members", "name", "snapshot")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[Member, None] = {}
        #: the members as a tuple, made on the first publish after a change:
        #: broadcast iterates it instead of copying the dict per message
        self.snapshot: tuple[Member, ...] | None = None


class LocalHub:
    """The in-memory hub of one server process.

    ``max_rooms`` bounds the rooms it holds (0: no bound); ``None`` leaves
    it to the server, which sets its own ``max_rooms`` limit.
    """

    def __init__(self, *, max_rooms: int | None = None, node: str = "local") -> None:
        self.max_rooms = max_rooms
        self.node = node
        #: address -> member, and back: routes handed out by :meth:`address`
        self._addresses: dict[str, Member] = {}
        self._address_of: dict[Member, str] = {}
        self._serials = itertools.count(1)
        self._routes: dict[str, RouteHandler] = {}
        #: folded name -> the connections holding it, and whether shared
        self._users: dict[str, tuple[list[Member], bool]] = {}
        #: folded room name -> the room
        self._rooms: dict[str, _Room] = {}
        #: member -> the folded names of its rooms, in join order: leaving
        #: costs the member's rooms, not every room on the server
        self._joined: dict[Member, dict[str, None]] = {}
        #: folded name -> set_user_data's values, while the user is online
        self._data: dict[str, dict[str, str]] = {}

    async def attach(self, member: Member, *, shared: bool = False) -> None:
        key = fold(member.name)
        entry = self._users.get(key)
        if entry is None:
            self._users[key] = ([member], shared)
        elif shared and entry[1]:
            if member not in entry[0]:
                entry[0].append(member)
        else:
            raise NameInUse(f"the name {entry[0][0].name!r} is in use")

    async def detach(self, member: Member) -> list[str]:
        left = [
            name
            for key in list(self._joined.get(member, ()))
            if (name := self._remove(key, member)) is not None
        ]
        key = fold(member.name)
        entry = self._users.get(key)
        if entry is not None and member in entry[0]:
            entry[0].remove(member)
            if not entry[0]:
                del self._users[key]
                self._data.pop(key, None)
        address = self._address_of.pop(member, None)
        if address is not None:
            del self._addresses[address]
        return left

    async def join(self, room: str, member: Member) -> str | None:
        key = fold(room)
        entry = self._rooms.get(key)
        if entry is None:
            if self.max_rooms and len(self._rooms) >= self.max_rooms:
                raise BadRequest(
                    f"the server holds {len(self._rooms)} rooms, its limit (max_rooms); "
                    "join one that exists"
                )
            entry = self._rooms[key] = _Room(room)
        if member in entry.members:
            return None
        entry.members[member] = None
        entry.snapshot = None
        self._joined.setdefault(member, {})[key] = None
        return entry.name

    async def part(self, room: str, member: Member) -> str | None:
        return self._remove(room, member)

    def _remove(self, room: str, member: Member) -> str | None:
        key = fold(room)
        entry = self._rooms.get(key)
        if entry is None or member not in entry.members:
            return None
        del entry.members[member]
        entry.snapshot = None
        if not entry.members:
            del self._rooms[key]
        joined = self._joined.get(member)
        if joined is not None:
            joined.pop(key, None)
            if not joined:
                del self._joined[member]
        return entry.name

    def publish(self, room: str, data: bytes, exclude: Member | None = None) -> int:
        # The hot path of the server: once per message, a call per member.
        entry = self._rooms.get(fold(room))
        if entry is None:
            return 0
        members = entry.snapshot
        if members is None:
            # A tuple, not the dict itself: a delivery may end a session.
            members = entry.snapshot = tuple(entry.members)
        count = 0
        for member in members:
            if member is exclude:
                continue
            try:
                member.deliver(data)
            except Exception:  # one broken member never costs the others a message
                log.exception("delivery to %r failed", member)
                continue
            count += 1
        return count

    async def send_to_user(self, name: str, data: bytes, exclude: Member | None = None) -> int:
        entry = self._users.get(fold(name))
        if entry is None:
            return 0
        return sum(_deliver(member, data) for member in list(entry[0]) if member is not exclude)

    async def members(self, room: str) -> list[str] | None:
        entry = self._rooms.get(fold(room))
        if entry is None:
            return None
        return sorted({m.name for m in entry.members}, key=fold)

    async def rooms(self) -> list[tuple[str, int]]:
        counts = (
            (room.name, len({fold(m.name) for m in room.members})) for room in self._rooms.values()
        )
        return sorted(counts, key=lambda r: fold(r[0]))

    async def online(self, name: str) -> str | None:
        entry = self._users.get(fold(name))
        return None if entry is None else entry[0][0].name

    async def set_user_data(self, name: str, key: str, value: str) -> bool:
        folded = fold(name)
        if folded not in self._users:
            return False
        self._data.setdefault(folded, {})[key] = value
        return True

    async def user_data(self, name: str, key: str) -> str | None:
        return self._data.get(fold(name), {}).get(key)

    def local_members(self) -> Iterable[Member]:
        return [m for members, _ in self._users.values() for m in members]

    # -- routing --------------------------------------------------------------------

    def address(self, member: Member) -> str:
        address = self._address_of.get(member)
        if address is None:
            address = f"{self.node}/{next(self._serials)}"
            self._address_of[member] = address
            self._addresses[address] = member
        return address

    def member_at(self, address: str) -> Member | None:
        """The attached member at ``address`` on this node, if any."""
        return self._addresses.get(address)

    async def deliver_to(self, address: str, data: bytes, *, drain: bool = False) -> bool:
        member = self._addresses.get(address)
        if member is None or not _deliver(member, data):
            return False
        return await drain_member(member) if drain else True

    def route(self, topic: str, handler: RouteHandler) -> None:
        self._routes[topic] = handler

    async def send_route(self, node: str, topic: str, data: bytes) -> bool:
        if node_of(node) != self.node:
            return False  # one process: no other node to reach
        return self.routed(self.node, topic, data)

    def routed(self, origin: str, topic: str, data: bytes) -> bool:
        """Hand a routed message to its topic's handler; False if none."""
        handler = self._routes.get(topic)
        if handler is None:
            return False
        try:
            handler(origin, data)
        except Exception:  # a plugin's bug must not break the hub's reader
            log.exception("route handler for %r failed", topic)
        return True
