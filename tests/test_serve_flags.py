"""Every limit the server enforces can be set from `chat serve`, and what is
set is what the server announces in its welcome."""

from __future__ import annotations

import asyncio

import libchat
from conftest import ServerProcess, run_chat

#: Limits field -> (chat serve flag, a non-default value to set)
FLAGS = {
    "max_frame_size": ("--max-frame-size", 4096),
    "max_message_bytes": ("--max-message", 1000),
    "handshake_timeout": ("--handshake-timeout", 3.5),
    "ping_interval": ("--ping-interval", 7.0),
    "ping_timeout": ("--ping-timeout", 0.0),
    "max_send_queue": ("--max-send-queue", 50_000),
    "rate": ("--rate-limit", 9.0),
    "rate_burst": ("--rate-burst", 11),
    "max_connections": ("--max-connections", 77),
    "max_connections_per_address": ("--max-per-address", 5),
    "max_rooms_per_session": ("--max-rooms-per-session", 3),
    "max_rooms": ("--max-rooms", 123),
}


def test_every_limit_has_a_serve_flag() -> None:
    assert set(libchat.Limits.names()) <= set(FLAGS), "a limit without a chat serve flag"
    help_text = run_chat("serve", "--help").stdout
    for flag, _ in FLAGS.values():
        assert flag in help_text


def test_flags_reach_the_welcome() -> None:
    args = [str(a) for flag, value in FLAGS.values() for a in (flag, value)]
    server = ServerProcess(*args)
    try:

        async def welcome() -> dict[str, object]:
            client = await libchat.open_client("127.0.0.1", server.port, user="alice")
            limits = dict(client.welcome["limits"])
            await client.quit()
            return limits

        announced = asyncio.run(welcome())
        for field, (_, value) in FLAGS.items():
            if field in announced:
                assert announced[field] == value, field
    finally:
        assert server.stop() == 0
