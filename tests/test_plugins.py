"""Plugins: the wordfilter example (in process and through real entry point
discovery in a subprocess), every hook, and the plugin machinery itself."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
from click.testing import CliRunner

import libchat
import libchat_dm
from conftest import WAIT, ServerProcess, connect, next_of, run_chat, running_server
from libchat import plugins as plugins_module
from libchat.errors import AuthenticationFailed, NotFound, Rejected, RemoteError
from libchat.plugins import (
    InvalidPlugin,
    UnknownPlugin,
    call_async,
    call_each,
    call_firstresult,
    make_plugin_manager,
    plugin_names,
)
from libchat.protocol import Frame
from libchat_cli.render import format_event

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "wordfilter" / "libchat_wordfilter.py"
hookimpl = libchat.hookimpl


def _load_wordfilter() -> ModuleType:
    """The example plugin, imported from its file as a user's module would be."""
    spec = importlib.util.spec_from_file_location("libchat_wordfilter", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wordfilter = _load_wordfilter()


# -- the wordfilter example: the filter itself -----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oh darn it", "oh *** it"),
        ("HECK, what now?", "***, what now?"),
        ("darn-it", "***-it"),
        ("heckle and darned are other words", "heckle and darned are other words"),
        ("no bad words", "no bad words"),
    ],
)
def test_wordfilter_censors_whole_words(text: str, expected: str) -> None:
    assert wordfilter.censor(text, ("darn", "heck")) == expected


@pytest.mark.parametrize("text", ["darn", "Darn heck!", "  heck... darn  "])
def test_wordfilter_rejects_nothing_but_banned_words(text: str) -> None:
    with pytest.raises(Rejected):
        wordfilter.censor(text, ("darn", "heck"))


def test_wordfilter_word_list_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBCHAT_BANNED_WORDS", raising=False)
    assert wordfilter.banned_words({}) == ("darn", "heck")
    assert wordfilter.banned_words({"banned_words": ["Spam", " eggs ", "spam"]}) == (
        "eggs",
        "spam",
    )
    assert wordfilter.banned_words({"banned_words": "a,b,,c"}) == ("a", "b", "c")
    monkeypatch.setenv("LIBCHAT_BANNED_WORDS", "foo,bar")
    assert wordfilter.banned_words({}) == ("bar", "foo")
    # an empty list filters nothing
    assert wordfilter.censor("foo", wordfilter.banned_words({"banned_words": []})) == "foo"


# -- the wordfilter example in a server, registered as a module -------------------------


async def test_wordfilter_as_module_in_process() -> None:
    config = {"banned_words": ["spam", "eggs"]}
    async with running_server(plugins=[wordfilter], config=config) as server:
        alice = await connect(server, "alice")
        bob = await connect(server, "bob")
        assert "wordfilter" in alice.welcome["plugins"]
        assert "banned" in [c["name"] for c in alice.welcome["commands"]]

        await alice.send("I like SPAM and ham", wait=True)
        message = await next_of(bob, libchat.Message)
        assert (message.sender, message.text) == ("alice", "I like *** and ham")

        with pytest.raises(RemoteError) as err:
            await alice.send("spam, eggs!", wait=True)
        assert err.value.remote_code == "rejected"
        # nobody got the rejected message: bob's next message is the one after
        await alice.send("plain words", wait=True)
        message = await next_of(bob, libchat.Message)
        assert message.text == "plain words"

        reply = await alice.command("banned")
        assert reply["words"] == ["eggs", "spam"]
        assert reply["censored"] == 1  # counted in alice's session.data only
        assert (await bob.command("banned"))["censored"] == 0
        await alice.quit()
        await bob.quit()


# -- the wordfilter example through real entry point discovery -------------------------


def _install_fake(site: Path, dist: str, entry_points: str, module: Path | None) -> None:
    """What pip would leave in site-packages: a module and its dist-info."""
    if module is not None:
        shutil.copy(module, site / module.name)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    name = dist.replace("_", "-")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[libchat]\n{entry_points}\n")


