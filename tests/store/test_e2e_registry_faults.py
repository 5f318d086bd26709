"""The mounted store behind a loopback proxy that breaks blob range reads on purpose.

With retries a reader (a file read through the mount, or a podman container) gets exactly the
layer's bytes whatever the proxy does to some of the requests; with the registry gone (it
stalls, or refuses connections) a read answers EIO within ``[blob] fetching_timeout_sec`` and
nothing hangs. The proxy is a real HTTP server on loopback in front of the real
``docker-registry`` (``tests/registry/regtest_proxies.py``).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.podman import PodmanEnv, PodmanError
from tests.registry.regtest_proxies import FAULTS, BlobFaults, HttpFaultProxy, answer
from tests.store.images import add_file, make_tar, push, to_estargz

pytestmark = [pytest.mark.e2e]

FETCH_TIMEOUT = 15  # each of the 9 attempts may stall for 15/9 s
GONE_TIMEOUT = 6
CONFIG = f"""
noprefetch = true
no_background_fetch = true
resolve_timeout_sec = 60
[blob]
fetching_timeout_sec = {FETCH_TIMEOUT}
max_retries = 8
"""
GONE_CONFIG = f"""
noprefetch = true
no_background_fetch = true
[blob]
fetching_timeout_sec = {GONE_TIMEOUT}
max_retries = 2
"""
# Every fault, with a good answer between them (a 5xx burst is three in a row).
# Every fault within the first 12 blob range GETs (runs of at most three faults, each retried
# by the client), so a workload needing 5 good answers meets them all however few requests
# its reads take.
MIXED = (
    "reset", "ok", "5xx", "5xx", "5xx", "ok", "truncate", "full200", "wrong_range", "ok",
    "stall", "drip", "ok",
)  # fmt: skip


# A third layer no workload reads before the registry goes away.
COLD = random.Random(3).randbytes(200_000)
COLD_TAR = make_tar(lambda t: add_file(t, "cold", COLD))


def _addr(host: str) -> tuple[str, int]:
    name, port = host.rsplit(":", 1)
    return name, int(port)


def _whole_layer_gets(proxy: HttpFaultProxy, blobs: list) -> list[str]:
    """Layer blob GETs without Range that reached the proxy (a pull that did not go lazily;
    the config blob is always fetched whole)."""
    layers = {b.digest for b in blobs}
    return [
        r["path"]
        for r in proxy.seen
        if r["method"] == "GET"
        and r["path"].rsplit("/", 1)[-1] in layers
        and "Range" not in r["headers"]
    ]


@pytest.fixture
def faulty(registry, layers) -> Iterator[tuple[HttpFaultProxy, BlobFaults, str, list]]:
    """A three-layer image in the registry, and a fault proxy in front of it: (proxy,
    faults, the image's ref through the proxy, its blobs)."""
    blobs = [to_estargz(layers["lower"]), to_estargz(layers["upper"]), to_estargz(COLD_TAR)]
    push(registry.host, "faulty/img", "1", blobs)
    faults = BlobFaults(_addr(registry.host))
    with HttpFaultProxy(_addr(registry.host), faults) as proxy:
        yield proxy, faults, f"{proxy.host}/faulty/img:1", blobs


# Faults the Go store v0.12 recovers from as well (its HTTP client retries them).
RETRIED_BY_BOTH = ("reset", "5xx", "drip", "full200")


@pytest.mark.parametrize("fault", RETRIED_BY_BOTH)
def test_read_through_a_faulty_link_gets_exact_bytes(faulty, store_factory, layers, fault):
    _read_through(faulty, store_factory, layers, fault)


@pytest.mark.parametrize("fault", [f for f in FAULTS if f not in RETRIED_BY_BOTH])
@pytest.mark.store_ours_only(
    reason="the Go store v0.12 does not retry a truncated, stalled or wrongly ranged answer: "
    "the read fails with EIO (always for a stall, about every other run for the others)"
)
def test_read_through_a_bad_answer_gets_exact_bytes(faulty, store_factory, layers, fault):
    _read_through(faulty, store_factory, layers, fault)


def _read_through(faulty, store_factory, layers, fault: str) -> None:
    proxy, faults, ref, blobs = faulty
    # 5xx come in bursts of three; the others alternate with good answers.
    faults.schedule = (fault, fault, fault, "ok") if fault == "5xx" else (fault, "ok")
    store = store_factory(CONFIG)
    diff = store.layer_dir(ref, blobs[0].digest) / "diff"
    start = time.monotonic()
    assert (diff / "big").read_bytes() == layers["big"]
    assert (diff / "etc" / "hello").read_bytes() == b"hello from lower\n"
    elapsed = time.monotonic() - start
    print(f"{fault}: {faults.done} in {elapsed:.1f}s")
    assert faults.done.get(fault, 0) >= 1, faults.done
    assert elapsed < FETCH_TIMEOUT
    # No plain (whole-blob) GET reached the proxy: the store read lazily throughout.
    assert _whole_layer_gets(proxy, blobs) == []


def test_registry_refusing_answers_eio_within_the_bound(faulty, store_factory, layers):
    _registry_gone(faulty, store_factory, "refused")


@pytest.mark.store_ours_only(
    reason="the Go store v0.12 bounds each attempt, not the read: a stalled registry answered "
    "EIO after 12 s with fetching_timeout_sec = 6, max_retries = 2"
)
def test_registry_stalling_answers_eio_within_the_bound(faulty, store_factory, layers):
    _registry_gone(faulty, store_factory, "stall")


def _registry_gone(faulty, store_factory, gone: str) -> None:
    proxy, faults, ref, blobs = faulty
    store = store_factory(GONE_CONFIG)
    diff = store.layer_dir(ref, blobs[0].digest) / "diff"
    assert (diff / "etc" / "hello").read_bytes() == b"hello from lower\n"  # resolved, cached
    if gone == "stall":
        faults.gone = "stall"
    else:
        proxy.refuse()
    start = time.monotonic()
    with pytest.raises(OSError) as exc:
        (diff / "big").read_bytes()
    elapsed = time.monotonic() - start
    print(f"gone ({gone}): EIO after {elapsed:.1f}s")
    assert exc.value.errno == errno.EIO
    assert elapsed < GONE_TIMEOUT + 3, elapsed
    # What was read before is still served (from the cache), and the store still answers.
    assert (diff / "etc" / "hello").read_bytes() == b"hello from lower\n"
    if store.impl == "ours":  # only ours has a status file
        assert store.status()["layers"]


# One 16 MiB file in 4 MiB chunks: the readers below all wait on its first chunk.
ONE_CHUNK_FILE = random.Random(11).randbytes(16 << 20)
WAITERS_CONFIG = """
noprefetch = true
no_background_fetch = true
[blob]
fetching_timeout_sec = 20
"""


def test_readers_waiting_on_one_chunk_of_a_refusing_registry_answer_eio_within_the_bound(
    registry, store_factory
):
    """Eight readers of one 4 MiB chunk, the registry refusing connections: each gets EIO
    within ``fetching_timeout_sec``. Each waiter asked the registry again in turn once the
    fetch it waited on failed (5 retries, 3 s a round), so the last reader's EIO came after
    50 s, and 96 requests reached the dead registry for one chunk."""
    blob = to_estargz(
        make_tar(lambda t: (add_file(t, "big", ONE_CHUNK_FILE), add_file(t, "small", b"x"))),
        chunk_size=4 << 20,
    )
    push(registry.host, "faulty/waiters", "1", [blob])
    faults = BlobFaults(_addr(registry.host))
    with HttpFaultProxy(_addr(registry.host), faults) as proxy:
        store = store_factory(WAITERS_CONFIG)
        diff = store.layer_dir(f"{proxy.host}/faulty/waiters:1", blob.digest) / "diff"
        assert (diff / "small").read_bytes() == b"x"  # resolved
        proxy.refuse()
        outcome: list[tuple[int | None, float]] = []

        def read(i: int) -> None:
            start = time.monotonic()
            fd = os.open(diff / "big", os.O_RDONLY)
            try:
                os.pread(fd, 4096, i * (512 << 10))  # all in the first chunk
                outcome.append((None, time.monotonic() - start))
            except OSError as exc:
                outcome.append((exc.errno, time.monotonic() - start))
            finally:
                os.close(fd)

        threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a reader is stuck"
    print("outcome:", [(e, round(s, 1)) for e, s in outcome])
    assert [e for e, _ in outcome] == [errno.EIO] * 8
    assert max(s for _, s in outcome) < 20 + 3


# What the store's log says when every blob range answer is of the kind: the lookup fails
# with it at once (retries included), and podman would pull the layer the ordinary way.
REFUSED = {
    "gzip": "Content-Encoding: gzip",
    "long_body": "has Content-Length 1073741824",
    "endless_body": "bytes expected (received",
    "full200": "ignores Range requests (answered 200 of",
}


@pytest.mark.parametrize("fault", REFUSED)
@pytest.mark.store_ours_only(
    reason="the Go store v0.12 reads such answers: it decodes none, so a gzip body fails chunk "
    "verification; it takes a 200 as the whole blob and caches all of it"
)
def test_a_hostile_range_answer_fails_the_lookup_fast_with_its_cause(faulty, store_factory, fault):
    proxy, faults, ref, blobs = faulty
    faults.schedule = (fault,)
    store = store_factory(GONE_CONFIG)
    diff = store.layer_dir(ref, blobs[0].digest) / "diff"
    start = time.monotonic()
    with pytest.raises(OSError):
        os.stat(diff)
    elapsed = time.monotonic() - start
    print(f"{fault}: lookup failed after {elapsed:.1f}s, {faults.done}, sent {faults.sent}")
    assert elapsed < 3, elapsed
    log = store.log.read_text(errors="replace")
    assert REFUSED[fault] in log and proxy.host in log, log[-3000:]
    assert faults.sent.get(fault, 0) < 64 << 20, faults.sent


WORKLOAD = "sha256sum /big /etc/hello /bin/busybox | cut -c1-64"


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
@pytest.mark.store_ours_only(
    reason="under these faults (a stalled request among them) a layer blob is fetched whole "
    "with the Go store v0.12: that layer is not pulled lazily"
)
def test_podman_workload_through_a_faulty_link_then_registry_gone(
    faulty, store_factory, layers, tmp_path
):
    proxy, faults, ref, blobs = faulty
    faults.schedule = MIXED
    store = store_factory(CONFIG)
    busybox = Path("/bin/busybox").read_bytes()
    want = [hashlib.sha256(d).hexdigest() for d in (layers["big"], b"hello from upper\n", busybox)]
    with PodmanEnv(
        tmp_path / "env", additional_layer_store=store.mnt, insecure_registries=[proxy.host]
    ) as env:
        t0 = time.monotonic()
        env.pull(ref, timeout=180)
        t1 = time.monotonic()
        out = env.run(ref, "/bin/sh", "-c", WORKLOAD, timeout=300)
        print(f"pull {t1 - t0:.1f}s, run {time.monotonic() - t1:.1f}s, requests {faults.done}")
        assert out.stdout.split() == want
        assert set(faults.done) == {"ok", *FAULTS}, faults.done
        assert _whole_layer_gets(proxy, blobs) == []

        # The registry stalls from now on: a container reading what was never fetched gets
        # an I/O error within the bound, and one reading what was fetched still works.
        faults.gone = "stall"
        start = time.monotonic()
        with pytest.raises(PodmanError, match=r"(?i)input/output error"):
            env.run(ref, "/bin/cat", "/cold", timeout=120)
        print(f"gone: EIO after {time.monotonic() - start:.1f}s")
        assert time.monotonic() - start < FETCH_TIMEOUT + 30
        assert env.run(ref, "/bin/cat", "/etc/hello", timeout=60).stdout == "hello from upper\n"
    assert os.path.ismount(store.mnt)


class BadLayerSize:
    """A policy for ``HttpFaultProxy`` that serves the image's manifest with ``layers[1].size``
    a string numeral, which the store took for a number before (and served)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream

    def __call__(self, h) -> bool:
        if "/manifests/" not in h.path:
            return False
        conn = http.client.HTTPConnection(*self.upstream, timeout=10)
        conn.request("GET", h.path, headers={"Accept": h.headers.get("Accept", "")})
        resp = conn.getresponse()
        manifest = json.loads(resp.read())
        conn.close()
        manifest["layers"][1]["size"] = str(manifest["layers"][1]["size"])
        body = json.dumps(manifest).encode()
        answer(h, 200, body, Content_Type=manifest["mediaType"])
        return True


@pytest.mark.store_ours_only(reason="asserts our store's log message for a malformed manifest")
def test_a_malformed_manifest_fails_the_lookup_at_once_naming_the_field(
    registry, store_factory, layers
):
    blobs = [to_estargz(layers["lower"]), to_estargz(layers["upper"])]
    push(registry.host, "crafted/img", "1", blobs)
    with HttpFaultProxy(_addr(registry.host), BadLayerSize(_addr(registry.host))) as proxy:
        ref = f"{proxy.host}/crafted/img:1"
        store = store_factory(CONFIG)
        start = time.monotonic()
        with pytest.raises(OSError) as exc:
            (store.layer_dir(ref, blobs[0].digest) / "diff").stat()
        elapsed = time.monotonic() - start
    assert exc.value.errno == errno.EIO
    assert elapsed < 5, elapsed  # not resolve_timeout_sec (60): the lookup fails at once
    msgs = [json.loads(line).get("msg", "") for line in store.log.read_text().splitlines()]
    failed = [m for m in msgs if m.startswith(f"resolution failed: {ref}: manifest sha256:")]
    size = len(blobs[1].data)
    assert failed, msgs[-20:]
    assert failed[0].endswith(f'layers[1].size: expected an integer 0 <= size < 2^63, got "{size}"')
    # No blob of the image was asked for: the manifest was refused before anything else.
    assert not [r for r in proxy.seen if "/blobs/" in r["path"]], proxy.seen
