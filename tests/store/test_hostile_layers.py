"""Hostile layers through the mounted store (real registry, real FUSE mount).

Each case expects its exact outcome: the layer refused (the ``diff`` lookup answers EIO
quickly, one log line names the library error) or EIO on a read — never a tree built from a
bad TOC, never wrong bytes. One registry and one store serve the whole module (the store
with small TOC caps, to check they are configurable); ~20 s in all.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from store.estargz import (
    InvalidEntryName,
    InvalidToc,
    TocOutOfRange,
    estargz_footer_bytes,
    parse_footer,
)
from tests.store import images
from tests.store.mounted import MountedStore, mounted_store

pytestmark = pytest.mark.e2e

MAX_ENTRIES = 200_000
MAX_BYTES = 8 << 20
VECTOR = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "estargz" / "basic.blob"


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    config = (
        "noprefetch = true\nno_background_fetch = true\n"
        f"toc_max_entries = {MAX_ENTRIES}\ntoc_max_bytes = {MAX_BYTES}\n"
    )
    with mounted_store(tmp_path_factory.mktemp("hostile"), config) as store:
        yield store


def _basic() -> tuple[bytes, list[dict]]:
    from tests.estargz.fmt_helpers import toc_entries

    blob = VECTOR.read_bytes()
    return blob, toc_entries(blob)


def with_toc(head: bytes, toc_json: bytes) -> bytes:
    """``head`` (the data members) + a TOC member holding ``toc_json`` + the footer."""
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(toc_json)
    member = ti.tobuf(tarfile.USTAR_FORMAT) + toc_json + b"\0" * (-len(toc_json) % 512)
    member += b"\0" * 1024
    return head + zlib.compress(member, 1, wbits=31) + estargz_footer_bytes(len(head))


def crafted(entries: list[dict]) -> bytes:
    blob, _ = _basic()
    head = blob[: parse_footer(blob[-51:], len(blob)).toc_offset]
    return with_toc(head, json.dumps({"version": 1, "entries": entries}).encode())


def vm_hwm_mb(mounted: MountedStore) -> float:
    assert mounted.store.proc is not None
    for line in Path(f"/proc/{mounted.store.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def refused(mounted: MountedStore, data: bytes):
    diff, digest = mounted.serve(data)
    return mounted.expect_refused(diff, digest)


def _edit(change) -> list[dict]:
    _, entries = _basic()
    change(entries)
    return entries


def _entry(entries: list[dict], name: str) -> dict:
    return next(e for e in entries if e["name"] == name)


HOSTILE = {
    "name-escapes-root": (
        lambda es: es.append({"name": "../../etc/evil", "type": "reg", "mode": 420}),
        InvalidEntryName,
        "escapes the layer root",
    ),
    "name-under-a-file": (
        lambda es: es.append({"name": "etc/hostname/evil", "type": "reg"}),
        InvalidToc,
        "'etc/hostname' is a reg, not a directory",
    ),
    "name-under-a-symlink": (
        lambda es: es.append({"name": "usr/bin/tool-link/evil", "type": "reg"}),
        InvalidToc,
        "is a symlink, not a directory",
    ),
    "hardlink-to-missing": (
        lambda es: es.append({"name": "h", "type": "hardlink", "linkName": "no/such"}),
        InvalidToc,
        "hardlink target not found",
    ),
    "hardlink-to-later-entry": (
        lambda es: es.insert(1, {"name": "h", "type": "hardlink", "linkName": "etc/hostname"}),
        InvalidToc,
        "hardlink target not found",
    ),
    "chunks-cover-10-of-100": (
        lambda es: _entry(es, "usr/bin/tool").update(chunkSize=10),
        InvalidToc,
        "chunks cover 10 of its 70000 bytes",
    ),
    "chunks-overlap": (
        lambda es: (
            _entry(es, "usr/bin/tool").update(chunkSize=40000),
            es.insert(
                es.index(_entry(es, "usr/bin/tool")) + 1,
                {"name": "usr/bin/tool", "type": "chunk", "offset": 345, "chunkOffset": 30000},
            ),
        ),
        InvalidToc,
        "does not continue the file",
    ),
    "chunks-leave-a-gap": (
        lambda es: (
            _entry(es, "usr/bin/tool").update(chunkSize=40000),
            es.insert(
                es.index(_entry(es, "usr/bin/tool")) + 1,
                {"name": "usr/bin/tool", "type": "chunk", "offset": 345, "chunkOffset": 50000},
            ),
        ),
        InvalidToc,
        "does not continue the file",
    ),
    "chunks-run-past-the-file": (
        lambda es: (
            _entry(es, "usr/bin/tool").update(chunkSize=40000),
            es.insert(
                es.index(_entry(es, "usr/bin/tool")) + 1,
                {
                    "name": "usr/bin/tool",
                    "type": "chunk",
                    "offset": 345,
                    "chunkOffset": 40000,
                    "chunkSize": 40000,
                },
            ),
        ),
        InvalidToc,
        "does not continue the file",
    ),
    "offset-past-the-toc": (
        lambda es: _entry(es, "etc/hostname").update(offset=72000),  # inside the blob, past its TOC
        TocOutOfRange,
        "at or past the TOC",
    ),
    "offset-outside-the-blob": (
        lambda es: _entry(es, "etc/hostname").update(offset=1 << 40),
        TocOutOfRange,
        "at or past the TOC",
    ),
    "size-is-a-string": (
        lambda es: _entry(es, "etc/hostname").update(size="5"),
        InvalidToc,
        "size is '5'",
    ),
    "mode-is-a-bool": (
        lambda es: _entry(es, "etc/hostname").update(mode=True),
        InvalidToc,
        "mode is True",
    ),
    "name-is-a-number": (
        lambda es: es.append({"name": 5, "type": "reg"}),
        InvalidToc,
        "name is 5",
    ),
    "gigantic-name": (
        lambda es: es.append({"name": "n" * (1 << 20), "type": "reg"}),
        InvalidEntryName,
        "longer than Linux allows",
    ),
    "nesting-past-path-max": (
        lambda es: es.append({"name": "a/" * 3000 + "f", "type": "reg"}),
        InvalidEntryName,
        "longer than Linux allows",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_toc_is_refused(mounted: MountedStore, case: str) -> None:
    change, error, match = HOSTILE[case]
    got = refused(mounted, crafted(_edit(change)))
    assert isinstance(got, error), got
    assert match in str(got), got


def test_millions_of_entries_are_refused_in_bounded_memory(mounted: MountedStore) -> None:
    body = ",".join('{"name":"f' + str(i) + '","type":"reg"}' for i in range(2_000_000))
    toc = ('{"version":1,"entries":[' + body + "]}").encode()
    assert len(toc) > MAX_BYTES  # both caps are passed: the first one met refuses it
    before = vm_hwm_mb(mounted)
    got = refused(mounted, with_toc(b"", toc))
    assert isinstance(got, InvalidToc) and "limit on TOC" in str(got), got
    assert vm_hwm_mb(mounted) - before < 40


def test_entry_cap_alone_refuses(mounted: MountedStore) -> None:
    body = ",".join('{"name":"' + str(i) + '","type":"reg"}' for i in range(MAX_ENTRIES + 1))
    toc = ('{"version":1,"entries":[' + body + "]}").encode()
    assert len(toc) < MAX_BYTES
    got = refused(mounted, with_toc(b"", toc))
    assert isinstance(got, InvalidToc) and f"more than {MAX_ENTRIES} entries" in str(got), got


def test_deep_names_under_new_directories_are_refused_in_bounded_memory(
    mounted: MountedStore,
) -> None:
    # Each directory the TOC does not name is made with its whole path: 400 entries
    # "x<k>/a/a/…/f" (1.6 MB of TOC) made 800,000 directories holding 1.6 GB of names.
    entries = [{"name": f"x{k}/" + "a/" * 2000 + "f", "type": "reg"} for k in range(400)]
    before = vm_hwm_mb(mounted)
    got = refused(mounted, with_toc(b"", json.dumps({"version": 1, "entries": entries}).encode()))
    assert isinstance(got, InvalidToc) and "directories the TOC never names" in str(got), got
    assert vm_hwm_mb(mounted) - before < 100


def test_toc_byte_cap_refuses_a_huge_toc(mounted: MountedStore) -> None:
    entry = {"name": "x", "type": "reg", "xattrs": {"user.pad": "QUFB" * (3 << 20)}}
    got = refused(mounted, with_toc(b"", json.dumps({"version": 1, "entries": [entry]}).encode()))
    assert isinstance(got, InvalidToc) and f"over the limit on TOC bytes ({MAX_BYTES}" in str(
        got
    ), got


def test_deep_nesting_within_path_max_is_served(mounted: MountedStore) -> None:
    name = "a/" * 1000 + "f"
    diff, _ = mounted.serve(crafted([{"name": name, "type": "reg", "mode": 0o644}]))
    assert stat.S_ISREG(os.stat(diff / name).st_mode)


def test_entries_null_is_an_empty_layer_served_lazily(mounted: MountedStore) -> None:
    diff, _ = mounted.serve(with_toc(b"", b'{"version":1,"entries":null}'))
    assert os.listdir(diff) == [] and stat.S_IMODE(os.stat(diff).st_mode) == 0o555


def test_duplicate_names_serve_the_later_entry(mounted: MountedStore) -> None:
    def add(tar: tarfile.TarFile) -> None:
        images.add_file(tar, "conf", b"old\n")
        images.add_file(tar, "conf", b"new\n")
        images.add_node(tar, "d", tarfile.DIRTYPE, 0o755)
        images.add_file(tar, "d/x", b"x\n")
        images.add_node(tar, "d", tarfile.DIRTYPE, 0o700)
        images.add_node(tar, "s", tarfile.SYMTYPE, 0o777, linkname="conf")
        images.add_file(tar, "s", b"a file now\n")

    blob = images.to_estargz(images.make_tar(add))
    diff, _ = mounted.serve(blob.data, blob.toc_digest)
    assert (diff / "conf").read_bytes() == b"new\n"
    assert stat.S_IMODE(os.stat(diff / "d").st_mode) == 0o700 and os.listdir(diff / "d") == ["x"]
    assert (
        stat.S_ISREG(os.lstat(diff / "s").st_mode) and (diff / "s").read_bytes() == b"a file now\n"
    )


def test_symlinks_pointing_anywhere_are_served_as_data(mounted: MountedStore) -> None:
    targets = {"evil": "/etc/shadow", "up": "../../../../../../etc/passwd", "root": "/"}
    entries = [
        {"name": name, "type": "symlink", "linkName": t, "mode": 0o777}
        for name, t in targets.items()
    ]
    diff, _ = mounted.serve(crafted(entries))
    for name, target in targets.items():
        assert stat.S_ISLNK(os.lstat(diff / name).st_mode)
        assert os.readlink(diff / name) == target


def test_same_layer_whiteout_keeps_the_layers_directory_opaque(mounted: MountedStore) -> None:
    def add(tar: tarfile.TarFile) -> None:
        images.add_node(tar, "case", tarfile.DIRTYPE)
        images.add_node(tar, "case/a", tarfile.DIRTYPE)
        images.add_file(tar, "case/a/newfile", b"new\n")
        images.add_file(tar, "case/.wh.a", b"")

    blob = images.to_estargz(images.make_tar(add))
    diff, _ = mounted.serve(blob.data, blob.toc_digest)
    assert os.listdir(diff / "case") == ["a"] and os.listdir(diff / "case/a") == ["newfile"]
    assert os.getxattr(diff / "case/a", "trusted.overlay.opaque") == b"y"


def test_a_chunk_inflating_past_its_size_is_eio_without_inflating_it(
    mounted: MountedStore,
) -> None:
    blob, _ = _basic()
    head = blob[: parse_footer(blob[-51:], len(blob)).toc_offset]
    z = zlib.compressobj(1, wbits=31)
    zeros = bytes(1 << 20)
    bomb = b"".join(z.compress(zeros) for _ in range(256)) + z.flush()  # 256 MiB of zeros
    entry = {
        "name": "bomb",
        "type": "reg",
        "size": 10,
        "offset": len(head),
        "chunkDigest": "sha256:" + hashlib.sha256(b"\1" * 10).hexdigest(),
    }
    data = with_toc(head + bomb, json.dumps({"version": 1, "entries": [entry]}).encode())
    diff, digest = mounted.serve(data)
    before = vm_hwm_mb(mounted)
    start = time.monotonic()
    with pytest.raises(OSError) as exc:
        (diff / "bomb").read_bytes()
    assert exc.value.errno == errno.EIO
    assert time.monotonic() - start < 5
    assert vm_hwm_mb(mounted) - before < 64  # the 256 MiB were never inflated
    lines = [m for m in mounted.log_lines("refusing unverified") if "ChunkDigestMismatch" in m]
    # The line says where: the layer, the file and the offset of the refused read.
    assert lines and f"layer {digest}, 'bomb' at offset 0)" in lines[-1], lines


def test_a_chunk_claiming_a_gigabyte_is_refused_before_any_read(mounted: MountedStore) -> None:
    # 1 GiB of zeros gzip'ed is ~1 MB: without a cap on a chunk's size, one 4 KiB read of
    # "big" inflated all of it (twice over: ~2 GiB of store memory), whatever its digest.
    blob, _ = _basic()
    head = blob[: parse_footer(blob[-51:], len(blob)).toc_offset]
    z = zlib.compressobj(9, wbits=31)
    zeros = bytes(1 << 20)
    bomb = b"".join(z.compress(zeros) for _ in range(1024)) + z.flush()
    digest = hashlib.sha256()
    for _ in range(1024):
        digest.update(zeros)
    entry = {
        "name": "big",
        "type": "reg",
        "size": 1 << 30,
        "offset": len(head),
        "chunkDigest": "sha256:" + digest.hexdigest(),
    }
    data = with_toc(head + bomb, json.dumps({"version": 1, "entries": [entry]}).encode())
    before = vm_hwm_mb(mounted)
    got = refused(mounted, data)
    assert isinstance(got, InvalidToc) and "over the limit on chunk size" in str(got), got
    assert vm_hwm_mb(mounted) - before < 64


def _tree_refused(mounted: MountedStore, entries: list[dict], match: str) -> None:
    """The layer is refused at lookup (EIO, quickly), its log line naming the tree's rule."""
    diff, digest = mounted.serve(crafted(entries))
    start = time.monotonic()
    with pytest.raises(OSError) as exc:
        os.stat(diff)
    assert exc.value.errno == errno.EIO and time.monotonic() - start < 10
    lines = mounted.log_lines(f"refusing layer {digest}")
    assert len(lines) == 1 and "TreeError" in lines[0] and match in lines[0], lines


