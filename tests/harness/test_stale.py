"""What a killed harness leaves is found by owner and removed (harness.stale).

The unit tests claim directories for live and dead owners and put a process and a mount in
one; the end-to-end tests SIGKILL a real ``lazybench run`` while its workload runs lazily
through our store (a FUSE mount, podman's overlay, a container under ``conmon``), or while a
``RUN`` step of its image build runs, and check that ``lazybench cleanup`` leaves nothing of
it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.podman import mounts_below
from harness.registry_server import KEEP_ENV, RegistryServer
from harness.stale import (
    OWNER_FILE,
    _below,
    build_dirs,
    claim,
    disown,
    owner_gone,
    processes_in,
    release,
    sweep,
)
from tests.harness.test_podman_build import (
    SLOW_SCENARIO,
    assert_build_left_nothing,
    marked,
    runc_states_below,
    slow_context,
    start_run,
    wait_for,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def claimed_by(directory: Path, owner: str) -> Path:
    directory.mkdir(parents=True)
    (directory / OWNER_FILE).write_text(owner)
    return directory


def in_container(marker: str) -> list[int]:
    """The workload's shell, running in its container: marked, and neither podman (whose
    ``create`` names the command too) nor conmon or the runtime."""
    found = []
    for pid in marked(marker):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() not in ("podman", "conmon", "runc"):
                found.append(pid)
    return found


def owned_by(directory: Path, pid: int) -> bool:
    try:
        return (directory / OWNER_FILE).read_text().split()[0] == str(pid)
    except (OSError, IndexError):
        return False


# -- owners -----------------------------------------------------------------------------------


def test_a_directory_claimed_by_this_process_is_not_stale(tmp_path: Path) -> None:
    claim(tmp_path)
    assert not owner_gone(tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / OWNER_FILE]  # no temporary file left


def test_a_directory_whose_owner_exited_is_stale(tmp_path: Path) -> None:
    assert owner_gone(claimed_by(tmp_path / "d", f"{dead_pid()} 12345\n"))


def test_a_reused_pid_is_not_taken_for_the_owner(tmp_path: Path) -> None:
    # Our own pid, with a start time that is not ours: the owner that wrote it is gone.
    assert owner_gone(claimed_by(tmp_path / "d", f"{os.getpid()} 1\n"))


def test_a_disowned_directory_is_never_stale(tmp_path: Path) -> None:
    d = claimed_by(tmp_path / "lazybench-registry-kept", f"{dead_pid()} 12345\n")
    disown(d)
    assert d.is_dir() and not (d / OWNER_FILE).exists()
    assert not owner_gone(d)


@pytest.mark.e2e
def test_a_registry_kept_on_request_is_disowned_for_the_next_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``LAZYBENCH_KEEP_REGISTRY=1`` keeps a stopped registry's directory for a look
    afterwards. It was kept still claimed by the run, so the next run's sweep (the owner
    gone) removed it before anyone could look."""
    monkeypatch.setenv(KEEP_ENV, "1")
    with RegistryServer() as reg:
        workdir = reg.workdir
    try:
        assert (workdir / "storage").is_dir()
        assert not (workdir / OWNER_FILE).exists()
        assert not owner_gone(workdir)
        assert f"registry directory kept: {workdir}" in capsys.readouterr().err
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("owner", [None, "", "garbage", "12 34 56"])
def test_a_directory_without_a_readable_owner_is_never_ours_to_judge(
    tmp_path: Path, owner: str | None
) -> None:
    d = tmp_path / "d"
    if owner is None:
        d.mkdir()
    else:
        claimed_by(d, owner)
    assert not owner_gone(d)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/tmp/lzb-run-a", True),
        ("/tmp/lzb-run-a/m-0/store/mnt", True),
        ("--root=/tmp/lzb-run-a/x", True),
        ("CONTAINERS_CONF=/tmp/lzb-run-a/podman/containers.conf", True),
        ("overlay.additionallayerstore=/tmp/lzb-run-a:ref", True),
        ("/tmp/lzb-run-ab", False),
        ("/tmp/lzb-run-ab/x /tmp/lzb-run-a", True),
        ("/tmp/lzb-run-", False),
    ],
)
def test_a_path_is_named_only_as_a_whole_path(text: str, expected: bool) -> None:
    assert _below(text, "/tmp/lzb-run-a") is expected


# -- sweep ------------------------------------------------------------------------------------


