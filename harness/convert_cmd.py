"""``lazybench convert SRC DEST``: any image to eStargz (optimized if asked) or zstd:chunked.

SRC is a containers-image reference (``docker://``, ``oci:``, ``oci-archive:``,
``docker-archive:``, ``containers-storage:``, ``dir:``), DEST one of ``docker://``, ``oci:``,
``oci-archive:`` and ``dir:`` (the other two keep only the layers' uncompressed tars, and are
refused). The destination's manifest digest is
the only thing printed on stdout; progress and messages go to stderr. See
``harness.images.convert`` for what is done to the image.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from harness.cli import (
    LAYER_FORMATS,
    UserError,
    check_cache_dir,
    layer_format,
    make_console,
    positive_int,
    require_root,
    seconds_between,
    zstd_generation,
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "convert",
        help="convert an image to eStargz (optionally optimized) or zstd:chunked",
        description="Convert SRC to eStargz or zstd:chunked and write it to DEST (both "
        "TRANSPORT:REF, e.g. docker-archive:app.tar docker://localhost:5000/app:esgz). "
        "Prints the destination's manifest digest.",
    )
    p.add_argument("src", help="source image (docker://, oci:, oci-archive:, docker-archive:, …)")
    p.add_argument(
        "dest", help="destination (docker:// to push, oci: / oci-archive: / dir: locally)"
    )
    p.add_argument(
        "--format",
        type=layer_format,
        choices=LAYER_FORMATS,
        default="estargz",
        help="layer format to write (default estargz; zstd-chunked may be spelled zstd:chunked)",
    )
    p.add_argument(
        "--optimize",
        action="store_true",
        help="run the workload once through our store with the access trace and put the "
        "files it read first (needs root, podman, FUSE)",
    )
    p.add_argument(
        "--command",
        help="the workload's command for --optimize, a shell-quoted string or a JSON array "
        "(default: the image's own CMD; as in `podman run`, the arguments after any "
        "ENTRYPOINT)",
    )
    p.add_argument(
        "--entrypoint",
        help="(--optimize) replace the image's ENTRYPOINT: a shell-quoted string or a JSON "
        'array; "" clears it (podman\'s --entrypoint)',
    )
    p.add_argument("--stdin", help="text fed to the workload's stdin (--optimize)")
    p.add_argument("--ready", help="a line on stdout meaning ready (--optimize; default: exit)")
    p.add_argument(
        "--timeout",
        type=seconds_between(0.1, 86400),
        default=None,
        help="seconds the workload may take (--optimize; 0.1 to 86400, default 300)",
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="(--optimize) repeatable"
    )
    p.add_argument(
        "--prioritized-files",
        metavar="FILE",
        help="paths to put first, one per line (# comments allowed)",
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        help="chunk size in bytes (eStargz 4 MiB, zstd:chunked 1 MiB)",
    )
    p.add_argument(
        "--zstd-generation",
        choices=("podman4", "podman5"),
        default=None,
        help="zstd:chunked layout and annotation keys podman reads: podman4 (containers/storage "
        "before 1.5x, this machine's; the default) or podman5",
    )
    p.add_argument(
        "--platform",
        help="OS/ARCH[/VARIANT] to convert: an index's entry; a single image must be of it "
        "(default: the host's for an index, any for a single image)",
    )
    p.add_argument(
        "--all-platforms",
        action="store_true",
        help="convert every image of an index (default: the platform's; others untouched)",
    )
    p.add_argument(
        "--dest-tls-verify",
        type=_bool,
        metavar="true|false",
        help="HTTPS with verified certificates to a docker:// DEST (default: plain HTTP for "
        "localhost/127.0.0.1, else as registries.conf says)",
    )
    p.add_argument("--cache-dir", type=Path, help="image/trace cache for --optimize")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _command(text: str | None, option: str = "--command") -> list[str]:
    if not text:
        return []
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{option}: not a JSON array: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{option}: a JSON array must hold strings only")
        return value
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None


def _entrypoint(text: str | None) -> tuple[str, ...] | None:
    """``--entrypoint``: None when not given (the image's own), () when "" (cleared)."""
    if text is None:
        return None
    return tuple(_command(text, "--entrypoint"))


def cmd_convert(args: argparse.Namespace) -> int:
    from harness.estargz_cmd import _read_prioritized
    from harness.images.convert import (
        ConvertOptions,
        check_destination,
        convert_image,
        optimize_files,
    )
    from harness.images.source import ImageSourceError, check_source

    console = make_console(stderr=True, soft_wrap=True, markup=False)
    run_opts = (
        args.command,
        args.stdin,
        args.ready,
        args.env,
        args.entrypoint is not None,
        args.timeout is not None,
        args.cache_dir is not None,
    )
    if not args.optimize and any(run_opts):
        raise UserError(
            "--command, --entrypoint, --stdin, --ready, --env, --timeout and --cache-dir go "
            "with --optimize"
        )
    if args.platform and args.all_platforms:
        raise UserError("--platform picks one image of an index, --all-platforms all: give one")
    generation = zstd_generation(args.format, args.zstd_generation)
    if args.entrypoint == "" and not args.command:
        raise UserError(
            '--entrypoint "" clears the image\'s ENTRYPOINT, and podman then ignores its CMD '
            "too: give the --command to run"
        )
    env = []
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--env: expected NAME=VALUE, got {item!r}")
        env.append((name, value))
    if args.chunk_size is not None:
        from store.estargz.writer import check_chunk_size

        try:
            check_chunk_size(args.chunk_size)
        except ValueError as exc:
            raise UserError(f"--chunk-size: {exc}") from None
    if args.optimize:
        require_root("convert --optimize", "rootful podman, FUSE")
        check_cache_dir(args.cache_dir)
    try:  # in convert_image's order, but before --optimize's trace run
        check_source(args.src)
        check_destination(args.dest, args.format)
    except ImageSourceError as exc:
        raise UserError(str(exc)) from None
    files = _read_prioritized(args.prioritized_files)
    read_ranges: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    read_order: tuple[tuple[str, tuple[tuple[int, int, int], ...]], ...] = ()
    try:
        if args.optimize:
            console.print(f"optimize: tracing the workload in {args.src}")
            traced = optimize_files(
                args.src,
                command=_command(args.command),
                entrypoint=_entrypoint(args.entrypoint),
                stdin=args.stdin,
                ready=args.ready,
                **({} if args.timeout is None else {"timeout": args.timeout}),
                env=env,
                platform=args.platform,
                cache_dir=args.cache_dir,
                say=console.print,
            )
            files += [f.path for f in traced]
            read_ranges = tuple((f.path, f.ranges) for f in traced if f.ranges is not None)
            read_order = tuple((f.path, f.order) for f in traced if f.order is not None)
        options = ConvertOptions(
            format=args.format,
            platform=args.platform,
            all_platforms=args.all_platforms,
            prioritized_files=tuple(files),
            read_ranges=read_ranges,
            read_order=read_order,
            chunk_size=args.chunk_size,
            dest_tls_verify=args.dest_tls_verify,
            zstd_generation=generation,
        )
        console.print(f"convert: {args.src} → {args.dest} ({args.format})")
        report = convert_image(
            args.src,
            args.dest,
            options,
            show_progress=not args.no_progress,
            say=lambda m: console.print(f"convert: {m}"),
        )
    except ImageSourceError as exc:
        raise UserError(str(exc)) from None
    console.print(
        f"convert: {report.manifests} image(s), {report.converted} layers converted, "
        f"{report.passed_through} already {args.format}"
        + (f", {len(files)} prioritized files asked for" if files else "")
    )
    print(report.digest)
    return 0
