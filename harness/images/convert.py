"""Convert an image from any source to eStargz (or zstd:chunked) and write it anywhere.

The path of ``lazybench convert SRC DEST``:

1. skopeo copies SRC (every platform of an index) into a scratch OCI layout, layers as they are;
2. the manifests to convert are chosen: the wanted platform's (default the host's), or every
   image of the index with ``all_platforms``; the index's other entries stay untouched;
3. each of their layers is converted by the format library (``store.estargz.convert``, or
   ``store.estargz.write_zstd_chunked`` for ``zstd-chunked``; both read gzip, zstd and plain
   tars), layers in parallel in worker processes (tar parsing is Python; eStargz compression
   inside each is threaded too), with a progress bar per layer; a layer already in the target
   format (eStargz: TOC annotation whose TOC verifies against the blob's footer; zstd:chunked:
   annotations whose TOC verifies against its checksum) passes through unchanged;
4. a new config (``rootfs.diff_ids`` of the new layers) and OCI manifest (layer descriptors with
   ``containerd.io/snapshot/stargz/toc.digest`` and ``io.containers.estargz.uncompressed-size``,
   or zstd:chunked's manifest checksum and position in the keys of the chosen podman
   generation; the old format's annotations dropped) are written, and a new index around them
   when the source was one;
5. skopeo copies the result to DEST with ``--preserve-digests`` (a registry on loopback over
   plain HTTP, others as registries.conf says; credentials from the usual auth files, as for
   any skopeo or podman command), and the destination's manifest digest is returned. DEST
   ``docker-archive:`` and ``containers-storage:`` are refused before anything is read: they
   keep only uncompressed tars, never the converted blobs or their annotations.

Prioritized files (``--prioritized-files`` or ``--optimize``'s trace, taken on the host's
platform and applied to every platform converted) go first in the layers that hold them; a layer
that holds none keeps the unoptimized layout (``.no.prefetch.landmark``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from harness.images.layertar import repeat_numbers
from harness.images.source import (
    ImageSourceError,
    Layout,
    check_config_platform,
    check_source,
    copy_to_layout,
    manifest_result,
    open_layer,
    skopeo,
    tls_args,
    wanted_platform,
)
from harness.images.transports import (
    TransportError,
    local_path,
    pull_reference,
    split_transport,
)
from store.estargz.zstdchunked import DEFAULT_GENERATION

if TYPE_CHECKING:
    from harness.trace import TracedFile

FORMATS = ("estargz", "zstd-chunked")
MEDIA_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
ZSTD_GENERATIONS = ("podman4", "podman5")
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
# Docker's media types of the layers that pass through, in OCI terms.
_OCI_LAYER_TYPE = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": MEDIA_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": MEDIA_TAR,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
}
REF_NAME = "org.opencontainers.image.ref.name"


class ConvertError(ImageSourceError):
    """The conversion cannot be done; the message names the image, layer or option."""


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert. ``platform`` is ``os/arch[/variant]`` (default the host's)."""

    format: str = "estargz"
    platform: str | None = None
    all_platforms: bool = False
    prioritized_files: tuple[str, ...] = ()
    # (path, ((start, end), …)): byte ranges a traced run read of prioritized files (eStargz:
    # files read in part get the chunk-level layout of store.estargz.convert)
    read_ranges: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    # (path, ((start, end, seq), …)): when that traced run first read each piece of those
    # files (seq: one read counter across files; harness.trace.TracedFile.order); eStargz only
    read_order: tuple[tuple[str, tuple[tuple[int, int, int], ...]], ...] = ()
    chunk_size: int | None = None
    level: int | None = None
    dest_tls_verify: bool | None = None  # None: off for a loopback registry, else as configured
    # zstd:chunked layout and annotation keys: podman4 (containers/storage < 1.5x, io.containers.)
    # or podman5 (tar-split frame, io.github.containers.); see store.estargz.zstdchunked.
    zstd_generation: str = DEFAULT_GENERATION
    workers: int | None = None  # layer conversions at once (default: every core)


@dataclass
class ConvertReport:
    """What a conversion did: the destination's manifest digest and per-layer outcomes."""

    digest: str
    manifests: int = 0
    converted: int = 0
    passed_through: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)


# -- the whole image --------------------------------------------------------------------------


# Destinations that keep only the layers' uncompressed tars (containers/image decompresses
# into them), never the converted blobs or their manifest annotations.
LOSSY_DESTINATIONS = ("docker-archive", "containers-storage")


