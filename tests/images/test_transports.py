"""The containers-image transport syntax: parsing, registry hosts, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.images.transports import (
    TransportError,
    absolute,
    local_path,
    pull_reference,
    registry_host,
    split_transport,
)


@pytest.mark.parametrize(
    ("ref", "transport", "rest"),
    [
        ("docker://localhost:5000/app:1", "docker", "localhost:5000/app:1"),
        ("oci:/x/layout:tag", "oci", "/x/layout:tag"),
        ("oci-archive:img.tar", "oci-archive", "img.tar"),
        ("docker-archive:/a/b.tar:app:latest", "docker-archive", "/a/b.tar:app:latest"),
        ("containers-storage:[overlay@/g+/r]app", "containers-storage", "[overlay@/g+/r]app"),
        ("dir:/some/dir", "dir", "/some/dir"),
    ],
)
def test_split(ref: str, transport: str, rest: str) -> None:
    assert split_transport(ref) == (transport, rest)


@pytest.mark.parametrize("ref", ["app:latest", "docker:app", "docker://", "oci:", "ftp://x/y", ""])
def test_bad_references_name_the_syntax(ref: str) -> None:
    with pytest.raises(TransportError, match=r"TRANSPORT:REFERENCE|docker://HOST|nothing after"):
        split_transport(ref)


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("docker://localhost:5000/App:1", "repository name must be lowercase"),
        ("docker://UPPER", "repository name must be lowercase"),
        ("docker://localhost:5000/app:bad tag", "whitespace"),
        ("docker://localhost:5000/app@sha256:abc", "invalid digest"),
        ("docker://localhost:5000/a..b", "invalid path component"),
    ],
)
def test_a_registry_reference_outside_the_grammar_says_what_is_wrong(ref: str, why: str) -> None:
    with pytest.raises(TransportError, match=why):
        split_transport(ref)


def test_registry_host() -> None:
    assert registry_host("docker://127.0.0.1:5000/a/b:c") == "127.0.0.1:5000"
    assert registry_host("docker://localhost/app") == "localhost"
    assert registry_host("docker://library/busybox") == "docker.io"
    assert registry_host("docker://busybox") == "docker.io"
    assert registry_host("oci:/x") is None


def test_paths() -> None:
    assert local_path("oci:/x/layout:tag") == Path("/x/layout")
    assert local_path("dir:/x:y") == Path("/x:y")
    assert local_path("docker://h:1/a") is None
    base = Path("/srv/scenarios")
    assert absolute("docker-archive:img.tar", base) == "docker-archive:/srv/scenarios/img.tar"
    assert absolute("oci:lay:v1", base) == "oci:/srv/scenarios/lay:v1"
    assert absolute("oci:/abs:v1", base) == "oci:/abs:v1"
    assert absolute("docker://h:1/a", base) == "docker://h:1/a"


@pytest.mark.parametrize(
    ("ref", "pulled"),
    [
        ("docker://h:5000/app:1@sha256:" + "a" * 64, "docker://h:5000/app@sha256:" + "a" * 64),
        (
            "docker://[::1]:5000/a/b:t@sha256:" + "b" * 64,
            "docker://[::1]:5000/a/b@sha256:" + "b" * 64,
        ),
        ("docker://h:5000/app@sha256:" + "c" * 64, "docker://h:5000/app@sha256:" + "c" * 64),
        ("docker://h:5000/app:1", "docker://h:5000/app:1"),
        ("oci:/x/layout:tag", "oci:/x/layout:tag"),
    ],
)
def test_a_tag_beside_a_digest_is_dropped_as_podman_pulls_it(ref: str, pulled: str) -> None:
    assert pull_reference(ref) == pulled
