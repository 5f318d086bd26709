"""A name that appears more than once in a layer tar: the later entry wins, as on extraction.

Each case is a small tar; the truth is ``tar -xpf`` of it (GNU tar), or where GNU tar refuses
(a directory with children replaced by a file) what containers/storage's extraction does
(``os.RemoveAll`` of the old path, then the new entry). Our output must give that tree through
``tar -xpzf``, our reader and the Go reader, prioritized or not. The Go writer (``estargz.Build``
keeps only the last entry of a name) must agree wherever its rule is the extraction's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fmt_helpers import CliResult, lazybench_command

from store.estargz import BytesBlobSource, EstargzReader, convert
from store.estargz.listing import listing
from tests import gotools

R, D, L, S = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE
FIFO, CHR = tarfile.FIFOTYPE, tarfile.CHRTYPE
EXTRA = {".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json"}


@dataclass
class Case:
    entries: list[tuple]  # (name, type, data, {TarInfo attrs})
    prioritized: list[list[str]] = field(default_factory=lambda: [[]])
    tar_refuses: bool = False  # GNU tar fails; `expected` is containers/storage's tree
    expected: dict[str, tuple] | None = None
    # the Go writer's keep-the-last rule gives the same tree (it differs where the dropped
    # entry left something behind on extraction: attributes, hardlinks, a refusal)
    go_agrees: bool = True
    xattrs: dict[str, dict[str, bytes]] = field(default_factory=dict)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CASES = {
    # The field report: the later `conf` must win, prioritized or not.
    "file-twice": Case(
        [("conf", R, b"old\n", {}), ("conf", R, b"new\n", {}), ("other", R, b"o\n", {})],
        prioritized=[[], ["conf"], ["other"], ["other", "conf"]],
    ),
    "file-twice-in-dir": Case(
        [
            ("etc", D, b"", {}),
            ("etc/conf", R, b"old\n", {}),
            ("etc/x", R, b"x", {}),
            ("etc/conf", R, b"newer\n", {"mode": 0o600, "uid": 7}),
        ],
        prioritized=[[], ["etc/conf"], ["etc/x"]],
    ),
    "dir-redeclared": Case(
        [
            ("d", D, b"", {"mode": 0o755}),
            ("d/f", R, b"f", {}),
            ("d", D, b"", {"mode": 0o1770, "uid": 5, "gid": 6}),
            ("d/g", R, b"g", {}),
        ],
        prioritized=[[], ["d/f"], ["d/g"]],
    ),
    "dir-redeclared-xattrs": Case(
        [
            (
                "d",
                D,
                b"",
                {"pax_headers": {"SCHILY.xattr.user.a": "1", "SCHILY.xattr.user.c": "x"}},
            ),
            ("d/f", R, b"f", {}),
            (
                "d",
                D,
                b"",
                {
                    "mode": 0o700,
                    "pax_headers": {"SCHILY.xattr.user.b": "2", "SCHILY.xattr.user.c": "y"},
                },
            ),
        ],
        prioritized=[[], ["d/f"]],
        go_agrees=False,  # Build drops the first declaration's attributes
        xattrs={"d": {"user.a": b"1", "user.b": b"2", "user.c": b"y"}},
    ),
    "symlink-by-file": Case(
        [("t", R, b"target", {}), ("l", S, b"", {"linkname": "t"}), ("l", R, b"file", {})],
        prioritized=[[], ["l"], ["t"]],
    ),
    "file-by-symlink": Case(
        [("l", R, b"file", {}), ("t", R, b"target", {}), ("l", S, b"", {"linkname": "t"})],
        prioritized=[[], ["l"]],
    ),
    "file-by-dir": Case(
        [("x", R, b"file", {}), ("x", D, b"", {"mode": 0o750}), ("x/y", R, b"y", {})],
        prioritized=[[], ["x/y"], ["x"]],
    ),
    "dir-by-file": Case(
        [
            ("x", D, b"", {}),
            ("x/y", R, b"y", {}),
            ("x/z", D, b"", {}),
            ("x/z/w", R, b"w", {}),
            ("x", R, b"file", {}),
            ("k", R, b"k", {}),
        ],
        prioritized=[[], ["x"], ["k"]],
        tar_refuses=True,
        expected={"x": ("reg", 0o755, 0, 0, sha(b"file")), "k": ("reg", 0o755, 0, 0, sha(b"k"))},
        # Build keeps x/y and x/z/w before x: its tar is refused by GNU tar as the input is
        go_agrees=True,
    ),
    "implicit-dir-by-symlink": Case(
        [
            ("b", R, b"", {}),
            ("a/x", L, b"", {"linkname": "b"}),
            ("a/y", R, b"y", {}),
            ("a", S, b"", {"linkname": "../b"}),
        ],
        prioritized=[[], ["a"], ["b"]],
        tar_refuses=True,
        expected={"b": ("reg", 0o755, 0, 0, sha(b"")), "a": ("symlink", None, 0, 0, "../b")},
        go_agrees=False,  # Build keeps a/x and a/y
    ),
    "fifo-and-device-replaced": Case(
        [
            ("p", FIFO, b"", {}),
            ("c", CHR, b"", {"devmajor": 1, "devminor": 3}),
            ("p", R, b"was a fifo", {}),
            ("c", D, b"", {}),
            ("c/in", R, b"in", {}),
        ],
        prioritized=[[], ["c/in"]],
    ),
    "hardlink-to-replaced-file": Case(
        [
            ("f", R, b"old", {"mode": 0o640}),
            ("h", L, b"", {"linkname": "f"}),
            ("h2", L, b"", {"linkname": "f"}),
            ("f", R, b"new", {}),
            ("h3", L, b"", {"linkname": "f"}),
        ],
        prioritized=[[], ["f"], ["h"], ["h2"], ["h3"]],
        go_agrees=False,  # Build links h, h2 to the new f (and writes them before it)
    ),
    "hardlink-replaced": Case(
        [("f", R, b"f", {}), ("h", L, b"", {"linkname": "f"}), ("h", R, b"own", {})],
        prioritized=[[], ["h"]],
    ),
}


def _tar(entries: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, type_, data, kw in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.size, ti.mtime = type_, len(data), 1_700_000_000
            ti.mode = 0o755
            for k, v in kw.items():
                setattr(ti, k, v)
            tar.addfile(ti, io.BytesIO(data) if type_ == R else None)
    return buf.getvalue()


def _kind(mode: int) -> str:
    kinds = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "symlink",
             stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}  # fmt: skip
    return kinds[stat.S_IFMT(mode)]


def _tree(root: Path) -> dict[str, tuple]:
    """path → (type, mode, uid, gid, sha256 | link target | rdev | None)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = p.lstat()
            kind = _kind(st.st_mode)
            body: object = None
            if kind == "reg":
                body = sha(p.read_bytes())
            elif kind == "symlink":
                body = os.readlink(p)
            elif kind == "char":
                body = st.st_rdev
            mode = None if kind == "symlink" else stat.S_IMODE(st.st_mode)  # always 0777
            if rel not in EXTRA:
                out[rel] = (kind, mode, st.st_uid, st.st_gid, body)
    return out


