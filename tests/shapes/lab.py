"""One registry, one mounted store and two podman graphroots, shared by every generated image.

:meth:`Lab.check` pushes an image in eStargz twice (our writer and the Go writer), pulls each
lazily (through the store) and normally (a podman without the store), lists both with
``podman image mount`` and judges them by :func:`judge`. A third variant writes the layers as
zstd:chunked (our writer, podman 4.3's layout) and pulls it lazily only: its reference is the
normal pull of our eStargz image of the same tars (plain tar extraction by podman), which
costs one pull less than a normal pull of the zstd image and judges the same tree.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from harness.podman import PodmanEnv
from harness.registry_server import RegistryServer
from store.estargz import (
    BytesBlobSource,
    EstargzReader,
    InvalidLayerTar,
    InvalidToc,
    LayerIndex,
    manifest_entries,
    zstd_chunked_layer,
)
from tests.shapes.model import Image, Listing, list_tree, spec_tree, to_tar
from tests.store.conftest import StoreProcess
from tests.store.images import (
    LAYER_ZSTD,
    Blob,
    full_blob_gets,
    push,
    to_estargz,
    to_zstd_chunked_ours,
)

CHUNK = 64  # small chunks: most files span several
HIDDEN = {".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json"}


class GoWriterError(Exception):
    """The Go writer refused the tar (its message)."""


@dataclass
class Pulled:
    """What one pull gave: the listing, or the refusal's message."""

    listing: Listing | None
    error: str = ""
    whole_blobs: int = 0  # layer blobs fetched whole (the store did not serve them)


def judge(
    normal: Pulled,
    lazy: Pulled,
    spec: Listing | None,
    refusable: int = 0,
    unserved: frozenset[str] = frozenset(),
) -> list[str]:
    """Problems with a lazy pull, given the normal pull of the same image and the spec's tree.

    The rule: where a normal pull extracts the image, the lazy tree is that tree, served
    lazily (no layer blob fetched whole). Where the normal pull refuses a layer, the lazy tree
    is the one the OCI image spec defines (:func:`~tests.shapes.model.spec_tree`, what the Go
    store serves), or the same refusal where the spec defines none — never a third answer.
    ``refusable`` layers have a TOC the store's rules refuse (e.g. the Go writer keeps entries
    under a file that replaces their directory): podman pulling those whole is the same
    refusal, accepted when the tree is the normal pull's. ``unserved`` are blob digests the
    store never serves by design (a blob the image lists twice): where podman's own extraction
    of one of them refused the image, that refusal is the lazy pull's answer too.
    """
    if normal.listing is not None:
        if lazy.listing is None:
            return [f"lazy pull refused what a normal pull extracts: {lazy.error}"]
        problems = diff(normal.listing, lazy.listing, "normal", "lazy")
        if lazy.whole_blobs > refusable:
            problems.append(f"{lazy.whole_blobs} layer blob(s) fetched whole: the store refused")
        return problems
    if spec is not None:
        if lazy.listing is None:
            if _refused_blob(lazy.error) in unserved:
                return []
            return [f"spec defines a tree; lazy pull refused: {lazy.error}"]
        return diff(spec, lazy.listing, "spec", "lazy")
    if lazy.listing is not None:
        return ["normal pull and the spec refuse; the lazy pull gave a tree (a third answer)"]
    return []


def _refused_blob(error: str) -> str:
    """The blob digest in podman's refusal (``adding layer with blob "sha256:…"``), or ""."""
    found = re.search(r'with blob "(sha256:[0-9a-f]{64})"', error)
    return found.group(1) if found else ""


def diff(a: Listing, b: Listing, an: str, bn: str) -> list[str]:
    out = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            out.append(f"/{path}: {an} {a.get(path)} != {bn} {b.get(path)}")
    return out


def _toc_refused(blob: Blob) -> bool:
    """The store's tree rules (store/estargz/index.py) refuse this layer's TOC."""
    try:
        if blob.annotations is not None:  # zstd:chunked: the TOC is found by the annotations
            layer = zstd_chunked_layer(blob.annotations)
            assert layer is not None
            start, end = layer.toc_range
            entries = manifest_entries(blob.data[start:end], layer.position, layer.checksum)
            LayerIndex.from_entries(entries, toc_offset=start, compression="zstd")
        else:
            EstargzReader(BytesBlobSource(blob.data), blob.toc_digest)
    except InvalidToc:
        return True
    return False


@dataclass
class Outcome:
    writer: str
    normal: Pulled
    lazy: Pulled
    spec: Listing | None
    problems: list[str] = field(default_factory=list)


def _plain(blob: Blob) -> bytes:
    """The layer tar a blob compresses (gzip or zstd frames)."""
    if blob.media_type == LAYER_ZSTD:
        return zstandard.ZstdDecompressor().stream_reader(blob.data, read_across_frames=True).read()
    return gzip.decompress(blob.data)


