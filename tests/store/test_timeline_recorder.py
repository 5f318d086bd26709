"""The pull timeline recorder (store.timeline) and its events along the resolver path."""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path

import pytest
import trio

from store.cache import ChunkCache
from store.config import StoreConfig, parse_config
from store.fs import StoreFS
from store.resolver import LayerManager
from store.timeline import Timeline, open_timeline, span
from tests.store.test_fs_logic import REF, VectorRegistry, _path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_events_are_written_as_json_lines_with_both_clocks(tmp_path):
    path = tmp_path / "sub" / "timeline.jsonl"
    tl = Timeline(path)
    tl.event("lookup", layer="sha256:a", ref="r")
    with tl.bind(layer="sha256:a").span("toc_fetch", requests=1) as out:
        out["bytes"] = 42
    assert tl.once("k", "first_read") and not tl.once("k", "first_read")
    with pytest.raises(ValueError), tl.span("parse"):
        raise ValueError("bad TOC")
    tl.close()
    lookup, fetch, read, parse = _lines(path)
    assert lookup["event"] == "lookup" and "dur" not in lookup and lookup["ref"] == "r"
    assert fetch["event"] == "toc_fetch" and fetch["bytes"] == 42 and fetch["requests"] == 1
    assert fetch["layer"] == "sha256:a" and fetch["dur"] >= 0 and fetch["t"] >= lookup["t"]
    assert abs((fetch["wall"] - lookup["wall"]) - (fetch["t"] - lookup["t"])) < 0.05
    assert read["event"] == "first_read"
    assert parse["error"] == "ValueError"


def test_off_means_no_recorder_and_no_file(tmp_path):
    assert parse_config({}).timeline_path == ""
    assert parse_config({"timeline_path": str(tmp_path / "t.jsonl")}).timeline_path
    assert open_timeline("") is None
    with span(None, "verify") as out:
        out["x"] = 1  # accepted and dropped
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_written_on_the_callers_thread_and_lines_never_interleave(tmp_path):
    path = tmp_path / "timeline.jsonl"
    tl = Timeline(path, flush_every=60)
    tl.event("a")
    assert path.read_text() == ""  # buffered until the writer thread is woken
    tl.flush()
    for _ in range(100):
        if path.read_text():
            break
        threading.Event().wait(0.01)
    assert path.read_text().count("\n") == 1

    def emit(n: int) -> None:
        for i in range(2000):
            tl.event("request", thread=n, i=i, pad="x" * (i % 300))
            if i % 97 == 0:
                tl.flush()

    threads = [threading.Thread(target=emit, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tl.close()
    events = _lines(path)[1:]
    assert len(events) == 8000
    for n in range(4):
        assert [e["i"] for e in events if e["thread"] == n] == list(range(2000))


@pytest.mark.anyio
async def test_a_lookup_through_the_resolver_records_every_layer_step(vectors_dir, tmp_path):
    path = tmp_path / "timeline.jsonl"
    tl = Timeline(path)
    async with trio.open_nursery() as nursery:
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5)
        reg = VectorRegistry(vectors_dir)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery, timeline=tl)
        fs = StoreFS(manager)
        b64 = base64.b64encode(REF.encode()).decode()
        digest = reg.meta["digest"]
        await _path(fs, b64, reg.meta["toc_digest"], "info")
        await _path(fs, b64, reg.meta["toc_digest"], "diff")
        await _path(fs, b64, reg.meta["toc_digest"], "diff")  # answered again: no second ready
        nursery.cancel_scope.cancel()
    tl.close()
    events = _lines(path)
    names = [e["event"] for e in events]
    for name in ("manifest", "footer", "toc_fetch", "verify", "parse", "tree", "loaded"):
        assert names.count(name) == 1, name
    assert names.count("lookup") == 1 and names.count("ready") == 1
    by = {e["event"]: e for e in events}
    assert by["lookup"]["name"] == reg.meta["toc_digest"] and by["lookup"]["ref"] == REF
    assert by["footer"]["layer"] == digest and by["footer"]["requests"] == 1
    assert by["toc_fetch"]["bytes"] > 0 and by["toc_fetch"]["toc_digest"] == reg.meta["toc_digest"]
    assert by["parse"]["entries"] > 0 and by["ready"]["layer"] == digest
    order = [by[n]["t"] for n in ("lookup", "manifest", "footer", "verify", "parse", "tree")]
    assert order == sorted(order)
    whats = [e["what"] for e in events if e["event"] == "request"]
    assert all(e["ref"] == REF for e in events if e["event"] == "request")
    assert whats == ["ref", "layerdir", "info"] + ["ref", "layerdir", "diff"] * 2
    assert all(e["dur"] >= 0 for e in events if e["event"] == "request")


def test_the_timeline_is_the_store_users_only(tmp_path):
    """It names the images and layers pulled, private ones too: 0600 (was 0644)."""
    old = os.umask(0o022)
    try:
        tl = Timeline(tmp_path / "timeline.jsonl")
        tl.close()
    finally:
        os.umask(old)
    assert (tmp_path / "timeline.jsonl").stat().st_mode & 0o777 == 0o600
