"""`convert_image` between OCI layouts (skopeo, no registry or podman): indexes, platforms,
diff IDs and annotations, pass-through of eStargz layers, zstd:chunked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from harness.images import oci_layout
from harness.images.convert import ConvertError, ConvertOptions, convert_image
from harness.images.source import decompress_layer
from store.estargz import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")

INDEX = "application/vnd.oci.image.index.v1+json"


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _put(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(layout, digest).write_bytes(data)
    return digest


@pytest.fixture(scope="module")
def two_platforms(tiny, tmp_path_factory) -> Path:
    """An OCI layout whose index holds the tiny image for amd64 and (relabelled) arm64."""
    layout = tmp_path_factory.mktemp("index") / "layout"
    shutil.copytree(oci_layout(tiny, "legacy"), layout)
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    amd = json.loads(_blob(layout, top["digest"]).read_bytes())
    config = json.loads(_blob(layout, amd["config"]["digest"]).read_bytes())
    arm_config = json.dumps({**config, "architecture": "arm64"}).encode()
    arm = {**amd, "config": {**amd["config"], "digest": _put(layout, arm_config)}}
    arm["config"]["size"] = len(arm_config)
    arm_raw = json.dumps(arm).encode()
    entries = [
        {**{k: top[k] for k in ("mediaType", "digest", "size")}, "platform": p}
        for p in ({"os": "linux", "architecture": "amd64"},)
    ]
    entries.append(
        {
            "mediaType": top["mediaType"],
            "digest": _put(layout, arm_raw),
            "size": len(arm_raw),
            "platform": {"os": "linux", "architecture": "arm64"},
        }
    )
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}).encode()
    desc = {"mediaType": INDEX, "digest": _put(layout, index), "size": len(index)}
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return layout


def _images(out: Path) -> tuple[dict, dict[str, dict]]:
    top = json.loads((out / "index.json").read_text())["manifests"][0]
    index = json.loads(_blob(out, top["digest"]).read_bytes())
    by_arch = {
        d["platform"]["architecture"]: {
            **d,
            "manifest": json.loads(_blob(out, d["digest"]).read_bytes()),
        }
        for d in index["manifests"]
    }
    return index, by_arch


def _check_estargz_image(out: Path, manifest: dict) -> None:
    config = json.loads(_blob(out, manifest["config"]["digest"]).read_bytes())
    for d, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        ann = d["annotations"]
        assert ann[TOC_DIGEST_ANNOTATION].startswith("sha256:")
        size, digest = decompress_layer(_blob(out, d["digest"]), out / "plain.tar")
        assert digest == diff_id and size == int(ann[UNCOMPRESSED_SIZE_ANNOTATION])


def test_index_keeps_other_platforms_or_converts_all(two_platforms: Path, tmp_path: Path) -> None:
    _, source = _images(two_platforms)
    out = tmp_path / "one"
    report = convert_image(f"oci:{two_platforms}", f"oci:{out}:x", show_progress=False)
    index, images = _images(out)
    assert report.manifests == 1 and report.converted == 3
    assert index["mediaType"] == INDEX
    assert images["arm64"]["digest"] == source["arm64"]["digest"]  # untouched, byte for byte
    assert images["amd64"]["digest"] != source["amd64"]["digest"]
    _check_estargz_image(out, images["amd64"]["manifest"])

    out = tmp_path / "all"
    options = ConvertOptions(all_platforms=True)
    report = convert_image(f"oci:{two_platforms}", f"oci:{out}:x", options, show_progress=False)
    _, images = _images(out)
    assert report.manifests == 2
    for arch in ("amd64", "arm64"):
        _check_estargz_image(out, images[arch]["manifest"])

    # Converting the result again passes every layer through.
    again = convert_image(
        f"oci:{out}:x", f"oci:{tmp_path / 'again'}:x", options, show_progress=False
    )
    assert again.converted == 0 and again.passed_through == 6
    assert again.digest == report.digest

    with pytest.raises(ConvertError, match="no manifest for platform linux/s390x"):
        convert_image(
            f"oci:{two_platforms}",
            f"oci:{tmp_path / 'none'}:x",
            ConvertOptions(platform="linux/s390x"),
            show_progress=False,
        )


def test_zstd_chunked(tiny, tmp_path: Path) -> None:
    out = tmp_path / "zstd"
    report = convert_image(
        f"oci:{oci_layout(tiny, 'legacy')}",
        f"oci:{out}:z",
        ConvertOptions(format="zstd-chunked"),
        show_progress=False,
    )
    top = json.loads((out / "index.json").read_text())["manifests"][0]
    assert top["digest"] == report.digest
    manifest = json.loads(_blob(out, top["digest"]).read_bytes())
    config = json.loads(_blob(out, manifest["config"]["digest"]).read_bytes())
    for d, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert d["mediaType"].endswith("+zstd")
        assert "io.github.containers.zstd-chunked.manifest-checksum" in d["annotations"] or any(
            k.endswith("zstd-chunked.manifest-checksum") for k in d["annotations"]
        )
        assert decompress_layer(_blob(out, d["digest"]), tmp_path / "p.tar")[1] == diff_id
    again = convert_image(
        f"oci:{out}:z",
        f"oci:{tmp_path / 'again'}:z",
        ConvertOptions(format="zstd-chunked"),
        show_progress=False,
    )
    assert again.passed_through == 3 and again.digest == report.digest


def test_import_picks_the_platform_and_names_what_is_missing(
    two_platforms: Path, tmp_path: Path
) -> None:
    from harness.images.source import ImageSourceError, import_image

    ref = f"oci:{two_platforms}"
    arm = import_image(ref, tmp_path, platform="linux/arm64")
    amd = import_image(ref, tmp_path, platform="linux/amd64")
    assert arm.config["architecture"] == "arm64" and amd.config["architecture"] == "amd64"
    assert [x.diff_id for x in arm.layers] == [x.diff_id for x in amd.layers]
    assert import_image(ref, tmp_path, platform="linux/amd64").dir == amd.dir  # cached
    with pytest.raises(ImageSourceError, match=r"no manifest for platform linux/s390x"):
        import_image(ref, tmp_path, platform="linux/s390x")

    # A single-platform image for another architecture than the one asked for.
    out = tmp_path / "arm-only"
    convert_image(ref, f"oci:{out}:x", ConvertOptions(platform="linux/arm64"), show_progress=False)
    _, images = _images(out)
    single = tmp_path / "single"
    shutil.copytree(out, single)
    desc = {k: images["arm64"][k] for k in ("mediaType", "digest", "size")}
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (single / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    with pytest.raises(ImageSourceError, match=r"has no layers for platform linux/amd64: .*arm64"):
        import_image(f"oci:{single}", tmp_path, platform="linux/amd64")
    with pytest.raises(ImageSourceError, match=r"does not exist"):
        import_image(f"oci-archive:{tmp_path / 'nope.tar'}", tmp_path)


@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="needs docker-registry")
def test_registry_round_trip(two_platforms: Path, tmp_path: Path) -> None:
    """An index pushed to docker:// (plain HTTP on loopback), imported and converted back."""
    from harness.images.source import import_image
    from harness.registry_server import RegistryServer

    with RegistryServer(storage_dir=tmp_path / "registry") as reg:
        ref = f"docker://{reg.host}/byo/index:esgz"
        options = ConvertOptions(all_platforms=True)
        pushed = convert_image(f"oci:{two_platforms}", ref, options, show_progress=False)
        arm = import_image(ref, tmp_path / "cache", platform="linux/arm64")
        assert arm.config["architecture"] == "arm64" and len(arm.layers) == 3
        back = convert_image(ref, f"oci:{tmp_path / 'back'}:x", options, show_progress=False)
        # A tag beside the digest, as podman takes it (skopeo refused the pair).
        pinned = f"{ref}@{pushed.digest}"
        assert import_image(pinned, tmp_path / "cache2", platform="linux/arm64").config == (
            arm.config
        )
        again = convert_image(pinned, f"oci:{tmp_path / 'b2'}:x", options, show_progress=False)
    assert back.passed_through == 6 and back.digest == pushed.digest == again.digest


