"""An image's layers seen as the container sees them: paths resolved through the overlay.

The store serves each layer's tree on its own; the runtime stacks them with overlayfs. To
know which file a path names inside a running container (:mod:`store.libprefetch` asks for
the libraries ``ld.so`` will open), :class:`MergedView` applies the same rules to the trees
it has: the topmost layer holding the path wins; a whiteout, or an ancestor that is opaque or
not a directory, hides the layers below (overlayfs.rst, "whiteouts and opaque
directories"); symbolic links are followed as the kernel follows them, at most
:data:`MAX_SYMLINKS` times (path_resolution(7)), never above the image's root.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from store.tree import LayerTree, Node

MAX_SYMLINKS = 40  # Linux's limit per path resolution (ELOOP past it)
# The PATH a container gets when its image sets none (podman's and the OCI runtimes' default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PATH_MAX = 4096  # bytes of a path the kernel resolves (ENAMETOOLONG past it)
MAX_STEPS = 1024  # path components one resolution walks, links' included
MAX_DEPTH = 128  # directories deep a resolution goes
MAX_PATH_DIRS = 64  # PATH directories kept (a hint: a config's PATH may be of any length)
SHEBANG_MAX = 256  # bytes of a script's first line read for its interpreter (Linux reads 256)


@dataclass(frozen=True)
class Found:
    """Where a path led: ``layer`` is the position in :attr:`MergedView.trees` (0 the
    topmost), ``path`` the resolved path (no symbolic link left in it, no leading ``/``)."""

    layer: int
    node: Node
    path: str


class MergedView:
    """Path lookups through ``trees``, topmost layer first.

    A layer missing from ``trees`` (not loaded) is simply not seen: a lookup may then find a
    lower layer's file that the missing one would have hidden. Callers use the answer as a
    hint only (what to fetch early), never to serve a file.
    """

    def __init__(self, trees: Sequence[LayerTree]) -> None:
        self.trees = list(trees)

    def _entry(self, path: str) -> tuple[int, Node] | None:
        """The topmost node at ``path`` (symbolic-link free), or None if absent or hidden."""
        for i, tree in enumerate(self.trees):
            node = tree.lookup_path(path)
            if node is not None:
                return None if node.whiteout else (i, node)
            if self._hides_below(tree, path):
                return None
        return None

    @staticmethod
    def _hides_below(tree: LayerTree, path: str) -> bool:
        """Whether ``tree``, which lacks ``path``, hides it in the layers below: one of its
        ancestors is opaque, whited out or not a directory in this layer."""
        node: Node | None = tree.root
        parts = [p for p in path.split("/") if p]
        for part in parts[:-1]:
            children = node.children if node is not None else None
            if children is None:
                return False
            node = children.get(part.encode("utf-8", "surrogateescape"))
            if node is None:
                return False
            if node.whiteout or not node.is_dir or node.opaque:
                return True
        return False

    def resolve(self, path: str) -> Found | None:
        """The file ``path`` (absolute or relative to the root) names, following symbolic
        links in every component; None if it does not exist, loops, leads nowhere, is
        longer than :data:`PATH_MAX` bytes, or takes more than :data:`MAX_STEPS` components
        or a depth of :data:`MAX_DEPTH` (each step looks the whole path up again: a hostile
        tree must not make one resolution cost seconds)."""
        if not path_ok(path):
            return None
        todo = [p for p in reversed(path.split("/")) if p]  # next component last
        done: list[str] = []
        hops = steps = 0
        found: tuple[int, Node] | None = None
        while todo:
            part = todo.pop()
            steps += 1
            if steps > MAX_STEPS or len(done) >= MAX_DEPTH:
                return None
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                found = None
                continue
            done.append(part)
            found = self._entry("/".join(done))
            if found is None:
                return None
            node = found[1]
            if node.mode & 0o170000 == 0o120000:  # a symbolic link
                hops += 1
                if hops > MAX_SYMLINKS:
                    return None
                target = node.target.decode("utf-8", "surrogateescape")
                done.pop()
                if target.startswith("/"):
                    done = []
                todo += [p for p in reversed(target.split("/")) if p]
                found = None
            elif todo and not node.is_dir:
                return None
        if found is None:
            if done:
                found = self._entry("/".join(done))
            else:
                return Found(len(self.trees) - 1, self.trees[-1].root, "") if self.trees else None
            if found is None:
                return None
        return Found(found[0], found[1], posixpath.join(*done) if done else "")


@dataclass(frozen=True)
class DefaultProcess:
    """The process a container of the image runs unless told otherwise: ``program`` is
    argv[0] of ``Entrypoint`` + ``Cmd`` (OCI image-spec, config.md), ``path`` the
    directories of its ``PATH`` (from ``Env``, else :data:`DEFAULT_PATH`), ``workdir`` its
    ``WorkingDir`` (``/`` when unset)."""

    program: str
    path: tuple[str, ...]
    workdir: str = "/"

    @classmethod
    def from_config(cls, config: bytes) -> DefaultProcess | None:
        """Read from an image config's JSON bytes; None when it names no program (no
        ``Entrypoint`` or ``Cmd``, or fields of the wrong type: a hint is never an error)."""
        try:
            doc = json.loads(config)
        except ValueError:
            return None
        cfg = doc.get("config") if isinstance(doc, dict) else None
        if not isinstance(cfg, dict):
            return None
        argv: list[object] = []
        for key in ("Entrypoint", "Cmd"):
            value = cfg.get(key)
            if isinstance(value, list):
                argv += value
        if not argv or not isinstance(argv[0], str) or not path_ok(argv[0]):
            return None
        path = DEFAULT_PATH
        env = cfg.get("Env")
        for item in env if isinstance(env, list) else []:
            if isinstance(item, str) and item.startswith("PATH="):
                path = item[5:]
        workdir = cfg.get("WorkingDir")
        dirs = dict.fromkeys(
            posixpath.normpath(d) for d in path.split(":") if d.startswith("/") and path_ok(d)
        )
        return cls(
            argv[0],
            tuple(dirs)[:MAX_PATH_DIRS],
            workdir
            if isinstance(workdir, str) and workdir.startswith("/") and path_ok(workdir)
            else "/",
        )

    def candidates(self, name: str) -> list[str]:
        """Absolute paths ``name`` may run from, in ``execvp(3)``'s order: itself when it
        holds a ``/`` (relative to :attr:`workdir`), else each ``PATH`` directory."""
        if not path_ok(name):
            return []
        if "/" in name:
            return [posixpath.normpath(posixpath.join(self.workdir, name))]
        return [posixpath.join(d, name) for d in self.path]

    def interpreter(self, head: bytes) -> list[list[str]]:
        """What ``execve(2)`` runs for a file starting with ``head``, as fs/binfmt_script.c
        reads a ``#!`` line: the programs in the order they start, each as the paths it may
        be — ``[["/bin/sh"]]``, or for ``#!/usr/bin/env NAME`` ``env`` and then ``NAME``
        through ``PATH``. [] when ``head`` is no script or names no interpreter the kernel
        would run (a relative path, or one cut off at :data:`SHEBANG_MAX` bytes)."""
        if not head.startswith(b"#!"):
            return []
        buf = head[:SHEBANG_MAX]
        if b"\n" in buf:
            raw = buf[2:].split(b"\n", 1)[0]
        else:
            # No newline in the kernel's buffer: unless the interpreter's path ends within
            # it (a blank or NUL after it, or the file's end), it was cut off: ENOEXEC.
            raw = buf[2 : SHEBANG_MAX - 1]  # the line ends at the kernel's buf_end
            body = buf[2:].lstrip(b" \t")  # a terminator may be the last byte itself
            if len(head) >= SHEBANG_MAX and not any(c in body for c in b" \t\0"):
                return []
        raw = raw.split(b"\0", 1)[0].strip(b" \t")
        interp, _, arg = (raw.replace(b"\t", b" ")).partition(b" ")
        path = interp.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            return []
        out = [[path]]
        # The rest of the line is one argument: env splits it only when told to (-S).
        rest = arg.strip(b" \t").decode("utf-8", "surrogateescape")
        if posixpath.basename(path) == "env" and rest:
            name = _env_program(rest)
            if name:
                out.append(self.candidates(name))
        return out


def _env_program(arg: str) -> str | None:
    """The program ``env`` runs given its one argument from a ``#!`` line (coreutils env:
    ``-S`` splits the rest; options and ``NAME=VALUE`` come before the program)."""
    if not arg.startswith("-S"):
        return None if arg.startswith("-") or " " in arg else arg
    words = arg[2:].split()
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("-u", "-C", "--unset", "--chdir"):
            skip = True  # an option with a separate value
        elif not word.startswith("-") and "=" not in word:
            return word
    return None


def path_ok(path: str) -> bool:
    """Whether ``path`` is a name the kernel could look up: non-empty, encodable as the TOC's
    names are (UTF-8, undecodable bytes as surrogate escapes), under :data:`PATH_MAX` bytes."""
    try:
        return 0 < len(path.encode("utf-8", "surrogateescape")) < PATH_MAX
    except UnicodeError:
        return False
