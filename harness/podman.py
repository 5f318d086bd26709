"""An isolated podman: its own storage, configuration and registries, torn down completely.

Every measurement and every end-to-end test gets a fresh :class:`PodmanEnv`, so no image,
layer or cached blob of one run leaks into the next. The environment never touches the host's
``/etc/containers``: it writes its own ``containers.conf``, ``storage.conf`` and
``registries.conf`` and points podman at them through ``CONTAINERS_*`` variables.

Three host-wide things podman 4.3 keeps outside ``--root`` are handled here too:

* the blob-info cache (``/var/lib/containers/cache/blob-info-cache-v1.boltdb``), which makes
  podman silently reuse blobs it saw in an earlier pull or push — cleared on entry;
* the overlay driver's bind mount of ``<graphroot>/overlay`` onto itself, and the overlay
  mounts of running containers — unmounted on exit;
* the runc containers of a ``podman build``'s RUN steps (their processes, cgroups and state
  in ``/run/runc``), which podman does not track and leaves running when it is stopped
  itself — run with their state in the env's runroot instead, and deleted when the build ends
  (:meth:`PodmanEnv.build`) and on exit.

The podman may be the host's or a runtime node's (:mod:`harness.runtimes`: podman 5.x from
Debian trixie or sid, run through ``chroot``). With a node, the environment enters it on entry
and binds its own directory and the layer store's mountpoint into the node at the same paths,
so the configuration files, graphroot and store path read the same on both sides; every
podman command (:meth:`PodmanEnv.argv`) runs inside it, and the node is left on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.processes import run_bounded, stop_group
from harness.stale import claim, release

if TYPE_CHECKING:
    from harness.runtimes import EnteredNode, Node

BLOB_INFO_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")

# What this machine's podman 4.3 needs (see DESIGN.md §6): crun fails on the hybrid cgroup
# setup, the default bridge network rewrites host networking, default ulimits are too high.
CONTAINERS_CONF = """\
[containers]
netns = "host"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


# The OCI runtime CONTAINERS_CONF names, and where it is looked for besides PATH (podman looks
# in these too; root's PATH may lack the sbin directories).
RUNTIME = "runc"
RUNTIME_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# How long a stopped build's process group gets to exit on SIGTERM before SIGKILL, and each
# `runc delete --force` of a RUN step's container to finish.
BUILD_STOP_GRACE = 5.0
RUNTIME_DELETE_TIMEOUT = 30.0


# What a runtime that forgets lazily pulled images is reported with (DESIGN.md §7).
PARTIAL_PULL_143_BUG = (
    "podman 4.3's own zstd:chunked partial pull (containers/storage 1.43) makes / mode 0700 "
    "unless a layer carries a ./ entry, and drops file owners and modification times: a "
    "workload that runs as a user other than root, or needs its files' owners, fails there "
    "(README, the two podman 4.3 bugs)"
)
LOST_LAYERS_BUG = (
    "containers/storage >= 1.58 PutAdditionalLayer bug: the layer's storage location is never "
    "set, so a lazily pulled image's layer records are not saved; once the pull exits the "
    "image is unlisted, inspect/save say 'layer not known', every command pulls again through "
    "the store and rmi never releases the store's layers"
)


@dataclass(frozen=True)
class Persistence:
    """Whether a pulled image survived its pull: checked by fresh podman processes."""

    listed: bool  # `podman images` lists the reference
    layers_known: bool  # `podman image inspect` knows its layers
    detail: str = ""  # podman's complaint when not

    @property
    def ok(self) -> bool:
        return self.listed and self.layers_known


class PodmanError(RuntimeError):
    """A podman command failed or timed out; the message carries the command and its stderr."""


