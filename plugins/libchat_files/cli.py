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

import libchat
from libchat import ChatError
from libchat.plugins import installed_plugins
from libchat_cli.options import Security, logged_in, login, security_options

from .errors import Declined, FileTooLarge, HashMismatch, Interrupted, NoAnswer, NotOnline
from .progress import bar_for, human_size
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


def fail(exc: ChatError) -> None:
    """Report a failed transfer on stderr and exit with its status."""
    click.echo(f"Error: {exc.message}", err=True)
    sys.exit(next((code for kind, code in EXIT_CODES.items() if isinstance(exc, kind)), 1))


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
@click.option("--user", "-u", envvar="CHAT_USER", required=True, help="Your user name.")
@click.option("--to", "to", required=True, help="Who gets the file.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@click.option(
    "--host", "-h", default=libchat.DEFAULT_HOST, show_default=True, envvar="CHAT_HOST",
    help="Server address.",
)  # fmt: skip
@click.option(
    "--port", "-p", type=click.IntRange(0, 65535), default=libchat.DEFAULT_PORT,
    show_default=True, envvar="CHAT_PORT", help="Server port.",
)  # fmt: skip
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
        fail(exc)
        return
    except KeyboardInterrupt:
        sys.exit(130)
    resumed = f", resumed at {human_size(outgoing.resumed_from)}" if outgoing.resumed_from else ""
    click.echo(
        f"sent {path.name} to {outgoing.to}: {outgoing.size} bytes, "
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
    client = await login(
        host, port, user=user, plugins=_client_plugins(), receive_events=False, **connect
    )
    try:
        files = files_of(client)

        def offered(outgoing: Outgoing) -> None:
            if stream is not None and stream.isatty():
                stream.write(f"waiting for {to} to accept {path.name}...\n")

        outgoing = await files.send(
            to,
            path,
            progress=lambda label, total, start: bar_for(stream, label, total, start),
            answer_timeout=wait,
            rate=rate,
            on_offered=offered,
        )
    except BaseException:
        await client.close()
        raise
    await client.quit()
    return outgoing


def _client_plugins() -> list[Any]:
    """Every installed plugin that loads (their client hooks apply: a
    password prompt, for one), and always this one."""
    loaded: list[Any] = [sys.modules[__name__.rpartition(".")[0]]]
    for name, entry_point in sorted(installed_plugins().items()):
        try:
            plugin = entry_point.load()
        except Exception as exc:
            click.echo(f"warning: plugin {name!r} failed to load: {exc}", err=True)
            continue
        if plugin not in loaded:
            loaded.append(plugin)
    return loaded