def _env_with(site: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **extra}


@pytest.fixture
def wordfilter_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which libchat_wordfilter is 'installed'."""
    _install_fake(tmp_path, "libchat_wordfilter", "wordfilter = libchat_wordfilter", EXAMPLE)
    return _env_with(tmp_path, LIBCHAT_BANNED_WORDS="spam,eggs")


def test_chat_plugins_lists_an_installed_third_party_plugin(
    wordfilter_env: dict[str, str],
) -> None:
    result = run_chat("plugins", env=wordfilter_env)
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"wordfilter", "dm", "auth"} <= names
    line = next(line for line in result.stdout.splitlines() if line.startswith("wordfilter"))
    assert "libchat_wordfilter" in line and "banned words" in line


def test_plugin_cli_command_through_entry_point(wordfilter_env: dict[str, str]) -> None:
    result = run_chat("wordfilter", "spam and ham", env=wordfilter_env)
    assert (result.returncode, result.stdout) == (0, "*** and ham\n"), result.stderr
    result = run_chat("wordfilter", "--words", "ham", "spam and ham", env=wordfilter_env)
    assert result.stdout == "spam and ***\n"


@pytest.fixture
def wordfilter_server(wordfilter_env: dict[str, str]) -> Iterator[ServerProcess]:
    proc = ServerProcess("--plugins", "wordfilter", env=wordfilter_env)
    try:
        yield proc
    finally:
        proc.stop()


async def test_chat_serve_runs_an_entry_point_plugin(wordfilter_server: ServerProcess) -> None:
    port = wordfilter_server.port
    alice = await libchat.open_client("127.0.0.1", port, user="alice")
    bob = await libchat.open_client("127.0.0.1", port, user="bob")
    assert "wordfilter" in alice.welcome["plugins"]
    await alice.send("eggs for breakfast", wait=True)
    message = await next_of(bob, libchat.Message)
    assert (message.sender, message.text) == ("alice", "*** for breakfast")
    with pytest.raises(RemoteError) as err:
        await alice.send("SPAM", wait=True)
    assert err.value.remote_code == "rejected"
    await alice.quit()
    await bob.quit()
    assert await asyncio.to_thread(wordfilter_server.stop) == 0


# -- plugins by name from the command line ----------------------------------------------


def test_chat_plugins_lists_first_party_plugins() -> None:
    result = run_chat("plugins")
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"dm", "auth"} <= names


def test_chat_serve_unknown_plugin_is_a_one_line_error() -> None:
    result = run_chat("serve", "--port", "0", "--plugins", "nosuch")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nosuch" in lines[0]
    assert "dm" in lines[0] and "auth" in lines[0]
    assert "Traceback" not in result.stderr


def test_chat_serve_broken_plugin_is_a_clean_error(tmp_path: Path) -> None:
    _install_fake(tmp_path, "libchat_broken", "broken = libchat_no_such_module", None)
    result = run_chat("serve", "--port", "0", "--plugins", "broken", env=_env_with(tmp_path))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "broken" in error[0] and "failed to load" in error[0]


# -- refusing bad plugins ---------------------------------------------------------------


class Nonsense:
    @hookimpl
    def libchat_nonsense(self, server: Any) -> None:
        raise AssertionError("never called")


class WrongArguments:
    @hookimpl
    def libchat_startup(self, srv: Any) -> None:
        raise AssertionError("never called")


class Wrapper:
    @hookimpl(wrapper=True)
    def libchat_authenticate(self, hello: dict[str, Any]) -> Any:
        return (yield)


def test_unknown_hook_is_refused() -> None:
    with pytest.raises(InvalidPlugin, match="libchat_nonsense"):
        make_plugin_manager([Nonsense()])
    with pytest.raises(InvalidPlugin, match="libchat_nonsense"):
        libchat.Server("127.0.0.1", 0, plugins=[Nonsense()])


def test_hook_with_unknown_argument_is_refused() -> None:
    with pytest.raises(InvalidPlugin, match="srv"):
        make_plugin_manager([WrongArguments()])


def test_hook_wrapper_is_refused() -> None:
    # call_firstresult would otherwise take the wrapper's generator as a name
    with pytest.raises(InvalidPlugin, match="wrappers are not supported"):
        make_plugin_manager([Wrapper()])


def test_unknown_plugin_name_lists_installed() -> None:
    with pytest.raises(UnknownPlugin) as err:
        make_plugin_manager(["nosuch"])
    assert "nosuch" in err.value.message
    assert "dm" in err.value.message and "auth" in err.value.message


def test_plugin_that_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = EntryPoint(name="broken", value="libchat_no_such_module", group="libchat")
    monkeypatch.setattr(plugins_module, "installed_plugins", lambda: {"broken": broken})
    with pytest.raises(InvalidPlugin, match="'broken' failed to load"):
        make_plugin_manager(["broken"])


# -- make_plugin_manager and plugin_names -----------------------------------------------


class Named:
    PLUGIN_NAME = "shiny"

    @hookimpl
    def libchat_limits(self) -> dict[str, Any]:
        return {"shiny": True}


class Anonymous:
    @hookimpl
    def libchat_limits(self) -> None:
        return None


def test_make_plugin_manager_names_modules_and_objects() -> None:
    pm = make_plugin_manager([" dm ", "", "dm", "auth"])
    assert sorted(pm.list_name_plugin()) == sorted(
        [("auth", pm.get_plugin("auth")), ("dm", libchat_dm)]
    )
    # a module given again by name (or the name again as a module) is one plugin
    for specs in ([libchat_dm, "dm"], ["dm", libchat_dm], [libchat_dm, libchat_dm]):
        assert make_plugin_manager(specs).get_plugins() == {libchat_dm}
    same = Anonymous()
    assert len(make_plugin_manager([same, same]).get_plugins()) == 1
    assert len(make_plugin_manager([Anonymous(), Anonymous()]).get_plugins()) == 2
    assert make_plugin_manager().get_plugins() == set()


def test_plugin_names_as_announced() -> None:
    pm = make_plugin_manager(["dm", wordfilter, Named(), Anonymous()])
    assert plugin_names(pm) == ["Anonymous", "dm", "shiny", "wordfilter"]


# -- the async-aware hook callers -------------------------------------------------------


def _tracer(calls: list[str], label: str, result: Any, *, is_async: bool, **opts: Any) -> Any:
    """A plugin whose libchat_authenticate records its call and returns ``result``."""

    class Plugin:
        if is_async:

            @hookimpl(**opts)
            async def libchat_authenticate(self, hello: dict[str, Any]) -> Any:
                await asyncio.sleep(0)  # a real suspension, not a sync call in disguise
                calls.append(label)
                return result

        else:

            @hookimpl(**opts)
            def libchat_authenticate(self, hello: dict[str, Any]) -> Any:
                calls.append(label)
                return result

    return Plugin()


async def test_call_firstresult_order_and_async() -> None:
    calls: list[str] = []
    pm = make_plugin_manager(
        [
            _tracer(calls, "never", "too late", is_async=False),
            _tracer(calls, "third", "winner", is_async=True),
            _tracer(calls, "second", None, is_async=True),
            _tracer(calls, "first", None, is_async=False),
            _tracer(calls, "trylast", "loser", is_async=False, trylast=True),
            _tracer(calls, "tryfirst", None, is_async=True, tryfirst=True),
        ]
    )
    hook = pm.hook.libchat_authenticate
    result = await call_firstresult(hook, server=None, hello={}, peer="p")
    assert result == "winner"
    # last registered first, tryfirst before all, stops at the first answer
    assert calls == ["tryfirst", "first", "second", "third"]


async def test_call_firstresult_without_answer() -> None:
    calls: list[str] = []
    pm = make_plugin_manager([_tracer(calls, "a", None, is_async=True)])
    hook = pm.hook.libchat_authenticate
    assert await call_firstresult(hook, server=None, hello={}, peer="p") is None
    assert calls == ["a"]
    empty = make_plugin_manager().hook.libchat_authenticate
    assert await call_firstresult(empty, server=None, hello={}, peer="p") is None


def _appender(suffix: str, *, is_async: bool) -> Any:
    class Plugin:
        if is_async:

            @hookimpl
            async def libchat_message(self, message: dict[str, Any]) -> str:
                await asyncio.sleep(0)
                message["text"] += suffix
                return suffix

        else:

            @hookimpl
            def libchat_message(self, message: dict[str, Any]) -> None:
                message["text"] += suffix

    return Plugin()


async def test_call_async_runs_in_order_awaiting_each() -> None:
    # registered last is called first: "1" (async) must finish before "2"
    pm = make_plugin_manager(
        [
            _appender("3", is_async=True),
            _appender("2", is_async=False),
            _appender("1", is_async=True),
        ]
    )
    message = {"text": "x"}
    results = await call_async(pm.hook.libchat_message, session=None, message=message)
    assert message["text"] == "x123"
    assert results == ["1", "3"]  # None results are dropped


async def test_call_async_stops_at_an_exception_leaving_nothing_unawaited() -> None:
    ran: list[str] = []

    class Fails:
        @hookimpl
        def libchat_message(self, message: dict[str, Any]) -> None:
            raise Rejected("no")

    class Earlier:
        @hookimpl
        async def libchat_message(self, message: dict[str, Any]) -> None:
            ran.append("earlier")

    class Later:
        @hookimpl
        async def libchat_message(self, message: dict[str, Any]) -> None:
            ran.append("later")

    pm = make_plugin_manager([Later(), Fails(), Earlier()])
    with pytest.raises(Rejected):
        await call_async(pm.hook.libchat_message, session=None, message={"text": ""})
    assert ran == ["earlier"]  # awaited before the failure; "later" never started


async def test_call_each_logs_a_failure_and_runs_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    class Async:
        @hookimpl
        async def libchat_shutdown(self, server: Any) -> None:
            await asyncio.sleep(0)
            ran.append("async")

    class Broken:
        @hookimpl
        async def libchat_shutdown(self) -> None:
            raise RuntimeError("disk on fire")

    class Sync:
        @hookimpl
        def libchat_shutdown(self) -> None:
            ran.append("sync")

    pm = make_plugin_manager([Async(), Broken(), Sync()])
    with caplog.at_level(logging.ERROR, logger="libchat.plugins"):
        await call_each(pm.hook.libchat_shutdown, server=None)
    assert ran == ["sync", "async"]
    assert "failed in libchat_shutdown" in caplog.text and "disk on fire" in caplog.text


# -- every hook in a running server -----------------------------------------------------


class Lifecycle:
    """Async and sync implementations side by side."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    @hookimpl
    async def libchat_startup(self, server: libchat.Server) -> None:
        await asyncio.sleep(0)
        assert server.sockets == []  # before listening
        self.calls.append("startup")

    @hookimpl
    def libchat_shutdown(self, server: libchat.Server) -> None:
        assert server.sessions == set()  # after every client left
        self.calls.append("shutdown")

    @hookimpl
    async def libchat_authenticate(self, hello: dict[str, Any], peer: str) -> str | None:
        await asyncio.sleep(0)
        assert peer.startswith("127.0.0.1")
        user = str(hello["user"])
        return user.title() if user.startswith("a") else None  # a different case

    @hookimpl
    async def libchat_session_opened(self, session: libchat.Session) -> None:
        self.calls.append(("opened", session.name, session.authenticated))

    @hookimpl
    def libchat_session_closed(self, session: libchat.Session, reason: str) -> None:
        self.calls.append(("closed", session.name, reason))

    @hookimpl
    async def libchat_message(self, session: libchat.Session, message: dict[str, Any]) -> None:
        message["text"] = f"{message['text']} (via {session.name})"


