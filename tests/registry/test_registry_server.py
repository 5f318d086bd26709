"""harness.registry_server: the docker-registry fixture process and its access log."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from harness.registry_server import (
    RegistryServer,
    RegistryServerError,
    parse_access_line,
)

DIGEST = "sha256:" + "ab" * 32


def test_parse_access_lines() -> None:
    rec = parse_access_line(
        f'127.0.0.1 - - [27/Nov/2026:22:04:56 +0000] "GET /v2/lib/app/blobs/{DIGEST} HTTP/1.1" '
        '206 4096 "" "lazybench-registry/0.1"'
    )
    assert rec is not None
    assert (rec.method, rec.status, rec.bytes, rec.repo, rec.kind, rec.digest) == (
        "GET",
        206,
        4096,
        "lib/app",
        "blobs",
        DIGEST,
    )
    assert rec.is_blob_get and not rec.is_full_blob_get
    up = parse_access_line(
        '127.0.0.1 - - [x] "PATCH /v2/a/b/blobs/uploads/1234-abcd?_state=zz HTTP/1.1" 202 0 "" ""'
    )
    assert up is not None and (up.repo, up.kind, up.reference, up.digest) == (
        "a/b",
        "blobs/uploads",
        "1234-abcd",
        None,
    )
    man = parse_access_line('::1 - - [x] "HEAD /v2/x/manifests/v1 HTTP/1.1" 200 - "" "curl"')
    assert man is not None and (man.kind, man.reference, man.bytes) == ("manifests", "v1", 0)
    base = parse_access_line('1.2.3.4 - - [x] "GET /v2/ HTTP/1.1" 401 87 "" "x"')
    assert base is not None and base.kind == "base"
    assert parse_access_line('time="..." level=info msg="listening"') is None


def test_warm_reads_the_repository_and_the_blobs_it_is_given(
    fresh_registry: RegistryServer,
) -> None:
    """warm() reads an image's repository files and blobs once (bytes read), skips a blob the
    storage does not hold, and stops at its timeout."""
    reg = fresh_registry
    link = reg.storage_dir / "docker/registry/v2/repositories/lazy/img/_layers/sha256/ab/link"
    link.parent.mkdir(parents=True)
    link.write_text(DIGEST)
    blob = reg.blob_path(DIGEST)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(os.urandom(3 << 20))
    missing = "sha256:" + "cd" * 32
    assert reg.warm("lazy/img", [DIGEST, missing]) == len(DIGEST) + (3 << 20)
    assert reg.warm("lazy/img", [DIGEST], timeout=0) < len(DIGEST) + (3 << 20)


@pytest.mark.e2e
def test_access_log_counts_full_blob_gets(fresh_registry: RegistryServer) -> None:
    reg = fresh_registry
    with urllib.request.urlopen(f"{reg.url}/v2/") as r:
        assert r.status == 200
    recs = reg.access_log()
    assert recs and recs[-1].kind == "base" and recs[-1].status == 200
    assert reg.blob_path(DIGEST) == (
        reg.storage_dir / "docker/registry/v2/blobs/sha256/ab" / DIGEST[7:] / "data"
    )


@pytest.mark.e2e
def test_port_in_use_is_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
        with pytest.raises(RegistryServerError, match="address already in use"):
            RegistryServer(port=port, startup_timeout=5).start()


@pytest.mark.e2e
def test_registry_dies_with_its_starter() -> None:
    code = (
        "import os\n"
        "from harness.registry_server import RegistryServer\n"
        "r = RegistryServer(); r.start(); print(r.pid, r.workdir, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid_text, workdir = out.stdout.split()
    pid = int(pid_text)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"registry {pid} outlived the process that started it")
    finally:
        subprocess.run(["rm", "-rf", workdir], check=False)


def test_access_log_upto_an_offset_holds_the_lines_whole_there(tmp_path) -> None:
    """The run's first-output mark is the log's size (one stat, taken inside the timed run);
    the records it stands for are counted afterwards: the lines whole at that offset."""
    reg = RegistryServer()
    reg._workdir = tmp_path
    assert reg.log_offset() == 0 and reg.access_log(upto=0) == []
    line = '127.0.0.1 - - [27/Nov/2026:22:04:56 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"\n'
    reg.access_log_path.write_text(line * 2)
    offset = reg.log_offset()
    with reg.access_log_path.open("a") as f:
        f.write(line + line[:20])  # one more, and one being written
    assert len(reg.access_log(upto=offset)) == 2
    assert len(reg.access_log(upto=offset + 30)) == 2  # a line cut short is not counted
    assert len(reg.access_log()) == 3