def test_zstd_chunked_source_to_estargz(tiny, tmp_path: Path) -> None:
    """A zstd:chunked image converts to eStargz without keeping the zstd:chunked annotations."""
    zstd = tmp_path / "zstd"
    convert_image(
        f"oci:{oci_layout(tiny, 'legacy')}",
        f"oci:{zstd}:z",
        ConvertOptions(format="zstd-chunked"),
        show_progress=False,
    )
    out = tmp_path / "esgz"
    report = convert_image(f"oci:{zstd}:z", f"oci:{out}:e", show_progress=False)
    manifest = json.loads(_blob(out, report.digest).read_bytes())
    for d in manifest["layers"]:
        assert d["mediaType"].endswith("+gzip")
        assert not [k for k in d["annotations"] if "zstd-chunked" in k], d["annotations"]
    _check_estargz_image(out, manifest)


def test_legacy_pushes_the_sources_own_gzip_layers(tiny, tmp_path: Path) -> None:
    from harness.images.source import import_image

    source = oci_layout(tiny, "legacy")
    top = json.loads((source / "index.json").read_text())["manifests"][0]
    wanted = [d["digest"] for d in json.loads(_blob(source, top["digest"]).read_bytes())["layers"]]
    # A gzip source keeps its blobs; a source that is not gzip is compressed here.
    for ref, kept in ((f"oci:{source}", True), (f"oci:{oci_layout(tiny, 'uncompressed')}", False)):
        built = import_image(ref, tmp_path / "cache")
        assert all((x.gzip_blob is not None) is kept for x in built.layers)
        legacy = oci_layout(built, "legacy")
        top = json.loads((legacy / "index.json").read_text())["manifests"][0]
        got = [d["digest"] for d in json.loads(_blob(legacy, top["digest"]).read_bytes())["layers"]]
        assert got == wanted  # our gzip of the same tars is deterministic, too
        if kept:  # the very bytes the source held
            assert all(
                os.path.samefile(_blob(legacy, d), x.gzip_blob)
                for d, x in zip(got, built.layers, strict=True)
            )
        assert [x.diff_id for x in built.layers] == [x.diff_id for x in tiny.layers]


