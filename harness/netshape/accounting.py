"""The NFQUEUE delayer's packet accounting: what its last stderr line says, and the kernel's
counters it is read from.

Its own module so that both ends import it: the delayer (run as ``python -m
harness.netshape.delayer``) and :class:`~harness.netshape.link.NetworkLink`, which keeps one
:class:`DelayerReport` per delayer it stopped. Importing the delayer's module from the link
would load it a second time when it runs as the main program.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The kernel's per-queue counters, one line per bound queue of the reader's network namespace:
# queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped
# id_sequence 1 (net/netfilter/nfnetlink_queue.c, seq_show).
QUEUE_STATS = "/proc/net/netfilter/nfnetlink_queue"

_REPORT = re.compile(
    r"released (?P<released>\d+) of (?P<received>\d+); kernel queued (?P<queued>-?\d+), "
    r"dropped (?P<queue_dropped>-?\d+) on a full queue and (?P<user_dropped>-?\d+) on a full "
    r"socket, (?P<pending>-?\d+) left at unbind"
)


@dataclass(frozen=True)
class DelayerReport:
    """One delayer's packet accounting, from its last stderr line.

    Kernel counters, read after the delayer accepted everything it held and just before it
    unbound the queue (-1 each when ``QUEUE_STATS`` could not be read):

    - ``queued``: packets numbered for the queue (its id sequence);
    - ``queue_dropped``: packets refused because the queue was full (never numbered);
    - ``user_dropped``: numbered packets that did not fit the delayer's socket;
    - ``pending``: packets still waiting for a verdict, which the kernel drops at unbind.

    The delayer's own counts: ``received`` packets read, ``released`` packets accepted.
    """

    queued: int
    queue_dropped: int
    user_dropped: int
    pending: int
    received: int
    released: int

    @property
    def lost(self) -> int:
        """Packets the delay step did not pass on (0: every packet it was given went on).

        The kernel's count when its counters were read, else what the delayer read and did
        not accept."""
        if self.queued < 0:
            return max(0, self.received - self.released)
        return self.queue_dropped + self.user_dropped + self.pending

    def line(self) -> str:
        return (
            f"released {self.released} of {self.received}; kernel queued {self.queued}, "
            f"dropped {self.queue_dropped} on a full queue and {self.user_dropped} on a full "
            f"socket, {self.pending} left at unbind"
        )

    @classmethod
    def parse(cls, stderr: str) -> DelayerReport | None:
        """The last report in a delayer's stderr, or None if it printed none (killed, failed)."""
        found = list(_REPORT.finditer(stderr))
        if not found:
            return None
        return cls(**{k: int(v) for k, v in found[-1].groupdict().items()})


def kernel_counters(queue: int) -> tuple[int, int, int, int]:
    """(queued, queue_dropped, user_dropped, pending) for NFQUEUE ``queue`` in this network
    namespace (see :class:`DelayerReport`); -1 each if unreadable."""
    try:
        with open(QUEUE_STATS) as f:
            for line in f:
                fields = line.split()
                if fields and int(fields[0]) == queue:
                    return int(fields[7]), int(fields[5]), int(fields[6]), int(fields[2])
    except (OSError, ValueError, IndexError):
        pass
    return -1, -1, -1, -1
