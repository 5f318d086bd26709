"""Tiny test images for the store's end-to-end tests: layer tars, eStargz, push.

A minimal eStargz writer lives here only because the project's writer (``store.estargz``) was
not available when these tests were written; it splits the tar at every regular file's payload
and every ``chunk_size`` bytes into separate gzip members, appends the TOC entry in its own
member and the 51-byte footer. Replace with ``store.estargz.convert`` when it lands.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from store.registry.client import RegistryClient

TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
USIZE_ANN = "io.containers.estargz.uncompressed-size"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_TYPES = {
    tarfile.DIRTYPE: "dir",
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass
class Blob:
    data: bytes
    diff_id: str
    toc_digest: str | None = None
    uncompressed_size: int = 0

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


def to_estargz(tar_bytes: bytes, chunk_size: int = 256 << 10) -> Blob:
    """Convert an uncompressed tar to eStargz (no landmark: nothing is prioritized)."""
    tar = tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:")
    members = tar.getmembers()
    end_of_entries = tar.offset
    cuts: list[tuple[int, tarfile.TarInfo | None, int]] = []  # (tar offset, owner, chunk off)
    for m in members:
        if m.isreg() and m.size > 0:
            for off in range(0, m.size, chunk_size):
                cuts.append((m.offset_data + off, m, off))
    out = bytearray()
    uncompressed = hashlib.sha256()
    positions: dict[int, int] = {}
    pos = 0
    bounds = [c[0] for c in cuts] + [end_of_entries]
    for start in bounds:
        if start > pos:
            seg = tar_bytes[pos:start]
            out += gzip.compress(seg, 6, mtime=0)
            uncompressed.update(seg)
            pos = start
        positions[start] = len(out)
    entries = []
    cut_of = {(id(m), off): t for t, m, off in cuts}
    for m in members:
        name = m.name[2:] if m.name.startswith("./") else m.name
        e: dict = {
            "name": name,
            "type": _TYPES[m.type],
            "mode": m.mode,
            "uid": m.uid,
            "gid": m.gid,
            "userName": m.uname,
            "groupName": m.gname,
            "modtime": dt.datetime.fromtimestamp(m.mtime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if m.issym() or m.islnk():
            e["linkName"] = m.linkname
        if m.ischr() or m.isblk():
            e["devMajor"], e["devMinor"] = m.devmajor, m.devminor
        xattrs = {
            k[len("SCHILY.xattr.") :]: base64.b64encode(
                v.encode("utf-8", "surrogateescape")
            ).decode()
            for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        if xattrs:
            e["xattrs"] = xattrs
        if m.isreg():
            e["size"] = m.size
            data = tar_bytes[m.offset_data : m.offset_data + m.size]
            if m.size:
                e["digest"] = sha(data)
            for off in range(0, m.size, chunk_size):
                piece = data[off : off + chunk_size]
                ce = e if off == 0 else {"name": name, "type": "chunk"}
                ce["offset"] = positions[cut_of[(id(m), off)]]
                if off:
                    ce["chunkOffset"] = off
                if m.size > chunk_size:
                    ce["chunkSize"] = len(piece)
                ce["chunkDigest"] = sha(piece)
                if ce is not e:
                    entries.append(ce)
                else:
                    entries.append(e)
            if m.size == 0:
                entries.append(e)
        else:
            entries.append(e)
    # keep file entries before their chunk entries (already in order)
    toc_json = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    toc_info = tarfile.TarInfo("stargz.index.json")
    toc_info.size, toc_info.mode = len(toc_json), 0o644
    toc_tar = toc_info.tobuf(tarfile.USTAR_FORMAT) + toc_json
    toc_tar += b"\0" * (-len(toc_tar) % 512) + b"\0" * 1024
    toc_offset = len(out)
    out += gzip.compress(toc_tar, 6, mtime=0)
    uncompressed.update(toc_tar)
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    out += (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
        + struct.pack("<H", len(extra))
        + extra
        + b"\x01\x00\x00\xff\xff"
        + b"\0" * 8
    )
    total = end_of_entries + len(toc_tar)
    return Blob(bytes(out), "sha256:" + uncompressed.hexdigest(), sha(toc_json), total)


def to_gzip(tar_bytes: bytes) -> Blob:
    return Blob(gzip.compress(tar_bytes, 6, mtime=0), sha(tar_bytes))


async def push_image(
    host: str, repo: str, tag: str, blobs: list[Blob], toc_override: dict[int, str] | None = None
) -> str:
    """Push layers + config + OCI manifest; returns the manifest digest."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]},
    }
    config_raw = json.dumps(config).encode()
    ref = f"{host}/{repo}:{tag}"
    layers = []
    async with RegistryClient() as client:
        for i, b in enumerate(blobs):
            await client.push_blob(ref, b.data)
            desc: dict = {"mediaType": LAYER_GZIP, "digest": b.digest, "size": len(b.data)}
            if b.toc_digest:
                desc["annotations"] = {
                    TOC_ANN: (toc_override or {}).get(i, b.toc_digest),
                    USIZE_ANN: str(b.uncompressed_size),
                }
            layers.append(desc)
        await client.push_blob(ref, config_raw)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config_raw), "size": len(config_raw)},
            "layers": layers,
        }
        return await client.push_manifest(ref, json.dumps(manifest).encode(), OCI_MANIFEST)


def push(host: str, repo: str, tag: str, blobs: list[Blob], **kw) -> str:
    return trio.run(lambda: push_image(host, repo, tag, blobs, **kw))


def write_tar(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
