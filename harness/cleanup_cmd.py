"""`lazybench cleanup`: remove what killed runs left (processes, mounts, directories, links)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli import UserError, require_root


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cleanup",
        help="remove what killed runs left: stores, containers, mounts, directories, links",
        description=(
            "Remove what lazybench processes that died without cleaning up (SIGKILL, OOM) "
            "left: their working directories with the layer stores, containers and mounts "
            "in them, their network namespaces, runtime node views and unfinished node "
            "builds. What live runs use is left alone. `lazybench run` does the same before "
            "it starts."
        ),
    )
    parser.add_argument(
        "--dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also look in DIR (the temporary directory and /tmp are always looked in)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="the image cache whose builds to look at (default: $LAZYBENCH_CACHE or "
        "~/.cache/lazybench)",
    )
    parser.set_defaults(func=cmd_cleanup)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from harness.cli import default_cache_dir
    from harness.stale import sweep_killed_runs

    require_root("cleanup", "stopping containers, unmounting, removing network namespaces")
    for directory in args.dir:
        # A mistyped DIR was looked in and found clean: "nothing to clean up", while what
        # the killed run left there stayed.
        if not Path(directory).is_dir():
            raise UserError(
                f"--dir {directory}: no such directory (name the temporary directory the "
                "killed run used, its TMPDIR)"
            )
    cache = args.cache_dir or default_cache_dir()
    lines = [f"removed {line}" for line in sweep_killed_runs(*args.dir, cache_dir=cache)]
    for line in lines:
        print(line)
    if not lines:
        print("nothing to clean up")
    return 1 if any("by hand" in line for line in lines) else 0
