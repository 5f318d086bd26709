"""What the first bytes of an eStargz blob say about its prefetch region, before the TOC.

An optimized eStargz layer starts with its prioritized files, then ``.prefetch.landmark``;
a layer without prioritized files starts with ``.no.prefetch.landmark`` (the eStargz spec,
stargz-snapshotter ``docs/estargz.md``: "Prioritized files and landmark files"). The TOC
says exactly where the region ends, but it arrives last (footer, then TOC, then its digest
check). The head says earlier whether there is a region worth downloading at all, so a
store can start on it while the TOC is still on the way.

Only a hint: the bytes are not verified (nothing read here is served; every chunk is still
checked against the verified TOC), and anything unexpected — not gzip, not tar, a name not
seen in time — is :attr:`HeadHint.UNKNOWN`.
"""

from __future__ import annotations

import enum
import io
import tarfile
import zlib

from .errors import EstargzError
from .footer import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK
from .index import clean_name
from .toc import open_tar_stream

# Tar bytes inflated from a head at most (a bomb in an unverified head stops here).
_MAX_TAR = 1 << 20


class HeadHint(enum.Enum):
    """What the head of a blob says about the region before ``.prefetch.landmark``."""

    NONE = "none"  # no region: .no.prefetch.landmark first, or the region ends in the head
    REGION = "region"  # prioritized files first, and no landmark within the head
    UNKNOWN = "unknown"  # not a gzip tar stream as far as the head goes


def head_hint(head: bytes) -> HeadHint:
    """The :class:`HeadHint` of ``head``, the first bytes of a gzip eStargz blob (a few KiB
    is enough: the first tar headers). Never raises."""
    names = _first_names(_inflate_members(head))
    if not names:
        return HeadHint.UNKNOWN
    if names[0] == NO_PREFETCH_LANDMARK or PREFETCH_LANDMARK in names:
        return HeadHint.NONE
    return HeadHint.REGION


def _inflate_members(data: bytes) -> bytes:
    """The tar bytes of the concatenated gzip members in ``data``, as far as they go (the
    last member may be cut anywhere); empty when ``data`` does not start with gzip."""
    out = bytearray()
    rest = data
    while rest and len(out) < _MAX_TAR:
        d = zlib.decompressobj(wbits=31)  # one gzip member
        try:
            out += d.decompress(rest, _MAX_TAR - len(out))
        except zlib.error:
            break
        if not d.eof:
            break  # cut short by the head's end (or the bound): what we have is all
        rest = d.unused_data
    return bytes(out)


def _first_names(tar_bytes: bytes) -> list[str]:
    """The cleaned names of the tar entries whose headers ``tar_bytes`` holds whole."""
    names: list[str] = []
    try:
        with open_tar_stream(io.BytesIO(tar_bytes)) as tf:
            for ti in tf:
                names.append(clean_name(ti.name))
    except (tarfile.TarError, EstargzError, EOFError, OSError, ValueError):
        pass  # the head ends inside an entry: the names so far
    return names


__all__ = ["HeadHint", "head_hint"]
