"""The TOC JSON of a gzip eStargz layer, through the library's parse and validated index.

Input: the uncompressed ``stargz.index.json`` bytes. They are wrapped as the writer stores
them (a tar entry in a gzip member), decoded by :func:`parse_toc` and built into a
:class:`LayerIndex`, whose invariants are then checked (see ``_common.check_index``).
"""

from __future__ import annotations

from fuzz.targets._common import gzip_footer, gzip_toc_member, index_from_compressed_toc
from store.estargz import EstargzError

ALLOWED: tuple[type[BaseException], ...] = (EstargzError,)


def one_input(data: bytes) -> None:
    compressed = gzip_toc_member(data)
    index_from_compressed_toc(compressed, gzip_footer(compressed))
