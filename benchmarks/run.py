"""Measure libchat against a thread-per-client baseline and ngircd, on this machine.

    python benchmarks/run.py                 # everything, 3 runs each (a few minutes)
    python benchmarks/run.py --runs 5 --servers libchat,ngircd --scenarios fanout1

Each server is started on a free loopback port for each run and stopped after
it; the same load generator (libchat_cli.bench, with an adapter per server
kind) runs the same scenarios against each. Every figure is the median of
``--runs`` runs. Prints a table with ratios against both peers, writes every
run and the medians as JSON, and says what machine it ran on. Loopback only;
every wait is bounded; it stops by itself.

ngircd is installed with apt-get when missing (root only), and run with its
flood penalties and connection limits off (MaxPenaltyTime = 0,
MaxConnectionsIP = 0), as libchat runs with --rate-limit 0 --max-per-address 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapters import IrcAdapter, LineAdapter  # noqa: E402

from libchat_cli.bench import (  # noqa: E402
    Adapter,
    BenchConfig,
    BenchError,
    BenchResult,
    LibchatAdapter,
    run_bench,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 15.0


# -- servers under test -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {START_TIMEOUT:g} s")


@dataclass
class Server:
    """One server kind: how to start it and which adapter speaks to it."""

    name: str
    adapter: Adapter
    command: Callable[[int, Path], list[str]]
    note: str = ""
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-")))

    def start(self) -> None:
        self.port = free_port()
        log = self.workdir / f"{self.name}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command(self.port, self.workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        wait_listening(self.port, self.proc, log)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()  # nothing to keep: the next run starts a fresh server
        proc.wait(10)

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the server is idle (under 2% of a core for 0.5 s)."""
        deadline = time.monotonic() + timeout
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.cpu_seconds()
            if now - before < 0.01:
                return
            before = now


LIBCHAT_FLAGS = "--max-per-address 0 --rate-limit 0 --max-connections 20000 --log-level warning"


def libchat_server() -> Server:
    chat = shutil.which("chat", path=str(Path(sys.executable).parent)) or "chat"
    return Server(
        "libchat",
        LibchatAdapter(),
        lambda port, _dir: [chat, "serve", "--port", str(port), *LIBCHAT_FLAGS.split()],
        note=f"chat serve {LIBCHAT_FLAGS}",
    )


def baseline_server() -> Server:
    script = str(HERE / "baseline_server.py")
    return Server(
        "baseline",
        LineAdapter(),
        lambda port, _dir: [sys.executable, script, "--port", str(port)],
        note="benchmarks/baseline_server.py: one thread per client, sendall to each",
    )


NGIRCD_CONF = """\
[Global]
    Name = bench.irc
    Info = libchat benchmark peer
    Listen = 127.0.0.1
    Ports = {port}
    PidFile = {dir}/ngircd.pid
    MotdPhrase = bench
[Limits]
    MaxConnections = 0
    MaxConnectionsIP = 0
    MaxJoins = 0
    MaxNickLength = 31
    MaxPenaltyTime = 0
    PingTimeout = 600
    PongTimeout = 600
[Options]
    DNS = no
    Ident = no
    PAM = no
"""


def ngircd_server() -> Server:
    ngircd = ensure_ngircd()

    def command(port: int, workdir: Path) -> list[str]:
        conf = workdir / f"ngircd-{port}.conf"
        conf.write_text(NGIRCD_CONF.format(port=port, dir=workdir))
        return [ngircd, "-n", "-f", str(conf)]

    return Server(
        "ngircd",
        IrcAdapter(),
        command,
        note="ngircd -n, flood penalties off (MaxPenaltyTime = 0), MaxConnectionsIP = 0",
    )


