"""The mounted store under concurrency: parallel readers, parallel images, inode numbers.

Where fetches are counted, every range request the store sends goes through a recording
proxy in front of the real registry, so "one fetch per chunk" is checked on the wire: each
chunk of the big file is inside exactly one request, however many readers and images wanted
it at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from harness.podman import PodmanEnv
from store.estargz import BytesBlobSource, EstargzReader
from tests.registry.regtest_proxies import HttpFaultProxy
from tests.store.concurrent_pulls import pull_all
from tests.store.conftest import lost_lazy_layers
from tests.store.images import Blob, add_file, full_blob_gets, make_tar, push, to_estargz

pytestmark = [pytest.mark.e2e]
CONFIG = "noprefetch = true\nno_background_fetch = true\n"


def _addr(host: str) -> tuple[str, int]:
    name, port = host.rsplit(":", 1)
    return name, int(port)


@pytest.fixture
def recorded(registry) -> Iterator[HttpFaultProxy]:
    """A pass-through proxy in front of the registry that records every request's headers."""
    with HttpFaultProxy(_addr(registry.host)) as proxy:
        yield proxy


def _requested(proxy: HttpFaultProxy, digest: str) -> list[list[tuple[int, int]]]:
    """The byte ranges ``[lo, hi)`` of every range GET of blob ``digest``, one list each."""
    out = []
    for r in proxy.seen:
        rng = r["headers"].get("Range")
        if r["method"] == "GET" and r["path"].endswith(digest) and rng:
            spans = [s.split("-") for s in rng.removeprefix("bytes=").split(",")]
            out.append([(int(lo), int(hi) + 1) for lo, hi in spans])
    return out


def _fetches_per_chunk(proxy: HttpFaultProxy, blob: Blob, path: str) -> list[int]:
    """For each chunk of ``path``, how many range requests carried all its compressed bytes."""
    entry = EstargzReader(BytesBlobSource(blob.data)).lookup(path)
    requests = _requested(proxy, blob.digest)
    return [
        sum(any(lo <= c.offset and c.compressed_end <= hi for lo, hi in req) for req in requests)
        for c in entry.chunks
    ]


def _in_threads(n: int, work: Callable[[int], object], timeout: float) -> list[object]:
    """Run ``work(i)`` for i < n in n threads; fail if one raises or any is still running."""
    results: list[object] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a reader is stuck (deadlock?)"
    assert errors == [], errors[:3]
    return results


@pytest.mark.store_ours_only(
    reason="the Go store v0.12 fetches a chunk more than once under parallel readers "
    "(seen: 1, 2, 3, 4, 0 fetches for the file's five chunks)"
)
def test_a_hundred_parallel_readers_of_one_file(recorded, store_factory, layers):
    big = layers["big"]
    blob = to_estargz(layers["lower"])
    push(recorded.host, "conc/readers", "1", [blob])
    store = store_factory(CONFIG)
    path = store.layer_dir(f"{recorded.host}/conc/readers:1", blob.digest) / "diff" / "big"
    assert path.stat().st_size == len(big)  # resolved before the readers start

    def read(i: int) -> bytes:
        # Each reader starts at another 64 KiB block and wraps around.
        blocks = list(range(0, len(big), 65536))
        first = random.Random(i).randrange(len(blocks))
        parts: dict[int, bytes] = {}
        fd = os.open(path, os.O_RDONLY)
        try:
            for off in blocks[first:] + blocks[:first]:
                parts[off] = os.pread(fd, 65536, off)
        finally:
            os.close(fd)
        got = bytearray(len(big))
        for off, data in parts.items():
            got[off : off + len(data)] = data
        return bytes(got)

    results = _in_threads(100, read, timeout=120)
    assert all(r == big for r in results)
    assert _fetches_per_chunk(recorded, blob, "big") == [1] * 5  # 1.2 MB in 256 KiB chunks


