"""`lazybench estargz convert|ls`: the format library for users and scripts.

``convert`` prints one JSON object (what the layer descriptor and its annotations need) —
eStargz, or with ``--format zstd-chunked`` (or ``zstd:chunked``) the layout containers/storage
writes (``--zstd-generation podman4|podman5`` picks the generation, podman4 by default as for
``lazybench convert``; ``--zstd-for`` is its older name); ``ls`` verifies a blob (every
chunk; the TOC too when ``--toc-digest`` is given, or ``--annotations`` for zstd:chunked) and
prints one JSON line per path, in the shape of the reference vectors' ``NAME.entries.jsonl``. Output
files are written atomically; bad input is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from harness.cli import LAYER_FORMATS, UserError, layer_format, positive_int, zstd_generation
from store.estargz import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_LEVEL,
    BadFooter,
    EstargzError,
    EstargzReader,
    FileBlobSource,
    convert,
    write_zstd_chunked,
    zstd_chunked_layer,
)
from store.estargz.listing import listing
from store.estargz.zstdchunked import DEFAULT_ZSTD_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("estargz", help="convert and inspect eStargz layers")
    esub = parser.add_subparsers(dest="estargz_command", required=True, metavar="ACTION")

    conv = esub.add_parser(
        "convert", help="layer tar (plain/gzip/zstd) → eStargz or zstd:chunked blob"
    )
    conv.add_argument("input", help="layer tar, or - for stdin")
    conv.add_argument("output", help="blob to write (atomically)")
    conv.add_argument(
        "--format",
        type=layer_format,
        choices=LAYER_FORMATS,
        default="estargz",
        help="blob format to write (default estargz; zstd-chunked may be spelled zstd:chunked)",
    )
    conv.add_argument(
        "--zstd-generation",
        "--zstd-for",
        dest="zstd_generation",
        choices=("podman4", "podman5"),
        default=None,
        help="zstd:chunked layout: podman 4.3's (io.containers. keys; the default, as "
        "`lazybench convert`'s) or podman 5's (tar-split, io.github.containers. keys; the one "
        "podman >= 5.1 looks up by TOC digest)",
    )
    conv.add_argument(
        "--chunk-size",
        type=positive_int,
        help=f"default {DEFAULT_CHUNK_SIZE} (eStargz), {DEFAULT_ZSTD_CHUNK_SIZE} (zstd:chunked)",
    )
    conv.add_argument(
        "--level",
        type=int,
        help=f"gzip level 0-9 (default {DEFAULT_LEVEL}) or zstd level 1-22 "
        f"(default {DEFAULT_ZSTD_LEVEL})",
    )
    conv.add_argument(
        "--prioritized-files",
        metavar="FILE",
        help="file listing paths to put first, one per line (# comments allowed)",
    )
    conv.set_defaults(func=_convert)

    ls = esub.add_parser(
        "ls", aliases=["list"], help="verify an eStargz blob and list its entries as JSON lines"
    )
    ls.add_argument("blob")
    ls.add_argument("--toc-digest", type=_toc_digest, help="expected TOC digest (sha256:…)")
    ls.add_argument(
        "--annotations",
        metavar="JSON",
        help="the layer descriptor's annotations (a JSON object, or @FILE): a zstd:chunked "
        "TOC is then read where they say and checked against their checksum",
    )
    ls.set_defaults(func=_ls)


def _toc_digest(text: str) -> str:
    """``--toc-digest``: ``sha256:`` and 64 lowercase hex digits (the OCI digest form the
    annotation ``containerd.io/snapshot/stargz/toc.digest`` carries). Anything else was read
    whole and then reported as a TOC that "does not match the expected" one."""
    algorithm, _, hexpart = text.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or set(hexpart) - set("0123456789abcdef"):
        raise argparse.ArgumentTypeError(
            f"expected sha256: and 64 lowercase hex digits (as `lazybench estargz convert` "
            f"prints it), got {text!r}"
        )
    return text


def _level(args: argparse.Namespace) -> int:
    if args.format == "zstd-chunked":
        level = DEFAULT_ZSTD_LEVEL if args.level is None else args.level
        if not 1 <= level <= 22:
            raise UserError(f"--level: zstd level must be 1-22, got {level}")
        return level
    level = DEFAULT_LEVEL if args.level is None else args.level
    if not 0 <= level <= 9:
        raise UserError(f"--level: gzip level must be 0-9, got {level}")
    return level


def _read_prioritized(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prioritized files list {path}: {exc}") from None
    return [s for line in lines if (s := line.strip()) and not s.startswith("#")]


def _convert(args: argparse.Namespace) -> int:
    generation = zstd_generation(args.format, args.zstd_generation)
    prioritized = _read_prioritized(args.prioritized_files)
    level = _level(args)
    out_path = Path(args.output)
    if args.output == "-":
        raise UserError(
            "output: - would be a file named '-' (stdout carries the descriptor JSON): name "
            "the blob's file"
        )
    if not (out_path.parent if str(out_path.parent) else Path(".")).is_dir():
        raise UserError(f"output {out_path}: directory {out_path.parent} does not exist")
    try:
        src: BinaryIO = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    except OSError as exc:
        raise UserError(f"cannot open {args.input}: {exc.strerror}") from None
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent or "."
        )
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as out:
            result: Any
            if args.format == "zstd-chunked":
                result = write_zstd_chunked(
                    src,
                    out,
                    generation=generation,
                    chunk_size=args.chunk_size or DEFAULT_ZSTD_CHUNK_SIZE,
                    level=level,
                    prioritized_files=prioritized,
                )
            else:
                result = convert(
                    src,
                    out,
                    chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
                    level=level,
                    prioritized_files=prioritized,
                )
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, out_path)
        tmp_name = None
    except EstargzError as exc:
        raise UserError(f"{args.input}: {exc}") from None
    except OSError as exc:
        raise UserError(f"converting {args.input} to {args.output}: {exc}") from None
    finally:
        if src is not sys.stdin.buffer:
            src.close()
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
    print(json.dumps(result.as_dict()))
    return 0


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _annotations(text: str | None) -> Any:
    if text is None:
        return None
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        value = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise UserError(f"--annotations: not a JSON object or readable file: {exc}") from None
    if not isinstance(value, dict):
        raise UserError("--annotations: not a JSON object")
    try:
        layer = zstd_chunked_layer(value)
    except EstargzError as exc:
        raise UserError(f"--annotations: {exc}") from None
    if layer is None:
        raise UserError("--annotations: no zstd:chunked manifest-checksum/position in them")
    return layer


def _ls(args: argparse.Namespace) -> int:
    zstd = _annotations(args.annotations)
    try:
        with FileBlobSource(args.blob) as src:
            reader = EstargzReader(src, args.toc_digest, zstd_chunked=zstd)
            # Verify everything before printing anything: no partial listing of a bad blob.
            lines = list(listing(reader))
    except BadFooter as exc:
        raise UserError(
            f"{args.blob}: {exc}: not a lazily pullable layer (`lazybench estargz convert` "
            "makes one of a tar or tar.gz layer)"
        ) from None
    except EstargzError as exc:
        raise UserError(f"{args.blob}: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {args.blob}: {exc.strerror or exc}") from None
    out = sys.stdout
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    return 0
