"""Store test helpers: a local blob reader so the data path runs without a registry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class FileBlob:
    """A :class:`store.layer.BlobReader` over a local file; counts requests like a registry."""

    def __init__(self, path: Path) -> None:
        self.data = Path(path).read_bytes()
        self.size = len(self.data)
        self.requests: list[list[tuple[int, int]]] = []

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.requests.append(list(ranges))
        return [self.data[lo:hi] for lo, hi in ranges]


def tar_of(files: dict[str, bytes], mtime: int = 1_700_000_000) -> bytes:
    """A PAX tar of regular files, in ``files``' order."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), mtime
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def view_layer(view: Any, blob: Any, toc_digest: str, cache_dir: Path, key: str = "view") -> Any:
    """A :class:`store.layer.Layer` over ``blob`` with its loaded index ``view``
    (:func:`store.estargz_view.load_layer_index`), its chunk cache in ``cache_dir``."""
    from store.cache import ChunkCache
    from store.layer import Layer
    from store.tree import LayerTree

    return Layer(
        key=key,
        digest="sha256:" + "0" * 64,
        toc_digest=toc_digest,
        tree=LayerTree(view.index),
        index=view,
        blob=blob,
        cache=ChunkCache(cache_dir, 1 << 30),
    )


async def local_layer(
    path: Path, digest: str, toc_digest: str, cache_dir: Path, key: str = "local", **kw: Any
) -> Any:
    """A :class:`store.layer.Layer` over the eStargz blob at ``path`` (a :class:`FileBlob`; its
    TOC checked against ``toc_digest``), its chunk cache in ``cache_dir``; ``kw`` to Layer."""
    from store.cache import ChunkCache
    from store.estargz_view import load_layer_index
    from store.layer import Layer
    from store.tree import LayerTree

    blob = FileBlob(path)
    view = await load_layer_index(blob, toc_digest)
    return Layer(
        key=key,
        digest=digest,
        toc_digest=toc_digest,
        tree=LayerTree(view.index),
        index=view,
        blob=blob,
        cache=ChunkCache(cache_dir, 1 << 30),
        **kw,
    )


async def one_file_layer(
    tmp_path: Path, size: int, chunk_size: int, key: str = "small", **kw: Any
) -> Any:
    """``(layer, node, payload)``: a local layer (:func:`local_layer`) of one file ``big`` of
    ``size`` incompressible bytes (no free riders) in ``chunk_size`` chunks, like
    zstd:chunked's small ones; its blob and cache under ``tmp_path``; ``kw`` to Layer."""
    import io
    import random
    import tarfile

    from store.estargz import convert

    payload = random.Random(size).randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        ti = tarfile.TarInfo("big")
        ti.size = len(payload)
        tar.addfile(ti, io.BytesIO(payload))
    raw.seek(0)
    out = tmp_path / "layer.blob"
    with out.open("wb") as f:
        result = convert(raw, f, chunk_size=chunk_size, level=1)
    layer = await local_layer(out, result.digest, result.toc_digest, tmp_path / "cache", key, **kw)
    node = next(n for p, n in layer.tree.walk() if p == "big")
    return layer, node, payload


# -- end-to-end fixtures: a real registry, the store mounted as a process ----------------------

import base64  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402

from harness.processes import die_with_parent  # noqa: E402
from tests.store import images  # noqa: E402


def _mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


STORE_IMPLS = ("ours", "go")
# What each store logs when a chunk does not match its TOC digest.
VERIFICATION_FAILED_LOG = {"ours": "chunk verification failed", "go": "not verified"}


