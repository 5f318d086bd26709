"""The Additional Layer Store under test, as a process: started empty, mounted, stopped, gone.

Each lazy measurement starts the store afresh with an empty cache directory, so no chunk fetched
for one sample makes the next one faster. The store is any ALS-compatible command (ours,
``stargz-store``, by default; the Go ``stargz-store`` works with the same config file), given as
a template with ``{config}``, ``{root}`` and ``{mountpoint}`` placeholders; ``{go-stargz-store}``
names the reference Go store, which the harness builds itself (:func:`resolve_store_command`).

The harness writes the store's config (Go ``stargz-store`` TOML keys, which ours reads too):
the registry is plain HTTP, so it gets a ``[[resolver.host."HOST".mirrors]]`` entry with
``insecure = true``; ``noprefetch`` for the estargz-noopt mode; and our own keys
``metrics_address`` (Prometheus endpoint, scraped after the workload ran) and
``access_trace_path`` (the files each layer served, in first-access order — what the estargz
mode prioritizes) and ``timeline_path`` (what the store did per layer during the pull:
:mod:`store.timeline`, turned into offsets from the pull by :mod:`harness.timeline`), both for
our own store only (:func:`is_our_store`).

The process runs in its own session so a Ctrl-C aimed at the harness does not kill it before
the harness has unmounted it: a dead FUSE mount under an ALS path makes every podman command
fail. :meth:`StoreProcess.stop` always leaves the mount point unmounted and the process gone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.processes import (
    Service,
    die_with_parent,
    free_port,
    kill_group,
    signal_group,
    wait_quietly,
)
from harness.scenario import BUILTIN_STORE_PLACEHOLDERS, DEFAULT_STORE_COMMAND
from store.cli import is_mounted


class StoreError(RuntimeError):
    """The store did not start, did not mount in time, or could not be stopped."""


def resolve_store_command(
    command: Sequence[str], progress: Callable[[str], None] | None = None
) -> tuple[str, ...]:
    """``command`` with the built-in store placeholders replaced by their binaries' paths.

    ``{go-stargz-store}`` becomes the reference Go store built by :func:`harness.gostore.build`
    (built into the cache first when missing; ``progress`` receives a line then). The
    per-measurement placeholders (``{config}``, ``{root}``, ``{mountpoint}``) are left as they
    are. Idempotent; call it while preparing a run so no build happens during a measurement.
    Raises :class:`StoreError` when the build fails, with the compiler's message.
    """
    import string

    used = {
        name
        for arg in command
        for _, name, _, _ in string.Formatter().parse(arg)
        if name in BUILTIN_STORE_PLACEHOLDERS
    }
    if not used:
        return tuple(command)
    paths = {name: str(_builtin_store(name, progress)) for name in used}
    out = []
    for arg in command:
        for name, path in paths.items():
            arg = arg.replace("{" + name + "}", path)
        out.append(arg)
    return tuple(out)


_built: dict[str, Path] = {}

# How long a store must stay up once its mount showed to count as started: one that dies as it
# begins serving (its mount then dead) fails its start, not the pull that meets it.
MOUNT_SETTLE_SEC = 0.1


def _builtin_store(name: str, progress: Callable[[str], None] | None) -> Path:
    """The binary of a built-in store placeholder, built once per process."""
    if name not in _built:
        from harness.gostore import GoStoreBuildError, build

        assert name == "go-stargz-store", name
        try:
            _built[name] = build(progress=progress)
        except GoStoreBuildError as exc:
            raise StoreError(f"{{{name}}}: {exc}") from None
    return _built[name]


def _which(name: str) -> str | None:
    """``name`` on PATH, else beside this interpreter (our console scripts live there even
    when their venv is not on PATH): what :meth:`StoreProcess.argv` runs."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def store_executable(name: str) -> str:
    """The program a store command's first word (placeholders filled in) runs: on PATH, or
    beside this interpreter, where our own console script sits even when its venv is not on
    PATH. Raises :class:`StoreError` when there is none."""
    exe = _which(name)
    if exe is None:
        if os.sep in name:
            raise StoreError(f"store command {name!r} is not an executable file")
        raise StoreError(f"store command {name!r} not found on PATH")
    return exe


