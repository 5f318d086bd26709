"""Image reference → manifest/config → layer, with bounded waits and reference counts.

Why one manager: c/image looks up every layer of an image in parallel and stats ``diff``,
``info`` and ``blob`` of each; all of that must cost one manifest+config fetch per image and
one footer+TOC fetch per layer. Resolutions are shared tasks that run in the store's nursery,
so a lookup that gives up after ``resolve_timeout_sec`` (answering an errno, the runtime then
pulls normally) does not cancel work a later lookup can use.

Layers are keyed by their compressed blob digest, whichever name they were looked up by (the
manifest digest for podman < 5.1, the TOC digest for podman ≥ 5.1) and whichever image they
belong to: two images sharing a layer share one :class:`~store.layer.Layer` and one reference
count, when both annotate it with the TOC digest it was verified against (an image naming
another one for the loaded blob gets :class:`ResolveError` for it, not a layer nothing checked
that digest of). At count zero the layer is released: background fetching stops and its
memory goes once the kernel forgets its inodes; its chunks stay in the disk cache.

A layer is served only when it is eStargz or zstd:chunked and verifiable: its descriptor must
carry the TOC digest annotation (eStargz ``containerd.io/snapshot/stargz/toc.digest``, or
zstd:chunked's ``manifest-checksum`` with its ``manifest-position``), and the TOC fetched from
the blob must hash to it. Anything else raises :class:`NotEstargzError` (→ ENOENT, normal
pull) or :class:`ResolveError` (→ EIO). A layer whose own bytes fail a check (footer, TOC
digest, any rule of the format library's validated index, the ``toc_max_bytes`` /
``toc_max_entries`` / ``chunk_max_bytes`` caps) raises :class:`LayerRefused` (→ EIO): logged
once with its cause and remembered, so later lookups answer at once without refetching. A
zstd:chunked layer is looked up by the value containers/storage ≥ 1.54 uses as its TOC digest
(``toc.GetTOCDigest``: the manifest checksum annotation itself), and its ``info`` says
``compression`` 4 (``archive.Zstd``).

A blob an image lists more than once (identical layers, e.g. two empty ones) is not served
either: the runtime looks each occurrence up under the same ``<ref>/<digest>`` directory, and
overlayfs refuses to mount one directory as two lower layers (ELOOP, "too many levels of
symbolic links"), so such a layer is pulled normally, once per occurrence.

A reference naming an index (a multi-platform image) resolves to this host's manifest, but the
runtime may pull another platform's (``podman pull --platform``, ``--arch``, ``--variant``) and
passes the store only the reference and the layer's digest. A layer looked up that this host's
manifest lacks is looked for in the index's other manifests (:meth:`ImageInfo.holder`), which
are fetched with their configs on the first such lookup, once per resolution of the reference
(:data:`PLATFORM_MANIFESTS_MAX` of them at most), and served as that manifest describes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import itertools
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from store.cache import ChunkCache
from store.config import StoreConfig
from store.estargz import (
    MANIFEST_CHECKSUM_KEY,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_COMPRESSION,
    EstargzError,
    TocLimits,
    ZstdChunkedLayer,
    zstd_chunked_layer,
)
from store.estargz_view import (
    EstargzLayerView,
    FetchRanges,
    footer_read_takes_whole,
    load_layer_index,
    measure_tar_size,
)
from store.layer import AheadBlob, BlobReader, Layer
from store.libprefetch import LibraryPrefetcher
from store.prefetch import WireOrder
from store.priority import Foreground
from store.pullorder import TurnKey, Turns
from store.registry.errors import ManifestError, RegistryError
from store.registry.manifest import Descriptor, ManifestResult, config_diff_ids, sha256_digest
from store.timeline import Timeline, span
from store.tree import LayerTree, TreeError

log = logging.getLogger(__name__)

GZIP_COMPRESSION = 2  # containers/storage archive.Gzip
# The eStargz layers of one image loaded with it, before their lookup
# (LayerManager._start_indexes); the rest load when looked up, losing only the early start.
# Real images have well under 128 layers (Docker's builder stops at 125); a manifest listing
# thousands (a hostile one can, within its 4 MiB) must not start thousands of TOC fetches.
EARLY_LOADS_MAX = 128
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # fullmatch: "$" would let a final "\n" pass
# A lookup naming a layer the cached resolution of its image lacks re-resolves the image
# (its tag was pushed again: the runtime looks up the layers of the manifest it fetched), at
# most once per this many seconds per image.
IMAGE_REFRESH_AFTER = 1.0
# An image's manifest and config fetch, shared by the lookups that come meanwhile, fails after
# this many resolve bounds: a registry that sends them a byte at a time (each read within its
# timeout) otherwise kept the shared fetch, and every later lookup of the image, waiting for
# good. Two: a lookup joining the fetch half-way still gets its answer within its own bound.
IMAGE_FETCH_BOUNDS = 2
# Resolutions of a ref kept after its tag moved, so that the layers of the images it named
# before are still found (containers made from them look their layers up again).
SUPERSEDED_KEPT = 4
# Releases listed in ``status`` (the most recent): the list must not grow with the store's age.
RELEASED_KEPT = 256
# The other manifests of an index fetched (with their configs) to find a layer this host's
# manifest lacks, at most: an index lists one per platform (docker.io's official images up to
# nine, beside as many attestation manifests, which are not fetched); a hostile one can list
# thousands within its 4 MiB. Those past the first are not searched (logged).
PLATFORM_MANIFESTS_MAX = 16
# Of those, fetched at once.
PLATFORM_FETCHES_AT_ONCE = 4
# buildx's attestation manifests (annotation ``vnd.docker.reference.type``) hold no layers of
# an image; their platform is ``unknown/unknown``.
ATTESTATION_MANIFEST = "attestation-manifest"


class ResolveError(Exception):
    """The layer or image could not be resolved (registry error, bad TOC …)."""


class NotEstargzError(ResolveError):
    """Not something this store serves: no such layer, or not a verifiable eStargz layer."""


class LayerRefused(ResolveError):
    """The layer's own bytes are not a valid eStargz layer (bad footer, TOC digest or entry).

    Final: logged once, and every later lookup answers at once without fetching again."""


class ResolveTimeout(ResolveError):
    """Resolution did not finish within the bounded wait (it goes on in the background)."""


@dataclass
class LayerDesc:
    digest: str
    size: int
    annotations: dict[str, str]
    diff_id: str
    media_type: str = ""

    @property
    def toc_digest(self) -> str | None:
        """eStargz's TOC digest annotation, else zstd:chunked's manifest checksum; None for
        a layer carrying both eStargz's and podman 5's key (containers/storage's
        ``toc.GetTOCDigest`` refuses it too: "both zstd:chunked and eStargz TOC found")."""
        estargz_digest = self.annotations.get(TOC_DIGEST_ANNOTATION)
        if estargz_digest is not None:
            if MANIFEST_CHECKSUM_KEY in self.annotations:
                return None
            return estargz_digest
        zstd = self.zstd_chunked
        return zstd.checksum if zstd is not None else None

    @functools.cached_property
    def zstd_chunked(self) -> ZstdChunkedLayer | None:
        """The zstd:chunked annotations (None: none, malformed, or an eStargz layer)."""
        if TOC_DIGEST_ANNOTATION in self.annotations:
            return None  # eStargz (or stargz-snapshotter's zstd, read through its footer)
        try:
            return zstd_chunked_layer(self.annotations)
        except EstargzError as exc:
            log.warning("layer %s: unusable zstd:chunked annotations: %s", self.digest, exc)
            return None

    @property
    def compression(self) -> int:
        """containers/storage's ``archive.Compression`` of the blob (``info``)."""
        if self.media_type.endswith("+zstd") or self.zstd_chunked is not None:
            return ZSTD_COMPRESSION
        return GZIP_COMPRESSION


