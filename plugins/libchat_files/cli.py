"""``chat send-file``: send one file to one user, from a shell or a script.

Exit status 0 only when the recipient holds the whole file and its SHA-256
matched; otherwise one line on stderr says why, and the status says it too:

====  ==========================================
  1   any other error (cannot connect, cannot read the file...)
  2   bad arguments
  3   the recipient declined
  4   the recipient is not online
  5   the file is over the server's limit
  6   interrupted (a side left, the connection dropped)
  7   the SHA-256 of what arrived did not match
  8   no answer in time (``--wait``)
130   interrupted by Ctrl-C
====  ==========================================
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from libchat import ChatError, RemoteError
from libchat_cli import address_options, client_plugins, user_option
from libchat_cli.options import Security, logged_in, login, security_options
from libchat_cli.render import clean

from .errors import Declined, FileTooLarge, HashMismatch, Interrupted, NoAnswer, NotOnline
from .progress import Progress, bar_for, human_size
from .transfers import Outgoing, files_of

EXIT_CODES: dict[type[ChatError], int] = {
    Declined: 3,
    NotOnline: 4,
    FileTooLarge: 5,
    Interrupted: 6,
    HashMismatch: 7,
    NoAnswer: 8,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?", re.I)


def fail(exc: ChatError, user: str, to: str, path: Path) -> None:
    """Report a failed transfer on stderr and exit with its status. The
    message may quote the recipient or the server: it is cleaned."""
    click.echo(f"Error: {clean(exc.message)}", err=True)
    if isinstance(exc, RemoteError) and exc.remote_code == "name_in_use":
        click.echo(f"hint: {clean(_name_in_use_hint(user, to, path))}", err=True)
    sys.exit(next((code for kind, code in EXIT_CODES.items() if isinstance(exc, kind)), 1))


def _name_in_use_hint(user: str, to: str, path: Path) -> str:
    """What to do when our name is taken: on a server without accounts, a
    name is one connection, so the user's own `chat join` holds it."""
    where = f'"{path}"' if " " in str(path) else str(path)
    return (
        f"{user} is connected elsewhere: use /send {to} {where} in your chat session, "
        "or run the server with accounts (--plugins auth) so one user can have "
        "several connections"
    )


class ByteRate(click.ParamType[int]):
    """``500K``, ``10M``, ``1.5G`` or a plain number of bytes (per second)."""

    name = "RATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE.fullmatch(str(value).strip())
        if not match:
            self.fail(f"{value!r} is not a rate like 500K or 10M", param, ctx)
        number, unit = float(match.group(1)), match.group(2).lower()
        rate = int(number * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit])
        if rate <= 0:
            self.fail("the rate must be more than 0", param, ctx)
        return rate


@click.command("send-file")
@user_option
@click.option("--to", "to", required=True, help="Who gets the file.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@address_options
@click.option(
    "--wait", type=click.FloatRange(0), default=300.0, show_default=True,
    help="Seconds to wait for the recipient to accept. 0: forever.",
)  # fmt: skip
@click.option("--limit-rate", type=ByteRate(), default=None, help="At most RATE bytes a second.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, even on a terminal.")
@security_options
def send_file(
    user: str,
    to: str,
    path: Path,
    host: str,
    port: int,
    wait: float,
    limit_rate: int | None,
    quiet: bool,
    security: Security,
) -> None:
    """Send the file at PATH to user --to. Run it again after an
    interruption: it resumes from what the recipient already holds.

    On a server with accounts the password comes from $CHAT_PASSWORD, else
    from a hidden prompt."""
    debug = os.environ.get("PYTHONASYNCIODEBUG") == "1"

    def attempt(connect: dict[str, Any]) -> Outgoing:
        sending = _send(host, port, user, to, path, wait or None, limit_rate, quiet, connect)
        return asyncio.run(sending, debug=debug)

    try:
        outgoing = logged_in(host, user, security, attempt)
    except ChatError as exc:
        fail(exc, user, to, path)
        return
    except KeyboardInterrupt:
        sys.exit(130)
    resumed = f", resumed at {human_size(outgoing.resumed_from)}" if outgoing.resumed_from else ""
    click.echo(
        f"sent {clean(path.name)} to {clean(outgoing.to)}: {outgoing.size} bytes, "
        f"sha256 {outgoing.sha256} verified{resumed}"
    )


async def _send(
    host: str,
    port: int,
    user: str,
    to: str,
    path: Path,
    wait: float | None,
    rate: int | None,
    quiet: bool,
    connect: dict[str, Any],
) -> Outgoing:
    stream = None if quiet else sys.stderr
    # login() is open_client with the CLI's messages; it raises PasswordNeeded
    # (not a ChatError) for logged_in() to ask for a password and try again.
    # No room: a file sender has nothing to say in one, and joining the
    # lobby would show everyone its coming and going.
    client = await login(
        host, port, user=user, room=None, plugins=_plugins(), receive_events=False, **connect
    )
    try:
        files = files_of(client)

        def offered(outgoing: Outgoing) -> None:
            if stream is not None and stream.isatty():
                stream.write(f"waiting for {clean(to)} to accept {clean(path.name)}...\n")

        def progress(label: str, total: int, start: int) -> Progress | None:
            return bar_for(stream, clean(label), total, start)

        outgoing = await files.send(
            to,
            path,
            progress=progress,
            answer_timeout=wait,
            rate=rate,
            on_offered=offered,
        )
    except BaseException:
        await client.close()
        raise
    await client.quit()
    return outgoing


def _plugins() -> list[Any]:
    """The CLI's client plugins (every installed one that loads: their
    client hooks apply, a password prompt for one), and always this one."""
    this = sys.modules[__name__.rpartition(".")[0]]
    return [this, *(plugin for plugin in client_plugins() if plugin is not this)]
