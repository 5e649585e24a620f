"""``chat user add|passwd|remove|list``: manage accounts in the user database.

A password is never a command-line argument (other users can read those in
``ps``): it comes from $CHAT_PASSWORD, else from a hidden prompt asked twice.
Only ``user add`` creates a missing database; the others say it is missing
(a mistyped ``--db`` must not quietly become a new, empty store).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from libchat.errors import ChatError
from libchat.protocol import check_nick
from libchat_cli.options import PASSWORD_ENV

from .passwords import MAX_ROUNDS, MIN_ROUNDS, ROUNDS_ENV, hash_password, rounds_from
from .store import UserStore

F = TypeVar("F", bound=Callable[..., Any])


def db_option(func: F) -> F:
    return click.option(
        "--db",
        type=click.Path(dir_okay=False),
        envvar="CHAT_DB",
        required=True,
        help="The SQLite user database (or set CHAT_DB); `user add` creates it.",
    )(func)


def rounds_option(func: F) -> F:
    return click.option(
        "--rounds",
        type=click.IntRange(MIN_ROUNDS, MAX_ROUNDS),
        envvar=ROUNDS_ENV,
        default=None,
        help=f"bcrypt cost (or set {ROUNDS_ENV}). [default: 12]",
    )(func)


@contextmanager
def open_store(path: str, *, create: bool = False) -> Iterator[UserStore]:
    """The store, with library errors turned into one-line CLI errors. A
    missing file is an error unless ``create``."""
    try:
        store = UserStore(path, create=create)
    except ChatError as exc:
        raise click.ClickException(exc.message) from None
    try:
        yield store
    except ChatError as exc:
        raise click.ClickException(exc.message) from None
    finally:
        store.close()


def new_password(name: str) -> str:
    """$CHAT_PASSWORD, else asked twice at a hidden prompt."""
    password = os.environ.get(PASSWORD_ENV)
    if password:
        return password
    if not sys.stdin.isatty():
        raise click.ClickException(
            f"no password: set {PASSWORD_ENV}, or run this in a terminal to be asked for it"
        )
    return str(
        click.prompt(
            f"New password for {name}",
            hide_input=True,
            confirmation_prompt="Repeat the password",
        )
    )


def checked_name(name: str) -> str:
    try:
        return check_nick(name)
    except ChatError as exc:
        raise click.BadParameter(exc.message, param_hint="NAME") from None


def hashed(password: str, rounds: int | None) -> bytes:
    try:
        return hash_password(password, rounds_from(rounds))
    except ChatError as exc:
        raise click.ClickException(exc.message) from None


@click.group()
def user() -> None:
    """Manage accounts (for `chat serve --plugins auth`)."""


@user.command()
@click.argument("name")
@db_option
@rounds_option
def add(name: str, db: str, rounds: int | None) -> None:
    """Create the account NAME. The password comes from $CHAT_PASSWORD,
    else from a prompt."""
    name = checked_name(name)
    with open_store(db, create=True) as store:
        if store.get(name) is not None:
            raise click.ClickException(f"user {name!r} already exists")
        store.add(name, hashed(new_password(name), rounds))
    click.echo(f"added user {name}")


@user.command()
@click.argument("name")
@db_option
@rounds_option
def passwd(name: str, db: str, rounds: int | None) -> None:
    """Change the password of NAME ($CHAT_PASSWORD, else a prompt)."""
    with open_store(db) as store:
        account = store.get(name)
        if account is None:
            raise click.ClickException(f"no user {name!r}")
        if not store.set_hash(name, hashed(new_password(account.name), rounds)):
            raise click.ClickException(f"no user {name!r}")
    click.echo(f"changed the password of {account.name}")


@user.command()
@click.argument("name")
@db_option
def remove(name: str, db: str) -> None:
    """Delete the account NAME (sessions already logged in stay)."""
    with open_store(db) as store:
        account = store.get(name)
        if account is None or not store.remove(name):
            raise click.ClickException(f"no user {name!r}")
    click.echo(f"removed user {account.name}")


@user.command("list")
@db_option
def list_users(db: str) -> None:
    """List the accounts, one name per line."""
    with open_store(db) as store:
        for name in store.names():
            click.echo(name)
