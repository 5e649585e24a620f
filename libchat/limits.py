"""Every limit the server enforces, named once, with its default.

The server announces all of them in its ``welcome`` frame, so a client knows
the rules before it breaks one. ``0`` (or ``None`` where noted) turns a limit
off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    #: Largest frame (header + body) accepted, checked on the declared length.
    max_frame_size: int = 1 << 20
    #: Largest chat message text, in UTF-8 bytes.
    max_message_bytes: int = 8192
    #: Seconds a new connection has to complete its hello (slowloris guard).
    handshake_timeout: float = 10.0
    #: Seconds of silence from a peer before the server pings it; 0: no pings.
    ping_interval: float = 30.0
    #: Seconds to wait for any data after a ping before dropping the peer;
    #: 0: ping, but never drop.
    ping_timeout: float = 20.0
    #: Bytes that may wait to be sent to one session; once more wait, the next
    #: frame for it drops it ("send queue exceeded").
    max_send_queue: int = 1 << 20
    #: Messages per second per connection (token bucket); 0 disables.
    rate: float = 50.0
    #: Burst the token bucket allows above the steady rate.
    rate_burst: int = 100
    #: Open connections in all; 0 disables.
    max_connections: int = 10_000
    #: Open connections from one IP address; 0 disables.
    max_connections_per_address: int = 32
    #: Rooms one session may be in at once.
    max_rooms_per_session: int = 50
    #: Rooms on the server at once (each costs memory); past it, joining a
    #: room that does not exist is refused. 0 disables.
    max_rooms: int = 10_000

    def as_dict(self) -> dict[str, Any]:
        """The limits as sent in the handshake."""
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
