"""The measurement loop: a scenario in, one fsynced JSON record per measurement out.

Order of a run:

1. *Images*: each workload's recipe is built (cached by recipe hash, so a second run reuses it)
   and pushed in every mode to a registry on loopback whose storage directory the measured
   registry then serves. Pushing never crosses the shaped link. For ``estargz`` the workload
   first runs once through our store with the access trace on (from the estargz-noopt image),
   and the image is rebuilt with the traced files prioritized (the trace is cached too).
2. *Link and registry*: the network profile's link is set up and measured, and the registry is
   started behind it (inside the link's namespace); podman and the store reach it at the
   namespace's address over plain HTTP.
3. *Measurements*: per sample the (workload × mode) list is shuffled (seeded: a resumed run
   keeps the order). Each measurement gets a fresh podman (graphroot, runroot, configs, empty
   blob-info cache; the layer store only in lazy modes) and, in lazy modes, the store started
   with an empty cache. ``pull``, ``create`` and ``run`` (until the ready line, or exit) are
   timed separately; the registry's access log gives bytes and requests, including those done
   before the workload's first output line.

Records are appended as they complete; a run is resumed by skipping the keys already recorded
as successful. SIGINT/SIGTERM raise :class:`Interrupted` once (further signals are ignored while
cleaning up), so every mount, process, namespace and qdisc is torn down by the context managers
that made it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import json
import os
import platform
import queue
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.cli import UserError
from harness.podman import PodmanEnv, PodmanError, write_atomic
from harness.results import ENVIRONMENT, Record, append_record, finished_keys
from harness.scenario import LAZY_MODES, Scenario, Workload, parse_scenario
from harness.store_proc import StoreError, StoreProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "results" / "runs"
SCENARIO_COPY = "scenario.json"
STDOUT_KEEP = 4000


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: stop measuring, clean up, keep the records."""


class MeasurementError(RuntimeError):
    """One step of a measurement failed (recorded as an error, the run goes on)."""


# -- workloads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedWorkload:
    """A scenario workload with the recipe's defaults filled in."""

    name: str
    recipe: Any  # harness.images.Recipe, ImageSource or ContainerfileSource
    command: tuple[str, ...]
    stdin: str | None
    ready: str | None
    expected: str | None
    timeout: float
    env: tuple[tuple[str, str], ...] = ()

    @property
    def repo(self) -> str:
        return f"lazybench/{self.name}"


def recipe_for(name: str) -> Any:
    from harness.images import RECIPES, tiny_recipe

    if name == "tiny":
        return tiny_recipe()
    try:
        return RECIPES[name]
    except KeyError:
        raise UserError(f"unknown image recipe {name!r}") from None


# A workload from an image or a Containerfile has no recipe to take a timeout from.
DEFAULT_IMAGE_TIMEOUT = 300.0


def resolve(w: Workload) -> ResolvedWorkload:
    if w.recipe is None:
        from harness.images import ContainerfileSource, ImageSource

        source: Any = (
            ImageSource(w.image, w.platform, w.name)
            if w.image is not None
            else ContainerfileSource(str(w.containerfile), w.context, w.platform, w.name)
        )
        return ResolvedWorkload(
            name=w.name,
            recipe=source,
            command=w.command or (),  # empty: the image's own entrypoint and cmd
            stdin=w.stdin,
            ready=w.ready if w.ready is not None else w.expect,
            expected=w.expect,
            timeout=w.timeout if w.timeout is not None else DEFAULT_IMAGE_TIMEOUT,
            env=w.env or (),
        )
    recipe = recipe_for(w.recipe)
    return ResolvedWorkload(
        name=w.name,
        recipe=recipe,
        command=w.command if w.command is not None else tuple(recipe.run_cmd),
        stdin=w.stdin if w.stdin is not None else recipe.stdin,
        # A workload that runs to completion is "ready" when its expected output appears:
        # that is within milliseconds of its exit, and it does not charge the workload with
        # podman's own exit bookkeeping (with zstd:chunked layers podman 4.3 waits out a 20 s
        # conmon timeout before `start --attach` returns).
        ready=w.ready if w.ready is not None else (recipe.ready_line or recipe.expected_output),
        expected=w.expect if w.expect is not None else recipe.expected_output,
        timeout=w.timeout if w.timeout is not None else float(recipe.timeout),
        env=w.env or (),
    )


