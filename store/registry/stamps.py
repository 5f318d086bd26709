"""A file's stamp: what tells a long-lived store that a configuration file it read changed."""

from __future__ import annotations

from pathlib import Path

FileStamp = tuple[int, int, int, int]


def file_stamp(path: Path) -> FileStamp | None:
    """``path``'s (device, inode, size, mtime in ns); None when it cannot be stat'ed (missing
    or unreadable: the read that follows says which). A file replaced by rename changes
    inode, one rewritten in place its size or mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
