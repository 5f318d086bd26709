"""`python -m fuzz.make_corpus`: (re)write the generated seeds of ``fuzz/corpus/<target>/``.

Seeds are small valid inputs the fuzzer mutates from: footers and TOCs of layers our writer
produces, and of the Go reference library's test vectors (``../shared/vectors/estargz`` beside
the clone, when present); layer tars in the three compressions the writer accepts. Files are
named by content hash, so re-running adds nothing twice; inputs the fuzzer found worth keeping
can be copied in by hand next to them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import struct
import sys
import tarfile
from pathlib import Path

import zstandard

from store.estargz import (
    BytesBlobSource,
    EstargzReader,
    convert,
    estargz_footer_bytes,
    toc_json_bytes,
)

FUZZ_DIR = Path(__file__).resolve().parent
VECTORS = FUZZ_DIR.parent.parent / "shared" / "vectors" / "estargz"
MAX_SEED = 64 * 1024


def _tar(entries: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """(name, data or None, tar type) → an uncompressed PAX tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.mode = kind, 1_700_000_000, 0o644
            if kind == tarfile.SYMTYPE:
                info.linkname = "a"
            if kind == tarfile.LNKTYPE:
                info.linkname = "dir/file"
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def layer_tars() -> list[bytes]:
    big = bytes(range(256)) * 40  # > one 4 KiB chunk
    return [
        _tar([("a", b"hello\n", tarfile.REGTYPE)]),
        _tar(
            [
                ("dir", None, tarfile.DIRTYPE),
                ("dir/file", big, tarfile.REGTYPE),
                ("dir/link", None, tarfile.SYMTYPE),
                ("dir/hard", None, tarfile.LNKTYPE),
                ("dir/.wh.gone", b"", tarfile.REGTYPE),
                ("dir/.wh..wh..opq", b"", tarfile.REGTYPE),
                ("fifo", None, tarfile.FIFOTYPE),
                ("empty", b"", tarfile.REGTYPE),
            ]
        ),
    ]


def _blob(tar: bytes) -> bytes:
    out = io.BytesIO()
    convert(io.BytesIO(tar), out, chunk_size=4096, workers=1)
    return out.getvalue()


def _vector_blobs() -> list[bytes]:
    if not VECTORS.is_dir():
        return []
    return [p.read_bytes() for p in sorted(VECTORS.glob("*.blob")) if p.stat().st_size < 8 << 20]


def _toc_json(blob: bytes) -> bytes | None:
    try:
        reader = EstargzReader(BytesBlobSource(blob))
    except Exception:  # a vector this library cannot read is no seed
        return None
    start = reader.footer.toc_offset
    return toc_json_bytes(blob[start : start + reader.footer.toc_size], reader.footer)


def seeds() -> dict[str, list[bytes]]:
    tars = layer_tars()
    blobs = [_blob(t) for t in tars] + _vector_blobs()
    tocs = [j for j in map(_toc_json, blobs) if j is not None and len(j) <= MAX_SEED]
    zstd = zstandard.ZstdCompressor(level=3)
    zstd_footer = b"\x50\x2a\x4d\x18" + struct.pack("<IQQQQ", 40, 8, 100, 300, 1) + b"GnUlInUx"
    return {
        "footer": [b[-200:] for b in blobs]
        + [estargz_footer_bytes(0), estargz_footer_bytes(1 << 20)[-47:], zstd_footer],
        "toc_json": tocs,
        "zstd_chunked_toc": [b"\x00" + j for j in tocs]
        + [b"\x01" + struct.pack("<I", len(j)) + zstd.compress(j) for j in tocs[:3]],
        # Choice bytes for toc_entries (see its docstring): a few entry mixes.
        "toc_entries": [
            bytes([1, 1, 0xFF, 0x7F, *[3] * 40]),
            bytes(range(256)),
            bytes(50),
            bytes([2, 1, 0xFF, 0xFF, *[1, 2, 3, 4] * 20]),
            random.Random(0).randbytes(200),
        ],
        "writer_tar": tars
        + [gzip.compress(t, mtime=0) for t in tars]
        + [zstd.compress(t) for t in tars],
    }


def main() -> int:
    for name, inputs in seeds().items():
        d = FUZZ_DIR / "corpus" / name
        d.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (d / ("seed-" + hashlib.sha1(data).hexdigest())).write_bytes(data)
        print(f"{name}: {len(inputs)} seeds in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
