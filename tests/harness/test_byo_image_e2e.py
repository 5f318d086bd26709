"""`lazybench run` on a user's own image: `docker-archive:`, `oci-archive:` and `containerfile =`.

One scenario, three workloads made from the same Containerfile (built here by `podman build`,
exported with `podman save`), every mode, one sample, loopback. Checked: every record is ok and
printed what the image prints, each lazy mode fetched fewer bytes than legacy before the first
output; and the clear errors for a source that is not there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness.records import read_records
from harness.scenario import LAZY_MODES, MODES
from tests.harness.byo_image import OUTPUT, build_and_save, write_context

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("podman", "docker-registry", "skopeo", "fusermount3"))
        or not Path("/dev/fuse").exists()
        or not Path("/bin/busybox").exists()
        or os.geteuid() != 0,
        reason="needs root, podman, docker-registry, skopeo, FUSE and busybox-static",
    ),
]


SCENARIO = """
name = "byo"
samples = 1
modes = {modes}
[network]
profile = "loopback"

[[workloads]]
name = "from-docker-archive"
image = "docker-archive:image.docker.tar"
expect = "{output}"
timeout = 90

[[workloads]]
name = "from-oci-archive"
image = "oci-archive:image.oci.tar"
expect = "{output}"
timeout = 90

[[workloads]]
name = "from-containerfile"
containerfile = "ctx/Containerfile"
command = ["/bin/sh", "-c", "cat /data/hello.txt; echo $GREETING"]
env = {{ GREETING = "hi there" }}
ready = "hi there"
expect = "{output}"
timeout = 90
"""


def run_scenario(base: Path, scenario: str, run_id: str) -> tuple[int, str]:
    """`lazybench run` of ``base/scenario`` into ``base/runs/<run_id>``, its image cache
    ``base/cache`` (shared by the module's runs)."""
    return lazybench(
        base,
        "run",
        str(base / scenario),
        "--no-progress",
        "--results-dir",
        str(base / "runs"),
        "--run-id",
        run_id,
        "--cache-dir",
        str(base / "cache"),
    )


def lazybench(tmp: Path, *args: str, timeout: float = 900) -> tuple[int, str]:
    """`lazybench ARGS` run in ``tmp``, its scratch files in a directory removed after."""
    with tempfile.TemporaryDirectory(prefix="lzb-") as scratch:
        env = {**os.environ, "TMPDIR": scratch, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "harness", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp,
        )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("byo")
    containerfile = write_context(tmp / "ctx")
    build_and_save(
        containerfile,
        tmp / "podman",
        {"docker-archive": tmp / "image.docker.tar", "oci-archive": tmp / "image.oci.tar"},
    )
    return tmp


def test_own_image_in_every_mode(base: Path) -> None:
    (base / "byo.toml").write_text(SCENARIO.format(modes=list(MODES), output=OUTPUT))
    rc, out = run_scenario(base, "byo.toml", "byo")
    assert rc == 0, out
    records = read_records(base / "runs" / "byo")
    workloads = ("from-docker-archive", "from-oci-archive", "from-containerfile")
    assert {(r.workload, r.mode) for r in records} == {(w, m) for w in workloads for m in MODES}
    assert all(r.status == "ok" for r in records), [(r.key, r.error) for r in records]
    for w in workloads:
        by_mode = {r.mode: r for r in records if r.workload == w}
        assert all(OUTPUT in r.stdout_head for r in by_mode.values())
        legacy = by_mode["legacy"]
        for mode in LAZY_MODES & set(MODES):
            lazy = by_mode[mode]
            assert lazy.bytes_before_first_output < legacy.bytes_before_first_output, (w, mode)
    assert "hi there" in next(r.stdout_head for r in records if r.workload == "from-containerfile")


def test_missing_source_is_a_clear_error(base: Path) -> None:
    (base / "missing.toml").write_text(
        '[[workloads]]\nname = "x"\nimage = "docker-archive:nope.tar"\n'
        '[network]\nprofile = "loopback"\n'
    )
    rc, out = lazybench(
        base, "run", str(base / "missing.toml"), "--no-progress", "--results-dir", str(base / "r2")
    )
    assert rc == 1
    assert f"{base / 'nope.tar'} does not exist" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("modes", "expected"),
    [
        # The measurement records the error; the run exits 1.
        (["legacy"], "exited (0) without printing its ready line 'never printed'"),
        # The estargz trace run refuses to optimize for a workload that never got ready.
        (["estargz"], "trace run of img: the workload exited (0) without printing its ready"),
    ],
)
def test_workload_that_never_prints_its_ready_line(
    base: Path, modes: list[str], expected: str
) -> None:
    name = f"never-{modes[0]}"
    (base / f"{name}.toml").write_text(
        f"modes = {modes}\nsamples = 1\n"
        '[[workloads]]\nname = "img"\nimage = "docker-archive:image.docker.tar"\n'
        'ready = "never printed"\ntimeout = 30\n[network]\nprofile = "loopback"\n'
    )
    rc, out = run_scenario(base, f"{name}.toml", name)
    assert rc == 1, out
    if modes == ["legacy"]:
        (record,) = read_records(base / "runs" / name)
        assert record.status == "error" and expected in record.error, record.error
    else:
        assert expected in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize("modes", [["legacy"], ["estargz"]])
