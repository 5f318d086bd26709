"""Layer tars holding every tar entry type and header extension, for the tests that compare
our eStargz reader, writer and store with the Go reference library
(``tests/store/test_e2e_go_layers.py``, ``tests/estargz/test_go_options.py``)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

MTIME = 1_700_000_000
RNG_SEED = 11


def _random(n: int, seed: int = RNG_SEED) -> bytes:
    import random

    return random.Random(seed + n).randbytes(n)


def _add(tar: tarfile.TarFile, name: str, type_: bytes = tarfile.REGTYPE, data: bytes = b"",
         **kw: object) -> None:  # fmt: skip
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime = type_, len(data), kw.pop("mtime", MTIME)
    ti.mode = kw.pop("mode", 0o755 if type_ == tarfile.DIRTYPE else 0o644)
    for k, v in kw.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


def every_type_tar(fmt: int = tarfile.PAX_FORMAT, big: int = 200_000, zeros: int = 70_000) -> bytes:
    """A layer with every tar entry type and the header extensions that carry them."""
    long_dir = "long/" + "d" * 120
    pax_xattrs = {
        "SCHILY.xattr.user.text": "hello",
        "SCHILY.xattr.user.empty": "",
        "SCHILY.xattr.user.binary": b"\x00\xff\xfe bin \x80".decode("utf-8", "surrogateescape"),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        _add(tar, "./", tarfile.DIRTYPE)
        _add(tar, "./d", tarfile.DIRTYPE)
        _add(tar, "d/sub", tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000)
        _add(tar, "tmp", tarfile.DIRTYPE, mode=0o1777)
        for d in ("dev", "other", "long", "opq"):  # the Go writer prioritizes named parents only
            _add(tar, d, tarfile.DIRTYPE)
        _add(tar, "d/empty")
        _add(tar, "d/one", data=b"1")
        _add(tar, "d/small", data=_random(3000), mode=0o600, uid=33, gid=33)
        _add(tar, "d/big", data=_random(big), mode=0o4755, uname="root", gname="root")
        _add(tar, "d/zeros", data=bytes(zeros), mode=0o2755)
        _add(tar, "d/exact", data=_random(4096))  # a whole number of 1 KiB and 4 KiB chunks
        # link headers carry their file's metadata, as tar writers write them
        _add(tar, "d/hard-big", tarfile.LNKTYPE, linkname="d/big", mode=0o4755)
        _add(tar, "d/hard-empty", tarfile.LNKTYPE, linkname="./d/empty")
        _add(tar, "other/hard-small", tarfile.LNKTYPE, linkname="d/small", mode=0o600, uid=33,
             gid=33)  # fmt: skip
        _add(tar, "d/link", tarfile.SYMTYPE, linkname="small", mode=0o777)
        _add(tar, "d/abs", tarfile.SYMTYPE, linkname="/etc/passwd", mode=0o777)
        _add(tar, "d/dangling", tarfile.SYMTYPE, linkname="../nowhere", mode=0o777)
        _add(tar, "d/longlink", tarfile.SYMTYPE, linkname="t" * 300, mode=0o777)
        _add(tar, long_dir, tarfile.DIRTYPE)
        _add(tar, f"{long_dir}/{'f' * 150}", data=b"long name\n")
        _add(tar, f"{long_dir}/hard", tarfile.LNKTYPE, linkname=f"{long_dir}/{'f' * 150}")
        _add(tar, "d/ünïcødé-名前", data="ünï\n".encode())
        _add(tar, "dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        _add(tar, "dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6)
        _add(tar, "dev/fifo", tarfile.FIFOTYPE, mode=0o600)
        _add(tar, "d/ids", data=b"ids\n", uid=3_000_000, gid=4_000_000, uname="u", gname="g")
        _add(tar, "d/noperm", data=b"x", mode=0o000)
        _add(tar, "d/old", data=b"old\n", mtime=0)
        _add(tar, ".wh.gone")
        _add(tar, "opq/.wh..wh..opq")
        _add(tar, "opq/kept", data=b"kept\n")
        if fmt == tarfile.PAX_FORMAT:
            x = tarfile.TarInfo("d/xattrs")
            x.size, x.mtime, x.mode, x.pax_headers = 5, MTIME, 0o644, pax_xattrs
            tar.addfile(x, io.BytesIO(b"xattr"))
            x = tarfile.TarInfo("d/sub")  # a directory given again, with xattrs: the later wins
            x.type, x.mtime, x.mode = tarfile.DIRTYPE, MTIME, 0o750
            x.pax_headers = {"SCHILY.xattr.user.dir": "yes"}
            tar.addfile(x)
    return buf.getvalue()


def sparse_tar(tmp: Path, fmt: str) -> bytes:
    """GNU tar's sparse encoding (``fmt``: ``posix`` = PAX 1.0, ``gnu`` = the old 'S' type)."""
    src = tmp / f"sparse-{fmt}"
    src.mkdir()
    with (src / "holes").open("wb") as f:
        f.seek(100_000)
        f.write(b"data in the middle")
        f.seek(300_000)
        f.write(b"end")
    (src / "plain").write_bytes(b"plain\n")
    out = tmp / f"sparse-{fmt}.tar"
    subprocess.run(
        [
            "tar",
            "--sparse",
            f"--format={fmt}",
            "--owner=0",
            "--group=0",
            f"--mtime=@{MTIME}",
            "-C",
            str(src),
            "-cf",
            str(out),
            "holes",
            "plain",
        ],
        check=True,
        timeout=60,
    )
    return out.read_bytes()
