"""The auth plugin's errors (they travel in ``error`` frames by code)."""

from __future__ import annotations

from libchat.errors import HandshakeError

#: The code of :class:`AuthRequired`, which clients test for.
AUTH_REQUIRED = "auth_required"


class AuthRequired(HandshakeError):
    """The hello carried no password, and this server needs one. A client
    may ask its user for the password and connect again."""

    code = AUTH_REQUIRED
