"""The head of a blob hints at its prefetch region before the TOC arrives (store.estargz.head)."""

from __future__ import annotations

import io
import os
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st

from store.estargz import convert
from store.estargz.head import HeadHint, head_hint

HEAD = 12 << 10


def _blob(prioritized: list[str], big: int = 256 << 10) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("bin/big", os.urandom(big)), ("etc/small", b"x" * 100)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    out = io.BytesIO()
    convert(io.BytesIO(buf.getvalue()), out, prioritized_files=prioritized)
    return out.getvalue()


def test_a_layer_without_prioritized_files_has_no_region() -> None:
    assert head_hint(_blob([])[:HEAD]) is HeadHint.NONE


def test_prioritized_files_past_the_head_are_a_region() -> None:
    assert head_hint(_blob(["bin/big"])[:HEAD]) is HeadHint.REGION


def test_a_region_that_ends_within_the_head_needs_no_early_download() -> None:
    assert head_hint(_blob(["etc/small"])[:HEAD]) is HeadHint.NONE


def test_what_is_not_a_gzip_tar_is_unknown() -> None:
    assert head_hint(b"") is HeadHint.UNKNOWN
    assert head_hint(os.urandom(HEAD)) is HeadHint.UNKNOWN
    assert head_hint(b"\x1f\x8b" + os.urandom(100)) is HeadHint.UNKNOWN


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, HEAD), flip=st.integers(0, HEAD - 1))
def test_any_cut_or_corrupted_head_gives_a_hint_and_never_raises(cut: int, flip: int) -> None:
    blob = bytearray(_blob(["bin/big"], big=64 << 10)[:HEAD])
    blob[flip % len(blob)] ^= 0xFF
    assert isinstance(head_hint(bytes(blob[:cut])), HeadHint)


def test_a_huge_pax_header_in_the_head_is_no_hint_and_costs_no_time() -> None:
    """The head probe parses a layer's first tar headers on the store's FUSE thread: a PAX
    header of 200,000 digits (quadratic to parse before CPython 3.11.10, CVE-2024-6232) is
    past the budget, so the head gives the names before it (here none), quickly."""
    import gzip
    import time

    from fmt_helpers import pax_header

    tar = pax_header(b"1" * 200_000) + _file_header("etc/passwd")
    start = time.monotonic()
    assert head_hint(gzip.compress(tar)) is HeadHint.UNKNOWN
    assert time.monotonic() - start < 1


def _file_header(name: str) -> bytes:
    ti = tarfile.TarInfo(name)
    return ti.tobuf(tarfile.USTAR_FORMAT)