def store_command_problem(command: Sequence[str]) -> str | None:
    """Why ``command`` cannot start, as far as is known before any measurement (its program
    is missing), or None. A first word with a placeholder is left alone: a built-in store's
    binary (``{go-stargz-store}``) is built or found by
    :func:`harness.prepare.prepare_store`, a per-measurement one exists only then."""
    import string

    if not command:
        return "is empty"
    first = command[0]
    try:
        if any(name is not None for _, name, _, _ in string.Formatter().parse(first)):
            return None
        store_executable(first.format())  # "{{" is a literal brace, as in StoreProcess.argv
    except (StoreError, ValueError) as exc:
        return str(exc)
    return None


def is_our_store(command: Sequence[str]) -> bool:
    """Whether ``command`` runs this project's ``stargz-store`` — the one that writes the
    access trace and the pull timeline. A built-in placeholder (``{go-stargz-store}``) or any
    other binary (even one named ``stargz-store`` earlier on PATH) is a foreign store."""
    if not command or "{" in command[0]:
        return False
    ours = shutil.which("stargz-store", path=str(Path(sys.executable).parent))
    exe = _which(command[0])
    return ours is not None and exe is not None and os.path.samefile(ours, exe)


def _toml_str(value: str) -> str:
    return json.dumps(value)


