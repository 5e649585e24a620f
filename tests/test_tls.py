"""TLS in the core transport and the CLI: certificates made at test time with
trustme, every failure a one-line error, and a server that runs on. Also the
client's refusal to send a password unencrypted beyond loopback."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner

import libchat
from conftest import WAIT, ServerProcess, connect, next_of, run_chat, running_server
from libchat.errors import ConnectionClosed
from libchat.tls import TLSError, client_context, is_loopback, server_context
from libchat_auth.passwords import hash_password
from libchat_auth.store import UserStore
from libchat_cli import cli as chat_cli
from libchat_cli import options


@dataclass
class Certs:
    ca: Path  # the CA clients are told to trust
    server: Path  # key + chain for 127.0.0.1 and localhost, signed by ca
    wrong_name: Path  # key + chain for chat.example.org only, signed by ca
    untrusted_ca: Path  # a CA that signed nothing here


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    paths = Certs(
        ca=folder / "ca.pem",
        server=folder / "server.pem",
        wrong_name=folder / "wrong-name.pem",
        untrusted_ca=folder / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(paths.server)
    )
    ca.issue_cert("chat.example.org").private_key_and_cert_chain_pem.write_to_path(
        str(paths.wrong_name)
    )
    trustme.CA().cert_pem.write_to_path(str(paths.untrusted_ca))
    return paths


def trusting(certs: Certs) -> ssl.SSLContext:
    return client_context(cafile=str(certs.ca))


# -- the contexts ---------------------------------------------------------------------


def test_client_context_verifies_by_default(certs: Certs) -> None:
    plain = client_context()
    assert plain.verify_mode is ssl.CERT_REQUIRED and plain.check_hostname
    assert plain.minimum_version >= ssl.TLSVersion.TLSv1_2
    extra = trusting(certs)
    # --ca-file adds to the system's CAs instead of replacing them.
    assert extra.cert_store_stats()["x509_ca"] == plain.cert_store_stats()["x509_ca"] + 1
    insecure = client_context(verify=False)
    assert insecure.verify_mode is ssl.CERT_NONE and not insecure.check_hostname


def test_context_files_that_cannot_be_used_are_clear_errors(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(TLSError, match=r"cannot read .*missing\.pem"):
        server_context(str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSError, match=r"cannot load the TLS certificate from .*junk\.pem"):
        server_context(str(junk))
    with pytest.raises(TLSError, match="cannot load the TLS certificate"):
        server_context(str(certs.ca))  # a certificate without its key
    with pytest.raises(TLSError, match="cannot load CA certificates"):
        client_context(cafile=str(junk))


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "::1%lo", "localhost", "LocalHost"):
        assert is_loopback(host), host
    for host in ("192.0.2.1", "0.0.0.0", "", "example.org", "localhost.example.org", "::"):
        assert not is_loopback(host), host


def test_only_literal_localhost_counts_not_names_that_may_reach_dns() -> None:
    # *.localhost and the absolute name "localhost." are resolved like any
    # other name (on this host, by DNS): they may point anywhere.
    for host in ("a.localhost", "foo.localhost", "LOCALHOST.", "localhost.", "[localhost]"):
        assert not is_loopback(host), host
    # Not the textual forms of an address that only some resolvers accept.
    for host in ("127.1", "2130706433", "0x7f000001", "127.0.0.1.", " 127.0.0.1"):
        assert not is_loopback(host), host


def test_no_plaintext_password_to_a_dot_localhost_name(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[tuple[Any, ...]] = []

    async def no_network(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError("must not connect")

    monkeypatch.setattr(asyncio, "open_connection", no_network)
    result = CliRunner().invoke(
        chat_cli, ["join", "--host", "foo.localhost", "--user", "alice"],
        env={"CHAT_PASSWORD": "pw"},
    )  # fmt: skip
    assert result.exit_code == 1
    assert "refusing to send a password unencrypted to foo.localhost" in result.output
    assert attempts == []


# -- in process -----------------------------------------------------------------------


async def test_chat_over_tls(certs: Certs) -> None:
    async with running_server(ssl=server_context(str(certs.server))) as server:
        alice = await connect(server, "alice", ssl=trusting(certs))
        bob = await connect(server, "bob", ssl=trusting(certs))
        assert alice.conn.writer.get_extra_info("ssl_object") is not None
        await alice.send("secret plans")
        assert (await next_of(bob, libchat.Message, text="secret plans")).sender == "alice"
        await alice.quit()
        await bob.quit()


async def test_tls_failures_are_clear_and_the_server_runs_on(certs: Certs) -> None:
    async with (
        running_server(ssl=server_context(str(certs.server))) as server,
        running_server(ssl=server_context(str(certs.wrong_name))) as misnamed,
        running_server() as plaintext,
    ):
        with pytest.raises(TLSError) as untrusted:
            await connect(server, "eve", ssl=client_context(cafile=str(certs.untrusted_ca)))
        assert untrusted.value.details["reason"] == "untrusted"
        assert untrusted.value.message.startswith("TLS: the server's certificate is not trusted")

        with pytest.raises(TLSError) as wrong_name:
            await connect(misnamed, "eve", ssl=trusting(certs))
        assert wrong_name.value.details["reason"] == "name_mismatch"
        assert "not valid for the name '127.0.0.1'" in wrong_name.value.message

        with pytest.raises(TLSError) as not_tls:
            await connect(plaintext, "eve", ssl=trusting(certs))
        assert not_tls.value.details["reason"] == "not_tls"
        assert "does not speak TLS" in not_tls.value.message

        with pytest.raises(ConnectionClosed) as plain_to_tls:
            await connect(server, "eve")
        assert plain_to_tls.value.details["stage"] == "hello"
        assert "closed the connection without answering the hello" in plain_to_tls.value.message

        for failure in (untrusted, wrong_name, not_tls, plain_to_tls):
            assert "\n" not in failure.value.message
        # Both servers still serve everyone else.
        for srv, context in ((server, trusting(certs)), (plaintext, None)):
            alice = await connect(srv, "alice", ssl=context)
            bob = await connect(srv, "bob", ssl=context)
            await alice.send("still here")
            await next_of(bob, libchat.Message, text="still here")
            await alice.quit()
            await bob.quit()


async def test_a_silent_client_is_dropped_after_the_tls_handshake_timeout(certs: Certs) -> None:
    limits = libchat.Limits(handshake_timeout=0.3)
    async with running_server(ssl=server_context(str(certs.server)), limits=limits) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        # Never start the TLS handshake: the server must hang up by itself.
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        alice = await connect(server, "alice", ssl=trusting(certs))
        await alice.quit()


# -- the password never travels in clear beyond loopback -----------------------------


def test_password_is_refused_for_plaintext_to_a_remote_host_before_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[tuple[Any, ...]] = []

    async def no_network(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError("must not connect")

    monkeypatch.setattr(asyncio, "open_connection", no_network)
    runner = CliRunner()
    result = runner.invoke(
        chat_cli, ["join", "--host", "192.0.2.1", "--user", "alice"],
        env={"CHAT_PASSWORD": "pw"},
    )  # fmt: skip
    assert result.exit_code == 1
    assert (
        "refusing to send a password unencrypted to 192.0.2.1: use --tls "
        "(or --insecure to send it anyway)" in result.output
    )
    assert attempts == []


def test_the_same_refusal_from_the_real_command() -> None:
    result = run_chat(
        "join", "--host", "192.0.2.1", "--port", "9", "--user", "alice",
        env={"CHAT_PASSWORD": "pw"}, timeout=5,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "Error: refusing to send a password unencrypted to 192.0.2.1: use --tls "
        "(or --insecure to send it anyway)\n"
    )


def test_insecure_allows_plaintext_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    hellos: list[Any] = []

    async def fake_open_client(host: str, port: int, **kwargs: Any) -> Any:
        hellos.append((host, kwargs.get("hello"), kwargs.get("ssl")))
        raise ConnectionClosed("cannot connect (test)")

    monkeypatch.setattr(libchat, "open_client", fake_open_client)
    result = CliRunner().invoke(
        chat_cli, ["join", "--host", "192.0.2.1", "--user", "alice", "--insecure"],
        env={"CHAT_PASSWORD": "pw"},
    )  # fmt: skip
    assert "warning: --insecure: your password goes to 192.0.2.1 unencrypted" in result.output
    assert hellos == [("192.0.2.1", {"password": "pw"}, None)]
    assert result.exit_code == 1


def test_connect_kwargs() -> None:
    secure = options.connect_kwargs("chat.example.org", options.Security(tls=True), "pw")
    assert isinstance(secure["ssl"], ssl.SSLContext)
    assert secure["ssl"].verify_mode is ssl.CERT_REQUIRED
    assert secure["server_hostname"] == "chat.example.org"
    assert secure["hello"] == {"password": "pw"}
    assert options.connect_kwargs("127.0.0.1", options.Security(), None) == {}
    # Loopback needs no TLS for a password; a remote host does.
    options.check_password_transport("127.0.0.1", options.Security())
    options.check_password_transport("chat.example.org", options.Security(ca_file="ca.pem"))
    with pytest.raises(Exception, match="refusing"):
        options.check_password_transport("chat.example.org", options.Security())


# -- the real commands ----------------------------------------------------------------


@pytest.fixture
def tls_server(certs: Certs) -> Iterator[ServerProcess]:
    proc = ServerProcess("--tls-cert", str(certs.server))
    try:
        yield proc
    finally:
        proc.stop()


def join(port: int, *args: str, input: str = "", **env: str) -> Any:
    return run_chat("join", "--port", str(port), "--user", "carol", *args, input=input, env=env)


async def test_join_with_tls_and_a_ca_file(tls_server: ServerProcess, certs: Certs) -> None:
    bob = await libchat.open_client("127.0.0.1", tls_server.port, user="bob", ssl=trusting(certs))
    result = await asyncio.to_thread(
        join, tls_server.port, "--tls", "--ca-file", str(certs.ca), input="over tls\n"
    )
    assert result.returncode == 0, result.stderr
    assert (await next_of(bob, libchat.Message, text="over tls")).sender == "carol"
    await bob.quit()


def test_join_tls_failures_are_one_line_and_the_server_runs_on(
    tls_server: ServerProcess, certs: Certs
) -> None:
    port = tls_server.port
    untrusted = join(port, "--tls")
    assert untrusted.returncode == 1
    assert untrusted.stderr.startswith("Error: TLS: the server's certificate is not trusted")
    assert "--ca-file" in untrusted.stderr and untrusted.stderr.count("\n") == 1

    plaintext = join(port)
    assert plaintext.returncode == 1
    assert plaintext.stderr.count("\n") == 1
    assert plaintext.stderr.rstrip().endswith("if the server uses TLS, add --tls")

    insecure = join(port, "--tls", "--insecure", input="unverified\n")
    assert insecure.returncode == 0, insecure.stderr
    assert "warning: --insecure: the server's certificate is not verified" in insecure.stderr

    good = join(port, "--ca-file", str(certs.ca), input="fine\n")  # --ca-file implies --tls
    assert good.returncode == 0, good.stderr
    assert tls_server.proc.poll() is None


def test_join_checks_the_host_name(certs: Certs) -> None:
    proc = ServerProcess("--tls-cert", str(certs.wrong_name))
    try:
        result = join(proc.port, "--tls", "--ca-file", str(certs.ca))
    finally:
        proc.stop()
    assert result.returncode == 1
    assert result.stderr == (
        "Error: TLS: the server's certificate is not valid for the name '127.0.0.1'\n"
    )


def test_join_with_tls_to_a_plaintext_server(chat_server: ServerProcess, certs: Certs) -> None:
    result = join(chat_server.port, "--tls", "--ca-file", str(certs.ca))
    assert result.returncode == 1
    assert result.stderr.startswith("Error: TLS: the server at 127.0.0.1 does not speak TLS")
    assert result.stderr.rstrip().endswith("leave out --tls")
    ok = join(chat_server.port, input="hi\n")
    assert ok.returncode == 0, ok.stderr


def test_serve_refuses_unusable_tls_files(tmp_path: Path, certs: Certs) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("nope\n")
    result = run_chat("serve", "--port", "0", "--tls-cert", str(junk))
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot load the TLS certificate from")
    lonely = run_chat("serve", "--port", "0", "--tls-key", str(certs.server))
    assert lonely.returncode == 2 and "--tls-key needs --tls-cert" in lonely.stderr


async def test_auth_over_tls_end_to_end(tmp_path: Path, certs: Certs) -> None:
    db = tmp_path / "users.db"
    store = UserStore(db)
    store.add("carol", hash_password("carol-pw", 4))
    store.add("dan", hash_password("dan-pw", 4))
    store.close()
    proc = ServerProcess(
        "--plugins", "auth", "--db", str(db), "--tls-cert", str(certs.server),
        env={"CHAT_BCRYPT_ROUNDS": "4"},
    )  # fmt: skip
    try:
        dan = await libchat.open_client(
            "127.0.0.1", proc.port, user="dan", ssl=trusting(certs), hello={"password": "dan-pw"}
        )
        result = await asyncio.to_thread(
            join, proc.port, "--ca-file", str(certs.ca), input="hi dan\n", CHAT_PASSWORD="carol-pw"
        )
        assert result.returncode == 0, result.stderr
        assert (await next_of(dan, libchat.Message, text="hi dan")).sender == "carol"
        await dan.quit()
        wrong = await asyncio.to_thread(
            join, proc.port, "--ca-file", str(certs.ca), CHAT_PASSWORD="nope"
        )
        assert wrong.returncode == 1 and wrong.stderr == "Error: authentication failed\n"
    finally:
        proc.stop()
    # No warning about plaintext passwords: this server has TLS.
    assert not any("without TLS" in line for line in proc.lines)
