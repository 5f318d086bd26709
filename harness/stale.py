"""What a killed harness leaves behind, found by owner and removed.

A harness that dies by SIGKILL (or OOM) runs none of its cleanup. Its children that share its
lifetime (the registry, the link's delayer) get SIGTERM from the kernel
(:func:`harness.processes.die_with_parent`), but what lives on its own stays: a layer store
with its FUSE mount, podman's overlay and shm mounts, a container whose ``conmon`` reparented
to init, and the directories holding them. The next podman command on that storage fails
(a store's dead mount answers ``ENOTCONN``), and ``/tmp`` fills with graphroots.

So each working directory the harness makes is *claimed*: an owner file names the process
(pid and its start time, so a reused pid is not taken for the owner). :func:`sweep` removes
the directories whose owner is gone, together with what runs and is mounted in them:

1. processes whose command line, environment or working directory names a path in the
   directory (a store's ``--root``, podman's ``CONTAINERS_CONF``, ``conmon``'s bundle), and
   every descendant of those (a container's processes are ``conmon``'s children) — SIGKILL;
2. the OCI runtime's state of the containers whose bundle is in the directory (podman's, in
   runc's default root ``/run/runc``) and of a build's ``RUN`` steps (kept in the directory
   itself): ``runc delete --force``, which removes their cgroups too;
3. every mount at or below the directory, deepest first (``umount -l``);
4. the directory.

A directory with no owner file is never touched: it may be another tool's, or a live run's
from before owners were written. Network namespaces are :func:`harness.netshape.
cleanup_stale`'s; runtime node views (``lzb-node-*``) are claimed the same way and torn down
by :func:`harness.runtimes.clean_stale_views`, which knows their mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

OWNER_FILE = ".lazybench-owner"
# The directories the harness claims: in the temporary directory a run's working directory
# (harness.measure), a podman env's own workdir and its runroot (harness.podman), a registry's
# storage (harness.registry_server); in the cache, an image build's staging directory
# (harness.images: a Containerfile's podman build, a recipe's layers and base, an import).
PATTERNS = ("lzb-run-*", "lzb-podman-*", "lzbr-*", "lazybench-registry-*", ".build-*")
# The cache's subdirectories where builds stage (harness.images.build, .source).
CACHE_BUILD_DIRS = ("containerfile", "images", "layers", "bases")
KILL_WAIT = 5.0  # seconds for SIGKILLed processes to be gone before the unmounts
RUNC_DEFAULT_ROOT = Path("/run/runc")  # runc's state directory for root (podman's containers)


@dataclass
class Swept:
    """One stale directory removed, with what was stopped and unmounted in it."""

    path: Path
    processes: list[int] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)
    left: bool = False  # something could not be removed (named in the log line)

    def line(self) -> str:
        """``/tmp/lzb-run-x: 3 processes stopped, 4 mounts removed``, for the console."""
        n, m = len(self.processes), len(self.mounts)
        parts = [f"{n} process{'es' * (n != 1)} stopped", f"{m} mount{'s' * (m != 1)} removed"]
        if self.left:
            parts.append("some of it is still there: remove it by hand")
        return f"{self.path}: " + ", ".join(parts)


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/PID/stat`` (start time in clock ticks after boot); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses.
    return stat.rsplit(")", 1)[1].split()[19]


def claim(directory: Path) -> None:
    """Mark ``directory`` as this process's (see the module doc); written atomically."""
    me = os.getpid()
    tmp = directory / f"{OWNER_FILE}.tmp{me}"
    tmp.write_text(f"{me} {_start_time(me)}\n")
    os.replace(tmp, directory / OWNER_FILE)


def release(directory: Path) -> None:
    """Remove a directory :func:`claim` marked, its owner file last. A removal cut short (a
    SIGKILL in the middle of a large registry storage, a mount that is still there) leaves the
    directory claimed, for :func:`sweep` to finish once its owner is gone; removed with the
    rest, the owner file went first and the remainder was no cleanup's. Raises nothing."""
    directory = Path(directory)
    try:
        entries = [Path(e.path) for e in os.scandir(directory) if e.name != OWNER_FILE]
    except OSError:
        return
    for path in entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(OSError):
        if any(e.name != OWNER_FILE for e in os.scandir(directory)):
            return  # what could not be removed stays claimed
        (directory / OWNER_FILE).unlink(missing_ok=True)
        directory.rmdir()


def disown(directory: Path) -> None:
    """Keep ``directory`` for good: remove the owner file :func:`claim` wrote, so that no
    :func:`sweep` takes it once this process is gone (a directory kept on purpose for a look
    afterwards). Raises nothing."""
    with contextlib.suppress(OSError):
        (Path(directory) / OWNER_FILE).unlink(missing_ok=True)


