"""A Hub shared by several ``chat serve`` processes through Redis.

::

    chat serve --hub redis://127.0.0.1:6379/0 --cluster prod

Every server (a *node*) on the same Redis with the same cluster name shares
rooms, presence, names and private messages. :class:`RedisHub` keeps a
:class:`~libchat.hub.LocalHub` for this node's own members and delivers to
them first, without Redis; Redis only carries what other nodes need:

* delivery: pub/sub. A frame for a room is PUBLISHed on the room's channel,
  to which a node is subscribed while it has members in the room; a frame for
  one user goes to the inbox channel of each node holding a connection of
  that user. Payloads are the frame's bytes behind a 13-byte header (origin
  node, kind), so a node skips its own echo and nothing is re-encoded.
  ``publish`` stays synchronous: it queues the frame for one writer task,
  which sends everything queued in one pipeline per round trip, in order,
  merging consecutive frames for one room into one PUBLISH.
* state: hashes and sets (names, room members, which node holds what), all
  updated by Lua scripts so that a check and its write are atomic (a name
  is claimed once across the cluster).
* liveness: each node refreshes a key with a TTL (the heartbeat); every node
  looks for nodes whose key expired, and one script both removes a dead
  node's entries and returns them, so exactly one survivor announces its
  members as left, to everyone.

Pub/sub delivers at most once: what is published while a node is cut off
from Redis never reaches it. A node that loses Redis keeps serving its own
members, counts what it could not send (:attr:`RedisHub.stats`), logs the
outage, reconnects with backoff, resubscribes and registers its members
again. docs/scaling.md has the keys, the failure modes and how to deploy.

Not for Redis Cluster: the scripts reach keys they compute (one Redis, or
one primary with Sentinel, holds a libchat cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import random
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import ChatError, NameInUse
from .hub import LocalHub, Member, RouteHandler, drain_member, node_of
from .protocol import encode_frame, fold

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the Redis hub needs redis-py: pip install 'libchat[redis]'") from exc

log = logging.getLogger("libchat.hub")

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
DEFAULT_CLUSTER: Final = "libchat"
#: Seconds between heartbeats (and between looks for dead nodes).
HEARTBEAT: Final = 1.0
#: Seconds a node's heartbeat key lives: a node silent this long is dead.
NODE_TTL: Final = 5.0
#: Seconds any one Redis operation may take before the node carries on alone.
OP_TIMEOUT: Final = 2.0
#: Longest pause between two reconnection attempts, in seconds.
MAX_BACKOFF: Final = 5.0
#: Frames and commands waiting for Redis at most; past it frames are dropped
#: (and counted): a slow Redis must not grow the server's memory without end.
MAX_QUEUE: Final = 65536
#: Commands in one pipeline, and bytes in one merged PUBLISH.
MAX_BATCH: Final = 512
MAX_PAYLOAD: Final = 256 * 1024
#: How long a dead node's tombstone says "you were declared dead" (seconds).
TOMBSTONE: Final = 86400
#: Settings a hub URL may carry in its query string (the rest goes to redis-py).
URL_SETTINGS: Final = ("heartbeat", "node_ttl", "op_timeout", "max_backoff")

_CLUSTER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NODE_BYTES = 6  # a node id is 12 hex digits
_ROOM: Final = b"r"
_USER: Final = b"u"
#: a frame for one connection (Hub.deliver_to): ack id (8 bytes, 0: no
#: ack wanted), address length, address, frame
_ADDRESS: Final = b"a"
#: the answer to a deliver_to with drain: ack id, 1 (drained) or 0 (gone)
_ACK: Final = b"k"
#: a plugin's node-to-node message (Hub.send_route): topic length, topic, data
_ROUTE: Final = b"t"


class HubUnavailable(Exception):
    """Redis cannot answer now; the node carries on with what it knows."""


@dataclass
class HubStats:
    """What crossed Redis, and what could not (never silently)."""

    #: frames published for other nodes
    sent: int = 0
    #: payloads from other nodes delivered here (one may hold several frames)
    received: int = 0
    #: frames other nodes never got: Redis was down, or the queue was full
    not_sent: int = 0
    #: times the connection to Redis was lost
    outages: int = 0
    #: names taken while Redis was down, checked on this node only
    unchecked_names: int = 0
    #: names found held on two nodes once Redis was back
    name_conflicts: int = 0
    #: dead nodes whose members this node announced as left
    reaped: int = 0


class Keys:
    """Every key and channel name of one cluster (all share one prefix)."""

    def __init__(self, cluster: str) -> None:
        self.prefix = p = f"libchat:{cluster}:"
        self.nodes = p + "nodes"  # SET of node ids
        self.rooms = p + "rooms"  # HASH folded room -> room name
        self.room_channel_prefix = (p + "to-room:").encode()

    def node(self, node: str) -> str:
        """STRING with a TTL: the node's heartbeat (its value says who it is)."""
        return f"{self.prefix}node:{node}"

    def node_users(self, node: str) -> str:
        """SET of the folded names the node holds connections for."""
        return f"{self.prefix}node:{node}:users"

    def node_rooms(self, node: str) -> str:
        """SET of the folded rooms the node has members in."""
        return f"{self.prefix}node:{node}:rooms"

    def gone(self, node: str) -> str:
        """Set when another node declared this one dead and announced it."""
        return f"{self.prefix}gone:{node}"

    def user(self, folded: str) -> str:
        """HASH: ``~name``, ``~shared``, and node id -> connections there."""
        return f"{self.prefix}user:{folded}"

    def room(self, folded: str) -> str:
        """HASH: ``node|folded user`` -> user name, one per node per member."""
        return f"{self.prefix}room:{folded}"

    def room_channel(self, folded: str) -> bytes:
        return self.room_channel_prefix + folded.encode()

    def inbox(self, node: str) -> bytes:
        return f"{self.prefix}to-node:{node}".encode()


