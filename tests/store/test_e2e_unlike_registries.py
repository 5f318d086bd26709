"""The mounted store reading from a registry that redirects blob GETs to a storage host which
behaves as object stores do, not as docker-registry does.

The registry (real ``docker-registry`` behind a loopback proxy) answers every blob GET with a
307 to a storage host on another address with a signed query; the storage host refuses every
third signature with S3's 403 "Request has expired", and answers a request for several ranges
with its first range only (as S3 may). Files read through the mount are the layer's bytes,
and most reads go to the storage host without the registry's redirect before them.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest

from tests.registry.regtest_proxies import HttpFaultProxy, answer
from tests.store.images import add_file, make_tar, push, to_estargz, to_zstd_chunked_ours

pytestmark = [pytest.mark.e2e]

CONFIG = """
noprefetch = true
zstd_measure_diff_size = true
no_background_fetch = true
resolve_timeout_sec = 60
[blob]
fetching_timeout_sec = 20
max_retries = 4
"""
EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message></Error>"
)
# Small chunks, files far apart: a read of several files asks for several ranges at once.
FILES = {f"f{i}": random.Random(i).randbytes(40_000) for i in range(12)}


def _addr(host: str) -> tuple[str, int]:
    name, port = host.rsplit(":", 1)
    return name, int(port)


@pytest.mark.store_ours_only(reason="what the Go store does here is not under test")
def test_reads_through_an_s3_like_storage_host_are_exact(registry, store_factory) -> None:
    def tar(t) -> None:  # type: ignore[no-untyped-def]
        for name, data in FILES.items():
            add_file(t, name, data)

    blob = to_estargz(make_tar(tar), chunk_size=8 << 10)
    # Its info (the tar's size, from every header frame's head: one multi-range read)
    zstd = to_zstd_chunked_ours(make_tar(tar), generation="podman4")
    signatures = itertools.count(1)
    seen = {"expired": 0, "first_only": 0}

    def storage_policy(h) -> bool:  # type: ignore[no-untyped-def]
        if int(h.path.rsplit("sig=", 1)[1]) % 3 == 1:
            seen["expired"] += 1
            answer(h, 403, EXPIRED, Content_Type="application/xml")
            return True
        ranges = h.headers.get("Range", "")
        if "," in ranges:
            seen["first_only"] += 1
            storage.forward(h, {"Range": ranges.split(",")[0]})
            return True
        return False

    storage = HttpFaultProxy(_addr(registry.host), storage_policy, bind="127.0.0.2")

    def front_policy(h) -> bool:  # type: ignore[no-untyped-def]
        if h.command != "GET" or "/blobs/" not in h.path:
            return False
        answer(h, 307, Location=f"http://{storage.host}{h.path}?sig={next(signatures)}")
        return True

    push(registry.host, "unlike/s3", "1", [blob, zstd])
    with storage, HttpFaultProxy(_addr(registry.host), front_policy) as front:
        store = store_factory(CONFIG)
        diff = store.layer_dir(f"{front.host}/unlike/s3:1", blob.digest) / "diff"
        for name, data in FILES.items():
            assert (diff / name).read_bytes() == data, name
        zdir = store.layer_dir(f"{front.host}/unlike/s3:1", zstd.digest)
        assert json.loads((zdir / "info").read_text())["diff-size"] == zstd.uncompressed_size
        assert (zdir / "diff" / "f3").read_bytes() == FILES["f3"]
    print(seen)
    assert seen["expired"] >= 1 and seen["first_only"] >= 1
    # Once redirected, reads of a blob go straight to the storage host ([blob]
    # valid_interval): the registry answered far fewer blob GETs than the storage host did.
    redirected = [s for s in front.seen if s["method"] == "GET" and "/blobs/" in s["path"]]
    stored = [s for s in storage.seen if s["method"] == "GET" and "/blobs/" in s["path"]]
    assert 2 * len(redirected) <= len(stored), (len(redirected), len(stored))
