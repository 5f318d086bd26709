"""Workload images from any image source: a containers-image reference or a Containerfile.

skopeo brings the source into an OCI image layout (every transport it knows: ``docker://``,
``oci:``, ``oci-archive:``, ``docker-archive:``, ``containers-storage:``, ``dir:``); for an
image index the manifest of the wanted platform (default: the host's) is chosen with
``store.registry.select_platform``. Its layers are decompressed into plain tars (gzip, zstd,
zstd:chunked or plain in; each checked against the config's diff ID) and kept with the config
as a :class:`~harness.images.build.BuiltImage`, so every mode of ``harness.images.push`` (gzip,
eStargz, optimized eStargz, zstd:chunked) makes it exactly as it makes a recipe's image; a gzip
layer also keeps the source's own blob, which ``legacy`` pushes as it is.

Cache: ``<cache>/images/src-<key>/`` (``image.json`` + ``layers/<n>.tar``, the recipe cache's
shape), ``key`` = the source's manifest digest (of the index, when it is one) and the platform:
the same image from any transport or path is imported once. An archive file unchanged since
(path, size, mtime) is not even inspected again (``<cache>/sources/``). A Containerfile is
built with podman in a private graphroot, saved as an OCI archive and imported the same way; it
is cached by the Containerfile and the context's contents (``<cache>/containerfile/<key>.json``
names the imported image). Every step writes into a temporary sibling renamed into place.

Errors (:class:`ImageSourceError`) name the source and what to check: an unreadable source
(missing file, registry down, unknown tag), an index without the platform, an image for
another platform, a layer whose bytes do not match the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from harness.cli import default_cache_dir
from harness.images.build import (
    BuiltImage,
    BuiltLayer,
    ImageBuildError,
    publish_dir,
)
from harness.images.transports import (
    TransportError,
    local_path,
    pull_reference,
    registry_host,
    split_transport,
)
from harness.stale import claim

Progress = Callable[[str], None]
SKOPEO_TIMEOUT = 3600.0
# Bump when the import changes the tars or metadata it writes for the same source.
IMPORT_FORMAT = 2  # 2: gzip layers keep the source's blob for legacy


class ImageSourceError(ImageBuildError):
    """An image source cannot be read or used; the message names it and what to check."""


# -- skopeo -----------------------------------------------------------------------------------


def tls_args(ref: str, flag: str) -> list[str]:
    """``--FLAG-tls-verify=false`` for a registry on loopback (plain HTTP, as podman and skopeo
    users run local registries); nothing otherwise (registries.conf ``insecure`` applies)."""
    from store.registry import is_local_host

    host = registry_host(ref)
    return [f"--{flag}-tls-verify=false"] if host and is_local_host(host) else []


def skopeo(
    args: list[str], what: str, *, timeout: float = SKOPEO_TIMEOUT, private_cache: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo ARGS``; :class:`ImageSourceError` naming ``what`` on failure or timeout.

    ``private_cache``: run in a private mount namespace with an empty blob-info cache, so
    containers/image cannot substitute a blob it compressed differently for an earlier copy
    (``/var/lib/containers/cache`` is host-wide).
    """
    argv = ["skopeo", *args]
    if private_cache:
        cache = "/var/lib/containers/cache"
        os.makedirs(cache, exist_ok=True)
        script = f"mount -t tmpfs tmpfs {cache} && exec {shlex.join(argv)}"
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ImageSourceError(f"{what}: skopeo did not finish within {timeout:.0f}s") from None
    except FileNotFoundError:
        raise ImageSourceError(f"{what}: skopeo not installed (ci/install-system-deps)") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip()[-1500:]
        raise ImageSourceError(f"{what}: skopeo exited {proc.returncode}: {tail}{_hint(tail)}")
    return proc


# skopeo's words for a docker-archive that holds several images (containers/image
# docker/internal/tarfile), and what to write instead (containers-transports(5)).
_SEVERAL_IMAGES = re.compile(r"tar manifest\.json: expected 1 item, got (\d+)")
# And for an OCI layout (a directory or an archive of one) whose index names several images
# (containers/image oci/layout: "more than one image in oci, choose an image").
_SEVERAL_OCI = re.compile(r"\b(oci-archive|oci):\S*\s+more than one image in oci")