@dataclass
class PodmanResult:
    """What one podman command did and how long it took."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _stderr_tail(stderr: bytes | str | None, limit: int = 2000) -> str:
    """``"; its stderr so far: <its last limit characters>"`` for an error message, or ``""``.

    A timed-out ``subprocess.run`` hands back what was read so far as bytes even in text mode.
    """
    if not stderr:
        return ""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return f"; its stderr so far: {text.strip()[-limit:]}" if text.strip() else ""


def toml_str(value: str) -> str:
    """A TOML basic string (JSON string escaping is a subset TOML accepts)."""
    return json.dumps(value)


@dataclass
class PodmanEnv:
    """A podman with private graphroot/runroot and configuration under ``workdir``.

    The runroot is a short directory of its own under ``/tmp`` instead (``lzbr-*``, removed
    on exit): conmon's attach socket lives at ``<runroot>/overlay-containers/<64 hex id>/
    userdata/attach``, and when that passes the 108-byte limit of a socket path podman 4.3 still
    runs the container but ``run``/``start --attach`` return only after a 20 s timeout (seen
    with a workdir path longer than about 45 characters).

    ``additional_layer_store`` names a mounted layer store to consult while pulling (written
    as ``additionallayerstores = ["PATH:ref"]``). ``insecure_registries`` are reached over
    plain HTTP. ``partial_pulls`` turns on podman's own zstd:chunked partial pulls (written
    explicitly: containers/storage ≥ 1.56 has them off by default, 1.43 on).

    ``node`` (a built :class:`harness.runtimes.Node`) runs podman inside that runtime node
    instead of the host's; the layer store must be mounted before the env is entered (its
    mountpoint is bound into the node then). ``store_socket`` is the layer store's credential
    socket: inside a node it is bound at the place ``stargz-store-helper`` looks for it with no
    arguments, the helper is installed there and registries.conf names it as
    ``additional-layer-store-auth-helper`` (podman ≥ 5.2 runs it for every pull).
    ``auth_file`` (an auth.json) is copied into the env and given to podman only, as
    ``REGISTRY_AUTH_FILE``.
    """

    workdir: Path | None = None
    additional_layer_store: Path | None = None
    insecure_registries: Sequence[str] = ()
    partial_pulls: bool = False
    default_timeout: float = 600.0
    keep_blob_info_cache: bool = False
    node: Node | None = None
    store_socket: Path | None = None
    auth_file: Path | None = None
    _own_workdir: bool = field(default=False, init=False, repr=False)
    _runroot: Path | None = field(default=None, init=False, repr=False)
    _entered: EnteredNode | None = field(default=None, init=False, repr=False)
    _node_cm: Any = field(default=None, init=False, repr=False)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> PodmanEnv:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="lzb-podman-"))
            self._own_workdir = True
            claim(self.workdir)  # harness.stale.sweep removes it if we die uncleanly
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.node is not None:  # the same path on both sides of the node's bind mount
            self.workdir = Path(os.path.realpath(self.workdir))
        for sub in ("graph", "tmp"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self._runroot = Path(tempfile.mkdtemp(prefix="lzbr-", dir="/tmp"))
        claim(self._runroot)
        try:
            if self.auth_file is not None:  # created 0600: credentials are never world-readable
                fd = os.open(
                    self.workdir / "auth.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
                )
                with os.fdopen(fd, "wb") as out:
                    out.write(self.auth_file.read_bytes())
            if self.node is not None:
                try:
                    self._enter_node()
                except BaseException:
                    self._leave_node()
                    raise
            self._write_configs()
        except BaseException:
            # No podman ran yet, and without its configs a podman call would reach the host's
            # default storage: undo by hand what was made, nothing else.
            self._leave_node()
            release(self._runroot)
            if self._own_workdir:
                release(self.workdir)
            raise
        if not self.keep_blob_info_cache and self.node is None:
            # A node's blob-info cache lives in its throw-away view: fresh on every entry.
            BLOB_INFO_CACHE.unlink(missing_ok=True)
        return self

    def _enter_node(self) -> None:
        from harness.runtimes import DEFAULT_STORE_SOCKET, HELPER_IN_NODE, enter_node

        assert self.node is not None and self.workdir is not None
        self._node_cm = enter_node(self.node)
        self._entered = self._node_cm.__enter__()
        self._entered.bind(self.workdir)
        self._entered.bind(self.runroot)
        if self.additional_layer_store is not None:
            self._entered.bind(self.additional_layer_store)
        if self.store_socket is not None:
            from store import helper

            self._entered.bind(self.store_socket, at=DEFAULT_STORE_SOCKET)
            self._entered.install(Path(helper.__file__).read_text(), HELPER_IN_NODE)

    def host_path(self, path: Path | str) -> Path:
        """Where a path the runtime printed (``podman image mount``'s, say) is on the host: the
        same path on the host, the node's view of it inside a node. Raises
        :class:`RuntimeError` for a node not entered (outside ``with``)."""
        if self.node is None:
            return Path(path)
        if self._entered is None:
            raise RuntimeError("host_path: the runtime node is entered only inside `with`")
        return self._entered.host_path(path)

    def _leave_node(self) -> None:
        cm, self._node_cm, self._entered = self._node_cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def graphroot(self) -> Path:
        assert self.workdir is not None, "PodmanEnv used outside its context"
        return self.workdir / "graph"

    @property
    def runroot(self) -> Path:
        assert self._runroot is not None, "PodmanEnv used outside its context"
        return self._runroot

    @property
    def build_runtime_root(self) -> Path:
        """The OCI runtime's state directory (its ``--root``) for :meth:`build`'s RUN steps:
        every container in it is this env's, and is deleted when the build ends."""
        return self.runroot / "runc"

    def close(self) -> None:
        """Stop containers (a build's RUN steps too), unmount everything under the graphroot,
        remove the workdir."""
        if self._runroot is not None:
            self.remove_build_containers()
        if self.workdir is None or not self.workdir.exists():
            if self._runroot is not None:
                unmount_below(self._runroot)
                release(self._runroot)
            return
        with contextlib.suppress(PodmanError):
            self._remove_all()
        if self._entered is not None:
            unmount_below(self._entered.host_path(self.workdir))
            if self._runroot is not None:
                unmount_below(self._entered.host_path(self._runroot))
        self._leave_node()
        unmount_below(self.workdir)
        if self._runroot is not None:
            unmount_below(self._runroot)
            release(self._runroot)
        if self._own_workdir:
            release(self.workdir)
        else:
            for sub in ("graph", "tmp"):
                shutil.rmtree(self.workdir / sub, ignore_errors=True)

    def _remove_all(self) -> None:
        """``podman rm --all --force`` and ``system reset``. A layer store's dead mount (its
        store killed; in a node, stopped too: the node's bind of it stays dead, whatever the
        host's mountpoint holds since) fails every podman command that opens the storage ("can't
        stat additionallayerstore dir: transport endpoint is not connected"), which would leave
        the containers running: then both again with a storage.conf without the store, which
        removing containers and layers does not need."""
        commands = (("rm", "--all", "--force", "--time", "0"), ("system", "reset", "--force"))
        failed = [self.podman(*c, timeout=60, check=False).returncode != 0 for c in commands]
        if any(failed) and self.additional_layer_store is not None:
            assert self.workdir is not None
            write_atomic(self.workdir / "storage.conf", self._storage_conf(layer_store=False))
            for command in commands:
                self.podman(*command, timeout=60, check=False)

    # -- configuration -----------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment a podman process of this env runs with."""
        assert self.workdir is not None
        ours = {
            "CONTAINERS_CONF": str(self.workdir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.workdir / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.workdir / "registries.conf"),
            "TMPDIR": str(self.workdir / "tmp"),
        }
        if self.auth_file is not None:
            ours["REGISTRY_AUTH_FILE"] = str(self.workdir / "auth.json")
        if self._entered is not None:
            return self._entered.env(ours)
        env = dict(os.environ)
        env.update(ours)
        return env

    def argv(self, *args: str) -> list[str]:
        """The command line of ``podman ARGS`` in this environment (inside its node, if any)."""
        if self._entered is not None:
            return self._entered.argv("podman", *args)
        return ["podman", *args]

    @property
    def storage_options(self) -> dict[str, Any]:
        """The ``[storage.options]`` this env wrote (for records: what the runtime was told)."""
        options: dict[str, Any] = {}
        if self.additional_layer_store is not None:
            options["additionallayerstores"] = [f"{self.additional_layer_store}:ref"]
        if self.partial_pulls:
            # Explicit: on by default in containers/storage 1.43, off since 1.56.
            options["pull_options"] = {"enable_partial_images": "true"}
        return options

    def _storage_conf(self, *, layer_store: bool = True) -> str:
        """The storage.conf text: the env's storage, its layer store unless ``layer_store``
        is false."""
        options: list[str] = []
        if self.additional_layer_store is not None and layer_store:
            options.append(
                f"additionallayerstores = [{toml_str(f'{self.additional_layer_store}:ref')}]"
            )
        if self.partial_pulls:
            options.append('pull_options = {enable_partial_images = "true"}')
        return (
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {toml_str(str(self.graphroot))}\n"
            f"runroot = {toml_str(str(self.runroot))}\n\n"
            "[storage.options]\n" + "\n".join(options) + "\n"
        )

    def _write_configs(self) -> None:
        assert self.workdir is not None
        storage = self._storage_conf()
        registries = 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
        if self.store_socket is not None and self._entered is not None:
            from harness.runtimes import HELPER_IN_NODE

            registries += f"additional-layer-store-auth-helper = {toml_str(HELPER_IN_NODE)}\n"
        for host in self.insecure_registries:
            registries += f"\n[[registry]]\nlocation = {toml_str(host)}\ninsecure = true\n"
        for name, text in (
            # [engine] is the last table: a private libpod tmp_dir, so another env's
            # `system reset` cannot remove our /run/libpod/alive.
            (
                "containers.conf",
                CONTAINERS_CONF + f"tmp_dir = {toml_str(str(self.workdir / 'libpod'))}\n",
            ),
            ("storage.conf", storage),
            ("registries.conf", registries),
        ):
            write_atomic(self.workdir / name, text)

    # -- commands ----------------------------------------------------------------------------

    def podman(
        self,
        *args: str,
        timeout: float | None = None,
        check: bool = True,
        input: str | None = None,
    ) -> PodmanResult:
        """Run ``podman ARGS`` in this environment; raise :class:`PodmanError` on failure."""
        cmd = self.argv(*args)
        start = time.monotonic()
        try:
            # Bounded after a kill too: a podman blocked on a hung layer store is not reaped.
            proc = run_bounded(
                cmd, env=self.env, input=input, timeout=timeout or self.default_timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise PodmanError(
                f"`{' '.join(cmd)}` did not finish within {exc.timeout:.0f}s"
                + _stderr_tail(exc.stderr)
            ) from None
        result = PodmanResult(
            cmd, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start
        )
        if check and proc.returncode != 0:
            raise PodmanError(
                f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        return result

    def build(self, *args: str, timeout: float | None = None) -> PodmanResult:
        """Run ``podman build ARGS``, leaving nothing of it running however it ends; raise
        :class:`PodmanError` on failure or timeout.

        podman 4.3 runs each RUN step as an OCI runtime container of its own (its own session
        and cgroup, reparented to init once podman is gone) through a ``buildah-oci-runtime``
        helper, which deletes it when the step ends. Stopped early, podman leaves the step
        running: SIGTERM or SIGINT to podman alone, or SIGKILL (what ``subprocess.run`` sends
        when interrupted or timed out), leave it running; the same signal to podman's whole
        process group only sometimes stops it, and still leaves its runtime state and cgroup.
        So the build runs in a process group of its own, with the runtime's state in
        :attr:`build_runtime_root` (``--runtime-flag=root=``; the image is the same), and when
        the command ends (done, failed, timed out, or interrupted by an exception such as
        :class:`harness.measure.Interrupted`) the group is stopped
        (:func:`harness.processes.stop_group`) and every container in that directory deleted
        (:meth:`remove_build_containers`)."""
        cmd = self.argv("build", f"--runtime-flag=root={self.build_runtime_root}", *args)
        limit = timeout or self.default_timeout
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            try:
                stdout, stderr = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                stop_group(proc, timeout=BUILD_STOP_GRACE)
                raise PodmanError(
                    f"`{' '.join(cmd)}` did not finish within {limit:.0f}s"
                    + _stderr_tail(_rest_of_stderr(proc))
                ) from None
        finally:
            stop_group(proc, timeout=BUILD_STOP_GRACE)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            left = self.remove_build_containers()
        if left:
            raise PodmanError(
                f"`{' '.join(cmd)}`: its RUN step containers {', '.join(left)} could not be "
                f"deleted (`{RUNTIME} --root {self.build_runtime_root} delete --force`)"
            )
        result = PodmanResult(cmd, proc.returncode, stdout, stderr, time.monotonic() - start)
        if proc.returncode != 0:
            raise PodmanError(
                f"`{' '.join(cmd)}` exited {proc.returncode}: {stderr.strip()[-2000:]}"
            )
        return result

    def remove_build_containers(self) -> list[str]:
        """Delete every container in :attr:`build_runtime_root` (``runc delete --force``:
        killed if it runs, its state and cgroup removed; each within
        :data:`RUNTIME_DELETE_TIMEOUT`); return the IDs of those still there after."""
        root = self.build_runtime_root
        for cid in runtime_containers(root):
            argv = [runtime_path(), "--root", str(root), "delete", "--force", cid]
            if self._entered is not None:  # the runroot is bound into the node at its path
                argv = self._entered.argv(RUNTIME, *argv[1:])
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    argv, env=self.env, capture_output=True, timeout=RUNTIME_DELETE_TIMEOUT
                )
        return runtime_containers(root)

    def pull(self, ref: str, *, timeout: float | None = None) -> PodmanResult:
        return self.podman("pull", "--quiet", ref, timeout=timeout)

    def create(self, ref: str, *cmd: str, interactive: bool = False, name: str = "") -> str:
        """Create a container (no network) and return its ID."""
        opts = ["--network=none"]
        if interactive:
            opts.append("--interactive")
        if name:
            opts += ["--name", name]
        return self.podman("create", *opts, ref, *cmd).stdout.strip()

    def run(self, ref: str, *cmd: str, timeout: float | None = None) -> PodmanResult:
        """``podman run --rm`` with no network; the container's stdout is in the result."""
        return self.podman("run", "--rm", "--network=none", ref, *cmd, timeout=timeout)

    def check_persistence(self, ref: str) -> Persistence:
        """Is ``ref`` listed and are its layers known, to podman processes started after the
        pull? (Not so on containers/storage ≥ 1.58 after a lazy pull: :data:`LOST_LAYERS_BUG`.)"""
        images = self.podman("images", "--format", "json", timeout=120, check=False)
        try:
            listed = any(ref in (i.get("Names") or []) for i in json.loads(images.stdout or "[]"))
        except (ValueError, AttributeError):
            listed = False
        inspect = self.podman(
            "image", "inspect", "--format", "{{json .RootFS.Layers}}", ref, timeout=120, check=False
        )
        detail = " ".join(
            line.strip()
            for r in (images, inspect)
            for line in r.stderr.splitlines()
            if (line.strip() and not line.startswith("time=")) or "layer" in line
        )
        return Persistence(listed, inspect.returncode == 0, detail[-500:])

    def image_layers(self, ref: str) -> list[str]:
        """The image's layer diff IDs (``RootFS.Layers``)."""
        out = self.podman("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref)
        return json.loads(out.stdout)


def _rest_of_stderr(proc: subprocess.Popen) -> str | None:
    """What a stopped process wrote to its stderr pipe and was not read yet (bounded: a
    descendant still holding the pipe would keep it open)."""
    try:
        return proc.communicate(timeout=BUILD_STOP_GRACE)[1]
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return None


def runtime_path() -> str:
    """The OCI runtime's executable (:data:`RUNTIME` on PATH or in :data:`RUNTIME_DIRS`)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *RUNTIME_DIRS])
    return shutil.which(RUNTIME, path=search) or RUNTIME


def runtime_containers(root: Path) -> list[str]:
    """The IDs of the containers whose state an OCI runtime (runc) keeps in ``root`` (one
    directory each, named by the ID); ``[]`` when ``root`` does not exist."""
    try:
        return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except FileNotFoundError:
        return []


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never half.
    On failure the temporary file is removed, the old file is left as it was, and the
    :class:`OSError` raised names ``path`` (not the temporary file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mounts_below(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (the order to unmount them in)."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            # The mount point is the 5th field, with spaces and such escaped as octal.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == root or point.startswith(root + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_below(path: Path, passes: int = 3) -> list[Path]:
    """Lazily unmount everything mounted at or below ``path`` (overlay, shm, bind, FUSE),
    deepest first, looking again up to ``passes`` times (a mount can be stacked on another,
    or appear under one being removed); returns the mount points it unmounted. What is still
    mounted after that, :func:`mounts_below` tells."""
    done: list[Path] = []
    for _ in range(passes):
        points = mounts_below(path)
        if not points:
            break
        for point in points:  # lazy: a busy mount detaches now and is freed later
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)
            if point not in done:
                done.append(point)
    return done
