"""Fuzz targets: one module per target; see :mod:`fuzz` for the contract."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def names() -> list[str]:
    """Every target module's name, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> ModuleType:
    """Import ``fuzz.targets.<name>`` and check it keeps the contract (ValueError if not)."""
    mod = importlib.import_module(f"{__name__}.{name}")
    allowed = getattr(mod, "ALLOWED", None)
    if not isinstance(allowed, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in allowed
    ):
        raise ValueError(f"fuzz target {name}: ALLOWED must be a tuple of exception types")
    if not callable(getattr(mod, "one_input", None)):
        raise ValueError(f"fuzz target {name}: no one_input(data: bytes) function")
    return mod
