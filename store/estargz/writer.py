"""Layer tar → eStargz blob (placeholder until the streaming writer lands)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_LEVEL = 9  # the Go library's default (gzip.BestCompression)


@dataclass(frozen=True, slots=True)
class ConvertResult:
    digest: str  # sha256 of the blob
    size: int  # blob bytes
    diff_id: str  # sha256 of the blob decompressed (the tar we wrote)
    toc_digest: str  # sha256 of the TOC JSON
    uncompressed_size: int  # bytes of that tar


def convert(
    tar_in: BinaryIO,
    out: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    prioritized_files: Iterable[str] = (),
    workers: int | None = None,
) -> ConvertResult:
    raise NotImplementedError("eStargz writer not implemented yet")