_RESOLUTIONS = itertools.count()


@dataclass
class ImageInfo:
    ref: str
    manifest_bytes: bytes
    config_bytes: bytes
    layers: list[LayerDesc]
    serial: int = field(default_factory=lambda: next(_RESOLUTIONS))  # one per resolution
    resolved_at: float = field(default_factory=time.monotonic)
    # The platform of an index's other manifest this is ("": the one the reference resolves
    # to, this host's; LayerManager._other_platforms).
    platform: str = ""
    # The index's other manifests (:meth:`holder`), fetched on the first lookup of a layer
    # this one lacks and kept as long as this resolution is: a table of one shared task
    # (key ``""``; LayerManager._shared) whose value is their list ([]: ``ref`` names no index).
    others: dict[str, _Task] = field(default_factory=dict, repr=False)
    # Its layers started loading (another platform's: when a first one was found in it).
    early_started: bool = False

    def find(self, digest: str) -> tuple[LayerDesc, bool] | None:
        """The layer named ``digest``; the flag says it was named by TOC digest (new protocol)."""
        for desc in self.layers:
            if desc.digest == digest:
                return desc, False
        for desc in self.layers:
            if desc.toc_digest == digest:
                return desc, True
        return None

    def holder(self, digest: str) -> ImageInfo | None:
        """The manifest the layer named ``digest`` is served from: this one when it names it
        (:meth:`find`), else the first of the index's other manifests fetched so far that
        does; None when none does (or they are not fetched yet)."""
        if self.find(digest) is not None:
            return self
        task = self.others.get("")
        if task is None or not task.done.is_set() or not task.value:
            return None
        return next((o for o in task.value if o.find(digest) is not None), None)

    def servable(self, digest: str) -> tuple[LayerDesc, bool]:
        """:meth:`find`, refusing (:class:`NotEstargzError`) a layer the store cannot serve:
        not in the image, not eStargz, or listed more than once (see the module docstring)."""
        found = self.find(digest)
        if found is None:
            raise NotEstargzError(f"{self.ref}: no layer {digest}")
        desc = found[0]
        if desc.toc_digest is None:
            why = (
                "carries both eStargz's and zstd:chunked's TOC annotation"
                if TOC_DIGEST_ANNOTATION in desc.annotations
                else "is neither eStargz nor zstd:chunked (no TOC digest annotation)"
            )
            raise NotEstargzError(
                f"{self.ref}: layer {desc.digest} ({desc.media_type or 'no media type'}) {why}, "
                "so it is pulled normally"
            )
        if (n := sum(1 for d in self.layers if d.digest == desc.digest)) > 1:
            raise NotEstargzError(
                f"{self.ref}: layer {desc.digest} is listed {n} times; overlayfs cannot mount"
                " one directory as several lower layers, so it is pulled normally"
            )
        return found


class RegistryAccess:
    """What the manager needs from the registry; implemented over ``store.registry``."""

    async def image(
        self, ref: str, on_layers: Callable[[list[LayerDesc]], None] | None = None
    ) -> tuple[bytes, bytes, list[LayerDesc]]:
        """Manifest bytes, config bytes and the layers (diff IDs from the config) of ``ref``.

        ``on_layers``, if given, receives the manifest's layers as soon as the manifest is
        known, before the config is fetched (their ``diff_id`` is still ``""``): their loads
        need only digest, size and annotations, so they start one round trip earlier."""
        raise NotImplementedError

    def blob(self, ref: str, digest: str, size: int) -> BlobReader:
        raise NotImplementedError

    async def index_manifests(self, ref: str) -> list[Descriptor]:
        """The manifests listed by the index ``ref`` names, in its order; [] when ``ref``
        names an image manifest (the default: a registry that serves no index)."""
        return []

    async def index_image(self, ref: str, digest: str) -> tuple[bytes, bytes, list[LayerDesc]]:
        """:meth:`image` of the manifest ``digest`` in ``ref``'s repository (an entry of the
        index ``ref`` names)."""
        raise NotImplementedError

    async def remembered(self, ref: str) -> list[tuple[bytes, bytes, list[LayerDesc]]]:
        """Earlier resolutions of the tag ``ref`` as :meth:`image` answered them (most recent
        first), kept across restarts (:mod:`store.resolutions`); none by default."""
        return []

    def also_from(self, blob: BlobReader, ref: str) -> None:
        """``ref``, another image's reference, names ``blob``'s blob too (one layer is loaded
        per blob digest): its reads may go there when the registry ``blob`` was made for
        fails them. Nothing by default."""


@dataclass
class _Task:
    done: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None


class LayerPhase(enum.Enum):
    """Where one layer (keyed by its blob digest) is in its life."""

    LOADING = "loading"  # footer + TOC being fetched, verified and parsed
    LOADED = "loaded"  # loaded with its image, not looked up yet: expires after early_ttl
    RESOLVED = "resolved"  # looked up: counted, background-fetched; unused, it expires too
    FAILED = "failed"  # the load failed: the next lookup loads it again
    REFUSED = "refused"  # the layer's own bytes are invalid: final, answered at once
    RELEASED = "released"  # no references left, or expired: the next lookup loads afresh


