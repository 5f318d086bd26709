"""Per-host TLS settings from certs.d directories, as podman's containers/image reads them:
``*.crt`` CAs trusted beside the system's, ``NAME.cert`` + ``NAME.key`` a client certificate.

The end-to-end tests serve docker-registry over HTTPS with a throwaway CA that only a certs.d
directory names (and, for one, demanding a client certificate of another CA)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.processes import free_port
from harness.registry_server import RegistryServer
from store.registry import RegistryClient, parse_resolver_config
from store.registry.errors import ConfigError, RegistryUnavailable
from store.registry.hosts import default_certs_roots, read_certs_dir
from store.registry.rangetransport import SSL_CONTEXT
from store.registry.registriesconf import merge, parse_text
from tests.tls import TlsFiles, make_tls_files

pytestmark = [pytest.mark.timeout(120)]

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


# ---- the lookup rule (pure) --------------------------------------------------------------
def test_first_existing_directory_is_the_hosts(tmp_path: Path) -> None:
    """containers/image's dockerCertDir: roots in order, the first with a HOST:PORT directory
    wins (even if empty); no directory at all means the system's CAs alone."""
    roots = [tmp_path / "home", tmp_path / "etc-containers", tmp_path / "etc-docker"]
    host = "reg.example:5000"
    none = read_certs_dir(host, roots)
    assert none.directory is None and none.ca_files == () and none.client_cert is None
    assert none.searched == tuple(r / host for r in roots)
    assert str(roots[2] / host) in none.describe()

    (roots[2] / host).mkdir(parents=True)
    (roots[2] / host / "ca.crt").write_text("x")
    (roots[2] / host / "client.cert").write_text("x")
    (roots[2] / host / "client.key").write_text("x")
    (roots[2] / host / "notes.txt").write_text("x")
    (roots[1] / host).mkdir(parents=True)  # empty, yet first: it decides
    assert read_certs_dir(host, roots).directory == roots[1] / host
    assert read_certs_dir(host, roots).ca_files == ()

    shutil.rmtree(roots[1])
    got = read_certs_dir(host, roots)
    assert got.directory == roots[2] / host
    assert got.ca_files == (roots[2] / host / "ca.crt",)
    assert got.client_cert == (roots[2] / host / "client.cert", roots[2] / host / "client.key")
    assert read_certs_dir("other:5000", roots).directory is None


def test_default_roots_are_containers_image_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    assert default_certs_roots() == (
        Path("/home/u/.config/containers/certs.d"),
        Path("/etc/containers/certs.d"),
        Path("/etc/docker/certs.d"),
    )


@pytest.mark.anyio
async def test_docker_hub_reads_the_docker_io_directory(tmp_path: Path) -> None:
    """containers/image names Docker Hub's certs.d directory as users write the registry,
    ``docker.io`` (newDockerClient's ``hostName``), not by the host it connects to
    (``registry-1.docker.io``): a client certificate there is shown to Docker Hub."""
    client = make_tls_files(tmp_path / "client", client=True)
    hub = tmp_path / "certs.d" / "docker.io"
    hub.mkdir(parents=True)
    shutil.copy(client.cert, hub / "client.cert")
    shutil.copy(client.key, hub / "client.key")
    async with RegistryClient(certs_roots=[tmp_path / "certs.d"]) as c:
        (ep,) = c.resolver.endpoints("docker.io")
        assert ep.host == "registry-1.docker.io" and ep.certs_host == "docker.io"
        assert c._tls_extensions(ep, ep.base_url)[SSL_CONTEXT] is not c._tls_extensions(
            c.resolver.endpoints("quay.io")[0], "https://quay.io"
        ).get(SSL_CONTEXT)
        assert f"certs.d directory for docker.io: {hub} (no *.crt file; client.cert)" in (
            c._tls_note(ep)
        )


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["client.cert"], r"missing key client\.key for client certificate client\.cert"),
        (["client.key"], r"missing client certificate client\.cert for key client\.key"),
        (["ca.crt", "a.cert", "b.key"], r"missing key a\.key"),
    ],
)
def test_half_a_key_pair_is_an_error_naming_the_directory(
    tmp_path: Path, names: list[str], message: str
) -> None:
    d = tmp_path / "certs.d" / "h:1"
    d.mkdir(parents=True)
    for n in names:
        (d / n).write_text("x")
    with pytest.raises(ConfigError, match=message) as info:
        read_certs_dir("h:1", [tmp_path / "certs.d"])
    assert str(d) in str(info.value)


