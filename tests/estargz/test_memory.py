"""The writer streams: peak memory stays far below the layer size (non-seekable input)."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from collections.abc import Iterator

from store.estargz import convert

MiB = 1 << 20


class _GeneratedTar(io.RawIOBase):
    """A tar stream made on the fly: one big file of zeros, then many small files."""

    def __init__(self, big: int, small: int) -> None:
        self._parts = self._gen(big, small)
        self._buf = b""

    @staticmethod
    def _gen(big: int, small: int) -> Iterator[bytes]:
        ti = tarfile.TarInfo("big.bin")
        ti.size = big
        yield ti.tobuf(tarfile.PAX_FORMAT)
        zeros = bytes(MiB)
        for _ in range(big // MiB):
            yield zeros
        for i in range(small):
            ti = tarfile.TarInfo(f"small/{i:05d}")
            ti.size = 100
            yield ti.tobuf(tarfile.PAX_FORMAT) + b"s" * 100 + bytes(412)
        yield bytes(1024)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._parts)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.size += len(b)
        return len(b)


def test_peak_memory_is_bounded() -> None:
    big = 192 * MiB
    sink = _Sink()
    tracemalloc.start()
    try:
        res = convert(_GeneratedTar(big, 3000), sink, chunk_size=4 * MiB, level=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.uncompressed_size > big
    assert sink.size == res.size
    assert peak < 64 * MiB, f"peak traced memory {peak / MiB:.0f} MiB for a {big // MiB} MiB layer"
