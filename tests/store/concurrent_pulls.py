"""Pulls of several images at once into one graphroot, with podman 4.3's lock inversion
detected and broken instead of waited on.

Why: two podman 4.3 pulls that put additional layers into one graphroot at once can
deadlock in containers/storage (1.43), whatever the store: seen in CI with the Go store and
here with ours. One pull holds ``overlay-layers/layers.lock`` and waits for ``storage.lock``;
the other holds ``storage.lock`` and asks for ``layers.lock``. The kernel answers that
second ``F_SETLKW`` with EDEADLK, and containers/storage's lock file sleeps 10 ms and asks
again, for ever. It is the kind of inversion podman#16062 found (``storage.lock`` nested
inside ``layers.lock`` where the rest of the store nests them the other way round), which
later containers/storage releases removed. No store can prevent it; the test still wants to
know what its store did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

# The lock files containers/storage takes in opposite orders, under the graphroot.
LOCK_FILES = ("storage.lock", "overlay-layers/layers.lock")
# Seconds the inversion must last. Which of the two pulls waits in the kernel and which gets
# EDEADLK depends on timing, so a waiter holding storage.lock and asking for layers.lock looks
# like a wait in the right order: that one ends once the holder's work is done, milliseconds
# for the small layers of the tests that use this.
INVERSION_FOR = 5.0


def _key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def lock_inversion(graphroot: Path) -> set[int]:
    """The pids of two processes each holding one of :data:`LOCK_FILES` of ``graphroot``
    while one of them waits in the kernel for the other's (``/proc/locks``); empty if none."""
    ours = {k for k in (_key(graphroot / f) for f in LOCK_FILES) if k is not None}
    holders: dict[tuple[int, int, int], int] = {}
    waiting: list[tuple[int, tuple[int, int, int]]] = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            blocked = len(fields) > 1 and fields[1] == "->"
            if blocked:
                del fields[1]
            if len(fields) < 6 or fields[1] != "POSIX":
                continue
            try:
                major, minor, inode = fields[5].split(":")
                key = (int(major, 16), int(minor, 16), int(inode))
                pid = int(fields[4])
            except ValueError:
                continue
            if key not in ours:
                continue
            if blocked:
                waiting.append((pid, key))
            else:
                holders[key] = pid
    for pid, key in waiting:
        holder = holders.get(key)
        if holder is not None and holder != pid and pid in holders.values():
            return {pid, holder}
    return set()


def pull_at_once(
    env, refs: Sequence[str], *, timeout: float = 180.0, debug: bool = False
) -> tuple[list[BaseException], bool]:
    """``podman pull`` of every ref at once in ``env`` (a :class:`harness.podman.PodmanEnv`),
    each within ``timeout`` seconds; ``debug`` logs at debug level (a pull that times out then
    reports its last step). Returns the pulls' errors and whether containers/storage's lock
    inversion (module doc) deadlocked them: both pulls were then killed, and the caller pulls
    one at a time."""
    errors: list[BaseException] = []
    args = ("--log-level=debug",) if debug else ()

    def pull(ref: str) -> None:
        try:
            env.podman(*args, "pull", "--quiet", ref, timeout=timeout)
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=(r,), daemon=True) for r in refs]
    for t in threads:
        t.start()
    deadlocked = False
    since: float | None = None
    while any(t.is_alive() for t in threads):
        pids = lock_inversion(env.graphroot)
        if not pids:
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= INVERSION_FOR:
            deadlocked = True
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            since = None
        time.sleep(0.25)
    for t in threads:
        t.join()
    if deadlocked:
        warnings.warn(
            f"concurrent pulls of {', '.join(refs)} deadlocked in containers/storage (its lock "
            "inversion, tests/store/concurrent_pulls.py): killed, to be pulled one at a time",
            stacklevel=2,
        )
    return errors, deadlocked


def pull_all(
    env, refs: Sequence[str], *, timeout: float = 180.0
) -> tuple[list[BaseException], bool]:
    """:func:`pull_at_once`, and when containers/storage's lock inversion deadlocked the
    pulls, every ref again one at a time (each raising :class:`harness.podman.PodmanError`
    if it fails). Returns the concurrent pulls' errors (none after the one-at-a-time pulls)
    and whether they deadlocked (the killed pulls' references to layers stay counted)."""
    errors, deadlocked = pull_at_once(env, refs, timeout=timeout)
    if deadlocked:
        for ref in refs:
            env.pull(ref, timeout=timeout)
        errors = []
    return errors, deadlocked