def _hint(stderr: str) -> str:
    """What to do next, for a skopeo failure whose cause the user can fix in the reference."""
    several = _SEVERAL_IMAGES.search(stderr)
    if several:
        return (
            f" (the archive holds {several.group(1)} images: name one as "
            "docker-archive:FILE:NAME:TAG, or by its place as docker-archive:FILE:@N from @0)"
        )
    oci = _SEVERAL_OCI.search(stderr)
    if oci:
        transport = oci.group(1)
        where = "DIR" if transport == "oci" else "FILE"
        return (
            f" (the layout holds several images: name one as {transport}:{where}:TAG, a tag "
            "its index.json gives as org.opencontainers.image.ref.name)"
        )
    return ""


def check_source(ref: str) -> str:
    """Check the syntax of ``ref`` and that a local path exists; return the transport."""
    try:
        transport, _ = split_transport(ref)
        path = local_path(ref)
    except TransportError as exc:
        raise ImageSourceError(str(exc)) from None
    if path is not None and not path.exists():
        raise ImageSourceError(f"image source {ref}: {path} does not exist")
    return transport


def inspect_raw(ref: str, *, timeout: float = 300.0) -> bytes:
    """The source's top-level manifest (an index when it is one), byte for byte."""
    check_source(ref)
    tls = [a.replace("--src-", "--") for a in tls_args(ref, "src")]
    proc = skopeo(
        ["inspect", "--raw", *tls, ref],
        f"cannot read image {ref} (check the reference, the file, or that the registry is up)",
        timeout=timeout,
    )
    return proc.stdout.encode()


def copy_to_layout(
    ref: str,
    layout: Path,
    *,
    platform: Any = None,
    all_platforms: bool = False,
    timeout: float = SKOPEO_TIMEOUT,
) -> None:
    """``skopeo copy ref oci:layout:latest`` keeping layers as the source has them (no
    recompression). ``platform`` (a ``store.registry.Platform``) picks an index's manifest;
    ``all_platforms`` copies the whole index."""
    args = ["--insecure-policy"]
    if platform is not None:
        args += [f"--override-os={platform.os}", f"--override-arch={platform.architecture}"]
        if platform.variant:
            args.append(f"--override-variant={platform.variant}")
    args += ["copy", "--quiet", "--dest-oci-accept-uncompressed-layers", *tls_args(ref, "src")]
    if all_platforms:
        args.append("--all")
    args += [ref, f"oci:{layout}:latest"]
    what = f"cannot read image {ref} (check the reference, the file, or that the registry is up)"
    skopeo(args, what, timeout=timeout, private_cache=True)