def test_unusable_client_key_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """A key that does not match, or is not PEM, fails with the file named (and never asks
    for a password on the terminal)."""
    a = make_tls_files(tmp_path / "a", client=True)
    b = make_tls_files(tmp_path / "b", client=True)
    d = tmp_path / "certs.d" / "h:1"
    d.mkdir(parents=True)
    shutil.copy(a.cert, d / "client.cert")
    shutil.copy(b.key, d / "client.key")
    with pytest.raises(ConfigError, match=r"client\.cert with client\.key: not a usable"):
        read_certs_dir("h:1", [tmp_path / "certs.d"]).context()


# ---- against a real TLS registry ---------------------------------------------------------
def _wait_listening(reg: RegistryServer, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", reg.port or 0), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _client(reg: RegistryServer, **kw: object) -> RegistryClient:
    """A client reaching the loopback registry over HTTPS (loopback defaults to HTTP)."""
    cfg = parse_resolver_config(
        {"resolver": {"host": {reg.host: {"mirrors": [{"host": f"https://{reg.host}"}]}}}}
    )
    return RegistryClient(resolver=cfg, timeout=10, retries=0, **kw)  # type: ignore[arg-type]


async def _push(reg: RegistryServer, tls_ca: Path, data: bytes) -> tuple[str, str]:
    ref = f"{reg.host}/certs/app:v1"
    async with _client(reg, verify=str(tls_ca)) as c:
        m = await c.push_image(ref, CONFIG, [(data, LAYER)])
    return ref, m.layers[0].digest


@pytest.mark.e2e
@pytest.mark.anyio
async def test_ca_only_certs_d_knows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's CA is in ``~/.config/containers/certs.d/HOST:PORT/ca.crt`` only (not in
    the system's trust): manifests and ranged blob reads succeed. Without it, or with another
    CA there, the error names the host and the directories searched."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    tls = make_tls_files(tmp_path / "tls")
    data = random.Random(3).randbytes(100_000)
    with RegistryServer(tls_cert=tls.cert, tls_key=tls.key) as reg:
        ref, digest = await _push(reg, tls.ca, data)
        home_dir = tmp_path / "home/.config/containers/certs.d" / reg.host

        async with _client(reg) as c:  # no certs.d directory at all
            with pytest.raises(RegistryUnavailable) as info:
                await c.get_manifest(ref)
        msg = str(info.value)
        assert "CERTIFICATE_VERIFY_FAILED" in msg and reg.host in msg
        assert str(home_dir) in msg and "/etc/containers/certs.d/" in msg, msg

        home_dir.mkdir(parents=True)
        shutil.copy(tls.ca, home_dir / "ca.crt")
        async with _client(reg) as c:
            assert (await c.get_manifest(ref)).layers[0].digest == digest
            assert await c.read_ranges(ref, digest, [(10, 20), (5000, 7)]) == [
                data[10:30],
                data[5000:5007],
            ]
            assert await c.get_blob(ref, digest) == data

        other = make_tls_files(tmp_path / "other")
        shutil.copy(other.ca, home_dir / "ca.crt")
        async with _client(reg) as c:
            with pytest.raises(RegistryUnavailable) as info:
                await c.read_ranges(ref, digest, [(0, 10)])
        msg = str(info.value)
        assert "CERTIFICATE_VERIFY_FAILED" in msg
        assert f"certs.d directory for {reg.host}: {home_dir} (ca.crt;" in msg, msg


@contextlib.contextmanager
def _demanding_client_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[RegistryServer, TlsFiles, Path]]:
    """An HTTPS registry that demands a client certificate (``clientcas``) signed by the CA
    of ``tmp_path/client``; its TLS files; its (empty) directory under ``tmp_path/certs.d``."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    tls = make_tls_files(tmp_path / "tls")
    client = make_tls_files(tmp_path / "client", client=True)
    # Readiness is probed on the plain-HTTP debug listener: the TLS one wants a certificate.
    debug = f"127.0.0.1:{free_port()}"
    extra = {"http": {"tls": {"clientcas": [str(client.ca)]}, "debug": {"addr": debug}}}
    with RegistryServer(
        tls_cert=tls.cert,
        tls_key=tls.key,
        extra_config=extra,
        ready_url=f"http://{debug}/debug/vars",
    ) as reg:
        _wait_listening(reg)
        d = tmp_path / "certs.d" / reg.host
        d.mkdir(parents=True)
        yield reg, tls, d


@pytest.mark.e2e
@pytest.mark.anyio
async def test_client_certificate_from_certs_d(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry that demands a client certificate (``clientcas``): refused without one,
    served with ``client.cert`` + ``client.key`` beside the CA in its certs.d directory."""
    roots = [tmp_path / "certs.d"]
    data = random.Random(4).randbytes(50_000)
    with _demanding_client_certificates(tmp_path, monkeypatch) as (reg, tls, d):
        shutil.copy(tls.ca, d / "ca.crt")
        async with _client(reg, certs_roots=roots) as c:
            with pytest.raises(RegistryUnavailable) as info:
                await c.get_manifest(f"{reg.host}/certs/app:v1")
        msg = str(info.value)
        assert reg.host in msg and f"{d} (ca.crt; no client certificate)" in msg, msg

        shutil.copy(tmp_path / "client" / "cert.pem", d / "client.cert")
        shutil.copy(tmp_path / "client" / "key.pem", d / "client.key")
        async with _client(reg, certs_roots=roots) as c:
            m = await c.push_image(f"{reg.host}/certs/app:v1", CONFIG, [(data, LAYER)])
            digest = m.layers[0].digest
            assert await c.read_ranges(f"{reg.host}/certs/app:v1", digest, [(1, 3)]) == [data[1:4]]