@needs_root
def test_sweep_removes_a_dead_owners_directory_with_its_process_and_mount(
    tmp_path: Path,
) -> None:
    stale = claimed_by(tmp_path / "lzb-run-stale", f"{dead_pid()} 1\n")
    live = tmp_path / "lzb-run-live"
    live.mkdir()
    claim(live)
    unclaimed = tmp_path / "lzb-run-unclaimed"
    unclaimed.mkdir()
    (stale / "mnt").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(stale / "mnt")], check=True)
    # A process of the dead run: its working directory is in the stale directory, and its
    # child names nothing but descends from it.
    sleeper = subprocess.Popen(
        ["sh", "-c", "sleep 60 & wait"], cwd=stale / "mnt", start_new_session=True
    )
    try:
        assert wait_for(lambda: len(processes_in([stale])) == 2, 5)
        swept = sweep(tmp_path)
        assert sleeper.wait(timeout=10) < 0
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        for point in mounts_below(stale) if stale.exists() else []:
            subprocess.run(["umount", "-l", str(point)], check=False)
    mine = [s for s in swept if s.path.parent == tmp_path]  # (it sweeps /tmp as well)
    assert [s.path for s in mine] == [stale]
    assert mine[0].processes and mine[0].mounts == [stale / "mnt"]
    assert not mine[0].left
    assert not stale.exists() and live.exists() and unclaimed.exists()


@needs_root
def test_a_removal_cut_short_leaves_the_directory_claimed_for_sweep(tmp_path: Path) -> None:
    """A run's work directory (the registry's storage, every measurement's podman) was removed
    with ``shutil.rmtree``, its owner file among the first to go: whatever stopped the removal
    part-way (a mount left in it, a SIGKILL in the middle of gigabytes) left a directory no
    cleanup would touch. ``release`` deletes the owner file last."""
    work = tmp_path / "lzb-run-x"
    work.mkdir()
    claim(work)
    for i in range(20):
        (work / f"blob-{i}").write_bytes(b"x")
    (work / "podman" / "overlay").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(work / "podman" / "overlay")], check=True)
    try:
        release(work)
        assert sorted(p.name for p in work.iterdir()) == [OWNER_FILE, "podman"]
        (work / OWNER_FILE).write_text(f"{dead_pid()} 1\n")  # and then the run is gone
        swept = [s for s in sweep(tmp_path) if s.path == work]
        assert swept and swept[0].mounts == [work / "podman" / "overlay"]
        assert not work.exists()
    finally:
        for point in mounts_below(work) if work.exists() else []:
            subprocess.run(["umount", "-l", str(point)], check=False)
    done = tmp_path / "lzb-run-y"  # nothing in the way: all of it goes
    (done / "a" / "b").mkdir(parents=True)
    claim(done)
    (done / "link").symlink_to(tmp_path)
    release(done)
    assert not done.exists() and tmp_path.exists()


def test_sweep_spares_this_process_and_its_ancestors(tmp_path: Path) -> None:
    d = claimed_by(tmp_path / "lzb-run-x", f"{dead_pid()} 1\n")
    os.chdir(d)  # this process names the directory (its cwd), and pytest's ancestors don't
    try:
        assert os.getpid() not in processes_in([d])
    finally:
        os.chdir(tmp_path)


# -- end to end -------------------------------------------------------------------------------


