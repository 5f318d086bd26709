"""On-disk, content-addressed cache of verified, decompressed chunks.

Why content-addressed: a chunk's key is its ``chunkDigest`` (sha256 of the uncompressed
bytes), so identical chunks of different layers or images share one file, and a cached file
can be re-verified against its own name. Only verified bytes are ever put here, and a file
read back from disk is hashed against its name before it is served.

Layout: ``<root>/sha256/<first two hex>/<rest of hex>``. Writes go to a temporary file in the
same directory and are renamed into place (``os.replace``), so a crash of the store leaves
either nothing or a whole chunk; temporary files left behind are deleted at start. A chunk
torn by a crash of the machine (the rename reached the disk, the data did not) or damaged on
disk fails that hash: it is dropped and fetched again, never served. A full or failing cache
disk does not fail reads: the verified bytes are served, and those the disk refused (after
room was made by deleting least recently used chunk files, for want of space) stay in
the memory cache only (a chunk forgotten at once was fetched again for each 128 KiB piece the
kernel read of it: 3.6-6.3 times the blob on a full disk). The cache has a byte limit;
when an insertion crosses it, least recently used files are deleted until it fits (their
bytes stay in the memory cache, for the same reason). The LRU
order lives in memory and is rebuilt from file access times at start, so the disk cache
survives store restarts and layer releases.

In-flight deduplication: a fetcher claims the chunks it will fetch with :meth:`ChunkCache.begin`
(a miss) and completes each with :meth:`ChunkCache.finish`; others asking for a claimed chunk
wait for its result or its failure (:meth:`ChunkCache.wait_inflight`). A claim whose bytes may
not be on the wire yet (a prefetch's, downloaded in blob order) carries how to put them there
(:attr:`_InFlight.hurry`), so that a waiter in *any* layer sharing the chunk can, not only the
claimant's own reads: a read of a file added again in a later layer otherwise waited for the
earlier layer's prefetch to reach that chunk, up to ``prefetch_timeout_sec``.

Writes off the FUSE thread: a batch fetch completes its claims with :meth:`ChunkCache.finish`,
which admits the verified bytes at once (served from memory, waiters woken) and leaves the file
write to :meth:`ChunkCache.write_pending`, which writes in a worker thread. A 4 MiB file
write on the trio thread stalled every FUSE request behind it (a quarter of a cold read's wall
time, ``benchmarks/bench_store_read.py``).

Inflating bytes before they come here: every fetch through the cache takes its chunks'
uncompressed sizes from one store-wide :class:`~store.budget.ByteBudget`
(:attr:`ChunkCache.inflating`, :data:`INFLATE_BYTES`) while it inflates them, and hands each
group of chunks to :meth:`ChunkCache.finish` as soon as it is done
(:meth:`store.chunks.ChunkSource.deliver`): what a layer compresses well never sits inflated
in memory all at once.

Write-behind for what no read asked for: the prefetch, the background fetch, and the free
riders of a read's 50 kB-aligned range hand their chunks to :meth:`ChunkCache.write_behind`.
In the store a writer task (:meth:`ChunkCache.run_writer`) takes them: it writes once none
were handed to it for :data:`WRITE_QUIET` seconds, at the latest :data:`WRITE_MOST_DELAY`
seconds after the first, at once when half the memory cache's size is pending, and what is
left when it is cancelled; past the memory cache's size the fetcher writes its own. Why: a
prefetch lands in the middle of the pull, when the store parses TOCs and the runtime writes its
storage; one file per chunk (create, write, rename) beside that cost the lazy pull phase about
0.1 s here (python, redis ``estargz``, ``wan`` link). A read that also waited for its riders'
files waited 10-50 ms more per cold read (a directory of small files is one chunk per file):
the ``estargz-noopt`` totals were 8-16% longer (gcc, postgres, python, redis; ``wan`` link).

What reads fetched is on disk when a read returns: the chunks it claimed and fetched, and any
still-pending chunk of another read's fetch it was served (:meth:`ChunkCache.write_served`),
except those another task is writing at that moment and those the disk refused (then not
cached). A store killed right after a read finds those chunks on restart. Chunks the prefetch
or the background fetch brought in ahead of reads are the writer's, even when a read is served
one: reads that wrote those files first spent 0.56 s of gcc's ``estargz`` run (290 of its 475
reads) creating cache files of chunks already in memory. Pending chunks are served from memory
(``_pending``; those small enough are in the memory cache too), so chunks waiting for their
files cost about the memory cache's size at most, beside the batches being written. Without a
writer (tests, tools) :meth:`~ChunkCache.write_behind` writes at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from store.budget import ByteBudget

log = logging.getLogger(__name__)

WRITE_QUIET = 1.0  # seconds without new chunks left to it before the writer writes
WRITE_MOST_DELAY = 10.0  # seconds the writer lets the first of them wait at most
# Uncompressed bytes of chunks being inflated at once, store-wide (ChunkCache.inflating).
INFLATE_BYTES = 64 << 20
# A failing cache disk (full, read-only) fails every chunk file write: one warning per this
# many seconds at most, counting the writes that failed since (a lazy pull of 80 MB onto a
# full disk logged 430 warnings, one per chunk).
WRITE_FAILURE_LOG_EVERY = 60.0
# Times chunk files the disk refused for want of space are written again after room was
# made for them (ChunkCache._make_room): the room counted may fall short by a directory's block.
ROOM_ATTEMPTS = 3
# The block size room is counted in for chunks the disk refused (ChunkCache._make_room): a
# file takes whole blocks.
_BLOCK = 4096
_CHUNK_KEY = re.compile(r"sha256:[0-9a-f]{64}")  # fullmatch: "$" would let a final "\n" pass


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    deduplicated: int = 0


# Puts a claimed chunk's bytes on the wire now: ``hurry([(start, end)])`` with the claimant's
# compressed blob range (:meth:`store.prefetch.AheadBlob.hurry`); returns once they are in.
Hurry = Callable[[Sequence[tuple[int, int]]], Awaitable[None]]


@dataclass
class _InFlight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    # The claimant's way to hurry this chunk and its blob range, when its bytes may not be on
    # the wire yet; None when they are (a read's own fetch, a rider, the background fetch).
    hurry: tuple[Hurry, tuple[int, int]] | None = None
    # Who claimed it (a layer's chunk source; None: not said): a waiter from another layer
    # waits for it a bounded time only (store.chunks.FOREIGN_WAIT).
    owner: object = None


class ChunkCache:
    """A byte-limited LRU cache of chunk bytes on disk, keyed by ``sha256:<hex>`` digests."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        memory_bytes: int = 64 << 20,
        inflate_bytes: int = INFLATE_BYTES,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        # Every fetch through this cache takes its chunks' uncompressed sizes from here while
        # it inflates them (ChunkSource.deliver): bytes in flight stay bounded store-wide.
        self.inflating = ByteBudget(inflate_bytes)
        # A few recent chunks in memory: the kernel reads a 4 MiB chunk in 128 KiB pieces,
        # and re-reading the chunk file for each piece would multiply disk reads by 32.
        self.memory_bytes = memory_bytes
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_total = 0
        self.stats = CacheStats()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._inflight: dict[str, _InFlight] = {}
        # Admitted by finish(), not yet on disk: served from here until written.
        self._pending: dict[str, bytes] = {}
        self._ahead: set[str] = set()  # pending keys fetched ahead of reads: the writer's
        self._pending_bytes = 0
        self._writing: set[str] = set()
        self._evicted_writing: set[str] = set()  # evicted while in _writing
        self._wake: trio.Event | None = None  # run_writer()'s, while it runs
        self._write_failures = 0  # chunk files not written since the last warning
        self._write_failure_logged: float | None = None  # time.monotonic() of that warning
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _scan(self) -> None:
        """Rebuild the LRU order from what is on disk (oldest access first). Only regular
        files named as chunks are the cache's: anything else there (a file copied in, an
        editor's backup, a directory) is left alone and never counted or evicted."""
        found: list[tuple[float, str, int]] = []
        algo_dir = self.root / "sha256"
        if algo_dir.is_dir():
            for sub in algo_dir.iterdir():
                if not sub.is_dir():
                    continue
                for f in sub.iterdir():
                    if f.name.startswith("."):  # a temp file left by a crash
                        with contextlib.suppress(OSError):
                            f.unlink()
                        continue
                    key = f"sha256:{sub.name}{f.name}"
                    try:
                        st = f.lstat()
                    except OSError:
                        continue
                    if not _CHUNK_KEY.fullmatch(key) or not stat.S_ISREG(st.st_mode):
                        log.warning("chunk cache: %s is not a chunk file: left alone", f)
                        continue
                    found.append((st.st_atime, key, st.st_size))
        for _, key, size in sorted(found):
            self._lru[key] = size
            self._total += size
        self._evict()

    def _path(self, key: str) -> Path:
        if not _CHUNK_KEY.fullmatch(key):
            raise ValueError(f"cache key must be sha256:<64 hex>, got {key!r}")
        hexd = key[len("sha256:") :]
        return self.root / "sha256" / hexd[:2] / hexd[2:]

    @property
    def total_bytes(self) -> int:
        return self._total

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` is served without a fetch: on disk, pending, or in memory only."""
        return key in self._lru or key in self._mem

    # -- access ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The cached bytes of ``key``, or None (also when the file vanished under us)."""
        if key not in self._lru:
            data = self._mem.get(key)  # the disk refused its file: held in memory only
            if data is not None:
                self._mem.move_to_end(key)
                self.stats.hits += 1
            return data
        data = self._pending.get(key)
        if data is None:
            data = self._mem.get(key)
        if data is not None:
            if key in self._mem:
                self._mem.move_to_end(key)
            self._lru.move_to_end(key)
            self.stats.hits += 1
            return data
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("chunk cache read failed for %s: %s", key, exc)
            self._forget(key)
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != key:
            # Torn by a crash of the machine (the rename reached the disk, the data did not)
            # or damaged since: never served; the chunk is fetched and verified again.
            log.warning("chunk cache file %s does not hash to its name: removed", path)
            with contextlib.suppress(OSError):
                path.unlink()
            self._forget(key)
            return None
        self._lru.move_to_end(key)
        self.stats.hits += 1
        self._remember(key, data)
        return data

    def peek(self, key: str) -> bytes | None:
        """The bytes of ``key`` if they are in memory (pending or recently used), else None:
        no disk read, no change to the LRU order or the statistics."""
        data = self._pending.get(key)
        return self._mem.get(key) if data is None else data

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > self.memory_bytes // 4 or key in self._mem:
            return
        self._mem[key] = data
        self._mem_total += len(data)
        while self._mem_total > self.memory_bytes:
            _, old = self._mem.popitem(last=False)
            self._mem_total -= len(old)

    def is_inflight(self, key: str) -> bool:
        return key in self._inflight

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` (already verified against ``key``) atomically, then enforce the limit."""
        path = self._path(key)
        if key in self._lru:
            self._lru.move_to_end(key)
            return
        failure = self._write_file(key, path, data)
        if failure is not None:
            self._write_failed(key, failure)
            self._remember(key, data)  # in memory only
            return
        self._lru[key] = len(data)
        self._total += len(data)
        self._remember(key, data)
        self._evict()

    @staticmethod
    def _write_file(key: str, path: Path, data: bytes) -> OSError | None:
        """Write chunk ``key``'s file atomically (temp file + rename); the error when the
        disk refused. Thread-safe: touches no cache state."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data):x}.tmp")
        try:
            if not path.parent.is_dir():  # one stat: mkdir's FileExistsError cost more
                path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return exc
        return None

    def _write_failed(self, key: str, exc: OSError) -> None:
        """A chunk file the disk refused: the read is not failed (the bytes are served, just
        not cached); warned of at most once per :data:`WRITE_FAILURE_LOG_EVERY` seconds."""
        self._write_failures += 1
        now = time.monotonic()
        last = self._write_failure_logged
        if last is not None and now - last < WRITE_FAILURE_LOG_EVERY:
            return
        log.warning(
            "chunk cache write failed for %s: %s (%d chunk file(s) not written since the last "
            "such warning, in %s; their bytes are served uncached, fetched again when evicted "
            "from memory: free space there or lower cache_max_bytes)",
            key,
            exc,
            self._write_failures,
            self.root,
        )
        self._write_failures = 0
        self._write_failure_logged = now

    def _admit(self, key: str, data: bytes) -> None:
        """Take ``data`` (already verified against ``key``) into the cache now, its file to be
        written by :meth:`write_pending` (or left to the writer, :meth:`write_behind`)."""
        if key in self._lru:
            self._lru.move_to_end(key)
            return
        self._path(key)  # a bad key fails here, not in the writer
        self._pending[key] = data
        self._pending_bytes += len(data)
        self._lru[key] = len(data)
        self._total += len(data)
        self._remember(key, data)  # served from memory while pending, kept there after
        self._evict()

    def _unpend(self, key: str) -> bytes | None:
        self._ahead.discard(key)
        data = self._pending.pop(key, None)
        if data is not None:
            self._pending_bytes -= len(data)
        return data

    @property
    def pending_bytes(self) -> int:
        """Bytes of chunks served from memory whose files are not written yet."""
        return self._pending_bytes

    async def write_pending(self, keys: Iterable[str] | None = None) -> None:
        """Write the files of admitted chunks now, in a worker thread: ``keys`` (those still
        pending and not being written by someone else), or all pending ones. Shielded from
        cancellation: a write is bounded by the disk, and a chunk left pending would live in
        memory only. A chunk that failed to write or was evicted meanwhile leaves no file and
        no entry."""
        wanted = self._pending if keys is None else keys
        todo = [k for k in dict.fromkeys(wanted) if k in self._pending and k not in self._writing]
        if not todo:
            return
        self._writing.update(todo)
        batch = [(k, self._path(k), self._pending[k]) for k in todo]

        def write_all(items: list[tuple[str, Path, bytes]]) -> list[OSError | None]:
            return [self._write_file(k, p, d) for k, p, d in items]

        try:
            with trio.CancelScope(shield=True):
                written = await trio.to_thread.run_sync(write_all, batch)
                for _ in range(ROOM_ATTEMPTS):  # a new directory's block may be wanted too
                    full = [i for i, f in enumerate(written) if _disk_full(f)]
                    need = sum(_on_disk(len(batch[i][2])) for i in full)
                    if not full or not self._make_room(need, keep=set(todo)):
                        break
                    retried = await trio.to_thread.run_sync(write_all, [batch[i] for i in full])
                    for i, failure in zip(full, retried, strict=True):
                        written[i] = failure
        finally:
            self._writing.difference_update(todo)
            evicted = self._evicted_writing.intersection(todo)
            self._evicted_writing.difference_update(todo)
        again = []
        for (key, path, _), failure in zip(batch, written, strict=True):
            if failure is not None:
                self._write_failed(key, failure)
            if key not in evicted:  # still the copy written: nothing else replaces a pending one
                self._unpend(key)
                if failure is not None:
                    self._forget(key, keep_memory=True)
            elif key not in self._lru:  # evicted while it was written: no file, no entry
                with contextlib.suppress(OSError):
                    path.unlink()
            elif key in self._pending:  # evicted (its file maybe unlinked) and admitted again
                again.append(key)
        if again:
            await self.write_pending(again)

    async def write_served(self, keys: Iterable[str]) -> None:
        """Write the still-pending files of ``keys``, chunks a read was just served, before
        the read returns (module doc); those fetched ahead of reads stay the writer's."""
        await self.write_pending([k for k in keys if k not in self._ahead])

    async def write_behind(self, keys: Iterable[str], *, ahead: bool = False) -> None:
        """Leave the files of ``keys`` (chunks no read is waiting for) to the writer task
        (:meth:`run_writer`, module doc); without one, or with more than ``memory_bytes``
        pending, write them now (:meth:`write_pending`). ``ahead``: fetched ahead of reads
        (prefetch, background fetch), so a read served one does not write it
        (:meth:`write_served`)."""
        if ahead:
            self._ahead.update(k for k in keys if k in self._pending)
        if self._wake is not None:
            self._wake.set()
            if self._pending_bytes <= self.memory_bytes:
                return
        await self.write_pending(keys)

    async def run_writer(
        self,
        *,
        quiet: float = WRITE_QUIET,
        most: float = WRITE_MOST_DELAY,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The write-behind writer (module doc) until cancelled, then it writes what is left;
        start it with ``await nursery.start(cache.run_writer)``. One at a time per cache
        (RuntimeError). ``quiet``, ``most``: seconds (:data:`WRITE_QUIET`,
        :data:`WRITE_MOST_DELAY`)."""
        if self._wake is not None:
            raise RuntimeError("the chunk cache's writer already runs")
        self._wake = trio.Event()
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                latest = trio.current_time() + most
                while self._pending_bytes < self.memory_bytes // 2:
                    with trio.move_on_at(min(latest, trio.current_time() + quiet)) as waited:
                        await self._wake.wait()
                        self._wake = trio.Event()
                    if waited.cancelled_caught:
                        break  # quiet for `quiet` seconds, or the first chunk waited `most`
                await self.write_pending()
        finally:
            self._wake = None
            with trio.CancelScope(shield=True):
                await self.write_pending()

    def _forget(self, key: str, *, keep_memory: bool = False) -> None:
        """Drop ``key`` from the cache (``keep_memory``: but for the memory cache, which
        then holds it alone: its file could not be written)."""
        self._unpend(key)
        if not keep_memory:
            data = self._mem.pop(key, None)
            if data is not None:
                self._mem_total -= len(data)
        size = self._lru.pop(key, None)
        if size is not None:
            self._total -= size

    def _make_room(self, nbytes: int, keep: set[str]) -> bool:
        """Delete least recently used chunk files (not ``keep``, nor those pending or being
        written) until about ``nbytes`` are freed, for chunks the disk refused for want of
        space; whether any went. Their bytes stay in the memory cache (:meth:`_evict`).

        Why: a cache whose own files fill its disk below ``cache_max_bytes`` (the 10 GiB
        default on a smaller disk) never evicted, so it kept its oldest chunks and cached no
        new one for good: on a 2 MiB disk, after four 0.9 MB images were read, a restarted
        store read the two most recent from the registry again and the two oldest from disk."""
        freed = 0
        for key in list(self._lru):
            if freed >= nbytes:
                break
            if key in keep or key in self._pending or key in self._writing:
                continue
            size = self._lru.pop(key)
            self._total -= size
            freed += _on_disk(size)
            self.stats.evictions += 1
            with contextlib.suppress(OSError):
                self._path(key).unlink()
        return freed > 0

    def _evict(self) -> None:
        """Delete least recently used chunk files until the cache fits ``max_bytes``.

        A chunk evicted stays in the memory cache (bounded by ``memory_bytes`` on its own), as
        one the disk refused does: the kernel reads a chunk in 128 KiB pieces, and a chunk
        just fetched that alone exceeds the limit (a 4 MiB chunk under ``cache_max_bytes`` of
        1 MiB), or that other reads' chunks pushed out meanwhile, was fetched again for each
        piece: an 8 MiB file of 4 MiB chunks cost 180 MB from the registry here."""
        while self._total > self.max_bytes and self._lru:
            key, size = self._lru.popitem(last=False)
            self._total -= size
            self.stats.evictions += 1
            if key in self._writing:
                self._evicted_writing.add(key)
            if self._unpend(key) is not None and key not in self._writing:
                continue  # never written: no file
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # a failing cache disk never fails the read that evicts
                log.warning("chunk cache eviction of %s failed: %s", key, exc)

    def begin(
        self, key: str, hurry: tuple[Hurry, tuple[int, int]] | None = None, owner: object = None
    ) -> _InFlight | None:
        """Claim ``key`` for a batch fetch; None when someone else is already fetching it.
        ``hurry``: how a waiter puts the claimed bytes on the wire now, if they may not be
        (:attr:`_InFlight.hurry`); ``owner``: the claimant (:meth:`claimant`)."""
        if key in self._inflight:
            return None
        self.stats.misses += 1
        flight = self._inflight[key] = _InFlight(hurry=hurry, owner=owner)
        return flight

    def claimant(self, key: str) -> object:
        """The ``owner`` the claim on ``key`` was made with (None: no claim, or none said)."""
        flight = self._inflight.get(key)
        return None if flight is None else flight.owner

    def hurries(self, keys: Iterable[str]) -> dict[Hurry, list[tuple[int, int]]]:
        """Of the claims on ``keys``, those whose bytes may not be on the wire yet: their
        claimants' hurry functions, each with the blob ranges to pass it."""
        out: dict[Hurry, list[tuple[int, int]]] = {}
        for key in keys:
            flight = self._inflight.get(key)
            if flight is not None and flight.hurry is not None:
                fn, span = flight.hurry
                out.setdefault(fn, []).append(span)
        return out

    def finish(self, key: str, data: bytes | None, error: BaseException | None = None) -> None:
        """Complete a :meth:`begin` claim with the verified bytes or the error; the bytes are
        served at once and reach the disk when the fetcher has them written
        (:meth:`write_pending` or :meth:`write_behind`)."""
        flight = self._inflight.pop(key, None)
        if data is not None:
            self._admit(key, data)
        if flight is not None:
            flight.data, flight.error = data, error
            flight.done.set()

    async def wait_inflight(self, key: str) -> bytes | None:
        """If ``key`` is being fetched, wait and return its bytes (raise its error)."""
        flight = self._inflight.get(key)
        if flight is None:
            return None
        self.stats.deduplicated += 1
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.data


def _disk_full(failure: OSError | None) -> bool:
    """Whether a chunk file write failed for want of space (or of the user's quota)."""
    return failure is not None and failure.errno in (errno.ENOSPC, errno.EDQUOT)


def _on_disk(size: int) -> int:
    """The bytes a file of ``size`` bytes takes on disk, in whole :data:`_BLOCK` blocks."""
    return -(-size // _BLOCK) * _BLOCK
