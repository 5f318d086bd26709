"""The chunk cache under a crash and a full disk: only whole, verified chunks are served."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from store.cache import ChunkCache


def _key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _file(root: Path, key: str) -> Path:
    hexd = key.split(":")[1]
    return root / "sha256" / hexd[:2] / hexd[2:]


def test_torn_chunk_file_is_never_served_after_a_restart(tmp_path):
    data = os.urandom(5000)
    key = _key(data)
    ChunkCache(tmp_path, 1 << 20).put(key, data)
    # What a crash of the machine can leave: the rename reached the disk, half the data did not.
    path = _file(tmp_path, key)
    path.write_bytes(data[:2500])
    # And a temporary file of a write that never finished.
    (path.parent / f".{path.name}.123.tmp").write_bytes(data[:100])
    again = ChunkCache(tmp_path, 1 << 20)
    assert key in again  # known from the scan ...
    assert again.get(key) is None  # ... but never served
    assert key not in again and not path.exists()
    assert [p.name for p in path.parent.iterdir()] == []
    again.put(key, data)  # fetched again, cached whole
    assert ChunkCache(tmp_path, 1 << 20).get(key) == data


def test_full_disk_serves_uncached_and_leaves_no_entry(tmp_path, monkeypatch):
    cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=0)
    data = os.urandom(3000)
    key = _key(data)
    real_open = open

    def enospc_open(path, mode="r", *a, **kw):  # type: ignore[no-untyped-def]
        if "w" in mode and str(path).startswith(str(tmp_path)):
            f = real_open(path, mode, *a, **kw)
            f.write(data[:10])  # a partial write, as a filling disk does
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", enospc_open)
    cache.put(key, data)  # no exception: the read that fetched it is still answered
    monkeypatch.undo()
    assert key not in cache and cache.get(key) is None
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []
