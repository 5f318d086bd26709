"""What a workload reads: one run through our store with the access trace on.

The ``estargz`` mode and ``lazybench convert --optimize`` prioritize these files. The image is
pushed as eStargz without prioritized files to a registry on loopback, pulled through our
``stargz-store`` (prefetch off, ``access_trace_path`` on) by a private podman, and run until
its ready line (or its exit); the store's trace lists the files in first-access order. Traces
are cached under ``<cache>/traces/`` by image and by how the workload is run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.cli import UserError
from harness.podman import PodmanEnv, write_atomic
from harness.store_proc import StoreProcess

# Our store, whatever store is under test: only it writes the access trace.
TRACE_STORE_COMMAND = ("stargz-store", "--config", "{config}", "--root", "{root}", "{mountpoint}")


def traced_files(
    built: Any,
    w: Any,
    registry_host: str,
    work: Path,
    *,
    cache_dir: Path | None = None,
    mount_timeout: float = 30.0,
    say: Callable[[str], None] = lambda message: None,
) -> list[str]:
    """The image paths workload ``w`` (a ``harness.prepare.ResolvedWorkload``) reads from
    ``built`` (a ``BuiltImage``), in first-access order. ``registry_host`` is a plain-HTTP
    registry the image may be pushed to (as ``<repo>:trace``); ``work`` a scratch directory.
    Raises :class:`UserError` when the workload does not get ready."""
    from harness.container import create_container, not_ready_reason, start_until_ready
    from harness.images import default_cache_dir, push_image

    parts: list[Any] = [built.hash, w.command, w.stdin, w.ready]
    if w.env:
        parts.append(w.env)
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    cache = (cache_dir or default_cache_dir()) / "traces" / f"{w.name}-{key}.json"
    if cache.exists():
        files = json.loads(cache.read_text())
        say(f"  trace {w.name}: {len(files)} files (cached)")
        return files
    say(f"  trace {w.name}: running it once through stargz-store")
    push_image(built, registry_host, w.repo, "trace", "estargz-noopt")
    ref = f"{registry_host}/{w.repo}:trace"
    tdir = work / f"trace-{w.name}"
    with (
        StoreProcess(
            tdir / "store",
            command=TRACE_STORE_COMMAND,
            insecure_hosts=[registry_host],
            noprefetch=True,
            trace=True,
            metrics=False,
            mount_timeout=mount_timeout,
        ) as store,
        PodmanEnv(
            tdir / "podman",
            additional_layer_store=store.mountpoint,
            insecure_registries=[registry_host],
        ) as env,
    ):
        env.pull(ref, timeout=w.timeout)
        cid = create_container(env, ref, w.command, w.stdin, w.timeout, w.env)
        outcome = start_until_ready(env, cid, stdin=w.stdin, ready=w.ready, timeout=w.timeout)
        if not outcome.ready:
            raise UserError(
                f"trace run of {w.name}: {not_ready_reason(w.ready, w.expected, outcome)}; "
                f"stdout {outcome.stdout[-200:]!r}, stderr {outcome.stderr.strip()[-300:]!r}"
            )
        env.podman("rm", "--force", "--time", "0", cid, timeout=60, check=False)
        files = store.trace_files()
    if not files:
        say(f"  [yellow]trace {w.name}: the store traced no files[/]")
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache, json.dumps(files))
    say(f"  trace {w.name}: {len(files)} files")
    return files
