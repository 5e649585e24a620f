"""Every hook a libchat plugin can implement, in one place.

A plugin is a module (or any object) with functions named after these specs
and marked with :data:`libchat.hookimpl`. It registers under the entry point
group ``libchat``. Hooks may be plain functions or ``async def``; the host
awaits whatever they return. Each docstring says when the hook fires and
whether the first non-``None`` result wins. tests/test_hooks_documented.py
fails when a hook here lacks a docstring or is not exercised by a test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from .client import Client
    from .commands import ClientCommand, Command, FrameHandler
    from .events import Event
    from .server import Server
    from .session import Session

hookspec = pluggy.HookspecMarker("libchat")
hookimpl = pluggy.HookimplMarker("libchat")


# -- server lifecycle --------------------------------------------------------------


@hookspec
def libchat_startup(server: Server) -> Any:
    """Fires once when the server starts, before it accepts a connection.
    Open stores and start background tasks here. All implementations run."""


@hookspec
def libchat_shutdown(server: Server) -> Any:
    """Fires once during graceful shutdown, after clients were told and
    disconnected. Flush and close stores here. All implementations run; one
    that raises is logged and the others still run."""


@hookspec
def libchat_limits(server: Server) -> dict[str, Any] | None:
    """Return extra limits this plugin enforces (for example
    ``{"max_file_size": ...}``); they are announced in the ``welcome`` frame
    beside the core limits. All results are merged."""


# -- sessions -----------------------------------------------------------------------


@hookspec(firstresult=True)
def libchat_authenticate(server: Server, hello: dict[str, Any], peer: str) -> str | None:
    """Fires on every ``hello`` before the name is taken. Return the user name
    the connection is granted (it may differ in case from the one asked for),
    ``None`` to leave the decision to others, or raise
    :class:`libchat.errors.AuthenticationFailed` to refuse. The first
    non-``None`` result wins; with no answer the requested name is used."""


@hookspec(firstresult=True)
def libchat_account_exists(server: Server, name: str) -> bool | None:
    """Is ``name`` a registered account (one that may receive messages while
    offline, for example)? Return ``None`` for no opinion. The first
    non-``None`` result wins; with no answer, no name is an account."""


@hookspec
def libchat_session_opened(session: Session) -> Any:
    """Fires when a session has completed its handshake and joined its first
    room. All implementations run; a failing one is logged, not fatal."""


@hookspec
def libchat_session_closed(session: Session, reason: str) -> Any:
    """Fires once when a session ends, for whatever reason, after it left its
    rooms. All implementations run."""


# -- messages and commands ----------------------------------------------------------


@hookspec
def libchat_message(session: Session, message: dict[str, Any]) -> Any:
    """Fires before a room message is delivered. ``message`` holds ``room``,
    ``from`` and ``text`` (and ``action`` for /me); change it in place to
    change what is delivered, or raise :class:`libchat.errors.Rejected` (or
    any :class:`~libchat.errors.ChatError`) to refuse it: the sender gets the
    error, nobody gets the message. All implementations run, in order."""


@hookspec
def libchat_commands(server: Server) -> list[Command] | None:
    """Return slash commands this plugin adds (``/msg``). A client sends a
    command it does not know itself as a ``command`` frame; the server runs
    the handler registered here. Called once at startup; all results are
    merged and a name registered twice is an error."""


@hookspec
def libchat_frame_handlers(server: Server) -> dict[str, FrameHandler] | None:
    """Return handlers for new frame types (``{"file.offer": handler}``),
    called once at startup. A core frame type or a type registered twice is
    an error."""


# -- command line -------------------------------------------------------------------


@hookspec
def libchat_register_commands(cli: click.Group) -> None:
    """Add Click commands to the ``chat`` command (``chat user add``). Fires
    for every installed plugin when ``chat`` starts."""


# -- client side --------------------------------------------------------------------


@hookspec
def libchat_client_hello(client: Client, hello: dict[str, Any]) -> Any:
    """Fires before the client sends its ``hello``; add fields to ``hello``
    in place (a password, a token). All implementations run."""


@hookspec(firstresult=True)
def libchat_client_frame(client: Client, event: Event) -> bool | None:
    """Fires in the client's read loop for every frame from the server that
    is not a reply to a request (``event`` is the decoded event). Return
    ``True`` to consume it: it is then not queued for the application. The
    client awaits the result before it reads the next frame, so a slow
    handler (writing a file chunk) slows the server down: backpressure. Not
    called at all when no plugin implements it. First result wins."""


@hookspec
def libchat_client_commands() -> list[ClientCommand] | None:
    """Return slash commands the terminal client runs locally (``/send``,
    ``/accept``) instead of sending them to the server. A command's handler
    gets the terminal (``terminal.client``, ``terminal.out``,
    ``terminal.err``) and the text after the command name."""


@hookspec(firstresult=True)
def libchat_format_event(event: Event) -> str | None:
    """Return the one line the terminal client prints for ``event``, or
    ``None`` to let others (and finally the core) format it. First result
    wins."""
