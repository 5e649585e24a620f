"""``chat bench``: correctness of its counting, never its timings.

The command runs against a real ``chat serve`` in a subprocess; its counting
(lost, doubled, out of order, stamps cut across reads) is also checked on
bytes alone, since a counter that never sees a fault proves nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, WAIT, ServerProcess, run_chat
from libchat_cli.bench import (
    BenchClient,
    BenchConfig,
    LibchatAdapter,
    Welcome,
    Worker,
    _shared_arrays,
    run_bench,
)

LOAD_TEST = ("--max-per-address", "0", "--rate-limit", "0")


def chat_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``chat bench ARGS`` in a subprocess (through the module itself until
    the command is registered in the ``chat`` group)."""
    from libchat_cli import cli

    if "bench" in cli.commands:
        return run_chat("bench", *args, timeout=60)
    code = "from libchat_cli.bench import bench; bench()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def load_server() -> Iterator[ServerProcess]:
    proc = ServerProcess(*LOAD_TEST)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize(
    "extra",
    [[], ["--processes", "2"], ["--rate", "400"], ["--size", "300", "--window", "3"]],
    ids=["fast", "two-processes", "paced", "small-window"],
)
def test_every_message_arrives_once_and_in_order(
    load_server: ServerProcess, extra: list[str]
) -> None:
    result = chat_bench(
        "--port", str(load_server.port), "--clients", "6", "--senders", "3",
        "--messages", "40", "--json", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sent"] == 3 * 40
    # each message reaches the 5 other members, once, in its sender's order
    assert report["expected"] == report["deliveries"] == 3 * 40 * 5
    assert (report["lost"], report["doubled"], report["out_of_order"]) == (0, 0, 0)
    assert report["disconnected"] == {}
    assert report["server"].startswith("libchat/")
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["max"]


def test_text_report_names_every_figure(load_server: ServerProcess) -> None:
    result = chat_bench("--port", str(load_server.port), "-n", "3", "-s", "1", "-m", "5")
    assert result.returncode == 0, result.stderr
    for word in ("deliveries/s", "lost 0, doubled 0, out of order 0", "p99", "connect",
                 "generator"):  # fmt: skip
        assert word in result.stdout


def test_refused_connections_get_a_hint() -> None:
    server = ServerProcess("--max-per-address", "2", "--rate-limit", "0")
    try:
        result = chat_bench("--port", str(server.port), "--clients", "4", "--messages", "1")
    finally:
        server.stop()
    assert result.returncode != 0
    assert "too_many_connections" in result.stderr
    assert "--max-per-address 0" in result.stderr


def test_rate_limited_server_gets_a_hint() -> None:
    server = ServerProcess()  # the default limit: 50 messages/s per connection
    try:
        result = chat_bench("--port", str(server.port), "-n", "2", "-m", "3", "--json")
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert "--rate-limit 0" in result.stderr
    assert json.loads(result.stdout)["lost"] == 0


def test_no_server_is_a_clear_error() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = chat_bench("--port", str(port), "-n", "2", "-m", "1")
    assert result.returncode == 1
    assert f"nothing listens on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# -- the counting, on bytes alone ------------------------------------------------------


def _frames(tag: str, stamps: list[tuple[int, int]]) -> bytes:
    adapter = LibchatAdapter()
    return b"".join(
        adapter.message("bench", f"BNCH{tag}|{s}|{q}|{1000 + q}|".ljust(64, "x")) for s, q in stamps
    )


async def test_counts_losses_doubles_and_reordering() -> None:
    config = BenchConfig(clients=3, senders=2, messages=6, tag="t1")
    progress, sent = _shared_arrays(config)
    worker = Worker(config, LibchatAdapter(), 0, progress, sent)
    client = BenchClient(worker, 2)
    client.ready.set_result(Welcome(0))
    # sender 0: 4 never comes, 2 comes late and then again; sender 1 in order
    data = _frames("t1", [(0, 0), (1, 0), (0, 1), (0, 3), (1, 1), (0, 2), (0, 2), (0, 5)])
    cut = data.index(b"BNCHt1|0|3|") + 7  # a read that ends inside a stamp
    worker.scan(client, data[:cut])
    for i in range(cut, len(data), 5):  # and the rest in tiny reads
        worker.scan(client, data[i : i + 5])
    assert worker.deliveries == 8
    assert worker.doubled == 1
    assert worker.out_of_order == 1
    assert client.distinct(0) == 5  # 0, 1, 2, 3, 5
    assert client.missing[0] == {4}
    assert client.distinct(1) == 2
    assert worker.counts == [6, 2]
    assert len(worker.latencies) == 8


async def test_a_stamp_of_another_run_is_not_counted() -> None:
    config = BenchConfig(clients=2, senders=1, messages=2, tag="aa")
    progress, sent = _shared_arrays(config)
    worker = Worker(config, LibchatAdapter(), 0, progress, sent)
    client = BenchClient(worker, 1)
    client.ready.set_result(Welcome(0))
    worker.scan(client, _frames("bb", [(0, 0)]) + _frames("aa", [(0, 0)]))
    assert worker.deliveries == 1


# -- the benchmark peers' adapters stay in step with the generator ---------------------


def test_baseline_server_through_its_adapter() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from adapters import LineAdapter
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "baseline_server.py"), "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "listening on HOST:PORT", printed at once
        port = int(line.rsplit(":", 1)[1])
        config = BenchConfig(port=port, clients=5, senders=2, messages=30, max_time=WAIT)
        result = run_bench(config, LineAdapter())
    finally:
        proc.kill()
        proc.wait(WAIT)
    assert result.deliveries == result.expected == 2 * 30 * 4
    assert result.clean


def test_benchmark_script_help() -> None:
    script = Path(ROOT / "benchmarks" / "run.py")
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=WAIT
    )
    assert result.returncode == 0, result.stderr
    assert "--runs" in result.stdout
