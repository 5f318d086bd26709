"""Scenario files: what a run measures, read from TOML and checked before anything starts.

A run can take an hour; a typo found after the first sample wastes it. So every key is checked
up front and every problem is reported as ``FILE: KEY: PROBLEM`` (a :class:`ScenarioError`,
which the CLI prints as one line).

Schema (all keys but ``workloads`` optional; the values shown for the top-level keys are
their defaults, except ``[network] profile``, whose default is ``"loopback"``: no shaping,
pulls as fast as the disk, the limit model not meaningful; ``"wan"`` or another shaped
profile gives numbers over a network and a limit to compare them with)::

    name = "default"                 # run-id prefix; default: the file's stem
    samples = 3                      # measurements per (workload, mode)
    percentile = 95                  # the statistic tables and charts show, besides the median
    modes = ["legacy", "estargz-noopt", "estargz", "zstd-chunked", "zstd-chunked-lazy"]
    runtime = "podman"               # or "crio" (needs crictl + a running CRI-O)
    node = "host"                    # the podman generation: "host" (this machine's), or a
                                     # runtime node: "trixie" (podman 5.4), "sid" (podman 5.8)
                                     # (harness.runtimes; built on first use). A list, e.g.
                                     # ["host", "trixie", "sid"], runs the scenario once per
                                     # node, each into its own run directory <id>-<node>.
    seed = 0                         # shuffle seed: the same seed gives the same order

    [network]
    profile = "wan"                  # a profile name from harness.netshape; default
                                     # "loopback" (unshaped; no limit model)

    [[stores]]                       # the Additional Layer Stores under test (lazy modes);
    name = "ours"                    # every lazy (workload × mode) is measured once per store,
                                     # and reports give each store's ratio to the first one
    command = ["stargz-store", "--config", "{config}", "--root", "{root}", "{mountpoint}"]
    mount_timeout = 30               # seconds to wait for the mount to appear
    background_fetch = false         # let the store fetch whole layers in the background
                                     # (off: a measurement shows what the workload needs)
    # Placeholders: {config} (resolver/prefetch config the harness writes), {root} (an empty
    # cache directory per measurement), {mountpoint}, {go-stargz-store} (the reference Go
    # store, built from Debian's Go packages on first use). The estargz mode's access trace is
    # always taken with our own stargz-store, whatever store is under test.
    # The older single-store form, a [store] table with the same keys but `name` (the store is
    # then named "default"), still works; a scenario has one form or the other. Without
    # either: our stargz-store, named "default".

    [[workloads]]
    name = "python"                  # unique; default: the recipe name
    recipe = "python"                # image recipe from harness.images.RECIPES, or "tiny"
    command = ["python3", "-c", "print('hello')"]   # optional; default: the recipe's
                                     # (for an image: its CMD, see below)
    stdin = "…"                      # optional script fed on stdin; default: the recipe's
    ready = "hello"                  # optional line (substring) on stdout that means "ready"
    timeout = 300                    # optional seconds for each step; default: the recipe's
    modes = ["legacy", "estargz"]    # optional: measure this workload in these modes only
    reference = "python:3.7"         # optional: the published image this stands in for
                                     # (harness/data/published.csv); default: matched by
                                     # the workload or recipe name against its stand_in column
    expect = "hello"                 # optional substring stdout must contain
    env = { GREETING = "hi" }        # optional environment for the container

    [[workloads]]                    # your own image instead of a recipe: exactly one of
    name = "app"                     # recipe, image, containerfile (name required here)
    image = "docker-archive:app.tar" # any containers-image reference: docker://, oci:,
                                     # oci-archive:, docker-archive:, containers-storage:, dir:
                                     # (relative paths: from the scenario file's directory)
    # containerfile = "app/Containerfile"   # or built with podman; context = "app" (default:
                                            # the Containerfile's directory)
    platform = "linux/amd64"         # optional, for image indexes; default: the host's
    command = ["/app/server"]        # optional: the image's CMD, as in `podman run IMAGE
                                     # COMMAND`: the arguments after any ENTRYPOINT the
                                     # image has; default: the image's own CMD
    entrypoint = ["/bin/sh", "-c"]   # optional: replaces the image's ENTRYPOINT (podman's
                                     # --entrypoint; podman then drops the image's CMD too,
                                     # only `command` follows it); "" clears it, `command`
                                     # (required then) is the whole command line; default:
                                     # the image's own ENTRYPOINT
    ready = "listening"              # optional; absent: wait for exit (or for `expect`)
    timeout = 300                    # optional; default 300 s for images
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cli import UserError
from harness.runtimes import NODE_NAMES

# The measured modes, the one list (DESIGN.md §5): a full pull of gzip layers; eStargz through
# the layer store, without and with prioritized files; podman's own zstd:chunked partial pull;
# and the same zstd:chunked image pulled lazily through the layer store.
MODES = ("legacy", "estargz-noopt", "estargz", "zstd-chunked", "zstd-chunked-lazy")
# Modes pulled through the layer store, and those of them measured on demand (prefetch off).
LAZY_MODES = frozenset({"estargz-noopt", "estargz", "zstd-chunked-lazy"})
ON_DEMAND_MODES = frozenset({"estargz-noopt", "zstd-chunked-lazy"})
# The image (harness.images push mode) a measured mode pulls, where the two differ.
_IMAGE_OF_MODE = {"zstd-chunked-lazy": "zstd-chunked"}


def image_mode(mode: str) -> str:
    """The push mode (image format, :data:`harness.images.MODES`) the measured ``mode`` pulls."""
    return _IMAGE_OF_MODE.get(mode, mode)


RUNTIMES = ("podman", "crio")
# The most samples a scenario (or `lazybench run --samples`) may ask for: a run directory's
# scenario copy is read back with this bound (resume, report, compare).
MAX_SAMPLES = 1000
WORKLOAD_KEYS = {
    "name",
    "recipe",
    "image",
    "containerfile",
    "context",
    "platform",
    "command",
    "entrypoint",
    "stdin",
    "ready",
    "expect",
    "env",
    "timeout",
    "reference",
    "modes",
}
IMAGE_SOURCE_KEYS = ("recipe", "image", "containerfile")
DEFAULT_STORE_COMMAND = (
    "stargz-store",
    "--config",
    "{config}",
    "--root",
    "{root}",
    "{mountpoint}",
)
# Placeholders standing for a store binary the harness builds itself (resolved, and built
# into the cache when missing, by harness.store_proc.resolve_store_command).
BUILTIN_STORE_PLACEHOLDERS = frozenset({"go-stargz-store"})
STORE_PLACEHOLDERS = frozenset({"config", "root", "mountpoint"}) | BUILTIN_STORE_PLACEHOLDERS


class ScenarioError(UserError):
    """A scenario file is malformed; the message names the file, the key and the problem."""


@dataclass(frozen=True)
class Workload:
    """One image and what to run in it. ``None`` fields fall back to the recipe's values (or,
    for ``image``/``containerfile`` workloads, to the image's own command).

    Exactly one of ``recipe``, ``image`` (a containers-image reference, paths absolute) and
    ``containerfile`` (absolute; ``context`` too) names the image.
    """

    name: str
    recipe: str | None = None
    command: tuple[str, ...] | None = None
    stdin: str | None = None
    ready: str | None = None
    timeout: float | None = None
    # None: the image's own ENTRYPOINT; (): cleared (``entrypoint = ""``)
    entrypoint: tuple[str, ...] | None = None
    reference: str | None = None
    modes: tuple[str, ...] | None = None  # a subset of the scenario's modes; None = all
    image: str | None = None
    containerfile: str | None = None
    context: str | None = None
    platform: str | None = None
    expect: str | None = None
    env: tuple[tuple[str, str], ...] | None = None


DEFAULT_STORE_NAME = "default"


@dataclass(frozen=True)
class StoreSpec:
    """How to start a layer store under test; ``{placeholders}`` are filled per measurement.
    ``name`` labels its records (``Record.store``) and its columns in reports."""

    name: str = DEFAULT_STORE_NAME
    command: tuple[str, ...] = DEFAULT_STORE_COMMAND
    mount_timeout: float = 30.0
    background_fetch: bool = False


@dataclass(frozen=True)
class Scenario:
    name: str
    workloads: tuple[Workload, ...]
    modes: tuple[str, ...] = MODES
    samples: int = 3
    percentile: float = 95.0
    network_profile: str = "loopback"
    runtime: str = "podman"
    seed: int = 0
    stores: tuple[StoreSpec, ...] = (StoreSpec(),)
    nodes: tuple[str, ...] = ("host",)
    source: Path | None = None

    @property
    def node(self) -> str:
        """The one runtime node of a scenario that runs on one (see :meth:`for_node`)."""
        if len(self.nodes) != 1:
            raise ValueError(f"scenario {self.name} runs on {len(self.nodes)} nodes")
        return self.nodes[0]

    def for_node(self, node: str) -> Scenario:
        """This scenario on ``node`` alone (what one run directory measures)."""
        from dataclasses import replace

        return replace(self, nodes=(node,))

    @property
    def store(self) -> StoreSpec:
        """The first store (the one the others are compared with)."""
        return self.stores[0]

    def stores_of(self, mode: str) -> tuple[str, ...]:
        """Store names a mode is measured through: every store in lazy modes, else ``""``."""
        return tuple(s.name for s in self.stores) if mode in LAZY_MODES else ("",)

    def store_named(self, name: str) -> StoreSpec:
        for s in self.stores:
            if s.name == name:
                return s
        raise KeyError(name)

    def keys(self) -> list[tuple[int, str, str, str]]:
        """Every (sample, workload, mode, store) a complete run records, in a fixed order."""
        return [
            (s, w.name, m, st)
            for s in range(self.samples)
            for w in self.workloads
            for m in self.modes_of(w)
            for st in self.stores_of(m)
        ]

    def modes_of(self, w: Workload) -> tuple[str, ...]:
        """The modes a workload is measured in (the scenario's, in the scenario's order)."""
        return tuple(m for m in self.modes if w.modes is None or m in w.modes)

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A plain, TOML/JSON-able form (stored with the run so it can be resumed as it was)."""
        return {
            "name": self.name,
            "samples": self.samples,
            "percentile": self.percentile,
            "modes": list(self.modes),
            "runtime": self.runtime,
            "node": self.nodes[0] if len(self.nodes) == 1 else list(self.nodes),
            "seed": self.seed,
            "network": {"profile": self.network_profile},
            "stores": [
                {
                    "name": s.name,
                    "command": list(s.command),
                    "mount_timeout": s.mount_timeout,
                    "background_fetch": s.background_fetch,
                }
                for s in self.stores
            ],
            "workloads": [
                {
                    k: (
                        dict(v)
                        if k == "env"
                        else ""
                        if k == "entrypoint" and not v
                        else list(v)
                        if isinstance(v, tuple)
                        else v
                    )
                    for k, v in vars(w).items()
                    if v is not None
                }
                for w in self.workloads
            ],
        }


