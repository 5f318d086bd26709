"""NFQUEUE delayer: hold every packet of one queue for a fixed time, then accept it.

Why user space: this kernel has no ``sch_netem``. Why the receiving side: packets held on the
sender's own egress keep their socket's TSQ budget busy and throughput collapses; packets held
after they crossed the veth do not. The link puts the whole RTT here, on the namespace's INPUT
(requests and ACKs towards the registry), so the data path's timing matches an RTT-long link.

Run inside the namespace: ``python -m harness.netshape.delayer --queue 0 --delay-ms 40``. It
prints ``ready`` once bound. On SIGTERM/SIGINT it accepts everything it still holds and exits:
no packet is ever dropped by stopping it (the link removes the iptables rule first, and the
rule carries ``--queue-bypass`` so a missing delayer means no delay, not a dead link).

It runs at real-time priority (``SCHED_FIFO``, :data:`REALTIME_PRIORITY`): at the default
policy it waited for a CPU whenever the machine had more runnable tasks than cores, and held
packets that much longer than the profile says. The pulls a run measures load the CPU
themselves, each mode in its own way (a full pull decompresses, the store verifies), so the
link was slower than its profile by an amount that depended on the mode. On the wan profile
(40 ms), as seen on the host's veth: in a run on this machine beside other work, 11 of 140
handshakes took 41-45 ms; with 8 spinning tasks on its 2 cores, a median of 44-48 ms and a
90th percentile of 47-52 ms; with the cores saturated, up to 98 ms, and uploads (every packet
into the namespace passes the delayer) at 13 Mbit/s instead of 95. At ``SCHED_FIFO``, in a
run with the cores saturated, all 140 handshakes took 40.0-40.4 ms. Where real-time priority
is refused (no ``CAP_SYS_NICE``) it runs as before and says so on stderr; the link records
which (``delay_realtime``).

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

# SCHED_FIFO priority of the delayer (1-99; chrt's default): above every normal task, so the
# workload, the store and the runtime never hold a packet back; below the kernel's own
# real-time threads (migration, watchdogs: 99). The kernel's real-time throttling
# (kernel.sched_rt_runtime_us) still leaves normal tasks 5% of each CPU should it spin.
REALTIME_PRIORITY = 50

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

    refused = run_realtime()
    if refused is not None:
        print(
            f"warning: the delayer runs at normal priority ({refused}): a busy CPU will delay "
            "packets beyond the profile's RTT",
            file=sys.stderr,
            flush=True,
        )
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


def run_realtime(priority: int = REALTIME_PRIORITY) -> str | None:
    """Put this process under ``SCHED_FIFO`` at ``priority``; None when done, else why not
    (the OS error: no ``CAP_SYS_NICE``, or a cgroup without a real-time budget)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        return str(exc)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
