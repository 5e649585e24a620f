"""Load-generator adapters for the peers libchat is measured against.

``chat bench`` speaks libchat (libchat_cli.bench.LibchatAdapter); these two
teach the same generator IRC (for ngircd) and the baseline's line protocol.
Both only need what the bench needs: log in and join one room, send a line of
text to it, keep the connection alive, and say why the server refused.
"""

from __future__ import annotations

import re

from libchat_cli.bench import BenchConfig, Refused, Welcome

_IRC_ERROR = re.compile(rb"(?:^|\n)ERROR :([^\r\n]*)")
#: numeric replies that end a registration or join in failure
_IRC_FAILURES = {
    b"432": "erroneous nickname",
    b"433": "nickname in use",
    b"405": "too many channels",
    b"471": "channel is full",
    b"451": "not registered",
    b"465": "banned",
}
_IRC_NUMERIC = re.compile(rb"^:\S+ (\d{3}) ", re.MULTILINE)


class IrcAdapter:
    """RFC 2812 client registration, JOIN, and PRIVMSG to the channel."""

    name = "irc"

    def hello(self, user: str, room: str) -> bytes:
        return f"NICK {user}\r\nUSER {user} 0 * :bench\r\nJOIN #{room}\r\n".encode()

    def handshake(self, data: bytes) -> Welcome | None:
        error = _IRC_ERROR.search(data)
        if error:
            raise Refused(error.group(1).decode(errors="replace"))
        server = ""
        for numeric in _IRC_NUMERIC.finditer(data):
            code = numeric.group(1)
            if code in _IRC_FAILURES:
                raise Refused(f"{code.decode()} {_IRC_FAILURES[code]}")
            if code == b"004":  # RPL_MYINFO: "<server> <version> ..."
                line = data[numeric.end() :].split(b"\r\n", 1)[0].split()
                server = line[2].decode(errors="replace") if len(line) > 2 else ""
            if code == b"366":  # RPL_ENDOFNAMES: the JOIN is complete
                end = data.find(b"\n", numeric.end())
                if end < 0:
                    return None
                return Welcome(end + 1, server)
        return None

    def message(self, room: str, text: str) -> bytes:
        return f"PRIVMSG #{room} :{text}\r\n".encode()

    def heartbeat(self) -> bytes | None:
        return b"PING :bench\r\n"

    def farewell(self, data: bytes) -> str | None:
        error = _IRC_ERROR.search(data)
        return error.group(1).decode(errors="replace") if error else None

    def advice(self, welcome: Welcome, config: BenchConfig) -> list[str]:
        return []

    def refusal_hint(self, reason: str) -> str:
        if "too many connections" in reason.lower():
            return "set MaxConnectionsIP = 0 under [Limits] in ngircd.conf for load tests"
        if "limit reached" in reason.lower():
            return "raise MaxConnections under [Limits] in ngircd.conf"
        return ""


class LineAdapter:
    """The baseline server's protocol: a name line, then lines of text."""

    name = "baseline"

    def hello(self, user: str, room: str) -> bytes:
        return f"{user}\n".encode()

    def handshake(self, data: bytes) -> Welcome | None:
        start = data.find(b"welcome ")
        if start < 0:
            return None
        end = data.find(b"\n", start)
        return None if end < 0 else Welcome(end + 1, "thread-per-client baseline")

    def message(self, room: str, text: str) -> bytes:
        return f"{text}\n".encode()

    def heartbeat(self) -> bytes | None:
        return None  # it pings nobody, and anything sent would be broadcast

    def farewell(self, data: bytes) -> str | None:
        return None

    def advice(self, welcome: Welcome, config: BenchConfig) -> list[str]:
        return []

    def refusal_hint(self, reason: str) -> str:
        return ""