@pytest.mark.parametrize("name", [".wh..", ".wh..."])
def test_a_whiteout_of_dot_or_dotdot_is_refused(mounted: MountedStore, name: str) -> None:
    # Served, readdir of d listed a character device named "." (or "..").
    entries = [{"name": "d/", "type": "dir", "mode": 0o755}, {"name": f"d/{name}", "type": "reg"}]
    _tree_refused(mounted, entries, "a whiteout of")


@pytest.mark.parametrize(
    "entries",
    [
        [
            {"name": "f", "type": "reg", "mode": 0o644},
            {"name": ".wh.z", "type": "hardlink", "linkName": "f"},
        ],
        [
            {"name": ".wh.x", "type": "reg", "mode": 0o644},
            {"name": "y", "type": "hardlink", "linkName": ".wh.x"},
        ],
    ],
    ids=["link-named-like-a-whiteout", "link-to-a-whiteout"],
)
def test_a_hardlink_between_a_whiteout_and_a_file_is_refused(
    mounted: MountedStore, entries: list[dict]
) -> None:
    # Served, the whiteout and the file had one inode number (st_ino) with two types, and
    # the file an nlink counting the whiteout: no extraction makes that tree.
    _tree_refused(mounted, entries, "a whiteout on one side")


def test_a_whiteout_hardlinked_to_an_opaque_marker_is_refused(mounted: MountedStore) -> None:
    # Served, a lookup of d/x gave a 0:0 character device (the whiteout) and a getattr of
    # its inode number, once the attributes expired, the marker entry's device 1:3.
    entries = [
        {"name": ".wh..wh..opq", "type": "char", "mode": 0o666, "devMajor": 1, "devMinor": 3},
        {"name": "d/.wh.x", "type": "hardlink", "linkName": ".wh..wh..opq"},
    ]
    _tree_refused(mounted, entries, "(an opaque marker)")


