"""The tags' resolutions the store keeps under ``--root`` across restarts
(:mod:`store.resolutions`)."""

from __future__ import annotations

import base64
import hashlib
import json
import os

from store.resolutions import Resolution, Resolutions

REF = "registry.example:5000/app:latest"


def _resolution(n: int) -> Resolution:
    manifest = b'{"schemaVersion":2,"n":%d}' % n
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    return Resolution(manifest, "application/vnd.oci.image.manifest.v1+json", digest, b"{}")


def test_kept_resolutions_read_back_most_recent_first(tmp_path):
    kept = Resolutions(tmp_path / "r", per_ref=2)
    for n in range(3):
        kept.save(REF, _resolution(n))
        path = kept._ref_dir(REF) / _resolution(n).digest[7:]
        os.utime(path, (1000 + n, 1000 + n))  # a clock that moved on between the saves
    assert kept.load(REF) == [_resolution(2), _resolution(1)]  # the oldest dropped
    assert kept.load("registry.example:5000/other:1") == []
    assert Resolutions(tmp_path / "r").load(REF) == [_resolution(2), _resolution(1)]
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o700


def test_a_reference_by_digest_is_not_kept(tmp_path):
    kept = Resolutions(tmp_path / "r")
    kept.save(f"registry.example:5000/app@{_resolution(0).digest}", _resolution(0))
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").iterdir()) == []


def test_a_file_whose_manifest_does_not_hash_to_its_name_is_left_out(tmp_path):
    kept = Resolutions(tmp_path / "r")
    kept.save(REF, _resolution(0))
    kept.save(REF, _resolution(1))
    path = kept._ref_dir(REF) / _resolution(0).digest[7:]
    record = json.loads(path.read_text())
    record["manifest"] = base64.b64encode(b'{"schemaVersion":2,"n":9}').decode()
    path.write_text(json.dumps(record))  # another manifest's bytes under this one's name
    (kept._ref_dir(REF) / ("0" * 64)).write_text("not json")
    assert kept.load(REF) == [_resolution(1)]


def test_the_least_recently_resolved_tags_go_first(tmp_path):
    kept = Resolutions(tmp_path / "r", refs=2)
    for n in range(3):
        kept.save(f"registry.example:5000/app{n}:1", _resolution(n))
        os.utime(kept._ref_dir(f"registry.example:5000/app{n}:1"), (1000 + n, 1000 + n))
    kept.save("registry.example:5000/app3:1", _resolution(3))
    assert [kept.load(f"registry.example:5000/app{n}:1") != [] for n in range(4)] == [
        False,
        False,
        True,
        True,
    ]
