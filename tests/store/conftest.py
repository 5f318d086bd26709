"""Store test helpers: a local blob reader so the data path runs without a registry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class FileBlob:
    """A :class:`store.layer.BlobReader` over a local file; counts requests like a registry."""

    def __init__(self, path: Path) -> None:
        self.data = Path(path).read_bytes()
        self.size = len(self.data)
        self.requests: list[list[tuple[int, int]]] = []

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.requests.append(list(ranges))
        return [self.data[lo:hi] for lo, hi in ranges]
