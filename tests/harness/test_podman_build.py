"""`podman build` leaves nothing running, however it ends: done, failed, timed out, interrupted.

podman 4.3 runs a RUN step as a runc container in its own session and cgroup, and leaves it
running when podman itself is stopped (SIGTERM, SIGINT or SIGKILL). :meth:`PodmanEnv.build`
keeps the runtime's state in the env and deletes every container there when the build ends.

The unit tests put a fake ``podman`` and ``runc`` on PATH (a "RUN step" is a process in a
session of its own, its state a directory in the ``--runtime-flag=root=`` directory); the
end-to-end tests stop a real ``lazybench run`` and a real ``podman build`` while a RUN step
sleeps, and look for what is left of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.measure import Interrupted, interruptible
from harness.podman import PodmanEnv, PodmanError, mounts_below, runtime_containers

# -- helpers ------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process; an orphan is reaped by an init we do
    not control, so a zombie may linger and does not count."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def marked(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(cmdline.parent.name)
        if marker in text and pid != os.getpid() and alive(pid):
            found.append(pid)
    return found


def wait_for(what: Callable[[], object], timeout: float, step: float = 0.05) -> object:
    """``what()`` once it is truthy, or its last (falsy) value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := what()) and time.monotonic() < deadline:
        time.sleep(step)
    return value


# -- unit: a fake podman and runc -----------------------------------------------------------------

# `podman build --runtime-flag=root=DIR ...`: FAKE_BUILD=ok prints and exits 0, fail exits 1,
# run starts a "RUN step" (a sleep in a session of its own, its state DIR/<id>/pid) and waits.
# Any other podman command (the env's teardown) succeeds.
FAKE_PODMAN = """#!/bin/sh
[ "$1" = build ] || exit 0
root=${2#--runtime-flag=root=}
case "$FAKE_BUILD" in
ok) echo built; exit 0 ;;
fail) echo "boom: the build failed" >&2; exit 1 ;;
run)
    mkdir -p "$root/step-1"
    setsid sh -c 'exec sleep 300' "$FAKE_MARKER" </dev/null >/dev/null 2>&1 &
    echo $! > "$root/step-1/pid"
    echo "$!" > "$FAKE_DIR/step.pid"
    while :; do sleep 1; done ;;
esac
"""

# `runc --root DIR delete --force ID`: kill the step, remove its state; logged.
FAKE_RUNC = """#!/bin/sh
echo "$@" >> "$FAKE_DIR/runc.log"
[ "$1" = --root ] && [ "$3" = delete ] && [ "$4" = --force ] || exit 2
kill -9 "$(cat "$2/$5/pid")" 2>/dev/null
rm -rf "${2:?}/$5"
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with the fake podman and runc, first on PATH; their logs go there too."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("podman", FAKE_PODMAN), ("runc", FAKE_RUNC)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_MARKER", f"lzb-fake-step-{uuid.uuid4().hex}")
    return tmp_path


def fake_env(tmp_path: Path) -> PodmanEnv:
    return PodmanEnv(tmp_path / "env", keep_blob_info_cache=True)


def step_pid(fake: Path) -> int:
    pid = wait_for(lambda: (fake / "step.pid").is_file() and (fake / "step.pid").read_text(), 10)
    assert pid, "the fake RUN step did not start"
    return int(str(pid))


def test_runtime_containers_are_the_state_directories(tmp_path: Path) -> None:
    assert runtime_containers(tmp_path / "none") == []
    (tmp_path / "root" / "buildah-b2").mkdir(parents=True)
    (tmp_path / "root" / "buildah-b1").mkdir()
    (tmp_path / "root" / "stray-file").write_text("")
    assert runtime_containers(tmp_path / "root") == ["buildah-b1", "buildah-b2"]


def test_a_build_that_succeeds_returns_its_output(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_BUILD", "ok")
    with fake_env(fake) as env:
        result = env.build("--tag", "x", ".", timeout=30)
        assert result.returncode == 0 and result.stdout == "built\n"
        assert result.args[:3] == ["podman", "build", f"--runtime-flag=root={env.runroot}/runc"]
    assert not (fake / "runc.log").exists()  # nothing to delete, runc never ran


def test_a_build_that_fails_raises_with_its_stderr(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_BUILD", "fail")
    with fake_env(fake) as env, pytest.raises(PodmanError, match="exited 1: boom: the build"):
        env.build(".", timeout=30)


def test_a_build_that_times_out_leaves_no_run_step(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_BUILD", "run")
    with fake_env(fake) as env:
        start = time.monotonic()
        with pytest.raises(PodmanError, match="did not finish within 2s"):
            env.build(".", timeout=2)
        assert time.monotonic() - start < 15
        pid = step_pid(fake)
        assert wait_for(lambda: not alive(pid), 5), "the RUN step is still running"
        assert runtime_containers(env.build_runtime_root) == []
    root = env.runroot / "runc"
    assert (fake / "runc.log").read_text() == f"--root {root} delete --force step-1\n"


def test_an_interrupted_build_leaves_no_run_step(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the harness while the step runs: lazybench's own handler raises
    :class:`Interrupted` in the build's wait; the step is deleted before it propagates."""
    monkeypatch.setenv("FAKE_BUILD", "run")
    sender = threading.Thread(
        target=lambda: (step_pid(fake), os.kill(os.getpid(), signal.SIGTERM)), daemon=True
    )
    with fake_env(fake) as env, pytest.raises(Interrupted), interruptible():
        sender.start()
        env.build(".", timeout=60)
    sender.join(10)
    pid = step_pid(fake)
    assert wait_for(lambda: not alive(pid), 5), "the RUN step is still running"
    assert "delete --force step-1" in (fake / "runc.log").read_text()


