"""Runtime nodes: recipes, the cache, versions, and the persistence verdict (no building)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness import runtimes
from harness.measure import persistence_verdict
from harness.podman import LOST_LAYERS_BUG, Persistence, PodmanEnv
from harness.records import Record
from harness.report import persistence_lines
from harness.stale import OWNER_FILE


def test_recipe_hash_is_stable_and_differs_per_node() -> None:
    assert runtimes.recipe_hash("trixie") == runtimes.recipe_hash("trixie")
    assert runtimes.recipe_hash("trixie") != runtimes.recipe_hash("sid")
    with pytest.raises(runtimes.NodeError, match="unknown node 'bookworm'"):
        runtimes.recipe_hash("bookworm")


def test_mirror_from_apt_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAZYBENCH_DEBIAN_MIRROR", raising=False)
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: x-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n"
    )
    oneline = tmp_path / "sources.list"
    oneline.write_text("# comment\ndeb [arch=amd64] http://other.example/debian bookworm main\n")
    assert runtimes.debian_mirror([deb822]) == "http://mirror.example/debian"
    assert runtimes.debian_mirror([tmp_path / "missing", oneline]) == "http://other.example/debian"
    assert runtimes.debian_mirror([]) == runtimes.DEFAULT_MIRROR
    monkeypatch.setenv("LAZYBENCH_DEBIAN_MIRROR", "http://env.example/debian")
    assert runtimes.debian_mirror([deb822]) == "http://env.example/debian"


def test_upstream_versions() -> None:
    assert runtimes._upstream("1.43.0+ds1-8") == "1.43.0"
    assert runtimes._upstream("5.8.6+ds1-3") == "5.8.6"
    assert runtimes._upstream("1:2.1~rc1-2") == "2.1"
    assert runtimes.version_tuple("1.57.2") == (1, 57, 2) < (1, 58)
    assert runtimes.version_tuple("") == (0,)


def _fake_node(cache: Path, name: str, directory: str | None = None) -> Path:
    d = cache / "nodes" / (directory or f"{name}-{runtimes.recipe_hash(name)}")
    (d / "root").mkdir(parents=True)
    (d / "versions.json").write_text(
        json.dumps({"node": name, "podman": "5.4.2", "containers_storage": "1.57.2"})
    )
    return d


def test_cache_ls_and_prune(tmp_path: Path) -> None:
    current = _fake_node(tmp_path, "trixie")
    old = _fake_node(tmp_path, "sid", "sid-0000000000000000")
    node = runtimes.cached_node("trixie", tmp_path)
    assert node is not None and node.root == current / "root"
    assert node.storage_version == "1.57.2"
    assert runtimes.cached_node("sid", tmp_path) is None  # only an old recipe's build
    listed = {e["path"]: e["current"] for e in runtimes.list_nodes(tmp_path)}
    assert listed == {str(current / "root"): True, str(old / "root"): False}
    assert runtimes.prune_nodes(tmp_path) == [old]
    assert current.exists() and not old.exists()
    assert runtimes.prune_nodes(tmp_path, everything=True) == [current]
    assert runtimes.list_nodes(tmp_path) == []


def _mount_tmpfs(path: Path) -> None:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True)
    (path / "inside").write_text("a file of the mounted filesystem\n")


@pytest.fixture
def unmounted_after(tmp_path: Path) -> Any:
    """Whatever a failing test left mounted below ``tmp_path`` is unmounted afterwards."""
    from harness.podman import unmount_below

    yield
    unmount_below(tmp_path)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, runtimes.NodeError])
def test_a_build_stopped_part_way_leaves_no_mount_and_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unmounted_after: None, interrupt: type
) -> None:
    """mmdebstrap killed part way (Ctrl-C, the build's watchdog) leaves proc, sys and dev
    mounted in the root it was making: they are unmounted, and the temporary directory
    removed, not removed through (its files stayed, and so did the mounts)."""
    from harness.podman import mounts_below

    def killed_mmdebstrap(name: str, tmp: Path, *args: object) -> runtimes.Node:
        for d in ("proc", "sys", "dev/pts"):
            _mount_tmpfs(tmp / "root" / d)
        raise interrupt("mmdebstrap stopped")

    monkeypatch.setattr(runtimes, "_build", killed_mmdebstrap)
    monkeypatch.setattr(runtimes.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(interrupt, match="mmdebstrap stopped"):
        runtimes.build_node("trixie", tmp_path)
    assert mounts_below(tmp_path) == []
    assert list((tmp_path / "nodes").glob(".tmp-*")) == []


def test_a_second_build_says_it_waits_and_waits_a_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another build of the node holding its lock: the second waited on ``flock`` without a
    word and without a bound (only the first one's watchdog ended it)."""
    import fcntl

    monkeypatch.setattr(runtimes.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(runtimes, "BUILD_LOCK_WAIT", 1.0)
    final = runtimes.node_dir("trixie", tmp_path)
    lock_path = final.with_name(f".{final.name}.lock")
    lock_path.parent.mkdir(parents=True)
    lines: list[str] = []
    with open(lock_path, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(runtimes.NodeError, match=r"another build of node trixie still holds"):
            runtimes.build_node("trixie", tmp_path, progress=lines.append)
    assert lines == [f"waiting for another build of node trixie to finish (it holds {lock_path})"]


def test_prune_unmounts_a_dead_build_s_directory_before_removing_it(
    tmp_path: Path, unmounted_after: None
) -> None:
    """A build killed with its lazybench (no process holds its lock) left its temporary
    directory with mmdebstrap's mounts: prune unmounts them, then removes it."""
    from harness.podman import mounts_below

    stale = tmp_path / "nodes" / f".tmp-trixie-{runtimes.recipe_hash('trixie')}-x1y2z3"
    _mount_tmpfs(stale / "root" / "proc")
    assert runtimes.prune_nodes(tmp_path) == [stale]
    assert mounts_below(tmp_path) == [] and not stale.exists()


def test_host_versions_name_podman_and_containers_storage() -> None:
    v = runtimes.runtime_versions("host")
    assert v["node"] == "host"
    if v["podman"]:  # podman installed from Debian: Built-Using names containers/storage
        assert runtimes.version_tuple(v["containers_storage"]) >= (1, 0)


def test_persistence_verdict_names_the_containers_storage_bug() -> None:
    assert persistence_verdict(Persistence(True, True), "1.64.0") == (True, None)
    lost = Persistence(False, False, "Error: layer not known")
    ok, why = persistence_verdict(lost, "1.64.0")
    assert not ok and LOST_LAYERS_BUG in why and "image not listed" in why
    ok, why = persistence_verdict(Persistence(True, False, "Error: layer not known"), "1.43.0")
    assert not ok and "layers not known" in why and "layer not known" in why
    rec = Record(0, "w", "estargz", podman_version="5.8.6", storage_version="1.64.0")
    rec.persisted, rec.persistence = False, why
    text = "\n".join(persistence_lines([rec, Record(0, "w", "legacy")]))
    assert "1 of 1 lazy pulls" in text and "5.8.6" in text
    assert persistence_lines([Record(0, "w", "legacy")]) == []


def test_a_failed_partial_pull_run_names_the_containers_storage_1_43_bug() -> None:
    from harness.measure import partial_pull_failure
    from harness.podman import PARTIAL_PULL_143_BUG

    failure = "run: the workload exited (126) without printing its ready line 'ok'"
    assert partial_pull_failure(failure, "1.43.0") == f"{failure} (maybe {PARTIAL_PULL_143_BUG})"
    assert partial_pull_failure(failure, "1.57.2") == failure
    assert partial_pull_failure(failure, "") == failure  # unknown: nothing guessed


def test_partial_pulls_are_written_explicitly(tmp_path: Path) -> None:
    with PodmanEnv(tmp_path / "p", partial_pulls=True, keep_blob_info_cache=True) as env:
        conf = (env.workdir / "storage.conf").read_text()
        assert 'pull_options = {enable_partial_images = "true"}' in conf
        assert env.storage_options == {"pull_options": {"enable_partial_images": "true"}}


@pytest.mark.e2e
def test_entering_a_node_leaves_no_mount_behind_even_on_error(tmp_path: Path) -> None:
    import shutil

    from harness.podman import mounts_below

    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (ci/install-system-deps)")
    node = runtimes.build_node("trixie")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "f").write_text("from the host\n")
    with pytest.raises(RuntimeError, match="boom"), runtimes.enter_node(node) as entered:
        base = entered.view.parent
        entered.bind(shared)
        assert entered.host_path(shared / "f").read_text() == "from the host\n"
        assert (entered.view / "proc" / "self").exists()
        assert len(mounts_below(base)) > 4  # overlay, proc, sys…, dev…, run, the bind
        raise RuntimeError("boom")
    assert mounts_below(base) == [] and not base.exists()
    assert (shared / "f").read_text() == "from the host\n"  # never removed through a mount


@pytest.mark.e2e
def test_a_view_left_by_a_killed_process_is_cleaned(tmp_path: Path) -> None:
    import shutil

    from harness.podman import mounts_below

    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (ci/install-system-deps)")
    node = runtimes.build_node("trixie")
    cm = runtimes.enter_node(node, tmp_path)
    entered = cm.__enter__()  # and never left, as after a SIGKILL
    base = entered.view.parent
    assert mounts_below(base)
    (base / OWNER_FILE).write_text("999999999 1\n")  # a pid that does not run
    assert runtimes.clean_stale_views(tmp_path) == [base]
    assert mounts_below(base) == [] and not base.exists()
    with contextlib.suppress(Exception):
        cm.__exit__(None, None, None)


@pytest.mark.e2e
def test_podman_5_partial_pull_of_a_zstd_chunked_image_its_node_wrote(tmp_path: Path) -> None:
    """containers/storage 1.57 has partial pulls off by default and does not recognize the
    host's (c/storage 1.43) zstd:chunked annotations: the node writes the image, the env
    switches partial pulls on, and podman fetches ranges, never a whole layer."""
    import shutil

    from harness.images import build_layers, find_recipe, push_image
    from harness.registry_server import RegistryServer

    if not all(shutil.which(t) for t in ("mmdebstrap", "docker-registry", "skopeo")):
        pytest.skip("needs mmdebstrap, docker-registry and skopeo")
    node = runtimes.build_node("trixie")
    with RegistryServer(storage_dir=tmp_path / "reg") as reg:
        built = build_layers(find_recipe("tiny"), None)
        pushed = push_image(built, reg.host, "tiny", "z", "zstd-chunked", node=node)
        assert all(layer.toc_digest for layer in pushed.layers)
        mark = reg.log_mark()
        with PodmanEnv(
            tmp_path / "p", insecure_registries=[reg.host], partial_pulls=True, node=node
        ) as env:
            env.pull(f"{reg.host}/tiny:z", timeout=120)
        layers = {layer.digest for layer in pushed.layers}
        served = [r for r in reg.access_log_since(mark) if r.digest in layers]
        assert served and all(r.status == 206 for r in served), served


def _served(*lines: tuple[str, str, int, str]) -> list[Any]:
    """Access records of (method, path, status, user agent)."""
    from harness.registry_server import parse_access_line

    out = []
    for method, path, status, agent in lines:
        line = f'127.0.0.1 - - [5/Dec/2026:10:00:00 +0000] "{method} {path} HTTP/1.1" {status} 9'
        out.append(parse_access_line(f'{line} "" "{agent}"'))
    return out


PODMAN_UA = "containers/5.39.2 (github.com/containers/image)"
STORE_UA = "stargz-store/0.1"
MANIFEST = ("GET", "/v2/tiny/manifests/z", 200, PODMAN_UA)


def test_lost_layer_records_leave_the_registry_as_the_evidence() -> None:
    from harness.laziness import Verdict
    from harness.measure import lost_records_verdict

    unreadable = Verdict(problem="cannot read the runtime's storage: layer not known")
    layers = ["sha256:a", "sha256:b"]
    config = ("GET", "/v2/tiny/blobs/sha256:config", 200, PODMAN_UA)
    by_store = [("GET", f"/v2/tiny/blobs/{d}", 206, STORE_UA) for d in layers]
    lazy = lost_records_verdict(layers, _served(MANIFEST, config, *by_store), unreadable)
    assert lazy.lazy and lazy.total == 2 and lazy.from_store == 2
    whole_b = ("GET", "/v2/tiny/blobs/sha256:b", 200, PODMAN_UA)
    whole = lost_records_verdict(layers, _served(MANIFEST, whole_b), unreadable)
    assert not whole.lazy and whole.served_whole == 1 and whole.from_store == 1
    assert lost_records_verdict([], [], unreadable) is unreadable


def test_lost_layer_records_with_no_runtime_in_the_log_or_a_partial_pull_are_not_lazy() -> None:
    """With the runtime's records lost, the registry's log is the only evidence, and it is
    evidence by absence: a log that is missing (read as no records) or shows only the store
    said every layer came from the store; a layer the runtime fetched in ranges (a partial
    pull, 206 only) was counted as the store's."""
    from harness.laziness import Verdict
    from harness.measure import lost_records_verdict

    unreadable = Verdict(problem="cannot read the runtime's storage: layer not known")
    layers = ["sha256:a", "sha256:b"]
    for served in ([], _served(("GET", "/v2/tiny/blobs/sha256:a", 206, STORE_UA))):
        unknown = lost_records_verdict(layers, served, unreadable)
        assert not unknown.lazy and unknown.problem is not None
        assert "no manifest served to the runtime" in unknown.problem
    ranges = _served(MANIFEST, ("GET", "/v2/tiny/blobs/sha256:b", 206, PODMAN_UA))
    partial = lost_records_verdict(layers, ranges, unreadable)
    assert not partial.lazy and partial.from_store == 1 and partial.served_whole == 0


# -- damaged nodes, dead builds ----------------------------------------------------------------


# A Debian root with one package, podman, whose dpkg database knows its one file.
FAKE_ROOT = r"""
mkdir -p "$root/usr/bin" "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
printf '#!/bin/sh\necho podman version 5.4.2\n' > "$root/usr/bin/podman"
status="$root/var/lib/dpkg/status"
printf 'Package: podman\nStatus: install ok installed\nPriority: optional\n' > "$status"
printf 'Section: admin\nMaintainer: x <x@example.org>\nArchitecture: amd64\n' >> "$status"
printf 'Version: 5.4.2+ds1-1\nDescription: fake\n\n' >> "$status"
printf '/.\n/usr\n/usr/bin\n/usr/bin/podman\n' > "$root/var/lib/dpkg/info/podman.list"
sum=$(md5sum < "$root/usr/bin/podman" | cut -d' ' -f1)
echo "$sum  usr/bin/podman" > "$root/var/lib/dpkg/info/podman.md5sums"
"""


def _fake_mmdebstrap(bin_dir: Path, body: str = "") -> Path:
    """An ``mmdebstrap`` in ``bin_dir`` that makes a root with one dpkg-installed file,
    ``/usr/bin/podman`` (so ``dpkg --verify`` has something to check), after ``body``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "mmdebstrap"
    script.write_text(
        "#!/bin/sh\nset -e\n"
        "for a; do root=$prev; prev=$a; done  # the root is the second-to-last argument\n"
        f"{body}\necho 'I: a fake build' >&2\n{FAKE_ROOT}"
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def fake_mmdebstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake ``mmdebstrap`` first on PATH; returns its directory."""
    import shutil

    if shutil.which("dpkg") is None:
        pytest.skip("needs dpkg")
    bin_dir = tmp_path / "bin"
    _fake_mmdebstrap(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def test_a_node_whose_files_were_damaged_is_built_again(
    tmp_path: Path, fake_mmdebstrap: Path
) -> None:
    """A cached node with a file truncated or removed (dpkg --verify) is not handed out (its
    podman would fail with "chroot: failed to run command 'podman'"): it is built again, and
    the progress says why."""
    cache = tmp_path / "cache"
    node = runtimes.build_node("trixie", cache)
    podman = node.root / "usr" / "bin" / "podman"
    intact = podman.read_bytes()
    for damage in (lambda: podman.write_bytes(intact[:5]), podman.unlink):
        damage()
        lines: list[str] = []
        again = runtimes.build_node("trixie", cache, progress=lines.append)
        assert again.directory == node.directory and podman.read_bytes() == intact
        said = " ".join(lines)
        assert "damaged" in said and "/usr/bin/podman" in said and "building it again" in said


def test_a_node_whose_versions_file_is_unreadable_is_built_again(
    tmp_path: Path, fake_mmdebstrap: Path
) -> None:
    """A node directory whose versions.json is cut short is no cached node, and it made every
    later build fail at its end ("cannot move the built node into …: Directory not empty"),
    with nothing that removes it (prune keeps current-recipe builds)."""
    cache = tmp_path / "cache"
    node = runtimes.build_node("trixie", cache)
    (node.directory / "versions.json").write_text('{"node": "trix')
    again = runtimes.build_node("trixie", cache)
    assert again.directory == node.directory and again.versions["node"] == "trixie"
    left = [p.name for p in (cache / "nodes").iterdir() if not p.name.endswith(".lock")]
    assert left == [node.directory.name]


def test_a_damaged_node_in_use_is_named_with_how_to_rebuild_it(
    tmp_path: Path, fake_mmdebstrap: Path
) -> None:
    cache = tmp_path / "cache"
    node = runtimes.build_node("trixie", cache)
    (node.root / "usr" / "bin" / "podman").unlink()
    in_use = runtimes._lock(node.directory / ".in-use", shared=True)  # as enter_node holds it
    try:
        with pytest.raises(runtimes.NodeError) as err:
            runtimes.build_node("trixie", cache)
    finally:
        in_use.close()
    message = str(err.value)
    assert "missing /usr/bin/podman" in message and "lazybench runtimes build trixie" in message
    assert (node.root / "var").exists()  # never removed under a process that entered it


def _dead_build(cache: Path) -> tuple[Path, subprocess.Popen]:
    """What a build killed with its lazybench leaves: the temporary directory with
    mmdebstrap's mounts, and a process still working in it (in a session of its own)."""
    stale = cache / "nodes" / f".tmp-trixie-{runtimes.recipe_hash('trixie')}-x1y2z3"
    _mount_tmpfs(stale / "root" / "proc")
    worker = subprocess.Popen(["sleep", "300"], cwd=stale / "root" / "proc", start_new_session=True)
    return stale, worker


@pytest.mark.parametrize("by", ["cleanup", "the next build"])
def test_a_build_killed_with_its_lazybench_is_removed(
    tmp_path: Path, fake_mmdebstrap: Path, unmounted_after: None, by: str
) -> None:
    """A SIGKILLed `lazybench runtimes build` leaves mmdebstrap running (its own session) and
    its directory with proc, sys and dev mounted in the cache: `lazybench cleanup` and the
    next build of the node stop the process, unmount and remove the directory."""
    from harness.podman import mounts_below
    from harness.stale import sweep_killed_runs

    cache = tmp_path / "cache"
    stale, worker = _dead_build(cache)
    try:
        if by == "cleanup":
            lines = sweep_killed_runs(tmp_path, cache_dir=cache)
            assert f"node build {stale}" in lines
        else:
            runtimes.build_node("trixie", cache)
        assert worker.wait(timeout=10) < 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
    assert mounts_below(cache) == [] and not stale.exists()


KILLED_IN_NODE = """
import os, signal, sys, tarfile
from harness.podman import PodmanEnv
from harness.runtimes import build_node

env = PodmanEnv(node=build_node("trixie")).__enter__()  # a claimed workdir in $TMPDIR
with tarfile.open(env.workdir / "bb.tar", "w") as tar:
    tar.add("/bin/busybox", arcname="bin/busybox")
env.podman("import", str(env.workdir / "bb.tar"), "localhost/bb:1", timeout=120)
sh = ["/bin/busybox", "sh", "-c", "/bin/busybox sleep 300; :", sys.argv[1]]
run = env.podman("run", "-d", "--network=none", "localhost/bb:1", *sh, timeout=120)
print(run.stdout.strip(), env.workdir, env._entered.view.parent, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(marker: str) -> list[int]:
    """The processes whose command line holds ``marker``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


@pytest.mark.e2e
def test_cleanup_after_a_run_killed_with_a_container_in_a_node_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lazybench SIGKILLed while a container runs in a runtime node: the container's overlay
    and shm mounts are in the node's view, over directories of podman's workdir. Cleanup
    removed the workdir first (EBUSY on those directories: "remove it by hand", and the
    owner file went with the rest, so no later cleanup took it) and left the runtime's state
    (in the view's /run) with the container's cgroups."""
    import shutil
    import sys
    import tempfile
    import time
    import uuid

    from harness.podman import mounts_below
    from harness.stale import sweep_killed_runs

    if shutil.which("mmdebstrap") is None or not Path("/bin/busybox").exists():
        pytest.skip("needs mmdebstrap and busybox-static")
    runtimes.build_node("trixie")  # built (or checked) before the child needs it
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    marker = f"lzb-test-{uuid.uuid4().hex}"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where views are looked for
    try:
        child = subprocess.run(
            [sys.executable, "-c", KILLED_IN_NODE, marker],
            env={**os.environ, "TMPDIR": str(tmp)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert child.returncode == -9, child.stderr[-2000:]
        cid, workdir, base = child.stdout.split()
        assert _running(marker), "the container does not run: the cleanup proves nothing"
        assert mounts_below(Path(base)), "no view left mounted: the cleanup proves nothing"
        lines = sweep_killed_runs(tmp, cache_dir=tmp_path / "cache")
        assert not [line for line in lines if "by hand" in line], lines
        assert not Path(workdir).exists() and not Path(base).exists()
        assert mounts_below(tmp) == []
        deadline = time.monotonic() + 10
        while _running(marker):
            assert time.monotonic() < deadline, "the container still runs"
            time.sleep(0.1)
        cgroups = [*Path("/sys/fs/cgroup").glob(f"*/*/libpod-{cid}*")]
        cgroups += Path("/sys/fs/cgroup").glob(f"*/libpod-{cid}*")
        assert cgroups == [], cgroups
    finally:
        sweep_killed_runs(tmp, cache_dir=tmp_path / "cache")
