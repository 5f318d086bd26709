"""The harness's children are stopped for sure: SIGTERM to the group, then SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_the_group_is_stopped_after_its_leader_exited():
    """A store's helper, a daemonized child: once the leader was gone, the rest of its group
    was never signalled and outlived the harness."""
    proc = _group("(trap '' TERM; exec sleep 100) & sleep 100 & exit 0")
    proc.wait()
    time.sleep(0.2)
    assert _group_alive(proc.pid)
    stop_group(proc, timeout=0.5)  # SIGTERM takes one sleep, SIGKILL the one that ignores it
    time.sleep(0.1)
    assert not _group_alive(proc.pid) and proc.returncode == 0
    kill_group(proc)  # the group empty (or its orphans' zombies unreaped yet): quiet


def _sh_store(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "store.sh"
    script.write_text(f'#!/bin/sh\nmnt="$1"\n{body}\n')
    script.chmod(0o755)
    return [str(script), "{mountpoint}"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_store_that_mounts_then_exits_0_is_mounted_and_its_group_stopped(tmp_path: Path):
    """A daemonizing store: mounted, its first process gone with status 0, a server left in
    the group. It was "exited before mounting", and the server was never stopped."""
    from harness.store_proc import StoreProcess, is_mounted

    command = _sh_store(tmp_path, 'mount -t tmpfs tmpfs "$mnt" || exit 1\nsleep 100 &\nexit 0')
    store = StoreProcess(tmp_path / "w", command=command, metrics=False, mount_timeout=5)
    try:
        store.start()
        assert is_mounted(store.mountpoint) and store.pid is None
        pgid = store._proc.pid
        assert _group_alive(pgid)
    finally:
        store.stop()
    time.sleep(0.1)
    assert not is_mounted(store.mountpoint) and not _group_alive(pgid)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_store_that_fails_after_mounting_is_an_error(tmp_path: Path):
    from harness.store_proc import StoreError, StoreProcess, is_mounted

    command = _sh_store(tmp_path, 'mount -t tmpfs tmpfs "$mnt" || exit 1\nexit 3')
    store = StoreProcess(tmp_path / "w", command=command, metrics=False, mount_timeout=5)
    with pytest.raises(StoreError, match="exited with status 3 after mounting"):
        store.start()
    assert not is_mounted(store.mountpoint)


def test_run_bounded_keeps_what_a_timed_out_child_wrote():
    """As ``subprocess.run`` does: a timeout's message names podman's last words."""
    import subprocess

    from harness.processes import run_bounded

    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        run_bounded(["sh", "-c", "echo said >&2; exec sleep 30"], timeout=0.5)
    assert exc.value.stderr == "said\n"
    assert time.monotonic() - start < 10
