"""Tiny test images for the store's end-to-end tests: layer tars built with ``tarfile``
(busybox-static as the userland), converted by the project's eStargz writer — or to
zstd:chunked by skopeo itself (containers/image, as ``podman push --compression-format
zstd:chunked`` does) or by our zstd:chunked writer —, pushed with the project's registry client
as OCI images with the TOC-digest annotations."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from store.estargz import convert, write_zstd_chunked
from store.registry.client import RegistryClient
from store.registry.manifest import Descriptor, build_index

TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
USIZE_ANN = "io.containers.estargz.uncompressed-size"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


@dataclass
class Blob:
    data: bytes
    diff_id: str
    toc_digest: str | None = None
    uncompressed_size: int = 0
    media_type: str = LAYER_GZIP
    annotations: dict[str, str] | None = None  # as given (zstd:chunked); else eStargz's

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(add: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar)
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"", mode: int = 0o644, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def add_node(tar: tarfile.TarFile, name: str, type_: bytes, mode: int = 0o755, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = type_, mode, 1_700_000_000
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info)


def busybox(tar: tarfile.TarFile) -> None:
    add_node(tar, "bin", tarfile.DIRTYPE)
    tar.add("/bin/busybox", arcname="bin/busybox")
    for name in ("sh", "cat", "find", "stat", "sha256sum", "echo", "ls", "xargs", "sort"):
        add_node(tar, f"bin/{name}", tarfile.SYMTYPE, 0o777, linkname="busybox")


def to_estargz(
    tar_bytes: bytes, chunk_size: int = 256 << 10, prioritized: tuple[str, ...] = ()
) -> Blob:
    """Convert an uncompressed tar with the project's eStargz writer."""
    out = io.BytesIO()
    res = convert(io.BytesIO(tar_bytes), out, chunk_size=chunk_size, prioritized_files=prioritized)
    return Blob(out.getvalue(), res.diff_id, res.toc_digest, res.uncompressed_size)


def to_gzip(tar_bytes: bytes) -> Blob:
    return Blob(gzip.compress(tar_bytes, 6, mtime=0), sha(tar_bytes))


async def push_image(
    host: str,
    repo: str,
    tag: str,
    blobs: list[Blob],
    toc_override: dict[int, str] | None = None,
    client: dict | None = None,
    architecture: str = "amd64",
) -> str:
    """Push layers + config + OCI manifest; returns the manifest digest. ``client``: keyword
    arguments of the RegistryClient that pushes (a registry over TLS, with credentials);
    ``architecture``: the config's."""
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]},
    }
    config_raw = json.dumps(config).encode()
    ref = f"{host}/{repo}:{tag}"
    layers = []
    async with RegistryClient(**(client or {})) as c:
        for i, b in enumerate(blobs):
            await c.push_blob(ref, b.data)
            desc: dict = {"mediaType": b.media_type, "digest": b.digest, "size": len(b.data)}
            if b.annotations is not None:
                desc["annotations"] = dict(b.annotations)
            elif b.toc_digest:
                desc["annotations"] = {
                    TOC_ANN: (toc_override or {}).get(i, b.toc_digest),
                    USIZE_ANN: str(b.uncompressed_size),
                }
            layers.append(desc)
        await c.push_blob(ref, config_raw)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config_raw), "size": len(config_raw)},
            "layers": layers,
        }
        return await c.push_manifest(ref, json.dumps(manifest).encode(), OCI_MANIFEST)


def push(host: str, repo: str, tag: str, blobs: list[Blob], **kw) -> str:
    return trio.run(lambda: push_image(host, repo, tag, blobs, **kw))


async def push_index_of(host: str, repo: str, tag: str, images: dict[str, str]) -> str:
    """Push an OCI index to ``host/repo:tag`` naming the manifests ``images`` maps platforms
    (``os/arch[/variant]``) to (digests in ``repo``), in that order; returns its digest."""
    descs = []
    async with RegistryClient() as c:
        for platform, digest in images.items():
            m = await c.get_index(f"{host}/{repo}@{digest}")
            fields = dict(zip(("os", "architecture", "variant"), platform.split("/"), strict=False))
            descs.append(Descriptor(m.media_type, m.digest, len(m.raw), platform=fields))
        raw, media_type = build_index(descs)
        return await c.push_manifest(f"{host}/{repo}:{tag}", raw, media_type)


def push_index(host: str, repo: str, tag: str, images: dict[str, str]) -> str:
    return trio.run(lambda: push_index_of(host, repo, tag, images))