@pytest.mark.parametrize("prioritized", [(), ("etc/hostname",)])
@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
def test_a_source_layer_whose_gzip_is_damaged_is_named_by_its_place(
    tiny, tmp_path: Path, fmt: str, prioritized: tuple[str, ...]
) -> None:
    """A source blob that hashes to its digest but does not inflate (a CRC that does not
    match, or a damaged byte in its deflate stream): the error says which layer of the image
    it is, its digest, and what to do, with prioritized files too (the layer is read once
    to find which of them it holds: that read's error was a bare ``zlib.error``)."""
    layout = tmp_path / "damaged"
    shutil.copytree(oci_layout(tiny, "legacy"), layout)
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest = json.loads(_blob(layout, top["digest"]).read_bytes())
    last = manifest["layers"][-1]
    data = bytearray(_blob(layout, last["digest"]).read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32
    data[len(data) // 2] ^= 0xFF  # and a byte of the deflate stream
    last["digest"] = _put(layout, bytes(data))
    raw = json.dumps(manifest).encode()
    top.update(digest=_put(layout, raw), size=len(raw))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    n = len(manifest["layers"])
    with pytest.raises(ConvertError) as exc:
        convert_image(
            f"oci:{layout}",
            f"oci:{tmp_path / 'out'}:x",
            ConvertOptions(format=fmt, prioritized_files=prioritized),
            show_progress=False,
        )
    assert str(exc.value).startswith(f"layer {n} of {n}, {last['digest']}: "), exc.value
    assert "not a readable tar" in str(exc.value) and "pull or export" in str(exc.value)


def test_an_image_that_lists_a_layer_twice(tiny, tmp_path: Path) -> None:
    """Images may repeat a layer (old Docker images repeat their empty layer): imported,
    made in the harness's modes and converted all the same. In eStargz each repeat gets a
    blob of its own (no layer store can serve one blob at two places of an image), also a
    repeat whose source blob was compressed differently."""
    import gzip

    from harness.images.source import import_image

    layout = tmp_path / "dup"
    shutil.copytree(oci_layout(tiny, "legacy"), layout)
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest = json.loads(_blob(layout, top["digest"]).read_bytes())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_bytes())
    manifest["layers"].append(manifest["layers"][0])
    config["rootfs"]["diff_ids"].append(config["rootfs"]["diff_ids"][0])
    # the same layer once more, gzip'ed anew: another digest, the same diff ID
    again = gzip.compress(
        gzip.decompress(_blob(layout, manifest["layers"][0]["digest"]).read_bytes()), 1
    )
    manifest["layers"].append(
        {**manifest["layers"][0], "digest": _put(layout, again), "size": len(again)}
    )
    config["rootfs"]["diff_ids"].append(config["rootfs"]["diff_ids"][0])
    raw_config = json.dumps(config).encode()
    manifest["config"].update(digest=_put(layout, raw_config), size=len(raw_config))
    raw = json.dumps(manifest).encode()
    desc = {"mediaType": top["mediaType"], "digest": _put(layout, raw), "size": len(raw)}
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))

    built = import_image(f"oci:{layout}", tmp_path / "cache")
    assert len(built.layers) == 5 and built.layers[0].diff_id == built.layers[4].diff_id
    for mode in ("legacy", "estargz-noopt"):
        made = oci_layout(built, mode)
        top = json.loads((made / "index.json").read_text())["manifests"][0]
        layers = json.loads(_blob(made, top["digest"]).read_bytes())["layers"]
        assert len(layers) == 5
        if mode == "estargz-noopt":
            assert len({d["digest"] for d in layers}) == 5
    out = tmp_path / "out"
    report = convert_image(f"oci:{layout}", f"oci:{out}:x", show_progress=False)
    assert report.converted == 5
    top = json.loads((out / "index.json").read_text())["manifests"][0]
    converted = json.loads(_blob(out, top["digest"]).read_bytes())
    assert len({d["digest"] for d in converted["layers"]}) == 5
    assert len({d["annotations"][TOC_DIGEST_ANNOTATION] for d in converted["layers"]}) == 5
    _check_estargz_image(out, converted)


