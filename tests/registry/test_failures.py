"""Mirrors, timeouts, cut connections, 5xx, refused multi-range, redirects — against real
registries behind loopback proxies that misbehave on purpose."""

from __future__ import annotations

import gzip
import http.client
import random
import tempfile
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from regtest_proxies import CuttingProxy, HttpFaultProxy, SilentListener, answer

from harness.processes import free_port
from harness.registry_server import RegistryServer
from store.registry import (
    ContentEncodingError,
    Credentials,
    NotFoundError,
    RegistryClient,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
    parse_resolver_config,
)
from store.registry.client import DOWN_FOR

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = b'{"architecture":"amd64","os":"linux"}'


def _addr(reg: RegistryServer) -> tuple[str, int]:
    host, port = reg.host.rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def seeded(registry: RegistryServer) -> tuple[RegistryServer, str, str, bytes]:
    """The module registry with an image whose 3 MiB layer the tests read."""
    import trio

    data = random.Random(99).randbytes(3 * 1024 * 1024)
    ref = f"{registry.host}/fail/app:v1"

    async def push() -> str:
        async with RegistryClient(timeout=10) as c:
            m = await c.push_image(ref, CONFIG, [(data, LAYER)])
            return m.layers[0].digest

    return registry, ref, trio.run(push), data


def _mirrors(origin: str, *mirrors: str, timeout: float = 2) -> object:
    return parse_resolver_config(
        {
            "resolver": {
                "host": {
                    origin: {
                        "mirrors": [
                            {"host": m, "insecure": True, "request_timeout_sec": timeout}
                            for m in mirrors
                        ]
                    }
                }
            }
        }
    )


async def test_down_mirrors_fall_through_to_origin(seeded, fresh_registry) -> None:
    reg, ref, digest, data = seeded
    dead = f"127.0.0.1:{free_port()}"  # nothing listens
    with SilentListener() as silent:
        # fresh_registry is up but lacks the image: a mirror's 404 also falls through.
        cfg = _mirrors(reg.host, dead, silent.host, fresh_registry.host, timeout=1)
        async with RegistryClient(resolver=cfg) as c:
            start = time.monotonic()
            m = await c.get_manifest(ref)
            assert time.monotonic() - start < 5
            assert m.layers[0].digest == digest
            assert await c.read_range(ref, digest, 1000, 10) == data[1000:1010]
    assert any(r.kind == "manifests" and r.status == 404 for r in fresh_registry.access_log())


async def test_a_stalled_mirror_is_asked_once_then_goes_last(seeded) -> None:
    """A mirror that accepts connections and never answers costs one request timeout, even
    with stalled GETs retried (as the store runs the client): the origin answers next, and
    the following requests go to the origin first."""
    reg, ref, digest, data = seeded
    with SilentListener() as silent:
        cfg = _mirrors(reg.host, silent.host, timeout=1)
        async with RegistryClient(resolver=cfg, retry_timeouts=True, retries=3) as c:
            start = time.monotonic()
            assert (await c.get_manifest(ref)).layers[0].digest == digest
            assert time.monotonic() - start < 2.5
            start = time.monotonic()
            assert await c.read_range(ref, digest, 1000, 10) == data[1000:1010]
            assert time.monotonic() - start < 0.5
            assert [e.host for e in c.endpoints(reg.host)] == [reg.host, silent.host]
            # Last for STALLED_FOR, not the DOWN_FOR of a refused connection.
            assert c._down_until[f"http://{silent.host}"] - time.monotonic() > DOWN_FOR


async def test_mirror_serves_when_up(seeded, fresh_registry) -> None:
    reg, ref, digest, data = seeded
    mirror_ref = f"{fresh_registry.host}/fail/app:v1"
    async with RegistryClient(timeout=10) as c:
        await c.push_image(mirror_ref, CONFIG, [(data, LAYER)])
    mark = reg.log_mark()
    async with RegistryClient(resolver=_mirrors(reg.host, fresh_registry.host)) as c:
        assert await c.read_range(ref, digest, 0, 100) == data[:100]
    assert reg.access_log_since(mark) == []  # the origin was not asked