class StoreProcess:
    """A layer store on a mountpoint, with its config; always unmounted on stop.

    ``impl`` is ``ours`` (``python -m store``) or ``go`` (the reference Go store, whose binary
    is given as ``go_binary``); ``env`` adds to the environment the process inherits (e.g.
    ``SSL_CERT_FILE``).
    """

    def __init__(
        self,
        workdir: Path,
        config: str = "",
        impl: str = "ours",
        go_binary: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if impl not in STORE_IMPLS or (impl == "go") != (go_binary is not None):
            raise ValueError(f"store impl {impl!r} (go_binary={go_binary})")
        self.impl = impl
        self.go_binary = go_binary
        self.workdir = workdir
        self.mnt = workdir / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "config.toml"
        self.config.write_text(config)
        self.log = workdir / "store.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreProcess:
        exe = [str(self.go_binary)] if self.impl == "go" else [sys.executable, "-m", "store"]
        self.proc = subprocess.Popen(
            [
                *exe,
                "--config",
                str(self.config),
                "--root",
                str(self.workdir / "root"),
                "--log-level",
                "debug",
                str(self.mnt),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),  # noqa: SIM115 - closed with the process
            env={**os.environ, **self.env} if self.env else None,
            # A SIGKILLed pytest takes the store along (SIGTERM: it unmounts itself).
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + 20
        while not self._serving():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"store did not mount: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def _serving(self) -> bool:
        if self.impl == "go":  # no status file: a live mount (a dead one fails stat) serves
            try:
                return _mounted(self.mnt) and os.stat(self.mnt) is not None
            except OSError:
                return False
        try:
            return (self.mnt / "status").read_bytes().startswith(b"{")
        except OSError:  # a stale mount from an earlier run, not cleaned yet
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if _mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        if _mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)

    def hang_report(self, lines: int = 60) -> str:
        """What the store was doing, for a test that found a client stuck on it: the last
        ``lines`` of its log, after (Go store) the goroutine dump SIGQUIT makes it print on
        its way out. The store is stopped afterwards either way."""
        if self.impl == "go" and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            lines = max(lines, 3000)  # every goroutine's stack
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"{self.impl} store log ({self.log}), last {len(tail)} lines:\n" + "\n".join(tail)

    @property
    def verification_failed_log(self) -> str:
        return VERIFICATION_FAILED_LOG[self.impl]

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.mnt / base64.b64encode(ref.encode()).decode() / digest

    def status(self) -> dict:
        """Our store's ``status`` file (the Go store has none)."""
        import json

        assert self.impl == "ours", "only our store has a status file"
        return json.loads((self.mnt / "status").read_text())


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[object]:
    from harness.registry_server import RegistryServer

    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed")
    with RegistryServer(storage_dir=tmp_path / "registry") as reg:
        yield reg


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses ``store_impl`` (through ``store_factory``) runs against each store,
    except those marked ``store_ours_only(reason)`` for a feature the Go store lacks."""
    if "store_impl" in metafunc.fixturenames:
        ours_only = metafunc.definition.get_closest_marker("store_ours_only")
        if ours_only is not None and not (ours_only.args or ours_only.kwargs.get("reason")):
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: store_ours_only needs a reason")
        impls = ["ours"] if ours_only else list(STORE_IMPLS)
        metafunc.parametrize("store_impl", impls, indirect=True)


GO_NEEDS_PODMAN_4 = (
    "podman >= 5 looks layers up by TOC digest, which the Go store v0.12 does not know "
    "('unknown digest'): every layer is pulled in full"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Go store runs under the host's podman 4.3 only (see GO_NEEDS_PODMAN_4): its tests
    on the newer runtime nodes are skipped, with that reason."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("store_impl") == "go" and params.get("runtime_node", "host") != "host":
            item.add_marker(pytest.mark.skip(reason=f"go store: {GO_NEEDS_PODMAN_4}"))


@pytest.fixture
def store_impl(request: pytest.FixtureRequest) -> str:
    """``ours`` or ``go``: which store the test mounts (parametrized by pytest_generate_tests)."""
    return request.param


@pytest.fixture(scope="session")
def go_store_binary() -> Path:
    """The reference Go store, built (or found in the cache) once per session by the same
    function as ``lazybench stores build go``. A failed build fails the tests; nothing skips."""
    from harness.gostore import build

    return build()


@pytest.fixture
def store_factory(
    tmp_path: Path, store_impl: str, request: pytest.FixtureRequest
) -> Iterator[object]:
    started: list[StoreProcess] = []
    go_binary = request.getfixturevalue("go_store_binary") if store_impl == "go" else None

    def make(config: str = "", name: str = "store") -> StoreProcess:
        sp = StoreProcess(tmp_path / name, config, impl=store_impl, go_binary=go_binary)
        started.append(sp)
        return sp.start()

    yield make
    for sp in started:
        sp.stop()


@pytest.fixture(scope="module")
def layers() -> dict:
    """The lower and upper layer tars of the end-to-end tests' image, and the big file."""
    rng = __import__("random").Random(7)
    big = bytes(rng.getrandbits(8) for _ in range(300_000)) * 4
    lower = images.make_tar(lambda t: images.lower_layer(t, big))
    upper = images.make_tar(images.upper_layer)
    return {"lower": lower, "upper": upper, "big": big}


# -- the runtime generations the end-to-end tests run podman on --------------------------------

RUNTIME_NODES = ("host", "trixie", "sid")


@pytest.fixture(scope="session", params=RUNTIME_NODES)
def runtime_node(request: pytest.FixtureRequest) -> object:
    """The podman generation under test: ``None`` for the host's podman 4.3, else a built
    :class:`harness.runtimes.Node` (podman 5.4 in trixie, 5.8 in sid), built on first use in
    the session and cached (``lazybench runtimes build``)."""
    if request.param == "host":
        return None
    from harness.runtimes import NodeError, build_node

    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (ci/install-system-deps)")
    try:
        return build_node(request.param)
    except NodeError as exc:
        pytest.fail(f"building runtime node {request.param}: {exc}")


def lost_lazy_layers(node: object) -> bool:
    """True for runtimes with the containers/storage ≥ 1.58 bug: ``PutAdditionalLayer`` never
    sets the layer's location, so a lazily pulled image is gone once the pull exits."""
    from harness.runtimes import version_tuple

    return node is not None and version_tuple(node.storage_version) >= (1, 58)  # type: ignore[attr-defined]


@pytest.fixture
def podman_env(runtime_node: object) -> Callable[..., object]:
    """``podman_env(workdir, **PodmanEnv options)``: a PodmanEnv on the runtime under test."""
    from harness.podman import PodmanEnv

    def make(workdir: Path, **kw: object) -> PodmanEnv:
        return PodmanEnv(workdir, node=runtime_node, **kw)  # type: ignore[arg-type]

    return make