@pytest.mark.e2e
@pytest.mark.anyio
async def test_an_insecure_registry_is_still_shown_its_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """registries.conf ``insecure = true`` skips the server certificate's check only: a
    registry that demands a client certificate gets the one of its certs.d directory, as
    containers/image shows it (the CA that signed the server's is nowhere)."""
    roots = [tmp_path / "certs.d"]
    data = random.Random(6).randbytes(30_000)
    with _demanding_client_certificates(tmp_path, monkeypatch) as (reg, tls, d):
        shutil.copy(tmp_path / "client" / "cert.pem", d / "client.cert")
        shutil.copy(tmp_path / "client" / "key.pem", d / "client.key")
        ref = f"{reg.host}/certs/insecure:v1"
        async with _client(reg, verify=str(tls.ca), certs_roots=roots) as c:
            digest = (await c.push_image(ref, CONFIG, [(data, LAYER)])).layers[0].digest
        text = f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n'
        conf = merge([parse_text(text.encode(), "r.conf")], ["r.conf"])
        resolver = dataclasses.replace(parse_resolver_config({}), registries_conf=lambda: conf)
        async with RegistryClient(resolver=resolver, certs_roots=roots, timeout=10, retries=0) as c:
            assert await c.read_ranges(ref, digest, [(7, 5)]) == [data[7:12]]


def _connections_to(port: int) -> int:
    """Established TCP connections from this host to ``port`` on 127.0.0.1."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        remote, state = line.split()[2:4]
        count += state == "01" and remote == f"0100007F:{port:04X}"
    return count


@pytest.mark.e2e
@pytest.mark.anyio
async def test_a_changed_certs_d_directory_closes_the_old_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time a host's certs.d directory changes (a CA or client certificate rotated) its
    requests get a new SSL context, with new connections: those of the old context are
    closed (a body being read through one first), not kept open for the client's life."""
    import store.registry.client as client_module

    monkeypatch.setattr(client_module, "TLS_RECHECK", 0.0)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    tls = make_tls_files(tmp_path / "tls")
    roots = [tmp_path / "certs.d"]
    data = random.Random(6).randbytes(3_000_000)
    with RegistryServer(tls_cert=tls.cert, tls_key=tls.key) as reg:
        d = roots[0] / reg.host
        d.mkdir(parents=True)
        shutil.copy(tls.ca, d / "ca.crt")
        async with _client(reg, certs_roots=roots) as c:
            ref = f"{reg.host}/certs/app:v1"
            digest = (await c.push_image(ref, CONFIG, [(data, LAYER)])).layers[0].digest
            ep = c.resolver.endpoints(reg.host)[0]
            blob_url = f"{ep.base_url}/v2/certs/app/blobs/{digest}"
            # A body being read while the directory changes under it is read to its end.
            async with c.http.stream(
                "GET", blob_url, extensions=c._tls_extensions(ep, blob_url)
            ) as streaming:
                chunks = streaming.aiter_raw(65536)
                body = [await chunks.__anext__()]
                for rotation in range(12):
                    (d / "ca.crt").write_bytes(tls.ca.read_bytes() + b"\n" * (rotation % 2 + 1))
                    await c.get_manifest(ref)
                    assert await c.read_ranges(ref, digest, [(rotation, 5), (10**6, 5)]) == [
                        data[rotation : rotation + 5],
                        data[10**6 : 10**6 + 5],
                    ]
                async for chunk in chunks:
                    body.append(chunk)
            assert b"".join(body) == data
            await c.get_manifest(ref)  # the streamed body's transport closes on the next
            # One context's connections at most (two transports: httpx's, urllib3's ranges).
            assert _connections_to(reg.port or 0) <= 4, _connections_to(reg.port or 0)
