"""Build a :class:`Recipe` into uncompressed layer tars and an image config, cached by hash.

Debian layers are made the way a Dockerfile's ``RUN apt-get install`` makes them: the lower
layers are an overlayfs lowerdir, apt runs in a chroot of the merged tree writing to a fresh
upperdir, and the upperdir (apt lists, caches and logs dropped) becomes the layer, with
overlay whiteouts turned into ``.wh.`` entries. The mounts live in a private mount namespace
(``unshare --mount``), so they vanish with the build process whatever happens.

Cache: ``<cache>/images/<recipe hash>/`` holds ``image.json`` and ``layers/<n>.tar``; a build
happens in a temporary sibling directory renamed into place at the end, so a crashed build
leaves nothing that looks finished. The mmdebstrap base tree is cached the same way under
``<cache>/bases/``, and each Debian layer under ``<cache>/layers/<prefix hash>/`` (the upperdir
later layers stack on, and its tar per tar format, ``layer.f<LAYER_FORMAT>.tar``): recipes that
start with the same layers share them, as images built ``FROM`` one parent do — same bytes,
same digests. A new tar format is written from the cached trees, without running apt again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.cli import default_cache_dir
from harness.images.layertar import specs_to_tar, tree_to_tar
from harness.images.recipes import (
    BUILDER_VERSION,
    DEBIAN_SUITE,
    LAYER_FORMAT,
    LayerSpec,
    Recipe,
    recipe_hash,
)
from harness.stale import claim

HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
Progress = Callable[[str], None]

# Paths dropped from every layer: package indexes and caches, scratch space, mount points'
# contents. Under _DROP_FILES_UNDER only files go: packages create log directories with the
# owner their daemon needs (tomcat's logs, postgres's), and those must stay.
_DROP_PREFIXES = (
    "var/lib/apt/lists/",
    "var/cache/apt/",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/cache/ldconfig/aux-cache",
    "tmp/",
    "var/tmp/",
    "root/.cache",
    "dev/",
    "proc/",
    "sys/",
    "run/lock/",
)
_DROP_FILES_UNDER = ("var/log/",)
# Files the build writes into the chroot and removes from the upperdir afterwards.
_BUILD_FILES = ("etc/resolv.conf", "usr/sbin/policy-rc.d")


class ImageBuildError(RuntimeError):
    """Building an image failed: names the recipe, the step and the tail of its output."""


@dataclass(frozen=True)
class BuiltLayer:
    """One uncompressed layer tar of a built image. An imported image's gzip layer also keeps
    the source's own blob (``gzip_blob``, digest ``gzip_digest``): mode ``legacy`` pushes
    that, so a full pull downloads exactly what the user's image holds."""

    path: Path
    diff_id: str
    size: int
    comment: str
    gzip_blob: Path | None = None
    gzip_digest: str = ""


@dataclass(frozen=True)
class BuiltImage:
    """A recipe's layers and config, ready to be compressed and pushed in any mode.

    ``config`` is the OCI image config for the uncompressed layers; a push in a mode that
    changes the tar bytes (eStargz appends its TOC) replaces ``rootfs.diff_ids``.
    """

    name: str
    hash: str
    dir: Path
    layers: tuple[BuiltLayer, ...]
    config: dict
    recipe: Recipe | None  # None for an image imported from elsewhere (harness.images.source)

    @property
    def size(self) -> int:
        """Total uncompressed bytes of the layers."""
        return sum(layer.size for layer in self.layers)


def cached_image(recipe: Recipe, cache_dir: Path | None = None) -> BuiltImage | None:
    """The cached build of ``recipe``, or ``None`` when it was never built (or is incomplete)."""
    directory = (cache_dir or default_cache_dir()) / "images" / recipe_hash(recipe)
    meta = directory / "image.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    layers = tuple(
        BuiltLayer(directory / layer["file"], layer["diff_id"], layer["size"], layer["comment"])
        for layer in data["layers"]
    )
    if not all(layer.path.is_file() for layer in layers):
        return None
    return BuiltImage(recipe.name, recipe_hash(recipe), directory, layers, data["config"], recipe)