class Lab:
    def __init__(self, workdir: Path, registry: RegistryServer, store: StoreProcess,
                 gowrite: Path | None) -> None:  # fmt: skip
        self.workdir = workdir
        self.registry = registry
        self.store = store
        self.gowrite = gowrite
        host = registry.host
        self.lazy = PodmanEnv(workdir / "lazy", store.mnt, [host], keep_blob_info_cache=True)
        self.normal = PodmanEnv(workdir / "normal", None, [host], keep_blob_info_cache=True)
        self.count = 0
        self.seconds = 0.0
        # how the normal pulls went: extracted / refused-with-spec-tree / refused-no-tree
        self.stats: collections.Counter[str] = collections.Counter()
        self.refusals: collections.Counter[str] = collections.Counter()  # normal pull errors

    def __enter__(self) -> Lab:
        self.lazy.__enter__()
        self.normal.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lazy.close()
        self.normal.close()

    # -- one image ---------------------------------------------------------------------------

    def check(self, image: Image) -> list[Outcome]:
        """Pull ``image`` lazily and normally (eStargz by both writers; zstd:chunked by ours,
        lazily only); outcomes with their problems."""
        start = time.monotonic()
        self.count += 1
        tars = [to_tar(layer) for layer in image]
        makers = {"ours": lambda t: to_estargz(t, chunk_size=CHUNK)}
        if self.gowrite is not None:
            makers["go"] = self._go_estargz
        makers["zstd"] = lambda t: to_zstd_chunked_ours(t, chunk_size=CHUNK)
        outcomes: list[Outcome] = []
        reference: Pulled | None = None  # the normal pull of our eStargz image
        for writer, make in makers.items():
            try:
                blobs = [make(t) for t in tars]
            except (InvalidLayerTar, GoWriterError) as exc:
                # A writer may refuse a tar no extraction accepts; never one the spec defines.
                self.stats[f"{writer} writer refused"] += 1
                refused = Pulled(None, f"{writer} writer: {exc}")
                outcome = Outcome(writer, refused, refused, spec_tree(tars))
                if outcome.spec is not None:
                    outcome.problems = [f"the writer refuses a tree the spec defines: {exc}"]
                outcomes.append(outcome)
                continue
            repo = f"shapes/i{self.count}-{writer}"
            push(self.registry.host, repo, "1", blobs)
            ref = f"{self.registry.host}/{repo}:1"
            # zstd: the reference is our eStargz image's normal pull (the same tars extracted).
            shared = writer == "zstd" and reference is not None
            normal = reference if shared else self._pull(self.normal, ref, blobs)
            if writer == "ours":
                reference = normal
            lazy = self._pull(self.lazy, ref, blobs)
            spec = None
            if normal.listing is None:
                spec = spec_tree([_plain(b) for b in blobs])
                if spec is not None:
                    spec = {p: r for p, r in spec.items() if p not in HIDDEN}
            if not shared:  # each normal pull counted once
                self.stats[
                    "extracted"
                    if normal.listing is not None
                    else "refused, spec tree"
                    if spec is not None
                    else "refused, no tree"
                ] += 1
                if normal.error:
                    why = re.sub(r"sha256:[0-9a-f]+|/\S*", "…", normal.error.splitlines()[-1])
                    self.refusals[f"{'tree' if spec is not None else 'none'}: {why[-90:]}"] += 1
            outcome = Outcome(writer, normal, lazy, spec)
            once = [b for b in blobs if sum(c.digest == b.digest for c in blobs) == 1]
            refusable = sum(1 for b in once if _toc_refused(b))
            repeated = frozenset(b.digest for b in blobs) - {b.digest for b in once}
            outcome.problems = judge(normal, lazy, spec, refusable, repeated)
            outcomes.append(outcome)
        self.seconds += time.monotonic() - start
        return outcomes

    def _go_estargz(self, tar: bytes) -> Blob:
        assert self.gowrite is not None
        src, out = self.workdir / "go-in.tar", self.workdir / "go-out.blob"
        src.write_bytes(tar)
        proc = subprocess.run(
            [str(self.gowrite), "-chunk", str(CHUNK), str(src), str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise GoWriterError(proc.stderr.strip())
        res = json.loads(proc.stdout)
        data = out.read_bytes()
        return Blob(data, res["diff_id"], res["toc_digest"], len(gzip.decompress(data)))

    def _pull(self, env: PodmanEnv, ref: str, blobs: list[Blob]) -> Pulled:
        mark = self.registry.log_mark()
        proc = env.podman("pull", "--quiet", ref, timeout=120, check=False)
        # A blob the image lists twice is pulled normally by design (store/resolver.py).
        once = [b for b in blobs if sum(c.digest == b.digest for c in blobs) == 1]
        whole = len(full_blob_gets(self.registry, mark, once)) if env is self.lazy else 0
        if proc.returncode != 0:
            return Pulled(None, proc.stderr.strip()[-500:], whole)
        try:
            mount = env.podman("image", "mount", ref, timeout=60, check=False)
            if mount.returncode != 0:
                return Pulled(None, f"image mount failed: {mount.stderr.strip()[-500:]}", whole)
            try:
                listing = {p: r for p, r in list_tree(Path(mount.stdout.strip())).items()}
            finally:
                env.podman("image", "unmount", "--force", ref, timeout=60, check=False)
        finally:
            env.podman("rmi", "--force", ref, timeout=60, check=False)
        return Pulled({p: r for p, r in listing.items() if p not in HIDDEN}, "", whole)
