"""`lazybench net ls|measure|cleanup`: list profiles, measure a link, remove stale links."""

from __future__ import annotations

import argparse
import json

from harness.cli import UserError, require_root, seconds_between


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("net", help="network profiles: list, measure, clean up")
    nsub = parser.add_subparsers(dest="net_command", required=True, metavar="ACTION")
    nsub.add_parser("ls", aliases=["list"], help="list the network profiles").set_defaults(
        func=cmd_ls
    )
    measure = nsub.add_parser("measure", help="build a profile's link and measure rate and RTT")
    measure.add_argument("profile")
    measure.add_argument(
        "--seconds",
        type=seconds_between(0.1, 600),
        default=2.0,
        help="length of the transfer, 0.1 to 600 s (default 2)",
    )
    measure.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    measure.set_defaults(func=cmd_measure)
    cleanup = nsub.add_parser("cleanup", help="remove namespaces and veths of crashed runs")
    cleanup.set_defaults(func=cmd_cleanup)


def cmd_ls(args: argparse.Namespace) -> int:
    from harness.netshape import PROFILES

    for p in PROFILES.values():
        rate = f"{p.rate_mbit:g} Mbit/s" if p.rate_mbit else "unshaped"
        rtt = f"{p.rtt_ms:g} ms RTT"
        print(f"{p.name:<10} {rate:<14} {rtt:<12} {p.description}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from harness.netshape import NetworkError, NetworkLink, UnknownProfile

    require_root("net measure", "network namespaces, traffic shaping")
    try:
        with NetworkLink(args.profile) as link:
            m = link.measure(seconds=args.seconds)
            info = link.info()
    except UnknownProfile as exc:
        raise UserError(str(exc)) from None
    except NetworkError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(info))
    else:
        p = link.profile
        want = f"{p.rate_mbit:g} Mbit/s" if p.rate_mbit else "unshaped"
        # A profile without an RTT adds no delay (its delay_method is None): said so, not
        # "delay by None".
        delay = f"delay by {info['delay_method']}" if info["delay_method"] else "no added delay"
        print(
            f"{p.name}: {m.rate_mbit:.1f} Mbit/s (profile {want}), "
            f"RTT {m.rtt_ms:.2f} ms (profile {p.rtt_ms:g} ms), {delay}"
        )
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from harness.netshape import cleanup_stale

    require_root("net cleanup", "removing network namespaces")
    removed = cleanup_stale()
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to clean up")
    return 0
