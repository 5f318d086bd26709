"""The images the store resolved by tag, kept on disk so that a restart does not lose them.

Why: the runtime looks an image's layers up by the reference it was pulled with
(``<base64(ref)>/<digest>``, DESIGN.md §3), so every container start of a lazily pulled image
resolves that reference again. A tag pushed again since (``latest`` moved) names another
manifest, and the layer digests of the image pulled before are not in it. While the store
runs it keeps the resolutions a tag move superseded (:data:`store.resolver.SUPERSEDED_KEPT`);
a restart (a reboot, an upgrade, a crash) forgot them, and every lookup of such a layer
answered ENOENT: containers of the image no longer started, ``podman run`` and ``save`` of it
failed with "no such file or directory", for good. The manifest and config of each
resolution are therefore written under ``--root`` and searched, once the tag's current
manifest lacks a digest.

Trust is unchanged: a layer found this way is served only after its TOC matched the
manifest's TOC digest annotation and each chunk its digest, as any other; the manifest read
back must hash to its file's name, and its config to the manifest's config digest
(:meth:`store.remote.RemoteRegistry.remembered`: the config names the layers' diff IDs).
Disk: the :data:`PER_REF` most recent manifests of each of the :data:`REFS` most recently
resolved tags (a reference by digest names one manifest for good, and is never written).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from store.resolver import SUPERSEDED_KEPT

log = logging.getLogger(__name__)

# Manifests kept per tag: the current one and as many superseded as the store keeps in memory.
PER_REF = SUPERSEDED_KEPT + 1
REFS = 512  # tags kept; the least recently resolved go first


@dataclass(frozen=True)
class Resolution:
    """One resolution of a tag as the registry answered it: the image manifest (the
    platform's, for an index), its media type and digest, and the config's bytes."""

    manifest: bytes
    media_type: str
    digest: str
    config: bytes


class Resolutions:
    """Resolutions of tags under ``directory`` (created 0700): ``<sha256(ref)>/<hex digest
    of the manifest>``, one JSON file each. Every method does file I/O: call it off the
    thread that answers FUSE requests (``trio.to_thread``)."""

    def __init__(self, directory: Path, per_ref: int = PER_REF, refs: int = REFS) -> None:
        self.directory = directory
        self.per_ref = per_ref
        self.refs = refs

    def _ref_dir(self, ref: str) -> Path:
        return self.directory / hashlib.sha256(ref.encode()).hexdigest()

    def save(self, ref: str, resolution: Resolution) -> None:
        """Keep ``resolution`` of ``ref`` (a tag; a reference by digest is not kept), the
        most recent of its tag; drop the oldest past the limits. Raises :class:`OSError`."""
        if "@" in ref:
            return
        algorithm, _, hexdigest = resolution.digest.partition(":")
        if algorithm != "sha256" or len(hexdigest) != 64:
            return  # never the case for a manifest the client checked; nothing to name it by
        ref_dir = self._ref_dir(ref)
        # Private registries' manifests too: the store user's only, as the chunk cache is.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ref_dir.mkdir(mode=0o700, exist_ok=True)
        path = ref_dir / hexdigest
        if not path.exists():
            record = {
                "ref": ref,
                "media_type": resolution.media_type,
                "manifest": base64.b64encode(resolution.manifest).decode(),
                "config": base64.b64encode(resolution.config).decode(),
            }
            fd, tmp = tempfile.mkstemp(dir=ref_dir, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(record, out)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        os.utime(path)  # the most recent of its tag
        os.utime(ref_dir)  # the most recently resolved tag
        _drop_leftovers(ref_dir)
        _keep_newest([p for p in ref_dir.iterdir() if not p.name.startswith(".")], self.per_ref)
        _keep_newest([p for p in self.directory.iterdir() if p.is_dir()], self.refs)

    def load(self, ref: str) -> list[Resolution]:
        """The kept resolutions of ``ref``, the most recent first. A file that does not read,
        or whose manifest does not hash to its name, is left out (logged)."""
        ref_dir = self._ref_dir(ref)
        try:
            paths = [p for p in ref_dir.iterdir() if not p.name.startswith(".")]
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("resolutions of %s: %s: %s", ref, ref_dir, exc)
            return []
        out = []
        for path in sorted(paths, key=_mtime, reverse=True):
            try:
                record = json.loads(path.read_bytes())
                manifest = base64.b64decode(record["manifest"], validate=True)
                config = base64.b64decode(record["config"], validate=True)
                media_type = record["media_type"]
                if record["ref"] != ref or not isinstance(media_type, str):
                    raise ValueError(f"not a resolution of {ref}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("resolution of %s in %s left out: %s", ref, path, exc)
                continue
            if hashlib.sha256(manifest).hexdigest() != path.name:
                log.warning(
                    "resolution of %s in %s left out: its manifest does not hash to its name",
                    ref,
                    path,
                )
                continue
            out.append(Resolution(manifest, media_type, "sha256:" + path.name, config))
        return out


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# A ``.tmp-`` file older than this is what a store that died while writing left behind (a
# write in progress is younger by far): removed at the next save of its tag.
LEFTOVER_AGE_SEC = 600.0


def _drop_leftovers(ref_dir: Path) -> None:
    """Remove the ``.tmp-`` files of writes that never finished in ``ref_dir`` (a crash
    between ``mkstemp`` and ``os.replace``): each would stay for good, and a tag's directory
    is never removed while it is among the :data:`REFS` kept."""
    now = time.time()
    for path in ref_dir.glob(".tmp-*"):
        if now - _mtime(path) > LEFTOVER_AGE_SEC:
            path.unlink(missing_ok=True)


def _keep_newest(paths: list[Path], keep: int) -> None:
    """Remove all but the ``keep`` most recently modified of ``paths`` (files or
    directories of files)."""
    for path in sorted(paths, key=_mtime, reverse=True)[keep:]:
        try:
            if path.is_dir():
                for child in path.iterdir():
                    child.unlink(missing_ok=True)
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("dropping the old resolution %s: %s", path, exc)