@dataclass
class _LayerState:
    """One layer's state machine. ``LOADING`` → ``LOADED`` (loaded with its image) or
    ``RESOLVED`` (looked up meanwhile) or ``FAILED`` / ``REFUSED``; ``LOADED`` → ``RESOLVED``
    on its first lookup, or ``RELEASED`` when it expires; ``RESOLVED`` → ``RELEASED`` when
    its last reference goes, or when no ``use`` counted one within ``early_ttl``. Every
    transition happens in :class:`LayerManager`."""

    source: BlobReader  # the registry's blob the layer reads (RegistryAccess.blob)
    phase: LayerPhase = LayerPhase.LOADING
    settled: trio.Event = field(default_factory=trio.Event)  # set when LOADING ends
    wanted: bool = False  # looked up (while loading: resolve as soon as loaded)
    layer: Layer | None = None
    error: BaseException | None = None
    # Set when the state leaves the manager's table: its expiry timers end then, rather than
    # keep the released layer (tree, index, read streams) in memory until they fire.
    ended: trio.Event = field(default_factory=trio.Event)


# Resolved images (manifest, config, layer list) kept for later lookups, least recently used
# dropped first: the Go stargz-store's pool of resolved references keeps 30 too.
IMAGE_CACHE_ENTRIES = 30


