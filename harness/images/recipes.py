"""What a workload image is made of, and what the runner does with it.

A :class:`Recipe` is pure data: the base, the layers on top of it (Debian packages installed in
a chroot, or plain files), the image config, and how the workload is run and judged (command,
stdin script, the ready line on stdout, the timeout). Its :func:`recipe_hash` names the cached
build, so changing anything that changes the image bytes changes the hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Bump when the builder changes the trees it builds for the same recipe (what apt leaves in a
# chroot layer's upperdir, what is dropped from it): names the cached trees and the images.
BUILDER_VERSION = 2
# Bump when the tar writer changes the bytes of a layer written from the same tree (layertar):
# cached trees are written again, images are rebuilt. 2: every layer names its root (``./``).
LAYER_FORMAT = 2

DEBIAN_SUITE = "bookworm"


@dataclass(frozen=True)
class FileSpec:
    """One entry of a file-set layer.

    ``kind`` is ``file`` (``data`` or ``source``, a host path whose bytes are copied), ``dir``,
    ``symlink`` (``target``), ``whiteout`` (deletes ``path`` from lower layers) or ``opaque``
    (``path`` is a directory whose lower contents are hidden).
    """

    path: str
    kind: str = "file"
    data: bytes = field(default=b"", repr=False)
    source: str = ""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """One image layer: packages installed with apt, then shell commands, then files.

    A layer with ``packages`` or ``run`` is built in a chroot over the lower layers (overlayfs)
    and stored as the diff; ``files`` are added to that diff as given.
    """

    comment: str
    packages: tuple[str, ...] = ()
    run: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """A workload image and how to run it.

    ``base`` is ``debian`` (an ``mmdebstrap --variant=minbase`` tree of :data:`DEBIAN_SUITE` as
    the first layer) or ``scratch`` (no base: the layers are everything). ``cmd``/``env``/
    ``workdir``/``user`` go into the image config. The runner uses ``run_cmd`` (the command
    given to ``podman create``, empty = the image's own), feeds ``stdin`` when set, waits for
    ``ready_line`` on the container's stdout (``None`` = wait for exit), expects
    ``expected_output`` in stdout, and gives up after ``timeout`` seconds.
    """

    name: str
    base: str
    layers: tuple[LayerSpec, ...]
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = (
        ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    )
    workdir: str = "/"
    user: str = ""
    run_cmd: tuple[str, ...] = ()
    stdin: str | None = None
    ready_line: str | None = None
    expected_output: str | None = None
    timeout: float = 120.0
    description: str = ""


# Recipe fields that tune the run only: they do not change the image, so not its hash.
RUN_FIELDS = ("name", "run_cmd", "stdin", "ready_line", "expected_output", "timeout", "description")


def recipe_hash(recipe: Recipe) -> str:
    """A short hex name of everything that determines the image bytes (not how it is run)."""
    data = asdict(recipe)
    for key in RUN_FIELDS:
        data.pop(key, None)
    data["builder"] = BUILDER_VERSION
    data["layer_format"] = LAYER_FORMAT
    data["suite"] = DEBIAN_SUITE if recipe.base == "debian" else None
    # Files copied from the host count by content, not by path.
    data["sources"] = sorted(
        {
            f.source: hashlib.sha256(Path(f.source).read_bytes()).hexdigest()
            for layer in recipe.layers
            for f in layer.files
            if f.source
        }.items()
    )
    text = json.dumps(data, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot hash {type(value).__name__}")


# The published python and gcc images are built FROM buildpack-deps (curl, then scm, then the
# build dependencies), glassfish FROM java:8-jdk (buildpack-deps' curl and scm plus a JDK),
# rethinkdb FROM plain debian. The recipes keep that ancestry, so images are about as large
# and as layered as the ones in the published chart, and python and gcc share their lower
# layers byte for byte.
_CURL = LayerSpec(
    "buildpack-deps curl",
    packages=("ca-certificates", "curl", "gnupg", "netbase", "wget", "tzdata"),
)
_SCM = LayerSpec(
    "buildpack-deps scm",
    packages=("git", "mercurial", "openssh-client", "subversion", "procps"),
)
_BUILD_DEPS = LayerSpec(
    "buildpack-deps build dependencies",
    packages=(
        "autoconf",
        "automake",
        "bzip2",
        "dpkg-dev",
        "file",
        "g++",
        "gcc",
        "libbz2-dev",
        "libc6-dev",
        "libcurl4-openssl-dev",
        "libdb-dev",
        "libevent-dev",
        "libffi-dev",
        "libgdbm-dev",
        "libglib2.0-dev",
        "libgmp-dev",
        "libjpeg-dev",
        "libkrb5-dev",
        "liblzma-dev",
        "libncurses-dev",
        "libpng-dev",
        "libpq-dev",
        "libreadline-dev",
        "libsqlite3-dev",
        "libssl-dev",
        "libtool",
        "libwebp-dev",
        "libxml2-dev",
        "libxslt1-dev",
        "libyaml-dev",
        "make",
        "patch",
        "unzip",
        "xz-utils",
        "zlib1g-dev",
    ),
)
_CERTS = LayerSpec("certificates and tzdata", packages=("ca-certificates", "tzdata", "netbase"))

# Like the official postgres image's entrypoint: start as root, hand the cluster, its config
# and the socket directory to the postgres user, then drop privileges (setpriv, util-linux, in
# the Debian base) and exec the server. The ownership step finds nothing to change after a
# full or an eStargz pull; it matters after podman 4.3's zstd:chunked partial pull, which
# ignores the owners in the layer's TOC (containers/storage 1.43 reads keys "UID"/"GID"/
# "ModTime", its writer emits "uid"/"gid"/"modtime") and leaves every file root's. SSL stays
# off: there is no TCP listener, and the snakeoil key's group (ssl-cert) is lost the same way.
_POSTGRES_START = (
    'set -e; if [ "$(id -u)" = 0 ]; then'
    " find /var/lib/postgresql /etc/postgresql /run/postgresql ! -user postgres"
    " -exec chown postgres:postgres {} +;"
    " set -- setpriv --reuid=postgres --regid=postgres --init-groups; fi;"
    ' exec "$@" /usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main'
    " -c config_file=/etc/postgresql/15/main/postgresql.conf"
    " -c listen_addresses= -c unix_socket_directories=/tmp -c ssl=off 2>&1"
)

_HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n'

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="python",
            description="python3 prints hello (stands in for python:3.7)",
            base="debian",
            layers=(
                _CURL,
                _SCM,
                _BUILD_DEPS,
                LayerSpec("python runtime", packages=("python3", "python3-dev", "python3-venv")),
                LayerSpec("pip", packages=("python3-pip", "python3-setuptools", "python3-wheel")),
            ),
            cmd=("python3",),
            run_cmd=("python3", "-c", "print('hello')"),
            expected_output="hello",
            timeout=120,
        ),
        Recipe(
            name="gcc",
            description="gcc compiles and runs hello from stdin (stands in for gcc:9.2.0)",
            base="debian",
            layers=(
                _CURL,
                _SCM,
                _BUILD_DEPS,
                LayerSpec("compilers", packages=("gcc-12", "g++-12", "gfortran-12", "cpp-12")),
            ),
            cmd=("/bin/sh",),
            run_cmd=("/bin/sh", "-c", "gcc -x c -o /tmp/hello - && /tmp/hello"),
            stdin=_HELLO_C,
            expected_output="hello",
            timeout=180,
        ),
        Recipe(
            name="postgres",
            description="postgres 15 on a pre-initialised cluster, until it accepts connections",
            base="debian",
            layers=(
                _CERTS,
                LayerSpec(
                    "postgresql server with its cluster",
                    packages=("postgresql-15",),
                    run=("mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql",),
                ),
            ),
            cmd=("/bin/sh", "-c", _POSTGRES_START),
            ready_line="database system is ready to accept connections",
            timeout=180,
        ),
        Recipe(
            name="tomcat",
            description="Tomcat 10 on OpenJDK 17, until startup (stands in for glassfish)",
            base="debian",
            layers=(
                _CURL,
                _SCM,
                LayerSpec("java development kit", packages=("openjdk-17-jdk-headless",)),
                LayerSpec("application server", packages=("tomcat10", "tomcat10-admin")),
            ),
            env=(
                ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
                ("CATALINA_HOME", "/usr/share/tomcat10"),
                ("CATALINA_BASE", "/var/lib/tomcat10"),
                ("CATALINA_TMPDIR", "/tmp"),
            ),
            cmd=("/bin/sh", "-c", "exec /usr/share/tomcat10/bin/catalina.sh run 2>&1"),
            ready_line="Server startup in",
            timeout=300,
        ),
        Recipe(
            name="redis",
            description="redis-server until ready (stands in for rethinkdb)",
            base="debian",
            layers=(
                _CERTS,
                LayerSpec("redis server", packages=("redis-server",)),
            ),
            cmd=("redis-server", "--save", "", "--appendonly", "no"),
            ready_line="Ready to accept connections",
            timeout=120,
        ),
    )
}
