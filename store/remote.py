"""The manager's registry access over :class:`store.registry.client.RegistryClient`.

Why a seam: :class:`store.resolver.LayerManager` only needs "manifest+config+layers of a ref"
and "range reads of a blob"; keeping the client behind these two calls keeps the manager
testable and the client swappable (mirrors, credentials live in the client's config).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from store.layer import BlobReader
from store.registry.client import RegistryClient
from store.registry.errors import RegistryError
from store.resolver import LayerDesc, RegistryAccess, ResolveError, decode_json, layer_descs


@dataclass
class RegistryBlob:
    """Range reads of one blob; ranges are ``(start, end)`` byte offsets."""

    client: RegistryClient
    ref: str
    digest: str
    size: int

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        parts = await self.client.read_ranges(
            self.ref, self.digest, [(lo, hi - lo) for lo, hi in ranges]
        )
        for (lo, hi), part in zip(ranges, parts, strict=True):
            if len(part) != hi - lo:
                raise ResolveError(f"{self.digest}: short range {lo}-{hi}: got {len(part)}")
        return parts


class RemoteRegistry(RegistryAccess):
    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    async def image(self, ref: str) -> tuple[bytes, bytes, list[LayerDesc]]:
        try:
            manifest = await self.client.get_manifest(ref)
            config_raw = await self.client.get_blob(ref, manifest.config.digest)
        except RegistryError as exc:
            raise ResolveError(f"{ref}: {exc}") from exc
        config = decode_json(config_raw, f"{ref} config")
        return manifest.raw, config_raw, layer_descs(manifest.parsed, config)

    def blob(self, ref: str, digest: str, size: int) -> BlobReader:
        return RegistryBlob(self.client, ref, digest, size)
