"""Runtime nodes: Debian roots with another podman generation, built, cached and entered.

The host runs Debian 12's podman 4.3 (containers/storage 1.43, the layer-store protocol by
compressed digest). A *node* is a Debian ``trixie`` (podman 5.4, c/storage 1.57) or ``sid``
(podman 5.8, c/storage 1.64) root made with ``mmdebstrap --variant=apt`` from Debian's archive,
in which podman runs as root through ``chroot``. DESIGN.md §7 has the facts this rests on.

Building (:func:`build_node`): the root is cached under ``$LAZYBENCH_CACHE/nodes/<name>-<hash>``
(``~/.cache/lazybench`` by default) where ``hash`` covers the recipe (suite, packages, apt
options), built in a temporary directory and renamed into place, so a reader never sees half a
node; a cached build whose files no longer match its packages' (``dpkg --verify``) is built
again, and what a killed build left is removed (:func:`remove_dead_builds`).
``versions.json`` beside ``root/`` records every package version, podman's and the
containers/storage and containers/image versions it was built with (Debian's
``Built-Using``/``Static-Built-Using`` fields), the build time and the size.

Entering (:func:`enter_node`): every entry gets a private, writable view of the cached root —
an overlay mount whose upper layer is thrown away on exit — with proc, ``/sys`` and ``/dev``
(rbind, rslave: nothing unmounted there reaches the host), a tmpfs on ``/run``, and any host
paths the caller binds at the same path (podman's graphroot and configs, the layer store's
mountpoint), so one path means the same file on the host and in the node. The view is a mount
point, which runc's ``pivot_root`` needs. Every mount is torn down on exit, on error and on
Ctrl-C; a view that cannot be unmounted is left in place (never deleted through a mount) and
named in the error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cli import default_cache_dir
from harness.processes import kill_group
from harness.stale import claim, kill_processes, owner_gone, processes_in

NODES: dict[str, str] = {"trixie": "trixie", "sid": "sid"}  # node name -> Debian suite
HOST = "host"
NODE_NAMES = (HOST, *NODES)

# What podman needs as root in a chroot, python3 for the layer store's auth helper, and skopeo
# to write zstd:chunked images the way this generation's containers/image writes them.
PACKAGES = (
    "podman",
    "skopeo",
    "runc",
    "conmon",
    "fuse-overlayfs",
    "containers-storage",
    "fuse3",
    "netavark",
    "catatonit",
    "ca-certificates",
    "python3-minimal",
)
# The archive's Release files can be older than this machine's clock.
APT_OPTIONS = ('Acquire::Check-Valid-Until "false"',)
RECIPE_VERSION = 1
BUILD_TIMEOUT = 1800.0
VERIFY_TIMEOUT = 300.0  # `dpkg --verify` of a node's root (~300 MB, read once)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Where the layer store's auth helper is installed inside a node (registries.conf names it).
HELPER_IN_NODE = "/usr/local/bin/stargz-store-helper"
# The Go store's (and ours, for the default --root) credential socket.
DEFAULT_STORE_SOCKET = "/var/lib/stargz-store/store.sock"
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class NodeError(RuntimeError):
    """A node could not be built, found or entered; the message says what to do next."""


@dataclass(frozen=True)
class Node:
    """A built node: ``root`` is the Debian tree, ``versions`` what ``versions.json`` holds."""

    name: str
    directory: Path
    versions: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def podman_version(self) -> str:
        return str(self.versions.get("podman", ""))

    @property
    def storage_version(self) -> str:
        return str(self.versions.get("containers_storage", ""))


# -- recipes and the cache ----------------------------------------------------------------------


def check_name(name: str) -> str:
    if name not in NODES:
        raise NodeError(f"unknown node {name!r} (known: {', '.join(NODES)})")
    return name


def recipe(name: str) -> dict[str, Any]:
    """What a node is built from: the inputs of its cache key."""
    return {
        "suite": NODES[check_name(name)],
        "variant": "apt",
        "packages": sorted(PACKAGES),
        "apt_options": list(APT_OPTIONS),
        "version": RECIPE_VERSION,
    }


def recipe_hash(name: str) -> str:
    return hashlib.sha256(json.dumps(recipe(name), sort_keys=True).encode()).hexdigest()[:16]


def nodes_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "nodes"


def node_dir(name: str, cache_dir: Path | None = None) -> Path:
    return nodes_dir(cache_dir) / f"{name}-{recipe_hash(name)}"


def cached_node(name: str, cache_dir: Path | None = None) -> Node | None:
    """The cached build of the current recipe of ``name``, or ``None``."""
    directory = node_dir(name, cache_dir)
    try:
        versions = json.loads((directory / "versions.json").read_text())
    except (OSError, ValueError):
        return None
    return Node(name, directory, versions)


def debian_mirror(sources: Sequence[Path] | None = None) -> str:
    """The Debian archive this machine's apt uses (``$LAZYBENCH_DEBIAN_MIRROR`` overrides).

    Read from ``/etc/apt/sources.list`` and ``/etc/apt/sources.list.d/*.sources|*.list``: the
    first ``URIs:`` (deb822) or ``deb URI`` line that is not the security archive.
    """
    if env := os.environ.get("LAZYBENCH_DEBIAN_MIRROR"):
        return env
    if sources is None:
        apt = Path("/etc/apt")
        sources = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.sources"))]
        sources += sorted((apt / "sources.list.d").glob("*.list"))
    for path in sources:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                line = line.strip()
                m = re.match(r"URIs:\s*(\S+)", line) or re.match(
                    r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line
                )
                uri = m.group(1) if m else ""
                if uri.startswith(("http://", "https://")) and "security" not in uri:
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def _lock(path: Path, *, shared: bool = False, blocking: bool = True) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")  # noqa: SIM115 - closed by the caller (or with the process)
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(f, flags)
    except BlockingIOError:
        f.close()
        raise
    return f


# How long a build waits for another build of the same node: that one's whole watchdog, and
# a margin for its dpkg --verify and its removal of what a killed build left.
BUILD_LOCK_WAIT = BUILD_TIMEOUT + VERIFY_TIMEOUT + 120.0


@contextlib.contextmanager
def _build_lock(path: Path, name: str, progress: Callable[[str], None]) -> Iterator[None]:
    """Hold the build lock of node ``name``: at once, or after saying so through
    ``progress`` and waiting at most :data:`BUILD_LOCK_WAIT` seconds for the build that holds
    it (:class:`NodeError` then, naming the lock)."""
    try:
        held = _lock(path, blocking=False)
    except BlockingIOError:
        progress(f"waiting for another build of node {name} to finish (it holds {path})")
        deadline = time.monotonic() + BUILD_LOCK_WAIT
        while True:
            time.sleep(0.5)
            try:
                held = _lock(path, blocking=False)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise NodeError(
                        f"another build of node {name} still holds {path} after "
                        f"{BUILD_LOCK_WAIT:.0f} s: stop it (`fuser {path}` names it), then "
                        f"run `lazybench runtimes build {name}` again"
                    ) from None
    try:
        yield
    finally:
        held.close()


def build_node(
    name: str,
    cache_dir: Path | None = None,
    *,
    progress: Callable[[str], None] = lambda _: None,
    mirror: str | None = None,
) -> Node:
    """The node ``name`` (``trixie`` or ``sid``), built now unless cached; raise NodeError.

    Concurrent builders of the same node wait for each other (a lock file beside it) and the
    second one reuses the first one's build. ``progress`` receives mmdebstrap's lines.

    A cached build is checked first (:func:`node_damage`): one whose files were changed or
    removed, or whose ``versions.json`` is unreadable, is built again (removed first; a
    :class:`NodeError` when a running lazybench has it entered). What builds killed with
    their lazybench left of this node (:func:`remove_dead_builds`) is removed.
    """
    check_name(name)
    if (node := cached_node(name, cache_dir)) is not None and not node_damage(node):
        return node
    if shutil.which("mmdebstrap") is None:
        raise NodeError("mmdebstrap is not installed: run ci/install-system-deps")
    final = node_dir(name, cache_dir)
    with _build_lock(final.with_name(f".{final.name}.lock"), name, progress):
        # Checked again: another builder may have replaced it while we waited for the lock.
        node = cached_node(name, cache_dir)
        damage = node_damage(node) if node is not None else []
        if node is not None and not damage:
            return node
        for stale in sorted(final.parent.glob(f".tmp-{final.name}-*")):
            _remove_dead_build(stale)  # ours to remove: we hold the lock its builder held
        if final.exists():
            why = "; ".join(damage[:5]) if damage else "its versions.json is missing or unreadable"
            progress(f"node {name} at {final} is damaged ({why}): building it again")
            _discard(final, name, why)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            node = _build(name, tmp, final, mirror or debian_mirror(), progress)
        except BaseException as exc:
            # mmdebstrap killed part way (Ctrl-C, the watchdog) leaves proc, sys and dev
            # mounted in the root it was making: unmounted first, never removed through.
            try:
                _remove_tree(tmp)
            except NodeError as left:
                exc.add_note(str(left))
            raise
        _remove_tree(tmp)  # gone once renamed into place; not when another build landed first
        return node


def node_damage(node: Node) -> list[str]:
    """What is wrong with a built node's files: ``dpkg --verify`` of its root (each file every
    package installed, checked against the package's md5sums: ``missing /usr/bin/podman``,
    ``??5?????? /usr/sbin/runc`` for a changed or truncated one); ``[]`` for an intact node,
    and when dpkg cannot tell (not installed, no answer within :data:`VERIFY_TIMEOUT`).
    dpkg(1), ``--verify``: the output is in rpm's ``--verify`` format."""
    if not node.root.is_dir():
        return [f"{node.root} is missing"]
    try:
        proc = subprocess.run(
            ["dpkg", f"--root={node.root}", "--verify"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=VERIFY_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [" ".join(line.split()) for line in proc.stdout.splitlines() if line.strip()]


def _discard(directory: Path, name: str, why: str) -> None:
    """Remove the damaged build ``directory`` of node ``name`` unless a process has it
    entered (its ``.in-use`` lock); raise :class:`NodeError` saying what to do then."""
    try:
        in_use = _lock(directory / ".in-use", blocking=False)
    except BlockingIOError:
        raise NodeError(
            f"node {name} at {directory} is damaged ({why}), and a running lazybench has it "
            f"entered: once that has ended, `lazybench runtimes build {name}` builds it again"
        ) from None
    try:
        trash = Path(tempfile.mkdtemp(prefix=".prune-", dir=directory.parent))
        os.rename(directory, trash / directory.name)
    finally:
        in_use.close()
    _remove_tree(trash)


def _remove_dead_build(stale: Path) -> None:
    """Remove the temporary directory of a build whose lazybench died (its lock is free):
    the processes still working in it (mmdebstrap, apt, dpkg: started in a session of
    their own, they outlive a SIGKILLed lazybench) stopped, then mmdebstrap's mounts
    unmounted (proc, sys, a devpts, and a bind of the host's ``/dev/shm``: removed through,
    the host's shared memory files would go), then the tree. Raises :class:`NodeError` for
    mounts that stay."""
    kill_processes(processes_in([stale]))
    _remove_tree(stale)


def remove_dead_builds(cache_dir: Path | None = None) -> list[Path]:
    """Remove what node builds killed with their lazybench left in the cache (see
    :func:`_remove_dead_build`): their ``.tmp-*`` directories whose build lock nobody holds.
    Returns what was removed; raises :class:`NodeError` for one that could not be."""
    removed = []
    base = nodes_dir(cache_dir)
    for stale in sorted(base.glob(".tmp-*")) if base.exists() else []:
        lock_path = base / f".{stale.name[5:].rsplit('-', 1)[0]}.lock"
        try:
            lock = _lock(lock_path, blocking=False)
        except BlockingIOError:
            continue  # its build runs
        try:
            _remove_dead_build(stale)
        finally:
            lock.close()
        removed.append(stale)
    return removed


def _build(name: str, tmp: Path, final: Path, mirror: str, progress: Callable[[str], None]) -> Node:
    root = tmp / "root"
    argv = [
        "mmdebstrap",
        "--variant=apt",
        *(f"--aptopt={o}" for o in APT_OPTIONS),
        f"--include={','.join(PACKAGES)}",
        NODES[name],
        str(root),
        mirror,
    ]
    progress(f"mmdebstrap {NODES[name]} from {mirror}")
    start = time.monotonic()
    log: list[str] = []
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        # The watchdog kills apt and dpkg too: they hold stderr open. Out of our session, they
        # outlive a SIGKILLed lazybench (mmdebstrap defers SIGTERM until its work is done, so
        # a parent-death signal would not help) until their next write to stderr: whoever
        # removes the dead build's directory stops them first (_remove_dead_build).
        start_new_session=True,
    )
    assert proc.stderr is not None
    watchdog = threading.Timer(BUILD_TIMEOUT, kill_group, args=(proc,))  # a silent hang ends too
    watchdog.start()
    try:
        for line in proc.stderr:  # mmdebstrap reports progress as "I: ..." lines on stderr
            log.append(line)
            if line.startswith(("I: ", "W: ", "E: ")):
                progress(line.rstrip())
        returncode = proc.wait(timeout=60)
    except BaseException:
        kill_group(proc)
        raise
    finally:
        watchdog.cancel()
    if time.monotonic() - start >= BUILD_TIMEOUT:
        raise NodeError(f"building node {name}: mmdebstrap did not finish in {BUILD_TIMEOUT:.0f}s")
    if returncode != 0:
        raise NodeError(
            f"building node {name}: mmdebstrap exited {returncode} "
            f"(is {mirror} reachable? name another with --mirror or LAZYBENCH_DEBIAN_MIRROR): "
            + "".join(log[-15:]).strip()
        )
    seconds = time.monotonic() - start
    versions = _package_versions(root)
    info = {
        "node": name,
        "recipe": recipe(name),
        "recipe_hash": recipe_hash(name),
        "mirror": mirror,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 1),
        "size_bytes": _tree_size(root),
        **versions,
    }
    (tmp / "versions.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    try:
        os.rename(tmp, final)
    except OSError as exc:  # someone else's build landed first (no lock on another host)
        if cached_node(name, final.parent.parent) is None:
            raise NodeError(f"cannot move the built node into {final}: {exc}") from None
    progress(
        f"node {name}: podman {info['podman']}, containers/storage "
        f"{info['containers_storage']}, {info['size_bytes'] / 1e6:.0f} MB, {seconds:.0f}s"
    )
    node = cached_node(name, final.parent.parent)
    assert node is not None
    return node


def _tree_size(root: Path) -> int:
    proc = subprocess.run(
        ["du", "-sb", "--one-file-system", str(root)], capture_output=True, text=True, timeout=300
    )
    return int(proc.stdout.split()[0]) if proc.returncode == 0 and proc.stdout else 0


def _dpkg(root: Path | None, fmt: str, *packages: str) -> str:
    argv = ["dpkg-query", "-W", "-f", fmt, *packages]
    if root is not None:
        argv = ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", fmt, *packages]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else ""


def _package_versions(root: Path | None) -> dict[str, Any]:
    """Package versions of a root (``None``: the host), and what podman was built with."""
    listing = _dpkg(root, "${Package}\t${Version}\n")
    packages = dict(line.split("\t", 1) for line in listing.splitlines() if "\t" in line)
    built_with = _dpkg(root, "${Built-Using}, ${Static-Built-Using}", "podman")
    deps = dict(re.findall(r"([a-z0-9.+-]+) \(= ([^)]+)\)", built_with))
    return {
        "podman": _upstream(packages.get("podman", "")),
        "podman_package": packages.get("podman", ""),
        "containers_storage": _upstream(deps.get("golang-github-containers-storage", "")),
        "containers_image": _upstream(deps.get("golang-github-containers-image", "")),
        "packages": packages,
    }


def _upstream(debian_version: str) -> str:
    """``1:1.43.0+ds1-8`` → ``1.43.0``: the upstream part of a Debian version."""
    v = debian_version.split(":", 1)[-1]
    return re.split(r"[+~-]", v, maxsplit=1)[0]


def host_versions() -> dict[str, Any]:
    """The host's podman and containers/storage versions (as :func:`build_node` records)."""
    versions = _package_versions(None)
    versions.pop("packages")
    return versions


def runtime_versions(node: str, cache_dir: Path | None = None) -> dict[str, str]:
    """``{"node", "podman", "containers_storage", "containers_image"}`` of a node name (empty
    versions for a node not built in ``cache_dir``)."""
    if node == HOST:
        v = host_versions()
    else:
        built = cached_node(node, cache_dir)
        v = built.versions if built else {}
    return {
        "node": node,
        "podman": str(v.get("podman", "")),
        "containers_storage": str(v.get("containers_storage", "")),
        "containers_image": str(v.get("containers_image", "")),
    }


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.57.2"`` → ``(1, 57, 2)``; an unknown version sorts first."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3]) or (0,)


def list_nodes(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every node directory in the cache, with ``current`` = built from today's recipe."""
    out = []
    base = nodes_dir(cache_dir)
    for directory in sorted(base.glob("*")) if base.exists() else []:
        if directory.name.startswith(".") or not directory.is_dir():
            continue
        try:
            v = json.loads((directory / "versions.json").read_text())
        except (OSError, ValueError):
            v = {}
        name = str(v.get("node", directory.name.rsplit("-", 1)[0]))
        current = name in NODES and directory.name == f"{name}-{recipe_hash(name)}"
        out.append(
            {
                "node": name,
                "path": str(directory / "root"),
                "current": current,
                "podman": v.get("podman", ""),
                "containers_storage": v.get("containers_storage", ""),
                "size_bytes": v.get("size_bytes", 0),
                "build_seconds": v.get("build_seconds"),
                "built": v.get("built", ""),
            }
        )
    return out


def prune_nodes(cache_dir: Path | None = None, *, everything: bool = False) -> list[Path]:
    """Remove node builds of old recipes (all with ``everything``) that nobody has entered."""
    removed = []
    base = nodes_dir(cache_dir)
    for entry in list_nodes(cache_dir):
        directory = Path(entry["path"]).parent
        if entry["current"] and not everything:
            continue
        try:
            lock = _lock(directory / ".in-use", blocking=False)
        except BlockingIOError:
            continue  # entered right now
        try:
            trash = Path(tempfile.mkdtemp(prefix=".prune-", dir=base))
            os.rename(directory, trash / directory.name)
        finally:
            lock.close()
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(directory)
    return removed + remove_dead_builds(cache_dir)


# -- entering a node -----------------------------------------------------------------------------


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")


@dataclass
class EnteredNode:
    """A node's private view while entered: bind host paths in, run commands in it."""

    node: Node
    view: Path
    _binds: list[Path] = field(default_factory=list)

    def host_path(self, path: Path | str) -> Path:
        """Where the node's ``path`` is on the host."""
        return self.view / str(path).lstrip("/")

    def bind(self, host: Path, at: Path | str | None = None) -> Path:
        """Make ``host`` (a directory or file, with what is mounted below it) visible in the
        node at ``at`` (default: the same path); returns the host path of the target."""
        host = Path(os.path.realpath(host))
        target = self.host_path(at if at is not None else host)
        if host.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        _run("mount", "--rbind", str(host), str(target))
        _run("mount", "--make-rslave", str(target))
        self._binds.append(target)
        return target

    def install(self, text: str, at: str, mode: int = 0o755) -> None:
        """Write a file into the node's (throw-away) view, e.g. a script it should run."""
        path = self.host_path(at)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside the node (through ``chroot``)."""
        return ["chroot", str(self.view), *argv]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean environment for commands in the node (the host's venv PATH means nothing
        there); podman 5's cgroups-v1 deprecation warning would land in every stderr."""
        env = {
            "PATH": NODE_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
        }
        env.update(extra or {})
        return env


@contextlib.contextmanager
def enter_node(node: Node, workdir: Path | None = None) -> Iterator[EnteredNode]:
    """Enter ``node``: a private writable view with proc, sys, dev and run; torn down on exit.

    ``workdir`` holds the view's mount point and overlay upper layer (default: a temporary
    directory); it must be on a filesystem overlayfs accepts as upper (not overlayfs itself).
    Raises :class:`NodeError` when a mount fails (everything mounted so far is undone).
    """
    in_use = _lock(node.directory / ".in-use", shared=True)
    base = Path(tempfile.mkdtemp(prefix=f"lzb-node-{node.name}-", dir=workdir))
    view = base / "root"
    for d in ("root", "upper", "work"):
        (base / d).mkdir()
    claim(base)  # for clean_stale_views after a SIGKILL
    entered = EnteredNode(node, view)
    try:
        _run(
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={node.root},upperdir={base / 'upper'},workdir={base / 'work'}",
            str(view),
        )
        _run("mount", "--make-private", str(view))
        _run("mount", "-t", "proc", "proc", str(view / "proc"))
        for d in ("sys", "dev"):
            _run("mount", "--rbind", f"/{d}", str(view / d))
            _run("mount", "--make-rslave", str(view / d))
        _run("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", str(view / "run"))
        yield entered
    finally:
        try:
            _teardown(base, view)
        finally:
            in_use.close()


def clean_stale_views(directory: Path | None = None) -> list[Path]:
    """Tear down node views left by processes that died without cleaning up (SIGKILL):
    ``lzb-node-*`` directories in ``directory`` (default: the temporary directory) whose
    owner process is gone. What still runs in a view is stopped first (podman, ``conmon``
    and the containers, chrooted there) and the OCI runtime's containers in the view's
    ``/run/runc`` deleted with the node's own ``runc`` (which removes their cgroups): the
    view's tmpfs on ``/run`` is their only record. Returns what was removed."""
    removed = []
    for base in Path(directory or tempfile.gettempdir()).glob("lzb-node-*"):
        if not owner_gone(base):  # live, or without an owner file (harness.stale)
            continue
        view = base / "root"
        kill_processes(processes_in([view]))
        _delete_runtime_containers(view)
        with contextlib.suppress(NodeError):
            _teardown(base, view)
            removed.append(base)
    return removed


def _delete_runtime_containers(view: Path) -> None:
    """``runc delete --force`` inside a mounted view, of every container whose state is in
    its ``/run/runc`` (runc's state directory for root, podman's default)."""
    from harness.podman import RUNTIME, runtime_containers

    state = view / "run" / RUNTIME
    for cid in runtime_containers(state):
        argv = ["chroot", str(view), RUNTIME, "--root", f"/run/{RUNTIME}", "delete", "--force", cid]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(argv, capture_output=True, timeout=30, env={"PATH": NODE_PATH})


def _teardown(base: Path, view: Path) -> None:
    _remove_tree(base, f"umount -R -l {view}")


def _remove_tree(base: Path, unmount: str = "") -> None:
    """Remove ``base`` after unmounting everything mounted below it (deepest first, lazily):
    a tree is never removed through a mount (a view's proc, sys, dev and binds; mmdebstrap's
    in a build it did not finish). Raises :class:`NodeError` naming what stays mounted, with
    ``base`` left in place; ``unmount`` is the command the message suggests (default:
    ``umount -l`` of each)."""
    from harness.podman import mounts_below, unmount_below

    unmount_below(base)
    left = mounts_below(base)
    if left:
        command = unmount or "umount -l " + " ".join(map(str, left[:5]))
        raise NodeError(
            f"could not unmount {', '.join(map(str, left[:5]))}: left {base} in place; "
            f"unmount them with `{command}` and remove it"
        )
    shutil.rmtree(base, ignore_errors=True)
