"""The mounted store against registries that need credentials or are reached through a mirror.

The registry client's own tests cover auth and mirrors request by request; these check that
the store process picks them up the way a user configures them: credentials from the auth
file podman uses (``REGISTRY_AUTH_FILE``; the Go store reads the same file as the docker
config, ``DOCKER_CONFIG/config.json``), mirrors from the Go store's
``[[resolver.host."ORIGIN".mirrors]]`` table.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import tomllib

import pytest

from harness.processes import free_port
from harness.registry_server import RegistryServer
from tests.store.images import full_blob_gets, push_two_layer_estargz

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason="no docker-registry"),
]


def _auth_file(path, host: str, user: str, password: str):
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def _use_auth_file(tmp_path, monkeypatch, auth) -> None:  # type: ignore[no-untyped-def]
    """``auth`` is the auth file of everyone here: podman's (REGISTRY_AUTH_FILE) and the
    docker config the Go store reads (DOCKER_CONFIG/config.json, a link to it)."""
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").symlink_to(auth)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
def test_lazy_pull_from_a_registry_that_needs_credentials(
    tmp_path,
    store_factory,
    layers,
    monkeypatch,
    podman_env,
):
    with RegistryServer(
        storage_dir=tmp_path / "reg", htpasswd_users={"alice": "s3cret"}
    ) as registry:
        host = registry.host
        # One auth file for all three, as a user would have it: our push, the store, podman.
        auth = _auth_file(tmp_path / "auth.json", host, "alice", "s3cret")
        _use_auth_file(tmp_path, monkeypatch, auth)
        ref, blobs = push_two_layer_estargz(host, "auth/img", layers)
        store = store_factory()
        mark = registry.log_mark()
        with podman_env(
            tmp_path / "podman",
            additional_layer_store=store.mnt,
            insecure_registries=[host],
            auth_file=tmp_path / "auth.json",  # a runtime node's podman has a clean environment
        ) as env:
            env.pull(ref, timeout=120)
            assert full_blob_gets(registry, mark, blobs) == []
            assert env.run(ref, "/bin/cat", "/etc/hello", timeout=120).stdout == (
                "hello from upper\n"
            )
        served = registry.access_log_since(mark)
        # The store's range reads were answered (podman reads no ranges), so it sent
        # credentials.
        layer_digests = {b.digest for b in blobs}
        ranges = [r for r in served if r.kind == "blobs" and r.status == 206]
        assert any(r.digest in layer_digests for r in ranges)


def test_a_login_after_the_store_started_is_used_at_the_next_lookup(
    tmp_path, store_factory, layers, monkeypatch
):
    """The store starts before the user logs in (a store started at boot): a lookup without
    credentials fails; once the auth file is written (as ``podman login`` writes it: a new
    file renamed over the place), the next lookup of the same layer reads it and succeeds."""
    with RegistryServer(
        storage_dir=tmp_path / "reg", htpasswd_users={"alice": "s3cret"}
    ) as registry:
        host = registry.host
        written = _auth_file(tmp_path / "written.json", host, "alice", "s3cret")
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(written))
        ref, blobs = push_two_layer_estargz(host, "auth/login", layers)
        auth = tmp_path / "auth.json"
        _use_auth_file(tmp_path, monkeypatch, auth)  # not there yet: no credentials
        store = store_factory()
        layer = store.layer_dir(ref, blobs[0].digest)
        with pytest.raises(OSError):
            os.listdir(layer / "diff")
        written.rename(auth)
        assert (layer / "diff" / "etc" / "hello").read_bytes() == b"hello from lower\n"


def test_store_reads_layers_through_a_mirror_when_the_origin_is_down(
    tmp_path,
    store_factory,
    layers,
    registry,
):
    origin = f"127.0.0.1:{free_port()}"  # nothing listens there
    mirror = registry.host
    _, blobs = push_two_layer_estargz(mirror, "mirrored/img", layers)
    store = store_factory(
        f'[[resolver.host."{origin}".mirrors]]\nhost = "{mirror}"\ninsecure = true\n'
    )
    ref = f"{origin}/mirrored/img:1"  # the name podman would look up: the origin's
    mark = registry.log_mark()
    layer = store.layer_dir(ref, blobs[1].digest)
    assert (layer / "diff" / "etc" / "hello").read_text() == "hello from upper\n"
    info = json.loads((layer / "info").read_text())
    assert info["diff-digest"] == blobs[1].diff_id
    served = registry.access_log_since(mark)
    assert any(r.status == 206 and r.digest == blobs[1].digest for r in served)
    assert full_blob_gets(registry, mark, blobs) == []


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
@pytest.mark.parametrize("auth", ["htpasswd", "token"])
@pytest.mark.store_ours_only(
    reason="the Go store v0.12 has no credentials socket for stargz-store-helper to hand "
    "podman's credentials to"
)
def test_credentials_reach_the_store_only_through_podmans_auth_helper(
    auth, tmp_path, store_factory, layers, monkeypatch, runtime_node, podman_env
):
    """podman ≥ 5.2 gives the pull's credentials to ``stargz-store-helper``, which hands them
    to the store's socket: the store has no auth file of its own and still reads lazily."""
    if runtime_node is None:
        pytest.skip("podman 4.3 has no additional-layer-store-auth-helper (podman >= 5.2)")
    from harness.registry_server import TokenAuthConfig
    from tests.registry.regtest_tokens import TokenServer, make_signing_cert

    # Nothing on this machine may give the store credentials but the helper.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    user, password = "alice", "wonderland"
    with contextlib.ExitStack() as stack:
        if auth == "htpasswd":
            registry = stack.enter_context(
                RegistryServer(storage_dir=tmp_path / "reg", htpasswd_users={user: password})
            )
        else:
            key, cert = make_signing_cert(tmp_path)
            tokens = stack.enter_context(
                TokenServer(key=key, issuer="t", service="reg", users={user: password})
            )
            registry = stack.enter_context(
                RegistryServer(
                    storage_dir=tmp_path / "reg",
                    token_auth=TokenAuthConfig(tokens.realm, "reg", "t", cert),
                )
            )
        host = registry.host
        podman_auth = _auth_file(tmp_path / "podman-auth.json", host, user, password)
        with monkeypatch.context() as m:  # our push only
            m.setenv("REGISTRY_AUTH_FILE", str(podman_auth))
            ref, blobs = push_two_layer_estargz(host, "auth/img", layers)
        store = store_factory()
        socket = store.workdir / "root" / "store.sock"
        assert socket.exists()
        mark = registry.log_mark()
        with podman_env(
            tmp_path / "podman",
            additional_layer_store=store.mnt,
            insecure_registries=[host],
            store_socket=socket,
            auth_file=podman_auth,
        ) as env:
            env.pull(ref, timeout=120)
            assert full_blob_gets(registry, mark, blobs) == []
            assert env.run(ref, "/bin/cat", "/etc/hello", timeout=120).stdout == (
                "hello from upper\n"
            )
            assert full_blob_gets(registry, mark, blobs) == []
        served = registry.access_log_since(mark)
        layer_digests = {b.digest for b in blobs}
        ours = [r for r in served if r.user_agent.startswith("lazybench") and r.kind == "blobs"]
        assert any(r.status == 206 and r.digest in layer_digests for r in ours)
        assert f"auth helper: credentials for {ref}" in store.log.read_text()


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
@pytest.mark.parametrize("helper", ["credHelpers", "credsStore"])
@pytest.mark.store_ours_only(
    reason="the Go store v0.12 reads no certs.d directory: it trusts the system's CAs only"
)
def test_lazy_pull_over_tls_known_to_certs_d_with_credentials_from_a_helper(
    helper, tmp_path, store_factory, layers, monkeypatch, runtime_node, podman_env
):
    """A registry over HTTPS whose CA only a certs.d directory names, demanding the client
    certificate that directory holds, with Bearer tokens from a token server over HTTPS (the
    same CA): the store reads every layer lazily with credentials that only a credential
    helper on its PATH knows (``credHelpers`` for the registry, or the ``credsStore`` behind
    docker's ``{}`` entry). On the host podman and the store read one certs.d directory
    (``~/.config/containers/certs.d``); a node's podman its own ``/etc/containers/certs.d``."""
    from harness.registry_server import TokenAuthConfig
    from store.registry import Credentials, parse_resolver_config
    from tests.registry.regtest_tokens import TokenServer, make_signing_cert
    from tests.tls import make_tls_files

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))  # the store's and the host podman's certs.d, auth
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    for name in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    server = make_tls_files(tmp_path / "tls")
    client = make_tls_files(tmp_path / "client", client=True)
    user, password = "alice", "wonderland"
    key, signing = make_signing_cert(tmp_path)
    debug = f"127.0.0.1:{free_port()}"  # readiness: the TLS listener wants a certificate
    with (
        TokenServer(
            key=key,
            issuer="t",
            service="reg",
            users={user: password},
            tls=(server.cert, server.key),
        ) as tokens,
        RegistryServer(
            storage_dir=tmp_path / "reg",
            token_auth=TokenAuthConfig(tokens.realm, "reg", "t", signing),
            tls_cert=server.cert,
            tls_key=server.key,
            extra_config={
                "http": {"tls": {"clientcas": [str(client.ca)]}, "debug": {"addr": debug}}
            },
            ready_url=f"http://{debug}/debug/vars",
        ) as registry,
    ):
        assert tokens.realm.startswith("https://")
        host = registry.host
        certs = home / ".config" / "containers" / "certs.d" / host
        certs.mkdir(parents=True)
        shutil.copy(server.ca, certs / "ca.crt")
        shutil.copy(client.cert, certs / "client.cert")
        shutil.copy(client.key, certs / "client.key")
        # A loopback registry is plain HTTP to the store unless a mirror entry says https.
        https = f'[[resolver.host."{host}".mirrors]]\nhost = "https://{host}"\n'

        ref, blobs = push_two_layer_estargz(
            host,
            "tls/img",
            layers,
            client={
                "resolver": parse_resolver_config(tomllib.loads(https)),
                "credentials": {host: Credentials(user, password)},
            },
        )
        # The store's only credentials: a helper on its PATH, named by docker's config.json.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        program = bin_dir / "docker-credential-lzb"
        answer = json.dumps({"ServerURL": host, "Username": user, "Secret": password})
        program.write_text(
            f'#!/bin/sh\n[ "$1" = get ] || exit 9\nread -r s\necho "$s" >> {bin_dir}/asked\n'
            f"echo '{answer}'\n"
        )
        program.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        config = (
            {"credHelpers": {host: "lzb"}}
            if helper == "credHelpers"
            else {"auths": {host: {}}, "credsStore": "lzb"}
        )
        (home / ".docker").mkdir()
        (home / ".docker" / "config.json").write_text(json.dumps(config))
        store = store_factory(https)
        podman_auth = _auth_file(tmp_path / "podman-auth.json", host, user, password)
        mark = registry.log_mark()
        with podman_env(
            tmp_path / "podman", additional_layer_store=store.mnt, auth_file=podman_auth
        ) as env:
            if runtime_node is not None:  # the node's podman: its own (throw-away) /etc
                shutil.copytree(certs, env.host_path(f"/etc/containers/certs.d/{host}"))
            env.pull(ref, timeout=120)
            assert set(store.status()["layers"]) == {f"{ref}/{b.digest}" for b in blobs}
            assert full_blob_gets(registry, mark, blobs) == []
            assert env.run(ref, "/bin/cat", "/etc/hello", timeout=120).stdout == (
                "hello from upper\n"
            )
        assert full_blob_gets(registry, mark, blobs) == []
        ours = [r for r in registry.access_log_since(mark) if r.user_agent.startswith("lazybench")]
        assert {r.digest for r in ours if r.status == 206} == {b.digest for b in blobs}
        assert (bin_dir / "asked").read_text().splitlines()[0] == host
        assert any(r["user"] == user for r in tokens.requests)
