"""Connection security for the commands that talk to a server (``chat join``,
``chat send-file``): the TLS options, and logging in with a password.

A command uses them like this::

    @cli.command()
    @address_options
    @user_option
    @security_options
    def send_file(host, port, user, security, ...):
        sys.exit(run_logged_in(host, user, security, lambda connect: _send(..., connect)))

    async def _send(..., connect: dict[str, Any]) -> int:
        client = await login(host, port, user=user, **connect)

(:func:`logged_in` does the same for a command that runs its own
``asyncio.run`` and returns something else than an exit status.)

The password comes from $CHAT_PASSWORD. Without it the client first connects
without one; if the server answers ``auth_required``, the password is asked
for at a hidden prompt (outside the event loop) and the client connects again.
A password never goes unencrypted to an address beyond this machine unless
``--insecure`` says so: that check runs before any connection is made.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import click

import libchat
from libchat.errors import ChatError, ConnectionClosed, RemoteError
from libchat.tls import TLSError, client_context, is_loopback

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Where every ``chat`` command (and the auth plugin's ``chat user``) finds
#: a password: never a command-line argument, which ``ps`` shows to anyone.
PASSWORD_ENV = "CHAT_PASSWORD"
#: The error code an auth server answers a hello without a password with
#: (the auth plugin's AuthRequired uses this very constant).
AUTH_REQUIRED = "auth_required"


class PasswordNeeded(Exception):
    """The server wants a password and we have none yet. Deliberately not a
    ChatError, so it passes through ``run_async`` to :func:`run_logged_in`."""


@dataclass(frozen=True, slots=True)
class Security:
    """What --tls, --ca-file and --insecure asked for."""

    tls: bool = False
    ca_file: str | None = None
    insecure: bool = False

    @property
    def uses_tls(self) -> bool:
        # Naming a CA file only makes sense with TLS, so it turns TLS on.
        return self.tls or self.ca_file is not None


def security_options(func: F) -> F:
    """Add --tls, --ca-file and --insecure; the command receives them as one
    ``security: Security`` argument."""

    @functools.wraps(func)
    def command(*args: Any, tls: bool, ca_file: str | None, insecure: bool, **kwargs: Any) -> Any:
        return func(*args, security=Security(tls, ca_file, insecure), **kwargs)

    options = [
        click.option(
            "--insecure",
            is_flag=True,
            help="Do not verify the server's certificate, and allow sending a password "
            "unencrypted to a remote address. Only for testing.",
        ),
        click.option(
            "--ca-file",
            type=click.Path(exists=True, dir_okay=False),
            envvar="CHAT_CA_FILE",
            default=None,
            help="Also trust the CA certificates in this PEM file (implies --tls; "
            "or set CHAT_CA_FILE).",
        ),
        click.option(
            "--tls",
            is_flag=True,
            envvar="CHAT_TLS",
            help="Connect with TLS, verifying the server's certificate and name "
            "(or set CHAT_TLS=1).",
        ),
    ]
    for option in options:
        command = option(command)
    return cast(F, command)


# -- the pieces ---------------------------------------------------------------------


def password_from_env() -> str | None:
    """$CHAT_PASSWORD, or None when unset or empty."""
    return os.environ.get(PASSWORD_ENV) or None


def check_password_transport(host: str, security: Security) -> None:
    """Refuse (before any connection) to send a password unencrypted to a
    host beyond loopback, unless --insecure; warn when it is allowed."""
    if security.uses_tls or is_loopback(host):
        return
    if not security.insecure:
        raise click.ClickException(
            f"refusing to send a password unencrypted to {host}: use --tls "
            "(or --insecure to send it anyway)"
        )
    click.echo(f"warning: --insecure: your password goes to {host} unencrypted", err=True)


def warn_if_unverified(security: Security) -> None:
    if security.uses_tls and security.insecure:
        click.echo(
            "warning: --insecure: the server's certificate is not verified; anyone on the "
            "network path could pose as the server",
            err=True,
        )


def connect_kwargs(host: str, security: Security, password: str | None) -> dict[str, Any]:
    """The ``ssl``, ``server_hostname`` and ``hello`` arguments of
    :func:`libchat.open_client` for these options. Raises TLSError when a CA
    file cannot be loaded."""
    kwargs: dict[str, Any] = {}
    if security.uses_tls:
        kwargs["ssl"] = client_context(cafile=security.ca_file, verify=not security.insecure)
        kwargs["server_hostname"] = host
    if password is not None:
        kwargs["hello"] = {"password": password}
    return kwargs


def ask_password(user: str) -> str:
    """The password from a hidden prompt; a clear error without a terminal."""
    if not sys.stdin.isatty():
        raise click.ClickException(
            f"the server requires a password: set {PASSWORD_ENV} "
            "(stdin is not a terminal, so it cannot be asked for)"
        )
    return str(click.prompt(f"Password for {user}", hide_input=True))


# -- connecting ---------------------------------------------------------------------


async def login(host: str, port: int, *, user: str, **kwargs: Any) -> libchat.Client:
    """:func:`libchat.open_client` with the CLI's error messages. Raises
    PasswordNeeded when the server asks for a password none was given for."""
    try:
        return await libchat.open_client(host, port, user=user, **kwargs)
    except RemoteError as exc:
        if exc.remote_code == AUTH_REQUIRED and "password" not in (kwargs.get("hello") or {}):
            raise PasswordNeeded from None
        raise
    except TLSError as exc:
        raise TLSError(exc.message + _tls_hint(exc), **exc.details) from None
    except ConnectionClosed as exc:
        if kwargs.get("ssl") is None and exc.details.get("stage") == "hello":
            hint = f"{exc.message}; if the server uses TLS, add --tls"
            raise ConnectionClosed(hint, **exc.details) from None
        raise


def _tls_hint(exc: TLSError) -> str:
    reason = exc.details.get("reason")
    if reason == "untrusted":
        return "; pass --ca-file PEM to trust its CA (or --insecure to skip the check)"
    if reason == "not_tls":
        return "; leave out --tls"
    return ""


def logged_in(
    host: str, user: str, security: Security, attempt: Callable[[dict[str, Any]], T]
) -> T:
    """Return ``attempt(connect)``, logging in as the CLI does.

    ``attempt`` runs an event loop (``asyncio.run``) in which it opens its
    client with ``login(host, port, user=user, **connect)``. The password is
    $CHAT_PASSWORD; without it, the first attempt goes without one, and if
    the server asks for one (PasswordNeeded) it is asked for at a hidden
    prompt, outside any event loop, and ``attempt`` runs again. A password
    never goes unencrypted beyond loopback without --insecure: that is
    checked before any connection (or prompt)."""
    warn_if_unverified(security)
    password = password_from_env()
    if password is not None:
        check_password_transport(host, security)
    try:
        return attempt(_kwargs(host, security, password))
    except PasswordNeeded:
        pass
    check_password_transport(host, security)
    password = ask_password(user)
    return attempt(_kwargs(host, security, password))


def run_logged_in(
    host: str,
    user: str,
    security: Security,
    main: Callable[[dict[str, Any]], Coroutine[Any, Any, int | None]],
) -> int:
    """:func:`logged_in` for a coroutine run with the CLI's error handling:
    returns the exit status (library errors become one-line messages)."""
    from . import run_async  # the package's error-to-exit-status runner

    return logged_in(host, user, security, lambda connect: run_async(main(connect)))


def _kwargs(host: str, security: Security, password: str | None) -> dict[str, Any]:
    try:
        return connect_kwargs(host, security, password)
    except ChatError as exc:
        raise click.ClickException(exc.message) from None
