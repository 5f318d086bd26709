"""What a workload reads: one run through our store with the access trace on.

The ``estargz`` mode and ``lazybench convert --optimize`` prioritize these files. The image is
pushed as eStargz without prioritized files to a registry on loopback, pulled through our
``stargz-store`` (prefetch off, ``access_trace_path`` on, which turns its page-cache fill off:
every read reaches the store) by a private podman, and run until its ready line (or its
exit); the store's trace lists the files in first-access order and, once the store has
stopped, the byte ranges read of each and the order in which their pieces were first read
(:mod:`store.metrics`). Traces are cached under ``<cache>/traces/`` by image, by how the
workload is run and by :data:`TRACE_VERSION`:

* ``<workload>-<key>.json`` — a JSON list of image paths in first-access order (the form every
  version of lazybench reads: the ``estargz`` mode prioritizes these files);
* ``<workload>-<key>.ranges.json`` — beside it, written first, ``{path: [[start, end], …]}``:
  the merged ``[start, end)`` file offsets read of each file. Traces from before the store
  recorded ranges have none: their files count whole (:func:`read_cached_trace`);
* ``<workload>-<key>.order.json`` — beside it too, written before the list, ``{path: [[start,
  end, seq], …]}``: ``[start, end)`` file offsets (64 KiB blocks,
  :data:`store.metrics.ORDER_BLOCK`) and ``seq``, the number of the read that first touched
  them, from one counter across every file of the run: the order of first reads. Traces from
  before version 3 have none (the cache key changed, so they are recorded again).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cli import UserError
from harness.podman import PodmanEnv, write_atomic
from harness.store_proc import StoreProcess

# Our store, whatever store is under test: only it writes the access trace.
TRACE_STORE_COMMAND = ("stargz-store", "--config", "{config}", "--root", "{root}", "{mountpoint}")
# In the cache key: traces recorded by an older store are not reused. 2: the stores from
# d57e1e9 until 23685cc filled the kernel's page cache while tracing, so the reads the kernel
# then answered (gcc: 6 of the 14 MB compressed) were missing from their traces.
# 3: the trace records when each piece of each file was first read (the order file).
TRACE_VERSION = 3


@dataclass(frozen=True)
class TracedFile:
    """One file a workload read: its image path (no leading ``/``) and the ``[start, end)``
    byte ranges read of it, merged and sorted; ``ranges`` None means unknown (a trace from
    before ranges were recorded): the whole file. ``order``: ``(start, end, seq)`` runs
    sorted by ``start`` — ``[start, end)`` file offsets first read by the run's read number
    ``seq`` (one counter across files: comparable between TracedFiles of one trace); None:
    unknown."""

    path: str
    ranges: tuple[tuple[int, int], ...] | None = None
    order: tuple[tuple[int, int, int], ...] | None = None


def trace_cache_path(image_hash: str, w: Any, cache_dir: Path | None = None) -> Path:
    """Where the trace of workload ``w`` (a ``harness.prepare.ResolvedWorkload``) on the built
    image with hash ``image_hash`` (``BuiltImage.hash``) is cached."""
    from harness.cli import default_cache_dir

    parts: list[Any] = [image_hash, w.command, w.stdin, w.ready, TRACE_VERSION]
    if w.env:
        parts.append(w.env)
    if w.entrypoint is not None:  # absent: the key traces had before
        parts.append(["entrypoint", w.entrypoint])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    return (cache_dir or default_cache_dir()) / "traces" / f"{w.name}-{key}.json"


def ranges_path(trace: Path) -> Path:
    """The ranges file beside a cached trace (``x.json`` → ``x.ranges.json``)."""
    return trace.with_suffix(".ranges.json")


def order_path(trace: Path) -> Path:
    """The order file beside a cached trace (``x.json`` → ``x.order.json``)."""
    return trace.with_suffix(".order.json")


def _read_side(side: Path, what: str, trace: Path) -> dict[str, Any]:
    """The JSON object in ``side`` (``{}`` when there is none); :class:`UserError` naming it
    when it does not read as one."""
    if not side.exists():
        return {}
    try:
        found = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"trace {what} {side}: {exc}; delete it and {trace.name}") from None
    if not isinstance(found, dict):
        raise UserError(f"trace {what} {side}: not a JSON object; delete it")
    return found


def read_cached_trace(path: Path) -> list[TracedFile]:
    """A cached trace: its files in first-access order, each with its ranges and order when
    the ranges and order files beside it name them. Raises :class:`UserError` naming the file
    when it is not a JSON list of paths (or its ranges file not a JSON object of range lists,
    its order file not one of ``[start, end, seq]`` lists)."""
    try:
        files = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"trace {path}: {exc}; delete it to trace the workload again") from None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise UserError(f"trace {path}: not a JSON list of paths; delete it to trace again")
    side, oside = ranges_path(path), order_path(path)
    ranges = _read_side(side, "ranges", path)
    order = _read_side(oside, "order", path)
    out = []
    for name in files:
        found = ranges.get(name)
        try:
            rs = tuple((int(a), int(b)) for a, b in found) if found is not None else None
        except (TypeError, ValueError):
            raise UserError(f"trace ranges {side}: bad ranges for {name!r}: {found!r}") from None
        runs = order.get(name)
        try:
            seqs = tuple((int(a), int(b), int(q)) for a, b, q in runs) if runs is not None else None
        except (TypeError, ValueError):
            raise UserError(f"trace order {oside}: bad order for {name!r}: {runs!r}") from None
        out.append(TracedFile(name, rs, seqs))
    return out


def write_cached_trace(
    path: Path,
    files: Sequence[str],
    ranges: dict[str, list[list[int]]] | None,
    order: dict[str, list[list[int]]] | None = None,
) -> None:
    """Cache a trace (module docstring): the ranges and order files first (``{path: [[start,
    end], …]}``, ``{path: [[start, end, seq], …]}``, kept for the paths in ``files``), then
    the list, each atomically, so a trace list that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for side, found in ((ranges_path(path), ranges), (order_path(path), order)):
        if found:
            write_atomic(side, json.dumps({f: found[f] for f in files if f in found}))
        else:  # none traced (a store that did not stop cleanly): nothing stale beside the list
            side.unlink(missing_ok=True)
    write_atomic(path, json.dumps(list(files)))


