"""`lazybench stores build go` and `lazybench stores ls`: the layer stores a scenario can name.

``ours`` is this project's ``stargz-store`` (installed with the package). ``go`` is the
reference Go ``stargz-store``, built from Debian's Go packages into the cache
(:mod:`harness.gostore`); scenarios name it with the ``{go-stargz-store}`` placeholder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from harness.cli import CACHE_DIR_DEFAULT, UserError, existing_dir

BUILDABLE = ("go",)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("stores", help="layer stores: build the Go stargz-store, list stores")
    ssub = parser.add_subparsers(dest="stores_command", required=True, metavar="ACTION")
    build = ssub.add_parser("build", help="build a store into the cache and print its path")
    build.add_argument("name", choices=BUILDABLE, help="go: the reference Go stargz-store")
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"default: {CACHE_DIR_DEFAULT}",
    )
    build.set_defaults(func=cmd_build)
    ls = ssub.add_parser(
        "ls", aliases=["list"], help="list the stores and where their binaries are"
    )
    ls.add_argument(
        "--cache-dir", type=existing_dir, default=None, help=f"default: {CACHE_DIR_DEFAULT}"
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per store")
    ls.set_defaults(func=cmd_ls)


def cmd_build(args: argparse.Namespace) -> int:
    from harness.gostore import GoStoreBuildError, build

    start = time.monotonic()
    try:
        path = build(args.cache_dir, progress=lambda msg: print(msg, file=sys.stderr))
    except GoStoreBuildError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.name}: ready in {time.monotonic() - start:.1f}s", file=sys.stderr)
    print(path)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from harness.gostore import GoStoreBuildError, binary_path, cached_builds

    ours = shutil.which("stargz-store") or shutil.which(
        "stargz-store", path=str(Path(sys.executable).parent)
    )
    rows = [{"name": "ours", "command": "stargz-store", "path": ours or "", "status": "installed"}]
    try:
        current: Path | None = binary_path(args.cache_dir)
        problem = ""
    except GoStoreBuildError as exc:
        current, problem = None, str(exc)
    builds = cached_builds(args.cache_dir)
    if current is not None and current.is_file():
        go_row = {"path": str(current), "status": "built"}
    elif current is not None:
        go_row = {"path": "", "status": "not built: run `lazybench stores build go`"}
    else:
        go_row = {"path": "", "status": f"cannot build: {problem}"}
    rows.append({"name": "go", "command": "{go-stargz-store}", **go_row})
    rows += [
        {"name": "go (stale)", "command": "", "path": str(p), "status": "stale build"}
        for p in builds
        if p != current
    ]
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['name']:<11} {row['command']:<18} {row['status']:<10} {row['path']}")
    return 0