class _LRU(OrderedDict[str, _Task]):
    """A task table that keeps its ``capacity`` most recently used entries."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key: str, value: _Task) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


@dataclass
class LayerManager:
    """Resolves images and layers, counts references, keeps per-layer status.

    Images: a bounded LRU of shared resolutions. Layers: one :class:`LayerPhase` state
    machine per blob digest (:class:`_LayerState`); each loaded layer runs its background
    work in its own nursery, cancelled whole when the layer is released."""

    config: StoreConfig
    registry: RegistryAccess
    cache: ChunkCache
    nursery: trio.Nursery
    on_layer_fetch: Callable[[Layer, int, float], None] | None = None
    on_file_access: Callable[[Layer, Any], None] | None = None
    on_read: Callable[[Layer], None] | None = None
    # The pull timeline (store.timeline; None: off, as without `timeline_path`).
    timeline: Timeline | None = None
    _images: _LRU = field(default_factory=lambda: _LRU(IMAGE_CACHE_ENTRIES))
    # Per ref, the resolutions a moved tag's fresh one replaced (the most recent last).
    _superseded: OrderedDict[str, list[ImageInfo]] = field(default_factory=OrderedDict)
    _states: dict[str, _LayerState] = field(default_factory=dict)
    _refcount: dict[str, int] = field(default_factory=dict)
    # (ref, lookup name) → blob digest of each counted layer: a release still finds its layer
    # after the image left the LRU (the name may be a TOC digest).
    _counted: dict[tuple[str, str], str] = field(default_factory=dict)
    # (ref, lookup name) → the references counted under that name and not released yet: a
    # name goes from ``_counted`` with its last one, not only with the layer's last one.
    _name_uses: dict[tuple[str, str], int] = field(default_factory=dict)
    _limiter: trio.CapacityLimiter | None = None
    released: list[str] = field(default_factory=list)
    _trim_running: bool = False
    _trim_pending: bool = False
    # Fetches a starting program's libraries ahead of ld.so, and what a container's start
    # reads first (None: prefetch_libraries and prefetch_entrypoint both off).
    libraries: LibraryPrefetcher | None = None
    # A layer loaded with its image but not looked up within this many seconds is dropped
    # (the runtime had it already, or gave up): its tree and prefetched bytes are not kept.
    # So is one looked up but not used (containers/storage counts a reference, ``use``, right
    # after its lookup): its background fetch stops. The store passes its config's
    # ``resolve_result_entry_ttl_sec`` (the Go store's TTL of resolved layers, 120 s).
    early_ttl: float = 120.0
    # Told of each layer this manager releases (the filesystem drops the trees the kernel no
    # longer holds).
    on_released: Callable[[Layer], None] | None = None
    # TOC decodes and index builds, one at a time: the layers podman looked up first, bottom
    # layer first (store.pullorder).
    _parse_turns: Turns = field(default_factory=Turns)
    # Reads, look-aheads, loads and prefetches, store-wide: the background fetch waits for
    # 5 s of quiet and yields to them (store.priority).
    foreground: Foreground = field(default_factory=Foreground)
    # Early downloads whose TOCs rank their pieces take turns on the wire by rank, store-wide.
    wire: WireOrder = field(default_factory=WireOrder)

    def __post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(max(1, self.config.max_concurrency))
        if self.config.prefetch_libraries or self.config.prefetch_entrypoint:
            self.libraries = LibraryPrefetcher(
                self.image_layers,
                self.image_whole,
                self.nursery,
                prefetching=not self.config.noprefetch,
                libraries=self.config.prefetch_libraries,
                entrypoint=self.config.prefetch_entrypoint,
            )

    def image_whole(self, ref: str) -> tuple[int, bytes, list[Layer]] | None:
        """Image ``ref``'s resolution (its serial number), config JSON bytes and layers,
        topmost first — None unless it is resolved and every one of its layers is loaded
        (all of them lazily served). Of an index, the manifest :meth:`_taken` says."""
        image = self._taken(ref)
        if image is None:
            return None
        layers = self._loaded(image)
        if len(layers) != len(image.layers):
            return None
        return image.serial, image.config_bytes, layers

    def image_layers(self, ref: str) -> list[Layer]:
        """The loaded layers of image ``ref``, topmost first ([] if it is not resolved); of
        an index, those of the manifest :meth:`_taken` says."""
        image = self._taken(ref)
        return [] if image is None else self._loaded(image)

    def _taken(self, ref: str) -> ImageInfo | None:
        """The manifest of ``ref``'s resolution the runtime took: another platform's of its
        index (:meth:`_other_platforms`) when all of its layers were looked up and not all of
        this host's were (the runtime pulled that platform), else this host's. None: not
        resolved."""
        task = self._images.get(ref)
        if task is None or not task.done.is_set() or task.value is None:
            return None
        image: ImageInfo = task.value
        others = image.others.get("")
        if others is None or not others.done.is_set() or not others.value:
            return image
        for candidate in (image, *others.value):
            states = [self._states.get(desc.digest) for desc in candidate.layers]
            if all(s is not None and s.wanted and s.layer is not None for s in states):
                return candidate
        return image

    def _loaded(self, image: ImageInfo) -> list[Layer]:
        """The loaded layers of ``image``, topmost first."""
        out = []
        for desc in reversed(image.layers):
            state = self._states.get(desc.digest)
            if state is not None and state.layer is not None and not state.layer.released:
                out.append(state.layer)
        return out

    # -- validation --------------------------------------------------------------------------

    @staticmethod
    def valid_ref(ref: str) -> bool:
        from store.registry.reference import Reference

        try:
            Reference.parse(ref)
        except ValueError:
            return False
        return True

    @staticmethod
    def valid_digest(digest: str) -> bool:
        return bool(_DIGEST.fullmatch(digest))

    # -- shared, bounded tasks ---------------------------------------------------------------

    async def _shared(
        self,
        table: dict[str, _Task],
        key: str,
        work: Callable[[], Awaitable[Any]],
        what: str,
        deadline: float | None = None,
    ) -> Any:
        task = table.get(key)
        if task is None or (
            task.done.is_set()
            and task.error is not None
            and not isinstance(task.error, LayerRefused)  # a bad layer stays bad
        ):
            task = table[key] = _Task()
            self.nursery.start_soon(self._run, task, work)
        if deadline is None:
            deadline = trio.current_time() + self.config.resolve_timeout_sec
        with trio.move_on_at(deadline):
            await task.done.wait()
        if not task.done.is_set():
            raise ResolveTimeout(f"{what}: no answer within {self.config.resolve_timeout_sec}s")
        if task.error is not None:
            if isinstance(task.error, ResolveError):
                raise type(task.error)(str(task.error))
            raise ResolveError(f"{what}: {task.error}")
        return task.value

    @staticmethod
    async def _run(task: _Task, work: Callable[[], Awaitable[Any]]) -> None:
        try:
            task.value = await work()
        except Exception as exc:
            task.error = _frameless(exc)
        finally:
            task.done.set()

    # -- images ------------------------------------------------------------------------------

    async def image(self, ref: str, deadline: float | None = None) -> ImageInfo:
        """Image ``ref``'s resolution, shared; waits until ``deadline`` (default: the
        resolve bound from now)."""

        async def work() -> ImageInfo:
            bound = IMAGE_FETCH_BOUNDS * self.config.resolve_timeout_sec
            try:
                with (
                    self.foreground.busy(),  # a pull: no background fetch meanwhile
                    span(self.timeline, "manifest", ref=ref),
                    trio.fail_after(bound),
                ):
                    manifest, config, layers = await self.registry.image(
                        ref, on_layers=partial(self._start_indexes, ref)
                    )
            except trio.TooSlowError:
                raise ResolveError(
                    f"{ref}: manifest and config not in within {bound:g}s "
                    f"({IMAGE_FETCH_BOUNDS} x resolve_timeout_sec)"
                ) from None
            except ResolveError:
                raise
            except Exception as exc:
                raise ResolveError(f"{ref}: {exc}") from exc
            self._start_indexes(ref, layers)  # a no-op for the layers already loading
            return ImageInfo(ref, manifest, config, layers)

        return await self._shared(self._images, ref, work, f"image {ref}", deadline)

    async def _image_naming(self, ref: str, digest: str, deadline: float) -> ImageInfo:
        """The manifest of ``ref`` that names ``digest`` (:meth:`ImageInfo.holder`):
        :meth:`image`'s, else one of a resolution it superseded (the layers of containers
        made before the tag moved are still looked up), else another platform's of the index
        ``ref`` names (:meth:`_other_platforms`), else :meth:`image` resolved afresh once,
        when the cached resolution is older than :data:`IMAGE_REFRESH_AFTER` (the tag moved;
        the one it replaces is kept), and its index's. None naming it: :meth:`image`'s
        (whose ``servable`` refuses the digest)."""
        image = await self.image(ref, deadline)
        for known in (image, *reversed(self._superseded.get(ref, ()))):
            if (holder := known.holder(digest)) is not None:
                return holder
        if (holder := await self._other_platforms(image, digest, deadline)) is not None:
            return holder
        if (holder := await self._remembered(ref, digest)) is not None:
            return holder
        if time.monotonic() - image.resolved_at < IMAGE_REFRESH_AFTER:
            return image
        task = self._images.get(ref)
        if task is not None and task.done.is_set() and task.value is image:
            del self._images[ref]
        fresh = await self.image(ref, deadline)
        if fresh is not image:
            kept = self._superseded.pop(ref, [])
            kept.append(image)
            self._superseded[ref] = kept[-SUPERSEDED_KEPT:]  # the most recent ref last
            while len(self._superseded) > IMAGE_CACHE_ENTRIES:
                self._superseded.popitem(last=False)
            if fresh.find(digest) is None:
                return await self._other_platforms(fresh, digest, deadline, image) or fresh
        return fresh

    async def _remembered(self, ref: str, digest: str) -> ImageInfo | None:
        """The resolution of ``ref`` kept from before a restart
        (:meth:`RegistryAccess.remembered`) that names ``digest``, kept in memory from then
        on as a superseded one; None when none does. A container made before the tag moved
        looks its layers up by the tag again when it starts: without it, a restarted store
        answered ENOENT for them, and the image no longer ran."""
        known = {i.manifest_bytes for i in self._superseded.get(ref, ())}
        for manifest, config, layers in await self.registry.remembered(ref):
            if manifest in known:
                continue  # searched already (in memory)
            # Another lookup may have kept it while this one read (c/image looks an image's
            # layers up in parallel): one copy, not one per layer pushing others out.
            same = (i for i in self._superseded.get(ref, ()) if i.manifest_bytes == manifest)
            if (image := next(same, None)) is not None:
                if image.find(digest) is not None:
                    return image
                continue
            image = ImageInfo(ref, manifest, config, layers)
            if image.find(digest) is not None:
                kept = self._superseded.pop(ref, [])
                kept.append(image)  # the one in use now: kept longest
                self._superseded[ref] = kept[-SUPERSEDED_KEPT:]
                while len(self._superseded) > IMAGE_CACHE_ENTRIES:
                    self._superseded.popitem(last=False)
                log.info(
                    "%s: layer %s is in the image the tag named before (manifest %s, kept "
                    "under --root), not in the one it names now: served from that one",
                    ref,
                    digest,
                    sha256_digest(manifest),
                )
                return image
        return None

    async def _other_platforms(
        self, image: ImageInfo, digest: str, deadline: float, previous: ImageInfo | None = None
    ) -> ImageInfo | None:
        """The other manifest of the index ``image.ref`` names that holds ``digest`` (a pull
        of another platform: ``podman pull --platform``); None when ``ref`` names no index or
        none of its manifests names the digest (logged, with the manifests searched).

        The index's manifests other than ``image``'s (each once, attestation manifests left
        out, the first :data:`PLATFORM_MANIFESTS_MAX`) and their configs are fetched on the
        first such lookup, shared by the lookups meanwhile, within :data:`IMAGE_FETCH_BOUNDS`
        resolve bounds, and kept with ``image``; one that fails to resolve is logged and not
        searched; one the search of ``previous`` (the resolution ``image`` replaces) fetched
        is not fetched again. The layers of the one found start loading then
        (:meth:`_start_indexes`), as an image's do when it is resolved: the runtime looks up
        its other layers next."""
        ref = image.ref

        async def work() -> list[ImageInfo]:
            bound = IMAGE_FETCH_BOUNDS * self.config.resolve_timeout_sec
            try:
                with self.foreground.busy(), trio.fail_after(bound):
                    return await self._fetch_other_platforms(image, previous)
            except trio.TooSlowError:
                raise ResolveError(
                    f"{ref}: the manifests of its index not in within {bound:g}s "
                    f"({IMAGE_FETCH_BOUNDS} x resolve_timeout_sec)"
                ) from None
            except ResolveError:
                raise
            except Exception as exc:
                raise ResolveError(f"{ref}: its index: {exc}") from exc

        others = await self._shared(
            image.others, "", work, f"image {ref}: the manifests of its index", deadline
        )
        holder = image.holder(digest)
        if holder is None:
            if others:
                log.info(
                    "%s: no manifest of its index names layer %s; searched %s",
                    ref,
                    digest,
                    ", ".join(
                        f"{sha256_digest(o.manifest_bytes)} ({o.platform or 'this host'})"
                        for o in (image, *others)
                    ),
                )
            return None
        if not holder.early_started:
            holder.early_started = True
            log.info(
                "%s: layer %s is in its index's %s manifest %s, not this host's: served from it",
                ref,
                digest,
                holder.platform or "platformless",
                sha256_digest(holder.manifest_bytes),
            )
            self._start_indexes(ref, holder.layers)
        return holder

    async def _fetch_other_platforms(
        self, image: ImageInfo, previous: ImageInfo | None
    ) -> list[ImageInfo]:
        """The resolutions of the manifests of the index ``image.ref`` names other than
        ``image``'s (see :meth:`_other_platforms`), in the index's order; none when the index
        no longer lists ``image``'s (the tag moved)."""
        ref = image.ref
        entries = await self.registry.index_manifests(ref)
        chosen = sha256_digest(image.manifest_bytes)
        if entries and all(d.digest != chosen for d in entries):
            # The tag moved since ``image`` was resolved: these are another image's manifests
            # (:meth:`_image_naming` resolves the reference afresh, and searches its index).
            log.info(
                "%s: its index no longer lists manifest %s (the tag moved): not searched",
                ref,
                chosen,
            )
            return []
        # Each manifest once (an index may list one under two platforms), in the index's order.
        unique: dict[str, Descriptor] = {}
        for d in entries:
            unique.setdefault(d.digest, d)
        candidates = [
            d
            for d in unique.values()
            if d.digest != chosen
            and (d.annotations or {}).get("vnd.docker.reference.type") != ATTESTATION_MANIFEST
        ]
        if len(candidates) > PLATFORM_MANIFESTS_MAX:
            log.warning(
                "%s: its index lists %d other manifests; only the first %d are searched for "
                "the layers of other platforms (the rest are pulled normally)",
                ref,
                len(candidates),
                PLATFORM_MANIFESTS_MAX,
            )
            del candidates[PLATFORM_MANIFESTS_MAX:]
        found: list[ImageInfo | None] = [None] * len(candidates)
        limiter = trio.CapacityLimiter(PLATFORM_FETCHES_AT_ONCE)
        search = None if previous is None else previous.others.get("")
        known = (
            {sha256_digest(o.manifest_bytes): o for o in search.value}
            if search is not None and search.done.is_set() and search.error is None
            else {}
        )

        async def fetch(i: int, desc: Descriptor) -> None:
            if desc.digest in known:  # fetched for ``previous``: a manifest never changes
                found[i] = known[desc.digest]
                return
            async with limiter:
                try:
                    manifest, config, layers = await self.registry.index_image(ref, desc.digest)
                except ResolveError as exc:
                    log.warning(
                        "%s: its index's %s manifest %s is not searched for layers: %s",
                        ref,
                        desc.platform_name or "platformless",
                        desc.digest,
                        exc,
                    )
                    return
            found[i] = ImageInfo(ref, manifest, config, layers, platform=desc.platform_name)

        async with trio.open_nursery() as nursery:
            for i, desc in enumerate(candidates):
                nursery.start_soon(fetch, i, desc)
        return [o for o in found if o is not None]

    def _start_indexes(self, ref: str, layers: list[LayerDesc]) -> None:
        """Load the eStargz layers of ``ref`` at once (the first :data:`EARLY_LOADS_MAX`),
        in the background, and prefetch them.

        Why: podman 4.3 looks the layers of an image up one after another, and each layer's
        footer+TOC costs a ranged request (a few round trips and ~1 MiB on a slow link);
        overlapping them as soon as the manifest is known (before its config: a load needs
        no diff ID) turns N waits into about one. The
        prioritized files (the region before the landmark) start downloading then too, while
        the runtime is still walking the layers. Such an early layer (``LOADED``) is not
        counted, listed or background-fetched until it is looked up. Their TOCs are parsed
        one at a time, those looked up first, then in the manifest's order (:mod:`store.pullorder`).
        The eStargz layers past the first :data:`EARLY_LOADS_MAX` load at their lookup.
        """
        batch = trio.current_time()
        estargz = 0
        for position, desc in enumerate(layers):
            if desc.toc_digest is None:
                continue
            estargz += 1
            if estargz > EARLY_LOADS_MAX:
                break
            state = self._states.get(desc.digest)
            if state is not None and state.phase not in (LayerPhase.FAILED, LayerPhase.RELEASED):
                continue
            state = self._load(ref, desc, early=True, order=(batch, position))
            self.nursery.start_soon(self._expire_early, desc.digest, state)

    def _load(
        self, ref: str, desc: LayerDesc, *, early: bool, order: tuple[float, int]
    ) -> _LayerState:
        """Start loading ``desc``. Its TOC's parse takes its turn (:class:`Turns`) by
        (not looked up yet, *order*): ``order`` is (when its image's layers started loading,
        its place in the manifest)."""
        old = self._states.get(desc.digest)
        if old is not None:  # FAILED: replaced
            old.ended.set()
        source = self.registry.blob(ref, desc.digest, desc.size)
        state = self._states[desc.digest] = _LayerState(source, wanted=not early)

        def priority() -> TurnKey:
            return (not state.wanted, *order)

        self.nursery.start_soon(self._run_load, ref, desc, state, early, priority)
        return state

    async def _run_load(
        self,
        ref: str,
        desc: LayerDesc,
        state: _LayerState,
        early: bool,
        priority: Callable[[], TurnKey],
    ) -> None:
        try:
            layer = await self._new_layer(ref, desc, priority, state.source)
        except Exception as exc:
            state.error = _frameless(exc)
            if state.phase is LayerPhase.LOADING:
                refused = isinstance(exc, LayerRefused)
                state.phase = LayerPhase.REFUSED if refused else LayerPhase.FAILED
            return
        finally:
            state.settled.set()
        state.layer = layer
        if state.phase is LayerPhase.RELEASED:  # its last reference went while it loaded
            layer.release()
            return
        state.phase = LayerPhase.LOADED
        if early:
            log.debug("layer %s of %s loaded before its lookup", desc.digest, ref)
            if not self.config.noprefetch:
                assert self._limiter is not None
                layer.start_prefetch(self._limiter, self.config.prefetch_timeout_sec)
        if state.wanted:
            self._resolve(ref, desc, state)

    def _resolve(self, ref: str, desc: LayerDesc, state: _LayerState) -> None:
        """``LOADED`` → ``RESOLVED``: the layer is looked up; its background fetch starts."""
        assert state.layer is not None and self._limiter is not None
        state.phase = LayerPhase.RESOLVED
        state.layer.start_background(
            prefetch=not self.config.noprefetch,
            background=not self.config.no_background_fetch,
            limiter=self._limiter,
            prefetch_timeout=self.config.prefetch_timeout_sec,
        )
        log.info("layer %s of %s resolved: %d nodes", desc.digest, ref, len(state.layer.tree.nodes))
        self.nursery.start_soon(self._expire_unused, desc.digest, state)

    async def _expire_early(self, digest: str, state: _LayerState) -> None:
        with trio.move_on_after(self.early_ttl):
            await state.ended.wait()
        if self._states.get(digest) is not state or state.wanted:
            return  # looked up meanwhile (or replaced, or released)
        self._end(digest, state)
        if state.layer is not None:
            state.layer.release()
        log.info("layer %s was loaded with its image but never looked up: dropped", digest)

    async def _expire_unused(self, digest: str, state: _LayerState) -> None:
        with trio.move_on_after(self.early_ttl):
            await state.ended.wait()
        if self._states.get(digest) is not state or self._refcount.get(digest):
            return  # in use (a use that was released since took the state with it)
        log.info("layer %s was looked up but never used: released", digest)
        self._drop(digest, state)

    def _drop(self, key: str, state: _LayerState, ref: str | None = None) -> None:
        """``RESOLVED`` → ``RELEASED``: background work cancelled, memory freed once the
        filesystem lets go of the tree (:attr:`on_released`); chunks stay in the disk cache."""
        self._end(key, state)
        assert state.layer is not None
        state.layer.release()
        self.released.append(key)
        del self.released[:-RELEASED_KEPT]
        if self.timeline is not None:
            self.timeline.event("released", layer=key, **({"ref": ref} if ref else {}))
            self.timeline.flush()
        if self.on_released is not None:
            self.on_released(state.layer)

    def _end(self, key: str, state: _LayerState) -> None:
        """Take ``state`` out of the table as ``RELEASED``; its expiry timers end now."""
        del self._states[key]
        state.phase = LayerPhase.RELEASED
        state.ended.set()

    async def layer_info(self, ref: str, digest: str) -> dict[str, Any]:
        """The ``info`` JSON for the protocol generation the lookup name implies."""
        deadline = trio.current_time() + self.config.resolve_timeout_sec
        image = await self._image_naming(ref, digest, deadline)
        desc, by_toc = image.servable(digest)
        if by_toc:
            return {
                "diff-size": -1,
                "compression": desc.compression,
                "toc-digest": digest,
                "flags": {"expected-layer-diffid": desc.diff_id},
            }
        info: dict[str, Any] = {
            "compressed-diff-digest": desc.digest,
            "compressed-size": desc.size,
            "diff-digest": desc.diff_id,
            "compression": desc.compression,
        }
        size = _uncompressed_size(
            desc.annotations.get(UNCOMPRESSED_SIZE_ANNOTATION), f"layer {desc.digest} of {ref}"
        )
        if size is not None:
            info["diff-size"] = size
        elif desc.zstd_chunked is not None and self.config.zstd_measure_diff_size:
            # No annotation carries a zstd:chunked tar's size, and podman 4.3's `podman save`
            # needs it: without it (0) save writes a 0-byte tar entry ("write too long"); -1
            # fails its image size ("size for layer is unknown"). Measuring costs a ranged
            # read per file (store/config.py), so only when configured, on the old protocol
            # only (podman ≥ 5.1 takes -1), within the resolve bound.
            layer = await self.get_layer(ref, digest, deadline)
            if isinstance(layer.index, EstargzLayerView):
                with trio.move_on_after(self.config.resolve_timeout_sec):
                    try:
                        measured = await measure_tar_size(layer.index, layer.blob)
                    except (EstargzError, RegistryError) as exc:
                        raise ResolveError(
                            f"layer {desc.digest} of {ref}: its tar size could not be measured "
                            f"(zstd_measure_diff_size): {exc}"
                        ) from exc
                    if measured is not None:
                        info["diff-size"] = measured
        return info

    # -- layers ------------------------------------------------------------------------------

    async def get_layer(self, ref: str, digest: str, deadline: float | None = None) -> Layer:
        """The loaded layer ``digest`` of ``ref``; image and layer together wait at most the
        resolve bound (until ``deadline`` when given).

        A layer the runtime holds a reference to under this name (``use``) is answered from
        memory, without the image's resolution: its lowerdir is looked up again whenever a
        container of its image starts (the kernel keeps the name ``entry_timeout`` seconds),
        and that resolution may have left the LRU (:data:`IMAGE_CACHE_ENTRIES` images pulled
        since, or the image that brought a shared base layer) while the registry is away or
        the tag has moved: every container start of the image failed with EIO."""
        if deadline is None:
            deadline = trio.current_time() + self.config.resolve_timeout_sec
        held = self._held(ref, digest)
        if held is not None:
            return held
        image = await self._image_naming(ref, digest, deadline)
        desc = image.servable(digest)[0]
        what = f"layer {ref}/{desc.digest}"
        while True:
            state = self._states.get(desc.digest)
            if state is not None and state.phase is LayerPhase.FAILED and not state.wanted:
                state.wanted = True  # an early load's failure answers its first lookup
            elif state is None or state.phase in (LayerPhase.FAILED, LayerPhase.RELEASED):
                # A layer whose load failed, or that was released, is loaded afresh.
                position = next(i for i, d in enumerate(image.layers) if d.digest == desc.digest)
                state = self._load(ref, desc, early=False, order=(trio.current_time(), position))
            elif not state.wanted:
                state.wanted = True
                if state.phase is LayerPhase.LOADED:
                    self._resolve(ref, desc, state)
            with trio.move_on_at(deadline):
                await state.settled.wait()
            if not state.settled.is_set():
                raise ResolveTimeout(f"{what}: no answer within {self.config.resolve_timeout_sec}s")
            if state.phase is not LayerPhase.RELEASED or state.error is not None:
                break
            # Its last reference went while it loaded (another runtime process released it):
            # that layer is released; this lookup loads it afresh, within the same bound.
        if state.error is not None:
            if isinstance(state.error, ResolveError):
                raise type(state.error)(str(state.error))
            raise ResolveError(f"{what}: {state.error}")
        assert state.layer is not None
        if state.layer.toc_digest != desc.toc_digest and not _verified_as(state.layer, desc):
            # Loaded for another image whose descriptor of this blob names another TOC digest:
            # the TOC was verified against that one, and this image's annotation is not the
            # blob's (a fresh load would refuse it: LayerRefused). Served under this name,
            # it would be vouched for by a TOC digest nothing checked. (Logged per lookup.)
            # A zstd blob's TOC has two digests of different kinds (_verified_as): either
            # annotation is the blob's own.
            raise ResolveError(
                f"{what}: {ref} annotates it with TOC digest {desc.toc_digest}, but its TOC "
                f"hashes to {state.layer.toc_digest} (verified for another image)"
            )
        self.registry.also_from(state.source, ref)
        return state.layer

    def _held(self, ref: str, digest: str) -> Layer | None:
        """The live layer counted (``use``) under ``ref`` and ``digest``, its blob or TOC
        digest, else None."""
        key = self._counted.get((ref, digest))
        state = None if key is None else self._states.get(key)
        if state is None or state.phase is not LayerPhase.RESOLVED or state.layer is None:
            return None
        layer = state.layer
        return None if layer.released or digest not in (layer.digest, layer.toc_digest) else layer

    async def _new_layer(
        self,
        ref: str,
        desc: LayerDesc,
        priority: Callable[[], TurnKey],
        source: BlobReader,
    ) -> Layer:
        assert desc.toc_digest is not None
        with self.foreground.busy():  # a pull: no background fetch meanwhile
            blob, index, tree = await self._load_index(ref, desc, priority, source)
        layer = Layer(
            key=f"{ref}/{desc.digest}",
            digest=desc.digest,
            toc_digest=desc.toc_digest,
            tree=tree,
            index=index,
            blob=blob,
            cache=self.cache,
            chunk_size=self.config.chunk_size,
            on_fetch=self.on_layer_fetch,
            on_file_access=self.on_file_access,
            on_read=self.on_read,
            foreground=self.foreground,
        )
        # One nursery per layer, for its prefetch, background fetch and read-ahead:
        # release() cancels it whole.
        await self.nursery.start(layer.run)
        if self.timeline is not None:
            self.timeline.event(
                "loaded",
                layer=desc.digest,
                toc_digest=desc.toc_digest,
                ref=ref,
                nodes=len(tree.nodes),
            )
        return layer

    async def _load_index(
        self, ref: str, desc: LayerDesc, priority: Callable[[], TurnKey], source: BlobReader
    ) -> tuple[BlobReader, EstargzLayerView, LayerTree]:
        """Footer+TOC of ``source`` → verified index and tree (the decoded TOC entries are
        freed); the parse waits for its turn (by ``priority()``,
        :class:`~store.pullorder.Turns`)."""
        assert desc.toc_digest is not None
        ahead = AheadBlob(source, desc.digest, wire=self.wire)
        # The prefetch region starts downloading once the TOC is verified, before its parse;
        # a gzip layer whose head says it starts with prioritized files, sooner still — unless
        # the footer read takes the whole blob: its head probe would only ask for the same
        # bytes again (a second ranged GET of every small layer).
        on_verified: Callable[[int | None, FetchRanges], None] | None = None
        if not self.config.noprefetch:

            def start_region(end: int | None, ranges: FetchRanges) -> None:
                ahead.start(end, self.nursery, ranges)

            on_verified = start_region
        if (
            not self.config.noprefetch
            and desc.zstd_chunked is None
            and not footer_read_takes_whole(source.size)
        ):
            ahead.speculate(self.nursery)
        limits = TocLimits(
            self.config.toc_max_bytes, self.config.toc_max_entries, self.config.chunk_max_bytes
        )
        marks = (
            None
            if self.timeline is None
            else self.timeline.bind(layer=desc.digest, toc_digest=desc.toc_digest, ref=ref)
        )
        try:
            index = await load_layer_index(
                ahead,
                desc.toc_digest,
                on_verified,
                limits,
                desc.zstd_chunked,
                marks,
                parse_turn=partial(self._parse_turns.turn, priority),
            )
            with span(marks, "tree"):
                tree = LayerTree(index.index)
        except BaseException as exc:
            ahead.drop()
            if isinstance(exc, EstargzError | TreeError):
                log.error(
                    "refusing layer %s of %s: %s: %s", desc.digest, ref, type(exc).__name__, exc
                )
                raise LayerRefused(f"layer {desc.digest} of {ref} refused: {exc}") from exc
            if isinstance(exc, ResolveError) or not isinstance(exc, Exception):
                raise
            raise ResolveError(f"layer {desc.digest} of {ref}: {exc}") from exc
        blob: BlobReader = ahead
        self._trim_memory()
        return blob, index, tree

    def _trim_memory(self) -> None:
        """Give the TOC's transient memory back to the OS, off the FUSE thread.

        A big TOC briefly costs ~100 MB of heap that glibc keeps after it is freed; its
        ``malloc_trim`` returns it (the store runs one malloc arena, so one trim covers every
        thread's frees). It runs in a worker thread (ctypes drops the GIL), and requests made
        while one runs are folded into one more. No ``gc.collect()``: the decoded TOC holds no
        reference cycles (a full collection found none and cost 0.2-0.8 s per 100k-entry
        layer, growing with the layers held).
        """
        if self._trim_running:
            self._trim_pending = True
            return
        self._trim_running = True
        self.nursery.start_soon(self._trim_loop)

    async def _trim_loop(self) -> None:
        try:
            self._trim_pending = True
            while self._trim_pending:
                self._trim_pending = False
                await trio.to_thread.run_sync(_malloc_trim)
        finally:
            self._trim_running = False

    def _blob_key(self, ref: str, digest: str) -> str:
        """The blob digest the layer ``ref`` names ``digest`` (its blob or TOC digest) is
        kept under: from the image's resolution, else from the looked-up layers.

        Why the layers too: a ``use`` (or ``rmdir``) names the layer as the runtime looked
        it up, and the image's resolution may have left the LRU since (30 other images
        resolved meanwhile, as a burst of pulls does). Counted under a TOC digest (podman
        ≥ 5.1's name) then, the reference held nothing: the layer in use was released as
        never used once ``early_ttl`` passed, its background fetch stopped."""
        task = self._images.get(ref)
        images = list(self._superseded.get(ref, ()))
        if task is not None and task.done.is_set() and task.error is None:
            images.append(task.value)
        for image in reversed(images):
            holder = image.holder(digest)
            if holder is not None:
                found = holder.find(digest)
                assert found is not None
                return found[0].digest
        if digest not in self._states:
            for key, state in self._states.items():
                layer = state.layer
                if (
                    state.phase is LayerPhase.RESOLVED
                    and layer is not None
                    and not layer.released
                    and digest == layer.toc_digest
                ):
                    return key
        return digest

    def _key(self, ref: str, digest: str) -> str:
        return self._counted.get((ref, digest)) or self._blob_key(ref, digest)

    def use(self, ref: str, digest: str) -> int:
        key = self._key(ref, digest)
        name = (ref, digest)
        self._counted[name] = key
        self._name_uses[name] = self._name_uses.get(name, 0) + 1
        self._refcount[key] = self._refcount.get(key, 0) + 1
        return self._refcount[key]

    def release(self, ref: str, digest: str) -> int:
        """Drop a reference; at zero a looked-up layer goes (``RELEASED``): its background
        work is cancelled and its memory freed, its chunks stay in the disk cache.

        A name (``ref`` and ``digest``) whose own references are all released is forgotten
        even while other names hold the layer: a base layer shared by the images of a
        container that runs for weeks otherwise kept an entry per image pulled and removed
        meanwhile (35 images pulled, run and removed: 37 names for 2 layers in use)."""
        key = self._key(ref, digest)
        name = (ref, digest)
        uses = self._name_uses.pop(name, 0) - 1
        if uses > 0:
            self._name_uses[name] = uses
        count = self._refcount.get(key, 0) - 1
        if count > 0:
            self._refcount[key] = count
            if uses <= 0:
                self._counted.pop(name, None)
            return count
        self._refcount.pop(key, None)
        for other in [n for n, k in self._counted.items() if k == key]:
            del self._counted[other]
            self._name_uses.pop(other, None)
        state = self._states.get(key)
        if state is not None and state.wanted:
            if state.phase is LayerPhase.RESOLVED:
                log.info("layer %s released: no references left", key)
                self._drop(key, state, ref)
            else:  # still loading: it goes when its load ends (_run_load)
                self._end(key, state)
                if state.layer is not None:
                    state.layer.release()
        return 0

    def refcount(self, ref: str, digest: str) -> int:
        return self._refcount.get(self._key(ref, digest), 0)

    def layers(self) -> list[Layer]:
        return [
            s.layer
            for s in self._states.values()
            if s.phase is LayerPhase.RESOLVED and s.layer is not None
        ]

    def status(self) -> dict[str, Any]:
        out = {}
        for layer in self.layers():
            st = layer.status()
            st["refcount"] = self._refcount.get(layer.digest, 0)
            out[layer.key] = st
        return {
            "layers": out,
            "released": list(self.released),
            "cache_bytes": self.cache.total_bytes,
        }


