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
