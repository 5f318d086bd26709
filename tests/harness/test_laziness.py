"""The laziness verdict's pure logic on a graphroot laid out as podman 4.3 lays it out."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from harness.laziness import (
    LayerEvidence,
    Verdict,
    blobs_served_whole_to_runtime,
    fallback_reason,
    fetched_before_pull,
    storage_verdict,
    trouble_lines,
)

RUNTIME = "containers/5.23.1 (github.com/containers/image)"


def graphroot(tmp: Path, from_store: list[bool], mount: Path) -> Path:
    """Three layers (bottom first) of image ``reg/x:y``; a layer from the store links its
    ``diff`` into ``mount`` beside an ``additionallayer`` file, as the overlay driver does."""
    g = tmp / "graph"
    (g / "overlay-images").mkdir(parents=True)
    (g / "overlay-layers").mkdir()
    layers, parent = [], None
    for i, lazy in enumerate(from_store):
        lid, digest = f"{i}" * 64, f"sha256:{chr(97 + i) * 64}"
        layers.append({"id": lid, "parent": parent, "compressed-diff-digest": digest})
        d = g / "overlay" / lid
        d.mkdir(parents=True)
        if lazy:
            target = mount / "cmVm" / digest
            (d / "diff").symlink_to(target / "diff")
            (d / "additionallayer").write_text(str(target))
        else:
            (d / "diff").mkdir()
        parent = lid
    (g / "overlay-layers" / "layers.json").write_text(json.dumps(layers))
    image = {"id": "f" * 64, "names": ["reg/x:y"], "layer": parent}
    (g / "overlay-images" / "images.json").write_text(json.dumps([image]))
    return g


def access(digest: str, status: int, agent: str) -> SimpleNamespace:
    return SimpleNamespace(
        digest=digest, is_full_blob_get=status == 200, user_agent=agent, status=status
    )


def test_every_layer_linked_into_the_store_is_lazy(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    v = storage_verdict(graphroot(tmp_path, [True, True, True], mount), "reg/x:y", mount)
    assert (v.total, v.from_store, v.lazy) == (3, 3, True)
    assert [x.digest[-1] for x in v.layers] == ["a", "b", "c"]  # bottom first


def test_a_layer_pulled_by_the_runtime_is_a_fallback(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    v = storage_verdict(graphroot(tmp_path, [True, False, True], mount), "reg/x:y", mount)
    assert (v.total, v.from_store, v.lazy) == (3, 2, False)
    served = blobs_served_whole_to_runtime(
        [
            access("sha256:" + "b" * 64, 200, RUNTIME),
            access("sha256:" + "a" * 64, 206, RUNTIME),  # ranged: not whole
            access("sha256:" + "c" * 64, 200, "lazybench-registry/0.1"),  # the store's
        ]
    )
    v = v.with_registry(served)
    assert v.served_whole == 1
    reason = fallback_reason(v, [("store log", "mounted\nlookup x: EIO\n"), ("podman", "")])
    assert reason.startswith("1 of 3 layers not from the store (sha256:bbbbbbbbbbbb)")
    assert "the registry served 1 whole to the runtime" in reason
    assert reason.endswith("store log: lookup x: EIO")


def test_another_store_mount_does_not_count(tmp_path: Path) -> None:
    g = graphroot(tmp_path, [True, True], tmp_path / "other")
    v = storage_verdict(g, "reg/x:y", tmp_path / "mnt")
    assert v.from_store == 0 and not v.lazy
    assert storage_verdict(g, "reg/x:y", None).from_store == 0


def test_unreadable_storage_is_a_problem_not_a_verdict(tmp_path: Path) -> None:
    v = storage_verdict(tmp_path, "reg/x:y", tmp_path / "mnt")
    assert v.problem and "cannot read the runtime's storage" in v.problem and not v.lazy


def test_trouble_lines_keep_the_last_errors() -> None:
    log = "ok\nERROR one\nfine\nwarning two\nTraceback three\nerror four\n"
    assert trouble_lines(log) == ["warning two", "Traceback three", "error four"]


def test_a_layer_the_store_declines_is_named_once_with_the_stores_reason() -> None:
    """An image listing one layer several times (identical empty layers are common in
    images built by `docker build`): the store declines it on purpose, logging at info level
    with `time` in each JSON line. The reason shows the digest once and the store's words."""
    d = "sha256:" + "c" * 64
    v = Verdict(
        [LayerEvidence("l0", "sha256:" + "a" * 64, True)]
        + [LayerEvidence(f"l{i}", d, False, True) for i in range(1, 5)]
    )
    line = (
        '{{"time": {t}, "level": "info", "logger": "store.fs", "msg": "not served (normal pull'
        " fallback): r: layer " + d + " is listed 4 times; overlayfs cannot mount one "
        'directory as several lower layers, so it is pulled normally"}}'
    )
    log = "\n".join(line.format(t=1000 + i) for i in range(4))
    reason = fallback_reason(v, [("store log", log)])
    assert reason.startswith("4 of 5 layers not from the store (sha256:cccccccccccc ×4)"), reason
    assert reason.count("is listed 4 times") == 1, reason
    assert "store log: info: not served (normal pull fallback)" in reason, reason


