"""The client against registries and storage hosts that answer unlike docker-registry does.

Each test plays one behaviour seen in the wild with `Mimic` (a registry written in the test,
on a real socket): a storage host that answers a multi-range request with its first range
only, or refuses it with 416; a token service whose tokens the registry calls expired before
the client does; a client closed after error answers.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import ssl
import time

import anyio
import pytest
from regtest_mimic import Mimic, send, serve_bytes

from store.registry import (
    AuthenticationError,
    NotFoundError,
    RangeError,
    RangeNotHonoured,
    RegistryBlobSource,
    RegistryClient,
    RegistryUnavailable,
)
from store.registry.credentials import Credentials
from store.registry.hosts import parse_resolver_config
from tests.tls import make_tls_files

pytestmark = pytest.mark.anyio
DATA = random.Random(5).randbytes(300_000)
SPANS = [(0, 10), (1000, 10), (200_000, 5000)]


def _want(spans: list[tuple[int, int]]) -> list[bytes]:
    return [DATA[o : o + s] for o, s in spans]


def _ranges_sent(server: Mimic) -> list[str]:
    return [s["headers"].get("Range", "") for s in server.seen if "/blobs/" in s["path"]]


@pytest.mark.parametrize("answer", ["first_range_only", "416"])
async def test_a_multi_range_request_not_answered_as_such_falls_back_to_single_ranges(
    answer: str,
) -> None:
    """S3 (behind a registry's redirect, or an S3-like server) may answer
    ``Range: bytes=0-9,1000-1009`` with a single-part 206 of the first range only, others
    refuse several ranges with 416: the spans left out are asked one at a time, the server
    is remembered as one to ask that way, and every byte is the blob's."""

    def policy(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        if "/blobs/" not in path or h.command != "GET" or "," not in h.headers.get("Range", ""):
            return False
        if answer == "416":
            send(h, 416, b"", content_range=f"bytes */{len(DATA)}")
        else:
            serve_bytes(h, DATA, first_only=True)
        return True

    with Mimic(policy) as reg:
        digest = reg.add_blob(DATA)
        ref = f"{reg.host}/unlike/multi:v1"
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            assert await c.read_ranges(ref, digest, SPANS) == _want(SPANS)
            assert c.stats.retries == 0
            sent = _ranges_sent(reg)
            assert len(sent) == 1 + (3 if answer == "416" else 2), sent
            more = [(50_000, 100), (60_000, 100)]
            assert await c.read_ranges(ref, digest, more) == _want(more)
            # Remembered: single ranges only from then on.
            assert all("," not in r for r in _ranges_sent(reg)[len(sent) :])


@pytest.mark.parametrize("expires_in", [60, None])
async def test_a_token_the_registry_calls_expired_is_fetched_afresh(expires_in) -> None:
    """The token service (on another host) says a token lasts 60 s (or says nothing: 60 s by
    the spec), the registry refuses it after 1 s with distribution's challenge
    ``error="invalid_token"``: the next read gets a new token, not an AuthenticationError."""
    issued: dict[str, float] = {}

    def token_service(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        token = f"t{len(issued)}"
        issued[token] = time.monotonic()
        answer = {"token": token} | ({} if expires_in is None else {"expires_in": expires_in})
        send(h, 200, json.dumps(answer).encode(), content_type="application/json")
        return True

    with Mimic(token_service, bind="127.0.0.2") as tokens:

        def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            challenge = (
                f'Bearer realm="http://{tokens.host}/token",service="mimic",'
                'scope="repository:unlike/token:pull"'
            )
            token = h.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in issued:
                send(h, 401, b"", www_authenticate=challenge)
            elif time.monotonic() - issued[token] > 1.0:
                body = b'{"errors":[{"code":"UNAUTHORIZED","message":"token expired"}]}'
                send(h, 401, body, www_authenticate=challenge + ',error="invalid_token"')
            else:
                return False
            return True

        with Mimic(registry) as reg:
            digest = reg.add_blob(DATA)
            ref = f"{reg.host}/unlike/token:v1"
            async with RegistryClient(timeout=5, backoff=0.01) as c:
                for i in range(3):
                    if i:
                        await anyio.sleep(1.2)
                    assert await c.read_range(ref, digest, 7, 70) == DATA[7:77]
                assert c.tokens.fetches == 3


async def test_closing_the_client_closes_its_kept_alive_connections() -> None:
    """Range connections kept alive after an error answer (a 404) are closed with the client,
    not when the garbage collector gets to them: the exception a caller keeps holds the
    urllib3 pool they sit in."""
    with Mimic() as reg:
        digest = reg.add_blob(DATA)
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            assert await c.read_range(f"{reg.host}/unlike/ok:v1", digest, 0, 10) == DATA[:10]
            with pytest.raises(NotFoundError) as kept:
                await c.read_range(f"{reg.host}/unlike/ok:v1", "sha256:" + "0" * 64, 0, 10)
            assert reg.open_connections >= 1
        with anyio.fail_after(5):
            while reg.open_connections:
                await anyio.sleep(0.01)
        assert kept.value.status == 404


EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><RequestId>X</RequestId></Error>"
)


@pytest.mark.parametrize("refused", ["first", "all"])
async def test_a_signed_url_the_storage_host_refuses_is_asked_of_the_registry_again(
    refused: str,
) -> None:
    """Blob GETs are redirected (307) to a storage host with a signed query; the storage host
    answers 403 with S3's XML error for an expired signature. Once: the registry is asked
    again for a new URL, and the bytes arrive. Every time: an error that names the storage
    host and what it said, after the client's retries — not "access denied" laid on the
    registry's credentials."""
    with Mimic(bind="127.0.0.2") as storage:
        digest = storage.add_blob(DATA)
        issued = []

        def storage_policy(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            if refused == "all" or h.path.endswith("sig=1"):
                send(h, 403, EXPIRED, content_type="application/xml")
                return True
            return False

        storage.policy = storage_policy

        def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            if "/blobs/" not in path or h.command != "GET":
                return False
            issued.append(h.path)
            location = f"http://{storage.host}{path}?X-Amz-Expires=1&sig={len(issued)}"
            send(h, 307, location=location)
            return True

        with Mimic(registry) as reg:
            ref = f"{reg.host}/unlike/signed:v1"
            async with RegistryClient(timeout=5, retries=2, backoff=0.01) as c:
                if refused == "first":
                    assert await c.read_range(ref, digest, 100, 50) == DATA[100:150]
                    assert len(issued) == 2
                    return
                with pytest.raises(RegistryUnavailable) as exc:
                    await c.read_range(ref, digest, 100, 50)
            assert len(issued) == 3  # the first try and two retries
    message = str(exc.value)
    assert message.startswith(f"{reg.host}/unlike/signed@{digest}: refused: HTTP 403 "), message
    assert f"(AccessDenied: Request has expired) from {storage.host}, where" in message, message


def _redirecting(storage: Mimic, issued: list[str]):  # type: ignore[no-untyped-def]
    """A registry policy: every blob GET is a 307 to ``storage`` with a new signature."""

    def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        if "/blobs/" not in path or h.command != "GET":
            return False
        issued.append(h.path)
        send(h, 307, location=f"http://{storage.host}{path}?sig={len(issued)}")
        return True

    return registry


def _after_first_use(storage: Mimic, answer) -> list[int]:  # type: ignore[no-untyped-def]
    """Make ``storage`` answer with ``answer(h, path)`` every use of the first signature
    (``sig=1``) after its first; the returned list holds the count of its uses."""
    uses = [0]

    def storage_policy(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        if not h.path.endswith("sig=1"):
            return False
        uses[0] += 1
        if uses[0] == 1:
            return False
        answer(h, path)
        return True

    storage.policy = storage_policy
    return uses


@pytest.mark.parametrize("ttl", [60.0, 0.0])
async def test_reads_of_a_redirected_blob_go_straight_to_where_it_was_redirected(
    ttl: float,
) -> None:
    """A registry in front of a CDN or object store redirects every blob GET: once it did,
    the client reads that blob from the location it gave, one request per read instead of
    two, for ``redirect_ttl`` seconds (0: the registry is asked every time, the Go store's
    ``check_always``)."""
    with Mimic(bind="127.0.0.2") as storage:
        digest = storage.add_blob(DATA)
        issued: list[str] = []
        with Mimic(_redirecting(storage, issued)) as reg:
            ref = f"{reg.host}/unlike/cdn:v1"
            async with RegistryClient(timeout=5, backoff=0.01, redirect_ttl=ttl) as c:
                for offset, size in SPANS:
                    assert (
                        await c.read_range(ref, digest, offset, size) == _want([(offset, size)])[0]
                    )
                assert c.stats.retries == 0
                reused = c.stats.redirects_reused
    stored = [s["path"] for s in storage.seen if "/blobs/" in s["path"]]
    assert len(stored) == 3
    if ttl:
        assert len(issued) == 1 and reused == 2
        assert all(p.endswith("?sig=1") for p in stored), stored
    else:
        assert len(issued) == 3 and reused == 0


async def test_a_read_cancelled_at_a_kept_location_keeps_it() -> None:
    """A read given up by its caller (a dropped prefetch, a deadline) while the storage host
    answers says nothing against the location: the next read still goes straight there."""
    with Mimic(bind="127.0.0.2") as storage:
        digest = storage.add_blob(DATA)
        issued: list[str] = []
        slow = {"next": False}

        def storage_policy(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            if slow["next"]:
                slow["next"] = False
                time.sleep(1.0)  # the client has given up by then
            return False

        storage.policy = storage_policy
        with Mimic(_redirecting(storage, issued)) as reg:
            ref = f"{reg.host}/unlike/cancelled:v1"
            async with RegistryClient(timeout=5, backoff=0.01) as c:
                assert await c.read_range(ref, digest, 0, 10) == DATA[:10]
                slow["next"] = True
                with anyio.move_on_after(0.2):
                    await c.read_range(ref, digest, 10, 10)
                assert await c.read_range(ref, digest, 20, 10) == DATA[20:30]
    assert len(issued) == 1, issued


async def test_a_kept_location_that_is_refused_or_gone_stale_is_asked_of_the_registry() -> None:
    """The storage host refuses the signature the client kept (S3's 403 "Request has
    expired"): that read goes to the registry at once for a new location, with no retry
    spent and no error; a location older than ``redirect_ttl`` is not used at all."""
    with Mimic(bind="127.0.0.2") as storage:
        digest = storage.add_blob(DATA)
        issued: list[str] = []
        _after_first_use(
            storage, lambda h, path: send(h, 403, EXPIRED, content_type="application/xml")
        )  # the first signature expired after its first use
        with Mimic(_redirecting(storage, issued)) as reg:
            ref = f"{reg.host}/unlike/expiring:v1"
            async with RegistryClient(timeout=5, backoff=0.01, redirect_ttl=0.5) as c:
                assert await c.read_range(ref, digest, 0, 10) == DATA[:10]
                assert await c.read_range(ref, digest, 10, 10) == DATA[10:20]  # refused, anew
                assert len(issued) == 2 and c.stats.retries == 0
                assert await c.read_range(ref, digest, 20, 10) == DATA[20:30]  # sig=2 kept
                assert len(issued) == 2
                await anyio.sleep(0.6)
                assert await c.read_range(ref, digest, 30, 10) == DATA[30:40]
                assert len(issued) == 3  # stale: the registry was asked


async def test_a_kept_location_that_redirects_elsewhere_is_replaced_by_where_it_went() -> None:
    """The storage host moves the object the client kept a location of (a 307 to another
    host): that read follows it, and the next reads go straight to the new location. Before,
    each read went to the kept location and was redirected again, two requests instead of
    one, until the kept location went stale."""
    with Mimic(bind="127.0.0.3") as moved, Mimic(bind="127.0.0.2") as storage:
        digest = storage.add_blob(DATA)
        moved.add_blob(DATA)
        issued: list[str] = []
        first_signature_uses = _after_first_use(
            storage, lambda h, path: send(h, 307, location=f"http://{moved.host}{path}?moved=1")
        )  # the object moved after the first signature's first use
        with Mimic(_redirecting(storage, issued)) as reg:
            ref = f"{reg.host}/unlike/moving:v1"
            async with RegistryClient(timeout=5, backoff=0.01) as c:
                for offset in (0, 10, 20, 30):
                    assert await c.read_range(ref, digest, offset, 10) == DATA[offset:][:10]
    assert len(issued) == 1, issued
    assert first_signature_uses == [2]  # the second read was redirected; the others were not
    assert [s["path"] for s in moved.seen if "/blobs/" in s["path"]] == [
        f"/v2/unlike/moving/blobs/{digest}?moved=1"
    ] * 3


async def test_a_manifest_of_a_repository_named_blobs_is_not_read_from_a_kept_location() -> None:
    """Only a blob GET's location is kept: a repository may be named ``…/blobs`` (its
    manifest's path has ``/blobs/`` in it too), and a tag its registry redirected to one
    manifest may name another a moment later. Before, the second read of the tag went
    straight to where the first was redirected: the manifest the tag no longer named."""

    def manifest(n: int) -> bytes:
        config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": n}
        config["digest"] = f"sha256:{n:064x}"
        media = "application/vnd.oci.image.manifest.v1+json"
        return json.dumps(
            {"schemaVersion": 2, "mediaType": media, "config": config, "layers": []}
        ).encode()

    tagged = ["1"]
    with Mimic(bind="127.0.0.2") as storage:
        for n in (1, 2):
            storage.manifests[f"org/blobs:{n}"] = (
                manifest(n),
                "application/vnd.oci.image.manifest.v1+json",
            )

        def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            if path != "/v2/org/blobs/manifests/latest":
                return False
            send(h, 307, location=f"http://{storage.host}/v2/org/blobs/manifests/{tagged[0]}")
            return True

        with Mimic(registry) as reg:
            ref = f"{reg.host}/org/blobs:latest"
            async with RegistryClient(timeout=5, backoff=0.01) as c:
                assert (await c.get_index(ref)).raw == manifest(1)
                tagged[0] = "2"  # the tag moved
                assert (await c.get_index(ref)).raw == manifest(2)
                assert c.stats.redirects_reused == 0


@pytest.mark.parametrize("storage", ["refused", "silent"])
async def test_a_storage_host_that_fails_is_named_not_the_registry(storage: str) -> None:
    """The registry answers, the host it redirects blob GETs to refuses connections or never
    answers: the error says so, naming that host (the registry is fine)."""
    listener = socket.create_server(("127.0.0.2", 0))
    where = f"127.0.0.2:{listener.getsockname()[1]}"
    if storage == "refused":
        listener.close()

    def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        if "/blobs/" not in path:
            return False
        send(h, 307, location=f"http://{where}{path}?sig=1")
        return True

    try:
        with Mimic(registry) as reg:
            digest = reg.add_blob(DATA)
            async with RegistryClient(timeout=1, retries=1, backoff=0.01) as c:
                with pytest.raises(RegistryUnavailable) as exc:
                    await c.read_range(f"{reg.host}/unlike/gone:v1", digest, 0, 10)
    finally:
        listener.close()
    message = str(exc.value)
    what = "cannot connect to" if storage == "refused" else "no answer from"
    assert f"{what} http://{where}, where the registry redirected" in message, message
    assert message.startswith(f"{reg.host}/unlike/gone@{digest}: "), message


BASIC = "Basic " + base64.b64encode(b"alice:wonderland").decode()


def _both_schemes(tmp_path):  # type: ignore[no-untyped-def]
    """A CA file and the server TLS context of a mimic speaking HTTPS and plain HTTP on one
    port."""
    tls_files = make_tls_files(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tls_files.cert, tls_files.key)
    return tls_files.ca, server_tls


async def _read_as_alice(reg, scheme: str, ca, digest: str) -> bytes:  # type: ignore[no-untyped-def]
    """Bytes 3-33 of ``digest`` read with alice's credentials from ``reg`` over ``scheme``."""
    resolver = parse_resolver_config(
        {"host": {reg.host: {"mirrors": [{"host": f"{scheme}://{reg.host}"}]}}}
    )
    async with RegistryClient(
        resolver=resolver,
        credentials={reg.host: Credentials("alice", "wonderland")},
        verify=str(ca),
        timeout=5,
    ) as c:
        return await c.read_range(f"{reg.host}/unlike/{scheme}:v1", digest, 3, 30)


async def test_credentials_do_not_follow_a_redirect_from_https_to_plain_http(tmp_path) -> None:
    """A registry on HTTPS redirects a blob GET to ``http://`` on the same host and port
    (one port speaking both here): the Authorization it took over TLS is not sent in clear
    text (an upgrade from http:// to https:// keeps it)."""
    ca, server_tls = _both_schemes(tmp_path)

    def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        over_tls = isinstance(h.connection, ssl.SSLSocket)
        if not over_tls:
            return False  # the plain-HTTP side serves the blob, to anyone
        if h.headers.get("Authorization") != BASIC:
            send(h, 401, www_authenticate='Basic realm="mimic"')
        elif "/blobs/" in path:
            send(h, 307, location=f"http://{reg.host}{path}")
        else:
            return False
        return True

    with Mimic(registry, tls=server_tls) as reg:
        digest = reg.add_blob(DATA)
        assert await _read_as_alice(reg, "https", ca, digest) == DATA[3:33]
    plain = [s for s in reg.seen if "/blobs/" in s["path"]][-1]
    assert "Authorization" not in plain["headers"], plain


async def test_credentials_follow_a_redirect_from_plain_http_up_to_https(tmp_path) -> None:
    """The other way round: a plain-HTTP registry sends the blob GET to ``https://`` on the
    same host and port, whose side asks for the credentials too: they go along (the
    Authorization only gains TLS), where a rule of same scheme, host and port dropped them
    and the read failed on the 401."""
    ca, server_tls = _both_schemes(tmp_path)

    def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        if h.headers.get("Authorization") != BASIC:
            send(h, 401, www_authenticate='Basic realm="mimic"')
        elif "/blobs/" in path and not isinstance(h.connection, ssl.SSLSocket):
            send(h, 307, location=f"https://{reg.host}{path}")
        else:
            return False
        return True

    with Mimic(registry, tls=server_tls) as reg:
        digest = reg.add_blob(DATA)
        assert await _read_as_alice(reg, "http", ca, digest) == DATA[3:33]


@pytest.mark.parametrize("status", [503, 429])
async def test_a_token_server_busy_for_a_moment_is_asked_again(status: int) -> None:
    """The registry calls the token expired mid-pull (distribution's ``invalid_token``) and
    the token server (another host) answers its next request with a 503 or a 429 with
    ``Retry-After``: the read asks it again after that wait, as it would the registry, and
    gets its bytes. Before, the one busy answer failed the read at once (an
    AuthenticationError "answered HTTP 503", never retried: EIO for the file being read),
    where the Go store's retrying HTTP client asks again."""
    issued: dict[str, float] = {}
    busy = {"left": 0, "at": []}

    def token_service(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        if busy["left"]:
            busy["left"] -= 1
            busy["at"].append(time.monotonic())
            send(h, status, b"busy", retry_after="1")
            return True
        token = f"t{len(issued)}"
        issued[token] = time.monotonic()
        send(h, 200, json.dumps({"token": token, "expires_in": 60}).encode())
        return True

    with Mimic(token_service, bind="127.0.0.2") as tokens:

        def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            challenge = f'Bearer realm="http://{tokens.host}/token",service="mimic"'
            token = h.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in issued or time.monotonic() - issued[token] > 0.5:
                send(h, 401, b"", www_authenticate=challenge + ',error="invalid_token"')
                return True
            return False

        with Mimic(registry) as reg:
            digest = reg.add_blob(DATA)
            ref = f"{reg.host}/unlike/busy-token:v1"
            async with RegistryClient(timeout=5, retries=2, backoff=0.01) as c:
                assert await c.read_range(ref, digest, 0, 10) == DATA[:10]
                await anyio.sleep(0.6)  # the registry now calls that token expired
                busy["left"] = 1
                start = time.monotonic()
                assert await c.read_range(ref, digest, 10, 10) == DATA[10:20]
                waited = time.monotonic() - start
            assert c.stats.retries == 1 and busy["left"] == 0
            assert 0.9 <= waited < 5, waited  # as Retry-After said
            assert len(issued) == 2


def _whole_chunked(h) -> None:  # type: ignore[no-untyped-def]
    """The whole blob, 200, chunked: no Content-Length tells its size before the body."""
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    for i in range(0, len(DATA), 65536):
        piece = DATA[i : i + 65536]
        h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    h.wfile.write(b"0\r\n\r\n")


@pytest.mark.parametrize("answer", ["200", "200-chunked", "wrong-range"])
async def test_a_storage_host_answering_other_bytes_than_asked_is_the_one_named(
    answer: str,
) -> None:
    """The registry redirects blob GETs, Range and all, to a storage host (a CDN) that ignores
    Range (the whole blob, 200, with or without a Content-Length) or answers other bytes:
    the error names that host as the one doing so, as a failure to reach it does. Before, a
    200 read "registry <the registry> ignores Range requests" — the registry, which answered
    as it should — and a wrong range named no host at all; a chunked 200 read "longer than
    the 100 bytes expected", not that Range was ignored."""
    with Mimic(bind="127.0.0.2") as storage:

        def storage_policy(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            if answer == "200":
                send(h, 200, DATA)
            elif answer == "200-chunked":
                _whole_chunked(h)
            else:
                send(h, 206, DATA[5000:5100], content_range=f"bytes 5000-5099/{len(DATA)}")
            return True

        storage.policy = storage_policy
        with Mimic(_redirecting(storage, [])) as reg:
            digest = reg.add_blob(DATA)
            async with RegistryClient(timeout=5, retries=1, backoff=0.01) as c:
                with pytest.raises(RangeError) as exc:
                    await c.read_range(f"{reg.host}/unlike/cdn-range:v1", digest, 0, 100)
    message = str(exc.value)
    assert message.startswith(f"{reg.host}/unlike/cdn-range@{digest}: "), message
    if answer == "wrong-range":
        assert message.endswith(f"(from {storage.host}, where the registry redirected)"), message
        return
    assert isinstance(exc.value, RangeNotHonoured)
    assert f"storage host {storage.host}, where the registry redirected, ignores Range " in (
        message
    ), message
    assert f"registry {reg.host}" not in message, message


@pytest.mark.parametrize("head", ["405", "501", "no-length"])
async def test_a_blob_size_a_head_does_not_tell_is_read_from_a_one_byte_get(head: str) -> None:
    """A registry (or the storage host it redirects to) that refuses HEAD on blobs, or
    answers it without a Content-Length: the size comes from a ``GET`` of the first byte
    (its ``Content-Range`` total), as the Go stargz-snapshotter asks; a blob that is not
    there is still "not found" (a push's existence check). Before, the size was an
    "unexpected HTTP 405" (or "HEAD without Content-Length") and a push failed on it."""

    def policy(h, path: str) -> bool:  # type: ignore[no-untyped-def]
        if h.command != "HEAD" or "/blobs/" not in path:
            return False
        if head == "no-length":
            h.send_response(200)
            h.end_headers()
            h.close_connection = True
        else:
            send(h, int(head), b"")
        return True

    with Mimic(policy) as reg:
        digest = reg.add_blob(DATA)
        ref = f"{reg.host}/unlike/head:v1"
        async with RegistryClient(timeout=5, backoff=0.01) as c:
            assert await c.blob_size(ref, digest) == len(DATA)
            assert await c.blob_exists(ref, "sha256:" + "0" * 64) is False
            assert await RegistryBlobSource(c, ref, digest).read_at(299_990, 100) == DATA[-10:]
    gets = [s for s in reg.seen if s["method"] == "GET" and s["path"].endswith(digest)]
    assert gets[0]["headers"].get("Range") == "bytes=0-0", gets


@pytest.mark.parametrize("moved", ["path", "other-host", "refresh-token", "loop"])
async def test_a_token_realm_that_redirects_is_followed(moved: str) -> None:
    """The registry's challenge names a realm that answers with a redirect (a token service
    moved to a new path or host, ``http://`` sent up to ``https://``): the token request
    follows it, as Go's http.Client does for containers/image and containerd, and the read
    gets its bytes. Before, the 301 was an AuthenticationError ("answered HTTP 301"). The
    user's Basic credentials go along on the realm's own host only; a refresh token's form
    is posted again after a 307; a redirect loop ends after a few hops with an error."""
    token_requests: list[dict] = []
    with Mimic(bind="127.0.0.3") as elsewhere, Mimic(bind="127.0.0.2") as tokens:

        def token_service(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            length = int(h.headers.get("Content-Length") or 0)
            form = h.rfile.read(length).decode() if length else ""
            token_requests.append(
                {"path": h.path, "method": h.command, "form": form}
                | {"auth": h.headers.get("Authorization")}
            )
            if path == "/old" or moved == "loop":
                target = elsewhere.host if moved == "other-host" else tokens.host
                query = h.path.partition("?")[2]
                status = 307 if moved == "refresh-token" else 301
                send(h, status, location=f"http://{target}/token?{query}")
            else:
                send(h, 200, json.dumps({"token": "good"}).encode())
            return True

        tokens.policy = elsewhere.policy = token_service

        def registry(h, path: str) -> bool:  # type: ignore[no-untyped-def]
            if h.headers.get("Authorization") != "Bearer good":
                realm = f"http://{tokens.host}/old"
                send(h, 401, www_authenticate=f'Bearer realm="{realm}",service="mimic"')
                return True
            return False

        with Mimic(registry) as reg:
            digest = reg.add_blob(DATA)
            creds = (
                Credentials("alice", "", identity_token="refresh-me")
                if moved == "refresh-token"
                else Credentials("alice", "wonderland")
            )
            async with RegistryClient(timeout=5, credentials={reg.host: creds}) as c:
                read = c.read_range(f"{reg.host}/unlike/realm:v1", digest, 0, 10)
                if moved == "loop":
                    with pytest.raises(AuthenticationError, match="answered HTTP 301"):
                        await read
                    assert len(token_requests) == 6  # the first and five redirects
                    return
                assert await read == DATA[:10]
    first, last = token_requests[0], token_requests[-1]
    assert len(token_requests) == 2 and last["path"].startswith("/token"), token_requests
    if moved == "refresh-token":
        assert last["method"] == "POST" and "refresh_token=refresh-me" in last["form"], last
    elif moved == "other-host":
        assert first["auth"] == BASIC and last["auth"] is None, token_requests
    else:
        assert first["auth"] == last["auth"] == BASIC, token_requests
