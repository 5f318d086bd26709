"""Manifest media types, descriptors, and platform selection from indexes/manifest lists."""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ManifestError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine in OCI terms (GOARCH names)."""
        m = _platform.machine().lower()
        arch, variant = {
            "x86_64": ("amd64", ""),
            "amd64": ("amd64", ""),
            "aarch64": ("arm64", ""),
            "arm64": ("arm64", ""),
            "armv7l": ("arm", "v7"),
            "armv6l": ("arm", "v6"),
            "i686": ("386", ""),
            "i386": ("386", ""),
            "ppc64le": ("ppc64le", ""),
            "s390x": ("s390x", ""),
            "riscv64": ("riscv64", ""),
        }.get(m, (m, ""))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/arch[/variant]`, e.g. `linux/arm64/v8`."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ManifestError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def matches(self, desc_platform: dict[str, Any]) -> bool:
        if desc_platform.get("os") != self.os:
            return False
        if desc_platform.get("architecture") != self.architecture:
            return False
        have = desc_platform.get("variant", "") or ""
        want = self.variant
        if self.architecture == "arm64":  # v8 is arm64's implied variant
            have, want = have if have != "v8" else "", want if want != "v8" else ""
        return not want or have == want

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Descriptor:
        try:
            return cls(
                d.get("mediaType", ""),
                str(d["digest"]),
                int(d["size"]),
                d.get("annotations"),
                d.get("platform"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"malformed descriptor {d!r}: {e}") from e

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    @classmethod
    def of(cls, data: bytes, media_type: str, **kw: Any) -> Descriptor:
        return cls(media_type, sha256_digest(data), len(data), **kw)


@dataclass(frozen=True)
class ManifestResult:
    """A manifest or index exactly as served (`raw`), its digest, and its parsed JSON."""

    media_type: str
    digest: str
    raw: bytes
    parsed: dict[str, Any]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def config(self) -> Descriptor:
        if self.is_index or "config" not in self.parsed:
            raise ManifestError(f"{self.digest} is an index, it has no config")
        return Descriptor.from_json(self.parsed["config"])

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_json(d) for d in self.parsed.get("layers", [])]

    @property
    def manifests(self) -> list[Descriptor]:
        return [Descriptor.from_json(d) for d in self.parsed.get("manifests", [])]

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.parsed.get("annotations") or {})


def parse_manifest(raw: bytes, content_type: str | None, digest: str) -> ManifestResult:
    """Decode a manifest body; the media type comes from the body, else the header."""
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        raise ManifestError(f"manifest {digest} is not JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise ManifestError(f"manifest {digest} is not a JSON object")
    media_type = parsed.get("mediaType") or (content_type or "").split(";")[0].strip()
    if not media_type:
        media_type = OCI_INDEX if "manifests" in parsed else OCI_MANIFEST
    if media_type not in MANIFEST_TYPES + INDEX_TYPES:
        raise ManifestError(f"manifest {digest} has unsupported media type {media_type!r}")
    return ManifestResult(media_type, digest, raw, parsed)


def select_platform(index: ManifestResult, wanted: Platform) -> Descriptor:
    """The first manifest of the index that matches `wanted` (variant preferring exact)."""
    candidates = [d for d in index.manifests if d.platform and wanted.matches(d.platform)]
    if not candidates:
        have = ", ".join(
            "/".join(str(d.platform.get(k, "")) for k in ("os", "architecture", "variant")).rstrip(
                "/"
            )
            for d in index.manifests
            if d.platform
        )
        raise ManifestError(
            f"index {index.digest} has no manifest for platform {wanted} (has: {have or 'none'})"
        )
    exact = [d for d in candidates if (d.platform or {}).get("variant", "") == wanted.variant]
    return (exact or candidates)[0]


def dumps_canonical(obj: Any) -> bytes:
    """Compact JSON, as pushed: a manifest's digest is over these exact bytes."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def build_manifest(
    config: bytes,
    layers: list[Descriptor],
    *,
    annotations: Mapping[str, str] | None = None,
    media_type: str = OCI_MANIFEST,
    config_media_type: str | None = None,
) -> tuple[bytes, str]:
    """Serialize an image manifest (OCI or Docker schema 2) → (raw bytes, media type)."""
    if media_type not in MANIFEST_TYPES:
        raise ManifestError(f"not a manifest media type: {media_type!r}")
    cmt = config_media_type or (OCI_CONFIG if media_type == OCI_MANIFEST else DOCKER_CONFIG)
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": Descriptor.of(config, cmt).to_json(),
        "layers": [d.to_json() for d in layers],
    }
    if annotations:
        obj["annotations"] = dict(annotations)
    return dumps_canonical(obj), media_type


def build_index(
    manifests: list[Descriptor],
    *,
    annotations: Mapping[str, str] | None = None,
    media_type: str = OCI_INDEX,
) -> tuple[bytes, str]:
    """Serialize an OCI index or Docker manifest list; descriptors carry `platform`."""
    if media_type not in INDEX_TYPES:
        raise ManifestError(f"not an index media type: {media_type!r}")
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [d.to_json() for d in manifests],
    }
    if annotations:
        obj["annotations"] = dict(annotations)
    return dumps_canonical(obj), media_type