def _verified_as(layer: Layer, desc: LayerDesc) -> bool:
    """Whether ``layer``'s TOC was verified under the TOC digest ``desc`` annotates, of its
    kind: a zstd:chunked manifest checksum (the compressed TOC's) or eStargz's TOC digest
    (its JSON's). The loads record both for a zstd blob (``EstargzLayerView``)."""
    assert desc.toc_digest is not None
    view = layer.index
    if not isinstance(view, EstargzLayerView):
        return False
    return view.verified_as(desc.toc_digest, desc.zstd_chunked is not None)


def _uncompressed_size(value: str | None, where: str) -> int | None:
    """The layer descriptor's uncompressed-size annotation as ``info``'s ``diff-size``: a
    decimal int64 (ASCII digits: ``str.isdigit`` takes ``²``, which ``int`` refuses, and
    ``int`` refuses more than 4,300 digits), else None (``info`` then carries none, as for a
    layer without the annotation), with a warning naming it. A hint only: nothing is served
    by it."""
    if value is None:
        return None
    if value.isascii() and value.isdigit() and len(value) <= 19 and int(value) < 1 << 63:
        return int(value)
    log.warning(
        "%s: annotation %s is %r, not a byte count: info carries no diff-size",
        where,
        UNCOMPRESSED_SIZE_ANNOTATION,
        value[:80],
    )
    return None


