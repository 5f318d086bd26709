"""The layer's ``blob`` file: served only once the whole blob hashed to the layer's digest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import pytest
import trio

from store.blobfile import BlobVerifyError, VerifiedBlob
from store.chunks import LayerFetchError

DATA = os.urandom(10_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class Blob:
    """A blob reader over ``data`` that records requests and fails the ones listed."""

    def __init__(self, data: bytes, fail_at: set[int] | None = None) -> None:
        self.data = data
        self.size = len(data)
        self.requests: list[tuple[int, int]] = []
        self.fail_at = fail_at or set()

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        await trio.sleep(0)
        (lo, hi) = ranges[0]
        self.requests.append((lo, hi))
        if lo in self.fail_at:
            self.fail_at.discard(lo)
            raise OSError("connection reset")
        return [self.data[lo:hi]]


@pytest.fixture(autouse=True)
def small_window(monkeypatch):
    monkeypatch.setattr("store.blobfile.WINDOW", 4096)


@pytest.mark.anyio
async def test_the_first_read_downloads_and_checks_the_whole_blob(tmp_path):
    blob = Blob(DATA)
    fetched: list[int] = []
    whole = VerifiedBlob(blob, DIGEST, tmp_path, fetched.append)
    assert await whole.read(5, 10) == DATA[5:15]
    assert blob.requests == [(0, 4096), (4096, 8192), (8192, 10_000)]
    assert fetched == [4096, 4096, 1808]
    assert await whole.read(9_990, 100) == DATA[9_990:]  # cut at the end
    assert await whole.read(10_000, 10) == b""
    assert len(blob.requests) == 3  # served from the file since
    assert list(tmp_path.iterdir()) == []  # an anonymous file: nothing to leave behind
    whole.close()
    with pytest.raises(LayerFetchError, match="released"):
        await whole.read(0, 10)


@pytest.mark.anyio
async def test_a_blob_that_does_not_hash_to_its_digest_is_never_served(tmp_path):
    tampered = DATA[:9_000] + bytes([DATA[9_000] ^ 1]) + DATA[9_001:]
    blob = Blob(tampered)
    whole = VerifiedBlob(blob, DIGEST, tmp_path)
    with pytest.raises(BlobVerifyError, match=r"10000 bytes hash to sha256:.*2 downloads"):
        await whole.read(0, 100)  # the first 100 bytes are right, and still not served
    assert len(blob.requests) == 6  # downloaded whole twice
    with pytest.raises(BlobVerifyError):
        await whole.read(0, 100)
    assert len(blob.requests) == 6  # final: not downloaded again


@pytest.mark.anyio
async def test_wrong_bytes_answered_once_are_downloaded_again(tmp_path):
    """A registry (or a proxy before it) that answered one range with wrong bytes: the
    mismatch drops the download and the same read downloads the blob again, whole; the
    right bytes are then served."""
    tampered = DATA[:9_000] + bytes([DATA[9_000] ^ 1]) + DATA[9_001:]

    class OnceWrong(Blob):
        async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            (data,) = await super().read_ranges(ranges)
            if len(self.requests) <= 3:
                (lo, hi) = ranges[0]
                return [tampered[lo:hi]]
            return [data]

    blob = OnceWrong(DATA)
    whole = VerifiedBlob(blob, DIGEST, tmp_path)
    assert await whole.read(8_990, 20) == DATA[8_990:9_010]
    assert blob.requests == [(0, 4096), (4096, 8192), (8192, 10_000)] * 2
    assert await whole.read(0, 10) == DATA[:10]
    assert len(blob.requests) == 6


@pytest.mark.anyio
async def test_a_failed_download_resumes_where_it_stopped(tmp_path):
    blob = Blob(DATA, fail_at={4096})
    whole = VerifiedBlob(blob, DIGEST, tmp_path)
    with pytest.raises(LayerFetchError, match="blob range 4096-8192: connection reset"):
        await whole.read(0, 10)
    assert await whole.read(0, 10) == DATA[:10]
    assert blob.requests == [(0, 4096), (4096, 8192), (4096, 8192), (8192, 10_000)]


@pytest.mark.anyio
async def test_concurrent_reads_share_one_download(tmp_path):
    blob = Blob(DATA)
    whole = VerifiedBlob(blob, DIGEST, tmp_path)
    got: dict[int, bytes] = {}

    async def read(offset: int) -> None:
        got[offset] = await whole.read(offset, 1000)

    async with trio.open_nursery() as nursery:
        for offset in (0, 3000, 9500):
            nursery.start_soon(read, offset)
    assert got == {0: DATA[:1000], 3000: DATA[3000:4000], 9500: DATA[9500:]}
    assert len(blob.requests) == 3


@pytest.mark.anyio
async def test_a_digest_that_cannot_be_checked_is_refused(tmp_path):
    whole = VerifiedBlob(Blob(DATA), "nosuchhash:00", tmp_path)
    with pytest.raises(BlobVerifyError, match="cannot check a digest of algorithm 'nosuchhash'"):
        await whole.read(0, 10)


@pytest.mark.anyio
async def test_a_release_during_a_read_does_not_change_its_bytes(tmp_path, monkeypatch):
    blob = Blob(DATA)
    whole = VerifiedBlob(blob, DIGEST, tmp_path)
    assert await whole.read(0, 10) == DATA[:10]
    real_pread = os.pread

    def pread_after_release(fd: int, size: int, offset: int) -> bytes:
        whole.close()  # the layer released meanwhile; its file's number reused
        with open(tmp_path / "other", "wb") as other:
            other.write(b"x" * 20_000)
        return real_pread(fd, size, offset)

    monkeypatch.setattr("store.blobfile.os.pread", pread_after_release)
    assert await whole.read(100, 50) == DATA[100:150]
    monkeypatch.setattr("store.blobfile.os.pread", real_pread)
    with pytest.raises(LayerFetchError, match="released"):
        await whole.read(0, 10)


@pytest.mark.anyio
async def test_a_release_while_a_request_is_out_ends_the_read_cleanly(tmp_path):
    whole: VerifiedBlob

    class Releasing(Blob):
        async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            got = await super().read_ranges(ranges)
            if ranges[0][0] == 4096:
                whole.close()  # the layer released during its second request
            return got

    whole = VerifiedBlob(Releasing(DATA), DIGEST, tmp_path)
    with pytest.raises(LayerFetchError, match="released"):
        await whole.read(0, 10)


@pytest.mark.anyio
async def test_no_download_starts_without_room_for_the_blob(tmp_path, monkeypatch):
    monkeypatch.setattr("store.blobfile._free_bytes", lambda directory: 9_999)
    blob = Blob(DATA)
    whole = VerifiedBlob(blob, DIGEST, tmp_path / "cache")
    with pytest.raises(LayerFetchError, match=r"10000 bytes needed, 9999 bytes free"):
        await whole.read(0, 10)
    assert blob.requests == []
    monkeypatch.setattr("store.blobfile._free_bytes", lambda directory: 1 << 40)
    assert await whole.read(0, 10) == DATA[:10]  # once there is room, it goes ahead


@pytest.mark.anyio
async def test_a_write_cut_short_is_written_again_in_place(tmp_path, monkeypatch):
    # ENOSPC part way through a window: what the write left must be overwritten, not followed.
    real_pwrite = os.pwrite
    cut = {"done": False}

    def pwrite(fd: int, data, offset: int) -> int:
        if offset >= 4096 and not cut["done"]:
            cut["done"] = True
            real_pwrite(fd, bytes(data[:1000]), offset)
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr("store.blobfile.os.pwrite", pwrite)
    whole = VerifiedBlob(Blob(DATA), DIGEST, tmp_path)
    with pytest.raises(LayerFetchError, match="writing the blob's temporary file"):
        await whole.read(0, 10)
    assert await whole.read(0, 10_000) == DATA


@pytest.mark.anyio
async def test_the_file_is_dropped_after_a_while_without_reads(tmp_path):
    blob = Blob(DATA)
    whole = VerifiedBlob(blob, DIGEST, tmp_path)
    assert await whole.read(0, 10) == DATA[:10]
    start = trio.current_time()
    with trio.fail_after(5):
        await whole.drop_when_idle(idle=0.05)
    assert trio.current_time() - start >= 0.05
    assert whole._file is None
    assert await whole.read(100, 10) == DATA[100:110]  # downloaded and checked again
    assert len(blob.requests) == 6
    whole.close()


@pytest.mark.anyio
async def test_a_read_in_progress_holds_the_file(tmp_path, monkeypatch):
    whole = VerifiedBlob(Blob(DATA), DIGEST, tmp_path)
    assert await whole.read(0, 10) == DATA[:10]
    pread = os.pread

    def slow_pread(fd: int, size: int, offset: int) -> bytes:
        import time

        time.sleep(0.3)
        return pread(fd, size, offset)

    monkeypatch.setattr("store.blobfile.os.pread", slow_pread)
    ended: list[float] = []

    async def slow_read() -> None:
        assert await whole.read(20, 10) == DATA[20:30]
        ended.append(trio.current_time())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_read)
            await trio.sleep(0.01)
            await whole.drop_when_idle(idle=0.05)
    assert ended and trio.current_time() - ended[0] >= 0.05
    assert whole._file is None
