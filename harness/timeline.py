"""The pull phase, per layer: our store's timeline events turned into offsets from ``podman pull``.

For one measurement per (workload × lazy mode × store) — sample 0, through our own store
only (:func:`harness.store_proc.is_our_store`; a foreign store has no timeline) — the store
records :mod:`store.timeline` events; after the measurement :func:`write_timeline` puts into
``<run>/timeline/``:

* ``<workload>-<mode>-<store>.json`` — ``{"workload", "mode", "store", "sample",
  "pull_s", "summary": {...}, "layers": [...], "events": [...]}``; every event keeps its
  fields and gains ``at``: seconds from the start of ``podman pull``;
* ``<workload>-<mode>-<store>.md`` — the same per layer as a table (:func:`layer_table`).

Beside them, for the same measurement until its run ends, the document's ``usage`` holds the
link's and the CPUs' load every 100 ms (:mod:`harness.usage`), tabled after the layers.

Both processes read ``time.monotonic()`` (CLOCK_MONOTONIC, one clock per host), so the
store's event times and the harness's pull start compare directly.

The split of the pull (``summary``): ``store_s`` is the time in which at least one of the
runtime's requests to the store was unanswered (the store is on the critical path);
``runtime_s`` the rest of the pull — the runtime's own work between an answer and its next
request (resolving the image, fetching the manifest itself, writing its storage …);
``store_work_s`` the sum of the store's own spans (manifest, footer, TOC fetch, verify,
parse, tree), which may overlap each other and the runtime's time.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness.podman import write_atomic
from harness.usage import usage_table

TIMELINE_DIR = "timeline"
# The store's own work on a layer, in the order it happens (store.timeline).
WORK_SPANS = ("manifest", "footer", "toc_fetch", "verify", "parse", "tree")
# The runtime's requests that concern one layer (its directory and the files in it).
LAYER_REQUESTS = frozenset({"layerdir", "info", "diff", "blob"})


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a timeline file (JSON lines), in time order; a torn or foreign line is
    skipped, a missing file gives none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("t"), int | float):
            events.append(event)
    return sorted(events, key=lambda e: e["t"])


def _end(e: dict[str, Any]) -> float:
    return e["t"] + e.get("dur", 0.0)


def _union(intervals: Iterable[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``intervals`` clipped to ``[lo, hi]``."""
    total, reach = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, hi)
        if b > a:
            total += b - a
            reach = b
    return total


def pull_timeline(events: Sequence[dict[str, Any]], pull_start: float, pull_s: float) -> dict:
    """``events`` (a store timeline) as offsets from ``pull_start`` (``time.monotonic()`` when
    ``podman pull`` started; it took ``pull_s`` seconds): the per-layer rows, the summary and
    the events, as the module docstring describes. Layers are keyed by compressed digest;
    a lookup by TOC digest is mapped through the load events that carry both."""
    at = [{**e, "at": round(e["t"] - pull_start, 6)} for e in events]
    names: dict[str, str] = {}
    for e in at:
        if "layer" in e:
            names[e["layer"]] = e["layer"]
            if "toc_digest" in e:
                names[e["toc_digest"]] = e["layer"]
    manifests: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, Any]] = {}
    # The runtime's requests during the pull (it asks again in `create` and `run`).
    requests = [e for e in at if e["event"] == "request" and e["at"] <= pull_s]

    def row(digest: str) -> dict[str, Any]:
        return layers.setdefault(digest, {"layer": digest, "requests": []})

    for e in at:
        kind = e["event"]
        if kind == "manifest":
            manifests.setdefault(e.get("ref", ""), e)
            continue
        digest = e.get("layer") or (names.get(e["name"], e["name"]) if "name" in e else None)
        if digest is None:  # the store's own skeleton (the image's directory, manifest …)
            continue
        r = row(digest)
        if kind == "request":
            if e.get("what") in LAYER_REQUESTS and e["at"] <= pull_s:
                r["requests"].append(e)
        elif kind == "lookup":
            r.setdefault("lookup", e)
            r.setdefault("by", "toc" if e.get("name") != digest else "digest")
            r.setdefault("ref", e.get("ref", ""))
        elif kind not in r:
            r[kind] = e
            if e.get("ref"):
                r.setdefault("ref", e["ref"])

    answered = sorted(_end(e) - pull_start for e in requests)
    rows = []
    for digest, r in layers.items():
        own = sorted(r["requests"], key=lambda e: e["at"])
        first = own[0]["at"] if own else r.get("lookup", {}).get("at")
        before = None
        if first is not None:
            earlier = [a for a in answered if a <= first]
            before = first - (earlier[-1] if earlier else 0.0)
        gaps = sum(
            max(0.0, b["at"] - (a["at"] + a.get("dur", 0.0))) for a, b in itertools.pairwise(own)
        )
        toc = r.get("toc_fetch", {})
        manifest = manifests.get(r.get("ref", ""))
        rows.append(
            {
                "layer": digest,
                "by": r.get("by", ""),
                "lookup": _at(r.get("lookup")),
                "manifest": _span(manifest),
                "footer": _span(r.get("footer")),
                "toc_fetch": _span(r.get("toc_fetch")),
                "toc_in_tail": bool(toc.get("in_tail")),
                "toc_bytes": toc.get("bytes"),
                "fetch_requests": (r.get("footer", {}).get("requests", 0) + toc.get("requests", 0))
                if r.get("footer") or toc
                else None,
                "verify": _span(r.get("verify")),
                "parse": _span(r.get("parse")),
                "tree": _span(r.get("tree")),
                "loaded": _at(r.get("loaded")),
                "ready": _at(r.get("ready")),
                "first_read": _at(r.get("first_read")),
                "runtime_before_s": _round(before),
                "runtime_gaps_s": _round(gaps) if own else None,
            }
        )
    rows.sort(key=lambda x: (x["lookup"] is None, x["lookup"] or 0.0, x["layer"]))
    pending = [(e["t"] - pull_start, _end(e) - pull_start) for e in requests]
    store_s = _union(pending, 0.0, pull_s)
    work = [
        e.get("dur", 0.0)
        for e in at
        if e["event"] in WORK_SPANS and not e.get("in_tail") and 0 <= e["at"] <= pull_s
    ]
    summary = {
        "pull_s": _round(pull_s),
        "store_s": _round(store_s),
        "runtime_s": _round(pull_s - store_s),
        "store_work_s": _round(sum(work)),
        "first_request_at": _round(requests[0]["at"]) if requests else None,
        "layers": len(rows),
        "toc_bytes": sum(r["toc_bytes"] or 0 for r in rows),
    }
    return {"pull_s": pull_s, "summary": summary, "layers": rows, "events": at}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _at(e: dict[str, Any] | None) -> float | None:
    return None if e is None else round(e["at"], 6)


