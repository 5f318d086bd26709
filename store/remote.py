"""The manager's registry access over :class:`store.registry.client.RegistryClient`.

Why a seam: :class:`store.resolver.LayerManager` only needs "manifest+config+layers of a ref"
and "range reads of a blob"; keeping the client behind these two calls keeps the manager
testable and the client swappable (mirrors, credentials live in the client's config).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from store.chunks import BlobReader
from store.registry.client import MAX_CONFIG_BYTES, RegistryClient
from store.registry.errors import RegistryError
from store.registry.manifest import Descriptor, ManifestResult, parse_manifest
from store.registry.reference import Reference
from store.registry.registriesconf import RegistriesBlocked
from store.resolutions import Resolution, Resolutions
from store.resolver import (
    LayerDesc,
    NotEstargzError,
    RegistryAccess,
    ResolveError,
    decode_json,
    layer_descs,
    manifest_layers,
)

log = logging.getLogger(__name__)

QUIET_AFTER_DEADLINE = 2.0  # seconds a blob whose read hit the deadline is not asked again


@dataclass
class RegistryBlob:
    """Range reads of one blob; ranges are ``(start, end)`` byte offsets.

    ``deadline`` bounds one read with all its retries (the Go store's
    ``[blob] fetching_timeout_sec``): past it the read fails with :class:`ResolveError`, which
    the filesystem answers with EIO — a stalled or vanished registry never hangs a reader.
    After such a failure, reads of this blob fail at once for :data:`QUIET_AFTER_DEADLINE`
    seconds: the kernel retries a failed page read synchronously, and that retry must not
    wait a second deadline before the reader sees its EIO.

    A layer is loaded once per blob digest, through the ``ref`` of the image that brought it;
    another image naming the same blob (a base layer shared by images of two registries)
    adds its reference with :meth:`add_ref`. A read then goes to the repository that answered
    last, and to the others in turn, within the same deadline, when it fails there; one whose
    deadline passed on a repository goes to the next one first (only the repository that did
    not answer is kept quiet). Before, such a layer read only from the first image's
    registry: that registry gone, stalled, or the blob deleted there, the other image's
    containers got EIO from a registry that still served it.
    """

    client: RegistryClient
    ref: str
    digest: str
    size: int
    deadline: float = math.inf
    _refs: list[str] = field(default_factory=list, init=False)  # the one to ask first, first
    _quiet_until: dict[str, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._refs = [self.ref]

    def add_ref(self, ref: str) -> None:
        """Read from ``ref``'s repository too when the others fail (one per repository: the
        blob's URL does not depend on the tag)."""
        try:
            new = Reference.parse(ref)
        except ValueError:
            return
        for known in self._refs:
            old = Reference.parse(known)
            if (old.registry, old.repository) == (new.registry, new.repository):
                return
        self._refs.append(ref)

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        now = trio.current_time()
        refs = [r for r in self._refs if self._quiet_until.get(r, -math.inf) <= now]
        if not refs:
            raise ResolveError(
                f"{self.ref}@{self.digest}: the registry did not answer within "
                f"{self.deadline:g}s a moment ago (blob.fetching_timeout_sec); not asked again yet"
            )
        spans = [(lo, hi - lo) for lo, hi in ranges]
        asking = refs[0]
        with trio.move_on_after(self.deadline) as scope:
            for asking in refs:
                try:
                    parts = await self.client.read_ranges(asking, self.digest, spans)
                except RegistryError:
                    if asking == refs[-1]:
                        raise
                    continue
                self._prefer(asking)
                break
        if scope.cancelled_caught:
            self._quiet_until[asking] = trio.current_time() + QUIET_AFTER_DEADLINE
            self._refs.remove(asking)
            self._refs.append(asking)  # the next read asks another repository first
            raise ResolveError(
                f"{asking}@{self.digest}: no answer for {len(ranges)} range(s) within "
                f"{self.deadline:g}s (blob.fetching_timeout_sec)"
            )
        for (lo, hi), part in zip(ranges, parts, strict=True):
            if len(part) != hi - lo:
                raise ResolveError(f"{self.digest}: short range {lo}-{hi}: got {len(part)}")
        return parts

    def _prefer(self, ref: str) -> None:
        if self._refs[0] != ref:
            self._refs.remove(ref)
            self._refs.insert(0, ref)


# Range connections opened while an image's manifest is fetched (RegistryClient.warm): the
# footer of every layer, then its TOC in pieces (store.chunks.read_split), go out at once when
# the manifest arrives; gcc's five layers send 24 requests then. A request that finds no open
# connection pays a round trip (two or three with TLS) for its handshake first.
WARM_CONNECTIONS = 24


