"""One JSON object per path, in the shape of the vectors' ``NAME.entries.jsonl``.

Shared by ``lazybench estargz ls`` and the tests, so both print what the Go reader sees:
lines sorted by name (byte order), hardlinks shown with their target's attributes and
``linkName`` = the target's path, implicit directories included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .reader import EstargzReader


def listing(reader: EstargzReader) -> Iterator[dict[str, Any]]:
    """Listing lines; reads (and so verifies) every regular file once."""
    index = reader.index
    sums: dict[int, str] = {}
    for name, e in sorted(index.names(), key=lambda ne: ne[0].encode("utf-8", "surrogateescape")):
        target = index.hardlink_target(name) if name else None
        line: dict[str, Any] = {
            "name": name,
            "type": "hardlink" if target is not None else e.type,
            "size": e.size,
            "mode": e.mode,
            "uid": e.uid,
            "gid": e.gid,
        }
        link = target if target is not None else e.link_name
        if link:
            line["linkName"] = link
        if e.type == "reg" and target is None:
            if id(e) not in sums:
                sums[id(e)] = reader.file_sha256(e)
            line["sha256"] = sums[id(e)]
        line["xattrs"] = len(e.xattrs)
        yield line
