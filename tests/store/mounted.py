"""One layer blob served through the real mounted store, for tests of hostile input.

:class:`MountedStore` runs a real ``docker-registry`` and ``python -m store`` on a FUSE mount;
:meth:`MountedStore.serve` pushes a blob as a one-layer OCI image (with the TOC digest
annotation) and returns its ``diff`` path. :meth:`expect_refused` and :meth:`read` turn the
store's answers back into the format library's error classes, using the one log line the
store writes per refusal (``refusing layer <digest> of <ref>: <Class>: <message>``) or per
unverified chunk (``refusing unverified data: chunk <digest>: <Class>: <message> (read of
<image>, layer <digest>, <path> at offset <n>)``), so one
test body can check the library and the mounted store alike.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from store import estargz
from tests.store import images
from tests.store.conftest import StoreProcess

REFUSAL_BOUND_SEC = 10.0  # a refused layer's lookup must answer within this
_ERRORS = {
    name: getattr(estargz, name)
    for name in estargz.__all__
    if isinstance(getattr(estargz, name), type)
    and issubclass(getattr(estargz, name), estargz.EstargzError)
}
_counter = itertools.count()


def toc_digest_of(data: bytes) -> str:
    """The layer's real TOC digest (what an honest annotation says), or a dummy one when the
    TOC cannot even be inflated (the store then fails at that step, before comparing)."""
    try:
        footer = estargz.parse_footer(data[-estargz.MAX_FOOTER_SIZE :], len(data))
        lo, hi = estargz.toc_range(footer, len(data))
        return estargz.scan_toc(data[lo:hi], footer).digest
    except estargz.EstargzError:
        return "sha256:" + "0" * 64


class MountedStore:
    def __init__(self, workdir: Path, registry, config: str = "") -> None:
        self.registry = registry
        self.store = StoreProcess(workdir, config).start()

    def stop(self) -> None:
        self.store.stop()

    def log_lines(self, needle: str) -> list[str]:
        """The messages of the store's log lines (JSON lines) that contain ``needle``."""
        out = []
        for line in self.store.log.read_text().splitlines():
            try:
                msg = json.loads(line)["msg"]
            except (ValueError, KeyError, TypeError):
                msg = line
            if needle in msg:
                out.append(msg)
        return out

    def serve(self, data: bytes, toc_digest: str | None = None) -> tuple[Path, str]:
        """Push ``data`` as a one-layer image; ``(diff path, blob digest)``."""
        n = next(_counter)
        blob = images.Blob(
            data,
            "sha256:" + hashlib.sha256(b"diff%d" % n).hexdigest(),
            toc_digest or toc_digest_of(data),
            len(data),
        )
        images.push(self.registry.host, f"hostile/l{n}", "1", [blob])
        ref = f"{self.registry.host}/hostile/l{n}:1"
        return self.store.layer_dir(ref, blob.digest) / "diff", blob.digest

    def expect_refused(self, diff: Path, digest: str) -> estargz.EstargzError:
        """Looking ``diff`` up answers EIO quickly, twice, with one log line naming the cause;
        returns the library error that line names."""
        for _ in range(2):
            start = time.monotonic()
            try:
                os.stat(diff)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
            else:
                raise AssertionError(f"{diff} was served")
            assert time.monotonic() - start < REFUSAL_BOUND_SEC
        lines = self.log_lines(f"refusing layer {digest}")
        assert len(lines) == 1, lines
        return _error_from(lines[0].split(f"refusing layer {digest} of ", 1)[1].split(": ", 1)[1])

    def read(self, path: Path) -> bytes:
        """The file's bytes through the mount; EIO becomes the library error the log names."""
        try:
            return path.read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
        lines = self.log_lines("refusing unverified data: chunk ")
        assert lines, "EIO without a log line"
        text = re.sub(r"^refusing unverified data: chunk \S*: ", "", lines[-1])
        text = text.rpartition(" (read of ")[0] or text  # where the read was: see _read_site
        raise _error_from(text)


@contextlib.contextmanager
def mounted_store(work: Path, config: str = "") -> Iterator[MountedStore]:
    """A registry and a :class:`MountedStore` on it (``config``), under ``work``; both
    stopped on leaving. Skips the test when ``docker-registry`` is not installed."""
    from harness.registry_server import RegistryServer

    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed")
    with RegistryServer(storage_dir=work / "registry") as reg:
        store = MountedStore(work / "store", reg, config)
        try:
            yield store
        finally:
            store.stop()


def _error_from(text: str) -> estargz.EstargzError:
    name, _, message = text.partition(": ")
    cls = _ERRORS.get(name)
    assert cls is not None, f"not a format error: {text}"
    return cls(message)