@pytest.mark.parametrize(
    "dest",
    [
        "docker-archive:{tmp}/out.tar",
        # a private store: a regression must not write into the host's
        "containers-storage:[overlay@{tmp}/graph+{tmp}/run]x/app:e",
    ],
)
def test_a_destination_that_keeps_only_uncompressed_tars_is_refused(
    tiny, tmp_path: Path, dest: str
) -> None:
    # skopeo would write it and print a digest, but as plain tars: no TOC, no annotations.
    with pytest.raises(ConvertError, match="stores layers uncompressed"):
        convert_image(
            f"oci:{oci_layout(tiny, 'legacy')}",
            dest.format(tmp=tmp_path),
            show_progress=False,
        )
    assert not (tmp_path / "out.tar").exists() and not (tmp_path / "graph").exists()


@pytest.mark.parametrize("tail", ["@sha256:" + "a" * 64, ":esgz@sha256:" + "a" * 64])
def test_a_registry_destination_named_by_digest_is_refused_before_converting(tail: str) -> None:
    """A converted image's manifest digest is new: skopeo refused such a destination only
    after every layer was converted ("Digest of source image's manifest would not match")."""
    from harness.images.convert import check_destination

    with pytest.raises(ConvertError, match=r"names a digest.*name a tag, docker://HOST/REPO:TAG"):
        check_destination(f"docker://127.0.0.1:9/app{tail}")