def plan(scenario: Scenario) -> list[tuple[int, str, str]]:
    """Every (sample, workload, mode), each sample's pairs shuffled with a seeded RNG."""
    pairs = [(w.name, m) for w in scenario.workloads for m in scenario.modes_of(w)]
    out = []
    for sample in range(scenario.samples):
        order = pairs[:]
        random.Random(f"{scenario.seed}:{sample}").shuffle(order)
        out += [(sample, w, m) for w, m in order]
    return out


# -- running a container until it is ready ---------------------------------------------------------


@dataclass
class RunOutcome:
    seconds: float
    first_output_s: float | None
    ready: bool
    exit_code: int | None
    stdout: str
    stderr: str


def start_until_ready(
    env: PodmanEnv,
    container: str,
    *,
    stdin: str | None,
    ready: str | None,
    timeout: float,
    on_first_output: Callable[[], None] = lambda: None,
) -> RunOutcome:
    """``podman start --attach`` the container; return when ``ready`` shows on its output (then
    stop it) or, without a ready line, when it exits. Times out after ``timeout`` seconds."""
    argv = ["podman", "start", "--attach"]
    if stdin is not None:
        argv.append("--interactive")
    argv.append(container)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env=env.env,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )

    def pump(name: str, stream: Any) -> None:
        for line in stream:
            lines.put((name, line))
        lines.put((name, None))

    def feed() -> None:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.write(stdin or "")
            proc.stdin.close()

    threads = [
        threading.Thread(target=pump, args=("stdout", proc.stdout), daemon=True),
        threading.Thread(target=pump, args=("stderr", proc.stderr), daemon=True),
    ]
    if stdin is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    for t in threads:
        t.start()
    first: float | None = None
    seen_ready = False
    open_streams = 2
    try:
        while open_streams:
            remaining = timeout - (time.monotonic() - start)
            if remaining <= 0:
                raise MeasurementError(
                    f"run: no {'ready line ' + repr(ready) if ready else 'exit'} within "
                    f"{timeout:g}s; output: {''.join(out['stdout'])[-300:]!r}"
                )
            try:
                name, line = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                continue
            now = time.monotonic()
            out[name].append(line)
            if first is None and name == "stdout":
                first = now - start
                on_first_output()
            if ready and ready in line:
                seen_ready = True
                elapsed = now - start
                break
        if seen_ready:
            exit_code = None
        else:
            elapsed = time.monotonic() - start
            try:
                exit_code = proc.wait(timeout=max(1.0, timeout - elapsed))
            except subprocess.TimeoutExpired:
                raise MeasurementError(f"run: podman did not exit within {timeout:g}s") from None
            elapsed = time.monotonic() - start
    finally:
        # Never raise from here: that would replace the exception being handled.
        if proc.poll() is None:
            with contextlib.suppress(PodmanError):
                env.podman("stop", "--time", "0", container, timeout=30, check=False)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
    ok = seen_ready if ready else exit_code == 0
    return RunOutcome(elapsed, first, ok, exit_code, "".join(out["stdout"]), "".join(out["stderr"]))


def _not_ready(w: ResolvedWorkload, outcome: RunOutcome) -> str:
    """Why a run that ended is not a success, in the workload's terms."""
    if w.ready and w.ready not in outcome.stdout:
        return (
            f"the workload exited ({outcome.exit_code}) without printing its ready line {w.ready!r}"
        )
    if w.expected is not None and w.expected not in outcome.stdout:
        return f"the output lacks the expected {w.expected!r} (exit {outcome.exit_code})"
    return f"the workload exited {outcome.exit_code}"


def _retry(push: Callable[[], Any], console: Console, attempts: int = 3) -> Any:
    """Pushes go over loopback to a registry we own: a failure other than an unsupported
    mode is most likely transient, so try again before giving up on the run."""
    from harness.images import ModeUnsupported, PushError

    for attempt in range(1, attempts + 1):
        try:
            return push()
        except ModeUnsupported:
            raise
        except PushError as exc:
            if attempt == attempts:
                raise
            console.print(f"  [yellow]push failed ({exc}); retrying[/]")
            time.sleep(2)
    raise AssertionError("unreachable")


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


# -- the network link -----------------------------------------------------------------------------


@dataclass
class Link:
    """Where the registry runs: ``prefix`` runs a command there, ``address`` is its address."""

    profile: str
    prefix: tuple[str, ...] = ()
    address: str = "127.0.0.1"
    measured: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def open_link(profile: str, console: Console) -> Iterator[Link]:
    """The shaped link of ``profile`` (harness.netshape), measured, torn down on exit
    (``loopback`` has no namespace: the registry listens on 127.0.0.1)."""
    from harness.netshape import NetworkLink

    with NetworkLink(profile) as net:
        link = Link(profile, prefix=tuple(net.prefix), address=net.ns_addr)
        if net.netns is not None:
            console.print(f"link {profile}: measuring rate and RTT…")
            net.measure()
        link.measured = net.info()
        yield link