# -- scripts (atomic on the Redis side) ----------------------------------------------------

#: Claim, update or release a user name for this node.
#: KEYS: the user's hash, this node's user set.
#: ARGV: prefix, node, name, shared (0/1), connections here, folded name,
#: mode ("claim": refuse a name a live node holds; "set": write anyway).
#: Returns the holder's name on a conflict, else nil.
USER_SCRIPT: Final = """
local prefix, node, count = ARGV[1], ARGV[2], tonumber(ARGV[5])
local holder = false
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, 1, 1) ~= '~' and f ~= node and tonumber(fields[i + 1]) > 0
     and redis.call('EXISTS', prefix .. 'node:' .. f) == 1 then
    holder = f
    break
  end
end
if count <= 0 then
  redis.call('HDEL', KEYS[1], node)
  redis.call('SREM', KEYS[2], ARGV[6])
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(f, 1, 1) ~= '~' then return false end
  end
  redis.call('DEL', KEYS[1])
  return false
end
local conflict = false
if holder then
  if redis.call('HGET', KEYS[1], '~shared') ~= '1' or ARGV[4] ~= '1' then
    conflict = redis.call('HGET', KEYS[1], '~name') or ARGV[3]
    if ARGV[7] == 'claim' then return conflict end
  end
else
  redis.call('HSET', KEYS[1], '~name', ARGV[3])
end
redis.call('HSET', KEYS[1], '~shared', ARGV[4], node, ARGV[5])
redis.call('SADD', KEYS[2], ARGV[6])
return conflict
"""

#: Enter or leave a room (one entry per node and user, whatever the count).
#: KEYS: the rooms hash, the room's hash, this node's room set.
#: ARGV: node, folded user, user name, folded room, room name, "1" to enter
#: or "0" to leave, "1" if this node still has members in the room.
#: Returns the room's name as the cluster spells it (on entering).
ROOM_SCRIPT: Final = """
local entry = ARGV[1] .. '|' .. ARGV[2]
if ARGV[6] == '1' then
  redis.call('HSETNX', KEYS[1], ARGV[4], ARGV[5])
  redis.call('HSET', KEYS[2], entry, ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[4])
  return redis.call('HGET', KEYS[1], ARGV[4])
end
redis.call('HDEL', KEYS[2], entry)
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('HDEL', KEYS[1], ARGV[4])
end
if ARGV[7] ~= '1' then redis.call('SREM', KEYS[3], ARGV[4]) end
return false
"""

#: Remove every entry of a node; return its memberships as a flat list
#: room name, user name, room name, user name...
#: ARGV: prefix, node, mode ("reap": only if its heartbeat expired, and
#: leave a tombstone; "purge": this node's own, before registering again),
#: tombstone seconds.
#: Atomic: of several survivors reaping one node, one gets the list.
REAP_SCRIPT: Final = """
local p, node = ARGV[1], ARGV[2]
if ARGV[3] == 'reap' and redis.call('EXISTS', p .. 'node:' .. node) == 1 then return {} end
local out = {}
local lead = node .. '|'
local rooms_key = p .. 'node:' .. node .. ':rooms'
local users_key = p .. 'node:' .. node .. ':users'
for _, froom in ipairs(redis.call('SMEMBERS', rooms_key)) do
  local key = p .. 'room:' .. froom
  local shown = redis.call('HGET', p .. 'rooms', froom) or froom
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, #lead) == lead then
      redis.call('HDEL', key, fields[i])
      table.insert(out, shown)
      table.insert(out, fields[i + 1])
    end
  end
  if redis.call('HLEN', key) == 0 then redis.call('HDEL', p .. 'rooms', froom) end
end
for _, fuser in ipairs(redis.call('SMEMBERS', users_key)) do
  local key = p .. 'user:' .. fuser
  redis.call('HDEL', key, node)
  local left = false
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, 1) ~= '~' then left = true break end
  end
  if not left then redis.call('DEL', key) end
end
redis.call('DEL', rooms_key, users_key)
redis.call('SREM', p .. 'nodes', node)
if ARGV[3] == 'reap' then redis.call('SET', p .. 'gone:' .. node, '1', 'EX', ARGV[4]) end
return out
"""

#: The nodes (but this one) whose heartbeat expired. ARGV: prefix, node.
DEAD_SCRIPT: Final = """
local dead = {}
for _, node in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'nodes')) do
  if node ~= ARGV[2] and redis.call('EXISTS', ARGV[1] .. 'node:' .. node) == 0 then
    table.insert(dead, node)
  end
end
return dead
"""

#: Publish a payload to the inbox of every live node (but this one) holding
#: connections of a user; return how many connections that is.
#: KEYS: the user's hash. ARGV: prefix, node, payload.
ROUTE_SCRIPT: Final = """
local count = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local node = fields[i]
  if string.sub(node, 1, 1) ~= '~' and node ~= ARGV[2]
     and redis.call('EXISTS', ARGV[1] .. 'node:' .. node) == 1 then
    redis.call('PUBLISH', ARGV[1] .. 'to-node:' .. node, ARGV[3])
    count = count + tonumber(fields[i + 1])
  end
end
return count
"""