async def test_sync_and_async_hooks_in_a_server() -> None:
    plugin = Lifecycle()
    async with running_server(plugins=[plugin]) as server:
        assert plugin.calls == ["startup"]
        alice = await connect(server, "alice")
        assert (alice.user, alice.welcome["user"]) == ("Alice", "Alice")
        bob = await connect(server, "bob")
        assert bob.user == "bob"
        await next_of(alice, libchat.Presence, user="bob", event="joined")
        await bob.send("hi", wait=True)
        message = await next_of(alice, libchat.Message)
        assert message.text == "hi (via bob)"
        await alice.quit("bye now")
        await bob.quit()
    assert plugin.calls[0] == "startup" and plugin.calls[-1] == "shutdown"
    assert set(plugin.calls[1:-1]) == {
        ("opened", "Alice", True),
        ("opened", "bob", False),
        ("closed", "Alice", "bye now"),
        ("closed", "bob", "quit"),
    }


async def test_failing_startup_hook_stops_the_server_starting() -> None:
    class Fails:
        @hookimpl
        async def libchat_startup(self) -> None:
            raise RuntimeError("no database")

    server = libchat.Server("127.0.0.1", 0, plugins=[Fails()])
    with pytest.raises(RuntimeError, match="no database"):
        await server.start()
    assert server.sockets == []


