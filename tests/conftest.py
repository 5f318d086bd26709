"""Shared pytest configuration: async tests run on trio through anyio's plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors" / "estargz"


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(
            f"reference vectors not found at {VECTORS} (expected ../shared beside the clone)"
        )
    return VECTORS