def build_layers(
    recipe: Recipe, cache_dir: Path | None = None, *, progress: Progress | None = None
) -> BuiltImage:
    """Build ``recipe`` (or reuse its cached build) and return its layers and config."""
    cache_dir = cache_dir or default_cache_dir()
    found = cached_image(recipe, cache_dir)
    if found is not None:
        return found
    say = progress or (lambda message: None)
    images = cache_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    final = images / recipe_hash(recipe)
    work = Path(tempfile.mkdtemp(prefix=f".build-{recipe.name}-", dir=images))
    claim(work)  # harness.stale.sweep removes it (and its mounts) if we die uncleanly
    try:
        (work / "layers").mkdir()
        layers: list[BuiltLayer] = []
        lowers: list[Path] = []
        if recipe.base == "debian":
            if os.geteuid() != 0:
                raise ImageBuildError(
                    f"recipe {recipe.name}: building Debian layers needs root (mmdebstrap,"
                    " overlay mounts, chroot); run as root"
                )
            say(f"{recipe.name}: Debian {DEBIAN_SUITE} base (mmdebstrap)")
            base = debian_base(cache_dir, progress=say)
            shared = _shared_layer(cache_dir, _prefix_key(recipe, 0))
            tar = _layer_tar(shared, base, overlay_upper=False)
            layers.append(_image_layer(work, 0, tar, f"debian {DEBIAN_SUITE}"))
            lowers.append(base)
        elif recipe.base != "scratch":
            raise ImageBuildError(f"recipe {recipe.name}: unknown base {recipe.base!r}")
        for spec in recipe.layers:
            index = len(layers)
            say(f"{recipe.name}: layer {index}: {spec.comment}")
            if spec.packages or spec.run:
                if spec.files:
                    raise ImageBuildError(
                        f"recipe {recipe.name}: layer {spec.comment!r} mixes packages and files"
                    )
                if not lowers:
                    raise ImageBuildError(
                        f"recipe {recipe.name}: layer {spec.comment!r} runs commands but has no"
                        " base to run them on"
                    )

                def build_tree(w: Path, spec: LayerSpec = spec) -> None:
                    _chroot_layer(recipe, spec, lowers, w / "tree", w)

                shared = _shared_layer(cache_dir, _prefix_key(recipe, index), build_tree)
                tar = _layer_tar(shared, shared / "tree", overlay_upper=True)
                layers.append(_image_layer(work, index, tar, spec.comment))
                lowers.append(shared / "tree")
            elif lowers:
                raise ImageBuildError(
                    f"recipe {recipe.name}: file-set layers are only supported on a scratch base"
                )
            else:
                tar = work / "layers" / f"{index}.tar"
                diff_id = specs_to_tar(spec.files, tar)
                layers.append(BuiltLayer(tar, diff_id, tar.stat().st_size, spec.comment))
        config = image_config(
            recipe, [layer.diff_id for layer in layers], [layer.comment for layer in layers]
        )
        meta = {
            "name": recipe.name,
            "hash": recipe_hash(recipe),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": config,
            "layers": [
                {
                    "file": f"layers/{i}.tar",
                    "diff_id": x.diff_id,
                    "size": x.size,
                    "comment": x.comment,
                }
                for i, x in enumerate(layers)
            ],
        }
        (work / "image.json").write_text(json.dumps(meta, indent=1))
        if final.exists() and cached_image(recipe, cache_dir) is None:
            _discard(final)  # an incomplete entry (a layer file deleted by hand)
        publish_dir(work, final, lambda: cached_image(recipe, cache_dir) is not None)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    built = cached_image(recipe, cache_dir)
    assert built is not None
    return built


