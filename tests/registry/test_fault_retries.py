"""The registry client's range reads through `BlobFaults`: which faults are retried, and how.

Every fault of the store's end-to-end tests, at the client's level and fast: a single range,
several ranges in one multi-range request, and the cases that must *not* be retried.
"""

from __future__ import annotations

import random
import time

import pytest
import trio
from regtest_proxies import FAULTS, BlobFaults, HttpFaultProxy

from harness.registry_server import RegistryServer
from store.registry import RangeError, RegistryClient, RegistryTimeout

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = b'{"architecture":"amd64","os":"linux"}'


def _addr(reg: RegistryServer) -> tuple[str, int]:
    host, port = reg.host.rsplit(":", 1)
    return host, int(port)


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
    reg, ref, digest, data = blob
    faults = BlobFaults(_addr(reg), schedule=(fault, "ok"))
    with HttpFaultProxy(_addr(reg), faults) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=1, backoff=0.01, retry_timeouts=True) as c:
            spans = [(1000, 5000), (300_000, 200_000), (900_000, 100_000)]
            for _ in range(2):  # one request faulted, the next one clean
                got = await c.read_ranges(pref, digest, spans)
                assert got == [data[o : o + s] for o, s in spans]
            assert await c.read_range(pref, digest, 7, 70_000) == data[7:70_007]
            # A slow drip is only slow; a 200 is used as it is (or, to a multi-range request,
            # answered by asking one range at a time): neither needs a retry.
            assert (c.stats.retries >= 1) == (fault not in ("drip", "full200"))
    assert faults.done[fault] >= 2


async def test_a_stall_is_not_retried_unless_asked(blob) -> None:
    reg, ref, digest, _ = blob
    faults = BlobFaults(_addr(reg), schedule=("stall", "ok"))
    with HttpFaultProxy(_addr(reg), faults) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=1, backoff=0.01) as c:
            start = time.monotonic()
            with pytest.raises(RegistryTimeout):
                await c.read_range(pref, digest, 0, 100_000)
            assert time.monotonic() - start < 3


async def test_wrong_range_every_time_fails_with_a_range_error(blob) -> None:
    reg, ref, digest, _ = blob
    faults = BlobFaults(_addr(reg), schedule=("wrong_range",))
    with HttpFaultProxy(_addr(reg), faults) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=2, retries=2, backoff=0.01) as c:
            with pytest.raises(RangeError, match="does not cover"):
                await c.read_range(pref, digest, 100, 1000)
    assert faults.done["wrong_range"] == 3  # first try and two retries
