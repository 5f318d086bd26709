"""Helpers for the eStargz format tests (importable: the test directory is on sys.path)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT.parent / "shared" / "vectors" / "estargz"


@dataclass
class Vector:
    name: str
    blob: Path
    meta: dict
    entries: list[dict] | None  # None for zstdchunked (no listing)

    @property
    def args(self) -> list[str]:
        return self.meta["producer"]["args"]

    def option(self, flag: str) -> str | None:
        a = self.args
        return a[a.index(flag) + 1] if flag in a else None

    def uncompressed_tar(self) -> bytes:
        """The blob decompressed: a tar holding the layer (plus landmark and TOC entries)."""
        data = self.blob.read_bytes()
        if "-zstd" in self.args:
            reader = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(data), read_across_frames=True
            )
            return reader.read()
        out = bytearray()
        while data:
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(data)
            data = d.unused_data
        return bytes(out)


def load_vectors(vectors_dir: Path) -> list[Vector]:
    out = []
    for blob in sorted(vectors_dir.glob("*.blob")):
        name = blob.stem
        listing = vectors_dir / f"{name}.entries.jsonl"
        entries = (
            [json.loads(line) for line in listing.read_text().split("\n") if line.strip()]
            if listing.exists()
            else None
        )
        meta = json.loads((vectors_dir / f"{name}.json").read_text())
        out.append(Vector(name, blob, meta, entries))
    return out


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def lazybench_command() -> list[str]:
    """The installed ``lazybench`` console script (``python -m harness.cli`` would load the CLI
    module twice — as ``__main__`` and as ``harness.cli`` — and split its exception class)."""
    script = Path(sys.executable).parent / "lazybench"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())"]


def run_lazybench_process(*argv: str, cwd: Path | None = None) -> CliResult:
    """Run ``lazybench`` as a real process (to check exit status and the absence of tracebacks)."""
    proc = subprocess.run(
        [*lazybench_command(), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def pax_header(payload: bytes) -> bytes:
    """A raw PAX extended header (type ``x``) carrying ``payload`` as its records."""
    import tarfile

    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type, ti.size = tarfile.XHDTYPE, len(payload)
    return ti.tobuf(tarfile.USTAR_FORMAT) + payload + b"\0" * (-len(payload) % 512)


def replace_toc(blob: bytes, toc_json: bytes, pax: bytes | None = None) -> bytes:
    """``blob`` (gzip eStargz) with its TOC member replaced by one holding ``toc_json``
    (after a PAX extended header of records ``pax``, if given)."""
    import tarfile

    from store.estargz import estargz_footer_bytes, parse_footer

    footer = parse_footer(blob[-51:], len(blob))
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(toc_json)
    member = b"" if pax is None else pax_header(pax)
    member += ti.tobuf(tarfile.USTAR_FORMAT) + toc_json + b"\0" * (-len(toc_json) % 512)
    member += b"\0" * 1024
    head = blob[: footer.toc_offset]
    return head + zlib.compress(member, 6, wbits=31) + estargz_footer_bytes(footer.toc_offset)


def toc_entries(blob: bytes) -> list[dict]:
    from store.estargz import BytesBlobSource, EstargzReader

    return EstargzReader(BytesBlobSource(blob)).toc.entries


def encode_entries(entries: list[dict]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}).encode()
