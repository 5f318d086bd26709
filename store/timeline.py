"""The pull timeline: what the store does per layer while a runtime pulls, as JSON lines.

Opt-in (``timeline_path`` in the store config; absent or empty: no recorder exists and the
store's code paths only test for ``None``). Each event is one JSON object on its own line::

    {"t": 8123.456789, "wall": 1700000000.123456, "event": "toc_fetch",
     "layer": "sha256:…", "toc_digest": "sha256:…", "ref": "host/repo:tag",
     "dur": 0.0412, "bytes": 312001, "requests": 1}

``t`` is ``time.monotonic()`` at the event's start, in seconds (CLOCK_MONOTONIC: one clock for
every process of the host, so the harness compares it with its own ``time.monotonic()``);
``wall`` is ``time.time()`` at the same instant. ``dur`` (seconds) is present on spans only.

Events (where they are taken):

``request``     a runtime's lookup on the store's own tree (span from the request's arrival to
                its answer; ``what`` is ref|manifest|config|layerdir|info|diff|blob|status,
                ``name`` the layer's lookup name, ``error`` the errno of a failed answer) —
                :mod:`store.fs`
``lookup``      the first lookup of a layer's directory ``<ref>/<name>`` (instant); ``name``
                is the compressed digest (podman < 5.1) or the TOC digest (podman ≥ 5.1)
``ready``       the layer's ``diff`` was first answered (instant; ``nodes``)
``first_read``  the first read of one of the layer's files (instant)
``manifest``    manifest + config fetched and decoded (span, per image) — :mod:`store.resolver`
``footer``      the blob's tail read (span; ``bytes``, ``requests``) — :mod:`store.estargz_view`
``toc_fetch``   the TOC read (span; ``bytes``, ``requests``); with ``in_tail`` the footer's
                read carried it: an instant at the footer's end, ``requests`` 0
``verify``      the TOC inflated and hashed against the annotation (span)
``parse``       the TOC decoded into the validated index (span; ``entries``)
``tree``        the directory tree built from the index (span) — :mod:`store.resolver`
``loaded``      the layer is loaded (instant; ``nodes``)
``released``    the layer's last reference went (instant)

Cost: the FUSE thread appends a dict to a deque per event; a writer thread turns them into
lines and appends each batch with one ``write`` of whole lines (``O_APPEND``), when woken
(:meth:`Timeline.flush`: a layer ready or released) or every ``flush_every`` seconds, and on
:meth:`Timeline.close`. No disk I/O ever happens on the caller's thread, and lines never
interleave.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

_Span = contextlib.AbstractContextManager[dict[str, Any]]


class Timeline:
    """Records events (see the module docstring) into the JSON-lines file ``path`` (appended).

    Thread-safe: events may come from any thread. Raises ``OSError`` when ``path`` cannot be
    opened (its directory is created)."""

    def __init__(self, path: Path, *, flush_every: float = 1.0) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The store user's only, as the chunk cache is: it names private images and layers.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._dead = False
        self._seen: set[Hashable] = set()
        self._wake = threading.Event()
        self._closed = False
        self._flush_every = flush_every
        self._thread = threading.Thread(target=self._writer, name="timeline", daemon=True)
        self._thread.start()

    # -- recording (any thread; no I/O) --------------------------------------------------------

    def event(self, name: str, /, *, start: float | None = None, **fields: Any) -> None:
        """Record ``name`` now (instant), or as a span from ``start`` (a ``time.monotonic()``
        value) to now. ``fields`` must be JSON-serializable."""
        if self._dead:  # the writer stopped (a full disk): the timeline has ended
            return
        now = time.monotonic()
        wall = time.time()
        if start is None:
            self._pending.append({"t": now, "wall": wall, "event": name, **fields})
        else:
            self._pending.append(
                {"t": start, "wall": wall - (now - start), "event": name, "dur": now - start}
                | fields
            )

    def once(self, key: Hashable, name: str, /, **fields: Any) -> bool:
        """Record the instant ``name`` only the first time ``key`` is seen; True if recorded."""
        if key in self._seen:
            return False
        self._seen.add(key)
        self.event(name, **fields)
        return True

    @contextlib.contextmanager
    def span(self, name: str, /, **fields: Any) -> Iterator[dict[str, Any]]:
        """A span around the ``with`` body; the yielded dict's items join the event's fields
        (e.g. byte counts known only at the end). Recorded also when the body raises, with
        ``error`` naming the exception's type."""
        start = time.monotonic()
        extra: dict[str, Any] = {}
        try:
            yield extra
        except BaseException as exc:
            extra["error"] = type(exc).__name__
            raise
        finally:
            self.event(name, start=start, **fields, **extra)

    def bind(self, **fields: Any) -> BoundTimeline:
        """A view that adds ``fields`` (e.g. ``layer``, ``ref``) to every event it records."""
        return BoundTimeline(self, fields)

    # -- writing (the writer thread) -------------------------------------------------------------

    def flush(self) -> None:
        """Have the writer thread write what is pending now (returns at once)."""
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write everything pending and close the file (waits up to ``timeout`` s)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # still writing: leave it the file, never a reused fd
            return
        with contextlib.suppress(OSError, TypeError, ValueError):
            self._write_pending()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _writer(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_every)
            self._wake.clear()
            try:
                self._write_pending()
            except (OSError, TypeError, ValueError):
                self._dead = True  # a full disk (or a bad field) ends the timeline, not the store
                self._pending.clear()
                return

    def _write_pending(self) -> None:
        lines = []
        while self._pending:
            lines.append(json.dumps(self._pending.popleft(), separators=(",", ":")))
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode()
        while data:
            data = data[os.write(self._fd, data) :]


class BoundTimeline:
    """:class:`Timeline` with fixed fields added to each event (see :meth:`Timeline.bind`)."""

    def __init__(self, timeline: Timeline, fields: dict[str, Any]) -> None:
        self.timeline = timeline
        self.fields = fields

    def event(self, name: str, /, *, start: float | None = None, **fields: Any) -> None:
        self.timeline.event(name, start=start, **self.fields, **fields)

    def span(self, name: str, /, **fields: Any) -> _Span:
        return self.timeline.span(name, **self.fields, **fields)


def span(timeline: Timeline | BoundTimeline | None, name: str, /, **fields: Any) -> _Span:
    """``timeline.span(name, **fields)``, or a context that records nothing for ``None``."""
    if timeline is None:
        return contextlib.nullcontext({})
    return timeline.span(name, **fields)


def open_timeline(path: str) -> Timeline | None:
    """The recorder for the config's ``timeline_path`` ("" or unset: ``None``, nothing
    recorded and no file created)."""
    return Timeline(Path(path)) if path else None
