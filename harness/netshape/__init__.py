"""Network profiles for the registry link: real kernel shaping into a namespace of our own.

::

    with NetworkLink("wan") as link:
        RegistryServer(host_addr=link.ns_addr, wrapper=link.prefix)  # registry behind the link
        link.measure()        # LinkMeasurement(rate_mbit=…, rtt_ms=…)
        link.info()           # for the results
    cleanup_stale()           # after a crashed run: its lzb- namespaces and veths
"""

from harness.netshape.link import NetworkError, NetworkLink, cleanup_stale, leftovers
from harness.netshape.measure import LinkMeasurement
from harness.netshape.profiles import PROFILES, NetworkProfile, UnknownProfile, get_profile

__all__ = [
    "PROFILES",
    "LinkMeasurement",
    "NetworkError",
    "NetworkLink",
    "NetworkProfile",
    "UnknownProfile",
    "cleanup_stale",
    "get_profile",
    "leftovers",
]