class RemoteRegistry(RegistryAccess):
    """The registry as :class:`~store.resolver.LayerManager` sees it: an image's manifest,
    config and layers (:meth:`image`), and range reads of a blob (:meth:`blob`).

    ``fetch_deadline`` bounds each blob read with its retries, in seconds;
    ``warm_connections`` range connections are opened beside each manifest fetch (0: none).
    """

    def __init__(
        self,
        client: RegistryClient,
        fetch_deadline: float = math.inf,
        warm_connections: int = WARM_CONNECTIONS,
        resolutions: Resolutions | None = None,
    ) -> None:
        self.client = client
        self.fetch_deadline = fetch_deadline
        self.warm_connections = warm_connections
        self.resolutions = resolutions

    async def image(
        self, ref: str, on_layers: Callable[[list[LayerDesc]], None] | None = None
    ) -> tuple[bytes, bytes, list[LayerDesc]]:
        manifest, config_raw, layers = await self._image(ref, on_layers, self.warm_connections)
        if self.resolutions is not None:
            kept = Resolution(manifest.raw, manifest.media_type, manifest.digest, config_raw)
            try:
                await trio.to_thread.run_sync(self.resolutions.save, ref, kept)
            except OSError as exc:  # the pull goes on; only a later restart misses it
                log.warning(
                    "%s: its resolution not kept in %s (a restart forgets it): %s",
                    ref,
                    self.resolutions.directory,
                    exc,
                )
        return manifest.raw, config_raw, layers

    async def remembered(self, ref: str) -> list[tuple[bytes, bytes, list[LayerDesc]]]:
        if self.resolutions is None:
            return []
        out = []
        for kept in await trio.to_thread.run_sync(self.resolutions.load, ref):
            try:
                manifest = parse_manifest(kept.manifest, kept.media_type, kept.digest)
                # The config vouches for the layers' diff IDs: the manifest's own, as the
                # registry's was (client.get_blob), or the resolution is left out.
                want = manifest.config.digest
                algorithm = want.partition(":")[0]
                got = f"{algorithm}:{hashlib.new(algorithm, kept.config).hexdigest()}"
                if got != want:
                    raise ResolveError(f"its config hashes to {got}, the manifest names {want}")
                config = await trio.to_thread.run_sync(decode_json, kept.config, f"{ref} config")
                out.append((kept.manifest, kept.config, layer_descs(ref, manifest, config)))
            except Exception as exc:  # ManifestError, ResolveError, ValueError: left out
                log.warning("%s: kept resolution %s left out: %s", ref, kept.digest, exc)
        return out

    async def index_manifests(self, ref: str) -> list[Descriptor]:
        try:
            index = await self.client.get_index(ref)
        except RegistriesBlocked as exc:
            raise NotEstargzError(f"{ref}: {exc}") from None
        except RegistryError as exc:
            raise ResolveError(f"{ref}: {exc}") from exc
        return index.manifests if index.is_index else []

    async def index_image(self, ref: str, digest: str) -> tuple[bytes, bytes, list[LayerDesc]]:
        # No connections warmed: the image's own resolution did, for the same registry.
        manifest, config_raw, layers = await self._image(
            str(Reference.parse(ref).with_digest(digest)), None, 0
        )
        return manifest.raw, config_raw, layers

    async def _image(
        self,
        ref: str,
        on_layers: Callable[[list[LayerDesc]], None] | None,
        warm_connections: int,
    ) -> tuple[ManifestResult, bytes, list[LayerDesc]]:
        error: Exception | None = None  # raised after the nursery: not in an exception group
        async with trio.open_nursery() as nursery:
            if warm_connections:
                nursery.start_soon(self.client.warm, ref, warm_connections)
            try:
                manifest = await self.client.get_manifest(ref)
                # A bigger config (client.MAX_CONFIG_BYTES) is refused before a byte of it is
                # read; one whose descriptor understates it, once the bytes pass the limit.
                if manifest.config.size > MAX_CONFIG_BYTES:
                    raise ResolveError(
                        f"{ref}: config {manifest.config.digest} is {manifest.config.size} "
                        f"bytes, over the {MAX_CONFIG_BYTES}-byte limit on image configs"
                    )
                if on_layers is not None:
                    on_layers(manifest_layers(manifest))  # get_manifest checked their shape
                config_raw = await self.client.get_blob(
                    ref, manifest.config.digest, max_bytes=MAX_CONFIG_BYTES
                )
            except Exception as exc:
                error = exc
            nursery.cancel_scope.cancel()  # warming still under way is of no use now
        if isinstance(error, RegistriesBlocked):  # podman refuses to pull it as well
            raise NotEstargzError(f"{ref}: {error}") from None
        if isinstance(error, RegistryError):
            raise ResolveError(f"{ref}: {error}") from error
        if error is not None:
            raise error
        # Up to 4 MiB of JSON: decoded off the thread that answers FUSE requests.
        config = await trio.to_thread.run_sync(decode_json, config_raw, f"{ref} config")
        return manifest, config_raw, layer_descs(ref, manifest, config)

    def blob(self, ref: str, digest: str, size: int) -> BlobReader:
        return RegistryBlob(self.client, ref, digest, size, self.fetch_deadline)

    def also_from(self, blob: BlobReader, ref: str) -> None:
        if isinstance(blob, RegistryBlob):
            blob.add_ref(ref)