def kill_then_clean_up(
    tmp_path: Path,
    proc: subprocess.Popen[str],
    ready: Callable[[], object],
    before: Callable[[], None] = lambda: None,
    after: Callable[[], None] = lambda: None,
) -> tuple[list[Path], subprocess.CompletedProcess[str]]:
    """Once ``ready()``, SIGKILL the ``lazybench run`` ``proc`` (started by :func:`start_run`)
    between the checks ``before()`` and ``after()`` (that the kill leaves something to clean
    up), then run ``lazybench cleanup``. Returns the runroots the run owned and the cleanup's
    result. On any failure lazybench is killed and its leftovers swept: a failed test leaves
    nothing behind either."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    cache = tmp_path / "cache"
    try:
        started = wait_for(lambda: ready() or proc.poll() is not None, 240)
        assert proc.poll() is None and started, proc.communicate(timeout=60)[0]
        before()
        runroots = [p for p in Path("/tmp").glob("lzbr-*") if owned_by(p, proc.pid)]
        proc.kill()  # lazybench alone: no cleanup of its own runs
        proc.communicate(timeout=60)
        after()
        cleanup = subprocess.run(
            [sys.executable, "-m", "harness", "cleanup", "--cache-dir", str(cache)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        sweep(tmp_path / "tmp", *build_dirs(cache))
        raise
    assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
    assert runroots and not any(p.exists() for p in runroots)
    return runroots, cleanup


needs_run = pytest.mark.skipif(
    not shutil.which("podman")
    or not Path("/bin/busybox").exists()
    or not shutil.which("docker-registry"),
    reason="needs podman, busybox-static and docker-registry",
)


@needs_root
def test_a_run_removes_a_killed_runs_network_namespace_whatever_its_profile(
    tmp_path: Path,
) -> None:
    """A run killed on a shaped link leaves its ``lzb-<pid>-N`` namespace; only making a
    shaped link removed it, so any number of loopback runs after it left it in place."""
    from harness.stale import sweep_killed_runs

    name = f"lzb-{dead_pid()}-0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        left = sweep_killed_runs(tmp_path, cache_dir=tmp_path / "cache")
        assert f"netns {name}" in left
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert name not in listed
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.mark.e2e
@needs_root
@needs_run
def test_cleanup_after_a_killed_lazy_run_leaves_nothing(tmp_path: Path) -> None:
    marker = f"lzb-test-killed-{uuid.uuid4().hex}"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copyfile("/bin/busybox", ctx / "busybox")
    (ctx / "busybox").chmod(0o755)
    # Never ready: it runs until the run is killed, lazily through the store.
    cmd = ["/bin/busybox", "sh", "-c", "echo started; /bin/busybox sleep 300; :", marker]
    (ctx / "Containerfile").write_text(
        f"FROM scratch\nCOPY busybox /bin/busybox\nCMD {cmd!r}\n".replace("'", '"')
    )
    proc = start_run(
        tmp_path,
        'name = "killed"\nsamples = 1\nmodes = ["estargz-noopt"]\n'
        '[network]\nprofile = "loopback"\n'
        '[[workloads]]\nname = "cf"\ncontainerfile = "ctx/Containerfile"\n'
        'ready = "never-printed"\ntimeout = 300\n',
    )
    tmp = tmp_path / "tmp"
    runs: list[Path] = []

    def through_the_store() -> None:
        runs.extend(tmp.glob("lzb-run-*"))
        assert len(runs) == 1 and any(
            "fuse" in line and str(runs[0]) in line
            for line in Path("/proc/mounts").read_text().splitlines()
        ), "the workload runs, but not through a mounted store: the kill proves nothing"

    def mounts_left() -> None:
        # The store got SIGTERM with lazybench and unmounted; the container may outlive it
        # (or die faulting on its lazily mounted binary); podman's mounts stay either way.
        assert mounts_below(runs[0]), "the kill left no mount: the cleanup proves nothing"

    _, cleanup = kill_then_clean_up(
        tmp_path, proc, lambda: in_container(marker), through_the_store, mounts_left
    )
    assert f"removed {runs[0]}" in cleanup.stdout, cleanup.stdout
    assert wait_for(lambda: not marked(marker), 15), f"still running: {marked(marker)}"
    assert runc_states_below(runs[0]) == []
    assert str(runs[0]) not in Path("/proc/mounts").read_text()
    assert not runs[0].exists()
    assert [p for p in tmp.iterdir() if p.name.startswith(("lzb", "lazybench"))] == []


@pytest.mark.e2e
@needs_root
@needs_run
def test_cleanup_after_a_run_killed_during_a_build_step_leaves_nothing(tmp_path: Path) -> None:
    # SIGTERM and SIGINT are lazybench's own to clean up (test_podman_build); SIGKILL is not:
    # the RUN step keeps running in the runtime root of a runroot nobody removes.
    marker = f"lzb-test-step-{uuid.uuid4().hex}"
    slow_context(tmp_path / "ctx", marker)
    proc = start_run(tmp_path, SLOW_SCENARIO)

    def step_left() -> None:
        assert marked(marker), "the RUN step went with lazybench: the test proves nothing"

    kill_then_clean_up(tmp_path, proc, lambda: marked(marker), after=step_left)
    assert_build_left_nothing(tmp_path, marker)
    assert list((tmp_path / "cache" / "containerfile").glob(".build-*")) == []
