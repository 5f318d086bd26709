"""A shaped link into a network namespace of our own: veth, tbf rate, netem or NFQUEUE delay.

Layout (names carry our pid so a crashed run's leftovers can be told from a live run's)::

    host: lzb<pid>h<n>  10.213.X.1/30  ──veth──  netns lzb-<pid>-<n>: eth0 10.213.X.2/30

Rate: ``tbf`` on the egress of both veth ends. Delay: ``netem`` (half the RTT per direction)
when the kernel has it; otherwise the user-space NFQUEUE delayer (:mod:`.delayer`) holds the
packets arriving in the namespace for the whole RTT. All state lives in the namespace (its
iptables rule, the delayer, the far veth end and its qdisc) or on the host veth, which the
kernel deletes with its peer: removing the namespace removes everything.

Traffic stays local: the addresses are a /30 from 10.213.0.0/16 that exists only on our veth.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from harness.netshape.accounting import DelayerReport
from harness.netshape.measure import LinkMeasurement, measure
from harness.netshape.profiles import NetworkProfile, get_profile
from harness.processes import Service, die_with_parent, free_port

log = logging.getLogger(__name__)

PREFIX = "lzb-"
SUBNET = ipaddress.ip_network("10.213.0.0/16")
NS_IFACE = "eth0"
QUEUE_NUM = 0
PROBE_PORT = 5999
UNSHAPED_MBIT = 20000.0  # what `unshaped()` sets tbf to: far above what a veth carries here


class NetworkError(RuntimeError):
    """Building, measuring or removing a link failed: names the step and the command's error."""