def check_destination(dest: str, fmt: str = "estargz") -> str:
    """The transport of ``dest``; :class:`ConvertError` when it is not one, is one that
    would not keep the converted layers (:data:`LOSSY_DESTINATIONS`), or names a digest."""
    try:
        transport, rest = split_transport(dest)
    except TransportError as exc:
        raise ConvertError(f"destination: {exc}") from None
    if transport in LOSSY_DESTINATIONS:
        raise ConvertError(
            f"destination {dest}: {transport}: stores layers uncompressed, so the {fmt} "
            "layers and their annotations would be lost (a podman push from there compresses "
            "them afresh as plain gzip); write to docker://, oci:, oci-archive: or dir: instead"
        )
    path = local_path(dest)
    if path is not None:  # checked now, not after every layer converted
        parent = path.absolute().parent
        if not parent.is_dir():
            raise ConvertError(f"destination {dest}: directory {parent} does not exist")
    elif transport == "docker":
        if "@" in rest:  # skopeo refuses it after every layer is converted
            raise ConvertError(
                f"destination {dest}: names a digest, which the converted image cannot have "
                "(its manifest is new; its digest is printed once written): name a tag, "
                "docker://HOST/REPO:TAG"
            )
        _check_reachable(dest)
    return transport


def _check_reachable(dest: str) -> None:
    """A ``docker://`` destination on this machine (``localhost``, a loopback address) with
    an explicit port that refuses connections is refused now, before the conversion: the
    usual local registry not started. Any other destination is left to skopeo (a proxy, the
    registries.conf scheme and port, name resolution: skopeo knows them, a probe here does
    not)."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    first, slash, _ = split_transport(dest)[1].lstrip("/").partition("/")
    try:
        url = urlsplit("//" + first)
        host, port = url.hostname, url.port
    except ValueError:
        return
    if not slash or not host or port is None:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: not this machine's
        return
    if not loopback:
        return
    try:
        socket.create_connection((host, port), timeout=10).close()
    except ConnectionRefusedError:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ConvertError(
            f"destination {dest}: nothing listens on {shown} (connection refused): start "
            "the registry, or check the port"
        ) from None
    except OSError:  # anything else (a firewall, a timeout): skopeo will say
        return


def convert_image(
    src: str,
    dest: str,
    options: ConvertOptions = ConvertOptions(),
    *,
    workdir: Path | None = None,
    show_progress: bool = True,
    say: Callable[[str], None] = lambda message: None,
) -> ConvertReport:
    """Convert ``src`` and write it to ``dest`` (both in the transport syntax); see the module
    docstring. Raises :class:`ConvertError` (or its base ``ImageSourceError``) naming what
    failed; nothing is written to ``dest`` unless every layer converted."""
    if options.format not in FORMATS:
        raise ConvertError(f"unknown format {options.format!r} (known: {', '.join(FORMATS)})")
    if options.zstd_generation not in ZSTD_GENERATIONS:
        raise ConvertError(
            f"unknown zstd:chunked generation {options.zstd_generation!r} "
            f"(known: {', '.join(ZSTD_GENERATIONS)})"
        )
    check_source(src)
    src = pull_reference(src)
    dest_transport = check_destination(dest, options.format)
    want = wanted_platform(options.platform)
    with tempfile.TemporaryDirectory(prefix="lazybench-convert-", dir=workdir) as tmp:
        layout = Layout(Path(tmp) / "oci")
        say(f"reading {src} (skopeo)")
        copy_to_layout(src, layout.path, all_platforms=True)
        top_desc = layout.top()
        raw = layout.blob(top_desc["digest"]).read_bytes()
        top = manifest_result(raw, top_desc.get("mediaType"))
        report = ConvertReport(digest="")
        if top.is_index:
            chosen = _chosen(top, want, options.all_platforms, src)
            children = []
            for d in top.parsed.get("manifests") or []:
                if d["digest"] in chosen:
                    say(f"converting the {_platform_text(d)} image ({d['digest'][:19]})")
                    new = _convert_manifest(layout, d, options, report, show_progress, say)
                    children.append({**d, **new})
                else:
                    children.append(d)
            index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
            index["manifests"] = children
            if top.parsed.get("annotations"):
                index["annotations"] = top.parsed["annotations"]
            new_top = _write_blob(layout, json.dumps(index).encode(), index["mediaType"])
        else:
            if options.platform:  # asked for by name: a single image of another one is no match
                manifest = manifest_result(raw, top_desc.get("mediaType"))
                config = layout.read_json(manifest.config.digest)
                check_config_platform(src, config, want, option="--platform ")
            new_top = _convert_manifest(layout, top_desc, options, report, show_progress, say)
        new_top["annotations"] = {REF_NAME: "latest"}
        (layout.path / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": [new_top]})
        )
        say(f"writing {dest} (skopeo)")
        report.digest = _write_dest(layout, dest, dest_transport, top.is_index, options, Path(tmp))
    return report


def _platform_text(desc: dict[str, Any]) -> str:
    p = desc.get("platform") or {}
    return "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)


def _chosen(top: Any, want: Any, all_platforms: bool, src: str) -> set[str]:
    """Digests of the index entries to convert."""
    from store.registry import ManifestError, select_platform

    images = [
        d
        for d in top.manifests
        if (d.platform or {}).get("os") not in (None, "unknown")  # not attestations
    ]
    if all_platforms:
        return {d.digest for d in images}
    try:
        return {select_platform(top, want).digest}
    except ManifestError as exc:
        raise ConvertError(f"{src}: {exc} (pick one with --platform, or --all-platforms)") from None


def _write_dest(
    layout: Layout,
    dest: str,
    transport: str,
    is_index: bool,
    options: ConvertOptions,
    tmp: Path,
) -> str:
    digest_file = tmp / "digest"
    args = ["--insecure-policy", "copy", "--quiet", "--digestfile", str(digest_file)]
    if transport in ("docker", "oci", "oci-archive", "dir"):
        args.append("--preserve-digests")
    if is_index:
        args.append("--all")
    if options.dest_tls_verify is None:
        args += tls_args(dest, "dest")
    elif transport == "docker":
        args.append(f"--dest-tls-verify={'true' if options.dest_tls_verify else 'false'}")
    args += [f"oci:{layout.path}:latest", dest]
    skopeo(args, f"writing {dest}", private_cache=True)
    return digest_file.read_text().strip()


def _write_blob(layout: Layout, data: bytes, media_type: str) -> dict[str, Any]:
    from store.registry import sha256_digest

    digest = sha256_digest(data)
    path = layout.blob(digest)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


# -- one image manifest -----------------------------------------------------------------------


def _convert_manifest(
    layout: Layout,
    desc: dict[str, Any],
    options: ConvertOptions,
    report: ConvertReport,
    show_progress: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Convert one image manifest's layers; return its new descriptor (mediaType, digest,
    size)."""
    manifest = manifest_result(layout.blob(desc["digest"]).read_bytes(), desc.get("mediaType"))
    config = layout.read_json(manifest.config.digest)
    layers = manifest.parsed.get("layers") or []
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    if len(diff_ids) != len(layers):
        raise ConvertError(
            f"manifest {manifest.digest}: {len(layers)} layers but the config lists "
            f"{len(diff_ids)} diff IDs"
        )
    report.manifests += 1
    say(f"converting {len(layers)} layers to {options.format}")
    results = convert_layers(
        layout, layers, options, show_progress=show_progress, diff_ids=diff_ids
    )
    new_layers = []
    for i, (old, r) in enumerate(zip(layers, results, strict=True)):
        if r["passed_through"]:
            new = {**old, "mediaType": _OCI_LAYER_TYPE.get(old["mediaType"], old["mediaType"])}
            report.passed_through += 1
        else:
            new = {
                "mediaType": MEDIA_ZSTD if options.format == "zstd-chunked" else MEDIA_GZIP,
                "digest": r["digest"],
                "size": r["size"],
                "annotations": {
                    **_kept_annotations(old.get("annotations") or {}),
                    **r["annotations"],
                },
            }
            diff_ids[i] = r["diff_id"]
            report.converted += 1
        report.layers.append({"manifest": manifest.digest, "layer": i, **r})
        new_layers.append(new)
    return _write_image(layout, manifest, config, diff_ids, new_layers)


