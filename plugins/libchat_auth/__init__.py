"""Accounts: bcrypt passwords in an SQLite user store.

Run ``chat serve --plugins auth --db users.db``: every connection then logs
in with its hello (``{"type": "hello", "user": "alice", "password": ...}``)
before it can do anything else, and a name belongs to its account. Accounts
are made with ``chat user add NAME --db users.db`` (commands this plugin adds
to ``chat``), or at first login with ``--allow-register``.

Settings, in ``server.config`` (the CLI fills them from its options):

========================================  ==============================================
``db``                                    the SQLite file (required)
``allow_register``                        unknown names create their account (False)
``bcrypt_rounds``                         bcrypt cost; else $CHAT_BCRYPT_ROUNDS, else 12
``auth_max_failures``                     failures per account before lockout (5)
``auth_max_failures_per_address``         failures per address before lockout (20)
``auth_lockout`` / ``auth_max_lockout``   first / longest lockout in seconds (1 / 300)
``register_limit`` / ``register_window``  new accounts per address per window (3 / 600 s)
========================================  ==============================================

docs/security.md describes what this protects against, and what it does not.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from libchat import hookimpl
from libchat.errors import ChatError, InternalError
from libchat.tls import is_loopback

from .errors import AUTH_REQUIRED, AuthRequired
from .service import AuthConfig, Authenticator

if TYPE_CHECKING:
    import click

    from libchat.server import Server

__all__ = ["AUTH_REQUIRED", "AuthConfig", "AuthRequired", "Authenticator", "authenticator"]

PLUGIN_NAME = "auth"
log = logging.getLogger("libchat.auth")

# One Authenticator per running server. Weak keys: a server that is gone
# takes its authenticator (and its throttles) with it.
_running: weakref.WeakKeyDictionary[Server, Authenticator] = weakref.WeakKeyDictionary()


def authenticator(server: Server) -> Authenticator:
    """The running server's authenticator (tests reach the throttles here)."""
    found = _running.get(server)
    if found is None:
        raise InternalError("the auth plugin is not running on this server")
    return found


def warn_if_plaintext(server: Server) -> bool:
    """Log a warning when passwords would cross a network unencrypted;
    return whether it did."""
    if server.ssl is not None or is_loopback(server.host or "0.0.0.0"):
        return False
    log.warning(
        "auth runs without TLS on %s: passwords cross the network unencrypted; "
        "serve with --tls-cert and --tls-key",
        server.host or "every address",
    )
    return True


@hookimpl
async def libchat_startup(server: Server) -> None:
    auth = Authenticator(AuthConfig.from_config(server.config))
    await auth.open()
    _running[server] = auth
    warn_if_plaintext(server)
    if auth.config.allow_register:
        log.info("open registration: an unknown name creates its account at first login")


@hookimpl
async def libchat_shutdown(server: Server) -> None:
    auth = _running.pop(server, None)
    if auth is not None:
        await auth.close()


@hookimpl
def libchat_limits(server: Server) -> dict[str, Any] | None:
    auth = _running.get(server)
    return None if auth is None else auth.limits()


@hookimpl
async def libchat_authenticate(server: Server, hello: dict[str, Any], peer: str) -> str:
    auth = authenticator(server)
    try:
        return await auth.authenticate(hello, peer)
    except ChatError:
        raise
    except Exception:
        # A broken store must not look like a wrong password, nor kill the session task.
        log.exception("login for %r from %s failed inside the auth plugin", hello.get("user"), peer)
        raise InternalError("authentication is unavailable; try again later") from None


@hookimpl
async def libchat_account_exists(server: Server, name: str) -> bool | None:
    """Accounts are what the user store holds (the dm plugin keeps private
    messages for offline accounts)."""
    auth = _running.get(server)
    if auth is None:
        return None
    return await auth.store.get(name) is not None


@hookimpl
def libchat_register_commands(cli: click.Group) -> None:
    from .commands import user

    cli.add_command(user)