def _run(*cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NetworkError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        raise NetworkError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


class NetworkLink(Service):
    """Context manager: a namespace reachable over a link shaped like ``profile``.

    Inside: ``netns`` (``None`` for ``loopback``), ``host_addr`` (our end), ``ns_addr`` (where
    a server in the namespace listens), ``prefix`` (argv prefix that runs a command in the
    namespace, ``[]`` for loopback), ``measurement`` after :meth:`measure`, :meth:`info` for
    the results, ``delayer_reports`` (one :class:`DelayerReport` per NFQUEUE delayer stopped,
    oldest first: whether stopping it lost a packet; a delayer killed before it could report
    leaves none, and a warning).
    """

    def __init__(
        self,
        profile: str | NetworkProfile,
        *,
        delay_method: str = "auto",
        python: str = sys.executable,
    ) -> None:
        if delay_method not in ("auto", "netem", "nfqueue"):
            raise ValueError(f"delay_method must be auto, netem or nfqueue, not {delay_method!r}")
        self.profile = get_profile(profile)
        self.delay_method = delay_method
        self.python = python
        self.netns: str | None = None
        self.host_iface: str | None = None
        self.host_addr = "127.0.0.1"
        self.ns_addr = "127.0.0.1"
        self.delay_used: str | None = None
        # Whether the NFQUEUE delayer runs at real-time priority (None: no delayer).
        self.delay_realtime: bool | None = None
        self.measurement: LinkMeasurement | None = None
        self._delayer: subprocess.Popen | None = None
        self._probe: subprocess.Popen | None = None
        self._shaped = False
        self.removed_stale: list[str] = []
        self.delayer_reports: list[DelayerReport] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if not self.profile.namespace:
            return
        self.removed_stale = cleanup_stale()  # a crashed earlier run's namespaces, if any
        try:
            self._create()
            self._shape()
        except BaseException:
            self.close()
            raise

    def stop(self) -> None:
        self.close()

    @property
    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _create(self) -> None:
        pid = os.getpid()
        for n in range(100):
            name = f"{PREFIX}{pid}-{n}"
            if not os.path.exists(f"/run/netns/{name}"):
                break
        else:
            raise NetworkError(f"no free namespace name {PREFIX}{pid}-N")
        self.netns, self.host_iface = name, f"lzb{pid}h{n}"
        net = _free_subnet()
        host, peer = list(net.hosts())
        self.host_addr, self.ns_addr = str(host), str(peer)
        _run("ip", "netns", "add", name)
        _run("ip", "link", "add", self.host_iface, "type", "veth", "peer", "name", f"lzb{pid}n{n}")
        _run("ip", "link", "set", f"lzb{pid}n{n}", "netns", name)
        _run("ip", "-n", name, "link", "set", f"lzb{pid}n{n}", "name", NS_IFACE)
        _run("ip", "addr", "add", f"{host}/{net.prefixlen}", "dev", self.host_iface)
        _run("ip", "-n", name, "addr", "add", f"{peer}/{net.prefixlen}", "dev", NS_IFACE)
        _run("ip", "link", "set", self.host_iface, "up")
        _run("ip", "-n", name, "link", "set", NS_IFACE, "up")
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _shape(self) -> None:
        p = self.profile
        use_netem = False
        if p.rtt_ms > 0 and self.delay_method in ("auto", "netem"):
            use_netem = self._try_netem()
            if not use_netem and self.delay_method == "netem":
                raise NetworkError("netem requested but this kernel has no sch_netem")
        if p.rate_mbit:
            parent = "parent 1:1" if use_netem else "root"
            for ns, dev in self._ends():
                tbf = _tbf_args(p.rate_mbit, p.rtt_ms)
                _run("tc", *ns, *f"qdisc add dev {dev} {parent} handle 10: tbf".split(), *tbf)
        if p.rtt_ms > 0 and not use_netem:
            self._start_delayer()
        self.delay_used = "netem" if use_netem else ("nfqueue" if p.rtt_ms > 0 else None)
        self._shaped = True

    def _ends(self) -> list[tuple[list[str], str]]:
        """(``ip``/``tc`` namespace option, device) of both veth ends: host side, far side."""
        assert self.netns is not None and self.host_iface is not None
        return [([], self.host_iface), (["-n", self.netns], NS_IFACE)]

    def _try_netem(self) -> bool:
        """Half the RTT on each direction's egress with netem; False if the kernel lacks it."""
        half = f"{self.profile.rtt_ms / 2:.3f}ms"
        for i, (ns, dev) in enumerate(self._ends()):
            cmd = f"qdisc add dev {dev} root handle 1: netem delay {half} limit 100000".split()
            proc = _run("tc", *ns, *cmd, check=i > 0)
            if proc.returncode != 0:
                return False  # "Specified qdisc kind is unknown": no sch_netem here
        return True

    def _start_delayer(self) -> None:
        missing = missing_delayer_dependency(self.python)
        if missing:
            raise NetworkError(f"network profile {self.profile.name!r}: {missing}")
        cmd = [
            *self.prefix,
            self.python,
            "-m",
            "harness.netshape.delayer",
            "--queue",
            str(QUEUE_NUM),
            "--delay-ms",
            str(self.profile.rtt_ms),
        ]
        self._delayer = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )
        _wait_ready(self._delayer, "NFQUEUE delayer", timeout=15)
        self.delay_realtime = _is_realtime(self._delayer.pid)
        if not self.delay_realtime:
            log.warning(
                "the NFQUEUE delayer of the %s link runs at normal priority: a busy CPU "
                "delays packets beyond the profile's RTT",
                self.profile.name,
            )
        _run(*self.prefix, "iptables", "-w", "5", "-I", "INPUT", *self._rule())

    def _rule(self) -> list[str]:
        return ["-i", NS_IFACE, "-j", "NFQUEUE", "--queue-num", str(QUEUE_NUM), "--queue-bypass"]

    def close(self) -> None:
        """Remove everything this link made, in the order that never drops a packet."""
        if self._probe is not None:
            _stop(self._probe)
            self._probe = None
        if self.netns is None:
            return
        errors = []
        self._stop_delayer()
        _kill_namespace_processes(self.netns)
        for cmd in (
            ["ip", "netns", "del", self.netns],
            ["ip", "link", "del", self.host_iface or ""],
        ):
            proc = _run(*cmd, check=False)
            if (
                proc.returncode != 0
                and cmd[1] == "netns"
                and os.path.exists(f"/run/netns/{self.netns}")
            ):
                errors.append(proc.stderr.strip())
        self.netns = None
        self._shaped = False
        if errors:
            raise NetworkError(f"removing the link: {'; '.join(errors)}")

    # -- use ---------------------------------------------------------------------------------

    def measure(self, *, seconds: float = 1.5, rtt_samples: int = 7) -> LinkMeasurement:
        """Measure the achieved download rate (namespace → host) and the TCP connect RTT.

        The transfer is sized to last about ``seconds`` at the profile's rate.
        """
        rate = self.profile.rate_mbit or 4000.0
        size = int(rate * 1e6 / 8 * seconds)
        # In a fresh namespace every port is free.
        port = PROBE_PORT if self.netns is not None else free_port(self.host_addr)
        listen = self.ns_addr
        self._probe = subprocess.Popen(
            [
                *self.prefix,
                self.python,
                "-m",
                "harness.netshape.probe",
                "--host",
                listen,
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )
        try:
            _wait_ready(self._probe, "link probe server", timeout=15)
            self.measurement = measure(
                self.ns_addr,
                port,
                transfer_bytes=size,
                rtt_samples=rtt_samples,
                timeout=max(60.0, seconds * 20),
            )
        except OSError as exc:
            raise NetworkError(f"measuring the {self.profile.name} link: {exc}") from exc
        finally:
            _stop(self._probe)
            self._probe = None
        return self.measurement

    def info(self) -> dict:
        """Profile, addresses, delay method and measurement: what results record."""
        return {
            "profile": self.profile.as_dict(),
            "netns": self.netns,
            "host_addr": self.host_addr,
            "ns_addr": self.ns_addr,
            "delay_method": self.delay_used,
            "delay_realtime": self.delay_realtime,
            "measured": self.measurement.as_dict() if self.measurement else None,
        }

    @contextlib.contextmanager
    def unshaped(self) -> Iterator[None]:
        """Lift rate and delay for a while (e.g. to push images before measuring).

        Nothing in flight is lost: the tbf qdiscs are changed in place (deleting a qdisc drops
        its queue) and the delayer is stopped the safe way (rule first, then release).
        """
        if self.netns is None or not self._shaped:
            yield
            return
        self._set_rate(None)
        self._stop_delayer()
        try:
            yield
        finally:
            if self.netns is not None:
                self._set_rate(self.profile.rate_mbit)
                if self.delay_used == "nfqueue":
                    self._start_delayer()

    def _set_rate(self, rate_mbit: float | None) -> None:
        if not self.profile.rate_mbit:
            return
        args = (
            _tbf_args(rate_mbit, self.profile.rtt_ms)
            if rate_mbit
            else _tbf_args(UNSHAPED_MBIT, self.profile.rtt_ms)
        )
        parent = "parent 1:1" if self.delay_used == "netem" else "root"
        for ns, dev in self._ends():
            _run("tc", *ns, *f"qdisc change dev {dev} {parent} handle 10: tbf".split(), *args)

    def _stop_delayer(self) -> None:
        """Remove the NFQUEUE rule, then let the delayer release what it holds and exit.

        Its packet accounting is appended to ``delayer_reports``.
        """
        proc = self._delayer
        if proc is None:
            return
        try:
            _run(*self.prefix, "iptables", "-w", "5", "-D", "INPUT", *self._rule(), check=False)
        finally:  # stopped even if iptables failed: the rule's --queue-bypass then passes all
            err = _stop_reading_stderr(proc)
            self._delayer = None
        report = DelayerReport.parse(err)
        if report is None:
            log.warning("the NFQUEUE delayer left no packet accounting: %s", err.strip()[-800:])
        else:
            self.delayer_reports.append(report)


def _tbf_args(rate_mbit: float, rtt_ms: float) -> list[str]:
    """tbf with a burst for 64 KiB segments and a queue of about two bandwidth-delay products."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(64 * 1024, int(rate_bytes * 0.002))
    limit = max(256 * 1024, int(rate_bytes * max(rtt_ms, 1.0) / 1000 * 2)) + burst
    return ["rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]


def _is_realtime(pid: int) -> bool:
    """Whether process ``pid`` runs under a real-time policy (the delayer sets its own:
    :func:`harness.netshape.delayer.run_realtime`)."""
    try:
        return os.sched_getscheduler(pid) in (os.SCHED_FIFO, os.SCHED_RR)
    except OSError:
        return False


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of 10.213.0.0/16 not assigned on this host."""
    used = set()
    out = _run("ip", "-o", "-4", "addr", "show").stdout
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("10.213."):
                used.add(ipaddress.ip_interface(word).network)
    subnets = list(SUBNET.subnets(new_prefix=30))
    for _ in range(1000):
        net = random.choice(subnets[1:])
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetworkError("no free /30 left in 10.213.0.0/16")


def _wait_ready(proc: subprocess.Popen, what: str, *, timeout: float) -> None:
    """Wait for the child's ``ready`` line; on failure stop it and report its stderr."""
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if line.strip() == "ready":
                    return
                if not line:
                    break
        # Read what the child said before _stop closes its pipes (reading after was the bug
        # that hid every cause behind "I/O operation on closed file").
        err = _stop_reading_stderr(proc).strip()[-800:]
        code = f" (exit status {proc.returncode})" if proc.returncode else ""
        raise NetworkError(
            f"{what} did not start{code}: {err or 'no ready line within the timeout'}"
        )
    finally:
        sel.close()


def missing_delayer_dependency(python: str = sys.executable) -> str | None:
    """Why the NFQUEUE delayer cannot run under ``python`` (its install hint), or None.

    Checked in this process when ``python`` is this interpreter; another interpreter is asked.
    """
    from harness.netshape.delayer import MISSING_DEPENDENCY

    if python == sys.executable:
        import importlib.util

        return None if importlib.util.find_spec("netfilterqueue") else MISSING_DEPENDENCY
    probe = subprocess.run(
        [python, "-c", "import netfilterqueue"], capture_output=True, text=True, timeout=30
    )
    return None if probe.returncode == 0 else MISSING_DEPENDENCY


def needs_delayer(profile: NetworkProfile) -> bool:
    """Whether ``profile`` will delay packets with the NFQUEUE delayer on this kernel (it has
    an RTT and the kernel has no ``sch_netem``, built in or as a module)."""
    if not profile.namespace or profile.rtt_ms <= 0:
        return False
    if os.path.exists("/sys/module/sch_netem"):
        return False
    try:
        probe = subprocess.run(
            ["modprobe", "-n", "-q", "sch_netem"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    return probe.returncode != 0


def _stop_reading_stderr(proc: subprocess.Popen, timeout: float = 5.0) -> str:
    """SIGTERM (SIGKILL after ``timeout`` s) and wait; what the child wrote to stderr."""
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=timeout)
    return err or ""


def _stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _kill_namespace_processes(netns: str, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, whatever still runs in the namespace (a registry left behind)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _run("ip", "netns", "pids", netns, check=False).stdout.split()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _run("ip", "netns", "pids", netns, check=False).stdout.split():
                return
            time.sleep(0.05)


def cleanup_stale(*, include_own: bool = False) -> list[str]:
    """Remove namespaces and veths a crashed run left (``lzb-<pid>-N`` whose pid is gone).

    Returns what it removed. Live runs' links are left alone (``include_own`` also removes
    this process's own, for tests).
    """
    removed = []
    names = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in names:
        name = line.split(" ", 1)[0].strip()
        if not name.startswith(PREFIX):
            continue
        if not _is_stale(name.removeprefix(PREFIX).split("-", 1)[0], include_own):
            continue
        if not os.path.exists(f"/run/netns/{name}"):
            continue
        _kill_namespace_processes(name)
        _run("ip", "netns", "del", name, check=False)
        removed.append(f"netns {name}")
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        iface = line.split(":", 2)[1].strip().split("@", 1)[0] if ":" in line else ""
        if iface.startswith("lzb") and ("h" in iface[3:] or "n" in iface[3:]):
            pid = iface[3:].replace("n", "h").split("h", 1)[0]
            if pid.isdigit() and _is_stale(pid, include_own):
                _run("ip", "link", "del", iface, check=False)
                removed.append(f"link {iface}")
    return removed


def _is_stale(pid: str, include_own: bool) -> bool:
    if not pid.isdigit():
        return True  # not one of ours by pid: a foreign lzb- leftover
    if int(pid) == os.getpid():
        return include_own
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def leftovers() -> list[str]:
    """Everything of ours that exists right now (namespaces and veths), for tests."""
    found = [
        line.split(" ", 1)[0]
        for line in _run("ip", "netns", "list", check=False).stdout.splitlines()
        if line.startswith(PREFIX)
    ]
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1 and parts[1].strip().startswith("lzb"):
            found.append(parts[1].strip().split("@", 1)[0])
    return found


def link_names(netns: str) -> Sequence[str]:
    """Interfaces inside a namespace (for diagnostics)."""
    return _run("ip", "-n", netns, "-o", "link", "show", check=False).stdout.splitlines()
