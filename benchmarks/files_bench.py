"""File transfer through the relay: throughput and the server's memory.

For each size (100 MiB and 1 GiB by default) a file is generated in a
temporary folder and sent twice on loopback, in the same run:

* libchat: ``chat serve --plugins files`` in a subprocess, a receiver that
  accepts into a folder (the library with ``accept_files``, in a
  subprocess), and the real ``chat send-file`` command;
* a plain socket relay of the same bytes: an asyncio relay that reads 256
  KiB and writes it on, waiting for the write to drain (the same
  backpressure), a blocking-socket sender that hashes the file first, as
  ``chat send-file`` does, and a blocking-socket receiver that writes the
  file and hashes it, as the libchat receiver does.

The figures: MiB/s of the stream (offer to verified file, first byte to
last for the plain relay) and of the whole command (wall time, start-up
and the sender's hashing included), and the relay process's peak RSS
(VmHWM from /proc/PID/status, sampled VmRSS as a check) against its RSS
when idle. Files are deleted afterwards.

    python benchmarks/files_bench.py                 # 100 MiB and 1 GiB
    python benchmarks/files_bench.py --sizes 20M     # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 256 << 10
MiB = 1 << 20
WAIT = 600.0  # seconds: the bound on every wait for one run
LIBCHAT = "libchat relay"
SAME_WORK = "plain, same file work"
BYTES_ONLY = "plain, bytes only"


# -- measuring a process's memory ---------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes (Linux)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemorySampler:
    """Samples a process's VmRSS in a thread; keeps the largest seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.max_rss = max(self.max_rss, proc_status(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return


# -- processes ----------------------------------------------------------------------


def chat_exe() -> str:
    exe = shutil.which("chat", path=os.path.dirname(sys.executable)) or shutil.which("chat")
    if exe is None:
        sys.exit("the chat command is not installed (pip install .)")
    return exe


def start(args: list[str], ready: str) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start a process; wait for a stderr line matching ``ready``."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    pattern = re.compile(ready)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        match = pattern.search(line)
        if match:
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return proc, match
    proc.kill()
    raise RuntimeError(f"{args[:3]} did not start: {''.join(lines)}")