def test_an_image_without_layers_is_not_said_to_have_every_layer_from_the_store() -> None:
    """A zero-layer image (`FROM scratch` with only a CMD, as `docker build` makes it) is no
    lazy pull; its fall-back once read "every layer from the store"."""
    v = Verdict([])
    assert not v.lazy
    assert v.describe() == "the image has no layers, so none came from the store"


def test_a_layer_recorded_without_its_digest_is_matched_by_its_place_in_the_image() -> None:
    """podman >= 5.1 takes a store's layer by TOC digest and may record no compressed digest
    for it: a whole GET of its blob by the runtime was matched against nothing, so the
    verdict stayed lazy. The image's own layer list says which blob it is."""
    pushed = [f"sha256:{c * 64}" for c in "abc"]
    storage = Verdict([LayerEvidence(f"{i}" * 64, "", True) for i in range(3)])
    assert storage.with_registry({pushed[1]}).lazy  # by digest alone: nothing matched
    v = storage.with_registry({pushed[1]}, pushed)
    assert (v.lazy, v.served_whole) == (False, 1)
    assert [x.served_whole for x in v.layers] == [False, True, False]
    # A storage that lists another number of layers than the manifest: places mean nothing.
    assert storage.with_registry({pushed[1]}, pushed[:2]).served_whole == 0


def test_blobs_served_before_the_pull_are_named_whoever_asked() -> None:
    from harness.registry_server import parse_access_line

    def line(method: str, path: str, status: int, size: int, agent: str) -> object:
        head = f'127.0.0.1 - - [5/Dec/2026:10:00:00 +0000] "{method} {path} HTTP/1.1"'
        return parse_access_line(f'{head} {status} {size} "" "{agent}"')

    ping = line("GET", "/v2/", 200, 2, "stargz-store")
    catalog = line("GET", "/v2/_catalog", 200, 40, "prefetcher/1")
    assert fetched_before_pull([]) is None
    assert fetched_before_pull([ping, catalog]) is None  # no blob: nothing fetched
    blob = line("GET", "/v2/x/blobs/sha256:ab", 200, 5000, "prefetcher/1")
    ranged = line("GET", "/v2/x/blobs/sha256:cd", 206, 100, "stargz-store")
    why = fetched_before_pull([ping, catalog, blob, ranged])
    assert why is not None and "5100 bytes in 2 blob requests" in why
    assert "prefetcher/1, stargz-store" in why


def test_a_blob_download_begun_before_the_pull_and_logged_after_it_is_named() -> None:
    """The registry logs a request when it ends, stamped with the second it began: a store
    that opened a whole-blob GET before it mounted and left its last bytes unread until the
    pull had begun had its line logged after the pull's mark, so the log before the mark
    showed nothing and the measurement counted lazy, 61.7 MB crossing the link untimed and
    uncounted (redis estargz-noopt, loopback). Its time is before the pull's start."""
    from harness.laziness import request_started, started_before
    from harness.registry_server import parse_access_line

    def line(when: str, path: str, status: int, size: int, agent: str) -> object:
        head = f'127.0.0.1 - - [{when}] "GET {path} HTTP/1.1"'
        return parse_access_line(f'{head} {status} {size} "" "{agent}"')

    pull_wall = 1796572153.4  # 06/Dec/2026:15:49:13.4 UTC
    held = line("06/Dec/2026:15:49:12 +0000", "/v2/r/blobs/sha256:ab", 200, 61677167, "evil/1")
    same_second = line("06/Dec/2026:15:49:13 +0000", "/v2/r/blobs/sha256:cd", 206, 9, "store")
    runtime = line("06/Dec/2026:15:49:14 +0000", "/v2/r/blobs/sha256:ef", 206, 9, "store")
    assert request_started(held) == 1796572152
    assert request_started(line("06/Dec/2026:17:49:12 +0200", "/v2/", 200, 2, "x")) == 1796572152
    assert request_started(SimpleNamespace(time="not a time")) is None
    assert started_before([held, same_second, runtime], pull_wall) == [held]
    why = fetched_before_pull(started_before([held, same_second, runtime], pull_wall))
    assert why is not None and "61677167 bytes in 1 blob requests" in why and "evil/1" in why


def test_the_report_does_not_call_unchecked_lazy_records_lazy() -> None:
    """A lazy record without a verdict (schema 1, or one stripped to look so) is counted as
    "not checked" in the table; the report's Laziness section said "Every lazy measurement
    took all its layers from the store" beside "0 with the runtime's storage read"."""
    from harness.records import Record
    from harness.report import laziness_lines

    unchecked = Record(0, "redis", "estargz-noopt", total_s=1.0, store="default")
    checked = Record(
        1,
        "redis",
        "estargz-noopt",
        total_s=1.0,
        store="default",
        layers_total=3,
        layers_from_store=3,
        layers_served_whole=0,
    )
    text = "\n".join(laziness_lines([unchecked, checked]))
    assert "Every lazy measurement took all its layers" not in text, text
    assert "1 counted without a verdict" in text and "sample 0 redis/estargz-noopt" in text
    assert "Every lazy measurement took all its layers" in "\n".join(laziness_lines([checked]))