async def test_not_listening_fails_fast(isolated_auth_env) -> None:
    host = f"127.0.0.1:{free_port()}"
    async with RegistryClient(timeout=1, retries=2, backoff=0.05) as c:
        start = time.monotonic()
        with pytest.raises(RegistryUnavailable, match=rf"{host}.*cannot connect"):
            await c.get_manifest(f"{host}/x/y:z")
        assert time.monotonic() - start < 2
        assert c.stats.retries == 2


async def test_silent_registry_times_out(isolated_auth_env) -> None:
    with SilentListener() as silent:
        async with RegistryClient(timeout=1.0) as c:
            start = time.monotonic()
            with pytest.raises(RegistryTimeout, match=rf"{silent.host}.*within 1s"):
                await c.get_manifest(f"{silent.host}/x/y:z")
            elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 2.5


async def test_connection_cut_mid_body_is_retried(seeded) -> None:
    reg, ref, digest, data = seeded
    with CuttingProxy(_addr(reg), cut_after=200_000, cuts=1) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            assert await c.read_range(pref, digest, 0, 1_000_000) == data[:1_000_000]
            assert proxy.cut_count == 1 and c.stats.retries >= 1
            assert await c.get_blob(pref, digest) == data


async def test_connection_always_cut_fails_cleanly(seeded) -> None:
    reg, ref, digest, _ = seeded
    with CuttingProxy(_addr(reg), cut_after=100_000, cuts=None) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=5, retries=2, backoff=0.01) as c:
            with pytest.raises(RegistryUnavailable, match=rf"{proxy.host}/fail/app@{digest}"):
                await c.get_blob(pref, digest)
            assert proxy.cut_count == 3


async def test_connection_cut_mid_range_is_not_called_a_failure_to_connect(seeded) -> None:
    """A range answer whose body stops short of its Content-Length, every time, fails naming
    the connection that broke off and what arrived — not "cannot connect", which sends the
    user looking at addresses and firewalls."""
    reg, ref, digest, _ = seeded
    with CuttingProxy(_addr(reg), cut_after=100_000, cuts=None) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=5, retries=1, backoff=0.01) as c:
            with pytest.raises(RegistryUnavailable) as exc:
                await c.read_range(pref, digest, 0, 1_000_000)
    message = str(exc.value)
    assert f"connection to http://{proxy.host} broke off" in message, message
    assert "cannot connect" not in message, message


async def test_5xx_retried_with_backoff(seeded) -> None:
    reg, ref, digest, data = seeded
    failures = {"left": 2}

    def flaky(h: BaseHTTPRequestHandler) -> bool:
        if "/blobs/" in h.path and failures["left"] > 0:
            failures["left"] -= 1
            answer(h, 503, b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}')
            return True
        return False

    with HttpFaultProxy(_addr(reg), flaky) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            assert await c.read_range(pref, digest, 10, 10) == data[10:20]
            assert c.stats.retries == 2
            failures["left"] = 100
            with pytest.raises(RegistryUnavailable, match=r"HTTP 503.*busy"):
                await c.read_range(pref, digest, 10, 10)


async def test_429_waits_as_retry_after_says(seeded) -> None:
    # A rate-limited registry: the next try waits the Retry-After it asked for (here 1 s,
    # against a backoff of 0.01 s), not the backoff alone (six tries in about 3 s).
    reg, ref, digest, data = seeded
    tries: list[float] = []

    def limited(h: BaseHTTPRequestHandler) -> bool:
        if "/blobs/" in h.path and not tries:
            tries.append(time.monotonic())
            answer(h, 429, b'{"errors":[{"code":"TOOMANYREQUESTS"}]}', Retry_After="1")
            return True
        if "/blobs/" in h.path:
            tries.append(time.monotonic())
        return False

    with HttpFaultProxy(_addr(reg), limited) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            assert await c.read_range(pref, digest, 10, 10) == data[10:20]
    assert len(tries) == 2 and tries[1] - tries[0] >= 0.95


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        (" 0 ", 0.0),
        ("-3", None),
        ("\u0663", None),  # a digit, but not HTTP's
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date past: no wait
    ],
)
def test_retry_after_reads_delay_seconds_and_dates(
    value: str | None, seconds: float | None
) -> None:
    from store.registry.client import retry_after

    assert retry_after(value) == seconds