def owner_gone(directory: Path) -> bool:
    """Whether ``directory`` was claimed by a process that no longer runs (False without an
    owner file, or with one that cannot be read: never ours to judge)."""
    try:
        pid_text, start = (directory / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    return _start_time(pid) != start


def _names_path(pid: int, roots: tuple[str, ...]) -> bool:
    """Whether process ``pid``'s argv, environment, working directory or root directory names a
    path at or below one of ``roots``."""

    def under(text: str) -> bool:
        return any(r in text and _below(text, r) for r in roots)

    for link in ("cwd", "root"):  # root: a process chrooted below (a runtime node's view)
        with contextlib.suppress(OSError):
            if under(os.readlink(f"/proc/{pid}/{link}")):
                return True
    for what in ("cmdline", "environ"):
        try:
            raw = Path(f"/proc/{pid}/{what}").read_bytes()
        except OSError:
            continue
        if any(under(part) for part in raw.decode(errors="replace").split("\0")):
            return True
    return False


def _below(text: str, root: str) -> bool:
    """``text`` (an argument, ``NAME=value`` or ``--opt=value``) holds ``root`` as a whole
    path: followed by ``/``, ``:`` (a storage option's ``PATH:ref``) or nothing."""
    start = text.find(root)
    while start >= 0:
        end = start + len(root)
        if end == len(text) or text[end] in "/:":
            return True
        start = text.find(root, start + 1)
    return False


def _processes() -> dict[int, int]:
    """pid → parent pid of every process."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def processes_in(directories: Iterable[Path]) -> list[int]:
    """The processes that name a path in ``directories`` (module doc, step 1) and all their
    descendants; never this process or its ancestors."""
    roots = tuple(os.path.realpath(d) for d in directories)
    parents = _processes()
    spared = set()
    pid = os.getpid()
    while pid > 0 and pid not in spared:
        spared.add(pid)
        pid = parents.get(pid, 0)
    found = {p for p in parents if p not in spared and _names_path(p, roots)}
    children: dict[int, list[int]] = {}
    for p, parent in parents.items():
        children.setdefault(parent, []).append(p)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found and child not in spared:
                found.add(child)
                stack.append(child)
    return sorted(found)


def kill_processes(pids: list[int]) -> None:
    """SIGKILL ``pids`` and wait (up to :data:`KILL_WAIT`) until none of them runs."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)  # gone or a zombie: its mounts and open files are free then


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (field 3 of ``/proc/PID/stat``)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def build_dirs(cache_dir: Path) -> list[Path]:
    """Where image builds stage in the cache ``cache_dir``, for :func:`sweep`."""
    return [cache_dir / d for d in CACHE_BUILD_DIRS]


def bundled_below(root: Path, directory: Path) -> list[str]:
    """The containers in the runc state directory ``root`` whose bundle is at or below
    ``directory`` (runc labels each state with ``bundle=PATH``)."""
    real = os.path.realpath(directory)
    found = []
    for state in sorted(root.glob("*/state.json")):
        try:
            labels = json.loads(state.read_text()).get("config", {}).get("labels") or []
        except (OSError, ValueError, AttributeError):
            continue
        bundles = [lb.removeprefix("bundle=") for lb in labels if str(lb).startswith("bundle=")]
        if any(_below(b, real) and b.startswith(real) for b in bundles):
            found.append(state.parent.name)
    return found


def sweep(*directories: Path | str | None) -> list[Swept]:
    """Remove the claimed directories in ``directories`` (None is skipped), the temporary
    directory and ``/tmp`` (a runroot's place) whose owner is gone, with their processes and
    mounts (module doc). Returns what it removed; raises nothing (what could not be removed
    is marked ``left``)."""
    from harness.podman import mounts_below, runtime_containers, runtime_path, unmount_below

    bases = {os.path.realpath(d) for d in (*directories, tempfile.gettempdir(), "/tmp") if d}
    stale = [
        d
        for base in sorted(bases)
        for pattern in PATTERNS
        for d in sorted(Path(base).glob(pattern))
        if owner_gone(d)
    ]
    if not stale:
        return []
    found = {d: processes_in([d]) for d in stale}
    kill_processes(sorted({p for pids in found.values() for p in pids}))
    done = []
    for d in stale:
        swept = Swept(d, found[d])
        build_root = d / "runc"  # a build's RUN steps (PodmanEnv.build_runtime_root)
        containers = [(build_root, cid) for cid in runtime_containers(build_root)]
        containers += [(RUNC_DEFAULT_ROOT, cid) for cid in bundled_below(RUNC_DEFAULT_ROOT, d)]
        for root, cid in containers:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    [runtime_path(), "--root", str(root), "delete", "--force", cid],
                    capture_output=True,
                    timeout=30,
                )
        swept.mounts = unmount_below(d)
        if mounts_below(d):
            swept.left = True
        else:
            shutil.rmtree(d, ignore_errors=True)
            swept.left = d.exists()
        done.append(swept)
    return done


def sweep_killed_runs(*directories: Path | str | None, cache_dir: Path) -> list[str]:
    """Remove what killed runs left and say what, one line each: their directories under
    ``directories`` and the runtime builds of ``cache_dir`` (stores, containers, mounts:
    :func:`sweep`), their network namespaces (:func:`harness.netshape.cleanup_stale`),
    runtime node views (:func:`harness.runtimes.clean_stale_views`) and the node builds they
    did not finish (:func:`harness.runtimes.remove_dead_builds`). `lazybench cleanup`, and
    every `lazybench run` before it starts: the namespaces are not left to the link, as a
    ``loopback`` run makes none, and a killed shaped run's stayed through any number of
    loopback runs after it."""
    from harness.netshape import cleanup_stale
    from harness.runtimes import NodeError, clean_stale_views, remove_dead_builds

    # Node views first: a container podman ran in a node has its overlay and shm mounts in
    # the view, over directories of the run's podman workdir, which cannot be removed (EBUSY)
    # while those stay mounted.
    lines = [f"node view {p}" for p in clean_stale_views()]
    lines += [s.line() for s in sweep(*directories, *build_dirs(cache_dir))]
    lines += cleanup_stale()
    try:
        lines += [f"node build {p}" for p in remove_dead_builds(cache_dir)]
    except NodeError as exc:
        lines.append(f"a dead node build: {exc}; some of it is still there: remove it by hand")
    return lines
