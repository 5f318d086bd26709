"""The measurement loop: a scenario in, one fsynced JSON record per measurement out.

Order of a run:

1. *Preparation* (:mod:`harness.prepare`): images built and pushed, the link set up and
   measured, the registry started behind it (inside the link's namespace); podman and the store
   reach it at the namespace's address over plain HTTP.
2. *Measurements*: per sample the (workload × mode × store) list is shuffled (seeded: a resumed
   run keeps the order; :mod:`harness.plan`, which also cuts a ``--shard K/N`` out of it).
   Each measurement starts once the disk has taken the previous one's writes (:func:`settle`)
   and the registry's files of its image are in the page cache
   (:meth:`~harness.registry_server.RegistryServer.warm`: the registry's disk is not the link
   under test), and gets a fresh podman (graphroot, runroot, configs, empty blob-info cache;
   the layer store only in lazy modes) and, in lazy modes, that store started with an empty
   cache. ``pull``, ``create`` and ``run`` (until the ready line, or exit) are timed
   separately; the registry's access log gives bytes and requests, including those done
   before the workload's first output line. In lazy modes the laziness verdict
   (:mod:`harness.laziness`: podman's storage right after the pull, the registry's log after
   the run) turns a record whose layers did not all come from the store into "fell-back".
   In ``legacy`` mode (podman), once the run is done and counted, the same image is pulled
   again, now local, and that pull's seconds and requests recorded apart (``repull_s``,
   ``repull_requests``): podman's own pull work, the limit model's runtime floor.

Records are appended as they complete (:mod:`harness.records`); a run is resumed by skipping the
keys already recorded as successful. SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` once (further
signals are ignored while cleaning up; one that comes during a teardown, when it is over), so
every mount, process, namespace and qdisc is torn down by the context managers that made it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.cli import UserError, make_console, plain
from harness.container import (
    MeasurementError,
    create_container,
    is_no_exit,
    not_ready_reason,
    start_until_ready,
)
from harness.laziness import (
    LayerEvidence,
    Verdict,
    blobs_served_whole_to_runtime,
    fallback_reason,
    fetched_before_pull,
    is_runtime_request,
    started_before,
    storage_verdict,
)
from harness.limit import write_limits
from harness.plan import Shard, plan
from harness.podman import (
    LOST_LAYERS_BUG,
    PARTIAL_PULL_143_BUG,
    Persistence,
    PodmanEnv,
    PodmanError,
    write_atomic,
)
from harness.prepare import (
    ImagePreparer,
    Link,
    ResolvedWorkload,
    open_link,
    preflight_link,
    prepare_store,
    resolve,
)
from harness.records import (
    ENVIRONMENT,
    RECORDS,
    SCENARIO_COPY,
    Key,
    Record,
    append_record,
    environment,
    finished_keys,
    git_commit,
    read_environment,
    read_json,
    read_records,
    require_run_files,
)
from harness.runtimes import (
    HOST,
    Node,
    NodeError,
    build_node,
    default_cache_dir,
    runtime_versions,
    version_tuple,
)
from harness.scenario import LAZY_MODES, ON_DEMAND_MODES, Scenario, StoreSpec, parse_scenario
from harness.stale import claim, release, sweep_killed_runs
from harness.store_proc import StoreProcess, is_our_store
from harness.timeline import write_timeline
from harness.usage import UsageSampler, usage_doc

if TYPE_CHECKING:
    from harness.registry_server import AccessRecord

# Where run directories go unless ``--results-dir`` says otherwise: under the current directory,
# wherever lazybench is installed.
RESULTS_DIR = Path("results") / "runs"
STDOUT_KEEP = 4000
# Seconds a measurement waits for the disk to take the previous one's writes (settle()).
SETTLE_TIMEOUT = 120.0


def settle(timeout: float = SETTLE_TIMEOUT) -> bool:
    """Flush the page cache's dirty pages to disk (``sync``) and wait for it, so a measurement
    does not pay for the writeback of the one before it; True once flushed, False if the disk
    took longer than ``timeout`` seconds (the measurement then goes on: its record is still
    honest, only less isolated).

    Why: a ``legacy`` or ``zstd-chunked`` pull leaves about 1 GB of layer files dirty
    (``vm.dirty_expire_centisecs`` 30 s, ``dirty_background_ratio`` 10% of 24 GiB here), which
    the kernel writes back during whatever runs next. In the default benchmark recorded at
    3d7e230 (without this), 7 of 34 lazy measurements that came right after a full pull took
    over 1.15× their cell's median total, against 3 of 41 after a lazy one; in the one
    recorded with it at 3a0cd79, 2 of 34 and 2 of 41; with the registry's files warm as
    well, none of either at 7e9f070, and 2 of 34 and 0 of 40 at edd53c2."""
    try:
        subprocess.run(["sync"], check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def partial_pull_failure(failure: str, storage_version: str) -> str:
    """A failed run of podman's own zstd:chunked partial pull, with the containers/storage
    1.43 bug that may be its cause named (:data:`harness.podman.PARTIAL_PULL_143_BUG`)."""
    if storage_version and version_tuple(storage_version) < (1, 44):
        return f"{failure} (maybe {PARTIAL_PULL_143_BUG})"
    return failure


def persistence_verdict(check: Persistence, storage_version: str) -> tuple[bool, str | None]:
    """(persisted, why not) for a record; names the containers/storage bug where it applies."""
    if check.ok:
        return True, None
    what = "image not listed" if not check.listed else "layers not known"
    if version_tuple(storage_version) >= (1, 58):
        return False, f"lost after the pull ({what}): {LOST_LAYERS_BUG}"
    return False, f"lost after the pull ({what}): {check.detail}"


def lost_records_verdict(
    layer_digests: list[str], served: Sequence[AccessRecord], unreadable: Verdict
) -> Verdict:
    """The laziness verdict of a pull whose runtime lost its layer records (containers/storage
    >= 1.58), from the registry's log of the measurement (``served``): a layer whose blob the
    runtime never asked for, whole or a range of it (a partial pull), came from the store.

    That is evidence by absence, so it must show it could have seen the runtime: with no
    manifest the registry served the runtime in ``served`` (a log missing, emptied or in
    another format) nothing is known, and the storage's problem stands — as it does without
    the image's layer digests."""
    if not layer_digests:
        return unreadable
    runtime = [r for r in served if is_runtime_request(r.user_agent)]
    if not any(r.method == "GET" and r.kind == "manifests" and r.status == 200 for r in runtime):
        return Verdict(
            problem=f"{unreadable.problem}; and the registry's log shows no manifest served "
            "to the runtime, so it cannot tell either"
        )
    fetched = {r.digest for r in runtime if r.is_blob_get and r.digest}
    return Verdict(
        [LayerEvidence(layer_id="", digest=d, from_store=d not in fetched) for d in layer_digests]
    ).with_registry(blobs_served_whole_to_runtime(served))


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: stop measuring, clean up, keep the records."""


def _check_resumed_images(
    recorded: dict[str, Any], prepared: dict[str, Any], run_dir: Path
) -> None:
    """A resumed run measures the images its records were measured on: the manifest digest
    of each workload × mode prepared again must be the one recorded. Raises
    :class:`UserError` naming the first that changed."""
    for workload, modes in prepared.items():
        for mode, image in modes.items():
            before = (recorded.get(workload) or {}).get(mode) or {}
            was, now = before.get("manifest_digest"), image.get("manifest_digest")
            if was and now and was != now:
                raise UserError(
                    f"{run_dir}: the image of {workload}/{mode} is not the one this run "
                    f"measured ({was} then, {now} now: its recipe, source or the writer "
                    "changed); start a new run"
                )


def _abort_on_error(store: StoreProcess) -> Callable[..., bool]:
    def exit_(exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            store.abort()
        return False

    return exit_


def _keep_log(src: Path, dest: Path) -> None:
    with contextlib.suppress(OSError):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


# -- the runner -------------------------------------------------------------------------


@dataclass
class InterruptState:
    """Set by the signal handler; checked where an error raised during cleanup could
    otherwise replace (and so swallow) the :class:`Interrupted` exception."""

    signal: str | None = None
    # > 0 while a teardown runs (:meth:`teardown`): a signal is noted, not raised.
    shielded: int = 0

    def check(self) -> None:
        if self.signal is not None:
            raise Interrupted(self.signal)

    @contextlib.contextmanager
    def teardown(self) -> Iterator[contextlib.ExitStack]:
        """An ExitStack whose unwinding a signal does not cut short. Raised in the middle of
        it, :class:`Interrupted` skipped the rest of that cleanup: a ``podman system reset``
        or an unmount, the link's namespace and veth, the run's working directory (its owner
        file deleted first, so ``lazybench cleanup`` never found the rest of it). A signal
        that comes while the stack unwinds is raised once it has, unless another exception
        is on its way out already."""
        try:
            with contextlib.ExitStack() as stack:
                try:
                    yield stack
                finally:
                    self.shielded += 1
        finally:
            self.shielded -= 1
        self.check()


@contextlib.contextmanager
def interruptible() -> Iterator[InterruptState]:
    """SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` once; later ones are ignored so
    cleanup ends. One that comes during an :meth:`InterruptState.teardown` is raised when it
    is over. A SIGHUP ignored when the run started (``nohup``) stays ignored
    (:func:`harness.cli.stop_signals`)."""
    from harness.cli import stop_signals

    state = InterruptState()
    signals = stop_signals()

    def handler(signum: int, frame: Any) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        state.signal = signal.Signals(signum).name
        if not state.shielded:
            raise Interrupted(state.signal)

    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def new_run_id(scenario: Scenario) -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{scenario.name}"


def load_run_scenario(run_dir: Path) -> Scenario:
    """The scenario a run directory was started with (for ``--resume``). Raises
    :class:`UserError` when ``scenario.json`` is not the scenario ``environment.json``
    records (a copy replaced by another scenario's): resuming would mix two scenarios'
    records in one run."""
    path = run_dir / SCENARIO_COPY
    require_run_files(run_dir, SCENARIO_COPY)
    scenario = parse_scenario(read_json(path), str(path))
    recorded = read_environment(run_dir).get("scenario")
    if not recorded:
        return scenario
    try:
        theirs = parse_scenario(recorded, str(run_dir / ENVIRONMENT)).to_dict()
    except UserError:
        return scenario  # recorded in a form this lazybench cannot read back: nothing to check
    mine = json.loads(json.dumps(scenario.to_dict()))
    theirs = json.loads(json.dumps(theirs))
    if mine != theirs:
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise UserError(
            f"{path}: is not the scenario {ENVIRONMENT} records for this run (they differ in: "
            f"{', '.join(differ)}); restore the run's own copy"
        )
    return scenario


@dataclass
class Runner:
    """Measures ``scenario`` (its ``shard`` only, when given) into ``run_dir``: one fsynced
    record per key of the plan not yet finished there (:meth:`run`). Raises
    :class:`harness.cli.UserError` for a run directory of another scenario or shard, or one
    another run holds; :class:`Interrupted` on SIGINT/SIGTERM, after cleaning up."""

    scenario: Scenario
    run_dir: Path
    console: Console = field(default_factory=make_console)
    cache_dir: Path | None = None
    show_progress: bool = True
    workdir: Path | None = None
    shard: Shard | None = None
    images: dict[tuple[str, str], str] = field(default_factory=dict)
    _interrupt: InterruptState = field(default_factory=InterruptState, repr=False)
    _skipped: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _node: Node | None = field(default=None, repr=False)
    _layer_digests: dict[tuple[str, str], list[str]] = field(default_factory=dict, repr=False)
    _blob_digests: dict[tuple[str, str], list[str]] = field(default_factory=dict, repr=False)
    _versions: dict[str, str] = field(default_factory=dict, repr=False)
    # The pull timeline files the measurement under way wrote (_keep_timeline)
    _timeline_files: list[Path] = field(default_factory=list, repr=False)
    # The host's interface of the run's link (harness.usage reads its received bytes).
    _link_iface: str | None = field(default=None, repr=False)

    def run(self) -> list[Key]:
        """Measure every planned key not yet recorded; return the keys measured now.

        A run directory this call created is removed again when it fails before its first
        record (a wrong image, a missing runtime): nothing in it could be resumed or reported.
        Interrupted (:class:`Interrupted`) runs keep theirs, as the message to resume says."""
        created = not self.run_dir.exists()
        made = self.run_dir  # the outermost directory this call makes
        while not made.parent.exists():
            made = made.parent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.run_dir / ".lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(
                        f"{self.run_dir}: another `lazybench run` is writing to this run directory"
                    ) from None
                return self._run_locked()
        except Exception:
            if created and not (self.run_dir / RECORDS).exists():
                shutil.rmtree(self.run_dir, ignore_errors=True)
                parent = self.run_dir
                while parent != made:  # and the results directories made for it, if empty
                    parent = parent.parent
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            raise

    def _run_locked(self) -> list[Key]:
        if len(self.scenario.nodes) != 1:
            raise UserError("a run measures one runtime node: use Scenario.for_node")
        self._check_same_scenario()
        self._check_same_shard()
        if (self.run_dir / ENVIRONMENT).exists():
            from harness.report import refuse_unplanned

            # Refused by the report at the end: found before anything is measured.
            refuse_unplanned(
                self.run_dir, read_records(self.run_dir), read_environment(self.run_dir)
            )
        todo = [k for k in plan(self.scenario, self.shard) if k not in finished_keys(self.run_dir)]
        if not todo:
            if not (self.run_dir / ENVIRONMENT).exists():
                # A shard the plan gives no measurement (more shards than measurements): an
                # empty run directory of that shard, which `merge` takes with the others.
                meta = environment(self.scenario)
                if self.shard is not None:
                    meta["shard"] = str(self.shard)
                write_atomic(self.run_dir / ENVIRONMENT, json.dumps(meta, indent=1, sort_keys=True))
                (self.run_dir / RECORDS).touch()
                plain(self.console)(f"{self.run_dir}: this shard has no measurement in the plan")
                return []
            plain(self.console)(f"{self.run_dir}: every measurement is recorded already")
            return []
        if self.scenario.runtime == "crio":
            from harness.crio import crio_storage, require_crio

            require_crio()
            crio_storage()  # its configuration read before anything starts (UserError)
        preflight_link(self.scenario.network_profile)
        needed = {k.workload for k in todo}  # a shard prepares only its own workloads' images
        workloads = {w.name: resolve(w) for w in self.scenario.workloads if w.name in needed}
        self._node = self._runtime_node()
        self._versions = runtime_versions(self.scenario.node, self.cache_dir)
        env_path = self.run_dir / ENVIRONMENT
        resuming = env_path.exists()
        meta = read_environment(self.run_dir) if resuming else environment(self.scenario)
        if resuming:
            meta.setdefault("resumed", []).append(
                dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            )
            self._check_resumed_code(meta)
        if self.shard is not None:
            meta["shard"] = str(self.shard)
        meta["runtime_versions"] = self._versions  # as built in this run's cache
        done: list[Key] = []
        with interruptible() as self._interrupt, self._interrupt.teardown() as stack:
            # What killed runs left: a store, a container, mounts, network namespaces.
            cache = self.cache_dir or default_cache_dir()
            left = sweep_killed_runs(self.workdir, cache_dir=cache)
            for line in left:
                self.console.print(f"  [yellow]removed what a killed run left[/]: {escape(line)}")
            work = Path(tempfile.mkdtemp(prefix="lzb-run-", dir=self.workdir))
            claim(work)
            stack.callback(release, work)
            storage = work / "registry"
            for spec in self.scenario.stores:  # built-in stores built before anything is measured
                if any(k.store == spec.name for k in todo):
                    prepare_store(spec.command, self.console)
            images = ImagePreparer(self.scenario, self.console, self.cache_dir, self._node)
            prepared = images.prepare(workloads, storage, work)
            if resuming:
                _check_resumed_images(meta.get("images") or {}, prepared, self.run_dir)
            meta["images"] = {**(meta.get("images") or {}), **prepared}
            if images.limits:  # the limit model's byte counts (harness.limit)
                write_limits(self.run_dir, images.limits)
            self.images, self._skipped = images.refs, images.skipped
            self._layer_digests = images.layer_digests
            self._blob_digests = images.blob_digests
            link = stack.enter_context(open_link(self.scenario.network_profile, self.console))
            if resuming and meta.get("link"):  # the first session's stays the run's link
                meta.setdefault("resumed_links", []).append(link.measured)
            else:
                meta["link"] = link.measured
            self._link_iface = link.iface
            write_atomic(env_path, json.dumps(meta, indent=1, sort_keys=True))
            registry = stack.enter_context(self._registry(storage, link))
            # Every store started once, as a measurement starts it, before any is measured.
            for i, spec in enumerate(self.scenario.stores):
                if any(k.store == spec.name for k in todo):
                    self._preflight_store(spec, work / f"preflight-store-{i}", registry.host)
            progress = stack.enter_context(self._progress())
            task = progress.add_task("measuring", total=len(todo))
            # workload -> its last records when they never exited; why it is given up
            no_exit: dict[str, list[Record]] = {}
            given_up: dict[str, str] = {}
            full_pulls = any(m not in LAZY_MODES for m in self.scenario.modes)
            for sample, name, mode, store in todo:
                self._interrupt.check()
                label = f"{name}/{mode}" + (f" · {store}" if store else "")
                progress.update(task, description=f"sample {sample + 1} {label}")
                if name in given_up:  # recorded as failed: a resumed run measures it again
                    record = self._failed(sample, workloads[name], mode, store, given_up[name])
                    append_record(self.run_dir, record)
                    done.append(record.key)
                    progress.advance(task)
                    continue
                if not settle():
                    progress.console.print(
                        f"  [yellow]the disk took over {SETTLE_TIMEOUT:.0f} s to flush before "
                        f"{label}: it runs while the last writes are still going out[/]"
                    )
                if (name, mode) in self.images:  # the registry's files of it in the page cache
                    repository = self.images[(name, mode)].rsplit(":", 1)[0]
                    registry.warm(repository, self._blob_digests.get((name, mode), []))
                record = self.measure(sample, workloads[name], mode, registry, work, store)
                append_record(self.run_dir, record)
                done.append(record.key)
                progress.advance(task)
                self._say(progress, record)
                reason = self._give_up(no_exit, record, workloads[name], full_pulls)
                if reason is not None:
                    given_up[name] = reason
                    left = sum(1 for k in todo[len(done) :] if k[1] == name)
                    progress.console.print(
                        f"  [red]{escape(name)}: skipping its {left} remaining measurements:[/] "
                        f"{escape(reason)}"
                    )
        return done

    @staticmethod
    def _give_up(
        no_exit: dict[str, list[Record]],
        record: Record,
        w: ResolvedWorkload,
        full_pulls: bool,
    ) -> str | None:
        """Why to stop measuring ``record``'s workload, or None: a workload without a ready
        line whose run did not exit within its timeout twice in a row (two modes, or two
        samples) is a server missing its ``ready``; each further measurement would wait out
        the timeout again (with the default 300 s, 40 minutes before the user learns it).
        With ``full_pulls`` (the scenario measures a mode that takes no layer store) a lazy
        mode's timeout neither counts nor breaks the streak: a hung store, not the workload,
        may be at fault there, and the workload's other stores and modes must still be
        measured."""
        if not is_no_exit(record.error):
            no_exit.pop(record.workload, None)
            return None
        if full_pulls and record.mode in LAZY_MODES:
            return None
        streak = no_exit.setdefault(record.workload, [])
        streak.append(record)
        if len(streak) < 2:
            return None
        seen = " and ".join(f"sample {r.sample + 1} {r.mode}" for r in streak[-2:])
        return (
            f"not measured: the workload did not exit within {w.timeout:g}s twice in a row "
            f"({seen}); for a server, set ready = a line it prints when it is up"
        )

    # -- pieces -------------------------------------------------------------------------------

    def _runtime_node(self) -> Node | None:
        """The scenario's runtime node, built now if it is not cached (None: the host)."""
        if self.scenario.node == HOST:
            return None
        self.console.print(f"[bold]node {self.scenario.node}[/]: building (cached by recipe)")
        try:
            node = build_node(
                self.scenario.node,
                self.cache_dir,
                progress=lambda m: plain(self.console)(f"  {m}"),
            )
        except NodeError as exc:
            raise UserError(f"runtime node {self.scenario.node}: {exc}") from None
        self.console.print(
            f"  podman {node.podman_version}, containers/storage {node.storage_version}"
        )
        return node

    def _check_same_scenario(self) -> None:
        path = self.run_dir / SCENARIO_COPY
        mine = self.scenario.to_dict()
        if path.exists():
            # Parsed, so a copy written in an older form (a [store] table) compares equal.
            theirs = parse_scenario(read_json(path), str(path)).to_dict()
            if json.loads(json.dumps(theirs)) != json.loads(json.dumps(mine)):
                raise UserError(
                    f"{self.run_dir}: was started with a different scenario; "
                    "resume it with `lazybench run --resume RUN_DIR` or pick a new --run-id"
                )
        else:
            write_atomic(path, json.dumps(mine, indent=1))

    def _check_same_shard(self) -> None:
        env_path = self.run_dir / ENVIRONMENT
        if not env_path.exists():
            return
        recorded = read_environment(self.run_dir).get("shard")
        mine = str(self.shard) if self.shard is not None else None
        if recorded != mine:
            raise UserError(
                f"{self.run_dir}: holds shard {recorded or 'none (the whole plan)'}, not "
                f"{mine or 'the whole plan'}: resume it with `lazybench run --resume RUN_DIR` "
                "without --shard (it keeps its own), or pick a new --run-id"
            )

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description:<36}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.show_progress,
            transient=False,
        )

    def _say(self, progress: Progress, r: Record) -> None:
        what = f"sample {r.sample + 1} {r.workload}/{r.mode}" + (f" · {r.store}" if r.store else "")
        what = escape(what)
        if r.status == "ok":
            mb = (r.bytes_fetched or 0) / 1e6
            layers = (
                f", {r.layers_from_store}/{r.layers_total} layers from the store"
                if r.store and r.layers_total is not None
                else ""
            )
            lost = "  [yellow](image lost after the pull)[/]" if r.persisted is False else ""
            progress.console.print(
                f"  {what}: pull {r.pull_s:.2f}s create {r.create_s:.2f}s run {r.run_s:.2f}s "
                f"= {r.total_s:.2f}s, {mb:.1f} MB{layers}{lost}"
            )
        elif r.status == "fell-back":
            progress.console.print(
                f"  [yellow]{what} fell back to a full pull:[/] {escape(r.error or '')}"
            )
        else:
            progress.console.print(f"  [red]{what} failed:[/] {escape(r.error or '')}")

    @contextlib.contextmanager
    def _registry(self, storage: Path, link: Link) -> Iterator[Any]:
        from harness.registry_server import RegistryServer

        with RegistryServer(
            storage_dir=storage, host_addr=link.address, wrapper=link.prefix
        ) as reg:
            yield reg

    def _preflight_store(self, spec: StoreSpec, workdir: Path, registry_host: str) -> None:
        """Start the store of ``spec`` once, with a measurement's configuration and nothing
        pulled through it, and stop it: a ``[[stores]]`` command that exits at once or never
        mounts is refused (:class:`UserError`) before the first measurement, not met by
        each lazy measurement in turn after the legacy ones. Its stop is a teardown
        (:meth:`InterruptState.teardown`): a signal meanwhile is raised once it is over."""
        from harness.store_proc import StoreError

        try:
            with self._interrupt.teardown() as stack:
                stack.callback(shutil.rmtree, workdir, True)
                stack.enter_context(
                    StoreProcess(
                        workdir,
                        command=spec.command,
                        insecure_hosts=[registry_host],
                        metrics=False,
                        mount_timeout=spec.mount_timeout,
                    )
                )
        except StoreError as exc:
            raise UserError(
                f"store {spec.name!r} does not start ({' '.join(spec.command)}): {exc}; fix "
                "its command in the scenario's [[stores]] (or its mount_timeout)"
            ) from None

    def measure(
        self,
        sample: int,
        w: ResolvedWorkload,
        mode: str,
        registry: Any,
        work: Path,
        store_name: str = "",
    ) -> Record:
        """One measurement from empty caches (through store ``store_name`` in lazy modes);
        failures become an error record, a lazy pull that fell back a "fell-back" record.
        Interrupted (SIGINT/SIGTERM), it has no record, and the pull timeline its teardown
        wrote before the signal came (:meth:`_keep_timeline`) is removed: a report showed it
        as sample 0's."""
        self._timeline_files = []
        try:
            return self._measure(sample, w, mode, registry, work, store_name)
        except KeyboardInterrupt:  # Interrupted, or stdout closed (harness.cli.StdoutClosed)
            for path in self._timeline_files:
                path.unlink(missing_ok=True)
            raise

    def _measure(
        self,
        sample: int,
        w: ResolvedWorkload,
        mode: str,
        registry: Any,
        work: Path,
        store_name: str,
    ) -> Record:
        """:meth:`measure`, but for what an interrupted one leaves."""
        if mode in LAZY_MODES and not store_name:
            store_name = self.scenario.store.name
        if (w.name, mode) not in self.images:  # the image could not be made in this mode
            reason = self._skipped.get((w.name, mode), "no image was pushed in this mode")
            return self._failed(sample, w, mode, store_name, f"image not available: {reason}")
        ref = f"{registry.host}/{self.images[(w.name, mode)]}"
        rec = Record(
            sample=sample,
            workload=w.name,
            mode=mode,
            store=store_name,
            image=ref,
            runtime=self.scenario.runtime,
            node=self.scenario.node,
            podman_version=self._versions.get("podman", ""),
            storage_version=self._versions.get("containers_storage", ""),
            started=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        )
        tag = f"{sample}-{w.name}-{mode}" + (f"-{store_name}" if store_name else "")
        mdir = work / f"m-{tag}"
        if self.scenario.runtime == "crio":
            return self._measure_crio(rec, w, registry)
        try:
            with self._interrupt.teardown() as stack:
                stack.callback(shutil.rmtree, mdir, ignore_errors=True)
                store = None
                store_mark = mark = 0
                pull_wall = 0.0
                pull_clock: dict[str, Any] = {}
                with_timeline = False
                if mode in LAZY_MODES:
                    spec = self.scenario.store_named(store_name)
                    # Runs after the store stopped: its log stays with the run's records.
                    stack.callback(
                        _keep_log,
                        mdir / "store" / "store.log",
                        self.run_dir / "logs" / f"{tag}-store.log",
                    )
                    # One pull timeline per (workload × mode × store), from our store only.
                    with_timeline = sample == 0 and is_our_store(spec.command)
                    if with_timeline:
                        stack.callback(
                            self._keep_timeline, mdir / "store" / "timeline.jsonl", rec, pull_clock
                        )
                    # The log before the store starts: whatever it fetches until the pull
                    # does is neither timed nor counted (harness.laziness.fetched_before_pull).
                    store_mark = registry.log_mark()
                    store = stack.enter_context(
                        StoreProcess(
                            mdir / "store",
                            command=spec.command,
                            insecure_hosts=[registry.host],
                            noprefetch=mode in ON_DEMAND_MODES,
                            background_fetch=spec.background_fetch,
                            mount_timeout=spec.mount_timeout,
                            timeline=with_timeline,
                        )
                    )
                env = stack.enter_context(
                    PodmanEnv(
                        mdir / "podman",
                        additional_layer_store=store.mountpoint if store else None,
                        insecure_registries=[registry.host],
                        partial_pulls=mode == "zstd-chunked",
                        node=self._node,
                    )
                )
                rec.storage_options = env.storage_options
                if store is not None:
                    # On any failure (or Ctrl-C) cut the FUSE connection first, so that
                    # podman's cleanup does not wait on reads a stuck store never answers.
                    stack.push(_abort_on_error(store))
                if with_timeline and store is not None:
                    # The link's and the CPUs' load beside the timeline, until the run ends.
                    pull_clock["usage"] = stack.enter_context(
                        UsageSampler(self._link_iface, store.pid)
                    )
                mark = registry.log_mark()
                pull_wall = time.time()  # the registry's log times are wall-clock seconds
                pull_clock["start"] = time.monotonic()  # the store's timeline clock too
                pull = env.pull(ref, timeout=w.timeout)
                rec.pull_s = pull_clock["seconds"] = pull.seconds
                # Read from the runtime's storage right after the pull (files only: no podman
                # process, no FUSE access, a few milliseconds). Nothing slower may come
                # between pull and create: the store goes on fetching in the background, and
                # untimed seconds there would be lazy-pull work no `podman pull && podman run`
                # gets for free (podman 5 in a node spends ~2 s on the persistence check).
                layers = storage_verdict(env.graphroot, ref, store.mountpoint if store else None)
                t = time.monotonic()
                cid = create_container(env, ref, w.command, w.stdin, w.timeout, w.env, w.entrypoint)
                rec.create_s = time.monotonic() - t
                # The log's size at the first output line, not a settled mark: the run is
                # timed until the ready line, and nothing in its reading loop may wait.
                first_offset: list[int] = []
                outcome = start_until_ready(
                    env,
                    cid,
                    stdin=w.stdin,
                    ready=w.ready,
                    timeout=w.timeout,
                    on_first_output=lambda: first_offset.append(registry.log_offset()),
                    expected=w.expected,
                )
                rec.run_s = outcome.seconds
                pull_clock["end"] = time.monotonic()
                # The bytes of the timed window: the store fetches on after the ready line
                # (prefetch, background fetch), through the untimed checks below.
                run_end_offset = registry.log_offset()
                if "usage" in pull_clock:
                    pull_clock["usage"].stop()  # nothing after the run is sampled
                rec.total_s = rec.pull_s + rec.create_s + rec.run_s
                rec.first_output_s = outcome.first_output_s
                rec.exit_code = outcome.exit_code
                rec.stdout_head = outcome.stdout[:STDOUT_KEEP]
                rec.ready = outcome.ready  # the expected output included (start_until_ready)
                if mode in LAZY_MODES:
                    # Untimed, after the run: fresh podman processes ask for the image and its
                    # layers. A runtime that lost them after the pull pulled again in `create`,
                    # timed as a user gets it.
                    rec.persisted, rec.persistence = persistence_verdict(
                        env.check_persistence(ref), rec.storage_version
                    )
                if store is not None:
                    rec.store_metrics = store.scrape_metrics()
                log = registry.access_log()
                served = log[mark:]  # the laziness evidence: every request until now
                timed = log[mark : len(registry.access_log(upto=run_end_offset))]
                rec.bytes_fetched = sum(r.bytes for r in timed)
                rec.requests = len(timed)
                before = (
                    log[mark : len(registry.access_log(upto=first_offset[0]))]
                    if first_offset
                    else timed
                )
                rec.bytes_before_first_output = sum(r.bytes for r in before)
                rec.requests_before_first_output = len(before)
                # A run that failed is an error, unless its pull fell back: then the fallback
                # is the finding (it may be the failure's cause), with the failure beside it.
                failure = (
                    None
                    if rec.ready
                    else f"run: {not_ready_reason(w.ready, w.expected, outcome)}: "
                    f"{outcome.stdout[-200:]!r} {outcome.stderr.strip()[-300:]!r}"
                )
                if failure is not None and mode == "zstd-chunked":
                    failure = partial_pull_failure(failure, rec.storage_version)
                if mode == "legacy" and failure is None:
                    # Untimed, after the run and its registry log: podman's own pull work.
                    self._repull(env, ref, w.timeout, registry, rec)
                layers = layers.with_registry(
                    blobs_served_whole_to_runtime(served),
                    self._layer_digests.get((w.name, mode), []),
                )
                if store is not None and rec.persisted is False and layers.problem is not None:
                    # The runtime lost its layer records (so its storage cannot say where the
                    # layers came from): the registry's log is the evidence left.
                    layers = lost_records_verdict(
                        self._layer_digests.get((w.name, mode), []), served, layers
                    )
                if layers.problem is None:
                    rec.layers_total = layers.total
                    rec.layers_from_store = layers.from_store
                    rec.layers_served_whole = layers.served_whole
                early = fetched_before_pull(log[store_mark:mark]) if store is not None else None
                if early is not None:
                    problems = [p for p in (layers.problem, early) if p]
                    layers = Verdict(layers.layers, "; ".join(problems))
                if store is not None and not layers.lazy:
                    rec.status = "fell-back"
                    rec.error = fallback_reason(
                        layers,
                        [
                            (f"store log (logs/{tag}-store.log)", store.log_text()),
                            ("podman pull", pull.stderr),
                        ],
                    )
                    if failure is not None:
                        rec.error = f"{rec.error}; and {failure}"[:2000]
                elif failure is not None:
                    raise MeasurementError(failure)
            if store is not None and rec.status in ("ok", "fell-back"):
                # The store has stopped now. A request is logged when it ends, stamped with
                # the second it began: a blob download the store opened before the pull and
                # held open across its start (its last bytes unread) was logged only once the
                # store let go of it, or died with it — after the log above was read.
                settled = registry.log_mark()  # the count once the log stopped growing
                since_pull = registry.access_log()[mark:settled]
                late = fetched_before_pull(started_before(since_pull, pull_wall))
                if late is not None:
                    rec.error = (f"{rec.error}; " if rec.status == "fell-back" else "") + late
                    rec.error = rec.error[:2000]
                    rec.status = "fell-back"
        except (MeasurementError, PodmanError, OSError, RuntimeError, UserError) as exc:
            # An error out of the cleanup of an interrupted measurement is not a result.
            self._interrupt.check()
            rec.status = "error"
            rec.error = str(exc)[:2000]
        self._interrupt.check()
        rec.finished = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        return rec

    def _failed(
        self, sample: int, w: ResolvedWorkload, mode: str, store_name: str, error: str
    ) -> Record:
        """The record of a measurement not made, failed with ``error`` (measured again on
        resume, as every failure is)."""
        if mode in LAZY_MODES and not store_name:
            store_name = self.scenario.store.name
        return Record(
            sample=sample,
            workload=w.name,
            mode=mode,
            store=store_name,
            status="error",
            error=error,
            runtime=self.scenario.runtime,
        )

    def _repull(self, env: PodmanEnv, ref: str, timeout: float, registry: Any, rec: Record) -> None:
        """``podman pull`` of the image just pulled and run, every layer now local: podman's
        own pull work with no layer to transfer (ping, manifest, config at most), the runtime
        floor of the limit model (:mod:`harness.limit`). Sets ``repull_s`` and
        ``repull_requests``; the sample's phases, bytes and requests were taken before. A
        failure leaves them None and says why: the record stands without them."""
        try:
            mark = registry.log_mark()
            result = env.pull(ref, timeout=timeout)
            rec.repull_requests = registry.log_mark() - mark
        except (PodmanError, OSError) as exc:
            self._interrupt.check()
            self.console.print(
                f"  [yellow]re-pull of {escape(rec.workload)}/{rec.mode} (runtime floor, not "
                f"timed in the sample): {escape(str(exc)[:500])}[/]"
            )
            return
        rec.repull_s = result.seconds

    def _keep_timeline(self, events: Path, rec: Record, pull_clock: dict[str, Any]) -> None:
        """Turn the stopped store's timeline into ``<run>/timeline/`` (harness.timeline), with
        the link's and CPUs' load from the pull's start to the run's end (harness.usage) when
        the run finished; a measurement whose pull did not finish has none, nor one
        interrupted (SIGINT/SIGTERM: no record of it is kept, and a timeline left beside the
        others was reported as sample 0's; one that comes later in the teardown, :meth:`measure`
        removes what this wrote). Never fails the measurement."""
        if "seconds" not in pull_clock or self._interrupt.signal is not None:
            return
        sampler = pull_clock.get("usage")
        try:
            usage = (
                usage_doc(sampler, pull_clock["start"], pull_clock["end"])
                if isinstance(sampler, UsageSampler) and "end" in pull_clock
                else None
            )
            written = write_timeline(
                events,
                self.run_dir,
                workload=rec.workload,
                mode=rec.mode,
                store=rec.store,
                sample=rec.sample,
                pull_start=pull_clock["start"],
                pull_s=pull_clock["seconds"],
                usage=usage,
            )
            if written is not None:
                self._timeline_files += [written, written.with_suffix(".md")]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.console.print(
                f"  [yellow]pull timeline of {escape(rec.workload)}/{rec.mode}: "
                f"{escape(str(exc))}[/]"
            )

    def _check_resumed_code(self, meta: dict[str, Any]) -> None:
        """A run's samples measure one lazybench: a resume from another commit is refused
        (a checkout without git, "", is not compared). Raises :class:`UserError`."""
        started = meta.get("git_commit") or ""
        now = git_commit()
        if started and now and started != now:
            raise UserError(
                f"{self.run_dir}: started at commit {started}, the checkout is at {now}: the "
                "samples of one run must measure one lazybench and store; check out "
                f"{started} to resume it, or start a new run"
            )

    def _measure_crio(self, rec: Record, w: ResolvedWorkload, registry: Any) -> Record:
        """The same measurement through the host's CRI-O (see harness.crio for its limits),
        with the laziness verdict read from CRI-O's storage for a lazy mode."""
        from harness.crio import CrioDriver, crio_storage

        try:
            mark = registry.log_mark()
            layers: list[Verdict] = []
            lazy = rec.mode in LAZY_MODES

            def verdict() -> None:  # after the pull, before create: what the storage holds
                storage = crio_storage()
                layers.append(storage_verdict(storage.graphroot, rec.image, storage.layer_store))

            t = CrioDriver().measure(
                rec.image,
                w.command,
                w.ready,
                w.timeout,
                after_pull=verdict if lazy else lambda: None,
                entrypoint=w.entrypoint,
            )
            served = registry.access_log()[mark:]
            rec.pull_s, rec.create_s, rec.run_s = t.pull_s, t.create_s, t.run_s
            rec.total_s = t.pull_s + t.create_s + t.run_s
            rec.first_output_s, rec.ready = t.first_output_s, t.ready
            rec.stdout_head = t.stdout[:STDOUT_KEEP]
            rec.bytes_fetched = sum(r.bytes for r in served)
            rec.requests = len(served)
            if not t.ready:
                raise MeasurementError(f"run: not ready: {t.stdout[-200:]!r}")
            if layers:  # as for podman: every layer from the store, none served whole
                found = layers[0].with_registry(blobs_served_whole_to_runtime(served))
                if found.problem is None:
                    rec.layers_total = found.total
                    rec.layers_from_store = found.from_store
                    rec.layers_served_whole = found.served_whole
                if not found.lazy:
                    rec.status, rec.error = "fell-back", fallback_reason(found, [])
        except (MeasurementError, OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            rec.status, rec.error = "error", str(exc)[:2000]
        rec.finished = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        return rec
