"""`lazybench images build [NAMES…]` and `lazybench images ls`: the workload image cache."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from harness.cli import (
    CACHE_DIR_DEFAULT,
    UserError,
    check_cache_dir,
    default_cache_dir,
    existing_dir,
    make_console,
)
from harness.images import (
    MODES,
    RECIPES,
    ImageBuildError,
    ModeUnsupported,
    PushError,
    build_layers,
    cached_image,
    find_recipe,
    oci_layout,
)
from harness.images.recipes import LAYER_FORMAT, recipe_hash
from harness.images.source import IMPORT_FORMAT


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("images", help="build and list the workload images")
    isub = parser.add_subparsers(dest="images_command", required=True, metavar="ACTION")
    build = isub.add_parser("build", help="build workload images (reusing cached builds)")
    build.add_argument("names", nargs="*", metavar="NAME", help="workloads (default: all)")
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"default: {CACHE_DIR_DEFAULT}",
    )
    build.add_argument(
        "--modes",
        default="",
        help="also prepare these push modes now, comma-separated (legacy, estargz-noopt,"
        " zstd-chunked); estargz needs a traced run and is made by `lazybench run`",
    )
    build.set_defaults(func=cmd_build)
    ls = isub.add_parser("ls", aliases=["list"], help="list cached workload images with sizes")
    ls.add_argument(
        "--cache-dir", type=existing_dir, default=None, help=f"default: {CACHE_DIR_DEFAULT}"
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per image")
    ls.set_defaults(func=cmd_ls)
    prune = isub.add_parser(
        "prune",
        help="remove cached builds of recipes that have changed, and images imported in an "
        "older format (what `images ls` marks stale)",
    )
    prune.add_argument("--cache-dir", type=Path, default=None, help=f"default: {CACHE_DIR_DEFAULT}")
    prune.set_defaults(func=cmd_prune)


def cmd_build(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    check_cache_dir(args.cache_dir)
    names = args.names or list(RECIPES)
    try:
        recipes = [find_recipe(n) for n in names]
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES or m == "estargz"]
    if bad:
        raise UserError(
            f"--modes: cannot prepare {', '.join(bad)} (choose from legacy, estargz-noopt,"
            " zstd-chunked)"
        )
    console = make_console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for recipe in recipes:
            name = recipe.name
            task = progress.add_task(f"{name}: checking cache", total=None)
            start = time.monotonic()
            reused = cached_image(recipe, args.cache_dir) is not None
            try:
                built = build_layers(
                    recipe,
                    args.cache_dir,
                    progress=lambda msg, t=task: progress.update(t, description=msg),
                )
            except ImageBuildError as exc:
                raise UserError(str(exc).splitlines()[0]) from exc
            how = "cached" if reused else f"built in {time.monotonic() - start:.0f}s"
            for mode in modes:
                try:
                    oci_layout(
                        built, mode, progress=lambda m, t=task: progress.update(t, description=m)
                    )
                except ModeUnsupported as exc:  # not fatal: runs skip this (image, mode)
                    console.print(f"[yellow]warning[/]: {escape(str(exc))}")
                except (PushError, ImageBuildError) as exc:
                    raise UserError(str(exc).splitlines()[0]) from exc
            progress.update(
                task,
                total=1,
                completed=1,
                description=f"{name}: {len(built.layers)} layers, {_mb(built.size)} ({how})",
            )
    return 0


def current_recipe_hashes() -> set[str]:
    """The hashes of today's recipes: their cached builds are current."""
    return {recipe_hash(r) for r in [*RECIPES.values(), find_recipe("tiny")]}


def is_current(data: dict[str, Any], recipe_hashes: set[str]) -> bool:
    """Whether a cache entry (its ``image.json``) is what lazybench would use today: a
    recipe's build whose recipe has not changed, or an imported image (a workload's
    ``image`` or ``containerfile``) written in the current import format. An import that
    records no format predates the field: kept, as nothing tells it apart from a current one.
    ``images ls`` marks the others stale and ``images prune`` removes them."""
    if "source" in data:
        return data.get("import_format", IMPORT_FORMAT) == IMPORT_FORMAT
    return data.get("hash") in recipe_hashes


def cmd_ls(args: argparse.Namespace) -> int:
    root = (args.cache_dir or default_cache_dir()) / "images"
    known = current_recipe_hashes()
    rows = []
    for meta in root.glob("*/image.json"):
        data = json.loads(meta.read_text())
        oci = meta.parent / "oci"
        rows.append(
            {
                "name": data.get("source") or data["name"],  # an imported image: its source
                "hash": data["hash"],
                "current": is_current(data, known),
                "layers": len(data["layers"]),
                "size": sum(layer["size"] for layer in data["layers"]),
                "modes": _prepared_modes(oci),
                "disk": _du(meta.parent),
                "built": data.get("built", ""),
            }
        )
    rows.sort(key=lambda r: (r["name"], not r["current"]))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:  # said, not an empty table's frame above the words
        print(f"no images cached under {root}")
        return 0
    from rich.table import Table

    table = Table("name", "hash", "layers", "uncompressed", "on disk", "prepared modes")
    for row in rows:
        name = row["name"] + ("" if row["current"] else " (stale)")
        table.add_row(
            name,
            row["hash"][:12],
            str(row["layers"]),
            _mb(row["size"]),
            _mb(row["disk"]),
            " ".join(row["modes"]),
        )
    make_console(width=max(110, shutil.get_terminal_size().columns), markup=False).print(table)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    check_cache_dir(args.cache_dir)
    root = (args.cache_dir or default_cache_dir()) / "images"
    known = current_recipe_hashes()
    freed = 0
    for meta in sorted(root.glob("*/image.json")):
        data = json.loads(meta.read_text())
        if is_current(data, known):
            continue
        size = _du(meta.parent)
        name = data.get("source") or data.get("name", "?")
        trash = meta.parent.with_name(f".trash-{meta.parent.name}")
        meta.parent.rename(trash)  # atomic: a reader never sees half an entry
        shutil.rmtree(trash, ignore_errors=True)
        freed += size
        print(f"removed {name} {meta.parent.name} ({_mb(size)})")
    freed += _prune_layer_tars((args.cache_dir or default_cache_dir()) / "layers")
    print(f"freed {_mb(freed)}")
    return 0


def _prune_layer_tars(layers: Path) -> int:
    """Remove shared layer tars written in an older tar format (the trees are kept: a
    rebuild writes the current format from them without rerunning apt)."""
    keep = {f"layer.f{LAYER_FORMAT}.tar", f"layer.f{LAYER_FORMAT}.json"}
    freed = 0
    for path in sorted(layers.glob("*/layer*.*")):
        if path.name in keep or path.suffix not in (".tar", ".json") or not path.is_file():
            continue
        freed += path.stat().st_size
        path.unlink()
        if path.suffix == ".tar":
            print(f"removed old-format layer tar {path.parent.name}/{path.name}")
    return freed


def _prepared_modes(oci: Path) -> list[str]:
    """Modes with a finished OCI layout (``<mode>-<options hash>`` directories)."""
    if not oci.is_dir():
        return []
    done = {p.name.rsplit("-", 1)[0] for p in oci.iterdir() if (p / "index.json").is_file()}
    return sorted(done - {"uncompressed"})


def _du(path: Path) -> int:
    """Bytes on disk below ``path``, each hard-linked file once."""
    seen: dict[tuple[int, int], int] = {}
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
