"""The link probe server: ``python -m harness.netshape.probe --port P`` (client: .measure).

Protocol: the client sends an 8-byte big-endian byte count; the server answers with that many
bytes and closes. A count of 0 makes a connection that only measures the handshake (one RTT).
The server prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import socket
import struct
import threading

_BLOCK = b"\x5a" * (1 << 20)


def serve(host: str, port: int) -> None:
    """Serve probe requests forever (each connection in a thread)."""
    srv = socket.create_server((host, port), reuse_port=False, backlog=64)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_answer, args=(conn,), daemon=True).start()


def _answer(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(60)
        head = b""
        while len(head) < 8:
            chunk = conn.recv(8 - len(head))
            if not chunk:
                return
            head += chunk
        (remaining,) = struct.unpack(">Q", head)
        view = memoryview(_BLOCK)
        while remaining > 0:
            n = min(remaining, len(view))
            conn.sendall(view[:n])
            remaining -= n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="link probe server")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.host, args.port)  # until SIGTERM/SIGINT ends the process
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
