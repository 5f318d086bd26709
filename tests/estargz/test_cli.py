"""`lazybench estargz convert|ls` as a user runs it: real processes, exit codes, one-line
errors, atomic output."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from fmt_helpers import Vector, lazybench_command, run_lazybench_process

from store.estargz import EstargzReader, FileBlobSource


def _small_tar(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("app/a.txt", b"hello\n"), ("app/big.bin", bytes(range(256)) * 300)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tar.addfile(ti, io.BytesIO(data))


def test_convert_then_ls(tmp_path: Path) -> None:
    src, out = tmp_path / "in.tar", tmp_path / "out.blob"
    _small_tar(src)
    prio = tmp_path / "prio.txt"
    prio.write_text("# files the workload reads\napp/a.txt\n\n")
    res = run_lazybench_process(
        "estargz", "convert", str(src), str(out), "--chunk-size", "1000", "--level", "6",
        "--prioritized-files", str(prio),
    )  # fmt: skip
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    assert set(info) == {"digest", "size", "diff_id", "toc_digest", "uncompressed_size"}
    blob = out.read_bytes()
    assert info["size"] == len(blob)
    assert info["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    with FileBlobSource(out) as s:
        r = EstargzReader(s, info["toc_digest"])
        assert r.index.prefetch_end_offset is not None
        assert len(r.lookup("app/big.bin").chunks) == 77
    # diff_id / uncompressed_size describe the blob decompressed
    import gzip

    raw = gzip.decompress(blob)
    assert info["uncompressed_size"] == len(raw)
    assert info["diff_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()

    res = run_lazybench_process("estargz", "ls", str(out), "--toc-digest", info["toc_digest"])
    assert res.code == 0, res.err
    names = [json.loads(line)["name"] for line in res.out.splitlines()]
    assert names == ["", ".prefetch.landmark", "app", "app/a.txt", "app/big.bin"]


def test_convert_from_stdin(tmp_path: Path) -> None:
    import subprocess

    src, out = tmp_path / "in.tar", tmp_path / "out.blob"
    _small_tar(src)
    with src.open("rb") as f:
        proc = subprocess.run(
            [*lazybench_command(), "estargz", "convert", "-", str(out)],
            stdin=f,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["size"] == out.stat().st_size


def _assert_one_line_error(res, *needles: str) -> None:
    assert res.code != 0
    assert "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1, res.err
    for n in needles:
        assert n in res.err


def test_convert_bad_input_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"definitely not a tar" * 100)
    out = tmp_path / "out.blob"
    res = run_lazybench_process("estargz", "convert", str(bad), str(out))
    _assert_one_line_error(res, "bad.tar", "not a readable tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]  # no output, no temp file


def test_convert_missing_input(tmp_path: Path) -> None:
    res = run_lazybench_process("estargz", "convert", str(tmp_path / "nope.tar"), "x.blob")
    _assert_one_line_error(res, "nope.tar")


def test_convert_does_not_clobber_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out.blob"
    out.write_bytes(b"previous good blob")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    res = run_lazybench_process("estargz", "convert", str(bad), str(out))
    _assert_one_line_error(res)
    assert out.read_bytes() == b"previous good blob"


def test_convert_rejects_bad_options(tmp_path: Path) -> None:
    res = run_lazybench_process("estargz", "convert", "a", "b", "--level", "12")
    assert res.code != 0 and "Traceback" not in res.err


def test_ls_not_a_blob(tmp_path: Path) -> None:
    p = tmp_path / "plain.tar"
    _small_tar(p)
    res = run_lazybench_process("estargz", "ls", str(p))
    _assert_one_line_error(res, "plain.tar", "footer")
    assert "(no gzip magic)" in res.err  # each reason once (it was said twice)
    assert "`lazybench estargz convert` makes one" in res.err


def test_ls_wrong_toc_digest(vectors: dict[str, Vector]) -> None:
    res = run_lazybench_process(
        "estargz", "ls", str(vectors["basic"].blob), "--toc-digest", "sha256:" + "0" * 64
    )
    _assert_one_line_error(res, "digest")
    assert res.out == ""


@pytest.mark.parametrize("given", ["bogus", "sha256:abc", "SHA256:" + "0" * 64])
def test_ls_a_toc_digest_that_is_no_digest_is_refused_as_such(
    vectors: dict[str, Vector], given: str
) -> None:
    """A malformed --toc-digest was taken, the blob read, and its TOC said not to match."""
    res = run_lazybench_process("estargz", "ls", str(vectors["basic"].blob), "--toc-digest", given)
    assert res.code == 2 and res.out == ""
    assert "--toc-digest: expected sha256: and 64 lowercase hex digits" in res.err
    assert "does not match" not in res.err


@pytest.mark.parametrize("corrupt_at", ["chunk"])
def test_ls_corrupt_chunk_prints_nothing(tmp_path: Path, vectors, corrupt_at: str) -> None:
    blob = bytearray(vectors["basic"].blob.read_bytes())
    with FileBlobSource(vectors["basic"].blob) as s:
        c = EstargzReader(s).lookup("usr/bin/tool").chunks[0]
    blob[c.offset + 30 : c.offset + 60] = b"\0" * 30
    p = tmp_path / "bad.blob"
    p.write_bytes(bytes(blob))
    res = run_lazybench_process("estargz", "ls", str(p))
    _assert_one_line_error(res, "usr/bin/tool")
    assert res.out == ""


@pytest.mark.parametrize("generation", ["podman4", "podman5"])
def test_convert_to_zstd_chunked_then_ls_with_its_annotations(tmp_path: Path, generation) -> None:
    src, out = tmp_path / "in.tar", tmp_path / "out.blob"
    _small_tar(src)
    res = run_lazybench_process(
        "estargz", "convert", str(src), str(out), "--format", "zstd:chunked",
        "--zstd-for", generation, "--chunk-size", "4096", "--level", "3",
    )  # fmt: skip
    assert res.code == 0, res.err
    info = json.loads(res.out)
    assert info["digest"] == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(info["annotations"]))
    res = run_lazybench_process("estargz", "ls", str(out), "--annotations", f"@{annotations}")
    assert res.code == 0, res.err
    names = [json.loads(line)["name"] for line in res.out.splitlines()]
    assert names == ["", "app", "app/a.txt", "app/big.bin"]
    wrong = {
        k: ("sha256:" + "0" * 64 if k.endswith("checksum") else v)
        for k, v in info["annotations"].items()
    }
    res = run_lazybench_process("estargz", "ls", str(out), "--annotations", json.dumps(wrong))
    _assert_one_line_error(res, "hashes to")
    res = run_lazybench_process(
        "estargz", "convert", str(src), str(out), "--format", "zstd:chunked", "--level", "30"
    )
    assert res.code != 0 and "zstd level must be 1-22" in res.err


def test_both_convert_commands_take_one_format_spelling_and_generation_default(
    tmp_path: Path,
) -> None:
    """``zstd-chunked`` and ``zstd:chunked`` are one format, and the generation is podman 4's
    unless ``--zstd-generation`` (or its older name ``--zstd-for``) says otherwise, as in
    ``lazybench convert``."""
    src = tmp_path / "in.tar"
    _small_tar(src)
    keys = {}
    for spelling, *generation in (
        ("zstd-chunked",),
        ("zstd:chunked",),
        ("zstd-chunked", "--zstd-generation", "podman5"),
        ("zstd-chunked", "--zstd-for", "podman5"),
    ):
        out = tmp_path / f"{len(keys)}.blob"
        res = run_lazybench_process(
            "estargz", "convert", str(src), str(out), "--format", spelling, *generation
        )
        assert res.code == 0, res.err
        keys[(spelling, *generation)] = sorted(json.loads(res.out)["annotations"])
    podman4, podman4_colon, podman5, podman5_old = keys.values()
    assert podman4 == podman4_colon and all(k.startswith("io.containers.") for k in podman4)
    assert podman5 == podman5_old and all(k.startswith("io.github.containers.") for k in podman5)
    from harness.cli import build_parser
    from harness.images.convert import ConvertOptions

    args = build_parser().parse_args(["convert", "--format", "zstd:chunked", "oci:a", "oci:b"])
    assert args.format == "zstd-chunked"
    assert args.zstd_generation is None and ConvertOptions().zstd_generation == "podman4"


def test_an_output_of_dash_or_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "in.tar"
    _small_tar(src)
    res = run_lazybench_process("estargz", "convert", str(src), "-")
    _assert_one_line_error(res, "stdout carries the descriptor JSON")
    missing = tmp_path / "nodir" / "out.blob"
    res = run_lazybench_process("estargz", "convert", str(src), str(missing))
    _assert_one_line_error(res, f"directory {missing.parent} does not exist")
    assert not (tmp_path / "nodir").exists()


def test_a_zstd_generation_with_estargz_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "in.tar"
    _small_tar(src)
    res = run_lazybench_process(
        "estargz", "convert", str(src), str(tmp_path / "o"), "--zstd-generation", "podman5"
    )
    _assert_one_line_error(res, "--zstd-generation goes with --format zstd-chunked")
