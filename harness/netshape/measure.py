"""Measure a link with the probe server (:mod:`.probe`): TCP connect RTT and download rate."""

from __future__ import annotations

import socket
import statistics
import struct
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LinkMeasurement:
    """What a link achieved when measured: download rate (ns → host) and TCP connect RTT.

    ``rate_mbit`` is the steady rate (second half of the transfer, after TCP's slow start);
    ``average_rate_mbit`` covers the whole transfer.
    """

    rate_mbit: float
    average_rate_mbit: float
    rtt_ms: float
    rtt_samples_ms: tuple[float, ...]
    transfer_bytes: int
    transfer_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def measure(
    host: str, port: int, *, transfer_bytes: int, rtt_samples: int = 7, timeout: float = 60.0
) -> LinkMeasurement:
    """Median TCP connect time over ``rtt_samples`` connects, and the rate of one download."""
    rtts = []
    for _ in range(rtt_samples):
        start = time.perf_counter()
        with socket.create_connection((host, port), timeout=timeout) as s:
            rtts.append((time.perf_counter() - start) * 1000.0)
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
    )


def _mbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6 if seconds > 0 else float("inf")