def _frameless(exc: BaseException) -> BaseException:
    """``exc``, kept to answer later lookups with, without the tracebacks of it and of the
    exceptions it came from: they held the frames of the load that failed, and their locals
    with them. A refused layer is kept for the life of the store, and a 60,000-entry one
    whose TOC did not match its annotation held 3.4 MB (its compressed TOC) that way."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
        if isinstance(e, BaseExceptionGroup):
            todo += e.exceptions
    return exc


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: return free heap pages to the OS (blocking; a worker
    thread's job). Not glibc: nothing to do."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def manifest_layers(manifest: ManifestResult) -> list[LayerDesc]:
    """The manifest's layer descriptors, in order, before their diff IDs are known
    (``diff_id`` ``""``); :class:`~store.registry.manifest.ManifestResult` checked their
    shape (a bad one raised :class:`~store.registry.ManifestError` naming the field)."""
    return [
        LayerDesc(
            digest=d.digest,
            size=d.size,
            annotations=dict(d.annotations or {}),
            diff_id="",
            media_type=d.media_type,
        )
        for d in manifest.layers
    ]


def layer_descs(ref: str, manifest: ManifestResult, config: dict[str, Any]) -> list[LayerDesc]:
    """Pair manifest layer descriptors with the config's diff IDs; :class:`ResolveError`
    names ``ref``, the config and what is wrong."""
    layers = manifest_layers(manifest)
    try:
        diff_ids = config_diff_ids(config)
    except ManifestError as exc:
        raise ResolveError(f"{ref}: config {manifest.config.digest}: {exc}") from None
    if len(layers) != len(diff_ids):
        raise ResolveError(
            f"{ref}: manifest has {len(layers)} layers but config {manifest.config.digest} "
            f"has {len(diff_ids)} rootfs.diff_ids"
        )
    for desc, diff_id in zip(layers, diff_ids, strict=True):
        desc.diff_id = diff_id
    return layers


def decode_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ResolveError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ResolveError(f"{what} is not a JSON object")
    return value


__all__ = [
    "EstargzLayerView",
    "ImageInfo",
    "LayerDesc",
    "LayerManager",
    "LayerRefused",
    "NotEstargzError",
    "RegistryAccess",
    "ResolveError",
    "ResolveTimeout",
    "layer_descs",
]