async def test_multi_range_refused_falls_back(seeded) -> None:
    reg, ref, digest, data = seeded

    def no_multirange(h: BaseHTTPRequestHandler) -> bool:
        if "," in h.headers.get("Range", ""):
            answer(h, 200, data, Content_Type="application/octet-stream")
            return True
        return False

    ranges = [(100, 10), (5000, 20), (2_000_000, 30)]
    with HttpFaultProxy(_addr(reg), no_multirange) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=5) as c:
            got = await c.read_ranges(pref, digest, ranges)
            assert got == [data[o : o + s] for o, s in ranges]
            n = len(proxy.seen)
            assert await c.read_ranges(pref, digest, ranges) == got
            # Remembered: the second call sent single ranges only.
            assert all("," not in s["headers"].get("Range", "") for s in proxy.seen[n:])


async def test_content_encoded_manifest_and_blob_are_refused_not_decoded(seeded) -> None:
    """Digest-verified bodies are the stored bytes: a gzip-encoded manifest or blob (as an
    nginx with `gzip on` in front of a registry may send, ignoring Accept-Encoding: identity)
    is refused with the URL and the header named, and not retried."""
    reg, ref, digest, _ = seeded

    def gzipping(h: BaseHTTPRequestHandler) -> bool:
        conn = http.client.HTTPConnection(*_addr(reg), timeout=10)
        conn.request("GET", h.path, headers={"Accept": h.headers.get("Accept", "*/*")})
        resp = conn.getresponse()
        body = gzip.compress(resp.read())
        ctype = resp.getheader("Content-Type", "application/octet-stream")
        answer(h, resp.status, body, Content_Type=ctype, Content_Encoding="gzip")
        conn.close()
        return True

    with HttpFaultProxy(_addr(reg), gzipping) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            with pytest.raises(
                ContentEncodingError, match=r"/manifests/v1: .*Content-Encoding: gzip"
            ):
                await c.get_manifest(pref)
            with pytest.raises(
                ContentEncodingError, match=rf"{proxy.host}/v2/fail/app/blobs/{digest}"
            ):
                await c.get_blob(pref, digest)
            with pytest.raises(ContentEncodingError):
                await c.download_blob(pref, digest, Path(tempfile.mkdtemp()) / "blob")
            assert c.stats.retries == 0
    assert all(s["headers"].get("Accept-Encoding") == "identity" for s in proxy.seen)


async def test_unused_answer_bodies_are_not_read_to_the_end(seeded) -> None:
    """An answer whose body the client does not use (``/v2/``) is read no further than its
    first 64 KiB: a registry that streams a body without end costs neither time nor memory."""
    reg, _, _, _ = seeded
    sent = [0]

    def endless(h: BaseHTTPRequestHandler) -> bool:
        if h.path.rstrip("/") != "/v2":
            return False
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.end_headers()  # no Content-Length: the body ends when the connection does
        piece = b"{" * 65536
        try:
            while sent[0] < (1 << 30):
                h.wfile.write(piece)
                sent[0] += len(piece)
        except OSError:
            pass
        h.close_connection = True
        return True

    with HttpFaultProxy(_addr(reg), endless) as proxy:
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            started = time.monotonic()
            await c.ping(proxy.host)
            assert time.monotonic() - started < 5
    assert sent[0] < (64 << 20)