# Layer annotations that describe the old blob's format: a converted layer must not keep them
# (containers/storage would take a gzip layer with a zstd:chunked checksum for zstd:chunked).
_FORMAT_ANNOTATION_PREFIXES = (
    "io.github.containers.zstd-chunked.",
    "io.containers.zstd-chunked.",
    "containerd.io/snapshot/stargz/",
    "io.containers.estargz.",
)


def _kept_annotations(annotations: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in annotations.items() if not k.startswith(_FORMAT_ANNOTATION_PREFIXES)}


def _write_image(
    layout: Layout,
    manifest: Any,
    config: dict[str, Any],
    diff_ids: list[str],
    layers: list[dict[str, Any]],
) -> dict[str, Any]:
    config = {**config, "rootfs": {**config.get("rootfs", {}), "diff_ids": diff_ids}}
    config_desc = _write_blob(layout, json.dumps(config).encode(), MEDIA_CONFIG)
    new = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layers,
    }
    if manifest.parsed.get("annotations"):
        new["annotations"] = manifest.parsed["annotations"]
    return _write_blob(layout, json.dumps(new).encode(), new["mediaType"])


def _toc_annotation() -> str:
    from store.estargz import TOC_DIGEST_ANNOTATION

    return TOC_DIGEST_ANNOTATION


