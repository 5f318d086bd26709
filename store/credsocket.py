"""The store's credential socket: where ``stargz-store-helper`` hands over podman's credentials.

``<root>/store.sock`` (``/var/lib/stargz-store/store.sock`` on the default ``--root``, the Go
store's place), a Unix stream socket of mode 0600 that also checks its peer is root (or the
store's own user) by ``SO_PEERCRED``. One request per connection: the helper sends podman's
``{"<image ref>": {"username", "password", "identityToken"}}`` and shuts down writing; the
store answers one JSON line, ``{"ok": true}`` or ``{"error": "…"}`` (protocol in
:mod:`store.helper`). The credentials go to :meth:`CredentialStore.add_for_references`, which
uses them for that reference's registry only, never for a mirror. Secrets are never logged.
The Go store's helper (one gRPC call) is recognized by its HTTP/2 preface and refused at
once, with a log line saying which helper podman should run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path

import trio

from store.registry.credentials import CredentialStore
from store.registry.errors import ConfigError

log = logging.getLogger("store.credsocket")

SOCKET_NAME = "store.sock"
MAX_REQUEST = 1 << 20
REQUEST_TIMEOUT = 10.0

# What every HTTP/2 client sends first (RFC 9113 §3.4): the Go store's own helper speaks gRPC
# (``/Controller/AddCredential``), not this socket's protocol. It is recognized, told apart
# and refused at once, so a mixed install is named in the log instead of the Go helper
# waiting out its handshake and podman pulling without the credentials.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GRPC_CLIENT = (
    "a gRPC client connected (the Go stargz-store's stargz-store-helper?): this store speaks "
    "its own protocol; make the additional-layer-store-auth-helper podman runs this "
    "project's stargz-store-helper (`which -a stargz-store-helper` shows which one is first "
    "on PATH)"
)


class _GrpcClient(Exception):
    """The peer opened with the HTTP/2 preface: a gRPC client, answered by closing."""


class SocketPathError(Exception):
    """The credential socket's path holds something the store must not replace."""


def check_socket_path(path: Path) -> None:
    """Whether the store may listen on ``path``: nothing there, or a socket nobody answers
    on (left by a store that stopped). Raises :class:`SocketPathError` for anything else —
    a file or directory (never deleted, unlike the Go store's ``os.RemoveAll``), or the
    socket of a store still running (its helper requests would go to the newcomer)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketPathError(f"credential socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(
            f"credential socket {path}: something else is there (not a socket); the store "
            "replaces only a socket an earlier store left: pick another --addr or remove it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):  # nobody listens: a stale socket
        return
    except OSError as exc:  # EACCES, a timeout on a full backlog: not known to be stale
        raise SocketPathError(
            f"credential socket {path}: cannot tell whether a store listens there "
            f"({exc.strerror or exc}): stop it or remove the socket, or give another --addr"
        ) from None
    finally:
        probe.close()
    raise SocketPathError(
        f"credential socket {path}: a running store listens there (same --root or --addr); "
        "stop it first, or give this store another --root or --addr"
    )


def _peer_uid(sock: trio.socket.SocketType) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


async def _handle(stream: trio.SocketStream, credentials: CredentialStore) -> None:
    async with stream:
        reply: dict[str, object]
        try:
            uid = _peer_uid(stream.socket)
            if uid not in (0, os.getuid()):
                raise ConfigError(f"uid {uid} may not hand credentials to the store")
            data = b""
            with trio.fail_after(REQUEST_TIMEOUT):
                while len(data) <= MAX_REQUEST:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
                    if data.startswith(HTTP2_PREFACE):
                        raise _GrpcClient  # it waits for our SETTINGS, never for EOF
            if len(data) > MAX_REQUEST:
                raise ConfigError("credentials: request larger than 1 MiB")
            try:
                decoded = json.loads(data or b"{}")
            except ValueError:
                raise ConfigError("credentials: not JSON") from None
            refs = credentials.add_for_references(decoded)
            log.info("auth helper: credentials for %s", ", ".join(refs) or "no reference")
            reply = {"ok": True}
        except _GrpcClient:
            log.warning("auth helper: %s", GRPC_CLIENT)
            return  # closed: the gRPC client fails at once, not after its handshake timeout
        except (ConfigError, trio.TooSlowError, OSError) as exc:
            problem = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning("auth helper: %s", problem)
            reply = {"error": problem}
        except Exception as exc:  # e.g. RecursionError from json: never out of the handler,
            # whose nursery is the store's (one bad request must not stop the store)
            problem = f"malformed request ({type(exc).__name__})"  # no text: it may quote secrets
            log.warning("auth helper: %s", problem)
            reply = {"error": problem}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all((json.dumps(reply) + "\n").encode())


async def serve_credentials(
    path: Path,
    credentials: CredentialStore,
    *,
    task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``path`` until cancelled, started with ``nursery.start``; reports ``path``
    once listening, or ``None`` (and returns) when the socket cannot be made — the store
    then serves without it, with the auth files' credentials only (also when ``path`` is not
    free, :func:`check_socket_path`). Removes its socket on exit, not one bound there since."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mine: tuple[int, int] | None = None  # (device, inode) bound: only it is removed on exit
    try:
        check_socket_path(path)
        path.unlink(missing_ok=True)  # a socket left by an earlier store
        old = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old)
        bound = os.lstat(path)
        mine = (bound.st_dev, bound.st_ino)
        os.chmod(path, 0o600)
        sock.listen(16)
    except (OSError, SocketPathError) as exc:
        sock.close()
        log.warning("no credential socket at %s (%s): the auth helper cannot reach us", path, exc)
        task_status.started(None)
        return
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            async with listener:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(_handle, stream, credentials)
    finally:
        with contextlib.suppress(OSError):
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == mine:
                path.unlink()