@pytest.mark.store_ours_only(
    reason="the Go store v0.12 gives nodes of different layers the same inode numbers "
    "(seen: 52 distinct numbers for 114 nodes)"
)
def test_inode_numbers_unique_across_layers(recorded, store_factory, layers):
    """One inode number, one object: a file of a layer as one image sees it (images sharing
    a layer each get their own numbers for its tree, so no directory has two parents), a
    hardlink's target, or one of the store's own directories and files; numbers are never
    handed out again, so none is reused before the kernel forgets it."""
    blobs = [to_estargz(layers["lower"]), to_estargz(layers["upper"])]
    for i in range(3):
        push(recorded.host, f"conc/ino{i}", "1", blobs)
    store = store_factory(CONFIG)
    owner: dict[int, tuple[str, str]] = {}
    for i in range(3):
        for b in blobs:
            top = store.layer_dir(f"{recorded.host}/conc/ino{i}:1", b.digest)
            diff = top / "diff"
            identities = [(str(p), "store") for p in (top.parent, top, top / "info", top / "blob")]
            identities.append((f"{i}/{b.digest}", ""))  # the layer root
            for p in sorted(diff.rglob("*")):
                rel = str(p.relative_to(diff))
                ident = (f"{i}/{b.digest}", "data/sub/b" if rel == "data/hard" else rel)
                identities.append(ident)
            paths = [top.parent, top, top / "info", top / "blob", diff, *sorted(diff.rglob("*"))]
            for p, ident in zip(paths, identities, strict=True):
                ino = os.lstat(p).st_ino
                assert owner.setdefault(ino, ident) == ident, (str(p), ino, owner[ino], ident)
    assert len(set(owner.values())) == len(owner)
    assert len(owner) > 3 * (1 + 2 * 3 + 20)  # per image: ref dir, layer dirs, trees


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
@pytest.mark.store_ours_only(
    reason="checks the layer count in our store's status file (the Go store has none) and one "
    "fetch per chunk, which the Go store v0.12 does not keep under parallel reads"
)
def test_eight_images_sharing_layers_pulled_and_run_in_parallel(
    recorded, store_factory, layers, tmp_path
):
    """Eight podman instances (one storage each: podman 4.3's containers/storage deadlocks
    on its own storage.lock/layers.lock when several pulls share one graph root) pull and
    run eight images that share their base layers, all at once, through one store."""
    lower, upper = to_estargz(layers["lower"]), to_estargz(layers["upper"])
    refs = []
    for i in range(8):
        own = to_estargz(make_tar(lambda t, i=i: add_file(t, "etc/id", b"image %d\n" % i)))
        push(recorded.host, f"conc/img{i}", "1", [lower, upper, own] if i % 2 else [lower, own])
        refs.append(f"{recorded.host}/conc/img{i}:1")
    store = store_factory(CONFIG)
    want_big = hashlib.sha256(layers["big"]).hexdigest()
    with contextlib.ExitStack() as stack:
        envs = [
            stack.enter_context(
                PodmanEnv(
                    tmp_path / f"env{i}",
                    additional_layer_store=store.mnt,
                    insecure_registries=[recorded.host],
                )
            )
            for i in range(8)
        ]

        def pull_and_run(i: int) -> list[str]:
            envs[i].pull(refs[i], timeout=300)
            script = "sha256sum /big | cut -c1-64; cat /etc/id /etc/hello"
            return envs[i].run(refs[i], "/bin/sh", "-c", script, timeout=300).stdout.splitlines()

        outs = _in_threads(8, pull_and_run, timeout=600)
        for i, out in enumerate(outs):
            hello = "hello from upper" if i % 2 else "hello from lower"
            assert out == [want_big, f"image {i}", hello], (i, out)
        assert len(store.status()["layers"]) == 8 + 2  # a shared layer is one layer
    # Eight containers read the shared big file at once: each chunk came over the wire once.
    assert _fetches_per_chunk(recorded, lower, "big") == [1] * 5


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
@pytest.mark.store_ours_only(
    reason="checks the layers and releases in our store's status file (the Go store has none)"
)
def test_six_images_sharing_layers_pulled_at_once_into_one_storage(
    registry, store_factory, layers, tmp_path, podman_env, runtime_node
):
    """Six ``podman pull`` processes of one storage pull six images sharing their base
    layers at once, then six containers run at once: every layer lazily served (no layer
    blob fetched whole), every file's bytes right, each shared layer one layer of the
    store, and every layer released once the images are removed."""
    if lost_lazy_layers(runtime_node):
        pytest.skip("containers/storage >= 1.58 forgets lazily pulled images (conftest)")
    host = registry.host
    lower, upper = to_estargz(layers["lower"]), to_estargz(layers["upper"])
    refs, blobs = [], {lower.digest: lower, upper.digest: upper}
    for i in range(6):
        own = to_estargz(make_tar(lambda t, i=i: add_file(t, "etc/id", b"image %d\n" % i)))
        blobs[own.digest] = own
        push(host, f"share6/img{i}", "1", [lower, upper, own] if i % 2 else [lower, own])
        refs.append(f"{host}/share6/img{i}:1")
    store = store_factory()
    mark = registry.log_mark()
    want_big = hashlib.sha256(layers["big"]).hexdigest()
    with podman_env(
        tmp_path / "env", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        errors, deadlocked = pull_all(env, refs)  # one at a time if podman 4.3 deadlocked
        if errors:
            pytest.fail(f"concurrent pulls failed: {errors}\n{store.hang_report()}")

        def run(i: int) -> list[str]:
            script = "sha256sum /big | cut -c1-64; cat /etc/id /etc/hello"
            return env.run(refs[i], "/bin/sh", "-c", script, timeout=180).stdout.splitlines()

        outs = _in_threads(6, run, timeout=300)
        for i, out in enumerate(outs):
            hello = "hello from upper" if i % 2 else "hello from lower"
            assert out == [want_big, f"image {i}", hello], (i, out)
        assert full_blob_gets(registry, mark, blobs.values()) == []
        # Nothing went wrong on the way, the store says.
        logged = [json.loads(line) for line in store.log.read_text().splitlines()]
        assert [e["msg"] for e in logged if e["level"] in ("warning", "error")] == []
        assert sorted(s["digest"] for s in store.status()["layers"].values()) == sorted(blobs)
        env.podman("rmi", *refs, timeout=120)
        if not deadlocked:  # a killed pull keeps the references it counted, for good
            deadline = time.monotonic() + 10
            while store.status()["layers"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert store.status()["layers"] == {}
            assert sorted(store.status()["released"]) == sorted(blobs)
