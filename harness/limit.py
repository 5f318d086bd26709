"""The limit model: how fast a lazy start could be on the measured link, and how far each mode is.

For each workload the lower bound of a lazy start (pull + create + run to the ready line) is::

    limit = compressed bytes read / measured bandwidth
          + round trips × measured RTT
          + runtime floor

where, when the run's ``legacy`` records carry a re-pull (``repull_s``, podman runs since it
was recorded), the runtime floor is ``re-pull + create + run`` and the round trips are the
store's :data:`STORE_ROUND_TRIPS`; otherwise (older runs, CRI-O) it is ``create + run`` and
all :data:`UNAVOIDABLE_ROUND_TRIPS`.

* **compressed bytes read** — what the workload's reads cost on the wire: the access trace
  (:mod:`harness.trace`) mapped onto the TOCs of the workload's most finely chunked image in the
  image cache: its chunk-level ``estargz`` image (files read in part cut into 64 KiB chunks,
  :func:`chunk_level_layout`) when built, else its ``estargz-noopt`` image (4 MiB chunks, a looser
  bound). For each traced file, the compressed bytes of the chunks that cover the byte ranges it
  read (the whole file when the trace has no ranges: traces from before the store recorded them); a
  chunk member counted once however many reads touch it. Layers stack: a path's bytes come from the
  topmost layer holding it. TOCs are read with the project's one TOC parser
  (:class:`store.estargz.EstargzReader` → :class:`~store.estargz.LayerIndex`). The TOC bytes
  themselves are not counted (a format's cost, not the workload's); they are recorded beside
  (``toc_bytes``).
* **round trips** — :data:`STORE_ROUND_TRIPS` (the store's) with a re-pull in the floor, else
  :data:`UNAVOIDABLE_ROUND_TRIPS` (podman's and the store's), × the measured RTT.
* **runtime floor** — the runtime's own floor, measured with the image already local: the
  median over the run's ``legacy`` samples of ``repull_s + create_s + run_s``. ``repull_s``
  is a second ``podman pull`` of the same image after the sample's run, every layer now local
  (:mod:`harness.measure`): podman's own pull work — its round trips 1–4 of
  :data:`UNAVOIDABLE_ROUND_TRIPS` and the processing around them (~0.37 s before a lazy pull
  first asks the store, of which only 4 RTT are network), which ``create + run`` alone
  misses. It stays a bound: the re-pull makes a subset of a lazy pull's requests (ping,
  manifest, config at most; no layer is asked for), on a warm podman, so a lazy pull does all
  of its work and more; only the store's round trips are added to it. Records without
  ``repull_s`` (before it was recorded; CRI-O) keep the model they were reported with:
  ``create + run`` (what podman and the workload take with no network at all) and all
  :data:`UNAVOIDABLE_ROUND_TRIPS`.
* **bandwidth and RTT** — the link as measured at the start of the run (``environment.json``:
  ``link.measured.rate_mbit`` and ``rtt_ms``). On the ``loopback`` profile (or any link
  without a measurement) the model is not meaningful and the report says so.

Beside it, the floor of one lazy ``podman pull`` (:class:`PullFloor`, in the report's pull
phase table): the runtime's own share of that pull, as its timeline measured it, plus
:data:`PULL_ROUND_TRIPS` round trips and the TOC bytes the store fetched at the measured
bandwidth: how far the store's part of the pull is from what the link allows.

The byte counts are computed when a run prepares its images (it knows the images and traces)
and written to ``limits.json`` in the run directory; ``lazybench report RUN_DIR`` fills it in
from the cache for runs that predate it (:func:`compute_run_limits`), and ``lazybench report
--limits`` recomputes it. ``limits.json``::

    {"schema": 1, "workloads": {"gcc": {"compressed_bytes": 5300000, "read_bytes": 9100000,
     "files": 58, "files_found": 58, "files_with_ranges": 58, "toc_bytes": 1040000,
     "image": "sha256:<manifest digest of the layout mapped onto>", "layout": "estargz",
     "trace": "gcc-….json"},
     "tomcat": {"unavailable": "no access trace cached for this workload"}}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from harness.cli import UserError
from harness.podman import write_atomic

LIMITS = "limits.json"
SCHEMA = 1
NOOPT = "estargz-noopt"

UNAVOIDABLE_ROUND_TRIPS = 7
"""Round trips on the link that no lazy pull through podman's Additional Layer Store can
avoid, each waiting for the one before it (plain HTTP registry, no auth, as benchmarked):