def ensure_ngircd() -> str:
    found = shutil.which("ngircd") or shutil.which("ngircd", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("ngircd is missing: apt-get install ngircd (as root), or --servers")
    print("installing ngircd with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "ngircd"]):
        subprocess.run(args, check=True, env=env, timeout=600, stdout=subprocess.DEVNULL)
    # Debian starts the packaged service where it can; ours run on their own ports.
    found = shutil.which("ngircd", path="/usr/sbin")
    if not found:
        raise RuntimeError("apt-get installed ngircd but it is not in /usr/sbin")
    return found


SERVERS: dict[str, Callable[[], Server]] = {
    "libchat": libchat_server,
    "baseline": baseline_server,
    "ngircd": ngircd_server,
}


# -- scenarios --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    config: BenchConfig
    idle: bool = False
    #: server name -> clients, where a server cannot take the scenario's count in time
    clients_for: dict[str, int] = field(default_factory=dict)


def scenarios(args: argparse.Namespace) -> dict[str, Scenario]:
    scale, jobs = args.scale, args.processes

    def msgs(n: int) -> int:
        return max(1, int(n * scale))

    base = BenchConfig(processes=jobs, drain_timeout=5.0, max_time=120.0)
    idle_n = args.idle_clients
    return {
        "fanout1": Scenario(
            "fanout1",
            "fan-out: 1 sender, 100 receivers, 64-byte messages",
            replace(base, clients=101, senders=1, messages=msgs(20000), size=64),
        ),
        "fanout10": Scenario(
            "fanout10",
            "fan-out: 10 senders, 100 receivers, 64-byte messages",
            replace(base, clients=110, senders=10, messages=msgs(2000), size=64),
        ),
        "latency": Scenario(
            "latency",
            "latency: 200 messages/s in all (10 senders) into a room of 100",
            replace(base, clients=100, senders=10, messages=msgs(60), size=64, rate=200.0),
        ),
        "idle": Scenario(
            "idle",
            f"{idle_n:,} idle connections, then one broadcast to all",
            replace(
                base,
                clients=idle_n,
                senders=1,
                messages=1,
                size=64,
                processes=1,
                sources=tuple(f"127.0.0.{i}" for i in range(1, 9)),
                max_time=300.0,
            ),
            idle=True,
            clients_for={"ngircd": min(idle_n, args.ngircd_idle_clients)},
        ),
    }


def run_once(server: Server, scenario: Scenario) -> dict[str, Any]:
    """Start ``server``, run ``scenario`` against it, stop it; the figures."""
    server.start()
    try:
        time.sleep(0.2)
        rss_start = server.rss_kib()
        marks: dict[str, float] = {}

        def connected(summary: dict[str, Any]) -> None:
            if scenario.idle:
                server.settle()  # the join broadcasts have all gone out
                marks["rss_connected"] = server.rss_kib()
            marks["cpu_start"] = server.cpu_seconds()

        config = replace(scenario.config, host="127.0.0.1", port=server.port)
        if server.name in scenario.clients_for:
            config = replace(config, clients=scenario.clients_for[server.name])
        result = run_bench(config, server.adapter, on_connected=connected)
        cpu = server.cpu_seconds() - marks["cpu_start"]
        figures = figures_of(result, cpu)
        if scenario.idle:
            n = config.clients
            figures["clients"] = n
            figures["rss_start_kib"] = rss_start
            figures["rss_connected_kib"] = marks["rss_connected"]
            figures["rss_per_connection_kib"] = (marks["rss_connected"] - rss_start) / n
        return figures
    finally:
        server.stop()


def figures_of(result: BenchResult, server_cpu: float) -> dict[str, Any]:
    data = result.as_dict()
    figures = {
        "deliveries_per_second": data["deliveries_per_second"],
        "deliveries": data["deliveries"],
        "expected": data["expected"],
        "lost": data["lost"],
        "doubled": data["doubled"],
        "out_of_order": data["out_of_order"],
        "disconnected": sum(data["disconnected"].values()),
        "latency_p50_ms": data["latency_ms"]["p50"],
        "latency_p90_ms": data["latency_ms"]["p90"],
        "latency_p99_ms": data["latency_ms"]["p99"],
        "latency_max_ms": data["latency_ms"]["max"],
        "connect_seconds": data["connect_seconds"],
        "sent_per_second": data["sent_per_second"],
        "server_cpu_seconds": round(server_cpu, 3),
        "server_us_per_delivery": round(server_cpu / result.deliveries * 1e6, 3)
        if result.deliveries
        else None,
        "generator_cpu_per_core": data["generator_cpu_per_core"],
        "warnings": data["warnings"],
    }
    return figures


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if isinstance(value, int | float) and values:
            out[key] = statistics.median(values)
    return out


# -- the report -------------------------------------------------------------------------

#: (scenario, figure, label, unit scale, format, higher is better)
ROWS = [
    ("fanout1", "deliveries_per_second", "fan-out 1x100: deliveries/s", 1e-6, "{:.2f} M", True),
    ("fanout1", "server_us_per_delivery", "  server CPU per delivery", 1, "{:.2f} us", False),
    ("fanout1", "generator_cpu_per_core", "  generator CPU (of a core)", 100, "{:.0f}%", None),
    ("fanout10", "deliveries_per_second", "fan-out 10x100: deliveries/s", 1e-6, "{:.2f} M", True),
    ("fanout10", "server_us_per_delivery", "  server CPU per delivery", 1, "{:.2f} us", False),
    ("fanout10", "generator_cpu_per_core", "  generator CPU (of a core)", 100, "{:.0f}%", None),
    ("latency", "latency_p50_ms", "200 msg/s into 100: p50", 1, "{:.2f} ms", False),
    ("latency", "latency_p99_ms", "  p99", 1, "{:.2f} ms", False),
    ("latency", "latency_max_ms", "  max", 1, "{:.2f} ms", False),
    ("idle", "rss_per_connection_kib", "idle: server RSS per connection", 1, "{:.1f} KiB", False),
    ("idle", "clients", "  clients connected", 1, "{:.0f}", None),
    ("idle", "connect_seconds", "  time to connect all", 1, "{:.1f} s", None),
    ("idle", "deliveries", "  broadcast reached", 1, "{:.0f}", None),
    ("idle", "latency_max_ms", "  broadcast: last delivery", 1, "{:.1f} ms", None),
]


def table(results: dict[str, dict[str, Any]], servers: list[str]) -> str:
    peers = [p for p in ("baseline", "ngircd") if p in servers and p != "libchat"]
    head = f"{'':36}" + "".join(f"{s:>13}" for s in servers)
    if "libchat" in servers:
        head += "".join(f"{'vs ' + p:>13}" for p in peers)
    lines = [head, "-" * len(head)]
    for scenario, key, label, scale, fmt, higher in ROWS:
        if scenario not in results:
            continue
        medians = {s: results[scenario].get(s, {}).get("median", {}).get(key) for s in servers}
        cells = [fmt.format(v * scale) if v is not None else "-" for v in medians.values()]
        line = f"{label:36}" + "".join(f"{c:>13}" for c in cells)
        if "libchat" in servers and higher is not None:
            for peer in peers:
                ours, theirs = medians.get("libchat"), medians.get(peer)
                ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
                line += f"{ratio:>13}"
        lines.append(line)
    lines.append("ratios are libchat / peer: above 1 is better where higher is better")
    lines.append("(deliveries), below 1 is better where lower is better (CPU, ms, KiB).")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ngircd = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        exe = shutil.which("ngircd") or "/usr/sbin/ngircd"
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
        ngircd = out.stdout.splitlines()[0] if out.stdout else ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "ngircd": ngircd,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--servers", default="libchat,baseline,ngircd")
    parser.add_argument("--scenarios", default="fanout1,fanout10,latency,idle")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    parser.add_argument("--processes", type=int, default=1, help="generator processes")
    parser.add_argument("--idle-clients", type=int, default=5000)
    parser.add_argument(
        "--ngircd-idle-clients",
        type=int,
        default=1000,
        help="ngircd's count in the idle scenario: it takes minutes (not CPU) to join "
        "thousands into one channel (1,000 in ~7 s, 2,000 in ~35 s, 3,150 in 13 min here)",
    )
    parser.add_argument("--json-out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    known = scenarios(args)
    for name in chosen:
        if name not in known:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(known)}, files")
    raise_nofile(2 * args.idle_clients + 1000)  # the servers inherit it too
    info = machine()
    print(f"machine: {info['nproc']} cores, {info['cpu_model']}, Python {info['python']}, "
          f"Linux {info['kernel']}; {info['ngircd']}")  # fmt: skip
    made = {name: SERVERS[name]() for name in servers}
    for server in made.values():
        print(f"  {server.name}: {server.note}")
    if "files" in chosen:
        chosen.remove("files")
    print("  file relay throughput: skipped (the files plugin does not exist yet)")
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    for name in chosen:
        scenario = known[name]
        print(f"\n{scenario.title}", flush=True)
        per_server: dict[str, list[dict[str, Any]]] = {s: [] for s in servers}
        for run in range(args.runs):
            for server in made.values():  # interleaved, so drift hits every server alike
                try:
                    figures = run_once(server, scenario)
                except (BenchError, RuntimeError, OSError) as exc:
                    message = exc.message if isinstance(exc, BenchError) else str(exc)
                    figures = {"error": message}
                per_server[server.name].append(figures)
                print(f"  run {run + 1} {server.name:9} {summary_line(figures)}", flush=True)
        results[name] = {
            s: {"runs": runs, "median": median_of([r for r in runs if "error" not in r] or runs)}
            for s, runs in per_server.items()
        }
    print(f"\nmedians of {args.runs} runs ({time.monotonic() - started:.0f} s in all):\n")
    print(table(results, servers))
    out = {
        "machine": info,
        "runs": args.runs,
        "scale": args.scale,
        "generator_processes": args.processes,
        "servers": {s.name: s.note for s in made.values()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": results,
        "skipped": {"files": "the files plugin does not exist yet"},
    }
    Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwritten: {args.json_out}")
    return 0


def summary_line(figures: dict[str, Any]) -> str:
    if "error" in figures:
        return f"error: {figures['error']}"
    text = (
        f"{figures['deliveries_per_second'] / 1e6:.3f} M/s, p50 {figures['latency_p50_ms']:.2f}"
        f" p99 {figures['latency_p99_ms']:.2f} ms, server {figures['server_cpu_seconds']:.2f} s"
        f" CPU, generator {figures['generator_cpu_per_core']:.0%}"
        f", lost {figures['lost']} doubled {figures['doubled']} ooo {figures['out_of_order']}"
    )
    if "rss_per_connection_kib" in figures:
        text += (
            f", RSS {figures['rss_per_connection_kib']:.1f} KiB/conn, connect "
            f"{figures['connect_seconds']:.1f} s, reached {figures['deliveries']}"
        )
    return text


if __name__ == "__main__":
    sys.exit(main())
