"""Reference normalization as containers tooling does it (docker/distribution grammar)."""

from __future__ import annotations

import pytest

from store.registry import Reference, ReferenceError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("python", "docker.io/library/python:latest"),
        ("python:3.11", "docker.io/library/python:3.11"),
        ("library/python", "docker.io/library/python:latest"),
        ("docker.io/python", "docker.io/library/python:latest"),
        ("index.docker.io/user/app:1", "docker.io/user/app:1"),
        ("user/app", "docker.io/user/app:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:v1", "localhost:5000/app:v1"),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t"),
        ("[::1]:5000/app", "[::1]:5000/app:latest"),
        ("quay.io/org/app", "quay.io/org/app:latest"),
        ("ghcr.io/o/a__b-c.d:x_Y.1-2", "ghcr.io/o/a__b-c.d:x_Y.1-2"),
        ("python@sha256:" + "a" * 64, "docker.io/library/python@sha256:" + "a" * 64),
        ("python:3@sha256:" + "b" * 64, "docker.io/library/python:3@sha256:" + "b" * 64),
    ],
)
def test_normalizes(text: str, expected: str) -> None:
    assert str(Reference.parse(text)) == expected


def test_parts_and_reference() -> None:
    r = Reference.parse("127.0.0.1:5000/x/y:tag@sha256:" + "c" * 64)
    assert (r.registry, r.repository, r.tag) == ("127.0.0.1:5000", "x/y", "tag")
    assert r.reference == r.digest == "sha256:" + "c" * 64
    assert r.name == "127.0.0.1:5000/x/y"
    assert Reference.parse("x").reference == "latest"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Python", "lowercase"),
        ("a b", "whitespace"),
        ("app:bad tag", "whitespace"),
        ("app:-bad", "invalid tag"),
        ("app@sha256:1234", "invalid digest"),
        ("app@sha256:" + "A" * 64, "64 lowercase hex"),
        ("app@notadigest", "invalid digest"),
        ("host:5000/", "invalid path component"),
        ("a//b", "invalid path component"),
        ("-a/b", "invalid path component"),
        ("a/" + "b" * 300, "longer than"),
    ],
)
def test_rejects(text: str, why: str) -> None:
    with pytest.raises(ReferenceError, match=why):
        Reference.parse(text)
