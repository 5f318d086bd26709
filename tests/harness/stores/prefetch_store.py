"""A layer store that downloads every blob in the registry before it mounts, then serves.

``python prefetch_store.py --config C --root R MOUNTPOINT`` reads the registry's host from
the config lazybench wrote, fetches every layer blob of every tagged image there whole (as a
store that prefetches all it might be asked for would), and then runs our store on the same
command line. Its layers all come from the store and the registry serves none whole to the
runtime, yet the download happened before the pull was timed: the verdict must not count it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.request

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json,"
    "application/vnd.docker.distribution.manifest.v2+json"
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    with open(args.config) as f:
        host = re.search(r'^host = "([^"]+)"', f.read(), re.MULTILINE)
    assert host is not None, "no registry host in the config"

    def get(path: str) -> bytes:
        headers = {"User-Agent": "prefetch-store/1", "Accept": MANIFEST_TYPES}
        request = urllib.request.Request(f"http://{host[1]}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    fetched = 0
    for repo in json.loads(get("/v2/_catalog"))["repositories"]:
        for tag in json.loads(get(f"/v2/{repo}/tags/list")).get("tags") or []:
            manifest = json.loads(get(f"/v2/{repo}/manifests/{tag}"))
            for layer in manifest.get("layers", []):
                fetched += len(get(f"/v2/{repo}/blobs/{layer['digest']}"))
    print(f"prefetched {fetched} bytes", flush=True)
    argv = [sys.executable, "-m", "store", "--config", args.config, "--root", args.root]
    os.execv(sys.executable, [*argv, args.mountpoint])


if __name__ == "__main__":
    sys.exit(main())
