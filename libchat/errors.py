"""One exception tree for libchat. Every error has a stable ``code`` that also
travels on the wire in ``error`` frames, so a client can tell errors apart
without parsing human text::

    ChatError
    ├── ProtocolError            the bytes or frames broke the protocol
    │   └── FrameTooLarge        a declared frame length is over the limit
    ├── HandshakeError           version mismatch, refused hello
    │   └── AuthenticationFailed
    ├── InvalidName              nick or room name breaks the name rules
    ├── NameInUse
    ├── RateLimited
    ├── UnknownCommand
    ├── NotFound                 unknown room or user
    ├── Rejected                 a plugin refused the request
    ├── BadRequest               a request with missing or malformed fields
    ├── TooManyConnections       a connection limit refused the connection
    ├── Timeout                  the handshake or a reply took too long
    ├── InternalError            a plugin failed while handling the request
    ├── RemoteError              the peer sent an error frame (code kept)
    └── ConnectionClosed         the connection is gone (reason kept)

``ProtocolError`` raised by our own decoder is a *local* view of the peer's
mistake; an ``error`` frame received from the peer becomes ``RemoteError``
carrying the peer's code, so the two are never confused.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ChatError(Exception):
    """Root of every libchat error."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def to_header(self, request_id: str | int | None = None) -> dict[str, Any]:
        """The ``error`` frame header that reports this error to the peer."""
        header: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if request_id is not None:
            header["id"] = request_id
        header.update(self.details)
        return header


class ProtocolError(ChatError):
    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class HandshakeError(ChatError):
    code = "handshake_failed"


class AuthenticationFailed(HandshakeError):
    code = "auth_failed"


class InvalidName(ChatError):
    code = "invalid_name"


class NameInUse(ChatError):
    code = "name_in_use"


class RateLimited(ChatError):
    code = "rate_limited"


class UnknownCommand(ChatError):
    code = "unknown_command"


class NotFound(ChatError):
    code = "not_found"


class Rejected(ChatError):
    code = "rejected"


class BadRequest(ChatError):
    code = "bad_request"


class ConnectionClosed(ChatError):
    code = "connection_closed"


class TooManyConnections(ChatError):
    code = "too_many_connections"


class Timeout(ChatError):
    code = "timeout"


class InternalError(ChatError):
    code = "internal_error"


class RemoteError(ChatError):
    """An ``error`` frame from the peer; ``code`` is the peer's code."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.remote_code = code

    def __str__(self) -> str:
        return self.message


_BY_CODE: dict[str, type[ChatError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        FrameTooLarge,
        HandshakeError,
        AuthenticationFailed,
        InvalidName,
        NameInUse,
        RateLimited,
        UnknownCommand,
        NotFound,
        Rejected,
        BadRequest,
        ConnectionClosed,
        TooManyConnections,
        Timeout,
        InternalError,
    )
}


def error_codes() -> dict[str, type[ChatError]]:
    """Every stable error code and the class that carries it."""
    return dict(_BY_CODE)
