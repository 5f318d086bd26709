"""The laziness verdict: did the runtime really take each layer from the layer store?

A lazy pull that silently falls back to a full pull (a missing annotation, version skew, a store
error turned into EIO) still starts the container, so timings alone cannot tell. The evidence
here comes from the runtime's own storage and from the registry, never from the store's word,
so it holds for any store under test.

*From the store* — containers/storage's overlay driver (podman 4.3, storage 1.43, checked by
experiment; ``drivers/overlay/overlay.go``, ``additionalLayer.CreateAs``, unchanged in later
storage releases) records a layer it took from an Additional Layer Store as
``<graphroot>/overlay/<id>/diff``, a symlink to ``<store mountpoint>/<base64 ref>/<digest>/diff``,
beside an ``additionallayer`` file holding that layer directory's path. A layer it pulled
itself has a real ``diff`` directory. The image's layers are its top layer in
``overlay-images/images.json`` and that layer's parents in ``overlay-layers/layers.json`` (and
``volatile-layers.json``), each with its ``compressed-diff-digest`` (the manifest's layer
digest).

*From the registry* — a layer's whole blob (GET answered 200, not 206) served to the runtime,
told apart from the store's requests by the User-Agent containers/image sends
(``containers/<version> (github.com/containers/image)``, podman and CRI-O alike).

podman 4.3's ``--log-level=debug`` output says nothing when an additional-layer lookup fails
(checked with a store answering ENOENT and one answering EIO), so the reason for a fallback is
taken from the store's log (its error lines) and from the evidence itself.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# containers/image's default User-Agent (docker/docker_client.go: "containers/" + version).
RUNTIME_AGENTS = re.compile(r"^(containers/|libpod/|cri-o/|CRI-O/)")
_LOG_TROUBLE = re.compile(
    r"error|fail|refus|denied|EIO|ENOENT|not found|invalid|traceback|exception|panic|warn"
    # a store declining a layer on purpose (our store: "not served (normal pull fallback)")
    r"|not served",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class LayerEvidence:
    """One layer of the pulled image, bottom first."""

    layer_id: str
    digest: str  # compressed digest, as in the manifest ("" when storage did not record it)
    from_store: bool  # the runtime's storage links it into the store's mount
    served_whole: bool = False  # the registry served its whole blob to the runtime


def counts_lazy(total: int, from_store: int, served_whole: int) -> bool:
    """The rule of a lazy pull, on its layer counts: at least one layer, every layer from the
    store, none served whole to the runtime."""
    return total > 0 and from_store == total and served_whole == 0


@dataclass
class Verdict:
    """Per-layer evidence of one lazy pull; ``problem`` when the storage could not be read."""

    layers: list[LayerEvidence] = field(default_factory=list)
    problem: str | None = None

    @property
    def total(self) -> int:
        return len(self.layers)

    @property
    def from_store(self) -> int:
        return sum(1 for layer in self.layers if layer.from_store)

    @property
    def served_whole(self) -> int:
        return sum(1 for layer in self.layers if layer.served_whole)

    @property
    def lazy(self) -> bool:
        """Every layer from the store and none served whole to the runtime."""
        return self.problem is None and counts_lazy(self.total, self.from_store, self.served_whole)

    def with_registry(self, served_whole: set[str], image_layers: Sequence[str] = ()) -> Verdict:
        """The same verdict, each layer marked when its digest is in ``served_whole``.

        ``image_layers``: the image's layer digests as pushed (manifest order, bottom first).
        A layer the storage recorded without its compressed digest — podman >= 5.1 takes a
        store's layer by TOC digest, and its record may carry none — is matched by its place
        in the image, when the storage holds as many layers as the manifest lists."""
        by_place = len(image_layers) == len(self.layers)
        return Verdict(
            [
                LayerEvidence(
                    x.layer_id,
                    x.digest,
                    x.from_store,
                    (x.digest or (image_layers[i] if by_place else "")) in served_whole,
                )
                for i, x in enumerate(self.layers)
            ],
            self.problem,
        )

    def describe(self) -> str:
        """One line: what fell back, e.g. ``2 of 3 layers not from the store (sha256:ab12…,
        sha256:cd34…); the registry served 2 whole to the runtime``."""
        if self.problem:
            return self.problem
        if not self.layers:  # nothing to take from a store (counts_lazy: not a lazy pull)
            return "the image has no layers, so none came from the store"
        parts = []
        missing = [x.digest or x.layer_id for x in self.layers if not x.from_store]
        if missing:
            # one digest listed several times (identical layers, e.g. empty ones) shown once
            distinct = list(dict.fromkeys(missing))
            shown = ", ".join(
                _short(d) + (f" ×{missing.count(d)}" if missing.count(d) > 1 else "")
                for d in distinct[:4]
            ) + (", …" if len(distinct) > 4 else "")
            parts.append(f"{len(missing)} of {self.total} layers not from the store ({shown})")
        if self.served_whole:
            parts.append(f"the registry served {self.served_whole} whole to the runtime")
        return "; ".join(parts) or "every layer from the store"


def _short(digest: str) -> str:
    algo, _, hex_ = digest.partition(":")
    return f"{algo}:{hex_[:12]}" if hex_ else digest[:12]


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return data if isinstance(data, list) else []


def image_layer_chain(graphroot: Path, image: str) -> list[dict[str, Any]]:
    """The layer records (``layers.json`` entries) of ``image`` — a name as pulled, or an
    image id — bottom layer first. Raises LookupError when the image is not in storage."""
    images = _read_json_list(graphroot / "overlay-images" / "images.json")
    found = [i for i in images if image in i.get("names", []) or i.get("id") == image]
    if not found and len(images) == 1:
        found = images
    if not found:
        raise LookupError(f"image {image!r} is not in {graphroot}")
    layers: dict[str, dict[str, Any]] = {}
    for name in ("layers.json", "volatile-layers.json"):
        for rec in _read_json_list(graphroot / "overlay-layers" / name):
            layers[rec["id"]] = rec
    chain = []
    layer_id = found[0].get("layer")
    while layer_id:
        rec = layers.get(layer_id)
        if rec is None:
            raise LookupError(f"layer {layer_id} of {image!r} has no record in {graphroot}")
        if any(r is rec for r in chain):
            raise LookupError(f"layer {layer_id} of {image!r} is its own ancestor in {graphroot}")
        chain.append(rec)
        layer_id = rec.get("parent")
    return chain[::-1]


def layer_from_store(graphroot: Path, layer_id: str, store_mount: Path) -> bool:
    """Whether the overlay driver linked layer ``layer_id`` into the store mounted at
    ``store_mount`` (read with readlink/read only: nothing here touches the FUSE mount)."""
    layer_dir = graphroot / "overlay" / layer_id
    mount = os.path.normpath(str(store_mount)) + os.sep
    try:
        target = os.readlink(layer_dir / "diff")
        if os.path.normpath(os.path.join(layer_dir, target)).startswith(mount):
            return True
    except OSError:
        pass
    try:
        recorded = (layer_dir / "additionallayer").read_text().strip()
    except OSError:
        return False
    return os.path.normpath(recorded).startswith(mount)


def storage_verdict(graphroot: Path, image: str, store_mount: Path | None) -> Verdict:
    """Per layer of ``image`` in ``graphroot``: taken from the store at ``store_mount``
    (``None``: no store, so no layer is)."""
    try:
        chain = image_layer_chain(graphroot, image)
    except (LookupError, OSError, ValueError, TypeError, AttributeError) as exc:
        return Verdict(problem=f"cannot read the runtime's storage: {exc}")
    return Verdict(
        [
            LayerEvidence(
                layer_id=rec["id"],
                digest=rec.get("compressed-diff-digest") or "",
                from_store=store_mount is not None
                and layer_from_store(graphroot, rec["id"], store_mount),
            )
            for rec in chain
        ]
    )


def is_runtime_request(user_agent: str) -> bool:
    """A request made by the container runtime (containers/image), not by a layer store."""
    return bool(RUNTIME_AGENTS.match(user_agent))


def blobs_served_whole_to_runtime(records: Iterable[Any]) -> set[str]:
    """Digests of blobs the registry served whole (GET, 200) to the runtime, from
    :class:`harness.registry_server.AccessRecord` entries."""
    return {
        r.digest
        for r in records
        if r.digest and r.is_full_blob_get and is_runtime_request(r.user_agent)
    }


def fetched_before_pull(records: Sequence[Any]) -> str | None:
    """Why a lazy measurement cannot count when the registry served blobs (GET) between the
    store's start and the pull's start — ``records``, that stretch of its access log — else
    None. A store fetches nothing before the runtime asks it for a layer; one that does (a
    prefetch of every image in the registry before it mounts) takes its download out of the
    timed window and the bytes counted, and its layers then look lazy."""
    gets = [r for r in records if r.is_blob_get]
    if not gets:
        return None
    agents = ", ".join(dict.fromkeys(r.user_agent or "no User-Agent" for r in gets))
    return (
        f"the registry served {sum(r.bytes for r in gets)} bytes in {len(gets)} blob "
        f"requests after the store started and before the pull did, neither timed nor "
        f"counted ({agents[:200]})"
    )


def request_started(record: Any) -> int | None:
    """The second (Unix time) at which the registry began serving ``record``'s request: its
    combined-log time (``06/Dec/2026:15:49:12 +0000``, taken by gorilla/handlers before the
    handler runs); None when that cannot be read. Month names are English, as Go writes them
    (``strptime``'s ``%b`` follows LC_TIME, which Python leaves at "C")."""
    try:
        when = datetime.strptime(str(getattr(record, "time", "") or ""), "%d/%b/%Y:%H:%M:%S %z")
    except ValueError:
        return None
    return int(when.timestamp())


def started_before(records: Iterable[Any], wall: float) -> list[Any]:
    """Of ``records`` (logged after the pull began), those whose request the registry began
    serving in a second before the one ``wall`` (the pull's start, Unix time) falls in.

    A line is logged when its request ends: a store that opens a whole-blob GET before the
    pull and leaves its last bytes unread until the pull began (or the run ended) had that
    line logged after the pull's mark, so the log before the mark showed nothing fetched,
    while the blob had crossed the link untimed."""
    cutoff = math.floor(wall)
    return [r for r in records if (t := request_started(r)) is not None and t < cutoff]


def trouble_lines(text: str, limit: int = 3) -> list[str]:
    """The last ``limit`` distinct lines of a log that look like errors or warnings (of a JSON
    log line, such as the stores write, its level and message: the same message logged at
    another time counts once)."""
    lines = [_message(line)[-300:] for line in text.splitlines() if _LOG_TROUBLE.search(line)]
    distinct = list(dict.fromkeys(reversed(lines)))[:limit]  # the last of each, newest first
    return distinct[::-1]


def _message(line: str) -> str:
    line = line.strip()
    try:
        entry = json.loads(line)
    except ValueError:
        return line
    if not isinstance(entry, dict) or not isinstance(entry.get("msg"), str):
        return line
    level = entry.get("level")
    return f"{level}: {entry['msg']}" if isinstance(level, str) else entry["msg"]


def fallback_reason(verdict: Verdict, logs: Sequence[tuple[str, str]]) -> str:
    """Why a lazy pull fell back: the evidence, then error lines from each ``(name, text)``
    log (the store's log, the runtime's output) that has any."""
    parts = [verdict.describe()]
    for name, text in logs:
        found = trouble_lines(text)
        if found:
            parts.append(f"{name}: " + " | ".join(found))
    return "; ".join(parts)[:2000]
