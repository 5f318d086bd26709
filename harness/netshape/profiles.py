"""Named network profiles: the link between the runtime and the registry."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class NetworkProfile:
    """A link to emulate. ``rate_mbit`` applies to each direction; ``None`` = unshaped.

    ``namespace=False`` means no namespace at all: the registry listens on 127.0.0.1.
    """

    name: str
    rate_mbit: float | None
    rtt_ms: float
    description: str
    namespace: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, NetworkProfile] = {
    p.name: p
    for p in (
        NetworkProfile("loopback", None, 0.0, "registry on 127.0.0.1, no shaping", False),
        NetworkProfile("veth", None, 0.0, "registry in a namespace behind a veth, no shaping"),
        NetworkProfile("lan", 1000.0, 0.5, "1 Gbit/s, 0.5 ms RTT (same data centre)"),
        NetworkProfile(
            "wan",
            100.0,
            40.0,
            "100 Mbit/s, 40 ms RTT (the published setup: CI runner to a public registry)",
        ),
        NetworkProfile("slow-wan", 20.0, 80.0, "20 Mbit/s, 80 ms RTT (a distant registry)"),
    )
}


class UnknownProfile(KeyError):
    """A profile name that is not in :data:`PROFILES`."""

    def __str__(self) -> str:
        return f"unknown network profile {self.args[0]!r} (known: {', '.join(PROFILES)})"


def get_profile(name: str | NetworkProfile) -> NetworkProfile:
    if isinstance(name, NetworkProfile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfile(name) from None
