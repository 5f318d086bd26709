"""Prometheus metrics and the access trace.

Metrics (served by prometheus-client on ``metrics_address``): bytes and requests fetched per
layer, on-demand reads, fetch latency, chunk-cache hits/misses. Per-layer status (fetched
bytes, percent cached) is also readable as JSON from ``<mountpoint>/status``. The per-layer
series are kept for the :data:`LAYER_SERIES_KEPT` layers most recently active (a fetch, a
read, a first access): a store that runs for weeks sees ever new layers, and their series
(8 per layer) otherwise grew for good, as did every scrape. A layer's series dropped and
active again start from zero, which Prometheus reads as a counter reset.

Access trace (``access_trace_path``): a JSON-lines file, one line per regular file the first
time it is read through the mount, in that order::

    {"layer": "<compressed layer digest>", "toc_digest": "sha256:…", "path": "usr/bin/python3",
     "time": 1700000000.123}

``path`` is relative to the layer root, without a leading ``/``. The harness groups lines by
``layer`` to get, per layer, the files a workload reads in first-access order, and puts those
files first (before ``.prefetch.landmark``) when building an optimized image. Lines are
appended and flushed one by one, so the file is readable while the store runs.

When the store stops, one more line per file read gives the byte ranges it served, merged,
in file offsets (``[start, end)``, sorted, neither overlapping nor touching)::

    {"layer": "sha256:…", "toc_digest": "sha256:…", "path": "usr/bin/python3",
     "ranges": [[0, 4096], [65536, 1114112]], …}

A range line also gives the order in which the store first served each piece of the file,
``"order": [[start, end, seq], …]``: ``[start, end)`` file offsets in :data:`ORDER_BLOCK`
blocks (block ends, not clipped to the bytes read) and ``seq``, the sequence number of the
read that first touched them, from one counter (from 0) shared by every read of every file
of every layer in the store's life; sorted by ``start``, disjoint, touching runs of one
``seq`` joined (:func:`merge_order`). Comparing ``seq`` across files and layers gives the
order of first reads (a JVM reads pages of libjvm.so, then classes.jsa, then more of
libjvm.so and ``modules``)::

    {"layer": "sha256:…", "toc_digest": "sha256:…", "path": "usr/bin/python3",
     "ranges": [[0, 4096], [65536, 1114112]], "order": [[0, 65536, 3], [65536, 1114112, 7]]}

Readers from before the order ignore the key.

They are written in one ``write`` after the last read (a reader that sees the trace earlier,
or the trace of a store that was killed, has the files without their ranges); a reader that
only wants the files can take every line's ``path`` (the range lines repeat names already
seen). Recording a read costs O(1) for its ranges (a sequential read extends the file's
last range) plus O(blocks it touches) for its order; the merging happens when the lines are
written.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from store.cache import ChunkCache
from store.layer import Layer
from store.spans import merge_spans
from store.tree import Node

# Layers whose per-layer series are kept (module doc): a node's live layers are well under
# this (a few dozen images of a few dozen layers); 8 series each, about 1 MB of scrape.
LAYER_SERIES_KEPT = 1024


class StoreMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Digests with per-layer series, least recently active first (_layer).
        self._layers: OrderedDict[str, None] = OrderedDict()
        self.fetched_bytes = Counter(
            "stargz_store_fetched_bytes",
            "Compressed bytes fetched from the registry",
            ["layer"],
            registry=self.registry,
        )
        self.fetch_requests = Counter(
            "stargz_store_fetch_requests",
            "Range requests sent to the registry",
            ["layer"],
            registry=self.registry,
        )
        self.fetch_seconds = Histogram(
            "stargz_store_fetch_seconds", "Latency of one range request", registry=self.registry
        )
        self.on_demand_reads = Counter(
            "stargz_store_on_demand_reads",
            "FUSE reads of layer files",
            ["layer"],
            registry=self.registry,
        )
        self.files_accessed = Counter(
            "stargz_store_files_accessed",
            "Layer files read for the first time",
            ["layer"],
            registry=self.registry,
        )
        self.cache_hits = Gauge(
            "stargz_store_cache_hits", "Chunk cache hits", registry=self.registry
        )
        self.cache_misses = Gauge(
            "stargz_store_cache_misses", "Chunk cache misses", registry=self.registry
        )
        self.cache_bytes = Gauge(
            "stargz_store_cache_bytes", "Bytes in the chunk cache", registry=self.registry
        )

    def watch_cache(self, cache: ChunkCache) -> None:
        """Serve ``cache``'s hits, misses and bytes as they are at each scrape.

        They were set at each registry fetch only: a store serving from its cache showed
        the numbers of its last fetch for good (no hits at all after a restart over a warm
        cache), and ``stargz_store_cache_bytes`` was 0 until the first fetch after a start,
        whatever the cache held, and the bytes before that fetch's chunks after it."""
        self.cache_hits.set_function(lambda: cache.stats.hits)
        self.cache_misses.set_function(lambda: cache.stats.misses)
        self.cache_bytes.set_function(lambda: cache.total_bytes)

    def _layer(self, layer: Layer) -> str:
        """``layer``'s label value, now the most recently active; the series of the least
        recently active layer past :data:`LAYER_SERIES_KEPT` are dropped (module doc)."""
        digest = layer.digest
        self._layers[digest] = None
        self._layers.move_to_end(digest)
        while len(self._layers) > LAYER_SERIES_KEPT:
            old, _ = self._layers.popitem(last=False)
            for counter in (
                self.fetched_bytes,
                self.fetch_requests,
                self.on_demand_reads,
                self.files_accessed,
            ):
                with contextlib.suppress(KeyError):  # never counted in this one
                    counter.remove(old)
        return digest

    def on_fetch(self, layer: Layer, nbytes: int, seconds: float) -> None:
        digest = self._layer(layer)
        self.fetched_bytes.labels(digest).inc(nbytes)
        self.fetch_requests.labels(digest).inc()
        self.fetch_seconds.observe(seconds)

    def on_read(self, layer: Layer) -> None:
        self.on_demand_reads.labels(self._layer(layer)).inc()

    def on_file_access(self, layer: Layer) -> None:
        self.files_accessed.labels(self._layer(layer)).inc()

    def serve(self, address: str) -> None:
        """Serve the metrics on ``address`` (``HOST:PORT``, :func:`store.config.split_host_port`;
        an empty host: 127.0.0.1) from a thread. Raises OSError when it cannot bind."""
        from store.config import split_host_port

        host, port = split_host_port(address)
        start_http_server(port, addr=host or "127.0.0.1", registry=self.registry)