def test_workload_that_hangs_without_its_expected_output(base: Path, modes: list[str]) -> None:
    """A workload that never exits and never prints its `expect` text: the timeout is reported
    in the workload's terms, by the measurement (legacy) and by the estargz trace run alike —
    one line, no traceback, nothing left mounted."""
    name = f"hang-{modes[0]}"
    (base / f"{name}.toml").write_text(
        f"modes = {modes}\nsamples = 1\n"
        '[[workloads]]\nname = "img"\nimage = "docker-archive:image.docker.tar"\n'
        'command = ["/bin/busybox", "sh", "-c", "echo started; exec /bin/busybox sleep 600"]\n'
        'expect = "never printed"\ntimeout = 10\n[network]\nprofile = "loopback"\n'
    )
    rc, out = run_scenario(base, f"{name}.toml", name)
    assert rc == 1, out
    expected = "no expected output 'never printed' within 10s"
    if modes == ["legacy"]:
        (record,) = read_records(base / "runs" / name)
        assert record.status == "error" and expected in record.error, record.error
    else:
        assert f"lazybench: trace run of img: run: {expected}" in out, out
    assert "Traceback" not in out
    assert str(base) not in Path("/proc/mounts").read_text()


def _with_a_layer_twice(archive: Path, layout: Path) -> int:
    """The OCI archive's image as an OCI layout at ``layout`` with its last layer listed once
    more (as identical layers, e.g. empty ones, are in users' images); its layer count."""
    import hashlib
    import json
    import tarfile

    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    manifest["layers"].append(manifest["layers"][-1])
    config["rootfs"]["diff_ids"].append(config["rootfs"]["diff_ids"][-1])
    config.setdefault("history", []).append({"created_by": "the last layer again"})

    def put(obj: dict, media_type: str) -> dict:
        data = json.dumps(obj).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    manifest["config"] = put(config, manifest["config"]["mediaType"])
    index["manifests"] = [{**index["manifests"][0], **put(manifest, manifest["mediaType"])}]
    (layout / "index.json").write_text(json.dumps(index))
    return len(manifest["layers"])


def test_an_image_listing_a_layer_twice_is_measured_lazily(base: Path) -> None:
    """The eStargz images the harness writes give each repeat of a layer a blob of its own,
    so every layer comes from the store and the measurement counts as lazy."""
    layers = _with_a_layer_twice(base / "image.oci.tar", base / "twice")
    (base / "twice.toml").write_text(
        'modes = ["estargz-noopt"]\nsamples = 1\n'
        f'[[workloads]]\nname = "twice"\nimage = "oci:twice"\nexpect = "{OUTPUT}"\n'
        'timeout = 90\n[network]\nprofile = "loopback"\n'
    )
    rc, out = run_scenario(base, "twice.toml", "twice")
    assert rc == 0, out
    assert "listed 2 times" not in out, out
    (record,) = read_records(base / "runs" / "twice")
    assert record.status == "ok", record.error
    assert record.layers_total == record.layers_from_store == layers, record
    assert OUTPUT in record.stdout_head


def test_command_follows_the_images_entrypoint_and_entrypoint_replaces_it(base: Path) -> None:
    """``command`` is the image's CMD, the arguments of its ENTRYPOINT (as in `podman run`);
    ``entrypoint`` replaces the ENTRYPOINT. Without it, a command meant as the program once
    ran as the entrypoint's arguments and the run measured the wrong program."""
    ctx = base / "ctx-entrypoint"
    ctx.mkdir(exist_ok=True)
    shutil.copyfile("/bin/busybox", ctx / "busybox")
    (ctx / "busybox").chmod(0o755)
    (ctx / "Containerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT ["/bin/busybox", "echo", "entry"]\n'
    )
    (base / "entrypoint.toml").write_text(
        'modes = ["legacy"]\nsamples = 1\n[network]\nprofile = "loopback"\n'
        '[[workloads]]\nname = "args"\ncontainerfile = "ctx-entrypoint/Containerfile"\n'
        'command = ["/bin/busybox", "echo", "mine"]\nexpect = "entry /bin/busybox echo mine"\n'
        "timeout = 60\n"
        '[[workloads]]\nname = "replaced"\ncontainerfile = "ctx-entrypoint/Containerfile"\n'
        'entrypoint = ["/bin/busybox", "sh", "-c"]\ncommand = ["echo mine"]\n'
        'expect = "mine"\ntimeout = 60\n'
        '[[workloads]]\nname = "cleared"\ncontainerfile = "ctx-entrypoint/Containerfile"\n'
        'entrypoint = ""\ncommand = ["/bin/busybox", "echo", "whole"]\n'
        'expect = "whole"\ntimeout = 60\n'
    )
    rc, out = run_scenario(base, "entrypoint.toml", "entrypoint")
    assert rc == 0, out
    records = {r.workload: r for r in read_records(base / "runs" / "entrypoint")}
    assert all(r.status == "ok" for r in records.values()), out
    assert records["args"].stdout_head == "entry /bin/busybox echo mine\n"
    assert records["replaced"].stdout_head == "mine\n"
    assert records["cleared"].stdout_head == "whole\n"


