"""The registry client's range reads through `BlobFaults`: which faults are retried, and how.

Every fault of the store's end-to-end tests, at the client's level and fast: a single range,
several ranges in one multi-range request, and the cases that must *not* be retried; and the
answers that must be refused unread (``HOSTILE``, a 200 to a range that is not the whole blob).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator

import pytest
import trio
from regtest_proxies import FAULTS, BlobFaults, HttpFaultProxy

from harness.registry_server import RegistryServer
from store.registry import (
    ContentEncodingError,
    RangeError,
    RangeNotHonoured,
    RegistryClient,
    RegistryTimeout,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = b'{"architecture":"amd64","os":"linux"}'


def _addr(reg: RegistryServer) -> tuple[str, int]:
    host, port = reg.host.rsplit(":", 1)
    return host, int(port)


@contextlib.contextmanager
def _faulty(blob, schedule: tuple[str, ...]) -> Iterator[tuple[BlobFaults, HttpFaultProxy, str]]:
    """`BlobFaults` on `schedule` in front of the blob's registry: (the faults, the proxy, the
    image's ref through the proxy)."""
    reg, ref, _, _ = blob
    faults = BlobFaults(_addr(reg), schedule=schedule)
    with HttpFaultProxy(_addr(reg), faults) as proxy:
        yield faults, proxy, ref.replace(reg.host, proxy.host)


@pytest.fixture(scope="module")
def blob(registry: RegistryServer) -> tuple[RegistryServer, str, str, bytes]:
    data = random.Random(11).randbytes(1 << 20)
    ref = f"{registry.host}/faults/app:v1"

    async def push() -> str:
        async with RegistryClient(timeout=10) as c:
            return (await c.push_image(ref, CONFIG, [(data, LAYER)])).layers[0].digest

    return registry, ref, trio.run(push), data


@pytest.mark.parametrize("fault", FAULTS)
async def test_each_fault_is_retried_to_the_right_bytes(blob, fault) -> None:
    _, _, digest, data = blob
    with _faulty(blob, (fault, "ok")) as (faults, _proxy, pref):
        async with RegistryClient(timeout=1, backoff=0.01, retry_timeouts=True) as c:
            spans = [(1000, 5000), (300_000, 200_000), (900_000, 100_000)]
            for _ in range(2):  # one request faulted, the next one clean
                got = await c.read_ranges(pref, digest, spans)
                assert got == [data[o : o + s] for o, s in spans]
            assert await c.read_range(pref, digest, 7, 70_000) == data[7:70_007]
            # A slow drip is only slow: no retry. A 200 to a multi-range request is answered
            # by asking one range at a time; to a single range not from byte 0 it is refused
            # unread (RangeNotHonoured) and asked again.
            assert (c.stats.retries >= 1) == (fault != "drip")
    assert faults.done[fault] >= 2


async def test_a_stall_is_not_retried_unless_asked(blob) -> None:
    _, _, digest, _ = blob
    with _faulty(blob, ("stall", "ok")) as (_faults, _proxy, pref):
        async with RegistryClient(timeout=1, backoff=0.01) as c:
            start = time.monotonic()
            with pytest.raises(RegistryTimeout):
                await c.read_range(pref, digest, 0, 100_000)
            assert time.monotonic() - start < 3


async def test_wrong_range_every_time_fails_with_a_range_error(blob) -> None:
    _, _, digest, _ = blob
    with _faulty(blob, ("wrong_range",)) as (faults, _proxy, pref):
        async with RegistryClient(timeout=2, retries=2, backoff=0.01) as c:
            with pytest.raises(RangeError, match=r"does not (cover|lie within)"):
                await c.read_range(pref, digest, 100, 1000)
    assert faults.done["wrong_range"] == 3  # first try and two retries


@pytest.mark.parametrize("fault", ["long_body", "endless_body"])
async def test_a_body_longer_than_asked_is_refused_then_retried(blob, fault) -> None:
    """Once: refused after at most the range's length plus one byte, asked again, exact bytes.
    Every time: a RangeError naming the host, the blob and the lengths, within a second."""
    _, _, digest, data = blob
    with _faulty(blob, (fault, "ok")) as (faults, proxy, pref):
        async with RegistryClient(timeout=2, backoff=0.01) as c:
            spans = [(1000, 5000), (300_000, 200_000)]
            assert await c.read_ranges(pref, digest, spans) == [
                data[1000:6000],
                data[300_000:500_000],
            ]
            assert await c.read_range(pref, digest, 7, 70_000) == data[7:70_007]
            assert c.stats.retries == 2
        faults.schedule = (fault,)
        async with RegistryClient(timeout=2, retries=2, backoff=0.01) as c:
            start = time.monotonic()
            with pytest.raises(RangeError) as exc:
                await c.read_range(pref, digest, 100, 1000)
            assert time.monotonic() - start < 1
    message = str(exc.value)
    assert proxy.host in message and digest in message, message
    want = "Content-Length 1073741824" if fault == "long_body" else "longer than the 1000 bytes"
    assert want in message, message
    # The client hung up early: far less than the 1 GiB on offer was sent (what was sent sat
    # in socket buffers, never in the client's memory beyond the range's 1001 bytes).
    assert faults.sent[fault] < 64 << 20, faults.sent


async def test_a_gzip_encoded_range_is_refused_unread_and_not_retried(blob) -> None:
    _, _, digest, data = blob
    with _faulty(blob, ("gzip",)) as (_faults, proxy, pref):
        async with RegistryClient(timeout=2, backoff=0.01) as c:
            with pytest.raises(ContentEncodingError, match="Content-Encoding: gzip") as exc:
                await c.read_range(pref, digest, 100, 1000)
            assert c.stats.retries == 0
            # Blob and manifest requests all ask for the stored bytes.
            assert await c.get_blob(pref, digest) == data
    assert proxy.host in str(exc.value) and digest in str(exc.value)
    assert all(s["headers"].get("Accept-Encoding") == "identity" for s in proxy.seen), proxy.seen


async def test_a_registry_ignoring_ranges_is_named_unless_the_whole_blob_was_asked(blob) -> None:
    _, _, digest, data = blob
    with _faulty(blob, ("full200",)) as (_faults, proxy, pref):
        async with RegistryClient(timeout=2, retries=1, backoff=0.01) as c:
            # Asked from byte 0 to the blob's end, the whole blob is the answer asked for.
            assert await c.read_range(pref, digest, 0, len(data)) == data
            with pytest.raises(RangeNotHonoured) as exc:
                await c.read_range(pref, digest, len(data) - 51, 51)
            with pytest.raises(RangeNotHonoured):  # from byte 0, but not to the end
                await c.read_range(pref, digest, 0, 1000)
            # A multi-range request answered 200 falls back to single ranges: refused too.
            with pytest.raises(RangeNotHonoured):
                await c.read_ranges(pref, digest, [(0, 10), (5000, 10)])
    assert str(exc.value).startswith(f"{proxy.host}/faults/app@{digest}: registry {proxy.host} ")
    assert f"ignores Range requests (answered 200 of {len(data)} bytes to bytes=" in str(exc.value)