# -- environment metadata ---------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def environment(scenario: Scenario) -> dict[str, Any]:
    """Versions and machine facts stored with the records (the link is added once measured)."""
    git = ""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        git = proc.stdout.strip()
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "podman": _version(["podman", "--version"]),
        "runc": _version(["runc", "--version"]),
        "registry": _version(["docker-registry", "--version"]),
        "skopeo": _version(["skopeo", "--version"]),
        "runtime": scenario.runtime,
        "store_command": list(scenario.store.command),
        "git_commit": git,
        "scenario": scenario.to_dict(),
    }


# -- the runner -------------------------------------------------------------------------


@dataclass
class InterruptState:
    """Set by the signal handler; checked where an error raised during cleanup could
    otherwise replace (and so swallow) the :class:`Interrupted` exception."""

    signal: str | None = None

    def check(self) -> None:
        if self.signal is not None:
            raise Interrupted(self.signal)


@contextlib.contextmanager
def interruptible() -> Iterator[InterruptState]:
    """SIGINT/SIGTERM raise :class:`Interrupted` once; later ones are ignored so cleanup ends."""
    state = InterruptState()

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        state.signal = signal.Signals(signum).name
        raise Interrupted(state.signal)

    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def new_run_id(scenario: Scenario) -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{scenario.name}"


def load_run_scenario(run_dir: Path) -> Scenario:
    """The scenario a run directory was started with (for ``--resume``)."""
    path = run_dir / SCENARIO_COPY
    if not path.exists():
        raise UserError(f"{run_dir}: no {SCENARIO_COPY} here (not a run directory?)")
    return parse_scenario(json.loads(path.read_text()), str(path))


