"""The auth plugin's errors (they travel in ``error`` frames by code)."""

from __future__ import annotations

from libchat.errors import HandshakeError

# The code of AuthRequired, which clients test for: defined once, where the
# client that reacts to it (by asking for the password) lives.
from libchat_cli.options import AUTH_REQUIRED

__all__ = ["AUTH_REQUIRED", "AuthRequired"]


class AuthRequired(HandshakeError):
    """The hello carried no password, and this server needs one. A client
    may ask its user for the password and connect again."""

    code = AUTH_REQUIRED
