"""One node against two sharing their rooms through Redis, on the same load.

    python benchmarks/redis_bench.py                    # 3 runs of each (about 3 minutes)
    python benchmarks/redis_bench.py --runs 1 --messages 500 --json out.json

Three setups, measured in the same run, each figure the median of ``--runs``:

* ``local``: one ``chat serve``, its in-memory hub (no Redis);
* ``1 node``: one ``chat serve --hub redis://...``: what the hub costs a node;
* ``2 nodes``: two ``chat serve --hub`` on one Redis and cluster. Clients
  alternate between them (senders too), so every message reaches half the
  room through Redis.

The load is ``chat bench``'s engine (libchat_cli.bench): N clients in one
room, S of them sending M stamped messages each, flow-controlled; every
receiver counts loss, doubles and order, and times each delivery. Besides
deliveries per second and latency, the table gives the CPU time each process
(the nodes, redis-server, the load generator) used per million deliveries:
on a small machine that, more than anything, says what limits scaling.
Loopback only; every wait is bounded; everything started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Server as Process  # noqa: E402  (the harness of benchmarks/run.py)

from libchat_cli.bench import (  # noqa: E402
    BenchConfig,
    BenchResult,
    LibchatAdapter,
    Welcome,
    Worker,
)

FLAGS = ("--max-per-address", "0", "--rate-limit", "0", "--max-connections", "20000",
         "--log-level", "warning")  # fmt: skip
SETUPS = ("local", "1 node", "2 nodes")


# -- processes ---------------------------------------------------------------------------


def chat_executable() -> str:
    return shutil.which("chat", path=str(Path(sys.executable).parent)) or "chat"


def redis_process(workdir: Path) -> Process:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(server, os.X_OK):
        raise SystemExit("redis-server is missing: apt-get install redis-server")
    return Process(
        "redis",
        LibchatAdapter(),
        lambda port, _dir: [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        workdir=workdir,
    )


def node_process(name: str, workdir: Path, hub: str | None, cluster: str) -> Process:
    chat = chat_executable()
    extra = ["--hub", hub, "--cluster", cluster] if hub else []
    return Process(
        name,
        LibchatAdapter(),
        lambda port, _dir: [chat, "serve", "--port", str(port), *FLAGS, *extra],
        workdir=workdir,
    )


# -- a load generator whose clients alternate between nodes --------------------------------


class SplitWorker(Worker):
    """chat bench's worker, with client i connected to ``ports[i % len(ports)]``."""

    def __init__(self, *args: Any, ports: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ports = ports

    async def connect_all(self) -> tuple[list[float], Welcome]:
        base = self.config
        times: list[float] = []
        welcome: Welcome | None = None
        gate = asyncio.Semaphore(base.connect_concurrency)

        async def one(index: int) -> tuple[float, Welcome]:
            async with gate:
                started = time.perf_counter()
                client, got = await self._connect(index)
                self.clients.append(client)
                return time.perf_counter() - started, got

        try:
            # One node at a time: the connect code reads the port from the config.
            for k, port in enumerate(self.ports):
                self.config = replace(base, port=port)
                mine = [i for i in base.indices(self.id) if i % len(self.ports) == k]
                for took, got in await asyncio.gather(*(one(i) for i in mine)):
                    times.append(took)
                    welcome = welcome or got
        finally:
            self.config = base
        self.clients.sort(key=lambda c: c.index)
        assert welcome is not None
        return times, welcome


@dataclass
class Marks:
    """CPU seconds of each process when every client was in the room."""

    procs: list[Process]
    start: dict[str, float] | None = None
    summary: dict[str, Any] | None = None

    async def connected(self, summary: dict[str, Any]) -> bool:
        self.summary = summary
        # In a thread: the clients must go on reading meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, self._settle)
        return True

    def _settle(self) -> None:
        for proc in self.procs:
            proc.settle(10.0)  # the join broadcasts are out
        self.start = {p.name: p.cpu_seconds() for p in self.procs}

    def used(self) -> dict[str, float]:
        assert self.start is not None
        return {p.name: p.cpu_seconds() - self.start[p.name] for p in self.procs}


def measure(config: BenchConfig, ports: list[int], procs: list[Process]) -> dict[str, Any]:
    """One run of the load against ``ports``; its figures."""
    config = replace(config, port=ports[0], tag=os.urandom(2).hex())
    progress = multiprocessing.RawArray("q", config.senders)
    sent = multiprocessing.RawArray("q", 2 * config.senders)
    marks = Marks(procs)

    async def main() -> dict[str, Any]:
        worker = SplitWorker(config, LibchatAdapter(), 0, progress, sent, ports=ports)
        return await worker.run(marks)

    part = asyncio.run(main())
    cpu = marks.used()
    result = BenchResult.merge(config, "libchat", marks.summary or {}, [part])
    millions = max(result.deliveries, 1) / 1e6
    nodes_cpu = sum(v for k, v in cpu.items() if k.startswith("node"))
    return {
        "deliveries_per_second": result.deliveries_per_second,
        "latency_ms": result.latency_ms,
        "deliveries": result.deliveries,
        "expected": result.expected,
        "lost": result.lost,
        "doubled": result.doubled,
        "out_of_order": result.out_of_order,
        "disconnected": sum(result.dropped.values()),
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "nodes_cpu_per_million": nodes_cpu / millions,
        "redis_cpu_per_million": cpu.get("redis", 0.0) / millions,
        "generator_cpu_per_million": result.generator_cpu / millions,
    }


def run_setup(
    setup: str, config: BenchConfig, workdir: Path, redis_url: str, redis: Process
) -> dict[str, Any]:
    cluster = "bench" + os.urandom(3).hex()
    count = 2 if setup == "2 nodes" else 1
    hub = None if setup == "local" else redis_url
    nodes = [node_process(f"node{i}", workdir, hub, cluster) for i in range(count)]
    try:
        for proc in nodes:
            proc.start()
        watched = nodes + ([redis] if hub else [])
        return measure(config, [n.port for n in nodes], watched)
    finally:
        for proc in nodes:
            proc.stop()


def load_name(rate: float) -> str:
    return "max" if not rate else f"{rate:g}/s"


# -- the report ------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(get: Any) -> float:
        return statistics.median(get(r) for r in runs)

    return {
        "deliveries_per_second": med(lambda r: r["deliveries_per_second"]),
        "p50_ms": med(lambda r: r["latency_ms"]["p50"]),
        "p99_ms": med(lambda r: r["latency_ms"]["p99"]),
        "max_ms": med(lambda r: r["latency_ms"]["max"]),
        "lost": sum(r["lost"] for r in runs),
        "doubled": sum(r["doubled"] for r in runs),
        "out_of_order": sum(r["out_of_order"] for r in runs),
        "disconnected": sum(r["disconnected"] for r in runs),
        "nodes_cpu_per_million": med(lambda r: r["nodes_cpu_per_million"]),
        "redis_cpu_per_million": med(lambda r: r["redis_cpu_per_million"]),
        "generator_cpu_per_million": med(lambda r: r["generator_cpu_per_million"]),
    }


def table(medians: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'setup and load':<18} {'deliveries/s':>13} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'lost':>5} {'dbl':>4} {'ooo':>4} {'nodes CPU':>10} {'redis CPU':>10} {'gen CPU':>8}"
    ]
    for setup, m in medians.items():
        lines.append(
            f"{setup:<18} {m['deliveries_per_second']:>13,.0f} {m['p50_ms']:>7.2f} "
            f"{m['p99_ms']:>7.2f} {m['max_ms']:>7.2f} {m['lost']:>5} {m['doubled']:>4} "
            f"{m['out_of_order']:>4} {m['nodes_cpu_per_million']:>10.2f} "
            f"{m['redis_cpu_per_million']:>10.2f} {m['generator_cpu_per_million']:>8.2f}"
        )
    lines.append(
        "CPU: seconds per million deliveries, of all the nodes together, redis-server, and "
        "the load generator"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--messages", type=int, default=3000, help="per sender")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--rates",
        default="0,2000",
        help="comma-separated messages/s in all, one load each; 0: as fast as the nodes "
        "take them (throughput), a rate: latency at a steady load",
    )
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated")
    parser.add_argument("--json", dest="json_out", default=None, metavar="PATH")
    args = parser.parse_args()
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = set(setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}; known: {', '.join(SETUPS)}")
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    base = BenchConfig(
        clients=args.clients,
        senders=args.senders,
        messages=args.messages,
        size=args.size,
        drain_timeout=5.0,
        max_time=120.0,
    )
    loads = {load_name(rate): replace(base, rate=rate) for rate in rates}
    workdir = Path(tempfile.mkdtemp(prefix="redis-bench-"))
    redis = redis_process(workdir)
    redis.start()
    runs: dict[str, list[dict[str, Any]]] = {
        f"{setup} {load}": [] for load in loads for setup in setups
    }
    try:
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        print(
            f"{base.clients} clients in one room, {base.senders} sending {base.messages} "
            f"messages of {base.size} bytes each; loads: {', '.join(loads)}; {args.runs} runs "
            f"each; {os.cpu_count()} cores, Python {platform.python_version()}",
            flush=True,
        )
        for run in range(args.runs):
            for load, config in loads.items():
                # Setups interleaved: drift on a shared machine hits all alike.
                for setup in setups:
                    figures = run_setup(setup, config, workdir, redis_url, redis)
                    runs[f"{setup} {load}"].append(figures)
                    print(
                        f"run {run + 1} {setup:<8} {load:<10} "
                        f"{figures['deliveries_per_second']:>11,.0f}/s "
                        f"p99 {figures['latency_ms']['p99']:.2f} ms cpu {figures['cpu_seconds']} "
                        f"lost {figures['lost']}",
                        flush=True,
                    )
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: median_of(r) for name, r in runs.items()}
    print()
    print(table(medians))
    if args.json_out:
        out = {"config": vars(args), "cores": os.cpu_count(), "runs": runs, "medians": medians}
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwritten: {args.json_out}")
    clean = all(m["lost"] == m["doubled"] == m["out_of_order"] == 0 for m in medians.values())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
