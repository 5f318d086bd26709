#!/usr/bin/python3
"""`stargz-store-helper`: podman's layer-store auth helper, handing credentials to the store.

Podman ≥ 5.2 (containers/image ≥ 5.32) runs the program named by registries.conf's
``additional-layer-store-auth-helper`` before it consults the layer store for an image, with no
arguments, a bare environment and ``{"<image ref>": {"username": …, "password": …,
"identityToken": …}}`` on stdin. This helper passes those bytes to the running store over its
credential socket and exits 0 once the store has taken them (1 otherwise, with one line on
stderr). The store uses them only for that reference's registry host, never for mirrors
(``store/registry/credentials.py``).

The socket: ``/var/lib/stargz-store/store.sock`` (``<--root>/store.sock`` of a store on the
default root, the Go store's place), or the path given as the only argument. The protocol is
ours, not the Go store's gRPC: connect, send the JSON, shut down writing, read one JSON line
``{"ok": true}`` or ``{"error": "…"}``.

Only the standard library: the helper runs wherever podman runs, also inside runtime nodes
whose Python cannot load the store's compiled dependencies. Keep it that way.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

DEFAULT_SOCKET = "/var/lib/stargz-store/store.sock"
TIMEOUT = 10.0
MAX_INPUT = 1 << 20


def send(data: bytes, path: str = DEFAULT_SOCKET, timeout: float = TIMEOUT) -> None:
    """Hand ``data`` to the store at ``path``; raise OSError or ValueError with the reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        _check_listener(sock, path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    try:
        answer = json.loads(reply)
    except ValueError:
        raise ValueError(f"the store answered {reply[:200]!r}") from None
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        error = answer.get("error") if isinstance(answer, dict) else answer
        raise ValueError(f"the store refused the credentials: {error}")


def _check_listener(sock: socket.socket, path: str) -> None:
    """Refuse (:class:`ValueError`) to hand credentials to a listener that runs as neither
    root nor the helper's own user: the store runs as one of them, and anyone else who
    listens on ``path`` (a socket made before the store's, in a directory others can write)
    would collect the registry passwords. The kernel names the listener (``SO_PEERCRED``,
    unix(7))."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (0, os.geteuid()):
        raise ValueError(
            f"the process listening there runs as uid {uid}, neither root nor this user "
            f"({os.geteuid()}): credentials not sent (is it the store? check who owns {path})"
        )


USAGE = (
    "usage: stargz-store-helper [SOCKET]\n\n"
    "podman's additional-layer-store-auth-helper: reads podman's credentials JSON on stdin and\n"
    f"hands it to the running stargz-store over SOCKET (default {DEFAULT_SOCKET}).\n"
    "podman runs it; to try it by hand, pipe the JSON in: echo '{}' | stargz-store-helper\n"
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help", "-help"):
        print(USAGE, end="")
        return 0
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(f"stargz-store-helper: unexpected arguments {args}\n{USAGE}", end="", file=sys.stderr)
        return 2
    path = args[0] if args else DEFAULT_SOCKET
    if sys.stdin.isatty():  # podman always pipes the JSON: waiting on a terminal would hang
        print(f"stargz-store-helper: stdin is a terminal\n{USAGE}", end="", file=sys.stderr)
        return 2
    data = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        print("stargz-store-helper: more than 1 MiB on stdin", file=sys.stderr)
        return 1
    try:
        send(data, path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(
            f"stargz-store-helper: {path}: {exc.strerror}: no store listens there (start "
            "stargz-store; a store with another --root takes --addr with this path)",
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError) as exc:
        print(f"stargz-store-helper: {path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
