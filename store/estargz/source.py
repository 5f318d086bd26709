"""Random-access blob sources for the synchronous reader.

The async store has its own ranged fetcher; this Protocol is what :class:`EstargzReader`
(CLI, tests, tools) reads through. A short read is :class:`TruncatedBlob`, never silence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import TruncatedBlob


@runtime_checkable
class BlobSource(Protocol):
    def size(self) -> int: ...

    def read_at(self, offset: int, size: int) -> bytes: ...


def read_exact(source: BlobSource, offset: int, size: int, what: str) -> bytes:
    """``size`` bytes at ``offset`` or :class:`TruncatedBlob` naming ``what``."""
    data = source.read_at(offset, size)
    if len(data) != size:
        raise TruncatedBlob(
            f"{what}: wanted {size} bytes at offset {offset}, the blob gave {len(data)}"
        )
    return data


class BytesBlobSource:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(bytes(data))

    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError(f"invalid read offset={offset} size={size}")
        return bytes(self._data[offset : offset + size])


class FileBlobSource:
    """A local blob file (kept open; use as a context manager or call :meth:`close`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size

    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError(f"invalid read offset={offset} size={size}")
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileBlobSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
