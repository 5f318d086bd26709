"""The cached trace of a workload: its list of files, and the ranges and first-read order
files beside it (``harness.trace``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import UserError
from harness.trace import (
    TracedFile,
    order_path,
    ranges_path,
    read_cached_trace,
    write_cached_trace,
)


def test_the_order_file_round_trips_beside_the_ranges(tmp_path: Path) -> None:
    trace = tmp_path / "traces" / "w-1.json"
    files = ["usr/lib/libjvm.so", "usr/lib/classes.jsa", "etc/hosts"]
    ranges = {"usr/lib/libjvm.so": [[0, 100], [70000, 80000]], "usr/lib/classes.jsa": [[0, 9]]}
    order = {
        "usr/lib/libjvm.so": [[0, 65536, 0], [65536, 131072, 4]],
        "usr/lib/classes.jsa": [[0, 65536, 2]],
        "not/in/the/list": [[0, 65536, 1]],
    }
    write_cached_trace(trace, files, ranges, order)
    assert order_path(trace) == tmp_path / "traces" / "w-1.order.json"
    assert json.loads(order_path(trace).read_text()) == {
        "usr/lib/libjvm.so": [[0, 65536, 0], [65536, 131072, 4]],
        "usr/lib/classes.jsa": [[0, 65536, 2]],
    }
    assert json.loads(trace.read_text()) == files  # still the plain list every reader takes
    assert read_cached_trace(trace) == [
        TracedFile(
            "usr/lib/libjvm.so", ((0, 100), (70000, 80000)), ((0, 65536, 0), (65536, 131072, 4))
        ),
        TracedFile("usr/lib/classes.jsa", ((0, 9),), ((0, 65536, 2),)),
        TracedFile("etc/hosts"),
    ]
    # Traced again without an order (a store that did not stop cleanly): none stays behind.
    write_cached_trace(trace, files, ranges)
    assert not order_path(trace).exists() and ranges_path(trace).exists()
    assert all(f.order is None for f in read_cached_trace(trace))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[not json", r"w-1\.order\.json"),
        ('[["a", 1, 2]]', r"w-1\.order\.json: not a JSON object"),
        ('{"a": [[0, 1]]}', r"w-1\.order\.json: bad order for 'a'"),
        ('{"a": [[0, "x", 1]]}', r"w-1\.order\.json: bad order for 'a'"),
    ],
)
def test_a_bad_order_file_is_named(tmp_path: Path, content: str, message: str) -> None:
    trace = tmp_path / "w-1.json"
    write_cached_trace(trace, ["a"], None)
    order_path(trace).write_text(content)
    with pytest.raises(UserError, match=message):
        read_cached_trace(trace)
