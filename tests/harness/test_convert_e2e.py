"""`lazybench convert` end to end: a `podman build` image to a local registry, pulled lazily.

The image (tests/harness/byo_image.py) is exported with `podman save`, converted to eStargz
and pushed to a real docker-registry over plain HTTP; a podman pulling through our store gets
a container whose complete listing equals that of the original image loaded normally, without
any whole-blob GET of its layers; and a plain `podman pull` (no store) of the converted image
still runs. The optimized conversion puts what the workload read first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness.podman import PodmanEnv
from harness.registry_server import RegistryServer
from harness.store_proc import StoreProcess
from store.estargz import (
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    EstargzReader,
    FileBlobSource,
)
from tests.harness.byo_image import OUTPUT, build_and_save, write_context
from tests.store.test_e2e_podman import LISTING

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


def lazybench(tmp: Path, *args: str, timeout: float = 600) -> tuple[int, str, str]:
    (tmp / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp / "tmp"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("convert")
    archive = tmp / "image.docker.tar"
    build_and_save(write_context(tmp / "ctx"), tmp / "build", {"docker-archive": archive})
    return archive


def manifest(host: str, repo: str, tag: str) -> tuple[dict, str]:
    accept = "application/vnd.oci.image.manifest.v1+json"
    resp = httpx.get(f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
    resp.raise_for_status()
    return resp.json(), resp.headers["Docker-Content-Digest"]


def test_convert_push_then_lazy_pull_equals_full_pull(image: Path, tmp_path: Path) -> None:
    with RegistryServer(storage_dir=tmp_path / "registry") as reg:
        dest = f"docker://{reg.host}/byo/app:esgz"
        rc, out, err = lazybench(tmp_path, "convert", f"docker-archive:{image}", dest)
        assert rc == 0, err
        m, digest = manifest(reg.host, "byo/app", "esgz")
        assert out.strip() == digest
        assert m["layers"] and all(
            TOC_DIGEST_ANNOTATION in d["annotations"]
            and int(d["annotations"][UNCOMPRESSED_SIZE_ANNOTATION]) > 0
            for d in m["layers"]
        )
        ref = f"{reg.host}/byo/app:esgz"

        mark = reg.log_mark()
        with (
            StoreProcess(tmp_path / "store", insecure_hosts=[reg.host]) as store,
            PodmanEnv(
                additional_layer_store=store.mountpoint,
                insecure_registries=[reg.host],
            ) as env,
        ):
            env.pull(ref, timeout=120)
            assert env.run(ref, timeout=120).stdout == OUTPUT + "\n"
            lazy = env.run(ref, "/bin/sh", "-c", LISTING, timeout=300).stdout
            whole = [r for r in reg.access_log()[mark:] if r.is_full_blob_get]
            layer_digests = {d["digest"] for d in m["layers"]}
            assert not [r for r in whole if r.digest in layer_digests], whole

        with PodmanEnv() as env:
            env.podman("load", "--input", str(image), timeout=300)
            loaded = env.podman("images", "--format", "{{.ID}}").stdout.split()[0]
            full = env.run(loaded, "/bin/sh", "-c", LISTING, timeout=300).stdout

        with PodmanEnv(insecure_registries=[reg.host]) as env:
            env.pull(ref, timeout=120)
            assert env.run(ref, timeout=120).stdout == OUTPUT + "\n"

        # zstd:chunked from our writer: podman's own partial pull takes it.
        zref = f"{reg.host}/byo/app:zstd"
        rc, out, err = lazybench(
            tmp_path,
            "convert",
            "--format",
            "zstd-chunked",
            f"docker-archive:{image}",
            f"docker://{zref}",
        )
        assert rc == 0, err
        zm, _ = manifest(reg.host, "byo/app", "zstd")
        assert all(d["mediaType"].endswith("+zstd") for d in zm["layers"])
        with PodmanEnv(insecure_registries=[reg.host], partial_pulls=True) as env:
            env.pull(zref, timeout=120)
            assert env.run(zref, timeout=120).stdout == OUTPUT + "\n"

    lazy_set, full_set = set(lazy.splitlines()), set(full.splitlines())
    assert f"/data/hello.txt|regular file 644 0 0 {len(OUTPUT) + 1}" in "\n".join(full_set)
    assert not [p for p in full_set if p.startswith(("/data/old/gone.txt|", "/data/old/kept.txt|"))]
    assert any(p.startswith("/data/old/new.txt|") for p in full_set)
    assert lazy_set == full_set, (sorted(lazy_set - full_set), sorted(full_set - lazy_set))


def test_optimized_conversion_puts_what_the_workload_reads_first(
    image: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "opt"
    rc, out, err = lazybench(
        tmp_path,
        "convert",
        "--optimize",
        "--command",
        "/bin/cat /data/hello.txt",
        "--ready",
        OUTPUT,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        f"docker-archive:{image}",
        f"oci:{out_dir}:opt",
    )
    assert rc == 0, err
    index = json.loads((out_dir / "index.json").read_text())
    assert out.strip() == index["manifests"][0]["digest"]
    blobs = out_dir / "blobs" / "sha256"
    m = json.loads((blobs / out.strip().split(":")[1]).read_bytes())
    firsts = []
    for d in m["layers"]:
        with FileBlobSource(blobs / d["digest"].split(":")[1]) as src:
            reader = EstargzReader(src, d["annotations"][TOC_DIGEST_ANNOTATION])
            firsts.append([e["name"] for e in reader.toc.entries[:4]])
    # The layer holding the file the workload read has it before the prefetch landmark.
    hello = [f for f in firsts if "data/hello.txt" in f]
    assert hello and PREFETCH_LANDMARK in hello[0], firsts
    assert hello[0].index("data/hello.txt") < hello[0].index(PREFETCH_LANDMARK)


def test_unreachable_source_and_bad_destination_are_clear(tmp_path: Path) -> None:
    rc, _, err = lazybench(
        tmp_path, "convert", "docker://127.0.0.1:9/nothing:here", f"oci:{tmp_path}/o"
    )
    assert rc == 1 and "cannot read image docker://127.0.0.1:9/nothing:here" in err, err
    rc, _, err = lazybench(tmp_path, "convert", f"oci:{tmp_path}/missing", "somewhere")
    assert rc == 1 and "does not exist" in err, err
    assert "Traceback" not in err


def test_a_platform_asked_for_by_name_must_match_a_single_image(
    image: Path, tmp_path: Path
) -> None:
    """A single image is converted only for its own platform: ``--platform linux/arm64`` of
    an amd64 image is refused, as ``run`` refuses it, and nothing is written."""
    dest = tmp_path / "out"
    rc, _, err = lazybench(
        tmp_path, "convert", "--platform", "linux/arm64", f"docker-archive:{image}", f"oci:{dest}"
    )
    assert rc == 1, err
    assert "has no layers for platform linux/arm64: it is a linux/amd64 image" in err, err
    assert "Traceback" not in err
    assert not dest.exists()
    rc, _, err = lazybench(
        tmp_path, "convert", "--platform", "linux/amd64", f"docker-archive:{image}", f"oci:{dest}"
    )
    assert rc == 0, err


def test_a_destination_that_cannot_be_written_is_refused_before_converting(
    image: Path, tmp_path: Path
) -> None:
    src = f"docker-archive:{image}"
    for dest, problem in (
        ("docker://127.0.0.1:9/app:esgz", "nothing listens on 127.0.0.1:9"),
        ("docker://[::1]:9/app:esgz", "nothing listens on [::1]:9"),
        (f"oci-archive:{tmp_path}/no/dir/x.tar", f"directory {tmp_path}/no/dir does not exist"),
        (f"oci:{tmp_path}/no/layout:latest", f"directory {tmp_path}/no does not exist"),
    ):
        rc, out, err = lazybench(tmp_path, "convert", src, dest)
        assert rc == 1 and problem in err, err
        assert "reading" not in out + err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--timeout", "5"], "go with --optimize"),
        (["--cache-dir", "/tmp"], "go with --optimize"),
        (["--platform", "linux/amd64", "--all-platforms"], "give one"),
        (["--zstd-generation", "podman5"], "goes with --format zstd-chunked"),
    ],
)
def test_options_that_would_do_nothing_are_refused(
    tmp_path: Path, extra: list[str], problem: str
) -> None:
    rc, _, err = lazybench(tmp_path, "convert", *extra, "oci:/x", f"oci:{tmp_path}/o")
    assert rc == 1 and problem in err, err
