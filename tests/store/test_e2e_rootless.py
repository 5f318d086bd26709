"""A store run as upstream's rootless setup starts it (``podman unshare stargz-store …``: in a
user namespace), read by overlayfs mounted there, which must use ``userxattr`` and so reads
``user.overlay.opaque``. Rootless podman itself cannot run here as root; the user namespace,
the FUSE mount in it and the kernel's overlayfs over the store's layers are the real ones."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from store.config import in_user_namespace
from tests.store.images import push, to_estargz
from tests.store.test_e2e_podman import _opaque_case_layers

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
