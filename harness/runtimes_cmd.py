"""`lazybench runtimes build NAME…`, `ls` and `prune`: the runtime nodes (podman generations)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.cli import (
    CACHE_DIR_DEFAULT,
    UserError,
    check_cache_dir,
    existing_dir,
    make_console,
    require_root,
)


def register(sub: argparse._SubParsersAction) -> None:
    from harness.runtimes import NODES

    parser = sub.add_parser(
        "runtimes", help="build and list runtime nodes (podman 5.x from Debian trixie / sid)"
    )
    rsub = parser.add_subparsers(dest="runtimes_command", required=True, metavar="ACTION")
    build = rsub.add_parser("build", help="build nodes (reusing cached builds); print their roots")
    build.add_argument(
        "names", nargs="*", metavar="NAME", help=f"{' | '.join(NODES)} (default: all)"
    )
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"default: {CACHE_DIR_DEFAULT}",
    )
    build.add_argument(
        "--mirror",
        default=None,
        help="Debian archive (default: $LAZYBENCH_DEBIAN_MIRROR, else as apt's sources)",
    )
    build.set_defaults(func=cmd_build)
    ls = rsub.add_parser(
        "ls", aliases=["list"], help="list cached nodes with their podman versions and sizes"
    )
    ls.add_argument(
        "--cache-dir", type=existing_dir, default=None, help=f"default: {CACHE_DIR_DEFAULT}"
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per node")
    ls.set_defaults(func=cmd_ls)
    prune = rsub.add_parser(
        "prune",
        help="remove nodes built from older recipes, and node views a killed run left mounted",
    )
    prune.add_argument("--cache-dir", type=Path, default=None, help=f"default: {CACHE_DIR_DEFAULT}")
    prune.add_argument("--all", action="store_true", help="remove the current builds too")
    prune.set_defaults(func=cmd_prune)


def cmd_build(args: argparse.Namespace) -> int:
    from harness.runtimes import NODES, NodeError, build_node

    console = make_console(stderr=True, markup=False)
    names = args.names or list(NODES)
    for name in names:
        if name not in NODES:
            raise UserError(f"unknown node {name!r} (known: {', '.join(NODES)})")
    require_root("runtimes build", "mmdebstrap, chroot")
    check_cache_dir(args.cache_dir)
    for name in names:
        with console.status(f"node {name}") as status:

            def show(line: str, n: str = name) -> None:
                if " is damaged " in line:  # why it is built again: kept on the screen
                    console.print(line)
                status.update(f"node {n}: {line}")

            try:
                node = build_node(name, args.cache_dir, mirror=args.mirror, progress=show)
            except NodeError as exc:
                raise UserError(str(exc)) from None
        v = node.versions
        console.print(
            f"node {name}: podman {v.get('podman')}, containers/storage "
            f"{v.get('containers_storage')}, {v.get('size_bytes', 0) / 1e6:.0f} MB"
        )
        print(node.root)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from harness.runtimes import list_nodes

    entries = list_nodes(args.cache_dir)
    if args.json:
        for e in entries:
            print(json.dumps(e, sort_keys=True))
        return 0
    if not entries:
        print("no runtime nodes built (lazybench runtimes build)")
        return 0
    print(f"{'node':<8} {'podman':<8} {'c/storage':<10} {'MB':>6} {'built':<21} path")
    for e in entries:
        mark = "" if e["current"] else "  (old recipe: lazybench runtimes prune)"
        print(
            f"{e['node']:<8} {e['podman']:<8} {e['containers_storage']:<10} "
            f"{e['size_bytes'] / 1e6:>6.0f} {e['built']:<21} {e['path']}{mark}"
        )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from harness.runtimes import NodeError, clean_stale_views, prune_nodes

    try:
        removed = clean_stale_views() + prune_nodes(args.cache_dir, everything=args.all)
    except NodeError as exc:
        raise UserError(str(exc)) from None
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing to remove")
    return 0
