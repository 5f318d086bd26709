"""The harness's children are stopped for sure: SIGTERM to the group, then SIGKILL."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness.processes import Service, free_port, kill_group, stop_group


def _group(script: str) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", script], start_new_session=True)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the group; orphans are reaped by an
    init we do not control, so a zombie may linger and does not count."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_stop_group_terminates_the_whole_group():
    proc = _group("sleep 100 & sleep 100 & wait")
    time.sleep(0.2)
    stop_group(proc, timeout=5)
    assert proc.returncode == -signal.SIGTERM
    time.sleep(0.1)
    assert not _group_alive(proc.pid)  # the two sleeps went with it


def test_stop_group_kills_a_group_that_ignores_sigterm():
    proc = _group("trap '' TERM; sleep 100 & trap '' TERM; wait; sleep 100")
    time.sleep(0.2)
    start = time.monotonic()
    stop_group(proc, timeout=0.5)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - start < 5
    time.sleep(0.1)
    assert not _group_alive(proc.pid)


def test_kill_group_on_an_exited_process_is_quiet():
    proc = _group("exit 3")
    proc.wait()
    kill_group(proc)
    stop_group(proc, timeout=1)
    assert proc.returncode == 3


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_service_stops_however_the_block_ends():
    calls: list[str] = []

    class Probe(Service):
        def start(self) -> None:
            calls.append("start")

        def stop(self) -> None:
            calls.append("stop")

    try:
        with Probe() as p:
            assert isinstance(p, Probe)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert calls == ["start", "stop"]
    assert sys.exc_info() == (None, None, None)
