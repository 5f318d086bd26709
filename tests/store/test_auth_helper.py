"""The layer-store auth helper and the store's credential socket, without podman."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from store import helper
from store.credsocket import serve_credentials
from store.registry.credentials import Credentials, CredentialStore
from store.registry.errors import ConfigError

PODMAN_INPUT = {
    "127.0.0.1:5000/auth/img:1": {"username": "alice", "password": "s3cret"},
    "reg.example/org/app@sha256:" + "a" * 64: {"identityToken": "refresh-me"},
}


def test_given_credentials_are_for_their_registry_and_repository_only() -> None:
    creds = CredentialStore(auth_files=[])
    assert creds.add_for_references(PODMAN_INPUT) == list(PODMAN_INPUT)
    assert creds.lookup("127.0.0.1:5000", "auth/img") == Credentials("alice", "s3cret")
    assert creds.lookup("reg.example", "org/app") == Credentials("", "", "refresh-me")
    # Not another repository, not another host, never a mirror of the same name.
    assert creds.lookup("127.0.0.1:5000", "other/img") is None
    assert creds.lookup("127.0.0.1:5001", "auth/img") is None
    assert creds.lookup("127.0.0.1:5000", "auth/img", origin=False) is None


@pytest.mark.parametrize(
    "bad",
    [[], {"x/y:1": "alice"}, {"x/y:1": {"username": 1}}, {"NOT A REF": {}}],
)
def test_malformed_helper_input_is_refused_whole(bad: object) -> None:
    creds = CredentialStore(auth_files=[])
    with pytest.raises(ConfigError):
        creds.add_for_references(bad)
    assert creds.lookup("x", "y") is None


def _serve_then(tmp_path: Path, client) -> tuple[CredentialStore, object]:  # type: ignore[no-untyped-def]
    creds = CredentialStore(auth_files=[])
    path = tmp_path / "store.sock"
    out: list[object] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            assert await nursery.start(serve_credentials, path, creds) == path
            assert (os.stat(path).st_mode & 0o777) == 0o600
            out.append(await trio.to_thread.run_sync(client, str(path)))
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not path.exists()  # removed when the store stops
    return creds, out[0]


def test_helper_hands_podman_input_to_the_store(tmp_path: Path) -> None:
    def run_helper(path: str) -> subprocess.CompletedProcess[bytes]:
        # As podman runs it: no environment, the JSON on stdin (the path only because the
        # test's store is not on the default root).
        return subprocess.run(
            [sys.executable, "-I", helper.__file__, path],
            input=json.dumps(PODMAN_INPUT).encode(),
            env={},
            capture_output=True,
            timeout=30,
        )

    creds, proc = _serve_then(tmp_path, run_helper)
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    assert creds.lookup("127.0.0.1:5000", "auth/img") == Credentials("alice", "s3cret")


def test_helper_reports_a_refusal_and_a_missing_store(tmp_path: Path) -> None:
    _, err = _serve_then(tmp_path, lambda p: _error(lambda: helper.send(b"[1]", p)))
    assert "refused" in str(err)
    with pytest.raises(OSError):
        helper.send(b"{}", str(tmp_path / "nothing.sock"))


def test_a_missing_store_says_what_to_start(tmp_path: Path, monkeypatch, capsys) -> None:
    import io
    import sys

    stdin = io.TextIOWrapper(io.BytesIO(b"{}"))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert helper.main([str(tmp_path / "nothing.sock")]) == 1
    err = capsys.readouterr().err
    assert "No such file or directory: no store listens there (start stargz-store" in err


def _error(fn) -> BaseException | None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except (OSError, ValueError) as exc:
        return exc
    return None


def test_the_socket_path_can_be_given_as_the_go_store_takes_it() -> None:
    from store.cli import build_parser

    args = build_parser().parse_args(["--addr", "/run/x.sock", "/mnt"])
    assert args.addr == Path("/run/x.sock")
    assert build_parser().parse_args(["/mnt"]).addr is None  # <root>/store.sock


def test_helper_help_and_a_terminal_on_stdin_never_wait_for_input() -> None:
    """``--help`` prints the usage; run by hand at a terminal (podman always pipes the JSON)
    it says so instead of waiting on stdin for ever."""
    import pty

    run = [sys.executable, "-I", helper.__file__]
    proc = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "usage: stargz-store-helper [SOCKET]" in proc.stdout
    proc = subprocess.run([*run, "-x"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unexpected arguments" in proc.stderr
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(run, stdin=secondary, capture_output=True, text=True, timeout=30)
    finally:
        os.close(primary)
        os.close(secondary)
    assert proc.returncode == 2 and "stdin is a terminal" in proc.stderr


def test_the_go_stores_grpc_helper_is_named_and_closed_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The Go store's helper opens with HTTP/2's preface and waits for our SETTINGS: it used
    to wait out its handshake timeout while we waited 10 s for its end of input."""
    import socket
    import time

    from store.credsocket import GRPC_CLIENT, HTTP2_PREFACE

    def grpc_client(path: str) -> tuple[bytes, float]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            start = time.monotonic()
            sock.sendall(HTTP2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS
            return sock.recv(100), time.monotonic() - start

    creds, (answer, took) = _serve_then(tmp_path, grpc_client)  # type: ignore[misc]
    assert answer == b"" and took < 2  # closed, not a JSON line after the 10 s timeout
    assert GRPC_CLIENT in caplog.text
    assert creds.lookup("127.0.0.1:5000", "auth/img") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="starts a listener as another user")
def test_credentials_go_to_no_listener_of_another_user(tmp_path: Path) -> None:
    """Whoever listens on the helper's socket path first gets what podman hands the helper:
    one who runs as neither root nor the helper's user (a socket made in a directory others
    can write, before the store's) is refused before a byte is sent."""
    import shutil
    import tempfile

    # Not under tmp_path: pytest's base directory is root's only.
    shared = Path(tempfile.mkdtemp(prefix="lazybench-helper-", dir="/tmp"))
    shared.chmod(0o777)
    path = shared / "store.sock"
    listener = subprocess.Popen(
        [
            "/usr/bin/python3",  # the test's virtualenv may lie where that user cannot go
            "-I",
            "-c",
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
            "print('ready', flush=True)\n"
            "c, _ = s.accept(); c.settimeout(10)\n"
            "got = b''\n"
            "while (piece := c.recv(65536)): got += piece\n"
            "print(len(got), flush=True)\n",
            str(path),
        ],
        user=65534,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "ready\n"
        with pytest.raises(ValueError, match="runs as uid 65534, neither root nor this user"):
            helper.send(json.dumps(PODMAN_INPUT).encode(), str(path))
        assert listener.stdout.readline() == "0\n"  # not a byte of the credentials
    finally:
        listener.kill()
        listener.wait(timeout=10)
        shutil.rmtree(shared)
