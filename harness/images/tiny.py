"""A tiny multi-layer image built from files in about a second, for tests and smoke runs.

Layers: (0) busybox-static and the usual directory skeleton, (1) a small text file read by the
workload, a 4 MiB incompressible file it never reads (so a lazy pull visibly fetches less than
a full one) and files later deleted, (2) a whiteout of one of those files and an opaque
directory replacing another. The workload prints :data:`TINY_OUTPUT`.
"""

from __future__ import annotations

import random
from pathlib import Path

from harness.images.build import BuiltImage, build_layers
from harness.images.recipes import FileSpec, LayerSpec, Recipe

BUSYBOX = Path("/bin/busybox")
TINY_OUTPUT = "hello from lazybench"
_APPLETS = ("sh", "cat", "echo", "ls", "sleep", "true", "head", "sha256sum", "wc", "env")


def _noise(size: int, seed: int) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(size)


def tiny_recipe(*, big_file_size: int = 4 << 20, name: str = "tiny") -> Recipe:
    """The tiny image's recipe (files only, no base)."""
    skeleton = tuple(
        FileSpec(d, "dir", mode=0o1777 if d == "tmp" else 0o755)
        for d in ("bin", "etc", "tmp", "data", "data/opq", "proc", "dev", "sys", "run")
    )
    base = LayerSpec(
        "busybox and skeleton",
        files=(
            *skeleton,
            FileSpec("bin/busybox", source=str(BUSYBOX), mode=0o755),
            *(FileSpec(f"bin/{a}", "symlink", target="busybox") for a in _APPLETS),
            FileSpec("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
            FileSpec("etc/group", data=b"root:x:0:\n"),
        ),
    )
    data = LayerSpec(
        "data",
        files=(
            FileSpec("data", "dir", mode=0o755),
            FileSpec("data/hello.txt", data=f"{TINY_OUTPUT}\n".encode()),
            FileSpec("data/big.bin", data=_noise(big_file_size, 1)),
            FileSpec("data/gone.txt", data=b"deleted in the next layer\n"),
            FileSpec("data/opq", "dir", mode=0o755),
            FileSpec("data/opq/old.txt", data=b"hidden by an opaque dir\n"),
        ),
    )
    upper = LayerSpec(
        "whiteout and opaque dir",
        files=(
            FileSpec("data", "dir", mode=0o755),
            FileSpec("data/gone.txt", "whiteout"),
            FileSpec("data/opq", "opaque", mode=0o755),
            FileSpec("data/opq/new.txt", data=b"in the opaque dir\n"),
            FileSpec("data/more.bin", data=_noise(1 << 20, 2)),
        ),
    )
    return Recipe(
        name=name,
        description="busybox image from files, for tests",
        base="scratch",
        layers=(base, data, upper),
        cmd=("/bin/cat", "/data/hello.txt"),
        run_cmd=("/bin/cat", "/data/hello.txt"),
        expected_output=TINY_OUTPUT,
        timeout=60,
    )


def tiny_image(cache_dir: Path | None = None, **kwargs: object) -> BuiltImage:
    """Build (or reuse) the tiny image; ``kwargs`` go to :func:`tiny_recipe`."""
    return build_layers(tiny_recipe(**kwargs), cache_dir)  # type: ignore[arg-type]
