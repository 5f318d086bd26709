"""Pushing built images in every mode to a real docker-registry, and running them with podman."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile

import httpx
import pytest

from harness.images import TINY_OUTPUT, PushError, oci_layout, push_image, tiny_image
from harness.images.push import (
    MEDIA_GZIP,
    MEDIA_ZSTD,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
)
from harness.images.recipes import LAYER_FORMAT
from harness.podman import PodmanEnv
from harness.registry_server import RegistryServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def registry():
    with RegistryServer() as reg:
        yield reg


def _run(env: PodmanEnv, ref: str) -> str:
    return env.run(ref, timeout=120).stdout


def test_legacy_push_pull_run(registry, tiny):
    pushed = push_image(tiny, registry.host, "t/tiny", "legacy", "legacy")
    assert pushed.ref == f"{registry.host}/t/tiny:legacy"
    assert [x.media_type for x in pushed.layers] == [MEDIA_GZIP] * 3
    assert [x.diff_id for x in pushed.layers] == [x.diff_id for x in tiny.layers]
    assert all(x.toc_digest is None for x in pushed.layers)
    # the manifest is the one we wrote, byte for byte (--preserve-digests)
    layout = oci_layout(tiny, "legacy")
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed.manifest_digest
    with PodmanEnv(insecure_registries=[registry.host]) as env:
        env.pull(pushed.digest_ref)
        assert _run(env, pushed.digest_ref).strip() == TINY_OUTPUT
        # the whiteout and the opaque dir took effect
        ls = env.run(pushed.ref, "/bin/ls", "/data", "/data/opq").stdout
        assert "gone.txt" not in ls and "old.txt" not in ls and "new.txt" in ls


def test_zstd_chunked_is_podmans_own_format(registry, tiny):
    pushed = push_image(tiny, registry.host, "t/tiny", "zstd-chunked", "zstd-chunked")
    for layer in pushed.layers:
        assert layer.media_type == MEDIA_ZSTD
        assert layer.toc_digest and layer.toc_digest.startswith("sha256:")
        assert "io.containers.zstd-chunked.manifest-position" in layer.annotations
    # the first bytes are a zstd frame (skippable or data)
    first = pushed.layers[0]
    head = httpx.get(
        f"{registry.url}/v2/t/tiny/blobs/{first.digest}", headers={"Range": "bytes=0-3"}
    ).content
    assert head in (b"\x28\xb5\x2f\xfd",) or head[1:4] == b"\x2a\x4d\x18"
    mark = registry.log_mark()
    with PodmanEnv(insecure_registries=[registry.host], partial_pulls=True) as env:
        env.pull(pushed.ref)
        assert _run(env, pushed.ref).strip() == TINY_OUTPUT
    ranged = [r for r in registry.access_log_since(mark) if r.is_blob_get and r.status == 206]
    assert ranged, "podman did not use partial pulls"


@pytest.mark.parametrize("mode", ["legacy", "zstd-chunked"])
def test_a_second_push_reuses_the_compressed_layout(registry, tiny, mode):
    first = push_image(tiny, registry.host, "t/again", "v1", mode)
    mtime = (oci_layout(tiny, mode) / "index.json").stat().st_mtime_ns
    second = push_image(tiny, registry.host, "t/again", "v2", mode)
    assert (oci_layout(tiny, mode) / "index.json").stat().st_mtime_ns == mtime
    assert second.manifest_digest == first.manifest_digest


def test_bad_mode_and_dead_registry_are_named(tiny):
    with pytest.raises(PushError, match="unknown mode 'gzip'"):
        push_image(tiny, "127.0.0.1:1", "x", "y", "gzip")
    with pytest.raises(PushError, match=re.escape("127.0.0.1:1/x:y")):
        push_image(tiny, "127.0.0.1:1", "x", "y", "legacy", timeout=30)


def test_estargz_modes_carry_annotations_and_landmarks(registry, tiny):
    from store.estargz import EstargzReader, FileBlobSource

    noopt = push_image(tiny, registry.host, "t/tiny", "estargz-noopt", "estargz-noopt")
    files = ["/data/hello.txt", "bin/busybox", "/not/there"]
    opt = push_image(tiny, registry.host, "t/tiny", "estargz", "estargz", prioritized_files=files)

    def toc_names(pushed, mode, i):
        blob = oci_layout(tiny, mode, prioritized_files=files if mode == "estargz" else None)
        path = blob / "blobs" / "sha256" / pushed.layers[i].digest.split(":")[1]
        with FileBlobSource(path) as src:
            reader = EstargzReader(src, expected_toc_digest=pushed.layers[i].toc_digest)
            return [e["name"] for e in reader.toc.entries]

    for pushed in (noopt, opt):
        for layer, built in zip(pushed.layers, tiny.layers, strict=True):
            assert layer.media_type == MEDIA_GZIP
            assert layer.annotations[TOC_DIGEST_ANNOTATION] == layer.toc_digest
            assert int(layer.annotations[UNCOMPRESSED_SIZE_ANNOTATION]) >= built.size // 2
    assert ".no.prefetch.landmark" in toc_names(noopt, "estargz-noopt", 1)
    names = toc_names(opt, "estargz", 1)  # layer 1 holds data/hello.txt
    assert names.index("data/hello.txt") < names.index(".prefetch.landmark")
    assert names.index(".prefetch.landmark") < names.index("data/big.bin")
    with PodmanEnv(insecure_registries=[registry.host]) as env:
        env.pull(opt.ref)  # a full pull of an eStargz image works like any gzip image
        assert _run(env, opt.ref).strip() == TINY_OUTPUT


def test_cli_build_and_ls(tmp_path):
    cmd = [sys.executable, "-c", "from harness.cli import main; raise SystemExit(main())", "images"]
    out = subprocess.run(
        [*cmd, "build", "tiny", "--cache-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    ls = subprocess.run(
        [*cmd, "ls", "--json", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in ls.stdout.splitlines()]
    assert [(r["name"], r["layers"], r["current"]) for r in rows] == [("tiny", 3, True)]
    stale = tmp_path / "images" / "0000stale"
    stale.mkdir()
    (stale / "image.json").write_text('{"name": "old", "layers": []}')
    shared = tmp_path / "layers" / "0000shared"  # a shared apt layer, tars of two formats
    shared.mkdir(parents=True)
    for name in ("layer.tar", f"layer.f{LAYER_FORMAT}.tar"):
        (shared / name).write_bytes(b"\0" * 1024)
    for name in ("layer.json", f"layer.f{LAYER_FORMAT}.json"):
        (shared / name).write_text("{}")
    pruned = subprocess.run(
        [*cmd, "prune", "--cache-dir", str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert "removed old 0000stale" in pruned.stdout and not stale.exists()
    assert f"removed old-format layer tar {shared.name}/layer.tar" in pruned.stdout
    assert sorted(p.name for p in shared.glob("layer*")) == [
        f"layer.f{LAYER_FORMAT}.json",
        f"layer.f{LAYER_FORMAT}.tar",
    ]
    assert len(list((tmp_path / "images").glob("*/image.json"))) == 1  # tiny is kept
    bad = subprocess.run([*cmd, "build", "nosuch"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "nosuch" in bad.stderr


def test_optimized_image_reconverts_only_layers_with_prioritized_files(tmp_path):
    built = tiny_image(tmp_path, big_file_size=4096)
    noopt = oci_layout(built, "estargz-noopt")
    blobs_dir = tmp_path / "blobs"
    before = {p.name for p in blobs_dir.iterdir()}
    opt = oci_layout(built, "estargz", prioritized_files=["/data/hello.txt"])
    added = {p.name for p in blobs_dir.iterdir()} - before
    assert len(added) == 1  # only layer 1 holds data/hello.txt

    def layer_digests(layout):
        index = json.loads((layout / "index.json").read_text())
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
        return [x["digest"] for x in manifest["layers"]]

    a, b = layer_digests(noopt), layer_digests(opt)
    assert a[0] == b[0] and a[2] == b[2] and a[1] != b[1]


def test_an_optimized_layout_lists_the_traced_fetch_order(tmp_path):
    """The bench's path: ``read_order`` from the trace reaches the writer (the landmark
    lists the fetch order), gives the layout a name of its own, and the limit model finds it
    by the same trace."""
    from harness.limit import chunk_level_layout
    from harness.trace import TracedFile
    from store.estargz import PREFETCH_ORDER_KEY, EstargzReader, FileBlobSource

    built = tiny_image(tmp_path, big_file_size=1 << 20)
    traced = [
        TracedFile("data/big.bin", ((0, 1 << 20),), ((0, 65536, 0), (65536, 1 << 20, 2))),
        TracedFile("data/hello.txt", ((0, 5),), ((0, 65536, 1),)),
    ]
    files = [f.path for f in traced]
    ranges = {f.path: f.ranges for f in traced}
    order = {f.path: f.order for f in traced}
    plain = oci_layout(built, "estargz", prioritized_files=files, read_ranges=ranges)
    ordered = oci_layout(
        built, "estargz", prioritized_files=files, read_ranges=ranges, read_order=order
    )
    assert plain != ordered and chunk_level_layout(built.dir, traced) == ordered

    def landmarks(layout):
        index = json.loads((layout / "index.json").read_text())
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
        for desc in manifest["layers"]:
            blob = layout / "blobs" / "sha256" / desc["digest"].split(":")[1]
            toc_digest = desc["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
            reader = EstargzReader(FileBlobSource(blob), toc_digest)
            yield from (e for e in reader.toc.entries if e["name"] == ".prefetch.landmark")

    (entry,) = landmarks(ordered)
    assert PREFETCH_ORDER_KEY in entry  # big.bin's first chunk, hello.txt, big.bin's rest
    assert [PREFETCH_ORDER_KEY in e for e in landmarks(plain)] == [False]


def test_a_layer_listed_twice_gets_a_blob_of_its_own_in_estargz_modes(registry, tiny, tmp_path):
    """One layer tar listed twice converts to two eStargz blobs with their own TOC digests
    (a layer store cannot serve one blob at two places of an image); legacy keeps the
    source's one blob, as the image has it."""
    import dataclasses

    config = json.loads(json.dumps(tiny.config))
    config["rootfs"]["diff_ids"].append(tiny.layers[-1].diff_id)
    twice = dataclasses.replace(
        tiny,
        name="tiny-twice",
        dir=tmp_path / "images" / "tiny-twice",
        layers=(*tiny.layers, tiny.layers[-1]),
        config=config,
    )
    for mode in ("estargz-noopt", "estargz"):
        pushed = push_image(twice, registry.host, "t/twice", mode, mode)
        assert len({x.digest for x in pushed.layers}) == len(twice.layers), mode
        assert len({x.toc_digest for x in pushed.layers}) == len(twice.layers), mode
    legacy = push_image(twice, registry.host, "t/twice", "legacy", "legacy")
    assert legacy.layers[-1].digest == legacy.layers[-2].digest
    with PodmanEnv(insecure_registries=[registry.host]) as env:
        env.pull(f"{registry.host}/t/twice:estargz-noopt")
        assert _run(env, f"{registry.host}/t/twice:estargz-noopt").strip() == TINY_OUTPUT