def publish_dir(work: Path, final: Path, complete: Callable[[], bool]) -> None:
    """Rename the staged directory ``work`` into place as ``final``. A rename that loses to a
    concurrent identical build (``final`` already there) is fine when ``complete()`` says the
    entry in place is whole; otherwise the ``OSError`` is raised. The caller removes ``work``."""
    try:
        os.rename(work, final)
    except OSError:
        if not complete():
            raise


def _prefix_key(recipe: Recipe, index: int) -> str:
    """Names layer ``index`` of a Debian recipe by everything below and including it, so
    recipes that start alike share those layers (same bytes, same digests), like images built
    FROM a common parent."""
    specs = [asdict(spec) for spec in recipe.layers[:index]]
    text = json.dumps(
        [BUILDER_VERSION, DEBIAN_SUITE, recipe.base, specs], sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _shared_layer(
    cache_dir: Path, key: str, build_tree: Callable[[Path], None] | None = None
) -> Path:
    """``<cache>/layers/<key>/``, made once: for a chroot layer ``build_tree(workdir)`` leaves
    there the ``tree`` later layers stack on. Its tars are written by :func:`_layer_tar`."""
    final = cache_dir / "layers" / key
    if _shared_layer_done(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=final.parent))
    claim(work)
    try:
        if build_tree is not None:
            build_tree(work)
        for scratch in work.glob("ovl*"):
            shutil.rmtree(scratch, ignore_errors=True)
        (work / "tree.json").write_text(json.dumps({"builder": BUILDER_VERSION}))
        publish_dir(work, final, lambda: _shared_layer_done(final))
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final


def _shared_layer_done(directory: Path) -> bool:
    # layer.json marks a directory made before tar formats were versioned: same tree.
    return (directory / "tree.json").is_file() or (directory / "layer.json").is_file()


@dataclass(frozen=True)
class _LayerTar:
    path: Path
    diff_id: str
    size: int


