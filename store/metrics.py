"""Prometheus metrics and the access trace.

Metrics (served by prometheus-client on ``metrics_address``): bytes and requests fetched per
layer, on-demand reads, fetch latency, chunk-cache hits/misses. Per-layer status (fetched
bytes, percent cached) is also readable as JSON from ``<mountpoint>/status``.

Access trace (``access_trace_path``): a JSON-lines file, one line per regular file the first
time it is read through the mount, in that order::

    {"layer": "<compressed layer digest>", "toc_digest": "sha256:…", "path": "usr/bin/python3",
     "time": 1700000000.123}

``path`` is relative to the layer root, without a leading ``/``. The harness groups lines by
``layer`` to get, per layer, the files a workload reads in first-access order, and puts those
files first (before ``.prefetch.landmark``) when building an optimized image. Lines are
appended and flushed one by one, so the file is readable while the store runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from store.layer import Layer
from store.tree import Node


class StoreMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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

    def on_fetch(self, layer: Layer, nbytes: int, seconds: float) -> None:
        self.fetched_bytes.labels(layer.digest).inc(nbytes)
        self.fetch_requests.labels(layer.digest).inc()
        self.fetch_seconds.observe(seconds)
        stats = layer.cache.stats
        self.cache_hits.set(stats.hits)
        self.cache_misses.set(stats.misses)
        self.cache_bytes.set(layer.cache.total_bytes)

    def on_read(self, layer: Layer) -> None:
        self.on_demand_reads.labels(layer.digest).inc()

    def on_file_access(self, layer: Layer) -> None:
        self.files_accessed.labels(layer.digest).inc()

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)


class AccessTrace:
    """Appends one JSON line per first read of a file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - long-lived

    def record(self, layer: Layer, node: Node) -> None:
        line: dict[str, Any] = {
            "layer": layer.digest,
            "toc_digest": layer.toc_digest,
            "path": layer.tree.path_of(node),
            "time": round(time.time(), 3),
        }
        self._f.write(json.dumps(line) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
