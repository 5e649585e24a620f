"""What the terminal client shows and runs for file transfer: one line per
``file.*`` event, and the ``/send``, ``/accept``, ``/decline``, ``/cancel``
and ``/transfers`` commands (run by the client itself, not the server).

A command handler gets the terminal (``.client``, ``.out(text)``,
``.err(text)``) and returns at once: transfers run in the background and
report through the terminal when they end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from libchat import ChatError, ClientCommand
from libchat.events import Event
from libchat_cli.render import clean

from .errors import TransferError
from .progress import human_size
from .transfers import FileTransfers, Outgoing, files_of


def shown(text: object, limit: int = 80) -> str:
    """Untrusted text made safe (the terminal client's one sanitizer,
    :func:`libchat_cli.render.clean`) and short enough for one line."""
    value = clean(str(text))
    return value if len(value) <= limit else value[: limit - 3] + "..."


# -- events ---------------------------------------------------------------------------


def format_event(event: Event) -> str | None:
    """The line for a ``file.*`` event, or None for other events."""
    header = event.header
    local = header.get("local")
    local = local if isinstance(local, dict) else {}
    tid = shown(header.get("tid"), 20)
    if event.type == "file.offer":
        size = header.get("size")
        what = (
            f"{shown(header.get('from'), 32)} offers {shown(header.get('name'))} "
            f"({human_size(size) if isinstance(size, int) else '?'}, id {tid})"
        )
        if local.get("accepting"):
            return f"[file] {what}; accepting into {shown(local['accepting'], 200)}"
        if local.get("declined"):
            return f"[file] {what}; declined: {shown(local['declined'], 200)}"
        return f"[file] {what}: /accept {tid} [DIR] or /decline {tid}"
    if event.type in ("file.done", "file.abort") and local:
        return _outcome(local, tid)
    return None


def _outcome(local: dict[str, Any], tid: str) -> str:
    what = f"{shown(local.get('name'))} from {shown(local.get('from'), 32)} (id {tid})"
    if local.get("state") == "saved":
        size = human_size(int(local.get("size", 0)))
        return f"[file] saved {what}: {size}, SHA-256 verified, in {shown(local.get('path'), 300)}"
    error = shown(local.get("error") or "failed", 200)
    return f"[file] {what} failed: {error}"


# -- commands -------------------------------------------------------------------------


def client_commands() -> list[ClientCommand]:
    return [
        ClientCommand("send", send, "/send NAME PATH", "send the file at PATH to NAME"),
        ClientCommand(
            "accept", accept, "/accept ID [DIR]", "accept file offer ID into DIR (default: here)"
        ),
        ClientCommand("decline", decline, "/decline ID [REASON]", "decline file offer ID"),
        ClientCommand("cancel", cancel, "/cancel ID", "stop file transfer ID, either way"),
        ClientCommand("transfers", transfers, "/transfers", "list file offers and transfers"),
    ]


def _files(terminal: Any) -> FileTransfers:
    files = files_of(terminal.client)
    files.terminal = terminal  # progress and outcomes go to this terminal
    return files


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _source(text: str) -> Path:
    path = Path(_unquote(text)).expanduser()
    if not path.is_file():
        raise ValueError(f"no file at {path}")
    return path


async def send(terminal: Any, args: str) -> None:
    name, _, rest = args.strip().partition(" ")
    if not name or not rest.strip():
        raise ValueError("usage: /send NAME PATH")
    path = _source(rest)
    files = _files(terminal)
    files.spawn(_send(terminal, files, name, path))


async def _send(terminal: Any, files: FileTransfers, to: str, path: Path) -> None:
    def offered(outgoing: Outgoing) -> None:
        terminal.out(
            f"[file] offered {shown(path.name)} ({human_size(outgoing.size)}) to {shown(to, 32)}, "
            f"id {shown(outgoing.tid, 20)}; waiting for an answer"
        )

    try:
        outgoing = await files.send(to, path, progress=files.terminal_progress, on_offered=offered)
    except ChatError as exc:
        what = f"sending {shown(path.name)} to {shown(to, 32)}"
        terminal.err(f"[file] {what} failed: {shown(exc.message, 200)}")
        return
    resumed = f" (resumed at {human_size(outgoing.resumed_from)})" if outgoing.resumed_from else ""
    terminal.out(
        f"[file] sent {shown(path.name)} to {shown(to, 32)}: {human_size(outgoing.size)}, "
        f"SHA-256 verified{resumed}"
    )


async def accept(terminal: Any, args: str) -> None:
    tid, _, folder = args.strip().partition(" ")
    if not tid:
        raise ValueError("usage: /accept ID [DIR]")
    files = _files(terminal)
    if tid not in {t.tid for t in files.offers()}:
        raise ValueError(f"no open file offer with id {tid}")
    files.spawn(_accept(terminal, files, tid, _unquote(folder) or None))


async def _accept(terminal: Any, files: FileTransfers, tid: str, folder: str | None) -> None:
    try:
        incoming = await files.accept(tid, folder)
    except ChatError as exc:
        terminal.err(f"[file] cannot accept {shown(tid, 20)}: {shown(exc.message, 200)}")
        return
    resumed = f", resuming at {human_size(incoming.resumed_from)}" if incoming.resumed_from else ""
    terminal.out(
        f"[file] receiving {shown(incoming.name)} from {shown(incoming.sender, 32)} "
        f"into {shown(incoming.directory, 200)}{resumed}"
    )


async def decline(terminal: Any, args: str) -> None:
    tid, _, reason = args.strip().partition(" ")
    if not tid:
        raise ValueError("usage: /decline ID [REASON]")
    try:
        await _files(terminal).decline(tid, reason.strip() or "declined")
    except TransferError as exc:
        raise ValueError(exc.message) from None
    terminal.out(f"[file] declined {shown(tid, 20)}")


async def cancel(terminal: Any, args: str) -> None:
    tid = args.strip()
    if not tid:
        raise ValueError("usage: /cancel ID")
    try:
        await _files(terminal).cancel(tid)
    except TransferError as exc:
        raise ValueError(exc.message) from None


def transfers(terminal: Any, args: str) -> None:
    files = _files(terminal)
    lines = []
    for t in files.incoming.values():
        done = f"{human_size(t.received)}/{human_size(t.size)}"
        who, tid = shown(t.sender, 32), shown(t.tid, 20)
        lines.append(f"  {tid:>4} <- {who:<12} {shown(t.name, 40):<40} {done} {t.state}")
    for o in files.outgoing.values():
        done = f"{human_size(o.sent)}/{human_size(o.size)}"
        who, tid = shown(o.to, 32), shown(o.tid, 20)
        lines.append(f"  {tid:>4} -> {who:<12} {shown(o.path.name, 40):<40} {done} {o.state}")
    terminal.out("\n".join(["file transfers:", *lines]) if lines else "no file transfers")