class Gatekeeper:
    @hookimpl
    def libchat_authenticate(self, hello: dict[str, Any]) -> str | None:
        if hello.get("token") != "s3cret":
            raise AuthenticationFailed("bad token")
        return None  # the token is right: the requested name stands


class Token:
    @hookimpl
    async def libchat_client_hello(self, client: libchat.Client, hello: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        hello["token"] = "s3cret"


async def test_client_hello_adds_fields_seen_by_authenticate() -> None:
    async with running_server(plugins=[Gatekeeper()]) as server:
        with pytest.raises(RemoteError) as err:
            await connect(server, "alice")
        assert err.value.remote_code == "auth_failed"
        alice = await connect(server, "alice", plugins=[Token()])
        assert alice.user == "alice"
        await alice.quit()


# -- commands, frame types, limits ------------------------------------------------------


async def _shout(session: libchat.Session, args: str, request: dict[str, Any]) -> None:
    if not args:
        raise NotFound("shout what?")
    session.reply(request, text=args.upper(), room=request.get("room"), user=session.name)


def _count(session: libchat.Session, args: str, request: dict[str, Any]) -> None:
    seen = session.data.setdefault("counter", 0) + 1
    session.data["counter"] = seen
    session.reply(request, text=str(seen))


class Commands:
    @hookimpl
    def libchat_commands(self, server: libchat.Server) -> list[libchat.Command]:
        return [
            libchat.Command("shout", _shout, usage="/shout TEXT", help="say it loud"),
            libchat.Command("Count", _count),
        ]


class Again:
    @hookimpl
    def libchat_commands(self) -> list[libchat.Command]:
        return [libchat.Command("shout", _shout)]


async def test_plugin_command_gets_args_and_replies() -> None:
    async with running_server(plugins=[Commands()]) as server:
        alice = await connect(server, "alice")
        entry = {"name": "shout", "usage": "/shout TEXT", "help": "say it loud"}
        assert entry in alice.welcome["commands"]
        reply = await alice.command("shout", "hello world")
        assert (reply["text"], reply["room"], reply["user"]) == ("HELLO WORLD", "lobby", "alice")
        with pytest.raises(RemoteError) as err:
            await alice.command("shout")
        assert (err.value.remote_code, err.value.message) == ("not_found", "shout what?")
        # sync handler, case-insensitive name, per-session scratch space
        assert (await alice.command("count"))["text"] == "1"
        assert (await alice.command("COUNT"))["text"] == "2"
        bob = await connect(server, "bob")
        assert (await bob.command("count"))["text"] == "1"
        await alice.quit()
        await bob.quit()


class CoreClash:
    @hookimpl
    def libchat_commands(self) -> list[libchat.Command]:
        return [libchat.Command("JOIN", _shout)]


@pytest.mark.parametrize("clash", [Again(), CoreClash()], ids=["plugin", "core"])
async def test_command_registered_twice_is_an_error(clash: Any) -> None:
    server = libchat.Server("127.0.0.1", 0, plugins=[Commands(), clash])
    with pytest.raises(ValueError, match="registered twice"):
        await server.start()
    assert server.sockets == []


async def _upper(session: libchat.Session, frame: Frame) -> None:
    session.reply(frame.header, text=str(frame.header["text"]).upper(), size=len(frame.body))


def _note(session: libchat.Session, frame: Frame) -> None:
    # a plugin frame may also send frames of its own to the client
    session.send({"type": "x.note", "text": str(frame.header.get("text", ""))})


class Frames:
    @hookimpl
    def libchat_frame_handlers(self, server: libchat.Server) -> dict[str, Any]:
        return {"x.upper": _upper, "x.note": _note}


async def test_plugin_frame_type() -> None:
    async with running_server(plugins=[Frames()]) as server:
        alice = await connect(server, "alice")
        reply = await alice.request({"type": "x.upper", "text": "hi"}, b"\x00\xffbody")
        assert (reply["type"], reply["text"], reply["size"]) == ("ok", "HI", 6)
        await alice.send_frame({"type": "x.note", "text": "psst"})
        event = await next_of(alice, libchat.Event, type="x.note")
        assert event.header["text"] == "psst"
        with pytest.raises(RemoteError) as err:
            await alice.request({"type": "x.nosuch"})
        assert err.value.remote_code == "bad_request"
        await alice.quit()


@pytest.mark.parametrize("kind", ["msg", "x.upper"])
async def test_frame_type_registered_twice_is_an_error(kind: str) -> None:
    class Clash:
        @hookimpl
        def libchat_frame_handlers(self) -> dict[str, Any]:
            return {kind: _upper}

    server = libchat.Server("127.0.0.1", 0, plugins=[Frames(), Clash()])
    with pytest.raises(ValueError, match="registered twice"):
        await server.start()


class ClientFrames:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    async def libchat_client_frame(self, client: libchat.Client, event: libchat.Event) -> Any:
        if event.type != "x.note":
            return None
        await asyncio.sleep(0)
        self.seen.append(str(event.header["text"]))
        return True  # consumed: the application never sees it


async def test_client_frame_hook_consumes_plugin_frames() -> None:
    async with running_server(plugins=[Frames()]) as server:
        plugin = ClientFrames()
        alice = await connect(server, "alice", plugins=[plugin])
        await alice.send_frame({"type": "x.note", "text": "for the plugin"})
        # A fence: the server answers in order, and the client's read loop
        # awaits the hook on the note before it reads this reply.
        await alice.request({"type": "x.upper", "text": "fence"})
        assert plugin.seen == ["for the plugin"]
        # Every event queued up to bob's arrival (which came after the note):
        # the consumed note is not among them.
        bob = await connect(server, "bob")
        seen = []
        while True:
            event = await alice.next_event(WAIT)
            seen.append(event.type)
            if isinstance(event, libchat.Presence) and event.user == "bob":
                break
        assert "x.note" not in seen and "presence" in seen
        await alice.quit()
        await bob.quit()


class Limits:
    @hookimpl
    def libchat_limits(self, server: libchat.Server) -> dict[str, Any]:
        return {"max_widgets": 3}


async def test_plugin_limits_in_the_welcome() -> None:
    async with running_server(plugins=[Limits(), Named()]) as server:
        alice = await connect(server, "alice")
        limits = alice.welcome["limits"]
        assert (limits["max_widgets"], limits["shiny"]) == (3, True)
        assert limits["max_message_bytes"] == server.limits.max_message_bytes
        await alice.quit()


# -- command line and client side -------------------------------------------------------


def test_register_commands_adds_click_commands() -> None:
    class Hello:
        @hookimpl
        def libchat_register_commands(self, cli: click.Group) -> None:
            @cli.command()
            @click.argument("name")
            def hello(name: str) -> None:
                """Say hello."""
                click.echo(f"hello {name}")

    group = click.Group("chat")
    pm = make_plugin_manager([Hello(), wordfilter])
    pm.hook.libchat_register_commands(cli=group)
    assert set(group.commands) == {"hello", "wordfilter"}
    runner = CliRunner()
    assert runner.invoke(group, ["hello", "bob"]).output == "hello bob\n"
    result = runner.invoke(group, ["wordfilter", "--words", "darn", "oh darn"])
    assert (result.exit_code, result.output) == (0, "oh ***\n")
    result = runner.invoke(group, ["wordfilter", "--words", "darn", "darn"])
    assert result.exit_code == 1 and "nothing but banned words" in result.output


class Shouty:
    @hookimpl
    def libchat_format_event(self, event: libchat.Event) -> str | None:
        if isinstance(event, libchat.Message):
            return f"<{event.sender}> {event.text.upper()}"
        if isinstance(event, libchat.Notice):
            return f"notice: {event.text}"  # not cleaned here: the renderer does it
        return None


def test_format_event_hook_in_the_renderer() -> None:
    message = libchat.Message("msg", {}, room="lobby", sender="alice", text="hi")
    presence = libchat.Presence("presence", {}, room="lobby", user="bob", event="joined")
    assert format_event(message) == "[lobby] alice: hi"
    pm = make_plugin_manager([Shouty()])
    assert format_event(message, pm) == "<alice> HI"
    assert format_event(presence, pm) == "[lobby] * bob joined"  # None: the core formats
    notice = libchat.Notice("notice", {}, text="\x1b[2Jgotcha")
    assert format_event(notice, pm) == "notice: \\x1b[2Jgotcha"


def test_example_is_importable_by_name_once_on_the_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    monkeypatch.delitem(sys.modules, "libchat_wordfilter", raising=False)
    module = importlib.import_module("libchat_wordfilter")
    assert plugin_names(make_plugin_manager([module])) == ["wordfilter"]


class LocalCommands:
    @hookimpl
    def libchat_client_commands(self) -> list[libchat.ClientCommand]:
        return [libchat.ClientCommand("local", _local, usage="/local TEXT", help="stays here")]


async def _local(terminal: Any, args: str) -> None:
    terminal.out(f"local: {args}")


async def test_client_commands_run_in_the_terminal(server: libchat.Server) -> None:
    from libchat_cli.terminal import Terminal

    client = await connect(server, "alice", plugins=[LocalCommands()])
    out: list[str] = []
    err: list[str] = []
    terminal = Terminal(client, out=out.append, err=err.append)
    try:
        await terminal.handle_line("/local hi there")
        assert (out, err) == (["local: hi there"], [])
    finally:
        await client.quit()


# -- the documentation shows the example's real code --------------------------------


def _worked_example_blocks() -> list[str]:
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = docs.split("## A worked example", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_docs_show_the_whole_example_verbatim() -> None:
    source = EXAMPLE.read_text(encoding="utf-8")
    blocks = _worked_example_blocks()
    assert blocks
    for block in blocks:
        assert block in source, f"docs/plugins.md shows code the example lacks:\n{block}"
    shown = {line for block in blocks for line in block.splitlines()}
    # the prose between the blocks stands in for the "# -- section --" rulers
    missing = [
        line
        for line in source.splitlines()
        if line.strip() and line not in shown and not line.startswith("# -- ")
    ]
    assert not missing, f"docs/plugins.md leaves out lines of the example: {missing}"


def test_a_plugin_failing_to_add_commands_leaves_the_others_working(tmp_path: Path) -> None:
    module = tmp_path / "src" / "libchat_broken.py"
    module.parent.mkdir()
    module.write_text(
        "import libchat\n\n"
        "@libchat.hookimpl\n"
        "def libchat_register_commands(cli):\n"
        "    raise RuntimeError('boom')\n"
    )
    _install_fake(tmp_path, "libchat_broken", "broken = libchat_broken", module)
    result = run_chat("--help", env=_env_with(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "join" in result.stdout
    assert "libchat_broken could not add its commands: boom" in result.stderr
    assert "Traceback" not in result.stderr