class _Checker:
    """Collects the file name so every error message can start with it."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {key}: {problem}")

    def table(self, data: Any, key: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(key, f"must be a table, got {_show(data)}")
        return data

    def unknown(self, data: dict[str, Any], allowed: set[str], prefix: str) -> None:
        for k in data:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else k
                raise self.fail(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def string(self, data: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
        """``data[key]``, a non-empty string, or ``default`` when the key is absent (a key
        given as JSON ``null``, in a run's scenario.json, is no string either)."""
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {_show(value)}")
        return value

    def number(
        self, data: dict[str, Any], key: str, where: str, default: Any, *, lo: float, hi: float
    ) -> Any:
        value = data.get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"must be a number, got {_show(value)}")
        if not lo <= value <= hi:
            raise self.fail(where, f"must be between {lo:g} and {hi:g}, got {value!r}")
        return value

    def integer(
        self, data: dict[str, Any], key: str, where: str, default: int, *, lo: int, hi: int
    ) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"must be an integer, got {_show(value)}")
        if not lo <= value <= hi:
            raise self.fail(where, f"must be between {lo} and {hi}, got {value}")
        return value

    def strings(self, data: dict[str, Any], key: str, where: str) -> tuple[str, ...] | None:
        value = data.get(key)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise self.fail(where, f"must be a non-empty list of strings, got {_show(value)}")
        self.arguments(value, where)
        return tuple(value)

    def short(self, value: str, where: str, most: int, names: str) -> None:
        """A name that becomes part of file names (``names``: which) must leave room in the
        255 bytes of one: longer, the run failed with a traceback (File name too long) once
        it made the first of them."""
        size = len(value.encode())
        if size > most:
            raise self.fail(
                where, f"is {size} bytes long, at most {most} fit: it names {names}; shorten it"
            )

    def arguments(self, values: Any, where: str) -> None:
        """Strings that become a program's arguments, environment or paths (a command, an
        image reference) cannot hold a NUL character: found now, not as a ``ValueError``
        traceback when the first process is started with one."""
        for value in values:
            if isinstance(value, str) and "\0" in value:
                raise self.fail(
                    where,
                    f"{_show(value)} holds a NUL character (\\u0000), which no command line, "
                    "environment or path can carry: remove it",
                )


