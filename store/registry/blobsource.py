"""A blob of one image seen as a random-access byte source: what the store's cache reads.

It knows nothing of eStargz; it turns `read_at(offset, size)` into ranged GETs on a shared
`RegistryClient` and clamps reads at the blob's end.
"""

from __future__ import annotations

from collections.abc import Sequence

from .client import RegistryClient
from .errors import RangeError
from .reference import Reference, validate_digest


class RegistryBlobSource:
    def __init__(
        self,
        client: RegistryClient,
        ref: Reference | str,
        digest: str,
        size: int | None = None,
    ) -> None:
        self.client = client
        self.ref = ref if isinstance(ref, Reference) else Reference.parse(ref)
        self.digest = validate_digest(digest)
        self._size = size

    async def size(self) -> int:
        """The blob's size (from the manifest if given, else one HEAD, then remembered)."""
        if self._size is None:
            self._size = await self.client.blob_size(self.ref, self.digest)
        return self._size

    async def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`; shorter only at the blob's end."""
        total = await self.size()
        if offset < 0 or size < 0:
            raise RangeError(
                f"{self.ref.name}@{self.digest}: invalid read offset={offset} size={size}",
                digest=self.digest,
            )
        size = max(0, min(size, total - offset))
        if size == 0:
            return b""
        return await self.client.read_range(self.ref, self.digest, offset, size)

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ranges in as few requests as the server allows; same order as asked."""
        total = await self.size()
        clamped = [(o, max(0, min(s, total - o))) for o, s in ranges]
        return await self.client.read_ranges(self.ref, self.digest, clamped)

    def __repr__(self) -> str:
        return f"RegistryBlobSource({self.ref.name}@{self.digest})"
