"""A store run as upstream's rootless setup starts it (``podman unshare stargz-store …``: in
podman's user namespace), read by overlayfs mounted there, which must use ``userxattr`` and so
reads ``user.overlay.opaque``: first with the kernel's overlayfs in a user namespace of our own,
then with the real rootless podman of a throwaway user (upstream's recipe, docs/rootless.md)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.podman import CONTAINERS_CONF
from store.config import in_user_namespace
from store.registry.client import USER_AGENT
from tests.store.images import full_blob_gets, push, push_two_layer_estargz, to_estargz
from tests.store.test_e2e_podman import _opaque_case_layers

REPO = Path(__file__).resolve().parents[2]
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"  # the throwaway user's PATH

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize(
    ("uid_map", "inside"),
    [
        ("         0          0 4294967295\n", False),  # the initial namespace
        ("         0          0          1\n", True),  # unshare -U -r as root
        ("         0       1000          1\n         1     100000      65536\n", True),  # rootless
        ("         0          0 4294967295\n         5          5          1\n", True),
        ("", True),  # no mapping written yet
    ],
)
def test_a_user_namespace_is_told_from_its_uid_map(uid_map: str, inside: bool) -> None:
    assert in_user_namespace(uid_map) is inside


@pytest.mark.parametrize("config", ["", 'overlay_opaque_type = "trusted"\n'])
def test_overlayfs_with_userxattr_in_the_stores_user_namespace_sees_opaque_directories(
    registry, tmp_path: Path, config: str
) -> None:
    """Lower ``case/a/old``; upper makes ``case/a`` opaque and adds ``new``. Overlayfs over
    the two layers as the store serves them, in the store's user namespace, shows ``new``
    only — with the default ``overlay_opaque_type`` (auto). Set to ``trusted`` (the default
    before auto), the opaque mark is one nobody in the namespace can read: ``old`` shows
    through, the wrong tree."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    blobs = [to_estargz(t) for t in _opaque_case_layers()]
    push(registry.host, "rootless/img", "1", blobs)
    ref = f"{registry.host}/rootless/img:1"
    mnt, work = tmp_path / "mnt", tmp_path / "ovl"
    (tmp_path / "config.toml").write_text(config)
    refdir = mnt / base64.b64encode(ref.encode()).decode()
    lower, upper = (refdir / b.digest / "diff" for b in blobs)
    script = textwrap.dedent(
        f"""\
        set -e
        mkdir -p {mnt} {work}/up {work}/work {work}/merged
        {sys.executable} -m store --root {tmp_path}/root --config {tmp_path}/config.toml \\
            {mnt} 2> {tmp_path}/store.log &
        store=$!
        trap 'umount {work}/merged 2>/dev/null || true; kill $store; wait $store' EXIT
        for _ in $(seq 100); do [ -r {mnt}/status ] && break; sleep 0.1; done
        ls {lower} {upper} > /dev/null
        # short links, as podman makes them: a layer's path holds "sha256:", and ":" separates
        # lowerdir's layers
        ln -s {lower} {work}/l0 && ln -s {upper} {work}/l1
        mount -t overlay overlay \\
            -o lowerdir={work}/l1:{work}/l0,upperdir={work}/up,workdir={work}/work,userxattr \\
            {work}/merged
        ls {work}/merged/case/a
        """
    )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private",
         "sh", "-c", script],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    log = (tmp_path / "store.log").read_text() if (tmp_path / "store.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{log}"
    listed = proc.stdout.split()
    if config:
        assert listed == ["new", "old"], listed  # the opaque mark unread: the wrong tree
    else:
        assert listed == ["new"], listed
        assert "overlay_opaque_type auto: in a user namespace" in log


# -- rootless podman, for real: a throwaway user --------------------------------------------------

# What this machine's podman 4.3 needs, without the ulimits: a user cannot raise them.
ROOTLESS_CONTAINERS_CONF = "".join(
    line for line in CONTAINERS_CONF.splitlines(keepends=True) if "ulimits" not in line
)


@dataclass
class RootlessUser:
    name: str
    uid: int
    home: Path
    python: list[str]  # how the user runs the store's Python: argv prefix, then `-m store`
    pythonpath: str


def _user_pids(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            real = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if int(real.split()[1]) == uid:
                pids.append(int(entry.name))
    return pids


def _stop_user_processes(uid: int) -> None:
    """SIGKILL every process of the throwaway user (its store, podman's pause process, conmon),
    by id, until none is left: their namespaces, and the mounts in them, go with them."""
    deadline = time.monotonic() + 15
    while (pids := _user_pids(uid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _drop_sub_ids(name: str) -> None:
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.split(":", 1)[0] != name]
        if kept != lines:
            path.write_text("".join(kept))


@pytest.fixture
def rootless_user() -> Iterator[RootlessUser]:
    """A user made for the test (``useradd`` with its /etc/subuid and /etc/subgid ranges) who
    can run the store's Python; removed afterwards with its home, ranges and processes."""
    if os.geteuid() != 0:
        pytest.skip("makes a throwaway user: needs root")
    for tool in ("useradd", "userdel", "runuser", "newuidmap", "newgidmap", "unshare", "podman"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (newuidmap, newgidmap: Debian's uidmap)")
    name = f"lzbrl{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    entry = pwd.getpwnam(name)
    uid, home = entry.pw_uid, Path(entry.pw_dir)
    try:
        if not any(line.startswith(f"{name}:") for line in Path("/etc/subuid").read_text().split()):
            pytest.skip("useradd gave the user no /etc/subuid range (SUB_UID_COUNT in login.defs)")
        # The interpreter running the tests may lie where the user cannot go (a virtualenv
        # over a pyenv under /root): then the system's Python of the same version, with the
        # virtualenv's packages, or a skip saying why.
        paths = sysconfig.get_paths()
        pythonpath = ":".join(dict.fromkeys([str(REPO), paths["purelib"], paths["platlib"]]))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        tried = []
        for python in (sys.executable, shutil.which(version, path=USER_PATH)):
            if python is None:
                continue
            probe = subprocess.run(
                ["runuser", "-u", name, "--", "env", "-i", f"PYTHONPATH={pythonpath}",
                 python, "-s", "-c", "import pyfuse3, trio, store.cli"],
                capture_output=True, text=True, cwd="/",
            )  # fmt: skip
            if probe.returncode == 0:
                break
            tried.append(f"{python}: {probe.stderr.strip().splitlines()[-1:]}")
        else:
            pytest.skip(f"no Python with the store's packages that user {name} can run: {tried}")
        yield RootlessUser(name, uid, home, [python, "-s"], pythonpath)
    finally:
        _stop_user_processes(uid)
        subprocess.run(["userdel", "-r", name], capture_output=True)
        _drop_sub_ids(name)
        shutil.rmtree(home, ignore_errors=True)
        assert not _user_pids(uid), f"processes of {name} left: {_user_pids(uid)}"


def test_rootless_podman_pulls_lazily_through_a_store_in_its_user_namespace(
    registry, rootless_user: RootlessUser, tmp_path: Path, layers: dict
) -> None:
    """Upstream's rootless recipe with the host's podman 4.3, as a user: the user's
    storage.conf names the store under ``additionallayerstores`` (``:ref``), the store runs
    under ``podman unshare``; the pull takes every layer from the store (no whole-blob GET),
    and the container shows the image's tree (the end-to-end image of tests/store/images.py):
    a deleted file gone, an opaque directory hiding the lower one's file, owners 0 and 1000 as
    in the image, a suid bit, a big file's bytes; SIGTERM to the store unmounts it in podman's
    mount namespace."""
    user = rootless_user
    ref, blobs = push_two_layer_estargz(registry.host, "rootless/podman", layers)
    share = user.home / ".local/share/stargz-store"
    config = user.home / ".config/containers"
    config.mkdir(parents=True)
    (config / "containers.conf").write_text(ROOTLESS_CONTAINERS_CONF)
    (config / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\n\n[storage.options]\n'
        f'additionallayerstores = ["{share}/store:ref"]\n'
    )
    (config / "registries.conf").write_text(
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    run = user.home / "run"
    run.mkdir(mode=0o700)
    subprocess.run(["chown", "-R", f"{user.name}:", str(user.home)], check=True)
    store = " ".join([*user.python, "-m", "store"])
    user_script = textwrap.dedent(
        f"""\
        set -e
        cd
        mkdir -p {share}/store  # podman refuses to start while a layer store is missing
        podman unshare sh -c 'echo $$ > {run}/store.pid; exec {store} \
            --root {share}/data {share}/store' > /dev/null 2> {run}/store.log &
        for _ in $(seq 100); do
            grep -q '"mounted on' {run}/store.log && break
            grep -q '^stargz-store:' {run}/store.log && exit 1
            sleep 0.1
        done
        podman pull -q {ref}
        echo == run
        podman run --rm --network=none {ref} sh -c 'ls /data /opq; cat /etc/hello; \
            stat -c "%n %u %g %a" /data/sub/b /data/hard /bin/suid /etc/hello; sha256sum /big'
        echo == stop
        kill -TERM $(cat {run}/store.pid)
        wait
        podman unshare grep -c ' {share}/store ' /proc/self/mountinfo || true
        """
    )
    # A private mount namespace for the user's session, with a /dev/fuse the user may open
    # (udev makes it 0666; a machine without udev may leave it 0600), bound over the node.
    fuse = os.stat("/dev/fuse")
    dev = tmp_path / "dev"
    dev.mkdir()
    fuse_for_all = (
        f"mount -t tmpfs -o mode=755 lazybench-dev {dev} && "
        f"mknod -m 666 {dev}/fuse c {os.major(fuse.st_rdev)} {os.minor(fuse.st_rdev)} && "
        f"mount --bind {dev}/fuse /dev/fuse && "
    )
    env = [f"HOME={user.home}", f"USER={user.name}", f"LOGNAME={user.name}",
           f"PATH={USER_PATH}", f"XDG_RUNTIME_DIR={run}",
           f"PYTHONPATH={user.pythonpath}"]  # fmt: skip
    mark = registry.log_mark()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         fuse_for_all + 'exec runuser -u "$0" -- env -i "$@"', user.name, *env,
         "sh", "-c", user_script],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    log = (run / "store.log").read_text() if (run / "store.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\nstore log:\n{log[-3000:]}"
    assert full_blob_gets(registry, mark, blobs) == []
    # The registry's log of this pull is a rootful pull's: podman GETs the manifest and the
    # config itself, and the store once more (its own user agent) for its one resolution of
    # the image; per layer, the store's footer read and, for a blob bigger than that read,
    # its head probe (store.prefetch.AheadBlob.speculate): two ranged GETs of different bytes.
    store_manifest_gets = [
        r
        for r in registry.access_log_since(mark)
        if r.kind == "manifests" and r.user_agent == USER_AGENT
    ]
    assert len(store_manifest_gets) == 1, store_manifest_gets
    listed = proc.stdout.split("== run\n", 1)[1].split("== stop\n")
    assert listed[0].splitlines() == [
        "/data:",
        "hard",
        "sub",
        "",
        "/opq:",
        "new",
        "hello from upper",
        "/data/sub/b 1000 1000 600",
        "/data/hard 1000 1000 600",
        "/bin/suid 0 0 4755",
        "/etc/hello 0 0 644",
        f"{hashlib.sha256(layers['big']).hexdigest()}  /big",
    ], proc.stdout
    assert listed[1].strip() == "0", f"the store's mount outlived SIGTERM: {proc.stdout}"
    assert '"unmounted ' in log
    assert "overlay_opaque_type auto: in a user namespace" in log
