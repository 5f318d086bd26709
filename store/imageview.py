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

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from store.tree import LayerTree, Node

MAX_SYMLINKS = 40  # Linux's limit per path resolution (ELOOP past it)


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
        links in every component; None if it does not exist, loops, or leads nowhere."""
        todo = [p for p in path.split("/") if p]
        done: list[str] = []
        hops = 0
        found: tuple[int, Node] | None = None
        while todo:
            part = todo.pop(0)
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
                todo = [p for p in target.split("/") if p] + todo
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