def _with_layer(built, root, data: bytes, name: str):
    """``built`` as image ``name`` with one more layer, the tar ``data``."""
    import dataclasses
    import hashlib

    from harness.images.build import BuiltLayer

    directory = root / "images" / name
    (directory / "layers").mkdir(parents=True)
    path = directory / "layers" / "extra.tar"
    path.write_bytes(data)
    extra = BuiltLayer(path, f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), "")
    config = json.loads(json.dumps(built.config))
    config["rootfs"]["diff_ids"].append(extra.diff_id)
    layers = (*built.layers, extra)
    return dataclasses.replace(built, name=name, dir=directory, layers=layers, config=config)


def _refused_once(built, mode: str) -> str:
    """The message of the :class:`LayerRefused` that writing ``built`` in ``mode`` raises,
    through the preparer's retries: it is not tried again."""
    import io

    from rich.console import Console

    from harness.images import LayerRefused
    from harness.prepare import _retry

    calls = []

    def write() -> None:
        calls.append(1)
        oci_layout(built, mode)

    with pytest.raises(LayerRefused) as refused:
        _retry(write, Console(file=io.StringIO()))
    assert len(calls) == 1
    return str(refused.value)


def _tar_of(*members: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size))
    return buf.getvalue()


def test_a_layer_the_writer_refuses_is_named_not_retried_and_leaves_nothing(tmp_path):
    """A user's image whose layer holds a hard link to a file of a lower layer (podman refuses
    to pull it too): the eStargz modes once ended `lazybench run` in a traceback, after
    trying the push three times. Now the image, the layer and the reason are named, once, and
    no layout or blob is left half-written."""
    link = tarfile.TarInfo("data/hello-link.txt")
    link.type, link.linkname = tarfile.LNKTYPE, "data/hello.txt"  # in layer 1, not here
    linked = _with_layer(
        tiny_image(tmp_path, big_file_size=4096), tmp_path, _tar_of(link), "linked"
    )
    message = _refused_once(linked, "estargz-noopt")
    diff_id = linked.layers[-1].diff_id
    assert message.startswith(f"linked: layer 4/4 (diff ID {diff_id}) as estargz-noopt: ")
    assert "hardlink target not found: 'data/hello.txt'" in message
    assert not (linked.dir / "oci").exists() or not any((linked.dir / "oci").iterdir())
    assert not [p for p in (tmp_path / "blobs").iterdir() if p.name.startswith(".")]