def _span(e: dict[str, Any] | None) -> list[float] | None:
    return None if e is None else [round(e["at"], 6), round(e["at"] + e.get("dur", 0.0), 6)]


def _s(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return f"{value[0]:.3f}–{value[1]:.3f}"
    return f"{value:.3f}"


def layer_table(doc: dict[str, Any]) -> str:
    """A :func:`pull_timeline` document as a markdown page: the split, then one row per
    layer, offsets in seconds from the start of ``podman pull`` (spans as ``start–end``)."""
    s = doc["summary"]
    title = " / ".join(str(doc[k]) for k in ("workload", "mode", "store") if doc.get(k))
    lines = [
        f"# Pull timeline{': ' + title if title else ''}",
        "",
        f"Pull {_s(s['pull_s'])} s: store on the critical path {_s(s['store_s'])} s, the "
        f"runtime's own work {_s(s['runtime_s'])} s; the store's spans add up to "
        f"{_s(s['store_work_s'])} s; first request at {_s(s['first_request_at'])} s. "
        "Offsets in seconds from the start of `podman pull`; *by*: the name the runtime "
        "looked the layer up by (compressed digest, or TOC digest for podman ≥ 5.1); "
        "*runtime before*: from the store's last answer to this layer's first request; "
        "*runtime gaps*: between this layer's requests.",
        "",
        "| layer | by | lookup | manifest | footer | TOC fetch | TOC KB | requests | verify | "
        "parse | tree | ready | first read | runtime before | runtime gaps |",
        "|---|---|" + "---:|" * 13,
    ]
    for r in doc["layers"]:
        kb = "–" if r["toc_bytes"] is None else f"{r['toc_bytes'] / 1000:.0f}"
        toc = _s(r["toc_fetch"]) + (" (tail)" if r["toc_in_tail"] else "")
        lines.append(
            f"| `{r['layer'][7:19]}` | {r['by'] or '–'} | {_s(r['lookup'])} | "
            f"{_s(r['manifest'])} | {_s(r['footer'])} | {toc} | {kb} | "
            f"{r['fetch_requests'] if r['fetch_requests'] is not None else '–'} | "
            f"{_s(r['verify'])} | {_s(r['parse'])} | {_s(r['tree'])} | {_s(r['ready'])} | "
            f"{_s(r['first_read'])} | {_s(r['runtime_before_s'])} | {_s(r['runtime_gaps_s'])} |"
        )
    return "\n".join(lines) + "\n"


def timeline_name(workload: str, mode: str, store: str = "") -> str:
    """``<workload>-<mode>[-<store>]``: the stem of a measurement's timeline files."""
    return f"{workload}-{mode}" + (f"-{store}" if store else "")


def write_timeline(
    events_path: Path,
    run_dir: Path,
    *,
    workload: str,
    mode: str,
    store: str,
    sample: int,
    pull_start: float,
    pull_s: float,
    usage: dict[str, Any] | None = None,
) -> Path | None:
    """Convert the store's timeline ``events_path`` into ``<run_dir>/timeline/<name>.json``
    and ``.md`` (written atomically); return the JSON's path, or None when the store
    recorded nothing (no file: a foreign store, or the store died before writing).
    ``usage`` (:func:`harness.usage.usage_doc`: the link's and CPUs' load from the pull's
    start to the run's end) is kept as the document's ``usage`` and tabled after the
    layers."""
    events = read_events(events_path)
    if not events:
        return None
    doc = {
        "workload": workload,
        "mode": mode,
        "store": store,
        "sample": sample,
        **pull_timeline(events, pull_start, pull_s),
    }
    if usage is not None:
        doc["usage"] = usage
    out = run_dir / TIMELINE_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = timeline_name(workload, mode, store)
    page = layer_table(doc)
    if usage is not None:
        page += "\n## Link, CPU and I/O\n\n" + "\n".join(usage_table(usage)) + "\n"
    write_atomic(out / f"{stem}.md", page)
    write_atomic(out / f"{stem}.json", json.dumps(doc, indent=1))
    return out / f"{stem}.json"


def read_timelines(run_dir: Path) -> list[dict[str, Any]]:
    """The timeline documents of a run (none for a run without them), each with ``file``: its
    path relative to ``run_dir``; an unreadable one is skipped."""
    docs = []
    for path in sorted((run_dir / TIMELINE_DIR).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("summary"), dict):
            docs.append({**doc, "file": f"{TIMELINE_DIR}/{path.name}"})
    return docs