def _size_annotation() -> str:
    from store.estargz import UNCOMPRESSED_SIZE_ANNOTATION

    return UNCOMPRESSED_SIZE_ANNOTATION


# -- layers, in parallel ----------------------------------------------------------------------

_counters: Any = None  # shared per-layer byte counters, set in each worker process


def _init_worker(counters: Any) -> None:
    global _counters
    _counters = counters


class _Counting:
    """A read-only file that adds what is read to the shared counter ``index``."""

    def __init__(self, f: BinaryIO, index: int) -> None:
        self.f, self.index = f, index

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if _counters is not None:
            _counters[self.index] += len(data)
        return data

    def close(self) -> None:
        self.f.close()


def convert_layers(
    layout: Layout,
    layers: Sequence[dict[str, Any]],
    options: ConvertOptions,
    *,
    show_progress: bool = True,
    diff_ids: Sequence[str],
) -> list[dict[str, Any]]:
    """Convert layer descriptors of ``layout`` to eStargz (or zstd:chunked) blobs written into
    its blob store,
    ``workers`` at a time (default: one per core); a rich progress bar per layer (compressed
    bytes read). ``diff_ids`` (the config's, one per layer) tell repeats of a layer apart
    from other layers. Returns per layer ``digest, size, diff_id,
    annotations`` (what the descriptor needs), ``passed_through``."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    from harness.cli import make_console

    jobs = [
        (i, str(layout.blob(d["digest"])), d, str(layout.path / "blobs" / "sha256"))
        for i, d in enumerate(layers)
    ]
    # eStargz gives each repeat of a layer a blob of its own (store.estargz.convert's
    # landmark_mtime); zstd:chunked has no such field, so its repeats stay one blob.
    # By content: one layer compressed twice over is still one layer.
    estargz = options.format != "zstd-chunked"
    repeats = repeat_numbers(diff_ids) if estargz else [0] * len(layers)
    ctx = multiprocessing.get_context(_start_method())
    counters = ctx.Array("q", max(1, len(jobs)), lock=False)
    nproc = max(1, min(len(jobs), options.workers or os.cpu_count() or 1))
    cores = os.cpu_count() or 1
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=make_console(stderr=True),  # no emoji from ':x:' in a layer's description
        disable=not show_progress,
        transient=True,
    )
    with (
        ProcessPoolExecutor(
            nproc, mp_context=ctx, initializer=_init_worker, initargs=(counters,)
        ) as pool,
        progress,
    ):
        tasks = [
            progress.add_task(f"layer {i + 1}/{len(jobs)} {d['digest'][7:19]}", total=d["size"])
            for i, _, d, _ in jobs
        ]
        futures = [
            pool.submit(
                _convert_one,
                i,
                blob,
                desc,
                out_dir,
                options.format,
                options.zstd_generation,
                tuple(options.prioritized_files),
                options.read_ranges,
                options.read_order,
                options.chunk_size,
                options.level,
                cores,
                repeats[i],
            )
            for i, blob, desc, out_dir in jobs
        ]
        while not all(f.done() for f in futures):
            for task, n in zip(tasks, counters, strict=False):
                progress.update(task, completed=n)
            _wait_any(futures, 0.2)
        for task, (_, _, d, _) in zip(tasks, jobs, strict=True):
            progress.update(task, completed=d["size"])
        results = []
        for i, future in enumerate(futures):
            try:
                results.append(future.result())
            except ConvertError as exc:  # the worker names the blob; say which layer it is
                raise ConvertError(f"layer {i + 1} of {len(jobs)}, {exc}") from None
        return results


def _start_method() -> str:
    """``forkserver`` (workers do not inherit this process's threads and locks), unless the
    main program is not a file a worker could re-import (``python -`` / ``-c``): then ``fork``,
    safe here because the workers touch nothing but their layer files."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return "forkserver" if path and os.path.isfile(path) else "fork"


def _wait_any(futures: list[Any], timeout: float) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    wait([f for f in futures if not f.done()], timeout=timeout, return_when=FIRST_COMPLETED)


def is_estargz(blob: Path, desc: dict[str, Any]) -> bool:
    """Whether the layer already is eStargz: both annotations, and a footer and TOC that verify
    against the TOC digest annotation (chunks are not read)."""
    from store.estargz import EstargzError, EstargzReader, FileBlobSource, FooterKind

    ann = desc.get("annotations") or {}
    toc = ann.get(_toc_annotation())
    if not toc or not ann.get(_size_annotation()):
        return False
    try:
        with FileBlobSource(blob) as src:
            reader = EstargzReader(src, toc)
        return reader.footer.kind in (FooterKind.ESTARGZ, FooterKind.LEGACY_STARGZ)
    except (EstargzError, OSError, ValueError):
        return False


def is_zstd_chunked(blob: Path, desc: dict[str, Any], generation: str = DEFAULT_GENERATION) -> bool:
    """Whether the layer already is zstd:chunked of ``generation``: its annotations (that
    generation's keys) parse and the TOC they point at hashes to their checksum and decodes
    (chunks are not read). A layer of the other generation is not: its keys are ones the
    asked-for podman does not read, so it would pull the layer whole."""
    from store.estargz import EstargzError, manifest_entries, zstd_chunked_layer

    try:
        layer = zstd_chunked_layer(desc.get("annotations") or {})
        if layer is None or layer.generation != generation:
            return False
        start, end = layer.toc_range
        with open(blob, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        for _ in manifest_entries(data, layer.position, layer.checksum):
            pass
        return True
    except (EstargzError, OSError, ValueError):
        return False


def _convert_one(
    index: int,
    blob: str,
    desc: dict[str, Any],
    out_dir: str,
    fmt: str,
    generation: str,
    prioritized: tuple[str, ...],
    read_ranges: tuple[tuple[str, tuple[tuple[int, int], ...]], ...],
    read_order: tuple[tuple[str, tuple[tuple[int, int, int], ...]], ...],
    chunk_size: int | None,
    level: int | None,
    workers: int,
    repeat: int = 0,
) -> dict[str, Any]:
    """Worker: one layer blob → an eStargz (or zstd:chunked) blob in ``out_dir``, named by its
    digest; returns digest, size, diff_id, annotations, passed_through. ``repeat`` (eStargz):
    how many times the image listed this layer before; a repeat is always converted, with that
    landmark time (:func:`~harness.images.layertar.repeat_numbers`)."""
    from store.estargz import EstargzError, clean_name, convert, write_zstd_chunked

    path = Path(blob)
    try:
        wanted = _present(path, prioritized) if prioritized else []
    except EstargzError as exc:
        raise _layer_error(desc, exc) from None

    def already() -> bool:
        if fmt == "zstd-chunked":
            return is_zstd_chunked(path, desc, generation)
        return is_estargz(path, desc)

    if not wanted and not repeat and already():
        if _counters is not None:
            _counters[index] = desc["size"]
        return {
            "digest": desc["digest"],
            "size": desc["size"],
            "diff_id": None,
            "annotations": {},
            "passed_through": True,
        }
    kwargs: dict[str, Any] = {"prioritized_files": wanted}
    if chunk_size:
        kwargs["chunk_size"] = chunk_size
    if level is not None:
        kwargs["level"] = level
    fd, tmp = tempfile.mkstemp(prefix=".convert-", dir=out_dir)
    try:
        with open(path, "rb") as raw, os.fdopen(fd, "wb") as out:
            src = _Counting(raw, index)
            if fmt == "zstd-chunked":
                z = write_zstd_chunked(src, out, generation=generation, **kwargs)  # type: ignore[arg-type]
                digest, size, diff_id, annotations = z.digest, z.size, z.diff_id, z.annotations
            else:
                ranges = {clean_name(n): r for n, r in read_ranges if clean_name(n) in wanted}
                order = {clean_name(n): r for n, r in read_order if clean_name(n) in wanted}
                e = convert(  # type: ignore[arg-type]
                    src,
                    out,
                    workers=workers,
                    read_ranges=ranges,
                    read_order=order,
                    landmark_mtime=repeat,
                    **kwargs,
                )
                digest, size, diff_id = e.digest, e.size, e.diff_id
                annotations = {
                    _toc_annotation(): e.toc_digest,
                    _size_annotation(): str(e.uncompressed_size),
                }
        os.replace(tmp, Path(out_dir) / digest.split(":", 1)[1])
    except EstargzError as exc:
        raise _layer_error(desc, exc) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {
        "digest": digest,
        "size": size,
        "diff_id": diff_id,
        "annotations": dict(annotations),
        "passed_through": False,
        "prioritized": len(wanted),
    }


def _layer_error(desc: dict[str, Any], exc: Exception) -> ConvertError:
    """The error for layer ``desc`` that ``exc`` (an EstargzError) failed, with what to do
    when its source copy does not read (:class:`~store.estargz.UnreadableLayerTar`)."""
    from store.estargz import UnreadableLayerTar

    hint = ""
    if isinstance(exc, UnreadableLayerTar):
        hint = "; the source's copy of this layer is damaged: pull or export the image again"
    return ConvertError(f"{desc['digest']}: {exc}{hint}")


def _present(blob: Path, names: Sequence[str]) -> list[str]:
    """The prioritized names this layer holds, in the given order. Raises
    :class:`~store.estargz.UnreadableLayerTar` when the layer does not read as a tar (as
    the writer would, a moment later)."""
    import gzip
    import tarfile
    import zlib

    from zlib_ng import zlib_ng
    from zstandard import ZstdError

    from store.estargz import UnreadableLayerTar, clean_name

    try:
        with open_layer(blob) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            have = {clean_name(ti.name) for ti in tar}
    except (
        tarfile.TarError,
        EOFError,
        gzip.BadGzipFile,
        zlib.error,
        zlib_ng.error,
        ZstdError,
    ) as exc:
        raise UnreadableLayerTar(f"input is not a readable tar: {exc}") from None
    seen: set[str] = set()
    out = []
    for n in names:
        c = clean_name(n)
        if c and c in have and c not in seen:
            seen.add(c)
            out.append(c)
    return out


# -- --optimize -------------------------------------------------------------------------------


def optimize_files(
    src: str,
    *,
    command: Sequence[str] = (),
    entrypoint: Sequence[str] | None = None,
    stdin: str | None = None,
    ready: str | None = None,
    timeout: float = 300.0,
    env: Sequence[tuple[str, str]] = (),
    platform: str | None = None,
    cache_dir: Path | None = None,
    workdir: Path | None = None,
    say: Any = lambda message: None,
) -> list[TracedFile]:
    """The files the workload reads from ``src``, in first-access order, with the byte ranges
    read of each and the order of their first reads (:class:`~harness.trace.TracedFile`;
    ``ConvertOptions.read_ranges`` and ``read_order`` take them): the image imported
    (cached), pushed unoptimized to a registry on loopback, run once through our store with
    the access trace (``harness.trace``). ``command`` empty: the image's own CMD;
    ``entrypoint`` None: the image's own ENTRYPOINT (empty: cleared)."""
    from harness.images.source import import_image
    from harness.prepare import ResolvedWorkload
    from harness.registry_server import RegistryServer
    from harness.trace import traced_reads

    built = import_image(src, cache_dir, platform=platform, name="convert", progress=say)
    own = (built.config or {}).get("config") or {}
    if not command and not entrypoint and not own.get("Entrypoint") and not own.get("Cmd"):
        raise ConvertError(
            f"{src}: its image has no Entrypoint or Cmd for --optimize to run: give the "
            "workload's --command (or --entrypoint)"
        )
    w = ResolvedWorkload(
        name="convert",
        recipe=None,
        command=tuple(command),
        stdin=stdin,
        ready=ready,
        expected=None,
        timeout=timeout,
        env=tuple(env),
        entrypoint=tuple(entrypoint) if entrypoint is not None else None,
    )
    with (
        tempfile.TemporaryDirectory(prefix="lazybench-optimize-", dir=workdir) as tmp,
        RegistryServer(storage_dir=Path(tmp) / "registry") as reg,
    ):
        return traced_reads(built, w, reg.host, Path(tmp), cache_dir=cache_dir, say=say)
