"""zstd:chunked images from tars with zero padding after their end-of-archive marker.

containers/storage 1.43's compressor (skopeo 1.9.3, podman 4.3) fails such a layer with "short
write" when the padding reaches past the write that carried the marker (tomcat's JDK layer);
the push cuts the tars after the marker (:func:`harness.images.push.tar_archive_end`).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.images import TINY_OUTPUT, PushError, oci_layout, push_image
from harness.images.build import BuiltImage, BuiltLayer
from harness.images.push import MEDIA_ZSTD, tar_archive_end
from harness.podman import PodmanEnv
from harness.registry_server import RegistryServer


def _tar(members: list[tuple[str, bytes]]) -> tuple[bytes, int]:
    """A tar of ``members`` as tarfile writes it (record-padded), and where its marker ends."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        marker_end = buf.tell() + 1024  # close() writes two zero blocks, then pads the record
    return buf.getvalue(), marker_end


@settings(max_examples=40, deadline=None)
@given(
    members=st.lists(
        st.tuples(
            st.text("abcxyz/é", min_size=1, max_size=120).filter(lambda s: s.strip("/")),
            st.binary(max_size=3000),
        ),
        max_size=5,
    ),
    extra_blocks=st.integers(0, 40),
)
def test_archive_end_is_just_past_the_marker(tmp_path_factory, members, extra_blocks):
    data, marker_end = _tar(members)
    data += bytes(512 * extra_blocks)
    path = tmp_path_factory.mktemp("t") / "l.tar"
    path.write_bytes(data)
    assert tar_archive_end(path) == marker_end
    with tarfile.open(fileobj=io.BytesIO(data[:marker_end])) as cut, tarfile.open(path) as whole:
        assert [m.name for m in cut] == [m.name for m in whole]


def test_archive_end_of_an_unpadded_tar_is_its_size(tmp_path):
    data, marker_end = _tar([("a", b"x" * 700)])
    path = tmp_path / "l.tar"
    path.write_bytes(data[:marker_end])
    assert tar_archive_end(path) == path.stat().st_size == marker_end


def test_data_after_the_marker_or_no_tar_is_an_error(tmp_path):
    data, marker_end = _tar([("a", b"x")])
    path = tmp_path / "l.tar"
    path.write_bytes(data + b"junk")
    where = f"non-zero bytes after the end of the archive at {marker_end - 1024}"
    with pytest.raises(PushError, match=where):
        tar_archive_end(path)
    path.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(PushError, match="not a readable tar"):
        tar_archive_end(path)


def _padded(tiny: BuiltImage, root: Path, pad: int) -> BuiltImage:
    """``tiny`` with ``pad`` zero bytes appended to each layer tar (a valid tar still)."""
    directory = root / "images" / f"padded-{pad}"
    (directory / "layers").mkdir(parents=True, exist_ok=True)
    layers = []
    for i, layer in enumerate(tiny.layers):
        path = directory / "layers" / f"{i}.tar"
        data = layer.path.read_bytes() + bytes(pad)
        path.write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        layers.append(BuiltLayer(path, digest, len(data), layer.comment))
    config = json.loads(json.dumps(tiny.config))
    config["rootfs"]["diff_ids"] = [x.diff_id for x in layers]
    return replace(tiny, dir=directory, hash=f"padded-{pad}", layers=tuple(layers), config=config)


def _zstd_layers(layout: Path) -> list[tuple[Path, str]]:
    """(blob path, config diff ID) of each layer of an OCI layout."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    assert all(x["mediaType"] == MEDIA_ZSTD for x in manifest["layers"])
    pairs = zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True)
    return [(blobs / x["digest"][7:], diff_id) for x, diff_id in pairs]


@pytest.mark.e2e
def test_padded_layers_push_and_partial_pull(tiny, tmp_path):
    """3 MiB of padding after the marker made skopeo fail with "short write" every time."""
    padded = _padded(tiny, tmp_path, 3 << 20)
    layout = oci_layout(padded, "zstd-chunked")
    for blob, diff_id in _zstd_layers(layout):
        plain = subprocess.run(["zstd", "-dc", blob], capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(plain).hexdigest() == diff_id
    assert not list(layout.parent.glob(".zstd-chunked-source-*"))  # the scratch layout is gone
    with RegistryServer() as reg:
        pushed = push_image(padded, reg.host, "t/padded", "zstd", "zstd-chunked")
        mark = reg.log_mark()
        with PodmanEnv(insecure_registries=[reg.host], partial_pulls=True) as env:
            log = env.podman("--log-level", "debug", "pull", pushed.ref, timeout=120).stderr
            assert log.count("Retrieved partial blob") == len(pushed.layers), log[-3000:]
            assert "Failed to retrieve partial blob" not in log
            assert env.run(pushed.ref, timeout=120).stdout.strip() == TINY_OUTPUT
        layer_digests = {x.digest for x in pushed.layers}
        gets = [r for r in reg.access_log_since(mark) if r.is_blob_get]
        assert {r.digest for r in gets if r.status == 206} == layer_digests
        assert not [r for r in gets if r.digest in layer_digests and r.status == 200]
