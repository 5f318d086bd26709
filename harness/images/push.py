"""Compress a built image in one of the measured modes and push it to a registry.

Modes (DESIGN.md §5):

* ``legacy`` — plain gzip layers, what a normal ``podman pull`` downloads in full (an imported
  image's gzip layers as the source has them, the others compressed here);
* ``estargz-noopt`` — eStargz layers without prioritized files (``.no.prefetch.landmark``);
* ``estargz`` — eStargz with the workload's files first, before ``.prefetch.landmark``;
* ``zstd-chunked`` — podman's own partial-pull format, produced by containers/image itself
  (``skopeo copy --dest-compress-format zstd:chunked``) so it is exactly what a user would get.
  skopeo reads the layer tars cut just after their end-of-archive marker (see
  :func:`tar_archive_end` for why), so nothing but zero padding is left out.

The compressed image is written once as an OCI layout under the built image's cache directory
(keyed by mode and options) and copied to the registry with ``skopeo copy --preserve-digests``
— the manifest and layer annotations arrive byte for byte. skopeo runs in a private mount
namespace with an empty blob-info cache: containers/image would otherwise silently swap in a
blob it compressed differently for an earlier push (e.g. a gzip layer for a zstd:chunked push).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from harness.images.build import BuiltImage, BuiltLayer, publish_dir
from harness.images.layertar import file_digest, normalize, repeat_numbers, tar_names
from store.estargz.errors import EstargzError

if TYPE_CHECKING:
    from harness.runtimes import Node

MODES = ("legacy", "estargz-noopt", "estargz", "zstd-chunked")

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_CHUNKED_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
# containers/storage >= 1.45 writes (and >= 1.5x reads only) the io.github.containers.* keys.
ZSTD_CHUNKED_MANIFEST_CHECKSUM_NEW = "io.github.containers.zstd-chunked.manifest-checksum"


class PushError(RuntimeError):
    """Compressing or pushing an image failed: names the image, mode and registry."""


class LayerRefused(PushError):
    """One of the image's layers cannot be written in the mode (a tar the eStargz writer
    refuses, e.g. a hard link to a file the layer does not hold; data after a tar's
    end-of-archive marker): the same every time, so it is not tried again; the message names
    the image, the layer and why."""


class ModeUnsupported(PushError):
    """This image cannot be produced in this mode with the tools on this machine.

    A runner records such an (image, mode) pair as skipped instead of aborting the run. No
    image of ours raises it today; it stays the contract for a tool that cannot write a mode.
    """


@dataclass(frozen=True)
class PushedLayer:
    """A layer as the registry holds it (from the pushed manifest and config)."""

    digest: str
    size: int
    media_type: str
    diff_id: str
    toc_digest: str | None
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PushedImage:
    """An image in a registry: ``ref`` is ``host/repo:tag`` (plain HTTP)."""

    ref: str
    manifest_digest: str
    mode: str
    config_digest: str
    layers: tuple[PushedLayer, ...]

    @property
    def digest_ref(self) -> str:
        """``host/repo@sha256:…``: the same image pinned by digest."""
        return f"{self.ref.rsplit(':', 1)[0]}@{self.manifest_digest}"

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


def push_image(
    built: BuiltImage,
    registry_host: str,
    repo: str,
    tag: str,
    mode: str,
    *,
    prioritized_files: Sequence[str] | None = None,
    read_ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    read_order: Mapping[str, Sequence[tuple[int, int, int]]] | None = None,
    chunk_size: int | None = None,
    timeout: float = 900.0,
    progress: Callable[[str], None] | None = None,
    node: Node | None = None,
) -> PushedImage:
    """Push ``built`` to ``http://registry_host/repo:tag`` in ``mode``; return what landed.

    ``prioritized_files`` (image paths, in access order) is used by mode ``estargz`` only; the
    runner gets it from a traced run, with ``read_ranges`` (image path → ``[start, end)`` byte
    ranges read; a file absent counts whole): the chunk-level layout of
    :func:`store.estargz.convert`, and ``read_order`` (image path → ``(start, end, seq)``
    first reads, ``harness.trace.TracedFile.order``): the fetch order it lists. Compressed
    layouts are cached, so pushing the same image and mode again (another registry, another
    sample) costs only the upload. ``progress`` receives a line per layer converted.
    ``node`` (a runtime node) writes ``zstd-chunked`` with
    that node's skopeo: podman 5.x's partial pull reads only what its own generation writes.
    """
    if mode not in MODES:
        raise PushError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    ref = f"{registry_host}/{repo}:{tag}"
    layout = oci_layout(
        built,
        mode,
        prioritized_files=prioritized_files,
        read_ranges=read_ranges,
        read_order=read_order,
        chunk_size=chunk_size,
        progress=progress,
        node=node,
    )
    _skopeo_copy(
        f"oci:{layout}:latest",
        f"docker://{ref}",
        ["--dest-tls-verify=false", "--preserve-digests"],
        timeout=timeout,
        what=ref,
    )
    return inspect_pushed(registry_host, repo, tag, mode, timeout=timeout)


def oci_layout(
    built: BuiltImage,
    mode: str,
    *,
    prioritized_files: Sequence[str] | None = None,
    read_ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    read_order: Mapping[str, Sequence[tuple[int, int, int]]] | None = None,
    chunk_size: int | None = None,
    progress: Callable[[str], None] | None = None,
    node: Node | None = None,
) -> Path:
    """An OCI image layout of ``built`` in ``mode`` (``uncompressed`` too), built once.

    ``zstd-chunked`` is written by containers/image itself (``skopeo copy
    --dest-compress-format zstd:chunked``) from the layer tars cut after their end-of-archive
    marker, so its blobs and annotations are exactly what ``podman push --compression-format
    zstd:chunked`` makes, and the config's diff IDs are those of the blobs' decompressed bytes.
    With ``node``, by that runtime node's skopeo (the host's containers/storage 1.43 writes
    ``io.containers.zstd-chunked.*`` annotations that podman 5.x does not recognize: its partial
    pull would silently become a full pull).
    """
    say = progress or (lambda message: None)
    ranges = _ranges_of(read_ranges) if mode == "estargz" else {}
    order = _order_of(read_order) if mode == "estargz" else {}
    final = (
        built.dir
        / "oci"
        / layout_name(mode, prioritized_files, chunk_size, node, read_ranges, read_order)
    )
    if (final / "index.json").is_file():
        return final
    if mode == "zstd-chunked":
        where = f"node {node.name}'s skopeo" if node is not None else "skopeo"
        say(f"{built.name}: {len(built.layers)} layers → zstd:chunked ({where})")
        return _publish(final, lambda work: _zstd_chunked_layout(built, work, node))
    return _publish(
        final,
        lambda work: _write_layout(
            built, mode, work, prioritized_files, ranges, chunk_size, say, order
        ),
    )


def layout_name(
    mode: str,
    prioritized_files: Sequence[str] | None = None,
    chunk_size: int | None = None,
    node: Node | None = None,
    read_ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    read_order: Mapping[str, Sequence[tuple[int, int, int]]] | None = None,
) -> str:
    """The directory name, under a built image's ``oci/``, of its layout in ``mode`` with these
    options (:func:`oci_layout`)."""
    parts: list = [mode, list(prioritized_files or []) if mode == "estargz" else [], chunk_size]
    if mode in ("estargz", "estargz-noopt"):  # layouts from before repeats got blobs of their own
        parts.append("a blob per repeat")
    ranges = _ranges_of(read_ranges) if mode == "estargz" else {}
    if ranges:  # chunk-level layouts: a key of their own (older layouts keep theirs)
        parts.append(_chunk_level_key(ranges))
    order = _order_of(read_order) if mode == "estargz" else {}
    if order:  # layouts listing a fetch order: a key of their own too
        parts.append(_fetch_order_key(order))
    if mode == "zstd-chunked":
        parts.append(_ZSTD_CHUNKED_SOURCE)  # layouts made from the untrimmed tars are not reused
        if node is not None:
            parts.append(f"skopeo of node {node.directory.name}")
    key = json.dumps(parts)
    return f"{mode}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _publish(final: Path, write: Callable[[Path], None], *, marker: str = "index.json") -> Path:
    """Run ``write(tmpdir)`` and rename the result to ``final`` (or keep a concurrent one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(work)
        publish_dir(work, final, (final / marker).is_file)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final


def _write_layout(
    built: BuiltImage,
    mode: str,
    work: Path,
    prioritized_files: Sequence[str] | None,
    read_ranges: Mapping[str, list[tuple[int, int]]],
    chunk_size: int | None,
    say: Callable[[str], None],
    read_order: Mapping[str, list[tuple[int, int, int]]] | None = None,
) -> None:
    blobs = work / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    descriptors, diff_ids = [], []
    repeats = repeat_numbers(layer.diff_id for layer in built.layers)
    for i, layer in enumerate(built.layers, 1):
        if mode == "uncompressed":
            _link_or_copy(layer.path, blobs / layer.diff_id.split(":")[1])
            descriptors.append(
                {"mediaType": MEDIA_TAR, "digest": layer.diff_id, "size": layer.size}
            )
            diff_ids.append(layer.diff_id)
            continue
        if mode == "uncompressed-trimmed":
            try:
                digest, size = _trimmed_tar(layer, blobs)
            except LayerRefused as exc:
                raise _refused(built, i, layer, "zstd-chunked", exc) from None
            descriptors.append({"mediaType": MEDIA_TAR, "digest": digest, "size": size})
            diff_ids.append(digest)
            continue
        if mode == "legacy" and layer.gzip_blob is not None:  # the source's own gzip blob
            _link_or_copy(layer.gzip_blob, blobs / layer.gzip_digest.split(":")[1])
            size = layer.gzip_blob.stat().st_size
            descriptors.append({"mediaType": MEDIA_GZIP, "digest": layer.gzip_digest, "size": size})
            diff_ids.append(layer.diff_id)
            continue
        if mode not in ("legacy", "estargz", "estargz-noopt"):
            raise PushError(f"no OCI layout for mode {mode!r}")
        wanted = _prioritized_in(layer.path, prioritized_files) if mode == "estargz" else []
        kind = "gzip" if mode == "legacy" else "estargz"
        n, mb = len(built.layers), layer.size / 1e6
        message = f"{built.name}: layer {i}/{n} ({mb:.0f} MB) → {mode}"
        ranges = {n: read_ranges[n] for n in wanted if n in read_ranges}
        order = {n: (read_order or {})[n] for n in wanted if n in (read_order or {})}
        repeat = repeats[i - 1] if kind == "estargz" else 0
        try:
            blob = _converted_layer(
                built, layer, kind, wanted, ranges, chunk_size, say, message, repeat, order
            )
        except EstargzError as exc:
            raise _refused(built, i, layer, mode, exc) from None
        meta = json.loads((blob / "blob.json").read_text())
        _link_or_copy(blob / "blob", blobs / meta["digest"].split(":")[1])
        descriptors.append(meta["descriptor"])
        diff_ids.append(meta["diff_id"])
    config = json.loads(json.dumps(built.config))
    config["rootfs"]["diff_ids"] = diff_ids
    config_desc = _write_blob(blobs, json.dumps(config, sort_keys=True).encode(), MEDIA_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_desc,
        "layers": descriptors,
    }
    manifest_desc = _write_blob(blobs, json.dumps(manifest).encode(), MEDIA_MANIFEST)
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (work / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (work / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))


def _refused(
    built: BuiltImage, i: int, layer: BuiltLayer, mode: str, exc: Exception
) -> LayerRefused:
    """:class:`LayerRefused` naming the image, its ``i``-th layer and the mode."""
    where = f"layer {i}/{len(built.layers)} (diff ID {layer.diff_id})"
    return LayerRefused(f"{built.name}: {where} as {mode}: {exc}")


_ZSTD_CHUNKED_SOURCE = "tars cut after the end-of-archive marker"


def _zstd_chunked_layout(built: BuiltImage, work: Path, node: Node | None = None) -> None:
    """containers/image's zstd:chunked of ``built``, from a scratch layout of cut tars."""
    source = Path(tempfile.mkdtemp(prefix=".zstd-chunked-source-", dir=work.parent))
    try:
        _write_layout(built, "uncompressed-trimmed", source, None, {}, None, lambda message: None)
        if node is not None:
            _node_skopeo_zstd_chunked(node, source, work, what=f"{built.name} as zstd:chunked")
            return
        _skopeo_copy(
            f"oci:{source}:latest",
            f"oci:{work}:latest",
            ["--dest-compress-format", "zstd:chunked"],
            timeout=3600,
            what=f"{built.name} as zstd:chunked",
        )
    finally:
        shutil.rmtree(source, ignore_errors=True)


def tar_archive_end(path: Path) -> int:
    """The offset just past the end-of-archive marker (two zero blocks) of the tar at ``path``.

    Tar writers pad an archive with zeros to a whole record (10 KiB) after the marker. The
    zstd:chunked compressor of containers/storage 1.43 (skopeo 1.9, podman 4.3) stops reading
    at the marker and reports that it is done; a write of the padding that comes after that
    report gets ``(0, nil)`` from its ``zstdChunkedWriter.Write`` and containers/image fails
    the copy with "short write" — for any layer whose padding reaches past the write that
    carried the marker (tomcat's JDK layer here). The blob never holds the padding either, so
    a tar cut here compresses to the same blob, and its digest is the blob's real diff ID.
    ``podman push`` never meets this: the tars it compresses come from Go's archive/tar,
    which ends an archive with the marker and no record padding.
    """
    try:
        with tarfile.open(path, "r:") as tar:
            for _ in tar:
                pass
            start = tar.offset  # the first zero block: where the reader stopped
    except (tarfile.TarError, OSError) as exc:
        raise LayerRefused(f"{path}: not a readable tar: {exc}") from exc
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(1 << 20):
            if block.count(0) != len(block):
                raise LayerRefused(
                    f"{path}: non-zero bytes after the end of the archive at {start}"
                )
    return min(size, start + 1024)


def _trimmed_tar(layer: BuiltLayer, blobs: Path) -> tuple[str, int]:
    """Put ``layer`` cut at :func:`tar_archive_end` into ``blobs``; (its digest, its size).

    An empty file (a layer podman pulls as an empty one) becomes the end-of-archive marker
    alone, the same empty layer: the zstd:chunked writer of containers/storage 1.43 waits for
    the marker and never finishes without one (skopeo hangs)."""
    if layer.path.stat().st_size == 0:
        desc = _write_blob(blobs, bytes(1024), MEDIA_TAR)
        return desc["digest"], desc["size"]
    end = tar_archive_end(layer.path)
    if end == layer.size:
        _link_or_copy(layer.path, blobs / layer.diff_id.split(":")[1])
        return layer.diff_id, layer.size
    tmp = blobs / f".{layer.path.name}.part"
    hasher = hashlib.sha256()
    with open(layer.path, "rb") as fin, open(tmp, "wb") as fout:
        left = end
        while left:
            chunk = fin.read(min(left, 1 << 20))
            if not chunk:
                raise PushError(f"{layer.path}: shorter than {end} bytes while copying")
            hasher.update(chunk)
            fout.write(chunk)
            left -= len(chunk)
    os.replace(tmp, blobs / hasher.hexdigest())
    return f"sha256:{hasher.hexdigest()}", end


def _converted_layer(
    built: BuiltImage,
    layer: BuiltLayer,
    kind: str,
    wanted: list[str],
    ranges: dict[str, list[tuple[int, int]]],
    chunk_size: int | None,
    say: Callable[[str], None],
    message: str,
    repeat: int = 0,
    order: dict[str, list[tuple[int, int, int]]] | None = None,
) -> Path:
    """One layer compressed as ``kind`` (gzip | estargz), cached by what determines its bytes.
    ``repeat``: how many times the image listed this layer before (an eStargz repeat gets a
    blob of its own: :func:`~harness.images.layertar.repeat_numbers`).

    Shared by every image and mode that needs the same bytes: python and gcc share their
    lower layers, and an optimized image's layers holding none of the prioritized files are
    the same as the unoptimized ones (``.no.prefetch.landmark``), so only the layers that
    hold the workload's files are converted again.
    """
    parts: list = [kind, layer.diff_id, wanted, chunk_size]
    if ranges:  # the chunk-level layout (read ranges known): other bytes, another key
        parts.append(_chunk_level_key(ranges))
    if order:  # a fetch order listed (first reads known): other bytes, another key
        parts.append(_fetch_order_key(order))
    if repeat:
        parts.append(f"repeat {repeat}")
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]
    final = built.dir.parent.parent / "blobs" / key
    if (final / "blob.json").is_file():
        return final

    def write(work: Path) -> None:
        say(message)
        out = work / "blob"
        if kind == "gzip":
            _gzip(layer.path, out)
            desc: dict = {"mediaType": MEDIA_GZIP}
            diff_id = layer.diff_id
        else:
            desc, diff_id = _estargz(
                layer.path, out, wanted, ranges, chunk_size, repeat, order or {}
            )
        digest = file_digest(out)
        desc.update(digest=digest, size=out.stat().st_size)
        meta = {"digest": digest, "diff_id": diff_id, "descriptor": desc}
        (work / "blob.json").write_text(json.dumps(meta))

    return _publish(final, write, marker="blob.json")


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the layer tars are immutable once built), or a copy across filesystems.
    An existing ``dst`` is kept: blobs are named by digest, and an image may list a layer
    twice."""
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def inspect_pushed(
    registry_host: str, repo: str, tag: str, mode: str, *, timeout: float = 60.0
) -> PushedImage:
    """Read a pushed image's manifest and config back from the registry."""
    base = f"http://{registry_host}/v2/{repo}"
    accept = f"{MEDIA_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"
    try:
        with httpx.Client(timeout=timeout) as client:
            resp = client.get(f"{base}/manifests/{tag}", headers={"Accept": accept})
            resp.raise_for_status()
            manifest = resp.json()
            digest = resp.headers.get("Docker-Content-Digest") or (
                "sha256:" + hashlib.sha256(resp.content).hexdigest()
            )
            cfg = client.get(f"{base}/blobs/{manifest['config']['digest']}")
            cfg.raise_for_status()
            diff_ids = cfg.json()["rootfs"]["diff_ids"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        raise PushError(f"reading back {registry_host}/{repo}:{tag}: {exc}") from exc
    layers = tuple(
        PushedLayer(
            digest=d["digest"],
            size=d["size"],
            media_type=d["mediaType"],
            diff_id=diff_id,
            toc_digest=_toc_digest(d.get("annotations") or {}),
            annotations=dict(d.get("annotations") or {}),
        )
        for d, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    )
    return PushedImage(
        f"{registry_host}/{repo}:{tag}", digest, mode, manifest["config"]["digest"], layers
    )


def _toc_digest(annotations: dict[str, str]) -> str | None:
    """The layer's TOC digest: eStargz's annotation, or zstd:chunked's manifest checksum."""
    return (
        annotations.get(TOC_DIGEST_ANNOTATION)
        or annotations.get(ZSTD_CHUNKED_MANIFEST_CHECKSUM)
        or annotations.get(ZSTD_CHUNKED_MANIFEST_CHECKSUM_NEW)
    )


def _chunk_level_key(ranges: dict[str, list[tuple[int, int]]]) -> list:
    """What else decides a chunk-level layout's bytes: the ranges and the writer's constants."""
    from store.estargz import MAX_PREFETCH_RANGES, RANGE_CHUNK_SIZE

    return [RANGE_CHUNK_SIZE, MAX_PREFETCH_RANGES, sorted(ranges.items())]


def _fetch_order_key(order: dict[str, list[tuple[int, int, int]]]) -> list:
    """What else decides a layout that lists a fetch order: the first reads and the
    writer's constants."""
    from store.estargz import MAX_PREFETCH_ORDER
    from store.estargz.writer import ORDER_CHUNK_SIZE

    return ["fetch order, ranked", ORDER_CHUNK_SIZE, MAX_PREFETCH_ORDER, sorted(order.items())]


def _order_of(
    read_order: Mapping[str, Sequence[tuple[int, int, int]]] | None,
) -> dict[str, list[tuple[int, int, int]]]:
    """``read_order`` keyed by normalized path (as :func:`_ranges_of` keys ranges), each a
    sorted list of int triples."""
    return {
        normalize(name): sorted((int(lo), int(hi), int(seq)) for lo, hi, seq in runs)
        for name, runs in (read_order or {}).items()
    }


def _ranges_of(
    read_ranges: Mapping[str, Sequence[tuple[int, int]]] | None,
) -> dict[str, list[tuple[int, int]]]:
    """``read_ranges`` keyed by normalized path (as :func:`_prioritized_in` names files),
    each a sorted list of int pairs."""
    return {
        normalize(name): sorted((int(lo), int(hi)) for lo, hi in ranges)
        for name, ranges in (read_ranges or {}).items()
    }


def _prioritized_in(tar: Path, files: Sequence[str] | None) -> list[str]:
    """The prioritized files present in this layer, in the given (access) order."""
    if not files:
        return []
    names = set(tar_names(tar))
    seen: set[str] = set()
    out = []
    for f in files:
        n = normalize(f)
        if n in names and n not in seen:
            seen.add(n)
            out.append(n)
    return out


def _estargz(
    tar: Path,
    out: Path,
    prioritized: list[str],
    ranges: dict[str, list[tuple[int, int]]],
    chunk_size: int | None,
    landmark_mtime: int = 0,
    order: dict[str, list[tuple[int, int, int]]] | None = None,
) -> tuple[dict, str]:
    """Convert one layer with the project's eStargz writer; (descriptor fields, diff ID)."""
    from store.estargz import convert  # the format library (store/estargz)

    kwargs: dict = {
        "prioritized_files": prioritized,
        "read_ranges": ranges,
        "landmark_mtime": landmark_mtime,
    }
    if order:
        kwargs["read_order"] = order
    if chunk_size:
        kwargs["chunk_size"] = chunk_size
    with open(tar, "rb") as fin, open(out, "wb") as fout:
        result = convert(fin, fout, **kwargs)
    desc = {
        "mediaType": MEDIA_GZIP,
        "annotations": {
            TOC_DIGEST_ANNOTATION: result.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(result.uncompressed_size),
        },
    }
    return desc, result.diff_id


def _gzip(src: Path, out: Path) -> None:
    with (
        open(src, "rb") as fin,
        open(out, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0, filename="") as gz,
    ):
        shutil.copyfileobj(fin, gz, 1 << 20)


def _write_blob(blobs: Path, data: bytes, media_type: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _skopeo_copy(src: str, dest: str, extra: list[str], *, timeout: float, what: str) -> None:
    """``skopeo copy`` with a private, empty blob-info cache (see the module docstring)."""
    from harness.images.source import ImageSourceError, skopeo

    try:
        skopeo(
            ["copy", "--quiet", *extra, src, dest],
            f"pushing {what}",
            timeout=timeout,
            private_cache=True,
        )
    except ImageSourceError as exc:
        raise PushError(str(exc)) from None


def _node_skopeo_zstd_chunked(node: Node, source: Path, dest: Path, *, what: str) -> None:
    """``skopeo copy --dest-compress-format zstd:chunked`` inside a runtime node (its blob-info
    cache lives in the node's throw-away view)."""
    from harness.runtimes import enter_node

    with enter_node(node) as entered:
        entered.bind(source)
        entered.bind(dest)
        argv = entered.argv(
            "skopeo",
            "copy",
            "--quiet",
            "--dest-compress-format",
            "zstd:chunked",
            f"oci:{os.path.realpath(source)}:latest",
            f"oci:{os.path.realpath(dest)}:latest",
        )
        try:
            proc = subprocess.run(
                argv, env=entered.env(), capture_output=True, text=True, timeout=3600
            )
        except subprocess.TimeoutExpired:
            raise PushError(f"writing {what}: skopeo did not finish within 3600s") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip()[-1500:]
        raise PushError(
            f"writing {what}: node {node.name}'s skopeo exited {proc.returncode}: {tail}"
        )
