"""`stargz-store MOUNTPOINT` (placeholder until the store lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "usage: stargz-store [--config PATH] [--root DIR] [--log-level L] MOUNTPOINT\n"
        "stargz-store: the FUSE store is not built yet",
        file=sys.stderr,
    )
    return 2
