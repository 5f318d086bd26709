"""An isolated podman: its own storage, configuration and registries, torn down completely.

Every measurement and every end-to-end test gets a fresh :class:`PodmanEnv`, so no image,
layer or cached blob of one run leaks into the next. The environment never touches the host's
``/etc/containers``: it writes its own ``containers.conf``, ``storage.conf`` and
``registries.conf`` and points podman at them through ``CONTAINERS_*`` variables.

Two host-wide things podman 4.3 keeps outside ``--root`` are handled here too:

* the blob-info cache (``/var/lib/containers/cache/blob-info-cache-v1.boltdb``), which makes
  podman silently reuse blobs it saw in an earlier pull or push — cleared on entry;
* the overlay driver's bind mount of ``<graphroot>/overlay`` onto itself, and the overlay
  mounts of running containers — unmounted on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    plain HTTP. ``partial_pulls`` turns on podman's own zstd:chunked partial pulls.
    """

    workdir: Path | None = None
    additional_layer_store: Path | None = None
    insecure_registries: Sequence[str] = ()
    partial_pulls: bool = False
    default_timeout: float = 600.0
    keep_blob_info_cache: bool = False
    _own_workdir: bool = field(default=False, init=False, repr=False)
    _runroot: Path | None = field(default=None, init=False, repr=False)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> PodmanEnv:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="lzb-podman-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("graph", "tmp"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self._runroot = Path(tempfile.mkdtemp(prefix="lzbr-", dir="/tmp"))
        self._write_configs()
        if not self.keep_blob_info_cache:
            BLOB_INFO_CACHE.unlink(missing_ok=True)
        return self

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

    def close(self) -> None:
        """Stop containers, unmount everything under the graphroot, remove the workdir."""
        if self.workdir is None or not self.workdir.exists():
            if self._runroot is not None:
                unmount_below(self._runroot)
                shutil.rmtree(self._runroot, ignore_errors=True)
            return
        try:
            self.podman("rm", "--all", "--force", "--time", "0", timeout=60, check=False)
            self.podman("system", "reset", "--force", timeout=60, check=False)
        except PodmanError:
            pass
        unmount_below(self.workdir)
        if self._runroot is not None:
            unmount_below(self._runroot)
            shutil.rmtree(self._runroot, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            for sub in ("graph", "tmp"):
                shutil.rmtree(self.workdir / sub, ignore_errors=True)

    # -- configuration -----------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment a podman process of this env runs with."""
        assert self.workdir is not None
        env = dict(os.environ)
        env.update(
            CONTAINERS_CONF=str(self.workdir / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(self.workdir / "storage.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self.workdir / "registries.conf"),
            TMPDIR=str(self.workdir / "tmp"),
        )
        return env

    def _write_configs(self) -> None:
        assert self.workdir is not None
        options: list[str] = []
        if self.additional_layer_store is not None:
            options.append(
                f"additionallayerstores = [{toml_str(f'{self.additional_layer_store}:ref')}]"
            )
        if self.partial_pulls:
            options.append('pull_options = {enable_partial_images = "true"}')
        storage = (
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {toml_str(str(self.graphroot))}\n"
            f"runroot = {toml_str(str(self.runroot))}\n\n"
            "[storage.options]\n" + "\n".join(options) + "\n"
        )
        registries = 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
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
        cmd = ["podman", *args]
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                env=self.env,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout or self.default_timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise PodmanError(
                f"`{' '.join(cmd)}` did not finish within {exc.timeout:.0f}s"
            ) from None
        result = PodmanResult(
            cmd, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start
        )
        if check and proc.returncode != 0:
            raise PodmanError(
                f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        return result

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

    def image_layers(self, ref: str) -> list[str]:
        """The image's layer diff IDs (``RootFS.Layers``)."""
        out = self.podman("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref)
        return json.loads(out.stdout)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def unmount_below(path: Path) -> None:
    """Lazily unmount everything mounted at or below ``path`` (overlay, shm, bind mounts)."""
    for point in mounts_below(path):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)