def write_tar(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- the two-layer image the end-to-end tests pull ------------------------------------


def lower_layer(tar: tarfile.TarFile, big: bytes) -> None:
    busybox(tar)
    for d in ("etc", "data", "data/sub", "opq", "tmp"):
        add_node(tar, d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755)
    add_file(tar, "etc/hello", b"hello from lower\n")
    add_file(tar, "data/a", b"to be deleted\n")
    add_file(tar, "data/sub/b", b"kept\n", 0o600, uid=1000, gid=1000)
    add_file(tar, "opq/old", b"hidden by opaque\n")
    add_file(tar, "bin/suid", b"#!/bin/sh\n", 0o4755)
    add_file(tar, "big", big)
    # As tar writes it: a hardlink header carries its target's metadata.
    add_node(tar, "data/hard", tarfile.LNKTYPE, 0o600, uid=1000, gid=1000, linkname="data/sub/b")
    add_file(tar, "etc/empty", b"")


def upper_layer(tar: tarfile.TarFile) -> None:
    add_node(tar, "data", tarfile.DIRTYPE)
    add_file(tar, "data/.wh.a", b"")
    add_node(tar, "opq", tarfile.DIRTYPE)
    add_file(tar, "opq/.wh..wh..opq", b"")
    add_file(tar, "opq/new", b"new in opaque dir\n")
    add_file(tar, "etc/hello", b"hello from upper\n")


def full_blob_gets(reg, mark: int, blobs) -> list:
    """Whole-blob GETs of layer blobs (the config blob is always fetched whole)."""
    layer_digests = {b.digest for b in blobs}
    return [
        r for r in reg.access_log_since(mark) if r.is_full_blob_get and r.digest in layer_digests
    ]


def push_two_layer_estargz(host: str, repo: str, layers: dict, **kw) -> tuple[str, list[Blob]]:
    """Push the ``layers`` fixture's two tars as eStargz to ``host/repo:1``; (ref, blobs);
    ``kw`` to :func:`push_image`."""
    blobs = [to_estargz(layers["lower"]), to_estargz(layers["upper"])]
    push(host, repo, "1", blobs, **kw)
    return f"{host}/{repo}:1", blobs


# The file-type bits Go's tar writer (buildah, podman save) puts in a header's mode field.
_GO_TYPE_BITS = {
    tarfile.DIRTYPE: 0o040000,
    tarfile.REGTYPE: 0o100000,
    tarfile.AREGTYPE: 0o100000,
    tarfile.SYMTYPE: 0o120000,
    tarfile.LNKTYPE: 0o100000,
}


def with_go_mode_bits(tar_bytes: bytes) -> bytes:
    """``tar_bytes`` with each member's mode field as Go's tar writer writes it: the file-type
    bits included (0o40755 for a directory; Python's tarfile writes 0o755)."""
    out = bytearray(tar_bytes)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for ti in tar.getmembers():
            at = ti.offset_data - 512  # the member's own header, after any PAX header
            header = out[at : at + 512]
            mode = int(header[100:107].decode().strip("\0 ") or "0", 8)
            header[100:108] = b"%07o\0" % (mode | _GO_TYPE_BITS.get(ti.type, 0))
            header[148:156] = b" " * 8
            header[148:156] = b"%06o\0 " % sum(header)
            out[at : at + 512] = header
    return bytes(out)


# -- zstd:chunked ----------------------------------------------------------------------


def cut_tar(tar_bytes: bytes) -> bytes:
    """``tar_bytes`` ending just after its end-of-archive marker (tarfile pads to a record;
    containers/storage 1.43's compressor leaves the padding out, see
    :func:`harness.images.push.tar_archive_end`)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for _ in tar:
            pass
        end = tar.offset + 2 * tarfile.BLOCKSIZE
    return tar_bytes[:end]


def to_zstd_chunked_skopeo(tars: list[bytes], work: Path) -> list[Blob]:
    """zstd:chunked layers written by containers/image itself: ``skopeo copy
    --dest-compress-format zstd:chunked`` of an OCI layout of ``tars`` (skopeo 1.9.3 here:
    containers/storage 1.43, podman 4.3's compressor). Blobs keep skopeo's annotations."""
    from harness.images.push import _skopeo_copy

    src, dst = work / "src", work / "dst"
    blobs_dir = src / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)

    def put(data: bytes, media: str) -> dict:
        (blobs_dir / sha(data)[7:]).write_bytes(data)
        return {"mediaType": media, "digest": sha(data), "size": len(data)}

    cut = [cut_tar(t) for t in tars]
    layers = [put(t, LAYER_TAR) for t in cut]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in cut]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": put(json.dumps(config).encode(), OCI_CONFIG),
        "layers": layers,
    }
    desc = put(json.dumps(manifest).encode(), OCI_MANIFEST)
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (src / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (src / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    _skopeo_copy(
        f"oci:{src}:latest",
        f"oci:{dst}:latest",
        ["--dest-compress-format", "zstd:chunked"],
        timeout=300,
        what="test layers as zstd:chunked",
    )
    out_blobs = dst / "blobs" / "sha256"
    index = json.loads((dst / "index.json").read_text())
    out_manifest = json.loads((out_blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    result = []
    for layer, plain in zip(out_manifest["layers"], cut, strict=True):
        assert layer["mediaType"] == LAYER_ZSTD, layer
        result.append(
            Blob(
                (out_blobs / layer["digest"][7:]).read_bytes(),
                sha(plain),
                toc_digest=(layer.get("annotations") or {}).get(
                    "io.containers.zstd-chunked.manifest-checksum"
                ),
                media_type=LAYER_ZSTD,
                annotations=dict(layer.get("annotations") or {}),
            )
        )
    return result


def to_zstd_chunked_ours(tar_bytes: bytes, generation: str = "podman4", **kw) -> Blob:
    """zstd:chunked by the project's writer (``generation``: podman4 or podman5 layout)."""
    out = io.BytesIO()
    res = write_zstd_chunked(io.BytesIO(tar_bytes), out, generation=generation, **kw)
    return Blob(
        out.getvalue(),
        res.diff_id,
        res.toc_digest,
        res.uncompressed_size,
        media_type=LAYER_ZSTD,
        annotations=res.annotations,
    )