#: Attach data to an online user (gone with the user's hash when the last
#: connection leaves). KEYS: the user's hash. ARGV: field, value.
#: Returns 1, or 0 if the user is offline.
USER_DATA_SCRIPT: Final = """
if redis.call('HEXISTS', KEYS[1], '~name') == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

#: Every room with its number of distinct members: name, count, name, count...
#: ARGV: prefix.
ROOMS_SCRIPT: Final = """
local out = {}
local rooms = redis.call('HGETALL', ARGV[1] .. 'rooms')
for i = 1, #rooms, 2 do
  local seen, n = {}, 0
  for _, f in ipairs(redis.call('HKEYS', ARGV[1] .. 'room:' .. rooms[i])) do
    local user = string.match(f, '^[^|]*|(.*)$')
    if user and not seen[user] then
      seen[user] = true
      n = n + 1
    end
  end
  if n > 0 then
    table.insert(out, rooms[i + 1])
    table.insert(out, n)
  end
end
return out
"""


# -- this node's own books ------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _User:
    """A name held on this node, and its connections here."""

    name: str
    shared: bool
    members: list[Member] = field(default_factory=list)
    #: set_user_data's values, kept here too for when Redis is away
    data: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Room:
    """A room this node has members in: folded user -> connections in it."""

    name: str
    users: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Command:
    """A Redis command for the writer, and where its answer goes."""

    args: tuple[Any, ...]
    future: asyncio.Future[Any] | None = None


#: What the writer's queue holds: (room channel, frame) pairs, the hot path,
#: or commands.
_Item = tuple[bytes, bytes] | _Command


def presence(room: str, user: str, event: str, reason: str = "") -> bytes:
    """A presence frame, as sessions send them."""
    header = {"type": "presence", "room": room, "user": user, "event": event}
    if reason:
        header["reason"] = reason
    return encode_frame(header)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def redacted(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisHub:
    """A :class:`~libchat.hub.Hub` shared by every node of ``cluster`` on the
    Redis at ``url``. The server calls :meth:`start` before it listens and
    :meth:`close` once its sessions have ended."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        cluster: str = DEFAULT_CLUSTER,
        heartbeat: float = HEARTBEAT,
        node_ttl: float = NODE_TTL,
        op_timeout: float = OP_TIMEOUT,
        max_backoff: float = MAX_BACKOFF,
        max_queue: int = MAX_QUEUE,
        redis_options: dict[str, Any] | None = None,
    ) -> None:
        if not _CLUSTER_RE.fullmatch(cluster):
            raise ChatError(
                f"invalid cluster name {cluster!r}: 1-64 letters, digits, '_', '.' or '-'"
            )
        if heartbeat <= 0 or node_ttl <= heartbeat:
            raise ChatError("the heartbeat must be positive and shorter than node_ttl")
        if op_timeout <= 0 or max_backoff <= 0:
            raise ChatError("op_timeout and max_backoff must be positive")
        self.url = url
        self.cluster = cluster
        self.heartbeat = heartbeat
        self.node_ttl = node_ttl
        self.op_timeout = op_timeout
        self.max_backoff = max_backoff
        self.max_queue = max_queue
        self.node = secrets.token_hex(_NODE_BYTES)
        self.keys = Keys(cluster)
        self.local = LocalHub(node=self.node)
        self.stats = HubStats()
        self._redis_options = {
            # Reconnecting is this class's job, with its own backoff: redis-py
            # must fail at once instead of retrying on its own.
            "retry": Retry(NoBackoff(), 0),
            "socket_timeout": op_timeout,
            "socket_connect_timeout": op_timeout,
            "client_name": f"libchat-{cluster}-{self.node}",
            **(redis_options or {}),
        }
        self._origin = self.node.encode()
        self._room_head = self._origin + _ROOM
        self._inbox = self.keys.inbox(self.node)
        self._members: dict[Member, str] = {}  # member -> folded name
        self._users: dict[str, _User] = {}  # folded name -> user
        self._rooms: dict[str, _Room] = {}  # folded room -> room
        self._channels: dict[str, bytes] = {}  # room as given -> its channel
        self._queue: deque[_Item] = deque()
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None  # redis.asyncio.client.PubSub
        self._reader: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        #: channel -> confirmation of its latest SUBSCRIBE (done once confirmed)
        self._subscribed: dict[bytes, asyncio.Future[None]] = {}
        #: channel -> SUBSCRIBEs sent and not yet confirmed, oldest first
        self._confirming: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._up = False
        self._closed = False
        self._generation = 0  # one per connection: a stale task's error is ignored
        self._down_since = 0.0
        self._not_sent_before = 0
        self._full_warned = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._sub_lock: asyncio.Lock | None = None
        self._connected: asyncio.Event | None = None
        #: deliver_to calls with drain waiting for the target node's ack
        self._acks: dict[int, asyncio.Future[bool]] = {}
        self._ack_ids = itertools.count(1)

    @classmethod
    def from_url(cls, url: str, *, cluster: str = DEFAULT_CLUSTER) -> RedisHub:
        """A hub for ``url``, whose query string may also set this class's
        ``heartbeat``, ``node_ttl``, ``op_timeout`` and ``max_backoff`` (in
        seconds): ``redis://host:6379/0?heartbeat=0.5&node_ttl=2``."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ChatError(f"unsupported hub URL {redacted(url)!r}: use redis://HOST:PORT/DB")
        settings: dict[str, float] = {}
        rest = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in URL_SETTINGS:
                rest.append((key, value))
                continue
            try:
                settings[key] = float(value)
            except ValueError:
                raise ChatError(f"hub URL: {key} must be a number of seconds") from None
        clean = urlunsplit(parts._replace(query=urlencode(rest)))
        return cls(
            clean,
            cluster=cluster,
            heartbeat=settings.get("heartbeat", HEARTBEAT),
            node_ttl=settings.get("node_ttl", NODE_TTL),
            op_timeout=settings.get("op_timeout", OP_TIMEOUT),
            max_backoff=settings.get("max_backoff", MAX_BACKOFF),
        )

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        return f"<RedisHub {self.cluster}/{self.node} {redacted(self.url)} {state}>"

    @property
    def is_up(self) -> bool:
        """Connected to Redis (else serving this node's members alone)."""
        return self._up

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, server: Any = None) -> None:
        """Connect, subscribe and register; then beat. A node that cannot
        reach Redis at startup does not start (a wrong URL must not leave it
        running alone unnoticed); once started it survives outages."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._sub_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._spawn(self._write_loop(), "libchat-hub-writer")
        try:
            await self._connect()
        except (RedisError, OSError, HubUnavailable) as exc:
            await self.close()
            raise ChatError(f"cannot reach the hub at {redacted(self.url)}: {exc}") from None
        self._spawn(self._heartbeat_loop(), "libchat-hub-heartbeat")
        log.info(
            "hub: node %s in cluster %r on %s (heartbeat %gs, dead after %gs)",
            self.node,
            self.cluster,
            redacted(self.url),
            self.heartbeat,
            self.node_ttl,
        )

    async def close(self) -> None:
        """Unregister this node (its sessions have ended by now), send what
        is queued, within ``op_timeout``, and disconnect. Idempotent."""
        if self._closed or self._loop is None:
            return
        if self._up:
            k = self.keys
            self._push(_Command(("EVAL", REAP_SCRIPT, 0, k.prefix, self.node, "purge", 0)))
            self._push(_Command(("DEL", k.node(self.node))))
            with contextlib.suppress(HubUnavailable):
                await self._call("PING")  # answered once everything before it is done
        self._closed = True
        self._up = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._teardown()
        self._drop_queue()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the node is connected to Redis (raise TimeoutError
        after ``timeout`` seconds)."""
        assert self._connected is not None, "the hub has not started"
        await asyncio.wait_for(self._connected.wait(), timeout)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- connecting, and losing the connection ---------------------------------------------------

    async def _connect(self) -> None:
        """One connection: subscribe (confirmed) before anything is
        registered, so no frame for this node's rooms is missed after it."""
        assert self._connected is not None
        self._generation += 1
        generation = self._generation
        client = aioredis.Redis.from_url(self.url, **self._redis_options)
        self._client = client
        await client.ping()
        self._pubsub = client.pubsub()
        self._subscribed = {}
        await self._reconcile()
        self._reader = self._spawn(self._read(self._pubsub, generation), "libchat-hub-reader")
        pending = [f for f in self._subscribed.values() if not f.done()]
        if pending:
            done, _ = await asyncio.wait(pending, timeout=self.op_timeout)
            if len(done) < len(pending):
                raise RedisError("subscriptions were not confirmed in time")
        if generation != self._generation:  # lost again while subscribing
            raise RedisError("the connection was lost while subscribing")
        self._up = True
        self._register()
        # Connected means registered: whatever is asked of Redis from now on
        # sees this node's members (PING is answered after the registration).
        await self._call("PING")
        if self._reader.done():  # the subscription broke before the node was up
            raise RedisError("the subscription connection was lost")
        self._connected.set()

    def _lost(self, generation: int, exc: BaseException, doing: str) -> None:
        """The connection failed: go on alone and reconnect in the background."""
        if generation != self._generation or self._closed or not self._up:
            return
        self._generation += 1
        self._up = False
        assert self._connected is not None
        self._connected.clear()
        self.stats.outages += 1
        self._down_since = time.monotonic()
        self._not_sent_before = self.stats.not_sent
        dropped = self._drop_queue()
        self._release_confirmations()
        self._fail_acks()
        log.warning(
            "hub: lost Redis at %s while %s (%s); serving this node's %d connections alone, "
            "reconnecting; %d frames for other nodes dropped",
            redacted(self.url),
            doing,
            str(exc) or type(exc).__name__,
            len(self._members),
            dropped,
        )
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = self._spawn(self._reconnect(), "libchat-hub-reconnect")

    async def _reconnect(self) -> None:
        delay, reported = 0.05, time.monotonic()
        while not self._closed:
            await self._teardown()
            try:
                await self._connect()
            except (RedisError, OSError, HubUnavailable) as exc:
                if time.monotonic() - reported >= 30:
                    reported = time.monotonic()
                    log.warning(
                        "hub: Redis still unreachable after %.0f s: %s",
                        reported - self._down_since,
                        exc,
                    )
                # Jitter: nodes that lost Redis together do not all come back
                # in the same millisecond.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.max_backoff)
                continue
            log.warning(
                "hub: connected again to Redis after %.2f s; %d frames could not be sent to "
                "other nodes meanwhile, and what they sent in that time did not reach this "
                "node (pub/sub keeps nothing); members, rooms and heartbeat registered again",
                time.monotonic() - self._down_since,
                self.stats.not_sent - self._not_sent_before,
            )
            return

    async def _teardown(self) -> None:
        """Close this connection's reader, subscriptions and client."""
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        self._release_confirmations()
        self._fail_acks()
        if pubsub is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                await pubsub.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    def _drop_queue(self) -> int:
        """Empty the queue; count the frames dropped, fail the commands."""
        frames = 0
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, tuple):
                frames += 1
            elif item.future is not None and not item.future.done():
                item.future.set_exception(HubUnavailable("Redis is unreachable"))
        self.stats.not_sent += frames
        return frames

    # -- registering this node's state -------------------------------------------------------

    def _node_info(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid()})

    def _register(self) -> None:
        """Queue everything Redis must hold about this node, from scratch:
        after a reconnection (Redis may have restarted empty, or the node been
        declared dead meanwhile) as after a heartbeat that found its key gone."""
        k, node = self.keys, self.node
        ttl = int(self.node_ttl * 1000)
        self._push(_Command(("SET", k.node(node), self._node_info(), "PX", ttl)))
        self._push(_Command(("EVAL", REAP_SCRIPT, 0, k.prefix, node, "purge", 0)))
        self._push(_Command(("SADD", k.nodes, node)))
        for folded, user in self._users.items():
            future = self._new_future()
            future.add_done_callback(functools.partial(self._conflict_found, name=user.name))
            self._push(_Command(self._user_args(folded, user, "set"), future))
        for folded_room, room in self._rooms.items():
            for folded in room.users:
                self._push(_Command(self._room_args(folded_room, room.name, folded, True, True)))
        gone = self._new_future()
        gone.add_done_callback(self._maybe_back_from_dead)
        self._push(_Command(("GETDEL", k.gone(node)), gone))

    def _conflict_found(self, future: asyncio.Future[Any], *, name: str) -> None:
        if future.cancelled() or future.exception() is not None or future.result() is None:
            return
        self.stats.name_conflicts += 1
        log.warning(
            "hub: %r is also held on another node (taken on both while Redis was away); "
            "both keep it until one leaves",
            name,
        )

    def _maybe_back_from_dead(self, future: asyncio.Future[Any]) -> None:
        """Another node declared this one dead (and told everyone, this
        node's members too, that its members left): tell everyone they are
        here after all."""
        if future.cancelled() or future.exception() is not None or future.result() is None:
            return
        log.warning("hub: this node had been declared dead; announcing its members again")
        for room in list(self._rooms.values()):
            for folded in list(room.users):
                user = self._users.get(folded)
                if user is not None:
                    self.publish(room.name, presence(room.name, user.name, "joined"))

    def _user_args(self, folded: str, user: _User, mode: str) -> tuple[Any, ...]:
        k = self.keys
        return (
            "EVAL",
            USER_SCRIPT,
            2,
            k.user(folded),
            k.node_users(self.node),
            k.prefix,
            self.node,
            user.name,
            int(user.shared),
            len(user.members),
            folded,
            mode,
        )

    def _room_args(
        self, folded_room: str, room: str, folded: str, present: bool, node_stays: bool
    ) -> tuple[Any, ...]:
        k = self.keys
        user = self._users.get(folded)
        return (
            "EVAL",
            ROOM_SCRIPT,
            3,
            k.rooms,
            k.room(folded_room),
            k.node_rooms(self.node),
            self.node,
            folded,
            user.name if user is not None else folded,
            folded_room,
            room,
            int(present),
            int(node_stays),
        )

    # -- the writer: one ordered stream of commands ----------------------------------------------

    def _new_future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    def _push(self, item: _Item) -> None:
        """Queue ``item`` for the writer (never blocks)."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self._overflow(item)
            return
        queue.append(item)
        assert self._wake is not None
        self._wake.set()

    def _overflow(self, item: _Item) -> None:
        if isinstance(item, tuple):
            self.stats.not_sent += 1
        elif item.future is not None and not item.future.done():
            item.future.set_exception(HubUnavailable("the queue to Redis is full"))
        now = time.monotonic()
        if now - self._full_warned >= 10:
            self._full_warned = now
            log.warning(
                "hub: %d frames and commands wait for Redis already: dropping (%d frames for "
                "other nodes dropped so far)",
                len(self._queue),
                self.stats.not_sent,
            )

    async def _call(self, *args: Any) -> Any:
        """Run one command in order with everything queued; its answer."""
        if not self._up:
            raise HubUnavailable("Redis is unreachable")
        future = self._new_future()
        self._push(_Command(args, future))
        try:
            return await asyncio.wait_for(future, self.op_timeout)
        except TimeoutError:
            raise HubUnavailable("Redis did not answer in time") from None

    async def _write_loop(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            while self._queue and self._up:
                try:
                    await self._write_batch()
                except Exception:  # a bug: log it, and keep the node's stream going
                    log.exception("hub: sending to Redis failed")

    async def _write_batch(self) -> None:
        """Send what is queued (up to MAX_BATCH commands) in one pipeline:
        one round trip, however many frames."""
        client, generation = self._client, self._generation
        assert client is not None
        pipe = client.pipeline(transaction=False)
        owners: list[int | _Command] = []  # per command: frames merged, or the command
        queue, head = self._queue, self._room_head
        while queue and len(owners) < MAX_BATCH:
            item = queue.popleft()
            if isinstance(item, _Command):
                pipe.execute_command(*item.args)
                owners.append(item)
                continue
            # Consecutive frames for one room travel as one PUBLISH: a frame
            # is self-delimiting, so the receiving node hands the whole run to
            # each member as is, and order is kept.
            channel, frame = item
            parts, size = [head, frame], len(frame)
            while queue and size < MAX_PAYLOAD:
                following = queue[0]
                if not isinstance(following, tuple) or following[0] != channel:
                    break
                queue.popleft()
                parts.append(following[1])
                size += len(following[1])
            pipe.execute_command("PUBLISH", channel, b"".join(parts))
            owners.append(len(parts) - 1)
        try:
            results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._fail(owners, exc)
            self._lost(generation, exc, "sending")
            return
        for owner, result in zip(owners, results, strict=True):
            if isinstance(owner, int):
                if isinstance(result, Exception):
                    self.stats.not_sent += owner
                else:
                    self.stats.sent += owner
            elif owner.future is None:
                if isinstance(result, Exception):
                    log.error("hub: Redis refused %s: %s", owner.args[0], result)
            elif not owner.future.done():
                if isinstance(result, Exception):
                    owner.future.set_exception(result)
                else:
                    owner.future.set_result(result)

    def _fail(self, owners: list[int | _Command], exc: BaseException) -> None:
        for owner in owners:
            if isinstance(owner, int):
                self.stats.not_sent += owner
            elif owner.future is not None and not owner.future.done():
                owner.future.set_exception(HubUnavailable(f"Redis failed: {exc}"))

    # -- the reader: frames from other nodes -------------------------------------------------------

    async def _read(self, pubsub: Any, generation: int) -> None:
        try:
            async for message in pubsub.listen():
                kind = message["type"]
                if kind == "message":
                    try:
                        self._received(message["channel"], message["data"])
                    except Exception:  # a bug must not stop delivery of the next ones
                        log.exception("hub: delivering a frame from Redis failed")
                elif kind == "subscribe":
                    self._confirmed(message["channel"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # RedisError, OSError, or whatever a broken read raises
            self._lost(generation, exc, "receiving")
            return
        self._lost(generation, RedisError("the subscription ended"), "receiving")

    def _received(self, channel: bytes, data: bytes) -> None:
        if data[:12] == self._origin:
            return  # our own frame, delivered here when it was published
        kind = data[12:13]
        if kind == _ROOM:
            room = channel[len(self.keys.room_channel_prefix) :].decode()
            self.stats.received += 1
            self.local.publish(room, data[13:])
        elif kind == _USER:
            size = data[13]
            user = self._users.get(data[14 : 14 + size].decode())
            if user is not None:
                self.stats.received += 1
                _deliver_all(user.members, data[14 + size :], None)
        elif kind == _ADDRESS:
            self._received_for_address(data)
        elif kind == _ACK:
            future = self._acks.pop(int.from_bytes(data[13:21], "big"), None)
            if future is not None and not future.done():
                future.set_result(data[21:22] == b"1")
        elif kind == _ROUTE:
            size = data[13]
            self.stats.received += 1
            self.local.routed(data[:12].decode(), data[14 : 14 + size].decode(), data[14 + size :])

    def _received_for_address(self, data: bytes) -> None:
        """A frame for one connection here; with an ack id, tell its origin
        once the connection has drained (or that it is gone)."""
        ack, size = int.from_bytes(data[13:21], "big"), data[21]
        member = self.local.member_at(data[22 : 22 + size].decode())
        delivered = member is not None and _deliver_all([member], data[22 + size :], None) == 1
        if delivered:
            self.stats.received += 1
        if not ack:
            return
        origin = data[:12].decode()
        if member is None or not delivered:
            self._ack(origin, ack, False)
            return
        self._spawn(self._ack_when_drained(origin, ack, member), "libchat-hub-drain")

    async def _ack_when_drained(self, origin: str, ack: int, member: Member) -> None:
        self._ack(origin, ack, await drain_member(member))

    def _ack(self, origin: str, ack: int, ok: bool) -> None:
        if not self._up:
            return  # lost with the connection; the origin's own bound ends its wait
        payload = b"".join((self._origin, _ACK, ack.to_bytes(8, "big"), b"1" if ok else b"0"))
        self._push(_Command(("PUBLISH", self.keys.inbox(origin), payload)))

    # -- subscriptions ------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Subscribe to this node's inbox and to the channel of every room it
        has members in, and to nothing else. Raises RedisError."""
        assert self._sub_lock is not None
        async with self._sub_lock:
            pubsub = self._pubsub
            if pubsub is None:
                return
            wanted = {self._inbox, *(self.keys.room_channel(f) for f in self._rooms)}
            add = [c for c in wanted if c not in self._subscribed]
            drop = [c for c in self._subscribed if c not in wanted]
            for channel in add:
                future = self._new_future()
                self._subscribed[channel] = future
                self._confirming.setdefault(channel, deque()).append(future)
            for channel in drop:
                del self._subscribed[channel]
            if add:
                await pubsub.subscribe(*add)
            if drop:
                await pubsub.unsubscribe(*drop)

    def _confirmed(self, channel: bytes) -> None:
        waiting = self._confirming.get(channel)
        if waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(None)
            if not waiting:
                del self._confirming[channel]

    def _fail_acks(self) -> None:
        """The connection is gone: an ack on its way is lost for good, so
        every deliver_to waiting for one learns it failed, now."""
        acks, self._acks = self._acks, {}
        for future in acks.values():
            if not future.done():
                future.set_result(False)

    def _release_confirmations(self) -> None:
        """Nobody waits for a confirmation that will never come."""
        for waiting in self._confirming.values():
            for future in waiting:
                if not future.done():
                    future.set_result(None)
        self._confirming.clear()

    async def _follow_room(self, folded_room: str) -> None:
        """Subscribe to a room's channel and wait (bounded) until Redis
        confirms it, so the member misses nothing sent after its join."""
        generation = self._generation
        try:
            await self._reconcile()
        except (RedisError, OSError) as exc:
            self._lost(generation, exc, "subscribing")
            return
        future = self._subscribed.get(self.keys.room_channel(folded_room))
        if future is not None and not future.done():
            try:
                await asyncio.wait_for(asyncio.shield(future), self.op_timeout)
            except TimeoutError:
                log.warning("hub: Redis did not confirm a subscription in %gs", self.op_timeout)

    async def _unfollow(self) -> None:
        generation = self._generation
        try:
            await self._reconcile()
        except (RedisError, OSError) as exc:
            self._lost(generation, exc, "unsubscribing")

    # -- the Hub interface --------------------------------------------------------------------

    async def attach(self, member: Member, *, shared: bool = False) -> None:
        await self.local.attach(member, shared=shared)
        folded = fold(member.name)
        user = self._users.get(folded)
        if user is None:
            user = self._users[folded] = _User(member.name, shared)
        user.members.append(member)
        self._members[member] = folded
        try:
            holder = await self._claim(folded, user)
        except BaseException:
            await self._release(member)
            raise
        if holder is not None:
            await self._release(member)
            raise NameInUse(f"the name {holder!r} is in use")

    async def _claim(self, folded: str, user: _User) -> str | None:
        """The name's holder on another node, or None once it is ours."""
        try:
            holder = await self._call(*self._user_args(folded, user, "claim"))
        except HubUnavailable:
            # Redis is away: the name was checked on this node only. The
            # registration after reconnecting reports a clash, if any.
            self.stats.unchecked_names += 1
            return None
        return None if holder is None else _text(holder)

    async def _release(self, member: Member) -> None:
        """Undo an attach that failed."""
        await self.local.detach(member)
        self._forget(member)

    def _forget(self, member: Member) -> None:
        folded = self._members.pop(member, None)
        user = self._users.get(folded) if folded is not None else None
        if folded is None or user is None:
            return
        with contextlib.suppress(ValueError):
            user.members.remove(member)
        if not user.members:
            del self._users[folded]
        if self._up:
            self._push(_Command(self._user_args(folded, user, "set")))

    async def detach(self, member: Member) -> list[str]:
        rooms = [self._shown(room) for room in await self.local.detach(member)]
        folded = self._members.get(member)
        if folded is not None:
            for room in rooms:
                self._left(room, folded)
            self._forget(member)
        return rooms

    def _shown(self, room: str) -> str:
        """``room`` as the cluster spells it, if this node knows."""
        entry = self._rooms.get(fold(room))
        return room if entry is None else entry.name

    async def join(self, room: str, member: Member) -> str | None:
        shown = await self.local.join(room, member)
        folded = self._members.get(member)
        if shown is None or folded is None:
            return shown
        folded_room = fold(shown)
        entry = self._rooms.get(folded_room)
        new_room = entry is None
        if entry is None:
            entry = self._rooms[folded_room] = _Room(shown)
        count = entry.users.get(folded, 0) + 1
        entry.users[folded] = count
        if new_room and self._up:
            await self._follow_room(folded_room)
        if count == 1 and self._up:
            args = self._room_args(folded_room, entry.name, folded, True, True)
            if not new_room:
                self._push(_Command(args))
            else:
                # The room's name as the cluster first spelt it: presence
                # frames then name it alike on every node.
                with contextlib.suppress(HubUnavailable):
                    entry.name = _text(await self._call(*args) or entry.name)
        return entry.name

    async def part(self, room: str, member: Member) -> str | None:
        shown = await self.local.part(room, member)
        if shown is None:
            return None
        shown = self._shown(shown)
        folded = self._members.get(member)
        if folded is not None:
            self._left(shown, folded)
        return shown

    def _left(self, room: str, folded: str) -> None:
        """One connection of user ``folded`` left ``room``."""
        folded_room = fold(room)
        entry = self._rooms.get(folded_room)
        if entry is None or folded not in entry.users:
            return
        count = entry.users[folded] - 1
        if count > 0:
            entry.users[folded] = count
            return
        del entry.users[folded]
        if not entry.users:
            del self._rooms[folded_room]
        if self._up:
            args = self._room_args(folded_room, entry.name, folded, False, bool(entry.users))
            self._push(_Command(args))
            if not entry.users:
                self._spawn(self._unfollow(), "libchat-hub-unsubscribe")

    def publish(self, room: str, data: bytes, exclude: Member | None = None) -> int:
        # The hot path: local delivery at once, then one append for Redis.
        count = self.local.publish(room, data, exclude)
        if self._up:
            channel = self._channels.get(room)
            if channel is None:
                if len(self._channels) >= 4096:
                    self._channels.clear()
                channel = self._channels[room] = self.keys.room_channel(fold(room))
            self._push((channel, data))
        else:
            self.stats.not_sent += 1
        return count

    async def send_to_user(self, name: str, data: bytes, exclude: Member | None = None) -> int:
        folded = fold(name)
        user = self._users.get(folded)
        count = _deliver_all(user.members, data, exclude) if user is not None else 0
        name_bytes = folded.encode()
        if not self._up or len(name_bytes) > 255:
            return count
        payload = b"".join((self._origin, _USER, bytes((len(name_bytes),)), name_bytes, data))
        k = self.keys
        try:
            remote = await self._call(
                "EVAL", ROUTE_SCRIPT, 1, k.user(folded), k.prefix, self.node, payload
            )
        except HubUnavailable:
            return count
        if remote:
            self.stats.sent += 1
        return count + int(remote)

    async def members(self, room: str) -> list[str] | None:
        try:
            values = await self._call("HVALS", self.keys.room(fold(room)))
        except HubUnavailable:
            return await self.local.members(room)
        names = {fold(n): n for n in map(_text, values)}
        if not names:
            return await self.local.members(room)
        return sorted(names.values(), key=fold)

    async def rooms(self) -> list[tuple[str, int]]:
        try:
            flat = await self._call("EVAL", ROOMS_SCRIPT, 0, self.keys.prefix)
        except HubUnavailable:
            return await self.local.rooms()
        found = {
            fold(_text(n)): (_text(n), int(c)) for n, c in zip(flat[::2], flat[1::2], strict=True)
        }
        # This node's own rooms, even if Redis has not heard of them yet.
        for name, count in await self.local.rooms():
            found.setdefault(fold(name), (name, count))
        return sorted(found.values(), key=lambda r: fold(r[0]))

    async def online(self, name: str) -> str | None:
        folded = fold(name)
        user = self._users.get(folded)
        if user is not None:
            return user.name
        try:
            shown = await self._call("HGET", self.keys.user(folded), "~name")
        except HubUnavailable:
            return None
        return None if shown is None else _text(shown)

    async def set_user_data(self, name: str, key: str, value: str) -> bool:
        """Keep ``value`` under ``key`` for online user ``name``, for every
        node to read, until the user's last connection leaves (the dm
        plugin's "who wrote to you last", for /reply). False if offline."""
        folded = fold(name)
        user = self._users.get(folded)
        if user is not None:
            user.data[key] = value
        try:
            stored = await self._call(
                "EVAL", USER_DATA_SCRIPT, 1, self.keys.user(folded), "~d:" + key, value
            )
        except HubUnavailable:
            return user is not None
        return bool(stored) or user is not None

    async def user_data(self, name: str, key: str) -> str | None:
        """What :meth:`set_user_data` kept for ``name`` (None: nothing, or offline)."""
        folded = fold(name)
        user = self._users.get(folded)
        try:
            value = await self._call("HGET", self.keys.user(folded), "~d:" + key)
        except HubUnavailable:
            return None if user is None else user.data.get(key)
        if value is None and user is not None:
            return user.data.get(key)
        return None if value is None else _text(value)

    def local_members(self) -> Iterable[Member]:
        return self.local.local_members()

    # -- routing to one connection, and between nodes -------------------------------------------

    def address(self, member: Member) -> str:
        return self.local.address(member)

    async def deliver_to(self, address: str, data: bytes, *, drain: bool = False) -> bool:
        """Deliver to one connection; on another node, through its inbox.
        With ``drain``, that node acks once the connection has drained: the
        call returns then (True), or False once the node is known gone or
        unreachable. Pub/sub is at most once: an ack lost with a node that
        died stays unanswered, so the caller bounds the wait."""
        node = node_of(address)
        if node == self.node:
            return await self.local.deliver_to(address, data, drain=drain)
        raw = address.encode()
        if not self._up or len(raw) > 255:
            return False
        ack = next(self._ack_ids) if drain else 0
        head = b"".join((self._origin, _ADDRESS, ack.to_bytes(8, "big"), bytes((len(raw),)), raw))
        future: asyncio.Future[bool] | None = None
        if drain:
            future = self._acks[ack] = self._new_future()
        try:
            if not await self._publish_to(node, head + data):
                return False
            return True if future is None else await future
        finally:
            if future is not None:
                self._acks.pop(ack, None)

    async def _publish_to(self, node: str, payload: bytes) -> bool:
        """PUBLISH on ``node``'s inbox; False if nobody listens there."""
        try:
            receivers = await self._call("PUBLISH", self.keys.inbox(node), payload)
        except HubUnavailable:
            self.stats.not_sent += 1
            return False
        self.stats.sent += 1
        return bool(receivers)

    def route(self, topic: str, handler: RouteHandler) -> None:
        self.local.route(topic, handler)

    async def send_route(self, node: str, topic: str, data: bytes) -> bool:
        node = node_of(node)
        if node == self.node:
            return await self.local.send_route(node, topic, data)
        raw = topic.encode()
        if not self._up or len(raw) > 255:
            return False
        return await self._publish_to(
            node, b"".join((self._origin, _ROUTE, bytes((len(raw),)), raw, data))
        )

    # -- liveness -------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if not self._up:
                continue
            try:
                await self._beat()
            except HubUnavailable:
                continue
            except Exception:  # a bug must not stop the heartbeat
                log.exception("hub: heartbeat failed")

    async def _beat(self) -> None:
        """Refresh this node's heartbeat key, then look for dead nodes."""
        ttl = int(self.node_ttl * 1000)
        key = self.keys.node(self.node)
        if await self._call("SET", key, self._node_info(), "PX", ttl, "XX") is None:
            log.warning(
                "hub: this node's heartbeat key had expired (no beat for %gs: a stalled "
                "loop?); registering again",
                self.node_ttl,
            )
            self._register()
        await self._reap()

    async def _reap(self) -> None:
        """Announce the members of dead nodes as left, once for the cluster."""
        k = self.keys
        dead = await self._call("EVAL", DEAD_SCRIPT, 0, k.prefix, self.node)
        for node in map(_text, dead):
            flat = await self._call("EVAL", REAP_SCRIPT, 0, k.prefix, node, "reap", TOMBSTONE)
            if not flat:
                continue  # another node got there first, or it came back
            pairs = list(zip(map(_text, flat[::2]), map(_text, flat[1::2]), strict=True))
            self.stats.reaped += 1
            log.warning(
                "hub: node %s stopped beating for %gs: announcing its %d room memberships as left",
                node,
                self.node_ttl,
                len(pairs),
            )
            for room, user in pairs:
                self.publish(room, presence(room, user, "left", "server lost"))


def _deliver_all(members: list[Member], data: bytes, exclude: Member | None) -> int:
    count = 0
    for member in list(members):
        if member is exclude:
            continue
        try:
            member.deliver(data)
        except Exception:  # one broken member never costs the others a frame
            log.exception("delivery to %r failed", member)
            continue
        count += 1
    return count


def hub_from_url(url: str, *, cluster: str = DEFAULT_CLUSTER) -> RedisHub:
    """The hub ``chat serve --hub URL --cluster NAME`` runs."""
    return RedisHub.from_url(url, cluster=cluster)