async def test_redirect_does_not_leak_credentials(basic_registry, isolated_auth_env) -> None:
    reg = basic_registry
    user, pw = "alice", "wonderland"
    async with RegistryClient(timeout=5, credentials={reg.host: Credentials(user, pw)}) as c:
        pushed = await c.push_image(f"{reg.host}/redir/app:v1", CONFIG, [(b"redirected", LAYER)])
    digest = pushed.layers[0].digest
    import base64

    basic = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    # The "storage" host on another address serves the blob with its own credentials.
    def storage(h: BaseHTTPRequestHandler) -> bool:
        storage_proxy.forward(h, {"Authorization": basic})
        return True

    storage_proxy = HttpFaultProxy(_addr(reg), storage, bind="127.0.0.2")

    def front(h: BaseHTTPRequestHandler) -> bool:
        # Authenticated blob GETs are redirected; the rest goes to the registry (which
        # challenges unauthenticated requests).
        if h.command == "GET" and "/blobs/" in h.path and "Authorization" in h.headers:
            answer(h, 307, Location=f"http://{storage_proxy.host}{h.path}")
            return True
        return False

    with storage_proxy, HttpFaultProxy(_addr(reg), front) as proxy:
        ref = f"{proxy.host}/redir/app:v1"
        async with RegistryClient(timeout=5, credentials={proxy.host: Credentials(user, pw)}) as c:
            assert await c.get_blob(ref, digest) == b"redirected"
            assert await c.read_range(ref, digest, 2, 3) == b"dir"
        assert any("Authorization" in s["headers"] for s in proxy.seen)
        assert storage_proxy.seen and all(
            "Authorization" not in s["headers"] for s in storage_proxy.seen
        )


async def test_unknown_manifest_through_mirror_is_not_found(seeded, fresh_registry) -> None:
    reg, *_ = seeded
    async with RegistryClient(resolver=_mirrors(reg.host, fresh_registry.host)) as c:
        with pytest.raises(NotFoundError, match=rf"{reg.host}/fail/missing"):
            await c.get_manifest(f"{reg.host}/fail/missing:v1")


async def test_push_ignores_mirrors(seeded, fresh_registry) -> None:
    """A mirror that has a blob must not make a push skip it: existence is asked of the origin."""
    reg, _, digest, data = seeded
    cfg = _mirrors(fresh_registry.host, reg.host)
    async with RegistryClient(resolver=cfg) as c:
        assert await c.blob_size(f"{fresh_registry.host}/fail/app", digest) == len(data)
        pushed = await c.push_blob(f"{fresh_registry.host}/fail/app", data)
        assert pushed.how == "uploaded"
    async with RegistryClient(timeout=10) as c:
        assert await c.blob_size(f"{fresh_registry.host}/fail/app", digest) == len(data)


async def test_broken_upload_is_restarted(fresh_registry) -> None:
    reg = fresh_registry
    broken = {"left": 1}

    def drop_first_put(h: BaseHTTPRequestHandler) -> bool:
        if h.command == "PUT" and "/blobs/uploads/" in h.path and broken["left"]:
            broken["left"] -= 1
            h.close_connection = True  # hang up without an answer
            return True
        return False

    data = random.Random(3).randbytes(300_000)
    with HttpFaultProxy(_addr(reg), drop_first_put) as proxy:
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            pushed = await c.push_blob(f"{proxy.host}/up/load", data)
            assert pushed.how == "uploaded" and c.stats.retries >= 1
            assert await c.get_blob(f"{proxy.host}/up/load", pushed.digest) == data
    assert broken["left"] == 0


@pytest.mark.parametrize("location", ["http://[bad/blob", "http://\x01/blob"])
async def test_redirect_to_an_invalid_location_is_a_registry_error(seeded, location: str) -> None:
    """A Location that is no URL ends the read with a RegistryError naming it, not with a
    ValueError (urljoin) or httpx.InvalidURL out of the client."""
    reg, ref, digest, _ = seeded

    def bad_redirect(h) -> bool:  # type: ignore[no-untyped-def]
        if "/blobs/" not in h.path:
            return False
        answer(h, 307, b"", Location=location)
        return True

    with HttpFaultProxy(_addr(reg), bad_redirect) as proxy:
        pref = ref.replace(reg.host, proxy.host)
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            with pytest.raises(RegistryError, match=r"HTTP 307 to an invalid Location"):
                await c.read_range(pref, digest, 10, 10)
            with pytest.raises(RegistryError, match=r"(?i)invalid (url in )?location"):
                await c.get_blob(pref, digest)
