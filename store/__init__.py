"""lazybench's Additional Layer Store: eStargz layers served lazily from a registry over FUSE.

Layers, each usable without the ones above it:
``estargz`` (format) ← ``registry`` (blob source) ← cache ← layer ← filesystem.
The store never imports ``harness``.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

DISTRIBUTION = "lazybench"  # pyproject.toml's project name: the store and the harness ship in it


def version() -> str:
    """The installed ``lazybench`` distribution's version (``pyproject.toml``), as
    ``stargz-store --version`` and ``lazybench --version`` print it; ``"unknown"`` when the
    package runs from a source tree that was never installed (``PYTHONPATH`` only)."""
    try:
        return _distribution_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