def test_data_after_a_layers_end_of_archive_is_named_and_not_retried(tmp_path):
    """The zstd-chunked modes named only a cache path and tried three times."""
    member = tarfile.TarInfo("a")
    member.size = 1
    junk = _with_layer(tiny_image(tmp_path), tmp_path, _tar_of(member) + b"junk", "junk")
    message = _refused_once(junk, "zstd-chunked")
    diff_id = junk.layers[-1].diff_id
    assert message.startswith(f"junk: layer 4/4 (diff ID {diff_id}) as zstd-chunked: ")
    assert "non-zero bytes after the end of the archive" in message


def test_an_empty_layer_file_is_written_as_the_end_of_archive_marker(tmp_path):
    """A 0-byte layer (podman pulls it as an empty layer) failed the zstd-chunked modes with
    "not a readable tar: empty file"; given to skopeo as it is, containers/storage 1.43's
    writer never finishes. It is written as the marker alone, the same empty layer."""
    import hashlib

    layout = oci_layout(_with_layer(tiny_image(tmp_path), tmp_path, b"", "empty"), "zstd-chunked")
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    last = blobs / manifest["layers"][-1]["digest"][7:]
    plain = subprocess.run(["zstd", "-dc", last], capture_output=True, check=True).stdout
    assert plain == bytes(1024)
    assert config["rootfs"]["diff_ids"][-1] == f"sha256:{hashlib.sha256(plain).hexdigest()}"
