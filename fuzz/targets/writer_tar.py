"""The writer's input: a layer tar (plain, gzip or zstd) converted to eStargz.

Whatever converts must read back: the blob's footer, TOC and index parse, every chunk
verifies, and each regular file's bytes hash to the TOC's digest (``EstargzReader.verify_all``).
"""

from __future__ import annotations

import io

from store.estargz import BytesBlobSource, EstargzReader, InvalidLayerTar, convert

ALLOWED: tuple[type[BaseException], ...] = (InvalidLayerTar,)


def one_input(data: bytes) -> None:
    out = io.BytesIO()
    result = convert(io.BytesIO(data), out, chunk_size=4096, workers=1)
    blob = out.getvalue()
    reader = EstargzReader(BytesBlobSource(blob), result.toc_digest)
    reader.verify_all()
