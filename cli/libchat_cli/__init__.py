"""The ``chat`` command: a thin Click layer over the libchat library.

Library errors become one-line ``click.ClickException`` messages, never
tracebacks. Installed plugins add their own commands through the
``libchat_register_commands`` hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

import libchat
from libchat import ChatError, Limits, Server, runner, tls
from libchat.hub import Hub
from libchat.plugins import installed_plugins, make_plugin_manager

from .bench import bench
from .options import Security, login, run_logged_in, security_options
from .render import clean

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("libchat.cli")
DEFAULT_LIMITS = Limits()


def address_options(func: F) -> F:
    """--host and --port, shared by every command that talks to a server."""
    func = click.option(
        "--port",
        "-p",
        type=click.IntRange(0, 65535),
        default=libchat.DEFAULT_PORT,
        show_default=True,
        envvar="CHAT_PORT",
        help="Server port.",
    )(func)
    func = click.option(
        "--host",
        "-h",
        default=libchat.DEFAULT_HOST,
        show_default=True,
        envvar="CHAT_HOST",
        help="Server address.",
    )(func)
    return func


def user_option(func: F) -> F:
    return click.option(
        "--user", "-u", envvar="CHAT_USER", required=True, help="Your user name (or set CHAT_USER)."
    )(func)


def run_async(coro: Coroutine[Any, Any, int | None]) -> int:
    """Run ``coro``; turn library errors into clean one-line CLI errors."""
    try:
        return runner.run(coro, debug=os.environ.get("PYTHONASYNCIODEBUG") == "1") or 0
    except ChatError as exc:
        # The text may come from the server: never let it reach the terminal raw.
        raise click.ClickException(clean(exc.message)) from None
    except KeyboardInterrupt:
        return 130


@click.group(context_settings={"help_option_names": ["--help"]})
@click.version_option(libchat.__version__, prog_name="libchat")
def cli() -> None:
    """libchat: a chat server and terminal client."""


# -- chat serve ---------------------------------------------------------------------


@cli.command()
@address_options
@click.option(
    "--plugins",
    "plugin_names",
    default="",
    metavar="A,B",
    help="Plugins to run, by name (see `chat plugins`).",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="CHAT_DB",
    help="SQLite file for plugins that store data (auth, dm); or set CHAT_DB.",
)
@click.option(
    "--allow-register",
    is_flag=True,
    help="auth: an unknown name creates its account at first login.",
)
@click.option(
    "--bcrypt-rounds",
    type=click.IntRange(4, 31),
    default=None,
    envvar="CHAT_BCRYPT_ROUNDS",
    help="auth: bcrypt cost of new password hashes (or set CHAT_BCRYPT_ROUNDS). [default: 12]",
)
@click.option(
    "--max-file-size",
    type=click.IntRange(0),
    default=None,
    metavar="BYTES",
    help="files: largest file a user may send; 0: no limit. [default: 2 GiB]",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Serve TLS with this PEM certificate chain.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The PEM private key of --tls-cert (if not in the same file).",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(0),
    default=DEFAULT_LIMITS.rate,
    show_default=True,
    help="Messages per second per connection; floods are delayed. 0: off.",
)
@click.option(
    "--rate-burst",
    type=click.IntRange(1),
    default=DEFAULT_LIMITS.rate_burst,
    show_default=True,
    help="Messages allowed in a burst above the rate.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(0),
    default=DEFAULT_LIMITS.max_connections,
    show_default=True,
    help="Connections in all. 0: no limit.",
)
@click.option(
    "--max-per-address",
    type=click.IntRange(0),
    default=DEFAULT_LIMITS.max_connections_per_address,
    show_default=True,
    help="Connections from one IP address. 0: no limit.",
)
@click.option(
    "--max-message",
    type=click.IntRange(1, 65000),
    default=DEFAULT_LIMITS.max_message_bytes,
    show_default=True,
    help="Longest message text, in UTF-8 bytes.",
)
@click.option(
    "--max-frame-size",
    type=click.IntRange(1024),
    default=DEFAULT_LIMITS.max_frame_size,
    show_default=True,
    help="Largest frame (header and body) a client may send, in bytes.",
)
@click.option(
    "--max-send-queue",
    type=click.IntRange(0),
    default=DEFAULT_LIMITS.max_send_queue,
    show_default=True,
    help="Bytes that may wait for a slow client before it is dropped. 0: no limit.",
)
@click.option(
    "--max-rooms-per-session",
    type=click.IntRange(1),
    default=DEFAULT_LIMITS.max_rooms_per_session,
    show_default=True,
    help="Rooms one connection may be in at once.",
)
@click.option(
    "--max-rooms",
    type=click.IntRange(0),
    default=DEFAULT_LIMITS.max_rooms,
    show_default=True,
    help="Rooms on the server at once; creating one past it is refused. 0: no limit.",
)
@click.option(
    "--ping-interval",
    type=click.FloatRange(0),
    default=DEFAULT_LIMITS.ping_interval,
    show_default=True,
    help="Seconds of silence before a client is pinged. 0: off.",
)
@click.option(
    "--ping-timeout",
    type=click.FloatRange(0),
    default=DEFAULT_LIMITS.ping_timeout,
    show_default=True,
    help="Seconds a pinged client has to answer. 0: ping, but never drop.",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(0.1),
    default=DEFAULT_LIMITS.handshake_timeout,
    show_default=True,
    help="Seconds a new connection has to say hello.",
)
@click.option(
    "--hub",
    "hub_url",
    default=None,
    metavar="URL",
    envvar="CHAT_HUB",
    help="Share rooms, presence and private messages with every server on this Redis "
    "(redis://HOST:PORT/DB; see docs/scaling.md), or set CHAT_HUB. Default: this server alone.",
)
@click.option(
    "--cluster",
    default=None,
    metavar="NAME",
    envvar="CHAT_CLUSTER",
    help="With --hub: share with the servers of this cluster only (or set CHAT_CLUSTER). "
    "[default: libchat]",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve(
    host: str,
    port: int,
    plugin_names: str,
    db: str | None,
    allow_register: bool,
    bcrypt_rounds: int | None,
    max_file_size: int | None,
    tls_cert: str | None,
    tls_key: str | None,
    rate_limit: float,
    rate_burst: int,
    max_connections: int,
    max_per_address: int,
    max_message: int,
    max_frame_size: int,
    max_send_queue: int,
    max_rooms_per_session: int,
    max_rooms: int,
    ping_interval: float,
    ping_timeout: float,
    handshake_timeout: float,
    hub_url: str | None,
    cluster: str | None,
    log_level: str,
) -> None:
    """Run a chat server (Ctrl-C or SIGTERM stops it cleanly)."""
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    limits = Limits(
        rate=rate_limit,
        rate_burst=rate_burst,
        max_connections=max_connections,
        max_connections_per_address=max_per_address,
        max_message_bytes=max_message,
        max_frame_size=max_frame_size,
        max_send_queue=max_send_queue,
        max_rooms_per_session=max_rooms_per_session,
        max_rooms=max_rooms,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        handshake_timeout=handshake_timeout,
    )
    names = [n.strip() for n in plugin_names.split(",") if n.strip()]
    config: dict[str, Any] = {
        "db": db,
        "allow_register": allow_register,
        "bcrypt_rounds": bcrypt_rounds,
    }
    if max_file_size is not None:
        config["max_file_size"] = max_file_size
    context = _server_tls(tls_cert, tls_key)
    hub = _hub(hub_url, cluster)
    _keep_malloc_memory()
    sys.exit(run_async(_serve(host, port, names, limits, config, context, hub)))


def _keep_malloc_memory() -> None:
    """Tell glibc to keep freed memory for reuse rather than hand it back to
    the system after every file chunk: relaying a file then costs about half
    the CPU (docs/performance.md). At most 64 MiB of freed memory is kept.
    A no-op where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD


