"""`lazybench` command line: one sub-command module per area, each with `register(subparsers)`.

A sub-command module sets ``func`` on its parser; ``func(args) -> int`` is the exit status.
Errors meant for the user are raised as :class:`UserError` and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "harness.cleanup_cmd",
    "harness.convert_cmd",
    "harness.estargz_cmd",
    "harness.images_cmd",
    "harness.net_cmd",
    "harness.run_cmd",
    "harness.runtimes_cmd",
    "harness.stores_cmd",
]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 1."""


def positive_int(text: str) -> int:
    """An argparse ``type``: a positive integer, else a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazybench", description="Measure lazy pulling of container images."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"lazybench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lazybench: interrupted", file=sys.stderr)
        return 130