def _drain(stream: Any) -> None:
    for _line in stream:
        pass


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def result_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON object a helper role prints on stdout when it is done."""
    out, _ = proc.communicate(timeout=WAIT)
    return dict(json.loads(out.strip().splitlines()[-1]))


# -- one measured transfer ----------------------------------------------------------


@dataclass
class Run:
    kind: str
    size: int
    wall: float = 0.0
    stream: float = 0.0
    idle_rss: int = 0
    peak_rss: int = 0  # VmHWM of the relay process
    sampled_rss: int = 0
    receiver_peak_rss: int = 0
    relay_cpu: float = 0.0  # CPU seconds the relay process used for the transfer
    ok: bool = False
    notes: list[str] = field(default_factory=list)

    def mib_s(self, seconds: float) -> float:
        return self.size / MiB / seconds if seconds else 0.0


def run_libchat(src: Path, sha: str, work: Path, frame_limit: int) -> Run:
    run = Run(LIBCHAT, src.stat().st_size)
    inbox = work / "inbox"
    server, match = start(
        [chat_exe(), "serve", "--port", "0", "--plugins", "files", "--log-level", "info"],
        r"listening on 127\.0\.0\.1:(\d+)",
    )
    port = match.group(1)
    try:
        run.idle_rss = proc_status(server.pid)["VmRSS"]
        receiver, _ = start(
            [sys.executable, __file__, "_receive", port, str(inbox), str(frame_limit)],
            r"^receiver ready",
        )
        cpu = cpu_seconds(server.pid)
        with MemorySampler(server.pid) as sampler:
            began = time.perf_counter()
            sent = subprocess.run(
                [chat_exe(), "send-file", "-u", "alice", "--to", "bob", str(src), "-p", port],
                capture_output=True,
                text=True,
                timeout=WAIT,
            )
            run.wall = time.perf_counter() - began
            got = result_line(receiver)
        run.relay_cpu = cpu_seconds(server.pid) - cpu
        run.peak_rss = proc_status(server.pid)["VmHWM"]
        run.sampled_rss = sampler.max_rss
        run.stream = got["seconds"]
        run.receiver_peak_rss = got["peak_rss"]
        run.ok = sent.returncode == 0 and got["sha256"] == sha
        if sent.returncode:
            run.notes.append(sent.stderr.strip())
    finally:
        stop(server)
        shutil.rmtree(inbox, ignore_errors=True)
    return run


def run_plain(src: Path, sha: str, work: Path, file_work: bool) -> Run:
    kind = SAME_WORK if file_work else BYTES_ONLY
    run = Run(kind, src.stat().st_size)
    dest = work / "plain.out" if file_work else Path(os.devnull)
    relay, match = start([sys.executable, __file__, "_relay"], r"^relay on (\d+)")
    port = match.group(1)
    try:
        run.idle_rss = proc_status(relay.pid)["VmRSS"]
        receiver, _ = start(
            [sys.executable, __file__, "_plain_receive", port, str(dest), str(run.size)]
            + ([] if file_work else ["--discard"]),
            r"^receiver ready",
        )
        cpu = cpu_seconds(relay.pid)
        with MemorySampler(relay.pid) as sampler:
            began = time.perf_counter()
            subprocess.run(
                [sys.executable, __file__, "_plain_send", port, str(src)]
                + ([] if file_work else ["--no-hash"]),
                check=True,
                timeout=WAIT,
            )
            got = result_line(receiver)
            run.wall = time.perf_counter() - began
        run.relay_cpu = cpu_seconds(relay.pid) - cpu
        run.peak_rss = proc_status(relay.pid)["VmHWM"]
        run.sampled_rss = sampler.max_rss
        run.stream = got["seconds"]
        run.receiver_peak_rss = got["peak_rss"]
        run.ok = got["sha256"] in (sha, "")
    finally:
        stop(relay)
        if file_work:
            dest.unlink(missing_ok=True)
    return run


# -- helper roles (each runs in its own process) ------------------------------------


def role_receive(port: int, inbox: str, frame_limit: int) -> None:
    """bob, accepting every offer into ``inbox``; prints the stream time
    (offer received to file verified) and the hash of what was saved."""
    import libchat
    from libchat_files import files_of

    offered: list[float] = []

    class Clock:
        @libchat.hookimpl
        def libchat_client_frame(self, client: Any, event: Any) -> None:
            if event.type == "file.offer":
                offered.append(time.perf_counter())

    async def main() -> None:
        client = await libchat.open_client(
            "127.0.0.1",
            port,
            user="bob",
            plugins=["files", Clock()],
            options={"accept_files": inbox},
            receive_events=False,
            **({"max_frame_size": frame_limit} if frame_limit else {}),
        )
        print("receiver ready", file=sys.stderr, flush=True)
        incoming = await files_of(client).results.get()
        seconds = time.perf_counter() - offered[0]
        digest = await asyncio.to_thread(_sha256, Path(str(incoming.path))) if incoming.path else ""
        await client.quit()
        peak = proc_status(os.getpid())["VmHWM"]
        print(json.dumps({"seconds": seconds, "sha256": digest, "peak_rss": peak}), flush=True)

    asyncio.run(main())


def role_relay() -> None:
    """A plain asyncio relay: the first connection that sends b"R" receives
    what the one that sends b"S" sends, 256 KiB at a time, with drain."""

    async def main() -> None:
        receiver: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            role = await reader.readexactly(1)
            if role == b"R":
                receiver.set_result(writer)
                return
            out = await receiver
            while data := await reader.read(CHUNK):
                out.write(data)
                await out.drain()
            out.close()
            await out.wait_closed()
            writer.close()
            done.set()

        server = await asyncio.start_server(accept, "127.0.0.1", 0, limit=CHUNK * 2)
        print(f"relay on {server.sockets[0].getsockname()[1]}", file=sys.stderr, flush=True)
        await done.wait()
        await asyncio.sleep(3600)  # stay up to be measured; the runner stops us

    asyncio.run(main())


def role_plain_send(port: int, path: str, pre_hash: bool) -> None:
    if pre_hash:
        _sha256(Path(path))  # the same work as chat send-file before it offers
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as f:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"S")
        while data := f.read(CHUNK):
            sock.sendall(data)


def role_plain_receive(port: int, dest: str, size: int, store: bool) -> None:
    digest = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port)) as sock, open(dest, "wb") as f:
        sock.sendall(b"R")
        print("receiver ready", file=sys.stderr, flush=True)
        got = 0
        began = 0.0
        while got < size:
            data = sock.recv(CHUNK)
            if not data:
                break
            if not got:
                began = time.perf_counter()
            if store:
                f.write(data)
                digest.update(data)
            got += len(data)
        if store:  # as the libchat receiver does before it renames the file
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - began
    peak = proc_status(os.getpid())["VmHWM"]
    digest_hex = digest.hexdigest() if store else ""
    print(json.dumps({"seconds": seconds, "sha256": digest_hex, "peak_rss": peak}))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


# -- the report ---------------------------------------------------------------------


def make_file(path: Path, size: int) -> str:
    """``size`` bytes: a random 4 MiB block repeated, each copy numbered
    (no two chunks alike, and quick to write); returns the SHA-256."""
    block = os.urandom(4 * MiB)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        written = 0
        n = 0
        while written < size:
            piece = (n.to_bytes(8, "big") + block[8:])[: size - written]
            f.write(piece)
            digest.update(piece)
            written += len(piece)
            n += 1
    return digest.hexdigest()


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 100M or 1G")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def human(n: int) -> str:
    if n < MiB:
        return f"{n >> 10} KiB"
    return f"{n / MiB:.0f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.0f} GiB"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(runs: list[Run]) -> None:
    """One line per (size, path): the median rate over the repeats with its
    range, and the highest RSS seen."""
    print(
        f"{'file':>7}  {'path':<22} {'stream MiB/s (range)':>22} {'wall MiB/s':>10} "
        f"{'relay CPU s/GiB':>15} {'relay idle':>10} {'relay peak':>10} {'receiver peak':>13}  ok"
    )
    groups: dict[tuple[int, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.size, run.kind), []).append(run)
    medians: dict[tuple[int, str], float] = {}
    for (size, kind), group in groups.items():
        rates = [r.mib_s(r.stream) for r in group]
        medians[size, kind] = _median(rates)
        spread = f"{medians[size, kind]:.0f} ({min(rates):.0f}-{max(rates):.0f})"
        notes = " ".join(n for r in group for n in r.notes)
        print(
            f"{human(size):>7}  {kind:<22} {spread:>22} "
            f"{_median([r.mib_s(r.wall) for r in group]):>10.0f} "
            f"{_median([r.relay_cpu * (1 << 30) / r.size for r in group]):>15.2f} "
            f"{max(r.idle_rss for r in group) / MiB:>6.1f} MiB "
            f"{max(r.peak_rss for r in group) / MiB:>6.1f} MiB "
            f"{max(r.receiver_peak_rss for r in group) / MiB:>9.1f} MiB  "
            f"{'yes' if all(r.ok for r in group) else 'NO'} {notes}"
        )
    for size in sorted({size for size, _ in groups}):
        ours = medians[size, LIBCHAT]
        print(
            f"{human(size):>7}  libchat / plain relay, median stream rate: "
            f"{ours / medians[size, SAME_WORK]:.0%} (same file work), "
            f"{ours / medians[size, BYTES_ONLY]:.0%} (bytes only)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100M,1G", help="comma-separated sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (median shown)")
    parser.add_argument("--json", action="store_true", help="also print the runs as JSON")
    parser.add_argument(
        "--tmp", default=None, help="where the files go (default: the system's temp folder)"
    )
    parser.add_argument(
        "--receiver-frame-limit",
        type=parse_size,
        default=0,
        help="max_frame_size of the libchat receiver (default: open_client's default)",
    )
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="files-bench-", dir=args.tmp) as tmp:
        work = Path(tmp)
        for size in sizes:
            src = work / f"bench-{size}.bin"
            sha = make_file(src, size)
            for _ in range(args.repeat):
                runs.append(run_libchat(src, sha, work, args.receiver_frame_limit))
                runs.append(run_plain(src, sha, work, file_work=True))
                runs.append(run_plain(src, sha, work, file_work=False))
            src.unlink()
    where = args.tmp or tempfile.gettempdir()
    limit = human(args.receiver_frame_limit) if args.receiver_frame_limit else "default"
    print(
        f"loopback, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, files in {where}, "
        f"receiver max_frame_size {limit}, {args.repeat} runs each"
    )
    report(runs)
    if args.json:
        print(json.dumps([run.__dict__ for run in runs]))


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "_receive":
        role_receive(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    elif role == "_relay":
        role_relay()
    elif role == "_plain_send":
        role_plain_send(int(sys.argv[2]), sys.argv[3], "--no-hash" not in sys.argv)
    elif role == "_plain_receive":
        role_plain_receive(
            int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), "--discard" not in sys.argv
        )
    else:
        main()