def not_utf8(exc: UnicodeDecodeError) -> str:
    """What to say of a TOML file that is not UTF-8 (as TOML requires), where it is not."""
    return (
        f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): a TOML "
        "file is UTF-8; save it so"
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known_recipes() -> set[str] | None:
    """Recipe names from harness.images, or None when that package is not importable."""
    try:
        from harness.images import RECIPES
    except ImportError:
        return None
    return set(RECIPES) | {"tiny"}


def _known_published() -> set[str] | None:
    """What a workload's ``reference`` may name: each published image
    (``harness/data/published.csv``) and its repository without the tag."""
    try:
        from harness.report import read_published
    except ImportError:
        return None
    images = [pub.image for pub in read_published()]
    return set(images) | {image.split(":")[0] for image in images}


def _known_profiles() -> set[str] | None:
    try:
        from harness.netshape.profiles import PROFILES
    except ImportError:
        return None
    return set(PROFILES)


# The keys of a scenario's top-level table.
SCENARIO_KEYS = frozenset(
    {
        "name",
        "samples",
        "percentile",
        "modes",
        "runtime",
        "node",
        "seed",
        "network",
        "store",
        "stores",
        "workloads",
    }
)


def parse_scenario(
    data: dict[str, Any],
    source: str = "<scenario>",
    *,
    recipes: set[str] | None = None,
    profiles: set[str] | None = None,
    published: set[str] | None = None,
) -> Scenario:
    """Check a decoded scenario and build a :class:`Scenario`; raise :class:`ScenarioError`.

    ``recipes``/``profiles``/``published`` are the names a workload's recipe, the network
    profile and a workload's ``reference`` may take; ``None`` skips that check.
    """
    c = _Checker(source)
    if not isinstance(data, dict):  # a JSON copy (scenario.json) can hold any value
        raise ScenarioError(f"{source}: must be a table of the scenario's keys, got {_show(data)}")
    c.unknown(data, SCENARIO_KEYS, "")
    name = c.string(data, "name", "name", default=Path(source).stem or "scenario")
    if not all(ch.isalnum() or ch in "-_." for ch in name):
        unset = "" if "name" in data else " (the file's name, as no name is given: set one)"
        raise c.fail(
            "name", f"may only hold letters, digits, '-', '_' and '.', got {name!r}{unset}"
        )
    c.short(name, "name", 100, "the run directory (<time>-<name>; without a name, the file's)")
    samples = c.integer(data, "samples", "samples", 3, lo=1, hi=MAX_SAMPLES)
    percentile = float(c.number(data, "percentile", "percentile", 95.0, lo=1, hi=100))
    seed = c.integer(data, "seed", "seed", 0, lo=0, hi=2**32 - 1)

    modes = c.strings(data, "modes", "modes") or MODES
    for i, mode in enumerate(modes):
        if mode not in MODES:
            raise c.fail(f"modes[{i}]", f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    if len(set(modes)) != len(modes):
        raise c.fail("modes", "lists a mode twice")

    runtime = c.string(data, "runtime", "runtime", default="podman")
    if runtime not in RUNTIMES:
        raise c.fail("runtime", f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")

    raw_node = data.get("node", "host")
    node_list = [raw_node] if isinstance(raw_node, str) else raw_node
    if not isinstance(node_list, list) or not node_list:
        raise c.fail("node", f"must be a node name or a list of them, got {_show(raw_node)}")
    for i, n in enumerate(node_list):
        where = "node" if isinstance(raw_node, str) else f"node[{i}]"
        if n not in NODE_NAMES:
            raise c.fail(where, f"unknown node {_show(n)} (known: {', '.join(NODE_NAMES)})")
    if len(set(node_list)) != len(node_list):
        raise c.fail("node", "lists a node twice")
    if runtime != "podman" and node_list != ["host"]:
        raise c.fail("node", f"runtime nodes run podman; runtime {runtime!r} runs on the host")

    network = c.table(data.get("network", {}), "network")
    c.unknown(network, {"profile"}, "network")
    profile = c.string(network, "profile", "network.profile", default="loopback")
    if profiles is not None and profile not in profiles:
        raise c.fail(
            "network.profile", f"unknown profile {profile!r} (known: {', '.join(sorted(profiles))})"
        )

    if "store" in data and "stores" in data:
        raise c.fail("store", "give either a [store] table or [[stores]] tables, not both")
    if "stores" in data:
        raw_stores = data["stores"]
        if not isinstance(raw_stores, list) or not raw_stores:
            raise c.fail("stores", "must be a non-empty array of tables ([[stores]])")
        stores = tuple(
            _parse_store(c, c.table(raw, f"stores[{i}]"), f"stores[{i}]", named=True)
            for i, raw in enumerate(raw_stores)
        )
        names = [st.name for st in stores]
        for i, store_name in enumerate(names):
            if store_name in names[:i]:
                raise c.fail(f"stores[{i}].name", f"duplicate store name {store_name!r}")
    else:
        stores = (_parse_store(c, c.table(data.get("store", {}), "store"), "store", named=False),)

    if runtime == "crio" and len(stores) > 1:
        raise c.fail(
            "stores",
            "runtime 'crio' measures the host's CRI-O with the one layer store its operator "
            "configured: name at most one store",
        )

    # Relative image paths are the scenario file's: resolve them against its directory.
    base = Path(source).parent if Path(source).is_file() else Path.cwd()
    raw_workloads = data.get("workloads")
    if raw_workloads is None:
        raise c.fail("workloads", "missing: add at least one [[workloads]] table")
    if not isinstance(raw_workloads, list) or not raw_workloads:
        raise c.fail("workloads", "must be a non-empty array of tables ([[workloads]])")
    workloads: list[Workload] = []
    for i, raw in enumerate(raw_workloads):
        where = f"workloads[{i}]"
        w = c.table(raw, where)
        c.unknown(w, WORKLOAD_KEYS, where)
        given = [k for k in IMAGE_SOURCE_KEYS if k in w]
        if not given:
            raise c.fail(
                f"{where}.recipe", "missing: name an image recipe (or an image, a containerfile)"
            )
        if len(given) > 1:
            raise c.fail(where, f"name the image once: recipe, image or containerfile, not {given}")
        recipe = c.string(w, "recipe", f"{where}.recipe")
        if recipe is not None and recipes is not None and recipe not in recipes:
            known = ", ".join(sorted(recipes))
            raise c.fail(f"{where}.recipe", f"unknown recipe {recipe!r} (known: {known})")
        image, containerfile, context, platform = _image_source(c, w, where, base)
        if recipe is None and "name" not in w:
            raise c.fail(
                f"{where}.name", "missing: a workload with image or containerfile needs one"
            )
        wname = c.string(w, "name", f"{where}.name", default=recipe)
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", wname):
            raise c.fail(
                f"{where}.name",
                f"must be lower-case letters, digits, '.', '_', '-' (it names the image "
                f"repository), got {wname!r}",
            )
        if (problem := repository_name_problem(wname)) is not None:
            raise c.fail(f"{where}.name", problem)
        c.short(wname, f"{where}.name", 100, "each measurement's working directory and logs")
        if any(x.name == wname for x in workloads):
            raise c.fail(f"{where}.name", f"duplicate workload name {wname!r}")
        stdin = w.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise c.fail(f"{where}.stdin", f"must be a string, got {_show(stdin)}")
        timeout = c.number(w, "timeout", f"{where}.timeout", None, lo=0.1, hi=86400)
        wmodes = c.strings(w, "modes", f"{where}.modes")
        for j, mode in enumerate(wmodes or ()):
            if mode not in modes:
                raise c.fail(
                    f"{where}.modes[{j}]",
                    f"{mode!r} is not one of the scenario's modes ({', '.join(modes)})",
                )
        if wmodes is not None and len(set(wmodes)) != len(wmodes):
            raise c.fail(f"{where}.modes", "lists a mode twice")
        command = c.strings(w, "command", f"{where}.command")
        entrypoint = _entrypoint(c, w, f"{where}.entrypoint")
        if entrypoint == () and command is None:
            raise c.fail(
                f"{where}.entrypoint",
                '"" clears the image\'s ENTRYPOINT, and podman then ignores its CMD too: give '
                "the workload a command = [...] to run",
            )
        workloads.append(
            Workload(
                name=wname,
                recipe=recipe,
                command=command,
                entrypoint=entrypoint,
                stdin=stdin,
                ready=_output_text(c, w, "ready", where),
                timeout=float(timeout) if timeout is not None else None,
                reference=_reference(c, w, where, published),
                modes=wmodes,
                image=image,
                containerfile=containerfile,
                context=context,
                platform=platform,
                expect=_output_text(c, w, "expect", where),
                env=_env(c, w, f"{where}.env"),
            )
        )
    return Scenario(
        name=name,
        workloads=tuple(workloads),
        modes=tuple(modes),
        samples=samples,
        percentile=percentile,
        network_profile=profile,
        runtime=runtime,
        seed=seed,
        stores=stores,
        nodes=tuple(node_list),
    )


# The registry the harness pushes to (``127.0.0.1:PORT``), at its longest: a name counts
# against the 255 characters of ``registry/repository``.
_PUSH_REGISTRY = "127.0.0.1:65535"


def repository_name_problem(workload: str) -> str | None:
    """Why ``lazybench/<workload>``, the repository a workload's images are pushed to, is no
    valid repository name (the distribution grammar of :mod:`store.registry.reference`:
    components are lower-case alphanumerics joined by single '.', '_', '__' or runs of '-';
    so no leading/trailing or doubled separator), or None. Caught here, not at push time."""
    from store.registry.errors import ReferenceError
    from store.registry.reference import Reference

    try:
        Reference.parse(f"{_PUSH_REGISTRY}/lazybench/{workload}:legacy")
    except ReferenceError as exc:
        detail = str(exc).rpartition(": ")[2]
        return (
            f"{workload!r} cannot name the image repository lazybench/{workload} ({detail}): "
            "use lower-case letters and digits joined by one '.', one or two '_', or dashes"
        )
    return None


def _parse_store(c: _Checker, data: dict[str, Any], where: str, *, named: bool) -> StoreSpec:
    """One ``[[stores]]`` table (``named``: ``name`` required) or the old ``[store]`` table."""
    keys = {"command", "mount_timeout", "background_fetch"} | ({"name"} if named else set())
    c.unknown(data, keys, where)
    name = DEFAULT_STORE_NAME
    if named:
        name = c.string(data, "name", f"{where}.name")
        if name is None:
            raise c.fail(f"{where}.name", "missing: name the store (it labels its records)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise c.fail(
                f"{where}.name", f"may only hold letters, digits, '.', '_', '-', got {name!r}"
            )
        c.short(name, f"{where}.name", 50, "each measurement's working directory and logs")
    command = c.strings(data, "command", f"{where}.command") or DEFAULT_STORE_COMMAND
    for arg in command:
        try:
            placeholders = _placeholders(arg)
        except ValueError as exc:  # str.format's own complaint: unbalanced braces, "{x!z}"
            raise c.fail(
                f"{where}.command",
                f"{arg!r}: unbalanced or malformed braces ({exc}); write a literal brace as "
                "{{ or }}",
            ) from None
        for placeholder in placeholders:
            if placeholder not in STORE_PLACEHOLDERS:
                raise c.fail(
                    f"{where}.command",
                    f"unknown placeholder {{{placeholder}}} "
                    f"(known: {', '.join('{' + p + '}' for p in sorted(STORE_PLACEHOLDERS))})",
                )
    if not any("{mountpoint}" in arg for arg in command):
        raise c.fail(f"{where}.command", "must contain {mountpoint}")
    background_fetch = data.get("background_fetch", False)
    if not isinstance(background_fetch, bool):
        raise c.fail(
            f"{where}.background_fetch", f"must be true or false, got {_show(background_fetch)}"
        )
    return StoreSpec(
        name=name,
        command=command,
        background_fetch=background_fetch,
        mount_timeout=float(
            c.number(data, "mount_timeout", f"{where}.mount_timeout", 30.0, lo=0.1, hi=3600)
        ),
    )


def _image_source(
    c: _Checker, w: dict[str, Any], where: str, base: Path
) -> tuple[str | None, str | None, str | None, str | None]:
    """(image, containerfile, context, platform) of a workload, paths made absolute."""
    from harness.images.transports import TransportError, absolute

    for key in ("image", "containerfile", "context", "platform"):
        c.arguments([w.get(key)], f"{where}.{key}")
    image = c.string(w, "image", f"{where}.image")
    if image is not None:
        try:
            image = absolute(image, base)
        except TransportError as exc:
            raise c.fail(f"{where}.image", str(exc)) from None
    containerfile = c.string(w, "containerfile", f"{where}.containerfile")
    if containerfile is not None:
        containerfile = str((base / containerfile).resolve())
    context = c.string(w, "context", f"{where}.context")
    if context is not None:
        if containerfile is None:
            raise c.fail(f"{where}.context", "only goes with containerfile")
        context = str((base / context).resolve())
    platform = c.string(w, "platform", f"{where}.platform")
    if platform is not None:
        if image is None and containerfile is None:
            raise c.fail(f"{where}.platform", "only goes with image or containerfile")
        parts = platform.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise c.fail(f"{where}.platform", f"must be OS/ARCH[/VARIANT], got {platform!r}")
    return image, containerfile, context, platform


def _entrypoint(c: _Checker, w: dict[str, Any], where: str) -> tuple[str, ...] | None:
    """``entrypoint``: a non-empty list of strings (podman's ``--entrypoint`` as JSON), or
    ``""`` to clear the image's ENTRYPOINT (``--entrypoint ""``); None when absent."""
    value = w.get("entrypoint")
    if value is None:
        return None
    if value == "":
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise c.fail(
            where,
            'must be a non-empty list of strings, or "" to clear the image\'s ENTRYPOINT, '
            f"got {_show(value)}",
        )
    if not value[0]:
        raise c.fail(
            where, f"its first element (the program) must not be empty, got {_show(value)}"
        )
    c.arguments(value, where)
    return tuple(value)


def _output_text(c: _Checker, w: dict[str, Any], key: str, where: str) -> str | None:
    """``ready`` or ``expect``: text of the workload's stdout, which is read as lines with
    universal newlines (``\\r\\n`` and ``\\r`` become ``\\n``), so a carriage return in it
    would never match and every run of the workload would fail or time out."""
    text = c.string(w, key, f"{where}.{key}")
    if text is not None and "\r" in text:
        raise c.fail(
            f"{where}.{key}",
            f"{_show(text)} holds a carriage return (\\r), which the output never does: it is "
            "read as lines, \\r\\n and \\r ending one as \\n does; write \\n instead",
        )
    return text


def _env(c: _Checker, w: dict[str, Any], where: str) -> tuple[tuple[str, str], ...] | None:
    env = w.get("env")
    if env is None:
        return None
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
    ):
        raise c.fail(where, f'must be a table of NAME = "value" strings, got {_show(env)}')
    for name, value in env.items():
        c.arguments([name, value], where)
    return tuple(env.items())


def _reference(
    c: _Checker, w: dict[str, Any], where: str, published: set[str] | None
) -> str | None:
    """A workload's ``reference``: a published image (or its repository), when the list of
    them is known — a typo would otherwise compare the workload with nothing, silently."""
    reference = c.string(w, "reference", f"{where}.reference")
    if reference is not None and published is not None and reference not in published:
        raise c.fail(
            f"{where}.reference",
            f"{reference!r} is not a published image (known: {', '.join(sorted(published))}; "
            "harness/data/published.csv); leave it out for a workload that stands in for none",
        )
    return reference


def _placeholders(arg: str) -> list[str]:
    """The ``{names}`` in ``arg``; ValueError for what ``arg.format(...)`` would refuse when
    the store starts (unbalanced braces), or fill otherwise than by plain substitution (a
    conversion or format spec: ``{root!z}``, ``{root:x}``)."""
    import string

    names = []
    for _, field, spec, conversion in string.Formatter().parse(arg):
        if field is None:
            continue
        if spec or conversion:
            text = (
                "{"
                + field
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise ValueError(f"{text}: a placeholder takes no conversion or format spec")
        names.append(field)
    return names


def load_scenario(path: Path | str, *, check_references: bool = True) -> Scenario:
    """Read and check a scenario file. Recipe and profile names are checked against
    harness.images / harness.netshape when those are importable and ``check_references``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: {not_utf8(exc)}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    scenario = parse_scenario(
        data,
        str(path),
        recipes=_known_recipes() if check_references else None,
        profiles=_known_profiles() if check_references else None,
        published=_known_published() if check_references else None,
    )
    _check_local_sources(scenario, str(path))
    _check_store_commands(scenario, str(path), table="stores" if "stores" in data else "store")
    return Scenario(**{**vars(scenario), "source": path.resolve()})


def _check_store_commands(scenario: Scenario, source: str, table: str) -> None:
    """A store's program must exist now, when a measurement goes through the store: found
    when the store starts, a typo would cost the import and push of every image first.
    ``table``: ``stores`` (``[[stores]]``) or ``store`` (the old ``[store]`` form, or none).
    (Only for a scenario file, like :func:`_check_local_sources`.)"""
    from harness.store_proc import store_command_problem

    used = {
        st for w in scenario.workloads for m in scenario.modes_of(w) for st in scenario.stores_of(m)
    }
    c = _Checker(source)
    for i, spec in enumerate(scenario.stores):
        if spec.name in used and (problem := store_command_problem(spec.command)) is not None:
            raise c.fail(f"stores[{i}].command" if table == "stores" else "store.command", problem)


def _check_local_sources(scenario: Scenario, source: str) -> None:
    """A workload's image file, layout or Containerfile must exist now: found when the image is
    imported, a typo would cost the build and push of every workload before it. (Only for a
    scenario file: a run's stored copy is re-read when its sources may have moved on.)"""
    from harness.images.transports import local_path

    c = _Checker(source)
    for i, w in enumerate(scenario.workloads):
        where = f"workloads[{i}]"
        path = local_path(w.image) if w.image is not None else None
        if path is not None and not path.exists():
            raise c.fail(f"{where}.image", f"{path} does not exist (paths are the scenario file's)")
        if w.containerfile is not None and not Path(w.containerfile).is_file():
            raise c.fail(f"{where}.containerfile", f"{w.containerfile} is not a file")
        if w.context is not None and not Path(w.context).is_dir():
            raise c.fail(f"{where}.context", f"{w.context} is not a directory")
