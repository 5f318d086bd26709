"""`lazybench estargz convert|ls` (placeholder until the format library lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("estargz", help="convert and inspect eStargz layers")
    parser.set_defaults(func=lambda args: 2)