def traced_reads(
    built: Any,
    w: Any,
    registry_host: str,
    work: Path,
    *,
    cache_dir: Path | None = None,
    mount_timeout: float = 30.0,
    say: Callable[[str], None] = lambda message: None,
) -> list[TracedFile]:
    """The files workload ``w`` (a ``harness.prepare.ResolvedWorkload``) reads from
    ``built`` (a ``BuiltImage``), in first-access order, with the byte ranges read of each
    and the order of their first reads (cached: :func:`trace_cache_path`). ``registry_host``
    is a plain-HTTP registry the image may be pushed to (as ``<repo>:trace``); ``work`` a
    scratch directory. Raises :class:`UserError` when the workload does not get ready or its
    run fails."""
    from harness.container import MeasurementError
    from harness.images import PushError
    from harness.podman import PodmanError
    from harness.store_proc import StoreError

    cache = trace_cache_path(built.hash, w, cache_dir)
    if cache.exists():
        traced = read_cached_trace(cache)
        say(f"  trace {w.name}: {len(traced)} files (cached)")
        return traced
    say(f"  trace {w.name}: running it once through stargz-store")
    try:
        store = _trace_run(built, w, registry_host, work / f"trace-{w.name}", mount_timeout)
    except (MeasurementError, PodmanError, StoreError, PushError) as exc:
        # e.g. no ready line within the timeout: the workload's failure, named as such
        raise UserError(f"trace run of {w.name}: {exc}") from None
    # The store has stopped: its trace holds the files and, written when it stopped, the
    # byte ranges read of each.
    files = store.trace_files()
    ranges = store.trace_ranges()
    order = store.trace_order()
    if not files:
        say(f"  [yellow]trace {w.name}: the store traced no files[/]")
    write_cached_trace(cache, files, ranges, order)
    say(f"  trace {w.name}: {len(files)} files, {len(ranges)} with their byte ranges")
    return read_cached_trace(cache)


def _trace_run(
    built: Any, w: Any, registry_host: str, tdir: Path, mount_timeout: float
) -> StoreProcess:
    """Push, pull through our store with the trace on, run until ready; the stopped store."""
    from harness.container import create_container, not_ready_reason, start_until_ready
    from harness.images import push_image
    from harness.laziness import fallback_reason, storage_verdict

    push_image(built, registry_host, w.repo, "trace", "estargz-noopt")
    ref = f"{registry_host}/{w.repo}:trace"
    with (
        StoreProcess(
            tdir / "store",
            command=TRACE_STORE_COMMAND,
            insecure_hosts=[registry_host],
            noprefetch=True,
            trace=True,
            metrics=False,
            mount_timeout=mount_timeout,
        ) as store,
        PodmanEnv(
            tdir / "podman",
            additional_layer_store=store.mountpoint,
            insecure_registries=[registry_host],
        ) as env,
    ):
        pull = env.pull(ref, timeout=w.timeout)
        # A layer podman pulled itself is read past the store: its files would be missing
        # from the trace, and the optimized image would prioritize too little, for good.
        layers = storage_verdict(env.graphroot, ref, store.mountpoint)
        if not layers.lazy:
            raise UserError(
                f"trace run of {w.name}: the pull did not come lazily from the store, so the "
                "trace would miss files: "
                + fallback_reason(
                    layers,
                    [
                        (f"store log ({store.log_path})", store.log_text()),
                        ("podman pull", pull.stderr),
                    ],
                )
            )
        cid = create_container(env, ref, w.command, w.stdin, w.timeout, w.env, w.entrypoint)
        outcome = start_until_ready(
            env, cid, stdin=w.stdin, ready=w.ready, timeout=w.timeout, expected=w.expected
        )
        if not outcome.ready:
            raise UserError(
                f"trace run of {w.name}: {not_ready_reason(w.ready, w.expected, outcome)}; "
                f"stdout {outcome.stdout[-200:]!r}, stderr {outcome.stderr.strip()[-300:]!r}"
            )
        env.podman("rm", "--force", "--time", "0", cid, timeout=60, check=False)
    return store