# -- OCI layouts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """An OCI image layout on disk (what :func:`copy_to_layout` wrote)."""

    path: Path

    def blob(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return self.path / "blobs" / algo / hexd

    def read_json(self, digest: str) -> dict[str, Any]:
        return json.loads(self.blob(digest).read_bytes())

    def top(self) -> dict[str, Any]:
        """The descriptor ``index.json`` names (tag ``latest``, or the only one)."""
        index = json.loads((self.path / "index.json").read_text())
        manifests = index.get("manifests") or []
        for d in manifests:
            if (d.get("annotations") or {}).get("org.opencontainers.image.ref.name") == "latest":
                return d
        if len(manifests) == 1:
            return manifests[0]
        raise ImageSourceError(f"{self.path}: index.json names {len(manifests)} images")


def manifest_result(raw: bytes, media_type: str | None = None) -> Any:
    """``store.registry.ManifestResult`` of raw manifest bytes (the one manifest parser)."""
    from store.registry import ManifestError, parse_manifest, sha256_digest

    try:
        return parse_manifest(raw, media_type, sha256_digest(raw))
    except ManifestError as exc:
        raise ImageSourceError(str(exc)) from None


def wanted_platform(text: str | None) -> Any:
    """``store.registry.Platform`` of ``os/arch[/variant]``, or the host's for ``None``/""."""
    from store.registry import ManifestError, Platform

    if not text:
        return Platform.host()
    try:
        return Platform.parse(text)
    except ManifestError as exc:
        raise ImageSourceError(str(exc)) from None


def check_config_platform(
    ref: str, config: dict[str, Any], platform: Any, option: str = "the workload's platform = "
) -> None:
    """Refuse an image whose config says it is for another platform than ``platform``; the
    message suggests ``option`` (how the user names a platform there) with the image's own."""
    have = {
        "os": config.get("os", ""),
        "architecture": config.get("architecture", ""),
        "variant": config.get("variant", ""),
    }
    if not have["variant"]:  # optional in a config: the index entry chose the variant
        platform = type(platform)(platform.os, platform.architecture)
    if have["os"] and have["architecture"] and not platform.matches(have):
        shown = "/".join(v for v in have.values() if v)
        raise ImageSourceError(
            f"image {ref} has no layers for platform {platform}: it is a {shown} image "
            f"(set {option}{shown!r} or use an image built for {platform})"
        )


# -- import -----------------------------------------------------------------------------------


def source_key(ref: str, platform: Any, *, timeout: float = 300.0) -> tuple[str, bytes]:
    """(cache key, raw top manifest) of a source: its manifest digest and the platform."""
    raw = inspect_raw(ref, timeout=timeout)
    top = manifest_result(raw)
    if top.is_index:
        from store.registry import ManifestError, select_platform

        try:
            select_platform(top, platform)
        except ManifestError as exc:
            raise ImageSourceError(f"image {ref}: {exc}") from None
    text = json.dumps([IMPORT_FORMAT, top.digest, str(platform) if top.is_index else ""])
    return hashlib.sha256(text.encode()).hexdigest()[:20], raw


def _entry_platform(raw: bytes, want: Any) -> Any:
    """``want`` with the variant of the index entry it selects (skopeo, unlike
    ``select_platform``, takes no variant to mean "no variant" and would refuse an index
    whose only ``linux/amd64`` entry says ``v3``); ``want`` itself for a single image."""
    from store.registry import select_platform

    top = manifest_result(raw)
    if not top.is_index or want.variant:
        return want
    variant = (select_platform(top, want).platform or {}).get("variant") or ""
    return type(want)(want.os, want.architecture, variant)


def import_image(
    ref: str,
    cache_dir: Path | None = None,
    *,
    platform: str | None = None,
    name: str = "",
    progress: Progress | None = None,
) -> BuiltImage:
    """The image ``ref`` names, for ``platform`` (``os/arch[/variant]``; default the host's), as
    plain layer tars and its config; imported once per manifest digest and platform."""
    from harness.podman import write_atomic

    say = progress or (lambda message: None)
    cache_dir = cache_dir or default_cache_dir()
    want = wanted_platform(platform)
    name = name or _name_of(ref)
    try:
        ref = pull_reference(ref)
    except TransportError as exc:
        raise ImageSourceError(str(exc)) from None
    # An archive file unchanged since it was imported is not read again (for oci-archive:
    # skopeo would unpack all of it just to show the manifest).
    memo = _archive_memo(ref, want, cache_dir)
    if memo is not None and memo.is_file():
        found = load_imported(cache_dir / "images" / json.loads(memo.read_text())["image"], name)
        if found is not None:
            check_config_platform(ref, found.config, want)
            return found
    key, raw = source_key(ref, want)
    final = cache_dir / "images" / f"src-{key}"
    found = load_imported(final, name)
    if found is None:
        say(f"{name}: importing {ref} ({want})")
        final.parent.mkdir(parents=True, exist_ok=True)
        # A .build-* name with an owner: harness.stale.sweep removes it if we die uncleanly.
        work = Path(tempfile.mkdtemp(prefix=f".build-import-{key}-", dir=final.parent))
        claim(work)
        try:
            _import_into(ref, _entry_platform(raw, want), key, work, say)
            publish_dir(work, final, lambda: load_imported(final, name) is not None)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        found = load_imported(final, name)
        assert found is not None
    check_config_platform(ref, found.config, want)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, json.dumps({"image": final.name, "source": ref}))
    return found