@pytest.mark.parametrize(
    "size",
    ["\u00b2", "9" * 5000, "9" * 25, "-5", " 42"],
    ids=["superscript-two", "5000-digits", "past-int64", "negative", "blank"],
)
def test_an_uncompressed_size_annotation_that_is_no_byte_count_is_left_out(
    mounted: MountedStore, size: str
) -> None:
    # "²" passes str.isdigit and 5,000 digits int()'s limit: both failed the lookup of
    # info with EIO (an "unexpected error" traceback in the log); 25 digits gave podman a
    # diff-size past int64. info now carries none, as for a layer without the annotation.
    from tests.store.mounted import toc_digest_of

    blob = VECTOR.read_bytes()
    tag = hashlib.sha256(size.encode()).hexdigest()[:12]
    layer = images.Blob(
        blob,
        "sha256:" + hashlib.sha256(b"usize" + tag.encode()).hexdigest(),
        annotations={images.TOC_ANN: toc_digest_of(blob), images.USIZE_ANN: size},
    )
    images.push(mounted.registry.host, f"hostile/usize-{tag}", "1", [layer])
    layer_dir = mounted.store.layer_dir(
        f"{mounted.registry.host}/hostile/usize-{tag}:1", layer.digest
    )
    info = json.loads((layer_dir / "info").read_bytes())
    assert "diff-size" not in info and info["compressed-diff-digest"] == layer.digest, info
    assert os.path.isdir(layer_dir / "diff")
    assert mounted.log_lines(f"annotation {images.USIZE_ANN} is {size[:80]!r}")


