import os
import shutil

import pytest

from harness.netshape import leftovers


@pytest.fixture(autouse=True)
def _needs_root_and_tools():
    if os.geteuid() != 0:
        pytest.skip("network namespaces and tc need root")
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


@pytest.fixture
def no_leftovers():
    """Fail the test if any lzb- namespace or veth of this process is left after it."""
    own = f"lzb-{os.getpid()}-"
    before = {n for n in leftovers() if own in n or f"lzb{os.getpid()}" in n}
    yield
    after = {n for n in leftovers() if own in n or f"lzb{os.getpid()}" in n}
    assert after - before == set(), f"left behind: {sorted(after - before)}"
