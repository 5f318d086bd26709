"""NFQUEUE delayer: hold every packet of one queue for a fixed time, then accept it.

Why user space: this kernel has no ``sch_netem``. Why the receiving side: packets held on the
sender's own egress keep their socket's TSQ budget busy and throughput collapses; packets held
after they crossed the veth do not. The link puts the whole RTT here, on the namespace's INPUT
(requests and ACKs towards the registry), so the data path's timing matches an RTT-long link.

Run inside the namespace: ``python -m harness.netshape.delayer --queue 0 --delay-ms 40``. It
prints ``ready`` once bound. On SIGTERM/SIGINT it accepts everything it still holds and exits:
no packet is ever dropped by stopping it (the link removes the iptables rule first, and the
rule carries ``--queue-bypass`` so a missing delayer means no delay, not a dead link).
Its last stderr line accounts for every packet (:class:`~harness.netshape.accounting.
DelayerReport`): what the kernel queued to it, dropped, and still held when it let go of the
queue, and how many packets it read and accepted.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import sys
import time

from harness.netshape.accounting import DelayerReport, kernel_counters

# What a missing or unusable delayer tells the user (the link repeats it as its error).
MISSING_DEPENDENCY = (
    "the NFQUEUE delayer needs the Python package netfilterqueue, which is not installed: "
    "pip install 'lazybench[shaping]' (it builds against the Debian packages "
    "libnetfilter-queue-dev and libnfnetlink-dev: apt-get install libnetfilter-queue-dev "
    "libnfnetlink-dev build-essential python3-dev, or run ci/install-system-deps)"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args(argv)

    try:
        from netfilterqueue import COPY_META, NetfilterQueue
    except ImportError as exc:
        print(f"{MISSING_DEPENDENCY} [{exc}]", file=sys.stderr, flush=True)
        return 2

    delay = args.delay_ms / 1000.0
    held: collections.deque = collections.deque()
    now = time.monotonic

    received = 0

    def hold(packet) -> None:  # type: ignore[no-untyped-def]
        nonlocal received
        received += 1
        held.append((now() + delay, packet))

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    nfq = NetfilterQueue()
    try:
        nfq.bind(args.queue, hold, max_len=65536, mode=COPY_META, range=0, sock_len=8 << 20)
    except OSError as exc:
        print(
            f"cannot bind NFQUEUE {args.queue}: {exc} (the delayer needs root and the kernel's "
            "nfnetlink_queue module: modprobe nfnetlink_queue)",
            file=sys.stderr,
            flush=True,
        )
        return 2
    fd = nfq.get_fd()
    os.set_blocking(fd, False)
    print("ready", flush=True)
    released = 0
    try:
        while not stopping:
            t = now()
            while held and held[0][0] <= t:
                held.popleft()[1].accept()
                released += 1
            timeout = max(0.0, held[0][0] - t) if held else 0.5
            ready, _, _ = select.select([fd, wake_r], [], [], timeout)
            if fd in ready:
                nfq.run(block=False)
            if wake_r in ready:
                os.read(wake_r, 512)
    finally:
        # Let go of everything still held before the queue goes away: nothing is lost.
        nfq.run(block=False)  # what the kernel queued to us before the rule went away
        while held:
            held.popleft()[1].accept()
            released += 1
        queued, queue_dropped, user_dropped, pending = kernel_counters(args.queue)
        nfq.unbind()
    report = DelayerReport(queued, queue_dropped, user_dropped, pending, received, released)
    print(report.line(), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