def test_an_index_entry_with_a_variant_the_config_does_not_repeat(
    two_platforms: Path, tmp_path: Path
) -> None:
    # `podman manifest add --variant v3` writes the variant into the index only. The host's
    # linux/amd64 selects that entry (as select_platform does), and so does linux/amd64/v3:
    # skopeo is asked for the entry's variant, and a config without one is no mismatch.
    from harness.images.source import import_image

    layout = tmp_path / "v3"
    shutil.copytree(two_platforms, layout)
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    index = json.loads(_blob(layout, top["digest"]).read_bytes())
    amd = next(d for d in index["manifests"] if d["platform"]["architecture"] == "amd64")
    amd["platform"]["variant"] = "v3"
    index["manifests"] = [amd]
    raw = json.dumps(index).encode()
    desc = {"mediaType": INDEX, "digest": _put(layout, raw), "size": len(raw)}
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    config = json.loads(_blob(layout, amd["digest"]).read_bytes())["config"]
    assert "variant" not in json.loads(_blob(layout, config["digest"]).read_bytes())

    host = import_image(f"oci:{layout}", tmp_path / "a", platform="linux/amd64")
    v3 = import_image(f"oci:{layout}", tmp_path / "b", platform="linux/amd64/v3")
    assert host.config["architecture"] == v3.config["architecture"] == "amd64"
    assert [x.diff_id for x in host.layers] == [x.diff_id for x in v3.layers]