def store_config_text(
    insecure_hosts: Sequence[str],
    *,
    noprefetch: bool = False,
    background_fetch: bool = False,
    metrics_address: str = "",
    access_trace_path: str = "",
    timeline_path: str = "",
) -> str:
    """The store's TOML config (Go ``stargz-store`` keys plus ours)."""
    lines = [
        f"noprefetch = {'true' if noprefetch else 'false'}",
        f"no_background_fetch = {'false' if background_fetch else 'true'}",
    ]
    if metrics_address:
        lines.append(f"metrics_address = {_toml_str(metrics_address)}")
    if access_trace_path:
        lines.append(f"access_trace_path = {_toml_str(access_trace_path)}")
    if timeline_path:
        lines.append(f"timeline_path = {_toml_str(timeline_path)}")
    for host in insecure_hosts:
        lines += [
            "",
            f"[[resolver.host.{_toml_str(host)}.mirrors]]",
            f"host = {_toml_str(host)}",
            "insecure = true",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class StoreProcess(Service):
    """One run of the layer store, mounted at ``workdir/mnt`` with cache ``workdir/root``."""

    workdir: Path
    command: Sequence[str] = DEFAULT_STORE_COMMAND
    insecure_hosts: Sequence[str] = ()
    noprefetch: bool = False
    background_fetch: bool = False
    trace: bool = False
    timeline: bool = False  # our store only: the pull timeline (timeline_path)
    metrics: bool = True
    mount_timeout: float = 30.0
    stop_timeout: float = 15.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _metrics_address: str = field(default="", init=False, repr=False)

    @property
    def mountpoint(self) -> Path:
        return self.workdir / "mnt"

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "store.log"

    def log_text(self) -> str:
        """What the store logged so far ("" when there is no log to read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def trace_path(self) -> Path:
        return self.workdir / "trace.jsonl"

    @property
    def timeline_path(self) -> Path:
        return self.workdir / "timeline.jsonl"

    @property
    def pid(self) -> int | None:
        """The store's process while it runs (not once it exited, as a daemonizing store's
        does: its pid may then name another process)."""
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def argv(self) -> list[str]:
        values = {
            "config": str(self.config_path),
            "root": str(self.root),
            "mountpoint": str(self.mountpoint),
        }
        argv = [arg.format(**values) for arg in resolve_store_command(self.command)]
        return [store_executable(argv[0]), *argv[1:]]

    def start(self) -> None:
        if self._proc is not None:
            raise StoreError("store already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mountpoint):
            raise StoreError(f"{self.mountpoint} is already mounted")
        shutil.rmtree(self.root, ignore_errors=True)  # an empty cache, every time
        self.root.mkdir()
        self.mountpoint.mkdir(exist_ok=True)
        self.trace_path.unlink(missing_ok=True)
        self.timeline_path.unlink(missing_ok=True)
        self._metrics_address = f"127.0.0.1:{free_port()}" if self.metrics else ""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(
            store_config_text(
                self.insecure_hosts,
                noprefetch=self.noprefetch,
                background_fetch=self.background_fetch,
                metrics_address=self._metrics_address,
                access_trace_path=str(self.trace_path) if self.trace else "",
                timeline_path=str(self.timeline_path) if self.timeline else "",
            )
        )
        os.replace(tmp, self.config_path)
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Killed with us: it unmounts itself on SIGTERM (harness.stale sweeps the rest).
                preexec_fn=die_with_parent,
            )
        try:
            self._wait_mounted()
        except BaseException:
            self.stop()
            raise

    def _wait_mounted(self) -> None:
        """Until the mount shows up, and :data:`MOUNT_SETTLE_SEC` after it. The store's own
        process may exit 0 on the way, before or after mounting (a store that daemonizes
        leaves its server running in the group): only a failed exit ends the wait early."""
        assert self._proc is not None
        deadline = time.monotonic() + self.mount_timeout
        while time.monotonic() < deadline:
            exited = self._proc.poll()  # before the mount check: an exit then a mount is seen
            if is_mounted(self.mountpoint):
                if exited is None:
                    # A store that dies as it starts serving (a crash right after its mount
                    # showed) is an error here, not a dead mount the pull then meets.
                    time.sleep(MOUNT_SETTLE_SEC)
                    exited = self._proc.poll()
                if exited:
                    raise StoreError(
                        f"store exited with status {exited} after mounting "
                        f"{self.mountpoint}: {self.log_tail()}"
                    )
                return
            if exited:
                raise StoreError(
                    f"store exited with status {exited} before mounting "
                    f"{self.mountpoint}: {self.log_tail()}"
                )
            time.sleep(0.05)
        left = " (its process exited 0, and nothing it left running mounted)"
        raise StoreError(
            f"store did not mount {self.mountpoint} within {self.mount_timeout:g}s"
            f"{left if self._proc.poll() == 0 else ''}: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])[-800:]

    def abort(self) -> None:
        """Kill the store outright: the kernel then fails every pending and later request on
        the mount (ENOTCONN) instead of waiting, so cleanup of a stuck measurement is quick."""
        if self._proc is not None:
            kill_group(self._proc)

    def stop(self) -> None:
        """SIGTERM (the store unmounts itself), then unmount and SIGKILL if it did not."""
        proc, self._proc = self._proc, None
        if proc is not None:
            signal_group(proc, signal.SIGTERM)
            wait_quietly(proc, self.stop_timeout)
        if is_mounted(self.mountpoint):
            for cmd in (
                ["fusermount3", "-u", "-z", str(self.mountpoint)],
                ["umount", "-l", str(self.mountpoint)],
            ):
                subprocess.run(cmd, capture_output=True, timeout=30)
                if not is_mounted(self.mountpoint):
                    break
        if proc is not None:
            kill_group(proc)
        if is_mounted(self.mountpoint):
            raise StoreError(f"{self.mountpoint} is still mounted after stopping the store")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what the store reports ------------------------------------------------------------------

    def scrape_metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """The store's Prometheus samples, summed over labels (per-layer counters become the
        measurement's totals; histograms keep ``_sum``/``_count``). Empty when it has none.

        Process/Python runtime samples are left out: they describe the interpreter, not lazy
        pulling; so are samples that are not finite (a summary's quantile with no observations
        is NaN), which a record cannot hold.
        """
        if not self._metrics_address:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(
                f"http://{self._metrics_address}/metrics", timeout=timeout
            ) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name.startswith(("python_", "process_")):
                continue
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket")) or not math.isfinite(sample.value):
                    continue  # a summary's quantile with no observations is NaN
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def trace_files(self) -> list[str]:
        """Files the workload read, in first-access order across layers (no duplicates)."""
        return read_trace(self.trace_path)

    def trace_ranges(self) -> dict[str, list[list[int]]]:
        """The byte ranges of each file the workload read (:func:`read_trace_ranges`): the
        store writes them when it stops, so ask after :meth:`stop`."""
        return read_trace_ranges(self.trace_path)

    def trace_order(self) -> dict[str, list[list[int]]]:
        """When the workload first read each piece of each file (:func:`read_trace_order`):
        written by the store when it stops, so ask after :meth:`stop`."""
        return read_trace_order(self.trace_path)


def read_trace(path: Path) -> list[str]:
    """Read an access trace (JSON lines). Each line names one layer and the files it served in
    first-access order — ``{"layer": …, "files": [...]}`` — or one access —
    ``{"layer": …, "path": …}``; both are accepted."""
    seen: dict[str, None] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry: Any = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if not isinstance(entry, dict):
            continue
        names = entry.get("files")
        if names is None:
            one = entry.get("path") or entry.get("file") or entry.get("name")
            names = [one] if one else []
        for name in names:
            if isinstance(name, dict):
                name = name.get("path") or name.get("name")
            if isinstance(name, str) and name:
                seen.setdefault(name.lstrip("/"), None)
    return list(seen)


def _range_lines(path: Path, key: str) -> Iterator[tuple[str, list[Any]]]:
    """``(path without a leading /, the list under key)`` of each line of the access trace at
    ``path`` whose ``key`` is a list (the range lines, :mod:`store.metrics`); a missing trace
    gives none, a torn or foreign line is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            entry: Any = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue  # a torn last line
        if not isinstance(entry, dict) or not isinstance(entry.get(key), list):
            continue
        name = entry.get("path")
        if isinstance(name, str) and name:
            yield name.lstrip("/"), entry[key]


