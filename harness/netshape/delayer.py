"""NFQUEUE delayer: hold every packet of one queue for a fixed time, then accept it.

Why user space: this kernel has no ``sch_netem``. Why the receiving side: packets held on the
sender's own egress keep their socket's TSQ budget busy and throughput collapses; packets held
after they crossed the veth do not. The link puts the whole RTT here, on the namespace's INPUT
(requests and ACKs towards the registry), so the data path's timing matches an RTT-long link.

Run inside the namespace: ``python -m harness.netshape.delayer --queue 0 --delay-ms 40``. It
prints ``ready`` once bound. On SIGTERM/SIGINT it accepts everything it still holds and exits:
no packet is ever dropped by stopping it (the link removes the iptables rule first, and the
rule carries ``--queue-bypass`` so a missing delayer means no delay, not a dead link).
Its last stderr line accounts for every packet (``DelayerReport``): how many the kernel queued
to it, dropped before it could read them, and how many it took and let go.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import select
import signal
import sys
import time
from dataclasses import dataclass

# What a missing or unusable delayer tells the user (the link repeats it as its error).
MISSING_DEPENDENCY = (
    "the NFQUEUE delayer needs the Python package netfilterqueue, which is not installed: "
    "pip install 'lazybench[shaping]' (it builds against the Debian packages "
    "libnetfilter-queue-dev and libnfnetlink-dev: apt-get install libnetfilter-queue-dev "
    "libnfnetlink-dev build-essential python3-dev, or run ci/install-system-deps)"
)


# The kernel's per-queue counters, one line per bound queue of this network namespace:
# queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped
# id_sequence 1 (net/netfilter/nfnetlink_queue.c, seq_show).
QUEUE_STATS = "/proc/net/netfilter/nfnetlink_queue"

_REPORT = re.compile(
    r"released (?P<released>\d+) of (?P<received>\d+); kernel queued (?P<queued>-?\d+), "
    r"dropped (?P<queue_dropped>-?\d+) on a full queue and (?P<user_dropped>-?\d+) on a full "
    r"socket"
)


@dataclass(frozen=True)
class DelayerReport:
    """One delayer's packet accounting, from its last stderr line.

    ``queued``: packets the kernel numbered for the queue (its id sequence, which includes the
    ``user_dropped`` ones it then could not deliver to the delayer's socket);
    ``queue_dropped``: packets refused because the queue was full; ``received``: packets the
    delayer read; ``released``: packets it accepted. Kernel counters are -1 when they could not
    be read (``QUEUE_STATS`` missing).
    """

    queued: int
    queue_dropped: int
    user_dropped: int
    received: int
    released: int

    @property
    def lost(self) -> int:
        """Packets the delay step did not pass on: 0 when every packet queued was accepted.

        Counts refused packets, packets queued but never read (dropped on a full socket or
        flushed by the kernel at unbind), and packets read but not accepted.
        """
        refused = max(0, self.queue_dropped)
        unread = max(0, self.queued - self.received) if self.queued >= 0 else 0
        return refused + unread + max(0, self.received - self.released)

    def line(self) -> str:
        return (
            f"released {self.released} of {self.received}; kernel queued {self.queued}, "
            f"dropped {self.queue_dropped} on a full queue and {self.user_dropped} on a full "
            "socket"
        )

    @classmethod
    def parse(cls, stderr: str) -> DelayerReport | None:
        """The last report in a delayer's stderr, or None if it printed none (killed, failed)."""
        found = list(_REPORT.finditer(stderr))
        if not found:
            return None
        return cls(**{k: int(v) for k, v in found[-1].groupdict().items()})


def kernel_counters(queue: int) -> tuple[int, int, int]:
    """(queued, queue_dropped, user_dropped) for NFQUEUE ``queue``; -1s if unreadable."""
    try:
        with open(QUEUE_STATS) as f:
            for line in f:
                fields = line.split()
                if fields and int(fields[0]) == queue:
                    return int(fields[7]), int(fields[5]), int(fields[6])
    except (OSError, ValueError, IndexError):
        pass
    return -1, -1, -1


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
        queued, queue_dropped, user_dropped = kernel_counters(args.queue)
        nfq.unbind()
    report = DelayerReport(queued, queue_dropped, user_dropped, received, released)
    print(report.line(), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