podman (containers/image ``docker`` transport, ``copy.Image``):

1. TCP handshake of its connection to the registry;
2. ``GET /v2/`` — containers/image pings a registry before its first request on it
   (``docker_client.go``: ``detectProperties``);
3. ``GET`` the manifest — the tag resolved, the layers named;
4. ``GET`` the config blob — read before any layer is looked up (the platform check in
   ``copy/single.go``), so the store is asked only after it.

the store (another process, told only the reference and a layer digest by the ALS path):

5. TCP handshake of its own connection (it cannot use podman's);
6. ``GET`` the manifest (each layer's TOC digest, needed to verify the TOC) with, in parallel,
   a suffix-range ``GET`` of every layer's tail: footer and TOC in one response when the TOC
   fits the guess, all layers at once;
7. the first data request, with everything the workload reads in it (best case: known in
   advance, as the ``estargz`` mode's prioritized files are); the config ``GET`` (diff IDs
   for the layers' ``info``) fits in the same round trip.

Everything else is bandwidth: the data's own transfer is the model's first term. Not counted,
so the bound stays a bound: podman trying ``https`` first on an insecure registry, a TLS
handshake (a TLS registry adds one round trip per connection), a TOC larger than the tail
guess, reads that depend on earlier reads.

The model counts all seven only when the runtime floor is ``create + run``. When it includes
podman's re-pull of the local image, 1–4 (those of them a re-pull makes) are inside the
measured floor, and only :data:`STORE_ROUND_TRIPS` are added.
"""

STORE_ROUND_TRIPS = 3
"""The store's round trips, 5–7 of :data:`UNAVOIDABLE_ROUND_TRIPS`: what the model adds to a
runtime floor that includes podman's re-pull (podman's own 1–4 are measured inside it)."""

PULL_ROUND_TRIPS = 3
"""The store's round trips before the last TOC byte of a lazy pull can arrive, each waiting for
the one before it: the TCP handshake of its connection, ``GET`` the manifest (the other
layers' digests and TOC digests), then one ranged ``GET`` per layer, all at once, each answered
with the layer's TOC (zstd:chunked: its position is in the manifest; eStargz: footer and TOC
in one suffix range, the TOC's size guessed right). Not counted, so it stays a floor: an
eStargz footer read on its own first (this store and the Go store do; one more), TCP slow start
on the new connections, the first looked-up layer's tail sent beside the manifest (which
saves that layer a round trip but not the others)."""

FLOOR_PARTS = {True: "re-pull + create + run", False: "create + run"}
"""What the runtime floor sums, with and without the re-pull (``Limit.floor_repull``)."""

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


# -- bytes read --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadBytes:
    """What a workload's reads cost, mapped onto one image (:func:`bytes_read`).

    ``compressed_bytes``: bytes of the chunk members covering the ranges read (each member
    once); ``read_bytes``: uncompressed bytes of those ranges; ``files``: traced files,
    ``files_found`` those found as regular files in the image, ``files_with_ranges`` those
    whose trace gave ranges (the others counted whole); ``toc_bytes``: the image's TOCs and
    footers (not part of ``compressed_bytes``)."""

    compressed_bytes: int
    read_bytes: int
    files: int
    files_found: int
    files_with_ranges: int
    toc_bytes: int = 0


def bytes_read(
    layers: Sequence[Any],
    traced: Iterable[Any],
    *,
    toc_bytes: int = 0,
) -> ReadBytes:
    """Map a trace onto an image's layer indexes.

    ``layers``: :class:`store.estargz.LayerIndex` per layer, bottom first; ``traced``:
    :class:`harness.trace.TracedFile` (``path``, ``ranges`` as ``[start, end)`` file offsets
    or None for the whole file). A path is looked up from the top layer down; the first layer
    holding it decides (a regular file there counts, anything else — a directory, a symlink —
    counts nothing). Ranges are clipped to the file's size; a chunk member shared by several
    reads or files (hardlinks) counts once."""
    from store.metrics import merge_ranges

    seen: set[tuple[int, int]] = set()  # (layer, member offset)
    compressed = read = files = found = with_ranges = 0
    for t in traced:
        files += 1
        with_ranges += t.ranges is not None
        for li in range(len(layers) - 1, -1, -1):
            entry = layers[li].lookup(t.path)
            if entry is None:
                continue
            if entry.type == "reg":
                found += 1
                spans = [[0, entry.size]] if t.ranges is None else t.ranges
                for start, end in merge_ranges(spans):
                    end = min(end, entry.size)
                    if end <= start:
                        continue
                    read += end - start
                    for c in layers[li].chunks_for_range(entry, start, end - start):
                        if (li, c.offset) not in seen:
                            seen.add((li, c.offset))
                            compressed += c.compressed_size
            break
    return ReadBytes(compressed, read, files, found, with_ranges, toc_bytes)


def layout_indexes(layout: Path) -> tuple[list[Any], int]:
    """The :class:`~store.estargz.LayerIndex` of each layer of an eStargz OCI image layout
    (bottom first), each TOC checked against its layer's TOC digest annotation, and the bytes
    of the TOCs and footers together. Raises :class:`UserError` naming the layout when it is
    not readable or a layer is not eStargz."""
    from store.estargz import TOC_DIGEST_ANNOTATION, EstargzError, EstargzReader, FileBlobSource

    blobs = layout / "blobs" / "sha256"
    try:
        index = json.loads((layout / "index.json").read_text())
        manifest_digest = index["manifests"][0]["digest"]
        manifest = json.loads((blobs / manifest_digest.split(":", 1)[1]).read_text())
        descriptors = manifest["layers"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"image layout {layout}: {exc!r}") from None
    indexes, toc_bytes = [], 0
    for d in descriptors:
        path = blobs / d["digest"].split(":", 1)[1]
        toc_digest = (d.get("annotations") or {}).get(TOC_DIGEST_ANNOTATION)
        if not toc_digest:
            raise UserError(f"image layout {layout}: layer {d['digest']} is not eStargz")
        try:
            with FileBlobSource(path) as source:
                reader = EstargzReader(source, toc_digest)
                indexes.append(reader.index)
                toc_bytes += source.size() - reader.index.toc_offset
        except (OSError, EstargzError) as exc:
            raise UserError(f"image layout {layout}: layer {d['digest']}: {exc}") from None
    return indexes, toc_bytes


def manifest_digest_of(layout: Path) -> str:
    return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]


def noopt_layout(image_dir: Path) -> Path | None:
    """The cached ``estargz-noopt`` OCI layout of the built image in ``image_dir``, if any."""
    from harness.images.push import layout_name

    path = image_dir / "oci" / layout_name(NOOPT)
    return path if (path / "index.json").is_file() else None


def chunk_level_layout(image_dir: Path, traced: Sequence[Any]) -> Path | None:
    """The cached ``estargz`` OCI layout of the image in ``image_dir`` optimized for the
    trace ``traced`` (``harness.trace.TracedFile`` list) at chunk level — its files read in part
    cut into :data:`store.estargz.RANGE_CHUNK_SIZE` chunks —, if the trace has ranges and the
    layout is built."""
    from harness.images.push import layout_name

    ranges = {f.path: f.ranges for f in traced if f.ranges is not None}
    if not ranges:
        return None
    order = {f.path: f.order for f in traced if f.order is not None}
    name = layout_name("estargz", [f.path for f in traced], read_ranges=ranges, read_order=order)
    path = image_dir / "oci" / name
    return path if (path / "index.json").is_file() else None


def workload_entry(image_dir: Path, trace: Path) -> dict[str, Any]:
    """``limits.json``'s entry for one workload: the cached trace ``trace`` mapped onto the
    finest-chunked layout of the image in ``image_dir`` the cache holds — its chunk-level
    ``estargz`` layout (:func:`chunk_level_layout`), else its ``estargz-noopt`` layout;
    ``{"unavailable": why}`` when the cache lacks a trace or a layout, or they cannot be read."""
    from harness.trace import read_cached_trace

    if not trace.is_file():
        return {"unavailable": f"no access trace cached ({trace.name}; the estargz mode traces)"}
    try:
        traced = read_cached_trace(trace)
    except UserError as exc:
        return {"unavailable": str(exc)}
    chunked = chunk_level_layout(image_dir, traced)
    layout = chunked or noopt_layout(image_dir)
    if layout is None:
        return {"unavailable": f"no {NOOPT} image of {image_dir.name} in the cache"}
    try:
        indexes, tocs = layout_indexes(layout)
    except UserError as exc:
        return {"unavailable": str(exc)}
    found = bytes_read(indexes, traced, toc_bytes=tocs)
    mode = "estargz" if chunked is not None else NOOPT
    return asdict(found) | {
        "image": manifest_digest_of(layout),
        "layout": mode,
        "trace": trace.name,
    }


# -- limits.json ---------------------------------------------------------------------------------


# The counts of a limits.json entry (:class:`ReadBytes`): the model computes with them.
COUNTS = (
    "compressed_bytes",
    "read_bytes",
    "files",
    "files_found",
    "files_with_ranges",
    "toc_bytes",
)


def read_limits(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The per-workload entries of ``run_dir/limits.json``, or None when there is none.
    Raises :class:`UserError` when it is there but not of the documented shape (an entry not
    an object, a count of :data:`COUNTS` not an integer ≥ 0: the model divided and summed it,
    and the report ended in a traceback)."""
    path = Path(run_dir) / LIMITS
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        workloads = data["workloads"]
        if not isinstance(workloads, dict):
            raise TypeError("workloads is not an object")
        for name, entry in workloads.items():
            if not isinstance(entry, dict):
                raise TypeError(f"workloads.{name} is not an object")
            for key in COUNTS:
                value = entry.get(key)
                if key in entry and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 0
                ):
                    raise TypeError(
                        f"workloads.{name}.{key} is {value!r}, not a count (an integer ≥ 0)"
                    )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: {exc}; delete it and run `lazybench report --limits`") from None
    return workloads


def write_limits(run_dir: Path, workloads: dict[str, dict[str, Any]]) -> Path:
    """Write (atomically) ``run_dir/limits.json`` with ``workloads``' entries, keeping the
    entries of other workloads already there (a shard or a resume prepares only some)."""
    path = Path(run_dir) / LIMITS
    try:
        merged = dict(read_limits(run_dir) or {})
    except UserError:
        merged = {}
    merged.update(workloads)
    write_atomic(path, json.dumps({"schema": SCHEMA, "workloads": merged}, indent=1))
    return path


def find_image_dirs(cache_dir: Path, digests: Iterable[str]) -> list[Path]:
    """The built image directories under ``cache_dir/images`` whose OCI layouts hold a blob
    with one of the manifest ``digests``: those of the first digest first, each once, in name
    order. One image can sit in several: a recipe's image and the same image imported from a
    file it was exported to convert to the same manifests, each under its own directory and
    with its own trace key (:func:`harness.trace.trace_cache_path`)."""
    found: list[Path] = []
    for digest in digests:
        hexpart = digest.split(":", 1)[-1]
        if not hexpart:
            continue
        blobs = (cache_dir / "images").glob(f"*/oci/*/blobs/sha256/{hexpart}")
        for image_dir in sorted({blob.parents[4] for blob in blobs}):
            if image_dir not in found:
                found.append(image_dir)
    return found


def compute_run_limits(
    run_dir: Path,
    cache_dir: Path | None = None,
    *,
    say: Callable[[str], None] = lambda message: None,
) -> dict[str, dict[str, Any]]:
    """The ``limits.json`` entries of an existing run, from the image cache: each workload's
    image found by the manifest digests ``environment.json`` recorded, its trace by the
    workload as the run's scenario resolves it. Nothing is built or traced: what the cache
    lacks is an ``unavailable`` entry."""
    from harness.cli import default_cache_dir
    from harness.prepare import resolve
    from harness.records import read_environment
    from harness.scenario import parse_scenario
    from harness.trace import trace_cache_path

    cache_dir = cache_dir or default_cache_dir()
    env = read_environment(run_dir)
    scenario = parse_scenario(env.get("scenario", {}), f"{run_dir}/environment.json")
    images = env.get("images") or {}
    out: dict[str, dict[str, Any]] = {}
    for w in scenario.workloads:
        modes = images.get(w.name) or {}
        ordered = [modes.get(NOOPT, {}), *modes.values()]
        digests = [m.get("manifest_digest", "") for m in ordered if isinstance(m, dict)]
        candidates = find_image_dirs(cache_dir, digests)
        if not candidates:
            out[w.name] = {"unavailable": "its images are not in the cache"}
            continue
        # The directory the run traced in is the one holding the workload's trace (the first
        # found was taken before: another directory of the same image had none, and the run
        # got no limit).
        resolved = resolve(w)
        traces = [(d, trace_cache_path(d.name, resolved, cache_dir)) for d in candidates]
        image_dir, trace = next(((d, t) for d, t in traces if t.is_file()), traces[0])
        entry = workload_entry(image_dir, trace)
        layout = entry.get("layout", NOOPT)
        say(f"limit {w.name}: mapped the trace onto the {layout} image's TOCs")
        measured = (modes.get(layout) or {}).get("manifest_digest")
        if measured and entry.get("image") not in (None, measured):
            entry["note"] = f"the run measured {layout} image {measured}, the cache holds another"
        out[w.name] = entry
    return out


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """One workload's limit (seconds) and its three parts. ``floor_repull``: the runtime floor
    includes podman's re-pull, and the round trips are then the store's only."""

    compressed_bytes: int
    rate_mbit: float
    rtt_ms: float
    floor_s: float
    files: int | None = None  # traced files, and how many had their byte ranges traced
    files_with_ranges: int | None = None
    floor_repull: bool = False

    @property
    def round_trips(self) -> int:
        return STORE_ROUND_TRIPS if self.floor_repull else UNAVOIDABLE_ROUND_TRIPS

    @property
    def floor_parts(self) -> str:
        """What the runtime floor sums, e.g. "re-pull + create + run" (legacy's medians)."""
        return FLOOR_PARTS[self.floor_repull]

    @property
    def transfer_s(self) -> float:
        return self.compressed_bytes / (self.rate_mbit * MBIT)

    @property
    def rtt_s(self) -> float:
        return self.round_trips * self.rtt_ms / 1000.0

    @property
    def total_s(self) -> float:
        return self.transfer_s + self.rtt_s + self.floor_s


@dataclass(frozen=True)
class PullFloor:
    """The floor of one lazy ``podman pull`` through a layer store (seconds): the runtime's own
    share of that pull as measured (``runtime_s``: :mod:`harness.timeline`'s summary, its own
    round trips and work between the store's answers) plus the least the store's part could
    take on the measured link: :data:`PULL_ROUND_TRIPS` × RTT + the TOC bytes it fetched ÷
    bandwidth. ``pull_s - total_s`` is what the store spent beyond the network's floor."""

    runtime_s: float
    toc_bytes: int
    rate_mbit: float
    rtt_ms: float

    @property
    def network_s(self) -> float:
        return self.toc_bytes / (self.rate_mbit * MBIT) + PULL_ROUND_TRIPS * self.rtt_ms / 1000.0

    @property
    def total_s(self) -> float:
        return self.runtime_s + self.network_s


def pull_floor(summary: dict[str, Any], env: dict[str, Any]) -> PullFloor | None:
    """The :class:`PullFloor` of a pull timeline's ``summary`` on the run's link (``env``:
    its ``environment.json``); None without a measured link or without the summary's
    ``runtime_s`` and ``toc_bytes``."""
    link = link_of(env)
    runtime, toc = summary.get("runtime_s"), summary.get("toc_bytes")
    if isinstance(link, str) or not isinstance(runtime, int | float) or not isinstance(toc, int):
        return None
    return PullFloor(float(runtime), toc, link[0], link[1])


def link_of(env: dict[str, Any]) -> tuple[float, float] | str:
    """(measured Mbit/s, measured RTT ms) of a run's link, or why the model does not apply."""
    link = env.get("link") or {}
    profile = link.get("profile") or {}
    name = profile.get("name") if isinstance(profile, dict) else profile
    if name == "loopback" or (isinstance(profile, dict) and profile.get("namespace") is False):
        return "not meaningful on the loopback profile (no link to be bound by)"
    measured = link.get("measured") or {}
    rate, rtt = measured.get("rate_mbit"), measured.get("rtt_ms")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (rate, rtt))
    # `not … > 0` also refuses nan, which the model would have carried into every limit.
    if not numbers or not rate > 0 or not rtt >= 0 or not math.isfinite(rate + rtt):
        return "the run's link has no measured bandwidth and RTT"
    return float(rate), float(rtt)


