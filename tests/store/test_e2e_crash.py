"""The store SIGKILLed (or stopped with SIGTERM) under a running container, then restarted on
the same mountpoint.

Expected (see the README's store section): the container's reads of anything not already in
the page cache fail at once with ENOTCONN ("Transport endpoint is not connected") — they do
not hang; after SIGKILL the mountpoint is a dead FUSE mount until the store is started again,
which unmounts it (lazily: the dead container's overlay still holds it), after SIGTERM the
store unmounted it lazily itself; the restarted store serves new pulls; new containers, of
images pulled before the crash too, work; a container that was running keeps its dead
connection and must be restarted.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import time

import pytest

from harness.podman import PodmanEnv
from tests.store.images import add_file, make_tar, push, to_estargz

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed"),
]

CONFIG = "noprefetch = true\nno_background_fetch = true\n"
COLD = random.Random(5).randbytes(300_000)
# Reads one file, then waits for the test's signal to read a file it never read before. The
# userland is read whole first: executing a page of busybox that never came through the
# store would end in SIGBUS instead of the read error under test.
SCRIPT = (
    "cat /bin/busybox > /dev/null; cat /etc/hello > /out/first; "
    "while [ ! -e /out/go ]; do sleep 0.1; done; "
    "cat /cold > /dev/null 2> /out/err; echo $? > /out/rc; sleep 600"
)


def _wait_for(path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
@pytest.mark.store_ours_only(
    reason="the Go store v0.12 does not clean a stale mount: restarted on the dead mountpoint, "
    "fusermount fails (transport endpoint is not connected) until it is unmounted"
)
def test_sigkill_under_a_running_container_then_restart(
    registry, store_factory, layers, tmp_path, stop
):
    host = registry.host
    cold = to_estargz(make_tar(lambda t: add_file(t, "cold", COLD)))
    push(host, "crash/img", "1", [to_estargz(layers["lower"]), to_estargz(layers["upper"]), cold])
    ref = f"{host}/crash/img:1"
    store = store_factory(CONFIG)
    out = tmp_path / "out"
    out.mkdir()
    with PodmanEnv(
        tmp_path / "env", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        env.pull(ref, timeout=180)
        cid = env.podman(
            "run", "-d", "--network=none", "-v", f"{out}:/out", ref, "/bin/sh", "-c", SCRIPT
        ).stdout.strip()
        assert _wait_for(out / "first", 60)
        assert (out / "first").read_text() == "hello from upper\n"

        assert store.proc is not None
        store.proc.send_signal(stop)
        store.proc.wait(15)
        start = time.monotonic()
        (out / "go").touch()
        assert _wait_for(out / "rc", 20), "the container's read hung after the store died"
        elapsed = time.monotonic() - start
        print(f"read after SIGKILL failed in {elapsed:.2f}s (incl. the container's 0.1 s poll)")
        assert int((out / "rc").read_text()) != 0
        assert "Transport endpoint is not connected" in (out / "err").read_text()
        with pytest.raises(OSError) as exc:
            os.stat(store.mnt / "status")
        # SIGKILL leaves a dead mount; SIGTERM unmounts (lazily): the mountpoint is empty.
        assert exc.value.errno == (errno.ENOTCONN if stop == signal.SIGKILL else errno.ENOENT)
        assert elapsed < 10

        # Restarted on the same mountpoint: a stale mount is cleaned, new pulls work.
        store.start()
        assert ("stale mount" in store.log.read_text()) == (stop == signal.SIGKILL)
        push(host, "crash/new", "1", [to_estargz(layers["lower"])])
        new_ref = f"{host}/crash/new:1"
        env.pull(new_ref, timeout=180)
        assert env.run(new_ref, "/bin/cat", "/etc/hello", timeout=120).stdout == (
            "hello from lower\n"
        )
        # The container started before the crash keeps its dead connection: restart it.
        env.podman("rm", "-f", "-t", "0", cid, timeout=120)
        got = env.run(ref, "/bin/sh", "-c", "cat /cold | sha256sum", timeout=120).stdout
        assert got.split()[0] == __import__("hashlib").sha256(COLD).hexdigest()


def _processes_running(argv: list[str]) -> list[int]:
    """The pids of processes whose command line is ``argv``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmdline = f.read().split(b"\0")[:-1]
            except OSError:
                continue
            if cmdline == [a.encode() for a in argv]:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("how", ["killed", "stopped"])
@pytest.mark.store_ours_only(reason="the env's cleanup under a dead mount, whatever store left it")
def test_closing_the_env_stops_its_containers_when_the_store_is_gone(
    registry, store_factory, layers, tmp_path, podman_env, runtime_node, how
):
    """A store killed (or, in a node, stopped: the node's bind of its mount stays dead) under
    a running container leaves a dead mount that fails every podman command on the storage,
    `podman rm` too: closing the env still stops and removes the container."""
    import signal

    if how == "stopped" and runtime_node is None:
        pytest.skip("on the host a stopped store leaves an empty directory: podman works")
    host = registry.host
    push(host, "gone/img", "1", [to_estargz(layers["lower"])])
    ref = f"{host}/gone/img:1"
    store = store_factory(CONFIG)
    sleeper = ["sleep", f"86399.{os.getpid()}"]  # this test's container, and no other process
    try:
        with podman_env(
            tmp_path / "env", additional_layer_store=store.mnt, insecure_registries=[host]
        ) as env:
            env.pull(ref, timeout=180)
            # busybox read whole first: the container's sleep needs nothing more from the store.
            script = f"cat /bin/busybox > /dev/null; exec {' '.join(sleeper)}"
            env.podman("run", "-d", "--network=none", ref, "/bin/sh", "-c", script, timeout=120)
            deadline = time.monotonic() + 60
            while not _processes_running(sleeper) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _processes_running(sleeper)
            if how == "killed":
                assert store.proc is not None
                store.proc.kill()
                store.proc.wait(10)
            else:
                store.stop()
            # The mount's root attributes stay cached a moment after the connection died.
            deadline = time.monotonic() + 10
            while env.podman("ps", timeout=60, check=False).returncode == 0:
                assert time.monotonic() < deadline, "podman works on: nothing to test"
                time.sleep(0.2)
        deadline = time.monotonic() + 10
        while _processes_running(sleeper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_running(sleeper) == [], "the container outlived its env"
    finally:
        for pid in _processes_running(sleeper):  # what a failure left: conmon exits with it
            os.kill(pid, signal.SIGKILL)