def _archive_memo(ref: str, platform: Any, cache_dir: Path) -> Path | None:
    """``<cache>/sources/<key>.json`` for an archive file, keyed by its path, size, mtime and
    the platform; ``None`` for other sources (their manifest digest is cheap to read)."""
    transport, _ = split_transport(ref)
    path = local_path(ref)
    if transport not in ("oci-archive", "docker-archive") or path is None or not path.is_file():
        return None
    st = path.stat()
    text = json.dumps([IMPORT_FORMAT, ref, str(path.resolve()), st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(f"{text}{platform}".encode()).hexdigest()[:24]
    return cache_dir / "sources" / f"{key}.json"


def load_imported(directory: Path, name: str) -> BuiltImage | None:
    """An imported image's cache entry, or ``None`` when absent or incomplete."""
    meta = directory / "image.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    layers = tuple(
        BuiltLayer(
            directory / x["file"],
            x["diff_id"],
            x["size"],
            x["comment"],
            directory / x["gzip_file"] if x.get("gzip_file") else None,
            x.get("gzip_digest", ""),
        )
        for x in data["layers"]
    )
    if not all(
        layer.path.is_file() and (layer.gzip_blob is None or layer.gzip_blob.is_file())
        for layer in layers
    ):
        return None
    return BuiltImage(name, directory.name, directory, layers, data["config"], None)


def _import_into(ref: str, platform: Any, key: str, work: Path, say: Progress) -> None:
    layout = Layout(work / "oci")
    copy_to_layout(ref, layout.path, platform=platform)
    top = layout.top()
    manifest = manifest_result(layout.blob(top["digest"]).read_bytes(), top.get("mediaType"))
    if manifest.is_index:  # skopeo copied one platform's image but kept the index
        from store.registry import select_platform

        desc = select_platform(manifest, platform)
        manifest = manifest_result(layout.blob(desc.digest).read_bytes(), desc.media_type)
    config = layout.read_json(manifest.config.digest)
    check_config_platform(ref, config, platform)
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    if len(diff_ids) != len(manifest.layers):
        raise ImageSourceError(
            f"image {ref}: {len(manifest.layers)} layers but the config lists "
            f"{len(diff_ids)} diff IDs"
        )
    (work / "layers").mkdir()
    layer_history = [
        h.get("created_by", "") for h in config.get("history") or [] if not h.get("empty_layer")
    ]

    def one(i: int) -> dict[str, Any]:
        out = work / "layers" / f"{i}.tar"
        size, digest = decompress_layer(layout.blob(manifest.layers[i].digest), out)
        if digest != diff_ids[i]:
            raise ImageSourceError(
                f"image {ref}: layer {i} ({manifest.layers[i].digest}) decompresses to "
                f"{digest}, but the config says {diff_ids[i]}"
            )
        comment = layer_history[i] if i < len(layer_history) else ""
        entry = {"file": f"layers/{i}.tar", "diff_id": digest, "size": size, "comment": comment}
        blob = layout.blob(manifest.layers[i].digest)
        with open(blob, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if gzipped:  # kept for legacy: the user's own compressed bytes
            os.link(blob, work / "layers" / f"{i}.tar.gz")
            entry.update(gzip_file=f"layers/{i}.tar.gz", gzip_digest=manifest.layers[i].digest)
        return entry

    n = len(manifest.layers)
    say(f"  {n} layers: decompressing")
    with ThreadPoolExecutor(max(1, min(n, os.cpu_count() or 2))) as pool:
        layers = list(pool.map(one, range(n)))
    meta = {
        "name": _name_of(ref),
        "hash": f"src-{key}",
        "import_format": IMPORT_FORMAT,  # `lazybench images prune` removes older ones
        "source": ref,
        "manifest_digest": manifest.digest,
        "platform": str(platform),
        "config": config,
        "layers": layers,
    }
    (work / "image.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(layout.path)


def open_layer(path: Path) -> BinaryIO:
    """The plain tar stream of a layer blob: gzip, zstd (zstd:chunked too) or plain."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    head = f.read(4)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        from zlib_ng import gzip_ng

        return gzip_ng.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if head == b"\x28\xb5\x2f\xfd":
        from zstandard import ZstdDecompressor

        return ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=True)  # type: ignore[return-value]
    return f


def decompress_layer(blob: Path, out: Path) -> tuple[int, str]:
    """Write ``blob`` decompressed to ``out``; return (bytes, ``sha256:`` digest) of the tar."""
    hasher = hashlib.sha256()
    size = 0
    try:
        with open_layer(blob) as src, open(out, "wb") as dst:
            while piece := src.read(1 << 20):
                hasher.update(piece)
                dst.write(piece)
                size += len(piece)
    except (OSError, EOFError, ValueError) as exc:
        raise ImageSourceError(f"layer {blob.name}: cannot decompress: {exc}") from None
    return size, f"sha256:{hasher.hexdigest()}"


def _name_of(ref: str) -> str:
    _, rest = split_transport(ref)
    base = rest.rstrip("/").rsplit("/", 1)[-1]
    return base.split("@")[0] or "image"


# -- Containerfiles ---------------------------------------------------------------------------


def build_containerfile(
    containerfile: Path,
    context: Path | None = None,
    cache_dir: Path | None = None,
    *,
    platform: str | None = None,
    name: str = "",
    progress: Progress | None = None,
    timeout: float = 3600.0,
) -> BuiltImage:
    """Build ``containerfile`` with podman (private graphroot, torn down after) and import it.
    However the build ends (an error, ``timeout`` seconds passed, an exception such as
    SIGTERM's), nothing of it is left running: :meth:`harness.podman.PodmanEnv.build`.

    Cached by the Containerfile's bytes, the context's files (names, modes, contents) and the
    platform, so an unchanged build is not run again.
    """
    from harness.podman import PodmanEnv, PodmanError, write_atomic

    say = progress or (lambda message: None)
    cache_dir = cache_dir or default_cache_dir()
    containerfile = containerfile.resolve()
    context = (context or containerfile.parent).resolve()
    if not containerfile.is_file():
        raise ImageSourceError(f"containerfile {containerfile}: no such file")
    if not context.is_dir():
        raise ImageSourceError(f"containerfile context {context}: no such directory")
    key = hashlib.sha256(
        json.dumps(
            [
                IMPORT_FORMAT,
                hashlib.sha256(containerfile.read_bytes()).hexdigest(),
                _tree_digest(context),
                platform or "",
            ]
        ).encode()
    ).hexdigest()[:20]
    name = name or containerfile.parent.name or "containerfile"
    pointer = cache_dir / "containerfile" / f"{key}.json"
    if pointer.is_file():
        image_dir = cache_dir / "images" / json.loads(pointer.read_text())["image"]
        found = load_imported(image_dir, name)
        if found is not None:
            return found
    pointer.parent.mkdir(parents=True, exist_ok=True)
    say(f"{name}: podman build -f {containerfile} {context}")
    with tempfile.TemporaryDirectory(prefix=".build-", dir=pointer.parent) as tmp:
        claim(Path(tmp))  # harness.stale.sweep removes it if we die uncleanly
        tag = "localhost/lazybench-build:latest"
        archive = Path(tmp) / "image.oci.tar"
        try:
            with PodmanEnv(Path(tmp) / "podman") as env:
                args = ["--file", str(containerfile), "--tag", tag]
                if platform:
                    args.append(f"--platform={platform}")
                env.build(*args, str(context), timeout=timeout)
                env.podman("save", "--format", "oci-archive", "--output", str(archive), tag)
        except PodmanError as exc:
            local = local_base_problem(str(exc))
            if local is not None:
                raise ImageSourceError(f"building {containerfile}: {local}") from None
            raise ImageSourceError(f"building {containerfile}: {exc}") from None
        built = import_image(
            f"oci-archive:{archive}", cache_dir, platform=platform, name=name, progress=say
        )
    meta = {"image": built.dir.name, "containerfile": str(containerfile)}
    write_atomic(pointer, json.dumps(meta))
    return built


# podman's error when a FROM names an image it looked for in a registry called localhost
_LOCAL_BASE = re.compile(r"initializing source docker://(localhost/[^\s:\\\"]+(?::[^\s:\\\"]+)?)")


def local_base_problem(podman_error: str) -> str | None:
    """What to tell the user when a Containerfile's FROM names a local image
    (``localhost/x:latest``, as ``podman build`` names its own): the build runs in
    lazybench's private storage, where the host's images are not, so podman looked for it
    in a registry at localhost and failed with that registry's noise. None for other errors."""
    found = _LOCAL_BASE.search(podman_error)
    if found is None:
        return None
    base = found.group(1)
    return (
        f"FROM {base} is not in lazybench's build storage: the build runs in a private "
        "storage and cannot see your local images (`podman images`). Save the base with "
        f"`podman save --format oci-archive -o /path/to/base.tar {base}` and write FROM "
        "oci-archive:/path/to/base.tar (an absolute path) in the Containerfile, or build "
        "the image yourself and give the workload image = "
        '"containers-storage:localhost/NAME:TAG" instead of its containerfile'
    )


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames) + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            path = Path(dirpath, fname)
            st = path.lstat()
            h.update(f"{path.relative_to(root)}\0{st.st_mode:o}\0".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                with open(path, "rb") as f:
                    while piece := f.read(1 << 20):
                        h.update(piece)
            h.update(b"\0")
    return h.hexdigest()


# -- what a scenario workload names ---------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """A workload image from a containers-image reference (``image = "TRANSPORT:REF"``)."""

    ref: str
    platform: str | None = None
    name: str = ""

    def build(self, cache_dir: Path | None = None, *, progress: Progress | None = None) -> Any:
        return import_image(
            self.ref, cache_dir, platform=self.platform, name=self.name, progress=progress
        )


@dataclass(frozen=True)
class ContainerfileSource:
    """A workload image built from a Containerfile (``containerfile = "PATH"``, ``context``)."""

    containerfile: str
    context: str | None = None
    platform: str | None = None
    name: str = ""

    def build(self, cache_dir: Path | None = None, *, progress: Progress | None = None) -> Any:
        return build_containerfile(
            Path(self.containerfile),
            Path(self.context) if self.context else None,
            cache_dir,
            platform=self.platform,
            name=self.name,
            progress=progress,
        )
