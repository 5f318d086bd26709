"""The CRI-O runtime driver, through ``crictl``: used when CRI-O is installed, refused otherwise.

CRI-O reads the same ``storage.conf`` as podman (containers/storage), so lazy pulling through
an Additional Layer Store works the same way; what differs is the client: images are pulled
with ``crictl pull``, containers live in a pod sandbox (``crictl runp``), and the workload's
output is read with ``crictl logs --follow``. CRI-O is a daemon with one storage configuration,
so this driver measures against the host's CRI-O as configured by its operator (ALS line in
``/etc/containers/storage.conf``, registry marked insecure in ``registries.conf``) and cleans
images and pods between measurements with ``crictl rmi``/``rmp``.

This machine has neither CRI-O nor crictl (DESIGN.md §6): :func:`crio_unavailable` says why,
and scenarios naming ``runtime = "crio"`` stop with that message before anything starts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.cli import UserError

CRIO_SOCKET = Path("/var/run/crio/crio.sock")
STORAGE_CONF = Path("/etc/containers/storage.conf")
CRIO_CONF = Path("/etc/crio/crio.conf")
DEFAULT_GRAPHROOT = Path("/var/lib/containers/storage")  # containers/storage's, as root


@dataclass(frozen=True)
class CrioStorage:
    """Where CRI-O keeps images (``graphroot``) and the layer store its operator configured
    (``layer_store``, the first of ``additionallayerstores``; None without one)."""

    graphroot: Path
    layer_store: Path | None


def crio_storage(storage_conf: Path = STORAGE_CONF, crio_conf: Path = CRIO_CONF) -> CrioStorage:
    """CRI-O's storage as its configuration files say: ``[crio] root`` of ``crio_conf``, else
    ``[storage] graphroot`` of ``storage_conf``, else containers/storage's default; the layer
    store from ``[storage.options] additionallayerstores`` (``"PATH:ref"`` entries, the
    containers-storage.conf(5) syntax). A file that is missing is taken as empty. Raises
    :class:`UserError` naming a file that cannot be read or is not TOML."""

    def read(path: Path) -> dict:
        try:
            return tomllib.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{path}: cannot read CRI-O's storage configuration: {exc}") from None

    storage = read(storage_conf).get("storage", {})
    root = read(crio_conf).get("crio", {}).get("root") or storage.get("graphroot")
    stores = storage.get("options", {}).get("additionallayerstores", [])
    first = stores[0] if isinstance(stores, list) and stores else None
    layer_store = Path(str(first).split(":", 1)[0]) if first else None
    return CrioStorage(Path(root) if root else DEFAULT_GRAPHROOT, layer_store)


class CrioUnavailable(UserError):
    """CRI-O or crictl is missing: a scenario with ``runtime = "crio"`` is refused."""


def crio_unavailable() -> str | None:
    """Why the CRI-O driver cannot run here, or ``None`` when it can."""
    if shutil.which("crictl") is None:
        return "crictl is not installed"
    if not CRIO_SOCKET.is_socket():
        return f"CRI-O is not running: no socket at {CRIO_SOCKET}"
    return None


def require_crio() -> None:
    reason = crio_unavailable()
    if reason is not None:
        raise CrioUnavailable(
            f"runtime 'crio': {reason}; install and start CRI-O with crictl (it is in no Debian "
            'suite), or measure podman: runtime = "podman" in the scenario'
        )


@dataclass
class CrioTimes:
    pull_s: float
    create_s: float
    run_s: float
    first_output_s: float | None
    ready: bool
    stdout: str


def cri_command(
    command: tuple[str, ...], entrypoint: tuple[str, ...] | None
) -> dict[str, list[str]]:
    """A workload's ``command`` (the image's CMD) and ``entrypoint`` as CRI's container
    config takes them, which are Kubernetes' names: ``command`` replaces the image's
    ENTRYPOINT (and, as with podman's ``--entrypoint``, drops its CMD), ``args`` its CMD. A
    cleared entrypoint (empty) runs ``command`` as the whole command line (the scenario
    requires one then)."""
    if entrypoint is None:
        return {"args": list(command)} if command else {}
    if entrypoint:
        return {"command": list(entrypoint), **({"args": list(command)} if command else {})}
    if not command:
        raise RuntimeError(
            'entrypoint = "" without a command: nothing to run; give the workload a command = [...]'
        )
    return {"command": list(command)}


@dataclass
class CrioDriver:
    """Pull, create and start one workload through CRI-O, timing each step."""

    endpoint: str = f"unix://{CRIO_SOCKET}"
    timeout: float = 300.0

    def crictl(self, *args: str, timeout: float | None = None) -> str:
        proc = subprocess.run(
            ["crictl", "--runtime-endpoint", self.endpoint, *args],
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"crictl {' '.join(args)}: {proc.stderr.strip()[-500:]}")
        return proc.stdout.strip()

    def _quietly(self, *args: str) -> bool:
        """``crictl`` with this driver's endpoint; whether it succeeded (cleanup: never raises
        for the command's own failure)."""
        try:
            self.crictl(*args, timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def measure(
        self,
        ref: str,
        command: tuple[str, ...],
        ready: str | None,
        timeout: float,
        after_pull: Callable[[], None] = lambda: None,
        entrypoint: tuple[str, ...] | None = None,
    ) -> CrioTimes:
        """Pull ``ref``, create and start the container until ``ready``; ``after_pull`` is
        called between pull and create (untimed: the laziness verdict reads the storage).
        Raises RuntimeError when ``ref`` is in CRI-O's storage before the pull and cannot be
        removed: its pull would time nothing."""
        if self._quietly("inspecti", ref) and not (
            self._quietly("rmi", ref) and not self._quietly("inspecti", ref)
        ):
            raise RuntimeError(f"{ref} is in CRI-O's storage and `crictl rmi` cannot remove it")
        with tempfile.TemporaryDirectory(prefix="lzb-crio-") as tmp:
            pod_cfg = Path(tmp) / "pod.json"
            ctr_cfg = Path(tmp) / "ctr.json"
            name = f"lzb-{int(time.time() * 1000)}"
            pod_cfg.write_text(
                json.dumps(
                    {
                        "metadata": {"name": name, "namespace": "lazybench", "uid": name},
                        "linux": {"security_context": {"namespace_options": {"network": 2}}},
                    }
                )
            )
            ctr = {
                "metadata": {"name": name},
                "image": {"image": ref},
                "log_path": "ctr.log",
                **cri_command(command, entrypoint),
            }
            ctr_cfg.write_text(json.dumps(ctr))
            # The pod sandbox first, as the kubelet does (RunPodSandbox, then PullImage): no
            # untimed work between pull and create, where a lazy store fetches on.
            pod = self.crictl("runp", str(pod_cfg), timeout=timeout)
            try:
                t = time.monotonic()
                self.crictl("pull", ref, timeout=timeout)
                pull = time.monotonic() - t
                after_pull()
                t = time.monotonic()
                cid = self.crictl("create", pod, str(ctr_cfg), str(pod_cfg), timeout=timeout)
                create = time.monotonic() - t
                t = time.monotonic()
                self.crictl("start", cid, timeout=timeout)
                first, ok, out = self._follow(cid, ready, timeout)
                run = time.monotonic() - t
            finally:
                self._quietly("stopp", pod)
                self._quietly("rmp", "--force", pod)
                self._quietly("rmi", ref)
        return CrioTimes(pull, create, run, first and first - t, ok, out)

    def _follow(
        self, cid: str, ready: str | None, timeout: float
    ) -> tuple[float | None, bool, str]:
        proc = subprocess.Popen(
            ["crictl", "--runtime-endpoint", self.endpoint, "logs", "--follow", cid],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        first = None
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                first = first or time.monotonic()
                lines.append(line)
                if (ready and ready in line) or time.monotonic() > deadline:
                    break
            ok = bool(ready and any(ready in ln for ln in lines)) or (
                not ready and proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
            )
        finally:
            proc.kill()
            proc.wait(timeout=10)
        return first, ok, "".join(lines)
