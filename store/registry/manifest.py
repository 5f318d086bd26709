"""Manifest media types, descriptors, and platform selection from indexes/manifest lists.

The one place a manifest's shape is checked: :func:`parse_manifest` validates every descriptor
(``config``, ``layers[i]``, ``manifests[i]``) as the OCI image spec's descriptor.md defines it,
and :func:`config_diff_ids` an image config's ``rootfs.diff_ids``. A bad shape raises
:class:`ManifestError` naming the field path (``layers[2].size``) and the value, where a
``KeyError`` or ``TypeError`` from deep in a caller said neither. containers/image decodes a
manifest into Go structs, so it refuses the same shapes (a string ``size``, a number as an
annotation value, ``layers`` as an object): no image the runtime can pull is refused here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform as _platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ManifestError, ReferenceError
from .reference import validate_digest

T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

# descriptor.md: "size ... MUST be an int64"; a size is a byte count, so not negative either.
SIZE_LIMIT = 1 << 63
SHOWN_CHARS = 80  # of a bad value, in an error message


def shown(value: Any) -> str:
    """``value`` as JSON for an error message, cut to :data:`SHOWN_CHARS` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


def _bad(where: str, expected: str, value: Any) -> ManifestError:
    return ManifestError(f"{where}: expected {expected}, got {shown(value)}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, "an object", value)
    return value


def _list(value: Any, where: str) -> list[Any]:
    """A JSON array; absent (``None``) is empty, as Go decodes a missing slice."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(where, "an array", value)
    return value


def _string_map(value: Any, where: str) -> dict[str, str] | None:
    """An annotations map: string keys (JSON's are) to string values (annotations.md)."""
    if value is None:
        return None
    for key, item in _object(value, where).items():
        if not isinstance(item, str):
            raise _bad(f"{where}[{shown(key)}]", "a string", item)
    return value


def _digest(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, "a digest string", value)
    try:
        return validate_digest(value)
    except ReferenceError:
        raise _bad(where, "a digest ALGORITHM:HEX (sha256: 64 lowercase hex)", value) from None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# Architecture names -> (OCI name (GOARCH), implied variant): the kernel's (``uname -m``) and
# the aliases containerd's platforms.Normalize takes.
_ARCH_NAMES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armel": ("arm", "v6"),
    "i686": ("386", ""),
    "i386": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine in OCI terms (GOARCH names)."""
        m = _platform.machine().lower()
        arch, variant = _ARCH_NAMES.get(m, (m, ""))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/arch[/variant]`, e.g. `linux/arm64/v8`, normalized as containerd's
        ``platforms.Parse`` (what docker's and nerdctl's ``--platform`` take): lower case, and
        the kernel's names for an architecture taken for the OCI one (``Linux/x86_64`` is
        ``linux/amd64``, ``linux/aarch64`` ``linux/arm64``, ``linux/armhf`` ``linux/arm/v7``).
        Raises ManifestError."""
        parts = text.lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ManifestError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        arch, variant = parts[1], parts[2] if len(parts) == 3 else ""
        alias = _ARCH_NAMES.get(arch)
        if alias is not None:
            arch, variant = alias[0], variant or alias[1]
        return cls(parts[0], arch, variant)

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
    def from_json(cls, d: Any, where: str = "descriptor") -> Descriptor:
        """A descriptor (descriptor.md), checked; :class:`ManifestError` names the field
        (``where`` is the descriptor's path, e.g. ``layers[2]``) and its bad value."""
        d = _object(d, where)
        media_type = d.get("mediaType", "")
        if not isinstance(media_type, str):
            raise _bad(f"{where}.mediaType", "a string", media_type)
        if "digest" not in d:
            raise ManifestError(f"{where}.digest: missing")
        digest = _digest(d["digest"], f"{where}.digest")
        if "size" not in d:
            raise ManifestError(f"{where}.size: missing")
        size = d["size"]
        # bool is an int in Python, not in JSON; 1.0 and 1e30 are floats (Go refuses both).
        if type(size) is not int or not 0 <= size < SIZE_LIMIT:
            raise _bad(f"{where}.size", "an integer 0 <= size < 2^63", size)
        annotations = _string_map(d.get("annotations"), f"{where}.annotations")
        platform = d.get("platform")
        if platform is not None:
            _object(platform, f"{where}.platform")
        return cls(media_type, digest, size, annotations, platform)

    @property
    def platform_name(self) -> str:
        """An index entry's ``os/architecture[/variant]`` ("" without a platform)."""
        if not self.platform:
            return ""
        parts = (str(self.platform.get(k, "")) for k in ("os", "architecture", "variant"))
        return "/".join(parts).rstrip("/")

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
    """A manifest or index exactly as served (`raw`), its digest, and its parsed JSON.

    Its descriptors are checked when first asked for (:func:`parse_manifest` asks for all of
    them): a bad one raises :class:`ManifestError` naming the manifest and the field."""

    media_type: str
    digest: str
    raw: bytes
    parsed: dict[str, Any]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @functools.cached_property
    def config(self) -> Descriptor:
        if self.is_index:
            raise ManifestError(f"{self.digest} is an index, it has no config")
        if "config" not in self.parsed:
            raise ManifestError(f"manifest {self.digest}: config: missing", digest=self.digest)
        return self._checked(lambda: Descriptor.from_json(self.parsed["config"], "config"))

    @property
    def layers(self) -> list[Descriptor]:
        return list(self._layers)

    @property
    def manifests(self) -> list[Descriptor]:
        return list(self._manifests)

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self._annotations or {})

    @functools.cached_property
    def _annotations(self) -> dict[str, str] | None:
        return self._checked(lambda: _string_map(self.parsed.get("annotations"), "annotations"))

    @functools.cached_property
    def _layers(self) -> tuple[Descriptor, ...]:
        return self._descriptors("layers")

    @functools.cached_property
    def _manifests(self) -> tuple[Descriptor, ...]:
        return self._descriptors("manifests")

    def _descriptors(self, key: str) -> tuple[Descriptor, ...]:
        return self._checked(
            lambda: tuple(
                Descriptor.from_json(d, f"{key}[{i}]")
                for i, d in enumerate(_list(self.parsed.get(key), key))
            )
        )

    def _checked(self, parse: Callable[[], T]) -> T:
        try:
            return parse()
        except ManifestError as e:
            raise ManifestError(f"manifest {self.digest}: {e}", digest=self.digest) from None

    def check(self) -> ManifestResult:
        """Every descriptor and annotation checked (:class:`ManifestError` on the first bad one)."""
        if self.is_index:
            self._manifests  # noqa: B018 - checked on first access
        else:
            self.config  # noqa: B018
            self._layers  # noqa: B018
        self._annotations  # noqa: B018
        return self


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
    if not isinstance(media_type, str) or media_type not in MANIFEST_TYPES + INDEX_TYPES:
        raise ManifestError(
            f"manifest {digest} has unsupported media type {shown(media_type)}", digest=digest
        )
    return ManifestResult(media_type, digest, raw, parsed).check()


def config_diff_ids(config: dict[str, Any]) -> list[str]:
    """An image config's ``rootfs.diff_ids`` (config.md: an array of digests), checked:
    :class:`ManifestError` names the field (``rootfs.diff_ids[1]``). Absent is empty, as Go
    decodes it; the caller compares the count with the manifest's layers."""
    rootfs = config.get("rootfs")
    if rootfs is None:
        return []
    items = _list(_object(rootfs, "rootfs").get("diff_ids"), "rootfs.diff_ids")
    return [_digest(d, f"rootfs.diff_ids[{i}]") for i, d in enumerate(items)]


def select_platform(index: ManifestResult, wanted: Platform) -> Descriptor:
    """The first manifest of the index that matches `wanted` (variant preferring exact)."""
    candidates = [d for d in index.manifests if d.platform and wanted.matches(d.platform)]
    if not candidates:
        have = ", ".join(d.platform_name for d in index.manifests if d.platform)
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
