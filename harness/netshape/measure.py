"""Measure a link with the probe server (:mod:`.probe`): TCP handshake RTT and download rate."""

from __future__ import annotations

import socket
import statistics
import struct
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LinkMeasurement:
    """What a link achieved when measured: download rate (ns → host) and TCP handshake RTT.

    ``rate_mbit`` is the steady rate (second half of the transfer, after TCP's slow start);
    ``average_rate_mbit`` covers the whole transfer. ``rtt_ms`` is the median of
    ``rtt_samples_ms``, each the round trip of one connection's handshake as the kernel timed
    it (:func:`handshake_rtt_ms`); ``connect_samples_ms`` are the same connects timed from this
    process, which adds its own wait for a CPU (empty in records made before they were kept).
    """

    rate_mbit: float
    average_rate_mbit: float
    rtt_ms: float
    rtt_samples_ms: tuple[float, ...]
    transfer_bytes: int
    transfer_seconds: float
    connect_samples_ms: tuple[float, ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


def measure(
    host: str, port: int, *, transfer_bytes: int, rtt_samples: int = 7, timeout: float = 60.0
) -> LinkMeasurement:
    """Median handshake RTT over ``rtt_samples`` connects, and the rate of one download."""
    rtts, connects = [], []
    for _ in range(rtt_samples):
        start = time.perf_counter()
        with socket.create_connection((host, port), timeout=timeout) as s:
            connects.append((time.perf_counter() - start) * 1000.0)
            kernel = handshake_rtt_ms(s)
            rtts.append(connects[-1] if kernel is None else kernel)
            s.sendall(struct.pack(">Q", 0))
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.sendall(struct.pack(">Q", transfer_bytes))
        buf = bytearray(1 << 20)
        got = s.recv_into(buf)
        first = time.perf_counter()
        first_bytes = got
        deadline = first + timeout
        half_at, half_bytes = None, 0
        while got < transfer_bytes:
            n = s.recv_into(buf)
            if n == 0:
                raise ConnectionError(f"probe server closed after {got} of {transfer_bytes} bytes")
            got += n
            now = time.perf_counter()
            if half_at is None and got >= transfer_bytes // 2:
                half_at, half_bytes = now, got
            if now > deadline:
                raise TimeoutError(f"probe transfer not done within {timeout:.0f}s")
        end = time.perf_counter()
        seconds = end - first
    average = _mbit(got - first_bytes, seconds)
    steady = _mbit(got - half_bytes, end - half_at) if half_at and end > half_at else average
    return LinkMeasurement(
        rate_mbit=round(steady, 2),
        average_rate_mbit=round(average, 2),
        rtt_ms=round(statistics.median(rtts), 3),
        rtt_samples_ms=tuple(round(r, 3) for r in rtts),
        transfer_bytes=got,
        transfer_seconds=round(seconds, 4),
        connect_samples_ms=tuple(round(c, 3) for c in connects),
    )


def handshake_rtt_ms(sock: socket.socket) -> float | None:
    """The round trip of a just-connected socket's handshake, as the kernel timed it when the
    SYN-ACK arrived (``tcp_info.tcpi_rtt``, microseconds, Linux), or None where the kernel
    does not say.

    Why not the time ``connect()`` took: that adds this process's wait to be scheduled once
    the handshake is done, which is not the link's. With 8 spinning tasks on this machine's 2
    cores (the delayer at real-time priority), the median of 30 connects timed so was 41.0
    and 44.0 ms on the wan profile (40 ms), single ones up to 92 ms; the kernel's 40.3 ms. A
    run started with the cores saturated measured its link at 49.5 ms so.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (AttributeError, OSError):
        return None
    if len(info) < 72:
        return None
    # struct tcp_info: 8 one-byte fields, then u32 tcpi_rto … tcpi_rcv_ssthresh, tcpi_rtt.
    (rtt_us,) = struct.unpack_from("=I", info, 68)
    return rtt_us / 1000.0 if rtt_us else None


def _mbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6 if seconds > 0 else float("inf")