class Floor(NamedTuple):
    """A workload's runtime floor (seconds) and whether it includes podman's re-pull."""

    seconds: float
    repull: bool = False


def runtime_floor(df: Any) -> dict[str, Floor]:
    """Per workload, its runtime floor from its ``legacy`` measurements (``df``:
    :func:`harness.stats.records_frame`, ok measurements only): the median of ``repull_s +
    create_s + run_s`` over those with a re-pull when there are any, else the median of
    ``create_s + run_s`` (runs recorded before the re-pull, CRI-O)."""
    if df.empty:
        return {}
    legacy = df[df["mode"] == "legacy"]
    out: dict[str, Floor] = {}
    for w, rows in legacy.groupby("workload", sort=False):
        floor = rows["create_s"].astype(float) + rows["run_s"].astype(float)
        repull = rows["repull_s"].astype(float) if "repull_s" in rows else None
        with_repull = repull is not None and bool(repull.notna().any())
        if with_repull:
            floor = (floor + repull)[repull.notna()]
        v = float(floor.median())
        if not math.isnan(v):
            out[str(w)] = Floor(v, with_repull)
    return out


def limits_of(
    entries: dict[str, dict[str, Any]] | None,
    env: dict[str, Any],
    df: Any,
    workloads: Sequence[str],
) -> dict[str, Limit | str]:
    """Per workload, its :class:`Limit` or why there is none (no ``limits.json``, the cache
    lacked the image or trace, the link, no ``legacy`` measurement)."""
    link = link_of(env)
    floors = runtime_floor(df)
    out: dict[str, Limit | str] = {}
    for w in workloads:
        entry = (entries or {}).get(w)
        if isinstance(link, str):
            out[w] = link
        elif entries is None:
            out[w] = f"no {LIMITS} (`lazybench report --limits` computes it from the cache)"
        elif not entry or "compressed_bytes" not in entry:
            out[w] = (entry or {}).get("unavailable", f"not in {LIMITS}")
        elif w not in floors:
            out[w] = "no legacy measurement (the runtime floor is measured in legacy)"
        else:
            out[w] = Limit(
                int(entry["compressed_bytes"]),
                link[0],
                link[1],
                floors[w].seconds,
                files=entry.get("files"),
                files_with_ranges=entry.get("files_with_ranges"),
                floor_repull=floors[w].repull,
            )
    return out