def test_a_blob_whose_bytes_were_changed_is_not_served(mounted: MountedStore) -> None:
    # The first gzip member's header MTIME changed in the registry's copy: every chunk still
    # inflates to bytes that match its chunkDigest, so files read right; only the layer
    # digest covers the compressed bytes, so the raw blob (podman save/push) is refused.
    blob, _ = _basic()
    diff, digest = mounted.serve(blob)
    assert mounted.read(diff / "etc" / "hostname")
    storage = mounted.registry.storage_dir
    data = storage / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    tampered = bytearray(data.read_bytes())
    assert tampered[:4] == b"\x1f\x8b\x08\x00"  # gzip, no flags: MTIME is bytes 4-7
    tampered[4] ^= 1
    data.write_bytes(bytes(tampered))
    with pytest.raises(OSError) as exc, open(diff.parent / "blob", "rb") as f:
        f.read(100)
    assert exc.value.errno == errno.EIO
    lines = mounted.log_lines("refusing unverified data: ")
    assert any(f"{digest}: the blob's {len(blob)} bytes hash to sha256:" in m for m in lines)
    assert mounted.read(diff / "usr" / "bin" / "tool")  # the files are still served


def test_a_blob_annotated_with_another_toc_digest_by_a_second_image_is_refused_there(
    mounted: MountedStore,
) -> None:
    # Layers are shared across images by blob digest. Image b lists image a's blob with a
    # TOC digest it does not have: looked up in b (by that TOC digest, as podman >= 5.1
    # does, or by the blob digest), the layer loaded and verified for a is not handed out
    # under b's annotation; in a it is still served.
    from tests.store.mounted import toc_digest_of

    data = VECTOR.read_bytes()
    real, bogus = toc_digest_of(data), "sha256:" + "1" * 64
    host = mounted.registry.host
    for name, toc in (("a", real), ("b", bogus)):
        layer = images.Blob(data, "sha256:" + hashlib.sha256(b"two-tocs").hexdigest(), toc)
        images.push(host, f"hostile/two-tocs-{name}", "1", [layer])
    a, b = f"{host}/hostile/two-tocs-a:1", f"{host}/hostile/two-tocs-b:1"
    digest = images.sha(data)
    assert os.path.isdir(mounted.store.layer_dir(a, digest) / "diff")
    for name in (bogus, digest):
        with pytest.raises(OSError) as exc:
            os.stat(mounted.store.layer_dir(b, name) / "diff")
        assert exc.value.errno == errno.EIO, name
    assert mounted.log_lines(f"annotates it with TOC digest {bogus}, but its TOC hashes to {real}")
    assert os.path.isdir(mounted.store.layer_dir(a, real) / "diff")