def _layer_tar(shared: Path, source: Path, *, overlay_upper: bool) -> _LayerTar:
    """The tar of ``source`` in the current :data:`LAYER_FORMAT`, written once into ``shared``
    (``layer.f<N>.tar`` and its ``.json``; atomically, so a concurrent build is harmless)."""
    tar = shared / f"layer.f{LAYER_FORMAT}.tar"
    meta_path = shared / f"layer.f{LAYER_FORMAT}.json"
    if not meta_path.is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".tar-", dir=shared))
        try:
            diff_id = tree_to_tar(
                source, tmp / "layer.tar", exclude=_drop, overlay_upper=overlay_upper
            )
            meta = {"diff_id": diff_id, "size": (tmp / "layer.tar").stat().st_size}
            (tmp / "layer.json").write_text(json.dumps(meta))
            os.replace(tmp / "layer.tar", tar)
            os.replace(tmp / "layer.json", meta_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(meta_path.read_text())
    return _LayerTar(tar, meta["diff_id"], meta["size"])


def _image_layer(work: Path, index: int, shared: _LayerTar, comment: str) -> BuiltLayer:
    """Hard-link a shared layer's tar into the image being built."""
    tar = work / "layers" / f"{index}.tar"
    try:
        os.link(shared.path, tar)
    except OSError:
        shutil.copyfile(shared.path, tar)
    return BuiltLayer(tar, shared.diff_id, shared.size, comment)


def _discard(path: Path) -> None:
    """Rename out of the way (atomic), then delete: a reader never sees a half-deleted entry."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def image_config(recipe: Recipe, diff_ids: list[str], comments: list[str]) -> dict:
    """The OCI image config of ``recipe`` over layers with these diff IDs."""
    created = "2024-01-01T00:00:00Z"
    config: dict = {"Env": [f"{k}={v}" for k, v in recipe.env], "Cmd": list(recipe.cmd)}
    if recipe.workdir:
        config["WorkingDir"] = recipe.workdir
    if recipe.user:
        config["User"] = recipe.user
    return {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": f"lazybench: {c}"} for c in comments],
    }


def debian_base(cache_dir: Path, *, progress: Progress | None = None) -> Path:
    """The cached ``mmdebstrap --variant=minbase`` root tree (built on first use)."""
    bases = cache_dir / "bases"
    final = bases / f"debian-{DEBIAN_SUITE}-minbase"
    if (final / "rootfs" / "etc" / "debian_version").is_file():
        return final / "rootfs"
    bases.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-base-", dir=bases))
    claim(work)
    try:
        cmd = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--quiet",
            DEBIAN_SUITE,
            str(work / "rootfs"),
            str(_sources_file()),
        ]
        _run(cmd, f"mmdebstrap {DEBIAN_SUITE}", timeout=1800)
        publish_dir(work, final, (final / "rootfs" / "etc" / "debian_version").is_file)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final / "rootfs"


def _sources_file() -> Path:
    """The host's Debian apt sources (so the images use the same mirror as the machine)."""
    if HOST_SOURCES.is_file():
        return HOST_SOURCES
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file() and legacy.read_text().strip():
        return legacy
    raise ImageBuildError("no Debian apt sources on this host (/etc/apt/sources.list[.d])")


def _chroot_layer(
    recipe: Recipe, spec: LayerSpec, lowers: list[Path], upper: Path, work: Path
) -> None:
    """Run apt (and the layer's commands) in a chroot over ``lowers``, writing to ``upper``."""
    upper.mkdir()
    # The upperdir's own attributes are the merged root's, and the layer's "./" entry: keep
    # those of the root below (whatever this process's umask).
    below = lowers[-1].stat()
    os.chown(upper, below.st_uid, below.st_gid)
    os.chmod(upper, stat.S_IMODE(below.st_mode))
    ovl = Path(tempfile.mkdtemp(prefix="ovl", dir=work))
    merged, workdir = ovl / "merged", ovl / "work"
    merged.mkdir()
    workdir.mkdir()
    # Build helpers in the upperdir, removed again below: DNS for apt, no service starts.
    (upper / "etc").mkdir()
    shutil.copyfile("/etc/resolv.conf", upper / "etc" / "resolv.conf")
    (upper / "usr" / "sbin").mkdir(parents=True)
    policy = upper / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    steps = []
    if spec.packages:
        packages = " ".join(map(shlex.quote, spec.packages))
        steps.append(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
            f" --no-install-recommends -o Dpkg::Use-Pty=0 {packages}"
        )
    steps.extend(spec.run)
    inner = " && ".join(f"({s})" for s in steps)
    lowerdir = ":".join(str(p) for p in reversed(lowers))
    m = shlex.quote(str(merged))
    script = "\n".join(
        [
            "set -e",
            f"mount -t overlay overlay -o lowerdir={shlex.quote(lowerdir)},upperdir="
            f"{shlex.quote(str(upper))},workdir={shlex.quote(str(workdir))},"
            f"redirect_dir=off,metacopy=off,index=off {m}",
            f"mount -t proc proc {m}/proc",
            f"mount --bind /dev {m}/dev",
            f"mount -t tmpfs tmpfs {m}/tmp",
            f"exec chroot {m} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
            f" LANG=C.UTF-8 /bin/sh -c {shlex.quote(inner)}",
        ]
    )
    _run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        f"{recipe.name}: {spec.comment}",
        timeout=3600,
    )
    for name in _BUILD_FILES:
        path = upper / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    for name in _DROP_PREFIXES:
        path = upper / name.rstrip("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for name in _DROP_FILES_UNDER:
        for path in sorted((upper / name).rglob("*")) if (upper / name).is_dir() else []:
            if path.is_symlink() or not path.is_dir():
                path.unlink()


def _drop(name: str, is_dir: bool) -> bool:
    return name.startswith(_DROP_PREFIXES) or (not is_dir and name.startswith(_DROP_FILES_UNDER))


def _run(cmd: list[str], what: str, *, timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what}: did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-1500:]
        raise ImageBuildError(f"{what}: exited {proc.returncode}:\n{tail}")