def _hub(url: str | None, cluster: str | None) -> Hub | None:
    """The hub --hub asks for; None: the in-memory one of this process."""
    if url is None:
        if cluster is not None:
            raise click.UsageError("--cluster needs --hub")
        return None
    try:
        from libchat.redis_hub import DEFAULT_CLUSTER, hub_from_url
    except ImportError as exc:
        raise click.ClickException(f"--hub: {exc}") from None
    try:
        return hub_from_url(url, cluster=cluster or DEFAULT_CLUSTER)
    except ChatError as exc:
        raise click.UsageError(exc.message) from None


def _server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plaintext."""
    if cert is None:
        if key is not None:
            raise click.UsageError("--tls-key needs --tls-cert")
        return None
    try:
        context = tls.server_context(cert, key)
    except ChatError as exc:
        raise click.ClickException(exc.message) from None
    log.info("TLS on, with the certificate in %s", cert)
    return context


async def _serve(
    host: str,
    port: int,
    plugins: list[str],
    limits: Limits,
    config: dict[str, Any],
    context: ssl.SSLContext | None = None,
    hub: Hub | None = None,
) -> int:
    server = Server(host, port, plugins=plugins, limits=limits, config=config, ssl=context, hub=hub)
    # Signal handlers first: a SIGTERM that lands right after the "listening"
    # line must still shut down cleanly.
    stop_requested = asyncio.Event()

    def stop(signame: str) -> None:
        log.info("received %s", signame)
        stop_requested.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, functools.partial(stop, sig.name))
    try:
        await server.start()
    except OSError as exc:
        what = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ChatError(f"cannot listen on {host}:{port}: {what or exc}") from None
    await stop_requested.wait()
    await server.close()
    return 0


# -- chat join ----------------------------------------------------------------------


@cli.command()
@address_options
@user_option
@click.option(
    "--room", "-r", default=libchat.DEFAULT_ROOM, show_default=True, help="Room to join first."
)
@click.option(
    "--json", "json_mode", is_flag=True, help="Print one JSON object per event (for scripts)."
)
@click.option(
    "--accept-files",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="files: accept every file offered to you, into DIR (for scripts). "
    "End of input then does not leave: quit or SIGTERM does.",
)
@click.option(
    "--accept-files-from",
    default=None,
    metavar="NAME,NAME",
    help="files: take offers from these users only; others are declined.",
)
@click.option(
    "--max-file-size",
    type=click.IntRange(1),
    default=None,
    metavar="BYTES",
    help="files: decline offers of files larger than this.",
)
@click.option(
    "--part-quota",
    type=click.IntRange(0),
    default=None,
    metavar="BYTES",
    help="files: room for unfinished (.part) files in DIR. [default: 4 GiB]",
)
@security_options
def join(
    host: str,
    port: int,
    user: str,
    room: str,
    json_mode: bool,
    accept_files: str | None,
    accept_files_from: str | None,
    max_file_size: int | None,
    part_quota: int | None,
    security: Security,
) -> None:
    """Join the chat. Interactive in a terminal; otherwise each stdin line
    is sent and each event printed as one line.

    On a server with accounts the password comes from $CHAT_PASSWORD, else
    from a hidden prompt."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not json_mode
    # Settings for client-side plugins (the files plugin reads these).
    given = {
        "accept_files": accept_files,
        "accept_files_from": accept_files_from,
        "max_file_size": max_file_size,
        "part_quota": part_quota,
    }
    options = {key: value for key, value in given.items() if value is not None}
    sys.exit(
        run_logged_in(
            host,
            user,
            security,
            lambda connect: _join(host, port, user, room, json_mode, interactive, connect, options),
        )
    )


