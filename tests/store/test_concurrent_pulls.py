"""The detector of containers/storage's lock inversion (tests/store/concurrent_pulls.py)
against two real processes locking as the deadlocked podman 4.3 pulls did."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.store.concurrent_pulls import LOCK_FILES, lock_inversion

# Holds FIRST and says so; told to go on, asks for SECOND (F_SETLKW) and, answered EDEADLK,
# asks again every 10 ms as containers/storage's lock file does.
_LOCKER = """
import fcntl, sys, time
first, second = sys.argv[1:]
a = open(first, "w"); fcntl.lockf(a, fcntl.LOCK_EX)
print("held", flush=True); sys.stdin.readline()
b = open(second, "w")
while True:
    try:
        fcntl.lockf(b, fcntl.LOCK_EX)
        break
    except OSError:
        time.sleep(0.01)
"""


def _lock_files(graphroot: Path) -> tuple[Path, Path]:
    storage, layers = (graphroot / f for f in LOCK_FILES)
    layers.parent.mkdir(parents=True)
    storage.touch()
    layers.touch()
    return storage, layers


def _locker(first: Path, second: Path) -> subprocess.Popen[str]:
    """A process holding ``first`` (it said so), to ask for ``second`` once :func:`_go`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(first), str(second)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_two_processes_locking_in_opposite_orders_are_found(tmp_path: Path) -> None:
    storage, layers = _lock_files(tmp_path)
    procs = []
    try:
        procs = [_locker(storage, layers), _locker(layers, storage)]
        for p in procs:
            _go(p)
        deadline = time.monotonic() + 10
        while not (found := lock_inversion(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert found == {p.pid for p in procs}
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert lock_inversion(tmp_path) == set()


def test_one_process_holding_both_locks_is_no_inversion(tmp_path: Path) -> None:
    storage, layers = _lock_files(tmp_path)
    proc = _locker(storage, layers)
    try:
        _go(proc)
        time.sleep(1.0)
        assert lock_inversion(tmp_path) == set()
    finally:
        proc.kill()
        proc.wait(10)