def merge_ranges(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    """``[start, end)`` byte ranges sorted and merged (:func:`store.spans.merge_spans`):
    overlapping or touching ranges become one, empty ones (``end <= start``) are dropped.
    ``[[0, 5], [3, 9], [9, 10], [20, 20]]`` → ``[[0, 10]]``; JSON-ready lists."""
    return [[start, end] for start, end in merge_spans((int(r[0]), int(r[1])) for r in ranges)]


# The granularity of the first-read order (module docstring): 64 KiB blocks of a file.
ORDER_BLOCK = 64 << 10


def merge_order(runs: Iterable[Sequence[int]]) -> list[list[int]]:
    """``[start, end, seq]`` runs (``[start, end)`` byte offsets, the sequence number of the
    read that first touched them) as the trace's ``order`` gives them: each byte with the
    smallest ``seq`` of the runs that cover it, in sorted disjoint runs, touching runs of the
    same ``seq`` joined, empty ones dropped. ``[[0, 10, 5], [5, 20, 2], [20, 30, 2]]`` →
    ``[[0, 5, 5], [5, 30, 2]]``; JSON-ready lists. O(n log n) for n runs."""
    items = sorted((int(r[0]), int(r[1]), int(r[2])) for r in runs)
    items = [r for r in items if r[1] > r[0]]
    bounds = sorted({x for start, end, _ in items for x in (start, end)})
    out: list[list[int]] = []
    active: list[tuple[int, int]] = []  # heap of (seq, end) of the runs begun so far
    i = 0
    for lo, hi in itertools.pairwise(bounds):
        while i < len(items) and items[i][0] <= lo:
            heapq.heappush(active, (items[i][2], items[i][1]))
            i += 1
        while active and active[0][1] <= lo:
            heapq.heappop(active)  # ended: no bound lies inside [lo, hi), so it misses it
        if not active:
            continue
        seq = active[0][0]
        if out and out[-1][1] == lo and out[-1][2] == seq:
            out[-1][1] = hi
        else:
            out.append([lo, hi, seq])
    return out


def _order_runs(blocks: Mapping[int, int]) -> list[list[int]]:
    """A file's ``{block index: seq}`` as the trace's ``order`` (:func:`merge_order`)."""
    return merge_order([b * ORDER_BLOCK, (b + 1) * ORDER_BLOCK, seq] for b, seq in blocks.items())


class AccessTrace:
    """Appends one JSON line per first read of a file, and the ranges read of each file when
    closed (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The store user's only, as the chunk cache is: it names the files a private image's
        # containers read.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._f: IO[str] = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - long-lived
        # (layer digest, node index) -> ([layer digest, TOC digest, path], ranges as read)
        self._reads: dict[tuple[str, int], tuple[list[str], list[list[int]]]] = {}
        self._merge_at: dict[tuple[str, int], int] = {}  # list length that triggers a merge
        # (layer digest, node index) -> {ORDER_BLOCK index: seq of the read that first touched it}
        self._order: dict[tuple[str, int], dict[int, int]] = {}
        self._seq = 0  # the next read's sequence number, across files and layers

    def record(self, layer: Layer, node: Node) -> None:
        line: dict[str, Any] = {
            "layer": layer.digest,
            "toc_digest": layer.toc_digest,
            "path": layer.tree.path_of(node),
            "time": round(time.time(), 3),
        }
        self._f.write(json.dumps(line) + "\n")
        self._f.flush()

    def record_read(self, layer: Layer, node: Node, offset: int, size: int) -> None:
        """``size`` bytes of ``node`` served from ``offset``: O(1) amortized for the ranges (a
        read that starts inside or right after the file's last range extends it; others are
        appended, and a file's list is merged whenever it has doubled since its last merge,
        and at :meth:`close`), plus O(blocks touched) for the order: each :data:`ORDER_BLOCK`
        block of the file this read is the first to touch gets its sequence number."""
        if size <= 0:
            return
        key = (layer.digest, node.index)
        seq = self._seq
        self._seq += 1
        blocks = self._order.get(key)
        if blocks is None:
            blocks = self._order[key] = {}
        for b in range(offset // ORDER_BLOCK, (offset + size - 1) // ORDER_BLOCK + 1):
            blocks.setdefault(b, seq)
        found = self._reads.get(key)
        if found is None:
            names = [layer.digest, layer.toc_digest, layer.tree.path_of(node)]
            self._reads[key] = (names, [[offset, offset + size]])
            return
        ranges = found[1]
        last = ranges[-1]
        if last[0] <= offset <= last[1]:
            last[1] = max(last[1], offset + size)
            return
        ranges.append([offset, offset + size])
        if len(ranges) >= self._merge_at.get(key, 64):
            # Merged when the list has doubled since the last merge: memory stays about that
            # of the distinct ranges, and a read still costs O(1) amortized.
            ranges[:] = merge_ranges(ranges)
            self._merge_at[key] = max(64, 2 * len(ranges))

    def close(self) -> None:
        """Write the ranges read of every file and their first-read order (one write), then
        close the trace."""
        lines = [
            json.dumps(
                {
                    "layer": layer,
                    "toc_digest": toc,
                    "path": path,
                    "ranges": merge_ranges(ranges),
                    "order": _order_runs(self._order.get(key, {})),
                }
            )
            + "\n"
            for key, ((layer, toc, path), ranges) in self._reads.items()
        ]
        self._reads = {}
        self._order = {}
        try:
            if lines:
                self._f.write("".join(lines))
        finally:
            self._f.close()
