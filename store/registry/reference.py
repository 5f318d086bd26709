"""Image references normalized the way containers tooling (docker/distribution) does.

`python` → `docker.io/library/python:latest`; `localhost:5000/x@sha256:…`; `name:tag@digest`
keeps both (the digest wins when fetching). The grammar follows distribution's
`reference/regexp.go`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from .errors import ReferenceError

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"  # the host Docker Hub's API answers on
LEGACY_REGISTRIES = ("index.docker.io", DOCKER_HUB_ENDPOINT)
OFFICIAL_PREFIX = "library/"
NAME_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEP = r"(?:[._]|__|[-]+)"
_COMPONENT = re.compile(rf"^{_ALNUM}(?:{_SEP}{_ALNUM})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


def validate_digest(digest: str) -> str:
    """Return `digest` if well formed (sha256 must be 64 lowercase hex), else ReferenceError."""
    if not _DIGEST.match(digest):
        raise ReferenceError(f"invalid digest {digest!r}: expected ALGORITHM:HEX")
    if digest.startswith("sha256:") and not _SHA256.match(digest):
        raise ReferenceError(f"invalid digest {digest!r}: sha256 needs 64 lowercase hex digits")
    return digest


def digest_hasher(digest: str) -> Any | None:
    """A new ``hashlib`` hasher of ``digest``'s algorithm (``ALGORITHM:HEX``, as in an OCI
    descriptor), None when this Python has no such algorithm: the digest cannot be checked.
    Its ``hexdigest()`` is compared with the part after the colon."""
    algorithm = digest.partition(":")[0]
    if algorithm not in hashlib.algorithms_available:
        return None
    return hashlib.new(algorithm)


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference."""

    registry: str  # "docker.io", "127.0.0.1:5000", "[::1]:5000"
    repository: str  # "library/python"
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalize; a reference with neither tag nor digest gets `latest`."""
        if not isinstance(text, str) or not text:
            raise ReferenceError("invalid reference: empty string")
        if text != text.strip() or any(c.isspace() for c in text):
            raise ReferenceError(f"invalid reference {text!r}: contains whitespace")
        rest, digest = text, None
        if "@" in rest:
            rest, _, digest = rest.partition("@")
            validate_digest(digest)
        tag = None
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.match(tag):
                raise ReferenceError(f"invalid reference {text!r}: invalid tag {tag!r}")
        if not rest:
            raise ReferenceError(f"invalid reference {text!r}: no repository name")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, path = first, remainder
            if not _DOMAIN.match(registry):
                raise ReferenceError(f"invalid reference {text!r}: invalid registry {registry!r}")
        else:
            registry, path = DEFAULT_REGISTRY, rest
        if registry in LEGACY_REGISTRIES:
            registry = DEFAULT_REGISTRY
        if registry == DEFAULT_REGISTRY and "/" not in path:
            path = OFFICIAL_PREFIX + path
        for comp in path.split("/"):
            if not _COMPONENT.match(comp):
                if comp.lower() != comp and _COMPONENT.match(comp.lower()):
                    raise ReferenceError(
                        f"invalid reference {text!r}: repository name must be lowercase"
                    )
                raise ReferenceError(f"invalid reference {text!r}: invalid path component {comp!r}")
        if len(registry) + 1 + len(path) > NAME_MAX:
            raise ReferenceError(f"invalid reference {text!r}: name longer than {NAME_MAX}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry=registry, repository=path, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after `/manifests/`: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        if not _TAG.match(tag):
            raise ReferenceError(f"invalid tag {tag!r}")
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, validate_digest(digest))

    def with_repository(self, repository: str) -> Reference:
        return Reference.parse(f"{self.registry}/{repository}:{self.tag or 'latest'}")

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s