def test_a_server_without_ready_is_given_up_after_two_timeouts_and_resumes(base: Path) -> None:
    """A server workload without `ready` waits out its timeout in every measurement: after two
    in a row the others are recorded as failed with what to do, the run exits 1, and a resumed
    run measures the failed ones again (and gives up again)."""
    (base / "noready.toml").write_text(
        'modes = ["legacy"]\nsamples = 3\n[network]\nprofile = "loopback"\n'
        '[[workloads]]\nname = "server"\nimage = "docker-archive:image.docker.tar"\n'
        'command = ["/bin/busybox", "sh", "-c", "echo serving on :80 >&2; exec sleep 600"]\n'
        "timeout = 2\n"
    )
    rc, out = run_scenario(base, "noready.toml", "noready")
    assert rc == 1, out
    run = base / "runs" / "noready"

    def check() -> None:
        records = read_records(run)
        assert len(records) == 3 and all(r.status == "error" for r in records), out
        timed_out = [r for r in records if not r.error.startswith("not measured")]
        assert len(timed_out) == 2, [r.error for r in records]
        for r in timed_out:
            assert r.error.startswith(
                "run: the workload did not exit within 2s; for a server, set ready = a line"
            ), r.error
            assert "stderr: 'serving on :80'" in r.error, r.error
        skipped = [r for r in records if r not in timed_out]
        assert all("did not exit within 2s twice in a row" in r.error for r in skipped)

    check()
    assert "skipping its 1 remaining measurements" in out, out
    rc, out = lazybench(
        base, "run", "--resume", str(run), "--no-progress", "--cache-dir", str(base / "cache")
    )
    assert rc == 1, out
    check()  # the latest record of each key
    assert "Traceback" not in out


def test_a_containerfile_from_a_local_image_says_the_build_cannot_see_it(base: Path) -> None:
    """podman builds in lazybench's private storage: FROM a host image (localhost/x) once
    failed after retries with a registry's connection errors."""
    ctx = base / "ctx-local-base"
    ctx.mkdir(exist_ok=True)
    (ctx / "Containerfile").write_text("FROM localhost/lazybench-no-such-base:latest\n")
    (base / "localbase.toml").write_text(
        'modes = ["legacy"]\nsamples = 1\n[network]\nprofile = "loopback"\n'
        '[[workloads]]\nname = "app"\ncontainerfile = "ctx-local-base/Containerfile"\n'
    )
    rc, out = run_scenario(base, "localbase.toml", "localbase")
    assert rc == 1, out
    assert (
        "FROM localhost/lazybench-no-such-base:latest is not in lazybench's build storage" in out
    ), out
    assert "connection refused" not in out and "Traceback" not in out


def test_an_image_missing_from_local_storage_names_its_key_and_leaves_nothing(
    base: Path,
) -> None:
    """Named as scenario errors are (FILE: workloads[N].image), and the run directory
    printed at the start is said to be removed (it once silently was)."""
    (base / "notstored.toml").write_text(
        'modes = ["legacy"]\nsamples = 1\n[network]\nprofile = "loopback"\n'
        '[[workloads]]\nname = "ok"\nimage = "docker-archive:image.docker.tar"\n'
        '[[workloads]]\nname = "app"\n'
        'image = "containers-storage:localhost/lazybench-no-such-image:latest"\n'
    )
    results = base / "notstored-runs"
    rc, out = lazybench(
        base,
        "run",
        str(base / "notstored.toml"),
        "--no-progress",
        "--results-dir",
        str(results),
        "--run-id",
        "x",
        "--cache-dir",
        str(base / "cache"),
    )
    assert rc == 1, out
    assert f"lazybench: {base / 'notstored.toml'}: workloads[1].image: cannot read image " in out
    assert f"nothing was measured, so {results / 'x'} was removed" in out, out
    assert not results.exists()
    assert "Traceback" not in out