def read_trace_ranges(path: Path) -> dict[str, list[list[int]]]:
    """The byte ranges read per file from an access trace's range lines (``{"layer": …,
    "path": …, "ranges": [[start, end], …]}``, written by the store when it stops; see
    :mod:`store.metrics`): path (no leading ``/``) → merged ``[start, end)`` file offsets,
    the union over layers. Files without a range line are absent; a missing trace or one
    from a store that never stopped gives ``{}``. Malformed lines are skipped."""
    from store.metrics import merge_ranges

    found: dict[str, list[list[int]]] = {}
    for name, ranges in _range_lines(path, "ranges"):
        found.setdefault(name, []).extend(
            r
            for r in ranges
            if isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
        )
    return {name: merge_ranges(ranges) for name, ranges in found.items()}


def read_trace_order(path: Path) -> dict[str, list[list[int]]]:
    """The first-read order per file from an access trace's range lines (their ``"order":
    [[start, end, seq], …]``; see :mod:`store.metrics`): path (no leading ``/``, keyed as
    :func:`read_trace_ranges` keys it) → ``[start, end, seq]`` runs, ``[start, end)`` file
    offsets first read by the read numbered ``seq`` (one counter across files and layers),
    sorted, disjoint; a path in several layers gets each byte's smallest ``seq``
    (:func:`store.metrics.merge_order`). Files without an order are absent; a missing trace,
    one from a store that never stopped or from before the order was recorded gives ``{}``.
    Malformed lines and entries are skipped."""
    from store.metrics import merge_order

    found: dict[str, list[list[int]]] = {}
    for name, runs in _range_lines(path, "order"):
        good = [
            r
            for r in runs
            if isinstance(r, list)
            and len(r) == 3
            and all(type(x) is int for x in r)
            and 0 <= r[0] < r[1]
            and r[2] >= 0
        ]
        if good:
            found.setdefault(name, []).extend(good)
    return {name: merge_order(runs) for name, runs in found.items()}
