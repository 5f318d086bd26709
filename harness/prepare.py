"""Everything a run sets up before it measures: workloads, images, the link.

* *Workloads*: a scenario workload with its recipe's defaults filled in
  (:func:`resolve`).
* *Images*: each workload's recipe is built (cached by recipe hash, so a second run reuses it),
  or its image imported from any source or built from its Containerfile (cached by manifest
  digest; harness.images.source), and pushed in every mode to a registry on loopback whose
  storage directory the measured registry then serves (:class:`ImagePreparer`). Pushing never
  crosses the shaped link. For ``estargz`` the workload first runs once through our store with
  the access trace on (from the estargz-noopt image; harness.trace), and the image is rebuilt
  with the traced files prioritized (the trace is cached too).
* *Stores*: a store command naming a built-in store (``{go-stargz-store}``) has it built into
  the cache before anything is measured (:func:`prepare_store`).
* *Link*: the network profile's link is set up and measured (:func:`open_link`); the registry
  is then started behind it (inside the link's namespace).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from harness.cli import UserError, plain
from harness.podman import PodmanError
from harness.runtimes import Node
from harness.scenario import LAZY_MODES, Scenario, Workload, image_mode
from harness.store_proc import StoreError, resolve_store_command

if TYPE_CHECKING:
    from harness.trace import TracedFile

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
    # None: the image's own ENTRYPOINT; (): cleared; else podman's --entrypoint
    entrypoint: tuple[str, ...] | None = None

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
            command=w.command or (),  # empty: the image's own cmd (after its entrypoint)
            entrypoint=w.entrypoint,
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
        entrypoint=w.entrypoint,
    )


# -- images ------------------------------------------------------------------------------------


def _check_has_command(w: ResolvedWorkload, config: dict[str, Any] | None) -> None:
    """Refuse, before anything is measured, a workload that runs its image's own command
    (no ``command``, no ``entrypoint``) when the image has none: podman would refuse every
    measurement. (``entrypoint = ""`` without a ``command`` is refused with the scenario.)"""
    if w.command or w.entrypoint:
        return
    own = (config or {}).get("config") or {}
    if not own.get("Entrypoint") and not own.get("Cmd"):
        raise UserError(
            f"workload {w.name}: its image has no Entrypoint or Cmd to run: give the "
            "workload a command = [...] (or an entrypoint = [...]) in its [[workloads]] table"
        )


def _retry(push: Callable[[], Any], console: Console, attempts: int = 3) -> Any:
    """Pushes go over loopback to a registry we own: a failure other than an unsupported
    mode or a refused layer is most likely transient, so try again before giving up on the run."""
    from harness.images import LayerRefused, ModeUnsupported, PushError

    for attempt in range(1, attempts + 1):
        try:
            return push()
        except (ModeUnsupported, LayerRefused):
            raise
        except PushError as exc:
            if attempt == attempts:
                raise
            console.print(f"  [yellow]push failed ({escape(str(exc))}); retrying[/]")
            time.sleep(2)
    raise AssertionError("unreachable")


@dataclass
class ImagePreparer:
    """Builds and pushes a scenario's images; ``refs`` maps (workload, mode) to the pushed
    ``repo:tag``, ``skipped`` the pairs this machine's tools could not produce to why."""

    scenario: Scenario
    console: Console
    cache_dir: Path | None = None
    node: Node | None = None  # the runtime node measured: it writes the zstd-chunked images
    refs: dict[tuple[str, str], str] = field(default_factory=dict)
    layer_digests: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # (workload, mode) -> every blob of the pushed image: manifest, config, layers
    blob_digests: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    # workload -> its limits.json entry (harness.limit): the bytes its traced reads cost
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)

    def prepare(
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
        from harness.images import ModeUnsupported, push_image
        from harness.registry_server import RegistryServer

        info: dict[str, Any] = {}
        with RegistryServer(storage_dir=storage) as reg:
            for w in workloads.values():
                built = self._prepare_image(w)
                _check_has_command(w, built.config)
                for mode in self.scenario.modes_of(self.scenario.workload(w.name)):
                    files = ranges = order = None
                    if mode == "estargz":
                        traced = self._traced_reads(w, built, reg, work)
                        files = [f.path for f in traced]
                        ranges = {f.path: f.ranges for f in traced if f.ranges is not None}
                        order = {f.path: f.order for f in traced if f.order is not None}
                    self.console.print(f"  push {w.name}:{mode}")
                    try:
                        pushed = _retry(
                            functools.partial(
                                push_image,
                                built,
                                reg.host,
                                w.repo,
                                mode,
                                image_mode(mode),
                                prioritized_files=files,
                                read_ranges=ranges,
                                read_order=order,
                                # podman 5.x partial-pulls only what its generation writes
                                node=self.node if image_mode(mode) == "zstd-chunked" else None,
                            ),
                            self.console,
                        )
                    except ModeUnsupported as exc:  # a mode this machine's tools cannot produce
                        self.console.print(f"  [yellow]skip {w.name}:{mode}[/]: {escape(str(exc))}")
                        info.setdefault(w.name, {})[mode] = {"skipped": str(exc)}
                        self.skipped[(w.name, mode)] = str(exc)
                        continue
                    self.refs[(w.name, mode)] = f"{w.repo}:{mode}"
                    self.layer_digests[(w.name, mode)] = [x.digest for x in pushed.layers]
                    self._warn_repeated_layers(w.name, mode)
                    self.blob_digests[(w.name, mode)] = [
                        pushed.manifest_digest,
                        pushed.config_digest,
                        *self.layer_digests[(w.name, mode)],
                    ]
                    info.setdefault(w.name, {})[mode] = {
                        "manifest_digest": pushed.manifest_digest,
                        "compressed_bytes": pushed.compressed_size,
                        "layers": len(pushed.layers),
                        "prioritized_files": len(files) if files is not None else None,
                    }
                self.limits[w.name] = self._limit_entry(w, built)
        return info

    def _prepare_image(self, w: ResolvedWorkload) -> Any:
        """:meth:`_build`, saying what happened: the build's or import's own progress lines,
        or that the cache had the image."""
        say = plain(self.console)
        self.console.print(f"[bold]image {w.name}[/]: preparing")
        said: list[str] = []  # progress lines: none when the cache had the image

        def progress(message: str) -> None:
            said.append(message)
            say(f"  {message}")

        built = self._build(w, progress)
        if not said:
            say(f"  reused from the cache ({built.dir})")
        return built

    def _build(self, w: ResolvedWorkload, progress: Callable[[str], None]) -> Any:
        """The workload's image built or imported; an image or Containerfile that cannot be
        used is a :class:`UserError` naming its key as scenario errors do
        (``FILE: workloads[N].image: PROBLEM``)."""
        from harness.images import ContainerfileSource, ImageBuildError, ImageSource, build_image

        try:
            return build_image(w.recipe, self.cache_dir, progress=progress)
        except ImageBuildError as exc:
            if not isinstance(w.recipe, ImageSource | ContainerfileSource):
                raise
            names = [x.name for x in self.scenario.workloads]
            key = "image" if isinstance(w.recipe, ImageSource) else "containerfile"
            where = f"workloads[{names.index(w.name)}].{key}"
            raise UserError(f"{self.scenario.source or 'scenario'}: {where}: {exc}") from None

    def _warn_repeated_layers(self, name: str, mode: str) -> None:
        """Say up front when a lazy mode's image lists one layer more than once (identical
        layers, e.g. empty ones): our store declines such a layer (overlayfs cannot stack one
        directory twice; ``store/resolver.py``), the runtime pulls it normally and the mode's
        records count as fallbacks, not as lazy figures."""
        if mode not in LAZY_MODES:
            return
        digests = self.layer_digests[(name, mode)]
        repeated = {d: n for d, n in Counter(digests).items() if n > 1}
        for digest, n in repeated.items():
            self.console.print(
                f"  [yellow]{name}:{mode}[/]: layer {digest} is listed {n} times: no layer "
                "store can serve one layer at two places (overlayfs cannot stack one directory "
                "twice; ours declines it and podman pulls it normally), so this mode's records "
                "will count as fallbacks"
            )

    def _limit_entry(self, w: ResolvedWorkload, built: Any) -> dict[str, Any]:
        """The limit model's byte count of ``w``: its cached trace (there when the ``estargz``
        mode traced it, now or in an earlier run) over the TOCs of its most finely chunked
        image (:func:`harness.limit.workload_entry`)."""
        from harness.limit import workload_entry
        from harness.trace import trace_cache_path

        entry = workload_entry(built.dir, trace_cache_path(built.hash, w, self.cache_dir))
        if "compressed_bytes" in entry:
            self.console.print(
                f"  limit {w.name}: its reads cost {entry['compressed_bytes'] / 1e6:.1f} MB "
                f"compressed ({entry['files_with_ranges']} of {entry['files']} files with "
                "their byte ranges traced, the others whole)"
            )
        else:
            self.console.print(f"  [yellow]limit {w.name}: {escape(entry['unavailable'])}[/]")
        return entry

    def _traced_reads(
        self, w: ResolvedWorkload, built: Any, reg: Any, work: Path
    ) -> list[TracedFile]:
        """The files the workload reads and the byte ranges of each, from a run through our
        store with the trace on."""
        from harness.trace import traced_reads

        return traced_reads(
            built,
            w,
            reg.host,
            work,
            cache_dir=self.cache_dir,
            mount_timeout=self.scenario.store.mount_timeout,
            say=plain(self.console),
        )


# -- stores --------------------------------------------------------------------------------------


def prepare_store(command: tuple[str, ...], console: Console) -> tuple[str, ...]:
    """``command`` with its built-in store built (the Go stargz-store, cached), so that no build
    happens inside a measurement. Raises :class:`UserError` naming what to install when the
    build fails."""
    try:
        return resolve_store_command(command, progress=plain(console))
    except StoreError as exc:
        raise UserError(str(exc)) from None


# -- the network link -----------------------------------------------------------------------------


@dataclass
class Link:
    """Where the registry runs: ``prefix`` runs a command there, ``address`` is its address."""

    profile: str
    prefix: tuple[str, ...] = ()
    address: str = "127.0.0.1"
    measured: dict[str, Any] = field(default_factory=dict)
    iface: str | None = None  # the host's interface the registry's bytes arrive on


def preflight_link(profile: str) -> None:
    """Refuse, before anything is built, a profile whose shaping cannot work here: its
    delay needs the NFQUEUE delayer (no ``sch_netem``) and netfilterqueue is missing."""
    from harness.netshape import get_profile
    from harness.netshape.link import missing_delayer_dependency, needs_delayer

    if needs_delayer(get_profile(profile)):
        missing = missing_delayer_dependency()
        if missing:
            raise UserError(f"network profile {profile!r}: {missing}")


@contextlib.contextmanager
def open_link(profile: str, console: Console) -> Iterator[Link]:
    """The shaped link of ``profile`` (harness.netshape), measured, torn down on exit
    (``loopback`` has no namespace: the registry listens on 127.0.0.1). A link that cannot be
    set up is a :class:`UserError` naming the cause."""
    from harness.netshape import NetworkError, NetworkLink

    net = NetworkLink(profile)
    try:
        net.start()  # cleans up after itself when it fails
    except NetworkError as exc:
        raise UserError(f"setting up the {profile} link: {exc}") from None
    try:
        link = Link(
            profile,
            prefix=tuple(net.prefix),
            address=net.ns_addr,
            iface=net.host_iface if net.netns is not None else "lo",
        )
        if net.netns is not None:
            console.print(f"link {profile}: measuring rate and RTT…")
            net.measure()
        link.measured = net.info()
        yield link
    finally:
        net.stop()
