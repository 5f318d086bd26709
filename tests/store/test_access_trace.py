"""The access trace records the byte ranges each file was read in, merged when the store stops."""

from __future__ import annotations

import base64
import itertools
import json

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from harness.store_proc import read_trace, read_trace_ranges
from store.cache import ChunkCache
from store.config import StoreConfig
from store.fs import ROOT_INO, StoreFS
from store.metrics import AccessTrace, merge_ranges
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
