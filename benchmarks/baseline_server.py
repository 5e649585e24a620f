"""The thread-per-client baseline, written the way the original course project is.

One thread per client on a blocking socket; every chunk of complete lines a
client sends is passed on with ``sendall`` to every other client, under one
lock. The protocol is lines of text: a client's first line is its name; the
server answers ``welcome NAME`` (and, like the course project, announces
nothing else: no joins or leaves, so its connection figures carry none of
the join broadcast that libchat and ngircd send to the room).

One deliberate difference from a typical course project: a chunk is cut at
its last newline and the rest kept for the next read, so that a line split
by TCP is never interleaved with another sender's (the benchmark would count
such lines as lost, which would measure a bug rather than the design).

    python benchmarks/baseline_server.py --port 0    # prints "listening on HOST:PORT"
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading

clients: dict[socket.socket, str] = {}
lock = threading.Lock()


def broadcast(data: bytes, sender: socket.socket | None) -> None:
    """Send ``data`` to every client but ``sender``. Holding the lock keeps
    two senders' lines from mixing on one socket, and also means one slow
    reader stalls everyone: the weakness this design is known for."""
    with lock:
        for conn in list(clients):
            if conn is sender:
                continue
            with contextlib.suppress(OSError):  # a dead client is dropped by its own thread
                conn.sendall(data)


def read_name(conn: socket.socket) -> tuple[str, bytes]:
    buffer = b""
    while b"\n" not in buffer:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("closed before saying its name")
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return line.decode(errors="replace").strip() or "anonymous", rest


def serve_client(conn: socket.socket) -> None:
    try:
        name, buffer = read_name(conn)
        with lock:
            clients[conn] = name
            conn.sendall(f"welcome {name}\n".encode())
        while True:
            if b"\n" in buffer:
                cut = buffer.rfind(b"\n") + 1
                broadcast(buffer[:cut], conn)
                buffer = buffer[cut:]
            chunk = conn.recv(4096)
            if not chunk:
                break
            buffer += chunk
    except OSError:
        pass
    finally:
        with lock:
            clients.pop(conn, None)
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12346)
    args = parser.parse_args()
    server = socket.create_server((args.host, args.port), backlog=128)
    host, port = server.getsockname()[:2]
    print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _addr = server.accept()
        threading.Thread(target=serve_client, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