def test_optimize_of_an_image_without_a_command_says_which_option_to_give(
    tiny, tmp_path: Path
) -> None:
    # Refused before any registry, store or podman starts (podman's own "no command or
    # entrypoint provided" named neither --command nor --entrypoint).
    from harness.images.convert import optimize_files

    layout = tmp_path / "nocmd"
    shutil.copytree(oci_layout(tiny, "legacy"), layout)
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest = json.loads(_blob(layout, top["digest"]).read_bytes())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_bytes())
    config["config"] = {k: v for k, v in config["config"].items() if k not in ("Cmd", "Entrypoint")}
    raw_config = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": _put(layout, raw_config)}
    manifest["config"]["size"] = len(raw_config)
    raw = json.dumps(manifest).encode()
    desc = {**top, "digest": _put(layout, raw), "size": len(raw)}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    with pytest.raises(ConvertError, match=r"no Entrypoint or Cmd .* --command"):
        optimize_files(f"oci:{layout}", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(("first", "then"), [("podman5", "podman4"), ("podman4", "podman5")])
def test_zstd_chunked_of_the_other_generation_is_converted_not_passed_through(
    tiny, tmp_path: Path, first: str, then: str
) -> None:
    """A zstd:chunked layer carries its generation's annotation keys, and each podman reads
    only its own: one passed through into the other generation would be pulled whole."""
    keys = {"podman4": "io.containers.", "podman5": "io.github.containers."}
    src = tmp_path / first
    convert_image(
        f"oci:{oci_layout(tiny, 'legacy')}",
        f"oci:{src}:z",
        ConvertOptions(format="zstd-chunked", zstd_generation=first),
        show_progress=False,
    )
    out = tmp_path / then
    report = convert_image(
        f"oci:{src}:z",
        f"oci:{out}:z",
        ConvertOptions(format="zstd-chunked", zstd_generation=then),
        show_progress=False,
    )
    assert report.converted == 3 and report.passed_through == 0
    top = json.loads((out / "index.json").read_text())["manifests"][0]
    manifest = json.loads(_blob(out, top["digest"]).read_bytes())
    for d in manifest["layers"]:
        assert f"{keys[then]}zstd-chunked.manifest-checksum" in d["annotations"], d
        assert not any(k.startswith(keys[first]) for k in d["annotations"]), d


def test_an_import_killed_part_way_is_swept(tiny, tmp_path: Path) -> None:
    """SIGKILL during an import left ``<cache>/images/.import-*`` that neither ``lazybench
    cleanup`` nor ``images prune`` removed; the staging directory is now claimed."""
    import multiprocessing
    import signal
    import time

    from harness import stale
    from harness.images import source

    ref = f"oci:{oci_layout(tiny, 'legacy')}"
    cache = tmp_path / "cache"
    started = tmp_path / "started"

    def stalled_import(*args: object) -> None:
        started.write_text(str(args[3]))  # the staging directory
        time.sleep(600)

    def child() -> None:
        source._import_into = stalled_import  # type: ignore[assignment]
        source.import_image(ref, cache)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the import never reached its staging step"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
    staging = Path(started.read_text())
    assert staging.is_dir() and staging.parent == cache / "images"
    swept = stale.sweep(*stale.build_dirs(cache))
    assert [s.path for s in swept] == [staging] and not staging.exists()


def _layer_blob(path: Path, files: dict[str, bytes]) -> dict:
    """A gzip'd layer tar of ``files`` at ``path``; its descriptor."""
    import gzip

    from tests.harness.test_limit import _tar

    path.write_bytes(gzip.compress(_tar(files), mtime=0))
    return {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest(),
        "size": path.stat().st_size,
    }


@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
def test_a_layer_conversion_hands_the_first_read_order_to_the_estargz_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """The order of first reads goes to ``store.estargz.convert`` beside the ranges, keyed as
    they are (the layer's files among the prioritized ones); zstd:chunked takes neither."""
    import store.estargz
    from harness.images.convert import _convert_one

    desc = _layer_blob(tmp_path / "blob", {"usr/lib/a.so": b"a" * 5000, "etc/b": b"b"})
    seen: dict[str, dict] = {}

    def spy(name: str):
        real = getattr(store.estargz, name)

        def call(*args, **kwargs):
            seen[name] = kwargs
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(store.estargz, "convert", spy("convert"))
    monkeypatch.setattr(store.estargz, "write_zstd_chunked", spy("write_zstd_chunked"))
    out = tmp_path / "out"
    out.mkdir()
    got = _convert_one(
        0,
        str(tmp_path / "blob"),
        desc,
        str(out),
        fmt,
        "podman5",
        ("/usr/lib/a.so", "not/here"),
        (("/usr/lib/a.so", ((0, 10),)), ("etc/b", ((0, 1),))),
        (("/usr/lib/a.so", ((0, 65536, 3),)), ("etc/b", ((0, 65536, 1),))),
        None,
        None,
        1,
    )
    assert got["prioritized"] == 1 and not got["passed_through"]
    if fmt == "estargz":
        assert seen["convert"]["read_order"] == {"usr/lib/a.so": ((0, 65536, 3),)}
        assert seen["convert"]["read_ranges"] == {"usr/lib/a.so": ((0, 10),)}
    else:
        assert "read_order" not in seen["write_zstd_chunked"]
        assert "read_ranges" not in seen["write_zstd_chunked"]


def test_convert_optimize_takes_the_order_of_first_reads_from_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lazybench convert --optimize``: each traced file's order goes into the options, as
    its ranges do (files without one are left out)."""
    import harness.convert_cmd
    import harness.images.convert
    import harness.images.source
    from harness.cli import build_parser
    from harness.images.convert import ConvertReport
    from harness.trace import TracedFile

    traced = [
        TracedFile("usr/lib/libjvm.so", ((0, 100),), ((0, 65536, 0), (65536, 131072, 2))),
        TracedFile("usr/lib/classes.jsa", ((0, 9),), ((0, 65536, 1),)),
        TracedFile("etc/hosts"),
    ]
    asked: list = []
    monkeypatch.setattr(harness.convert_cmd, "require_root", lambda *a: None)
    monkeypatch.setattr(harness.images.source, "check_source", lambda src: None)
    monkeypatch.setattr(harness.images.convert, "optimize_files", lambda *a, **k: traced)

    def convert_image(src, dest, options, **kwargs):
        asked.append(options)
        return ConvertReport(digest="sha256:" + "0" * 64)

    monkeypatch.setattr(harness.images.convert, "convert_image", convert_image)
    args = build_parser().parse_args(
        ["convert", "--optimize", "--cache-dir", str(tmp_path), "oci:/src", f"oci:{tmp_path}/o:x"]
    )
    assert args.func(args) == 0
    (options,) = asked
    assert options.prioritized_files == ("usr/lib/libjvm.so", "usr/lib/classes.jsa", "etc/hosts")
    assert options.read_order == (
        ("usr/lib/libjvm.so", ((0, 65536, 0), (65536, 131072, 2))),
        ("usr/lib/classes.jsa", ((0, 65536, 1),)),
    )
    assert options.read_ranges == (
        ("usr/lib/libjvm.so", ((0, 100),)),
        ("usr/lib/classes.jsa", ((0, 9),)),
    )
