"""`tar -xzf` of our output gives the input's tree, plus the landmark file (and the TOC entry
``stargz.index.json``, which the format puts in the tar stream: the Go reader requires it)."""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from store.estargz import convert

EXTRA = {".no.prefetch.landmark", "stargz.index.json"}


def _snapshot(root: Path) -> dict[str, tuple]:
    """Path → what tar restores: type, mode, owner, mtime, size, content/target, link group."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                first = inodes.setdefault(st.st_ino, rel)
                body: object = (p.read_bytes(), first if st.st_nlink > 1 else None)
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                body = st.st_rdev
            else:
                body = None
            mtime = None if stat.S_ISDIR(st.st_mode) else int(st.st_mtime)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        mtime, body)  # fmt: skip
    return out


def _input_tar() -> bytes:
    rng = random.Random(7)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, data: bytes = b"", **kw) -> None:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.mtime = 1_600_000_000 + rng.randrange(10**6)
            ti.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
            for k, v in kw.items():
                setattr(ti, k, v)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("etc", tarfile.DIRTYPE)
        add("etc/hostname", tarfile.REGTYPE, b"box\n")
        add("etc/empty", tarfile.REGTYPE, b"", mode=0o600)
        add("usr", tarfile.DIRTYPE)
        add("usr/bin", tarfile.DIRTYPE)
        add("usr/bin/tool", tarfile.REGTYPE, rng.randbytes(300_000), mode=0o4755)
        add("usr/bin/tool2", tarfile.LNKTYPE, linkname="usr/bin/tool", mode=0o4755)
        add("usr/bin/sh", tarfile.SYMTYPE, linkname="tool", mode=0o777)
        add("srv", tarfile.DIRTYPE, mode=0o1777, uid=1000, gid=1000)
        add("srv/" + "long-name-" * 12, tarfile.REGTYPE, b"long\n", uid=1000, gid=1000)
        add("srv/café-日本.txt", tarfile.REGTYPE, b"unicode\n")
        add("srv/text", tarfile.REGTYPE, b"lorem ipsum " * 40_000)
        add("run", tarfile.DIRTYPE)
        add("run/fifo", tarfile.FIFOTYPE)
        add("dev", tarfile.DIRTYPE)
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    return buf.getvalue()


def _extract(args: list[str], archive: Path, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        ["tar", *args, str(archive), "-C", str(dest), "--same-owner", "--numeric-owner"],
        check=True,
        timeout=120,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners and device nodes needs root")
@pytest.mark.parametrize("chunk_size", [4 << 20, 65536])
def test_tar_xzf_gives_the_input_tree(tmp_path: Path, chunk_size: int) -> None:
    src = tmp_path / "in.tar"
    src.write_bytes(_input_tar())
    blob = tmp_path / "out.blob"
    with src.open("rb") as f, blob.open("wb") as out:
        convert(f, out, chunk_size=chunk_size)
    _extract(["-xpf"], src, tmp_path / "a")
    _extract(["-xpzf"], blob, tmp_path / "b")
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert set(b) - set(a) == EXTRA
    assert {k: v for k, v in b.items() if k not in EXTRA} == a
    assert (tmp_path / "b" / ".no.prefetch.landmark").read_bytes() == b"\x0f"
