"""A layer's whole compressed blob, checked against the layer's digest before a byte is served.

The layer directory's ``blob`` file must hold the exact compressed bytes (containers/storage
reads it for ``podman save`` and ``push``). A file in
``diff`` is served chunk by chunk, each checked against its ``chunkDigest``; the compressed
bytes themselves are covered by nothing smaller than the layer digest, so no part of the blob
can be checked before all of it is in. The first read therefore downloads the whole blob in
:data:`WINDOW` pieces, hashing as it goes, into an anonymous temporary file in the chunk cache's
directory (``O_TMPFILE``: nothing is left behind if the store dies), and every read waits until
the digest matched; reads are then served from that file. After a mismatch the blob is
downloaded once more, whole (a registry, proxy or cache that answered wrong bytes once may
answer right the next time); a second mismatch is final (every read raises
:class:`BlobVerifyError`: a blob that is wrong where it is kept is not downloaded again per
read). A download that failed or was cancelled resumes where it stopped at the next read.

Disk: the file holds the whole compressed blob and is not counted in ``cache_max_bytes``. It is
dropped once no read came for :data:`IDLE_SECONDS` (:meth:`VerifiedBlob.drop_when_idle`; a
later read downloads it again) or when the layer is released (the runtime removes the image,
or the store stops; podman ≥ 5.5 never releases a layer while the store runs). A download does
not start without that much free space in the directory. Only ``podman save`` and ``push``
read ``blob``, so a layer that is only run never has one.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from store.chunks import BlobReader, LayerFetchError
from store.registry.reference import digest_hasher

log = logging.getLogger(__name__)

WINDOW = 4 << 20  # compressed bytes per registry request while the blob downloads
IDLE_SECONDS = 60.0  # a verified blob's file is dropped after this long without a read
MISMATCHES_FINAL = 2  # whole downloads that hashed wrong before the verdict is final


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class BlobVerifyError(Exception):
    """The blob's bytes do not hash to the layer's digest, or its digest cannot be checked
    (an algorithm this Python lacks): never served."""


@dataclass
class VerifiedBlob:
    """Range reads of ``blob`` (``size`` bytes) once all of it hashed to ``digest``
    (``algorithm:hex``, as in a manifest's layer descriptor).

    ``directory`` holds the temporary file; ``on_fetch(nbytes)`` runs after each registry
    request. :meth:`read` raises :class:`LayerFetchError` (the registry failed: the next read
    tries again) or :class:`BlobVerifyError`; :meth:`close` drops the file (reads then raise
    :class:`LayerFetchError`).
    """

    blob: BlobReader
    digest: str
    directory: Path
    on_fetch: Callable[[int], None] | None = None
    _lock: trio.Lock = field(default_factory=trio.Lock)
    _file: IO[bytes] | None = None
    _hasher: Any = None
    _done: int = 0  # bytes downloaded and hashed so far, from the start
    _verified: bool = False
    _failed: str = ""
    _mismatches: int = 0  # whole downloads that did not hash to the digest
    _closed: bool = False
    _reads: int = 0  # reads in progress, those waiting for the download included
    _last_read: float = 0.0  # trio clock, when the last read ended

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the blob (fewer at its end), verified."""
        if offset >= self.blob.size or size <= 0:
            return b""
        self._reads += 1
        try:
            return await self._read(offset, size)
        finally:
            self._reads -= 1
            self._last_read = trio.current_time()

    async def _read(self, offset: int, size: int) -> bytes:
        if not self._verified:
            async with self._lock:
                if not self._verified:
                    await self._download()
        file = self._file
        if file is None:
            raise LayerFetchError(f"{self.digest}: the layer was released")
        size = min(size, self.blob.size - offset)
        # A descriptor of this read's own: close() (the layer's release) may run while the
        # worker thread reads, and the file's number could then name another file.
        fd = os.dup(file.fileno())
        try:
            return await trio.to_thread.run_sync(os.pread, fd, size, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        """Close the file and forget what was downloaded; a read in progress keeps its own
        descriptor, and the next download starts from the blob's first byte."""
        file, self._file = self._file, None
        self._done, self._hasher, self._verified = 0, None, False
        if file is not None:
            file.close()

    async def drop_when_idle(self, idle: float = IDLE_SECONDS) -> None:
        """Return once the file is gone: dropped here after ``idle`` seconds without a read
        in progress or ended (the next read downloads the blob again), or by :meth:`close`.
        Start it in the layer's nursery after a read; a mismatch's verdict is kept."""
        while self._file is not None:
            due = self._last_read + idle
            if self._reads == 0 and trio.current_time() >= due:
                async with self._lock:  # never in the middle of a download
                    if self._reads == 0 and trio.current_time() >= self._last_read + idle:
                        self._drop()
                        return
                continue
            await trio.sleep_until(max(due, trio.current_time() + idle / 8))

    async def _download(self) -> None:
        while not await self._download_once():
            log.warning(
                "%s: the blob's bytes did not hash to its digest; downloading it again",
                self.digest,
            )

    async def _download_once(self) -> bool:
        """Download (or resume) the whole blob into the file and check its digest: True once
        verified; False after a mismatch that is not final yet (the file is dropped: the next
        try starts from the first byte). Raises :class:`BlobVerifyError` (final) or
        :class:`LayerFetchError`."""
        if self._failed:
            raise BlobVerifyError(self._failed)
        if self._closed:
            raise LayerFetchError(f"{self.digest}: the layer was released")
        algorithm, _, want = self.digest.partition(":")
        if self._file is None:
            hasher = digest_hasher(self.digest)
            if hasher is None:
                self._failed = f"{self.digest}: cannot check a digest of algorithm {algorithm!r}"
                raise BlobVerifyError(self._failed)
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                free = _free_bytes(self.directory)
                if free < self.blob.size:
                    raise OSError(errno.ENOSPC, f"{self.blob.size} bytes needed, {free} bytes free")
                # Kept open across reads until close() (the layer's release).
                self._file = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115
            except OSError as exc:
                raise LayerFetchError(
                    f"{self.digest}: the blob's temporary file in {self.directory}: {exc}"
                ) from exc
            self._hasher = hasher
        while self._done < self.blob.size:
            lo, hi = self._done, min(self._done + WINDOW, self.blob.size)
            try:
                (data,) = await self.blob.read_ranges([(lo, hi)])
            except Exception as exc:  # the registry client's errors (ResolveError, OSError …)
                raise LayerFetchError(f"{self.digest}: blob range {lo}-{hi}: {exc}") from exc
            if self._file is None:  # released while the request was out
                raise LayerFetchError(f"{self.digest}: the layer was released")
            if self.on_fetch is not None:
                self.on_fetch(len(data))
            if len(data) != hi - lo:
                raise LayerFetchError(f"{self.digest}: blob range {lo}-{hi}: got {len(data)} bytes")
            # Not cancellable once started (trio waits for the thread): _done stays true.
            # Through a descriptor of its own, as reads are: close() may run meanwhile.
            fd = os.dup(self._file.fileno())
            try:
                # The hasher by reference: close() on this thread forgets self._hasher.
                await trio.to_thread.run_sync(_append, fd, lo, data, self._hasher)
            except OSError as exc:  # ENOSPC and the like: the next read writes it again
                raise LayerFetchError(
                    f"{self.digest}: writing the blob's temporary file in {self.directory}: {exc}"
                ) from exc
            finally:
                os.close(fd)
            if self._closed:  # released meanwhile
                raise LayerFetchError(f"{self.digest}: the layer was released")
            self._done = hi
        got = self._hasher.hexdigest()
        if got != want:
            self._mismatches += 1
            if self._mismatches < MISMATCHES_FINAL:
                self._drop()
                return False
            self._failed = (
                f"{self.digest}: the blob's {self.blob.size} bytes hash to {algorithm}:{got}"
                f" ({self._mismatches} downloads)"
            )
            self.close()
            raise BlobVerifyError(self._failed)
        self._verified = True
        return True


def _append(fd: int, offset: int, data: bytes, hasher: Any) -> None:
    """Write ``data`` at ``offset`` through ``fd``, then hash it into ``hasher``. At its
    offset, not at the file's position: a write cut short (ENOSPC) leaves part of it behind,
    and the retry must overwrite that part, not follow it."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    hasher.update(data)
