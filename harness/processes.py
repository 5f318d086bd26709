"""Child processes the harness owns: a free port, a child that dies with us, a group stopped
for sure.

Why one module: the registry, the layer store, the link's delayer and its probe are all
long-lived children that must not outlive the harness — a leftover registry holds a port and
a namespace, a leftover store a FUSE mount that makes every podman command fail. Each runs
in its own process group (so a Ctrl-C aimed at the harness reaches it only through our
cleanup, in the right order) and is stopped with SIGTERM, then SIGKILL, to the whole group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
from types import TracebackType
from typing import Self

PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (a small race remains; callers retry on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies, even by
    SIGKILL, so a killed run leaves nothing behind. Survives a wrapper's exec."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


_GROUP_GONE = "_lazybench_group_gone"


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with a new session), also
    once the leader exited: the rest of its group (a store's helper, a daemonized child) is
    left otherwise. The group's id is the leader's pid, which the kernel gives to no other
    process while the leader is unreaped or any member of the group is left; once the group
    is found empty it is never signalled again (its id may then go to another process)."""
    if getattr(proc, _GROUP_GONE, False):
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is not None:  # the leader is gone and reaped, and so is its group
            setattr(proc, _GROUP_GONE, True)


def wait_quietly(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether ``proc`` exited within ``timeout`` seconds."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def stop_group(proc: subprocess.Popen, *, timeout: float, kill_timeout: float = 10.0) -> None:
    """SIGTERM the group, wait up to ``timeout`` for the leader; then SIGKILL what is left of
    the group (all of it, or the members that outlived the leader) and reap the leader."""
    signal_group(proc, signal.SIGTERM)
    wait_quietly(proc, timeout)
    kill_group(proc, timeout=kill_timeout)


def kill_group(proc: subprocess.Popen, *, timeout: float = 10.0) -> None:
    """SIGKILL the group and reap the leader (bounded: a process in D state may linger)."""
    signal_group(proc, signal.SIGKILL)
    wait_quietly(proc, timeout)


# Seconds a killed child gets to be reaped before it is given up on (run_bounded).
REAP_TIMEOUT = 10.0


def run_bounded(
    cmd: list[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    input: str | None = None,
    reap_timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` whose every
    wait ends: timed out, or ended by an exception while it waits (Ctrl-C, SIGTERM's
    :class:`KeyboardInterrupt`), the child is SIGKILLed and waited for at most
    ``reap_timeout`` seconds more (default :data:`REAP_TIMEOUT`), then left to be reaped
    later. Raises :class:`subprocess.TimeoutExpired` with the output read so far, as
    ``subprocess.run`` does.

    Why not ``subprocess.run``: after killing a timed-out child it waits for it without a
    bound, and interrupted it waits again (``Popen.__exit__``). A podman thread blocked in a
    FUSE request a layer store never answers stays in the kernel (D state) after SIGKILL, so
    that podman is never reaped until the store dies: a hung store hung ``lazybench run``
    for good, past the workload's timeout and past SIGTERM and Ctrl-C (its caller kills the
    store only once the call returns)."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.PIPE if input is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reap = REAP_TIMEOUT if reap_timeout is None else reap_timeout
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        with contextlib.suppress(OSError):
            proc.kill()
        try:  # what it wrote before it was killed, as subprocess.run keeps it
            exc.stdout, exc.stderr = proc.communicate(timeout=reap)
        except subprocess.TimeoutExpired:
            _abandon(proc)
        raise
    except BaseException:  # KeyboardInterrupt (Ctrl-C, SIGTERM, SIGHUP) while waiting
        with contextlib.suppress(OSError):
            proc.kill()
        wait_quietly(proc, reap)
        _abandon(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _abandon(proc: subprocess.Popen) -> None:
    """Close our ends of a child's pipes: a child that could not be reaped is left to the
    kernel, its output with it."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class Service:
    """``with service:`` calls ``start()``, and ``stop()`` however the block ends."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
