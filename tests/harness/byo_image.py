"""A small multi-layer image built by `podman build` from a Containerfile, as users make theirs.

No base image can be pulled here, so it is ``FROM scratch`` with the static busybox; one layer
carries a few MB of random bytes the workload never reads, so a lazy pull visibly fetches less
than a full one; a ``RUN`` layer deletes files and replaces a directory (whiteouts).
:func:`write_context` writes the build context, :func:`build_and_save` builds it
in a private podman and exports it with ``podman save`` in the formats asked for.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from harness.podman import PodmanEnv

BUSYBOX = Path("/bin/busybox")
OUTPUT = "hello from your own image"
CONTAINERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY etc/ /etc/
ENV APPLETS="sh cat echo ls find sort stat sha256sum cut head wc rm mkdir"
RUN ["/bin/busybox", "sh", "-c", "for a in $APPLETS; do /bin/busybox ln -s busybox /bin/$a; done"]
COPY data/hello.txt /data/hello.txt
COPY data/old/ /data/old/
COPY data/unread-1.bin /data/unread-1.bin
COPY opt/ /opt/
RUN rm /opt/lib/part-0.bin /data/old/gone.txt && rm -rf /data/old \\
    && mkdir /data/old && echo new > /data/old/new.txt
CMD ["/bin/cat", "/data/hello.txt"]
"""


def write_context(directory: Path, *, unread_bytes: int = 6 << 20) -> Path:
    """The build context with its Containerfile; returns the Containerfile's path."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, directory / "busybox")
    (directory / "busybox").chmod(0o755)
    (directory / "etc").mkdir(exist_ok=True)
    (directory / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (directory / "data").mkdir(exist_ok=True)
    (directory / "data" / "hello.txt").write_text(OUTPUT + "\n")
    (directory / "data" / "old").mkdir(exist_ok=True)
    (directory / "data" / "old" / "gone.txt").write_text("deleted by a later layer\n")
    (directory / "data" / "old" / "kept.txt").write_text("hidden by an opaque directory\n")
    rng = random.Random(14)
    (directory / "data" / "unread-1.bin").write_bytes(rng.randbytes(unread_bytes // 2))
    (directory / "opt" / "lib").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (directory / "opt" / "lib" / f"part-{i}.bin").write_bytes(rng.randbytes(unread_bytes // 8))
    (directory / "Containerfile").write_text(CONTAINERFILE)
    return directory / "Containerfile"


def build_and_save(containerfile: Path, work: Path, formats: dict[str, Path]) -> None:
    """``podman build`` then ``podman save --format F -o PATH`` for each F → PATH."""
    tag = "localhost/byo-test:latest"
    with PodmanEnv(work) as env:
        env.build("--file", str(containerfile), "--tag", tag, str(containerfile.parent))
        for fmt, path in formats.items():
            env.podman("save", "--format", fmt, "--output", str(path), tag)