@dataclass
class Runner:
    scenario: Scenario
    run_dir: Path
    console: Console = field(default_factory=Console)
    cache_dir: Path | None = None
    show_progress: bool = True
    workdir: Path | None = None
    images: dict[tuple[str, str], str] = field(default_factory=dict)
    _interrupt: InterruptState = field(default_factory=InterruptState, repr=False)
    _skipped: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

    def run(self) -> list[tuple[int, str, str]]:
        """Measure every planned key not yet recorded; return the keys measured now."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(
                    f"{self.run_dir}: another `lazybench run` is writing to this run directory"
                ) from None
            return self._run_locked()

    def _run_locked(self) -> list[tuple[int, str, str]]:
        self._check_same_scenario()
        todo = [k for k in plan(self.scenario) if k not in finished_keys(self.run_dir)]
        if not todo:
            self.console.print(f"{self.run_dir}: every measurement is recorded already")
            return []
        if self.scenario.runtime == "crio":
            from harness.crio import require_crio

            require_crio()
        workloads = {w.name: resolve(w) for w in self.scenario.workloads}
        env_path = self.run_dir / ENVIRONMENT
        meta = json.loads(env_path.read_text()) if env_path.exists() else environment(self.scenario)
        if env_path.exists():
            meta.setdefault("resumed", []).append(
                dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            )
        done: list[tuple[int, str, str]] = []
        with interruptible() as self._interrupt, contextlib.ExitStack() as stack:
            work = Path(tempfile.mkdtemp(prefix="lzb-run-", dir=self.workdir))
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            storage = work / "registry"
            meta["images"] = self._prepare_images(workloads, storage, work)
            link = stack.enter_context(open_link(self.scenario.network_profile, self.console))
            meta["link"] = link.measured
            write_atomic(env_path, json.dumps(meta, indent=1, sort_keys=True))
            registry = stack.enter_context(self._registry(storage, link))
            progress = stack.enter_context(self._progress())
            task = progress.add_task("measuring", total=len(todo))
            for sample, name, mode in todo:
                self._interrupt.check()
                progress.update(task, description=f"sample {sample + 1} {name}/{mode}")
                record = self.measure(sample, workloads[name], mode, registry, work)
                append_record(self.run_dir, record)
                done.append(record.key)
                progress.advance(task)
                self._say(progress, record)
        return done

    # -- pieces -------------------------------------------------------------------------------

    def _check_same_scenario(self) -> None:
        path = self.run_dir / SCENARIO_COPY
        mine = self.scenario.to_dict()
        if path.exists():
            if json.loads(path.read_text()) != json.loads(json.dumps(mine)):
                raise UserError(
                    f"{self.run_dir}: was started with a different scenario; "
                    "resume it with `lazybench run --resume RUN_DIR` or pick a new --run-id"
                )
        else:
            write_atomic(path, json.dumps(mine, indent=1))

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
        if r.status == "ok":
            mb = (r.bytes_fetched or 0) / 1e6
            progress.console.print(
                f"  sample {r.sample + 1} {r.workload}/{r.mode}: pull {r.pull_s:.2f}s "
                f"create {r.create_s:.2f}s run {r.run_s:.2f}s = {r.total_s:.2f}s, {mb:.1f} MB"
            )
        else:
            progress.console.print(
                f"  [red]sample {r.sample + 1} {r.workload}/{r.mode} failed:[/] {r.error}"
            )

    @contextlib.contextmanager
    def _registry(self, storage: Path, link: Link) -> Iterator[Any]:
        from harness.registry_server import RegistryServer

        with RegistryServer(
            storage_dir=storage, host_addr=link.address, wrapper=link.prefix
        ) as reg:
            yield reg

    def _prepare_images(
        self, workloads: dict[str, ResolvedWorkload], storage: Path, work: Path
    ) -> dict[str, Any]:
        """Build and push every (workload, mode) into ``storage`` via a loopback registry."""
        from harness.images import ImageBuildError, PushError
        from harness.registry_server import RegistryServerError

        try:
            return self._build_and_push(workloads, storage, work)
        except (ImageBuildError, PushError, RegistryServerError, PodmanError, StoreError) as exc:
            raise UserError(f"preparing images: {exc}") from None

    def _build_and_push(
        self, workloads: dict[str, ResolvedWorkload], storage: Path, work: Path
    ) -> dict[str, Any]:
        from harness.images import ModeUnsupported, build_image, push_image
        from harness.registry_server import RegistryServer

        info: dict[str, Any] = {}
        with RegistryServer(storage_dir=storage) as reg:
            for w in workloads.values():
                self.console.print(f"[bold]image {w.name}[/]: building or importing (cached)")
                built = build_image(
                    w.recipe, self.cache_dir, progress=lambda m: self.console.print(f"  {m}")
                )
                for mode in self.scenario.modes_of(self.scenario.workload(w.name)):
                    files = None
                    if mode == "estargz":
                        files = self._traced_files(w, built, reg, work)
                    self.console.print(f"  push {w.name}:{mode}")
                    try:
                        pushed = _retry(
                            functools.partial(
                                push_image,
                                built,
                                reg.host,
                                w.repo,
                                mode,
                                mode,
                                prioritized_files=files,
                            ),
                            self.console,
                        )
                    except ModeUnsupported as exc:  # a mode this machine's tools cannot produce
                        self.console.print(f"  [yellow]skip {w.name}:{mode}[/]: {exc}")
                        info.setdefault(w.name, {})[mode] = {"skipped": str(exc)}
                        self._skipped[(w.name, mode)] = str(exc)
                        continue
                    self.images[(w.name, mode)] = f"{w.repo}:{mode}"
                    info.setdefault(w.name, {})[mode] = {
                        "manifest_digest": pushed.manifest_digest,
                        "compressed_bytes": pushed.compressed_size,
                        "layers": len(pushed.layers),
                        "prioritized_files": len(files) if files is not None else None,
                    }
        return info

    def _traced_files(self, w: ResolvedWorkload, built: Any, reg: Any, work: Path) -> list[str]:
        """The files the workload reads, from a run through our store with the trace on."""
        from harness.trace import traced_files

        return traced_files(
            built,
            w,
            reg.host,
            work,
            cache_dir=self.cache_dir,
            mount_timeout=self.scenario.store.mount_timeout,
            say=self.console.print,
        )

    @staticmethod
    def _create(env: PodmanEnv, ref: str, w: ResolvedWorkload) -> str:
        opts = ["--network=none"]
        if w.stdin is not None:
            opts.append("--interactive")
        opts += [f"--env={k}={v}" for k, v in w.env]
        return env.podman("create", *opts, ref, *w.command, timeout=w.timeout).stdout.strip()

    def measure(
        self, sample: int, w: ResolvedWorkload, mode: str, registry: Any, work: Path
    ) -> Record:
        """One measurement from empty caches; failures become an error record."""
        if (w.name, mode) not in self.images:  # the image could not be made in this mode
            reason = self._skipped.get((w.name, mode), "no image was pushed in this mode")
            return Record(
                sample=sample,
                workload=w.name,
                mode=mode,
                status="error",
                error=f"image not available: {reason}",
                runtime=self.scenario.runtime,
            )
        ref = f"{registry.host}/{self.images[(w.name, mode)]}"
        rec = Record(
            sample=sample,
            workload=w.name,
            mode=mode,
            image=ref,
            runtime=self.scenario.runtime,
            started=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        )
        mdir = work / f"m-{sample}-{w.name}-{mode}"
        if self.scenario.runtime == "crio":
            return self._measure_crio(rec, w, registry)
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(shutil.rmtree, mdir, ignore_errors=True)
                store = None
                if mode in LAZY_MODES:
                    # Runs after the store stopped: its log stays with the run's records.
                    stack.callback(
                        _keep_log,
                        mdir / "store" / "store.log",
                        self.run_dir / "logs" / f"{sample}-{w.name}-{mode}-store.log",
                    )
                    store = stack.enter_context(
                        StoreProcess(
                            mdir / "store",
                            command=self.scenario.store.command,
                            insecure_hosts=[registry.host],
                            noprefetch=mode == "estargz-noopt",
                            background_fetch=self.scenario.store.background_fetch,
                            mount_timeout=self.scenario.store.mount_timeout,
                        )
                    )
                env = stack.enter_context(
                    PodmanEnv(
                        mdir / "podman",
                        additional_layer_store=store.mountpoint if store else None,
                        insecure_registries=[registry.host],
                        partial_pulls=mode == "zstd-chunked",
                    )
                )
                if store is not None:
                    # On any failure (or Ctrl-C) cut the FUSE connection first, so that
                    # podman's cleanup does not wait on reads a stuck store never answers.
                    stack.push(_abort_on_error(store))
                mark = registry.log_mark()
                pull = env.pull(ref, timeout=w.timeout)
                rec.pull_s = pull.seconds
                t = time.monotonic()
                cid = self._create(env, ref, w)
                rec.create_s = time.monotonic() - t
                first_mark: list[int] = []
                outcome = start_until_ready(
                    env,
                    cid,
                    stdin=w.stdin,
                    ready=w.ready,
                    timeout=w.timeout,
                    on_first_output=lambda: first_mark.append(registry.log_mark()),
                )
                rec.run_s = outcome.seconds
                rec.total_s = rec.pull_s + rec.create_s + rec.run_s
                rec.first_output_s = outcome.first_output_s
                rec.exit_code = outcome.exit_code
                rec.stdout_head = outcome.stdout[:STDOUT_KEEP]
                rec.ready = outcome.ready
                if w.expected is not None and w.expected not in outcome.stdout:
                    rec.ready = False
                if store is not None:
                    rec.store_metrics = store.scrape_metrics()
                log = registry.access_log()
                served = log[mark:]
                rec.bytes_fetched = sum(r.bytes for r in served)
                rec.requests = len(served)
                before = log[mark : first_mark[0]] if first_mark else served
                rec.bytes_before_first_output = sum(r.bytes for r in before)
                rec.requests_before_first_output = len(before)
                if not rec.ready:
                    raise MeasurementError(
                        f"run: {_not_ready(w, outcome)}: "
                        f"{outcome.stdout[-200:]!r} {outcome.stderr.strip()[-300:]!r}"
                    )
        except (MeasurementError, PodmanError, OSError, RuntimeError, UserError) as exc:
            # An error out of the cleanup of an interrupted measurement is not a result.
            self._interrupt.check()
            rec.status = "error"
            rec.error = str(exc)[:2000]
        self._interrupt.check()
        rec.finished = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        return rec

    def _measure_crio(self, rec: Record, w: ResolvedWorkload, registry: Any) -> Record:
        """The same measurement through the host's CRI-O (see harness.crio for its limits)."""
        from harness.crio import CrioDriver

        try:
            mark = registry.log_mark()
            t = CrioDriver().measure(rec.image, w.command, w.ready, w.timeout)
            served = registry.access_log()[mark:]
            rec.pull_s, rec.create_s, rec.run_s = t.pull_s, t.create_s, t.run_s
            rec.total_s = t.pull_s + t.create_s + t.run_s
            rec.first_output_s, rec.ready = t.first_output_s, t.ready
            rec.stdout_head = t.stdout[:STDOUT_KEEP]
            rec.bytes_fetched = sum(r.bytes for r in served)
            rec.requests = len(served)
            if not t.ready:
                raise MeasurementError(f"run: not ready: {t.stdout[-200:]!r}")
        except (MeasurementError, OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            rec.status, rec.error = "error", str(exc)[:2000]
        rec.finished = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        return rec
