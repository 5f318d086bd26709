"""Building and caching images: the tiny file image and a real overlayfs chroot layer."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tarfile
import time

import pytest

from harness.images import (
    RECIPES,
    TINY_OUTPUT,
    ImageBuildError,
    LayerSpec,
    build_layers,
    cached_image,
    find_recipe,
    recipe_hash,
    recipes,
    tiny_image,
    tiny_recipe,
)
from harness.images.build import _chroot_layer, _drop, _layer_tar, _shared_layer
from harness.images.layertar import tar_names, tree_to_tar


def test_tiny_image_layers_and_cache(image_cache, tiny):
    assert [layer.comment for layer in tiny.layers] == [
        "busybox and skeleton",
        "data",
        "whiteout and opaque dir",
    ]
    assert tiny.dir == image_cache / "images" / recipe_hash(tiny_recipe())
    assert tiny.config["rootfs"]["diff_ids"] == [x.diff_id for x in tiny.layers]
    assert tiny.config["config"]["Cmd"] == ["/bin/cat", "/data/hello.txt"]
    with tarfile.open(tiny.layers[2].path) as tar:
        names = tar.getnames()
    assert "data/.wh.gone.txt" in names and "data/opq/.wh..wh..opq" in names
    # a second build is the cached one, untouched
    mtime = tiny.layers[0].path.stat().st_mtime_ns
    start = time.monotonic()
    again = tiny_image(image_cache)
    assert again == tiny and time.monotonic() - start < 0.5
    assert tiny.layers[0].path.stat().st_mtime_ns == mtime
    assert not [p for p in (image_cache / "images").iterdir() if p.name.startswith(".")]


def test_incomplete_cache_entry_is_rebuilt(tmp_path):
    built = tiny_image(tmp_path, big_file_size=1000)
    built.layers[1].path.unlink()
    assert cached_image(built.recipe, tmp_path) is None
    assert tiny_image(tmp_path, big_file_size=1000).layers[1].path.is_file()


def test_recipe_hash_tracks_the_image_not_the_run():
    r = RECIPES["python"]
    assert recipe_hash(r) == recipe_hash(dataclasses.replace(r, timeout=5, ready_line="x"))
    assert recipe_hash(r) != recipe_hash(dataclasses.replace(r, cmd=("python3", "-V")))
    extra = (*r.layers, LayerSpec("more", packages=("less",)))
    assert recipe_hash(r) != recipe_hash(dataclasses.replace(r, layers=extra))
    assert tiny_recipe().expected_output == TINY_OUTPUT


def test_find_recipe():
    assert find_recipe("tiny").name == "tiny"
    assert find_recipe("gcc").stdin
    with pytest.raises(KeyError, match="known: python"):
        find_recipe("nope")


def test_every_workload_says_how_it_is_judged():
    for r in RECIPES.values():
        assert r.base == "debian" and len(r.layers) >= 2, r.name
        assert r.ready_line or r.expected_output, r.name
        assert r.timeout > 0


def test_chroot_layer_is_the_overlay_diff(tmp_path):
    """A RUN-style layer over a busybox lower tree: the upperdir's deletions become .wh."""
    lower = tmp_path / "lower"
    for d in ("bin", "usr/bin", "proc", "dev", "tmp", "etc", "data/opq", "var/log/app"):
        (lower / d).mkdir(parents=True)
    shutil.copyfile("/bin/busybox", lower / "bin" / "busybox")
    (lower / "bin" / "busybox").chmod(0o755)
    for applet in ("sh", "rm", "mkdir", "echo"):
        os.symlink("busybox", lower / "bin" / applet)
    os.symlink("/bin/busybox", lower / "usr" / "bin" / "env")
    (lower / "data" / "gone.txt").write_text("bye")
    (lower / "data" / "opq" / "old.txt").write_text("old")
    (lower / "etc" / "resolv.conf").write_text("nameserver 192.0.2.1\n")
    lower.chmod(0o751)
    spec = LayerSpec(
        "edit",
        run=(
            "rm /data/gone.txt && rm -rf /data/opq && mkdir /data/opq",
            "echo new > /data/opq/new.txt && echo log > /var/log/app/x.log",
            "echo t > /tmp/scratch",
        ),
    )
    upper, work = tmp_path / "upper", tmp_path / "work"
    work.mkdir()
    _chroot_layer(tiny_recipe(), spec, [lower], upper, work)
    out = tmp_path / "layer.tar"
    tree_to_tar(upper, out, exclude=_drop, overlay_upper=True)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert {"data/.wh.gone.txt", "data/opq/.wh..wh..opq", "data/opq/new.txt"} <= names
    with tarfile.open(out) as tar:  # the upperdir root took the lower root's mode: "./" first
        root = tar.next()
    assert (root.name, root.mode) == (".", 0o751)
    assert "var/log/app" in names and "var/log/app/x.log" not in names  # dirs kept, logs not
    assert not {"etc/resolv.conf", "usr/sbin/policy-rc.d", "tmp/scratch"} & names
    assert not any(n.startswith(("proc/", "dev/")) for n in names)
    # the mounts lived in a private namespace: nothing is left mounted
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()


def test_build_refuses_commands_without_a_base(tmp_path):
    bad = dataclasses.replace(
        tiny_recipe(), name="bad", layers=(LayerSpec("mixed", run=("true",), files=()),)
    )
    with pytest.raises(ImageBuildError, match="bad: layer 'mixed' runs commands but has no base"):
        build_layers(bad, tmp_path)
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".build")]


def test_layer_format_is_part_of_the_cache_key(monkeypatch):
    """Images built before a tar format change are not reused: their hash names the format."""
    before = recipe_hash(tiny_recipe())
    monkeypatch.setattr(recipes, "LAYER_FORMAT", recipes.LAYER_FORMAT + 1)
    assert recipe_hash(tiny_recipe()) != before


def test_new_layer_format_is_written_from_the_cached_tree(tmp_path):
    """A shared layer made before tar formats were versioned (``layer.json``, ``layer.tar``)
    keeps its tree; the current format's tar is written from it without running apt again."""
    shared = tmp_path / "layers" / "k"
    (shared / "tree" / "etc").mkdir(parents=True)
    (shared / "tree" / "etc" / "x").write_text("x")
    (shared / "layer.json").write_text('{"diff_id": "sha256:old", "size": 3}')
    (shared / "layer.tar").write_bytes(b"old")

    def rebuild(work):
        raise AssertionError("the cached tree was built again")

    assert _shared_layer(tmp_path, "k", rebuild) == shared
    tar = _layer_tar(shared, shared / "tree", overlay_upper=True)
    assert tar.path == shared / f"layer.f{recipes.LAYER_FORMAT}.tar"
    assert tar_names(tar.path) == ["", "etc", "etc/x"]
    assert tar.size == tar.path.stat().st_size
    assert (shared / "layer.tar").read_bytes() == b"old"  # older images keep their bytes
    assert _layer_tar(shared, shared / "tree", overlay_upper=True) == tar  # written once
    assert not [p for p in shared.iterdir() if p.name.startswith(".")]