def _from_listing(lines: list[dict]) -> tuple[dict[str, tuple], dict[str, int]]:
    by_name = {line["name"]: line for line in lines}
    out, xattr_counts = {}, {}
    for line in lines:
        name = line["name"]
        if not name or name in EXTRA:
            continue
        kind = line["type"]
        if kind == "hardlink":
            kind, body = "reg", by_name[line["linkName"]]["sha256"]
        else:
            body = {"reg": line.get("sha256"), "symlink": line.get("linkName"),
                    "char": os.makedev(1, 3) if kind == "char" else None}.get(kind)  # fmt: skip
        mode = None if kind == "symlink" else line["mode"] & 0o7777
        out[name] = (kind, mode, line["uid"], line["gid"], body)
        xattr_counts[name] = line["xattrs"]
    return out, xattr_counts


def _extract(archive: Path, dest: Path, flags: str) -> subprocess.CompletedProcess:
    dest.mkdir()
    return subprocess.run(
        ["tar", flags, str(archive), "-C", str(dest), "--same-owner", "--numeric-owner"],
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def go_tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not gotools.available():
        pytest.skip("Go or the Debian estargz library missing (run ci/install-system-deps)")
    d = tmp_path_factory.mktemp("go")
    return {n: gotools.build(f"estargz/{n}", d) for n in ("gocheck", "gowrite")}


def _go_listing(gocheck: Path, blob: Path, toc_digest: str) -> list[dict]:
    proc = subprocess.run([str(gocheck), str(blob), toc_digest], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line]


PARAMS = [(name, tuple(p)) for name, case in CASES.items() for p in case.prioritized]


@pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners and device nodes needs root")
@pytest.mark.parametrize(("name", "prioritized"), PARAMS, ids=[f"{n}-{p}" for n, p in PARAMS])
def test_later_entry_wins_everywhere(
    name: str, prioritized: tuple[str, ...], tmp_path: Path, go_tools: dict[str, Path]
) -> None:
    case = CASES[name]
    src = tmp_path / "in.tar"
    src.write_bytes(_tar(case.entries))
    if case.tar_refuses:
        assert _extract(src, tmp_path / "in", "-xpf").returncode != 0
        assert case.expected is not None
        truth = case.expected
    else:
        proc = _extract(src, tmp_path / "in", "-xpf")
        assert proc.returncode == 0, proc.stderr
        truth = _tree(tmp_path / "in")
        if case.expected is not None:
            assert truth == case.expected

    blob = tmp_path / "ours.blob"
    with src.open("rb") as f, blob.open("wb") as out:
        res = convert(f, out, chunk_size=4, prioritized_files=prioritized)
    # tar -xzf of our output
    proc = _extract(blob, tmp_path / "out", "-xpzf")
    assert proc.returncode == 0, proc.stderr
    assert _tree(tmp_path / "out") == truth
    # our reader, and the Go reader on our blob
    data = blob.read_bytes()
    ours = list(listing(EstargzReader(BytesBlobSource(data), res.toc_digest)))
    ours_tree, counts = _from_listing(ours)
    assert ours_tree == truth
    assert _go_listing(go_tools["gocheck"], blob, res.toc_digest) == ours
    for path, want in case.xattrs.items():
        assert counts[path] == len(want)
    if case.xattrs:
        index = EstargzReader(BytesBlobSource(data), res.toc_digest).index
        got = {n: dict(e.xattrs) for n, e in index.names() if n in case.xattrs}
        assert got == case.xattrs
    # the Go writer
    go_blob = tmp_path / "go.blob"
    proc = subprocess.run(
        [str(go_tools["gowrite"]), "-chunk", "4", str(src), str(go_blob), *prioritized],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    go_res = json.loads(proc.stdout)
    go_tree, _ = _from_listing(_go_listing(go_tools["gocheck"], go_blob, go_res["toc_digest"]))
    if case.go_agrees:
        assert go_tree == truth


@pytest.mark.parametrize("compress", ["none", "gzip", "pipe"])
def test_duplicates_are_resolved_for_every_input_form(compress: str, tmp_path: Path) -> None:
    """Seekable plain input is read in place; gzip and non-seekable input are spooled."""
    raw = _tar(CASES["file-twice"].entries)
    if compress == "gzip":
        import gzip

        f: io.RawIOBase | io.BytesIO = io.BytesIO(gzip.compress(raw))
    elif compress == "pipe":
        r, w = os.pipe()
        os.write(w, raw)
        os.close(w)
        f = open(r, "rb", buffering=0)  # noqa: SIM115
    else:
        f = io.BytesIO(raw)
    out = io.BytesIO()
    res = convert(f, out, prioritized_files=["conf"])  # type: ignore[arg-type]
    reader = EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest)
    (conf,) = [e for n, e in reader.index.names() if n == "conf"]
    assert reader.read_file(conf) == b"new\n"


@pytest.mark.parametrize("stdin", [False, True])
def test_cli_convert_and_ls_see_the_later_entry(tmp_path: Path, lazybench, stdin: bool) -> None:
    """The field report through ``lazybench estargz convert --prioritized-files`` and ``ls``."""
    src, out = tmp_path / "in.tar", tmp_path / "out.blob"
    src.write_bytes(_tar(CASES["file-twice"].entries))
    prio = tmp_path / "prio.txt"
    prio.write_text("conf\n")
    args = ["estargz", "convert", "-" if stdin else str(src), str(out), "--prioritized-files"]
    if stdin:  # a pipe: not seekable, so the input is spooled
        proc = subprocess.run(
            [*lazybench_command(), *args, str(prio)],
            input=src.read_bytes(),
            capture_output=True,
            timeout=120,
        )
        res = CliResult(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    else:
        res = lazybench(*args, str(prio))
    assert res.code == 0, res.err
    toc = json.loads(res.out)["toc_digest"]
    res = lazybench("estargz", "ls", str(out), "--toc-digest", toc)
    assert res.code == 0, res.err
    lines = {json.loads(line)["name"]: json.loads(line) for line in res.out.splitlines()}
    assert lines["conf"]["sha256"] == sha(b"new\n")
    assert [n for n in lines if n == "conf"] == ["conf"]
    assert _extract(out, tmp_path / "x", "-xzf").returncode == 0
    assert (tmp_path / "x" / "conf").read_bytes() == b"new\n"
