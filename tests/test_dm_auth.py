"""dm with the real auth plugin: a private message to an offline account is
kept in the --db file and delivered at the account's next login, in order,
once. Driven through the real `chat` commands."""

from __future__ import annotations

from pathlib import Path

import libchat
from conftest import ServerProcess, connect, next_of, run_chat, running_server

ENV = {"CHAT_BCRYPT_ROUNDS": "4"}


def test_offline_account_gets_its_private_messages_at_next_login(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    for name in ("alice", "bob"):
        added = run_chat(
            "user", "add", name, "--db", str(db), env={**ENV, "CHAT_PASSWORD": "pw-" + name}
        )
        assert added.returncode == 0, added.stderr
    server = ServerProcess("--plugins", "auth,dm", "--db", str(db), "--bcrypt-rounds", "4")
    try:
        port = str(server.port)
        alice = run_chat(
            "join", "--user", "alice", "--port", port,
            input="/msg bob first\n/msg bob second\n/msg nobody hi\nquit\n",
            env={**ENV, "CHAT_PASSWORD": "pw-alice"},
        )  # fmt: skip
        assert alice.returncode == 0, alice.stderr
        assert "nobody" in alice.stderr  # not an account: an error naming the user
        bob = run_chat(
            "join", "--user", "bob", "--port", port, input="quit\n",
            env={**ENV, "CHAT_PASSWORD": "pw-bob"},
        )  # fmt: skip
        assert bob.returncode == 0, bob.stderr
        private = [line for line in bob.stdout.splitlines() if line.startswith("[private]")]
        assert private == ["[private] alice -> bob: first", "[private] alice -> bob: second"]
        again = run_chat(
            "join", "--user", "bob", "--port", port, input="quit\n",
            env={**ENV, "CHAT_PASSWORD": "pw-bob"},
        )  # fmt: skip
        assert "[private]" not in again.stdout  # delivered exactly once
    finally:
        assert server.stop() == 0


async def test_account_exists_answers_from_the_user_store(tmp_path: Path) -> None:
    from libchat_auth.passwords import hash_password
    from libchat_auth.store import UserStore

    store = UserStore(tmp_path / "users.db")
    store.add("Bob", hash_password("pw", 4))
    store.close()
    config = {"db": str(tmp_path / "users.db"), "bcrypt_rounds": 4}
    async with running_server(plugins=["auth", "dm"], config=config) as server:
        hook = server.pm.hook.libchat_account_exists
        from libchat.plugins import call_firstresult

        assert await call_firstresult(hook, server=server, name="bob") is True
        assert await call_firstresult(hook, server=server, name="carol") is False
        alice_absent = await call_firstresult(hook, server=server, name="alice")
        assert alice_absent is False
        bob = await connect(server, "bob", hello={"password": "pw"})
        assert bob.user == "Bob"
        await next_of(bob, libchat.Presence, user="Bob")
        await bob.quit()