def test_closing_the_env_deletes_a_run_step_left_in_its_runtime_root(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RUN step's container found in the env's runtime root at exit (any podman command given
    ``--runtime-flag=root=``) is deleted with the env."""
    with fake_env(fake) as env:
        state = env.build_runtime_root / "step-9"
        state.mkdir(parents=True)
        sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
        (state / "pid").write_text(str(sleeper.pid))
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert "delete --force step-9" in (fake / "runc.log").read_text()


# -- end to end: the real podman --------------------------------------------------------------

needs_podman = pytest.mark.skipif(
    not shutil.which("podman") or not Path("/bin/busybox").exists() or os.geteuid() != 0,
    reason="needs root, podman and busybox-static",
)


def slow_context(directory: Path, marker: str) -> Path:
    """A build context whose RUN step sleeps 60 s; its shell's command line carries
    ``marker``. Returns the Containerfile."""
    directory.mkdir(parents=True)
    shutil.copyfile("/bin/busybox", directory / "busybox")
    (directory / "busybox").chmod(0o755)
    run = ["/bin/busybox", "sh", "-c", "echo building; /bin/busybox sleep 60; :", marker]
    (directory / "Containerfile").write_text(
        "FROM scratch\nCOPY busybox /bin/busybox\n"
        f"RUN {json.dumps(run)}\n"
        'CMD ["/bin/busybox", "echo", "ready-now"]\n'
    )
    return directory / "Containerfile"


def runc_states_below(path: Path) -> list[str]:
    """Containers in runc's default state directory whose bundle is below ``path`` (running
    or not: a stopped one still holds its state and cgroup)."""
    found = []
    for state in Path("/run/runc").glob("*/state.json"):
        try:
            bundle = json.loads(state.read_text()).get("config", {}).get("labels", [])
        except (OSError, ValueError):
            continue
        if any(f"bundle={path}" in label for label in bundle):
            found.append(state.parent.name)
    return found


def assert_build_left_nothing(tmp: Path, marker: str) -> None:
    left = wait_for(lambda: not marked(marker), 15)
    assert left, f"the RUN step is still running: {marked(marker)}"
    assert runc_states_below(tmp) == [], "runc containers of the build left behind"
    assert mounts_below(tmp) == [], "mounts left behind"


# A run of slow_context's image (built in ctx/): its build's RUN step sleeps.
SLOW_SCENARIO = (
    'name = "slow"\nsamples = 1\nmodes = ["legacy"]\n[network]\nprofile = "loopback"\n'
    '[[workloads]]\nname = "cf"\ncontainerfile = "ctx/Containerfile"\n'
    'ready = "ready-now"\ntimeout = 30\n'
)


def start_run(tmp_path: Path, scenario: str) -> subprocess.Popen[str]:
    """``lazybench run`` of ``scenario`` (TOML text) in ``tmp_path``, its temporary directory
    ``tmp_path/tmp``, its stdout and stderr in one text pipe."""
    (tmp_path / "s.toml").write_text(scenario)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONUNBUFFERED": "1"}
    args = ["run", str(tmp_path / "s.toml"), "--no-progress", "--run-id", "r"]
    args += ["--results-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )


@pytest.mark.e2e
@needs_podman
@pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs docker-registry")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_lazybench_stopped_during_a_run_step_leaves_nothing(tmp_path: Path, sig: int) -> None:
    marker = f"lzb-test-step-{uuid.uuid4().hex}"
    slow_context(tmp_path / "ctx", marker)
    proc = start_run(tmp_path, SLOW_SCENARIO)
    try:
        started = wait_for(lambda: marked(marker) or proc.poll() is not None, 120)
        assert proc.poll() is None and started, proc.communicate(timeout=60)[0]
        proc.send_signal(sig)  # lazybench alone, not its process group
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert f"interrupted ({signal.Signals(sig).name})" in out, out
    assert_build_left_nothing(tmp_path, marker)
    assert list((tmp_path / "cache" / "containerfile").glob(".build-*")) == []


@pytest.mark.e2e
@needs_podman
def test_a_build_timing_out_during_a_run_step_leaves_nothing(tmp_path: Path) -> None:
    marker = f"lzb-test-step-{uuid.uuid4().hex}"
    containerfile = slow_context(tmp_path / "ctx", marker)
    seen: list[int] = []
    watcher = threading.Thread(
        target=lambda: seen.extend(wait_for(lambda: marked(marker), 30) or []), daemon=True
    )
    watcher.start()
    with PodmanEnv(tmp_path / "env") as env:
        with pytest.raises(PodmanError, match="did not finish within 10s"):
            env.build("--file", str(containerfile), str(containerfile.parent), timeout=10)
        watcher.join(30)
        assert seen, "the RUN step never started: the timeout proved nothing"
        assert runtime_containers(env.build_runtime_root) == []
    assert_build_left_nothing(tmp_path, marker)
