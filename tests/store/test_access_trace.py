"""The access trace records the byte ranges each file was read in, merged when the store stops,
and the order in which their 64 KiB blocks were first read."""

from __future__ import annotations

import base64
import itertools
import json
import os

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from harness.store_proc import read_trace, read_trace_order, read_trace_ranges
from store.cache import ChunkCache
from store.config import StoreConfig
from store.fs import ROOT_INO, StoreFS
from store.metrics import ORDER_BLOCK, AccessTrace, merge_order, merge_ranges
from store.resolver import LayerManager
from tests.store.test_fs_logic import REF, VectorRegistry


def test_merge_ranges_joins_overlapping_and_touching_ranges() -> None:
    assert merge_ranges([[5, 9], [0, 5], [3, 4], [20, 20], [12, 15], [14, 30]]) == [
        [0, 9],
        [12, 30],
    ]
    assert merge_ranges([]) == []


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 60)), max_size=30))
def test_merge_ranges_covers_the_same_bytes_in_disjoint_sorted_ranges(spans) -> None:
    ranges = [[start, start + n] for start, n in spans]
    merged = merge_ranges(ranges)
    covered = {b for start, end in ranges for b in range(start, end)}
    assert {b for start, end in merged for b in range(start, end)} == covered
    assert all(a[1] < b[0] for a, b in itertools.pairwise(merged))
    assert all(start < end for start, end in merged)


@pytest.mark.anyio
async def test_reads_through_the_store_are_traced_with_their_ranges(vectors_dir, tmp_path):
    path = tmp_path / "trace.jsonl"
    trace = AccessTrace(path)
    cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5)
    reg = VectorRegistry(vectors_dir)
    async with trio.open_nursery() as nursery:
        manager = LayerManager(
            cfg,
            reg,
            ChunkCache(tmp_path / "c", 1 << 30),
            nursery,
            on_file_access=trace.record,
        )
        fs = StoreFS(manager, on_read_range=trace.record_read)
        ino = ROOT_INO
        for name in (base64.b64encode(REF.encode()).decode(), reg.meta["digest"], "diff"):
            ino = (await fs.lookup(ino, name)).ino
        usr = (await fs.lookup(ino, "usr")).ino
        tool = (await fs.lookup((await fs.lookup(usr, "bin")).ino, "tool")).ino
        for offset, size in ((0, 4096), (4096, 4096), (65536, 8192), (30000, 100), (69990, 100)):
            await fs.read(tool, offset, size)
        # A read at the end of the file returns nothing and is not a range.
        assert await fs.read(tool, 70000, 10) == b""
        # Until the store stops, the trace names the file without its ranges.
        assert read_trace(path) == ["usr/bin/tool"]
        assert read_trace_ranges(path) == {}
        nursery.cancel_scope.cancel()
    trace.close()
    assert read_trace(path) == ["usr/bin/tool"]
    assert read_trace_ranges(path) == {"usr/bin/tool": [[0, 8192], [30000, 30100], [65536, 70000]]}
    # Block 0 first by the first read (0), block 1 by the third (the one at 65536): the
    # empty read at the end is not a read.
    assert read_trace_order(path) == {"usr/bin/tool": [[0, 65536, 0], [65536, 131072, 2]]}
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[-1]["layer"] == reg.meta["digest"]
    assert lines[-1]["toc_digest"] == reg.meta["toc_digest"]


def test_trace_ranges_skip_torn_and_foreign_lines(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"layer": "sha256:a", "path": "a"}\n'
        '{"layer": "sha256:a", "path": "/a", "ranges": [[10, 20], [0, 5]]}\n'
        '{"layer": "sha256:b", "path": "a", "ranges": [[5, 10], ["x", 1]]}\n'
        '{"layer": "sha256:b", "path": "b", "ranges": [[0, 1'
    )
    assert read_trace_ranges(path) == {"a": [[0, 20]]}
    assert read_trace_ranges(tmp_path / "missing.jsonl") == {}


def test_many_scattered_reads_keep_the_ranges_merged(tmp_path) -> None:
    """A long-lived store with the trace on: scattered re-reads of the same places do not
    grow the ranges kept in memory."""
    from types import SimpleNamespace

    from store.metrics import AccessTrace

    trace = AccessTrace(tmp_path / "trace.jsonl")
    tree = SimpleNamespace(path_of=lambda node: "f")
    layer = SimpleNamespace(digest="sha256:" + "a" * 64, toc_digest="sha256:" + "b" * 64, tree=tree)
    node = SimpleNamespace(index=1)
    for i in range(10_000):
        offset = (i * 7919 % 50) * 8192
        trace.record_read(layer, node, offset, 4096)  # type: ignore[arg-type]
    (_, ranges) = trace._reads[(layer.digest, 1)]
    assert len(ranges) <= 128
    trace.close()


def _fake(digest: str, name: str, index: int):
    """A (layer, node) pair as record_read sees them."""
    from types import SimpleNamespace

    tree = SimpleNamespace(path_of=lambda node: name)
    layer = SimpleNamespace(digest=digest, toc_digest="sha256:" + "b" * 64, tree=tree)
    return layer, SimpleNamespace(index=index)