async def _join(
    host: str,
    port: int,
    user: str,
    room: str,
    json_mode: bool,
    interactive: bool,
    connect: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> int:
    from .terminal import Terminal

    client = await login(
        host,
        port,
        user=user,
        room=room,
        plugins=client_plugins(),
        options=options,
        **(connect or {}),
    )
    terminal = Terminal(client, json_mode=json_mode)
    try:
        if interactive:
            return await terminal.run_interactive()
        return await terminal.run_pipe()
    finally:
        await client.close()


def client_plugins() -> list[Any]:
    """Every installed plugin that loads: their client-side hooks apply."""
    loaded = []
    for name, entry_point in sorted(installed_plugins().items()):
        try:
            loaded.append(entry_point.load())
        except Exception as exc:
            click.echo(f"warning: plugin {name!r} failed to load: {exc}", err=True)
    return loaded


# -- chat plugins -------------------------------------------------------------------


@cli.command("plugins")
def list_plugins() -> None:
    """List the installed plugins."""
    found = installed_plugins()
    if not found:
        click.echo("no plugins installed")
    for name, entry_point in sorted(found.items()):
        try:
            doc = (entry_point.load().__doc__ or "").strip().splitlines()
            summary = doc[0] if doc else ""
        except Exception as exc:
            summary = f"(fails to load: {exc})"
        click.echo(f"{name:<12} {entry_point.value:<24} {summary}")


cli.add_command(bench)


# -- plugin commands ----------------------------------------------------------------


_plugin_commands_added = False


def build_cli() -> click.Group:
    """The ``chat`` group with every installed plugin's commands added (once
    per process). A plugin that fails here is reported and left out; the
    other commands still work."""
    global _plugin_commands_added
    if _plugin_commands_added:
        return cli
    _plugin_commands_added = True
    for plugin in client_plugins():
        try:
            make_plugin_manager([plugin]).hook.libchat_register_commands(cli=cli)
        except Exception as exc:
            name = getattr(plugin, "__name__", type(plugin).__name__)
            click.echo(f"warning: plugin {name} could not add its commands: {exc}", err=True)
    return cli


def main() -> None:
    build_cli()(prog_name="chat")
