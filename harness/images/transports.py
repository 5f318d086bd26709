"""Image references in the containers-image transport syntax (skopeo, podman, buildah).

``TRANSPORT:REFERENCE``, as ``containers-transports(5)`` defines it:

* ``docker://HOST/REPO[:TAG|@DIGEST]`` — a registry;
* ``oci:PATH[:REFERENCE]``, ``oci-archive:PATH[:REFERENCE]`` — an OCI layout directory / tar;
* ``docker-archive:PATH[:REFERENCE]`` — ``docker save`` / ``podman save`` output;
* ``containers-storage:[STORE-SPEC]REFERENCE`` — a containers/storage store;
* ``dir:PATH`` — skopeo's directory format.

Pure functions only (no I/O but path resolution): the scenario checker uses them before anything
starts, skopeo does the actual reading and writing.
"""

from __future__ import annotations

from pathlib import Path

from store.registry.errors import ReferenceError
from store.registry.reference import Reference

TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "containers-storage", "dir")
PATH_TRANSPORTS = frozenset({"oci", "oci-archive", "docker-archive", "dir"})


class TransportError(ValueError):
    """A reference is not in the transport syntax; the message says what was expected."""


def split_transport(ref: str) -> tuple[str, str]:
    """``"docker://host/repo:tag"`` → ``("docker", "host/repo:tag")``; raise TransportError."""
    transport, sep, rest = ref.partition(":")
    if not sep or transport not in TRANSPORTS:
        raise TransportError(
            f"{ref!r} is not TRANSPORT:REFERENCE (transports: "
            f"{', '.join(t + ':' for t in TRANSPORTS)}; e.g. docker-archive:image.tar, "
            "docker://localhost:5000/app:latest)"
        )
    if transport == "docker":
        if not rest.startswith("//") or len(rest) <= 2:
            raise TransportError(f"{ref!r}: a registry reference is docker://HOST/REPO[:TAG]")
        rest = rest[2:]
        try:  # the docker reference grammar (distribution's reference/regexp.go)
            Reference.parse(rest)
        except ReferenceError as exc:
            raise TransportError(f"{ref!r}: {exc}") from None
    elif not rest:
        raise TransportError(f"{ref!r}: nothing after {transport}:")
    return transport, rest


def pull_reference(ref: str) -> str:
    """``ref`` as skopeo reads it: a ``docker://`` reference with a tag and a digest loses the
    tag, as podman pulls it (by the digest; containers/image refuses the pair, "Docker
    references with both a tag and digest are currently not supported"). Other references
    are returned as they are. Raises TransportError."""
    transport, rest = split_transport(ref)
    if transport != "docker":
        return ref
    parsed = Reference.parse(rest)  # checked by split_transport
    if parsed.tag is None or parsed.digest is None:
        return ref
    name = rest.partition("@")[0]
    return f"docker://{name[: -len(parsed.tag) - 1]}@{parsed.digest}"


def registry_host(ref: str) -> str | None:
    """The registry host (with port) of a ``docker://`` reference, else ``None``."""
    transport, rest = split_transport(ref)
    if transport != "docker":
        return None
    first = rest.split("/", 1)[0]
    # As in the docker reference grammar: a first component with '.' or ':' or "localhost" is
    # a host; anything else is a Docker Hub repository.
    if "/" in rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def local_path(ref: str) -> Path | None:
    """The file or directory a path transport names (``oci:/x:tag`` → ``/x``), else ``None``."""
    transport, rest = split_transport(ref)
    if transport not in PATH_TRANSPORTS:
        return None
    return Path(rest if transport == "dir" else rest.split(":", 1)[0])


def absolute(ref: str, base: Path) -> str:
    """``ref`` with a relative path (of a path transport) made absolute against ``base``."""
    transport, rest = split_transport(ref)
    if transport not in PATH_TRANSPORTS:
        return ref
    path, sep, tail = (rest, "", "") if transport == "dir" else rest.partition(":")
    if Path(path).is_absolute():
        return ref
    return f"{transport}:{(base / path).resolve()}{sep}{tail}"