def _order_lines(path) -> dict[tuple[str, str], list[list[int]]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {(entry["layer"], entry["path"]): entry["order"] for entry in lines}


def test_the_order_of_first_reads_is_one_counter_across_files_and_layers(tmp_path) -> None:
    """A JVM-like run: libjvm.so, then classes.jsa (another layer), then more of libjvm.so and
    a re-read of its start. Each block keeps the number of the read that first touched it;
    a read over several new blocks is one run."""
    B = ORDER_BLOCK
    path = tmp_path / "trace.jsonl"
    trace = AccessTrace(path)
    jvm = _fake("sha256:" + "1" * 64, "usr/lib/libjvm.so", 7)
    jsa = _fake("sha256:" + "2" * 64, "usr/lib/classes.jsa", 7)  # same node index, other layer
    reads = [
        (jvm, 0, 100),  # 0: block 0
        (jvm, B - 10, 20),  # 1: block 1 (block 0 already seen)
        (jsa, 0, 3 * B),  # 2: blocks 0-2 of the other file, one run
        (jvm, 0, 4096),  # 3: a re-read: nothing new
        (jvm, 5 * B, 2 * B + 1),  # 4: blocks 5-7
        (jvm, 3 * B, 10),  # 5: block 3
        (jvm, 2 * B, 2 * B),  # 6: block 2 (3 already seen): its own run before 3's
        (jsa, 0, 0),  # nothing read: no number
        (jsa, 3 * B, 1),  # 7
    ]
    for (layer, node), offset, size in reads:
        trace.record_read(layer, node, offset, size)  # type: ignore[arg-type]
    trace.close()
    assert _order_lines(path) == {
        (jvm[0].digest, "usr/lib/libjvm.so"): [
            [0, B, 0],
            [B, 2 * B, 1],
            [2 * B, 3 * B, 6],
            [3 * B, 4 * B, 5],
            [5 * B, 8 * B, 4],
        ],
        (jsa[0].digest, "usr/lib/classes.jsa"): [[0, 3 * B, 2], [3 * B, 4 * B, 7]],
    }
    assert read_trace_ranges(path)["usr/lib/libjvm.so"] == [
        [0, 4096],
        [B - 10, B + 10],
        [2 * B, 4 * B],
        [5 * B, 7 * B + 1],
    ]


def test_merge_order_keeps_each_bytes_first_read_and_joins_runs() -> None:
    assert merge_order([[0, 10, 5], [5, 20, 2], [20, 30, 2], [40, 40, 0]]) == [
        [0, 5, 5],
        [5, 30, 2],
    ]
    assert merge_order([[10, 20, 1], [0, 100, 3]]) == [[0, 10, 3], [10, 20, 1], [20, 100, 3]]
    assert merge_order([]) == []


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 40), st.integers(0, 9)), max_size=20))
def test_merge_order_gives_every_byte_its_smallest_seq(runs) -> None:
    triples = [[start, start + n, seq] for start, n, seq in runs]
    want: dict[int, int] = {}
    for start, end, seq in triples:
        for b in range(start, end):
            want[b] = min(want.get(b, seq), seq)
    merged = merge_order(triples)
    assert {b: seq for start, end, seq in merged for b in range(start, end)} == want
    assert all(start < end for start, end, _ in merged)
    assert all(
        a[1] < b[0] or (a[1] == b[0] and a[2] != b[2]) for a, b in itertools.pairwise(merged)
    )


def test_trace_order_skips_bad_entries_and_takes_the_first_read_over_layers(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"layer": "sha256:a", "path": "a"}\n'
        '{"layer": "sha256:a", "path": "/a", "ranges": [], "order": [[0, 10, 4], [10, 20, 1]]}\n'
        '{"layer": "sha256:b", "path": "a", "ranges": [], "order": [[0, 15, 2], ["x", 1, 1]]}\n'
        '{"layer": "sha256:b", "path": "old", "ranges": [[0, 1]]}\n'
        '{"layer": "sha256:b", "path": "b", "order": [[5, 1, 0], [0, 1, -1]]}\n'
        '{"layer": "sha256:b", "path": "c", "ranges": [], "order": [[0, 1'
    )
    assert read_trace_order(path) == {"a": [[0, 10, 2], [10, 20, 1]]}
    assert read_trace_order(tmp_path / "missing.jsonl") == {}


def test_per_layer_series_stay_bounded_over_the_store_life() -> None:
    """Every layer the store ever served kept its 8 per-layer series for the life of the
    store: after 40 images (41 layers) pulled, run and removed, 349 series and a 45 kB
    scrape, growing by about 1 kB per new layer for as long as the store ran."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from store.metrics import StoreMetrics

    metrics = StoreMetrics()
    layers = [SimpleNamespace(digest=f"sha256:{i:064x}") for i in range(3000)]
    for layer in layers:
        metrics.on_fetch(layer, 100, 0.01)  # type: ignore[arg-type]
        metrics.on_read(layer)  # type: ignore[arg-type]
        metrics.on_file_access(layer)  # type: ignore[arg-type]
    metrics.on_read(layers[0])  # active again: its series come back, from zero
    text = generate_latest(metrics.registry).decode()
    labelled = {
        line.split('layer="')[1].split('"')[0] for line in text.splitlines() if 'layer="' in line
    }
    assert len(labelled) <= 1024
    assert layers[-1].digest in labelled and layers[0].digest in labelled
    assert layers[1].digest not in labelled
    reads = f'stargz_store_on_demand_reads_total{{layer="{layers[0].digest}"}} 1.0'
    assert reads in text


def test_the_trace_is_the_store_users_only(tmp_path) -> None:
    """It names the files a (perhaps private) image's containers read: 0600, as the chunk
    cache is the store user's only (it was 0644 under the usual umask)."""
    old = os.umask(0o022)
    try:
        trace = AccessTrace(tmp_path / "trace.jsonl")
        trace.close()
    finally:
        os.umask(old)
    assert (tmp_path / "trace.jsonl").stat().st_mode & 0o777 == 0o600
