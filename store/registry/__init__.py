"""OCI distribution client: references, auth, mirrors, manifests, ranged blob reads, push.

The store reads layers through `RegistryBlobSource.read_at` / `RegistryClient.read_ranges`;
the harness pushes the images it builds with `RegistryClient.push_blob/push_manifest/
push_image`. Everything here is async on httpx (trio or asyncio) and raises `RegistryError`
subclasses whose messages name the host, repository and digest.

Modules: `reference` (Reference.parse), `hosts` (resolver config in the Go store's TOML keys →
endpoints), `registriesconf` (podman's containers-registries.conf(5): mirrors, location
rewrites, insecure, blocked), `credentials` (auth.json / docker config.json), `auth` (Basic,
Bearer tokens cached per host and scope), `manifest` (media types, Platform, build/parse), `ranges`
(coalescing, multipart parsing), `client` (RegistryClient), `rangetransport` (range GETs over
HTTP and TLS through urllib3 in worker threads), `blobsource` (read_at adapter).
"""

from .auth import Challenge, TokenCache, parse_challenge
from .blobsource import RegistryBlobSource
from .client import BlobPushResult, ClientStats, RegistryClient
from .credentials import Credentials, CredentialStore, default_auth_files
from .errors import (
    AuthenticationError,
    ConfigError,
    ContentEncodingError,
    DigestMismatch,
    ManifestError,
    NotFoundError,
    RangeError,
    RangeNotHonoured,
    ReferenceError,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
    TooLargeError,
)
from .hosts import (
    Endpoint,
    HostConfig,
    MirrorConfig,
    ResolverConfig,
    is_local_host,
    parse_resolver_config,
)
from .manifest import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ManifestResult,
    Platform,
    build_index,
    build_manifest,
    parse_manifest,
    select_platform,
    sha256_digest,
)
from .reference import Reference, digest_hasher, validate_digest

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "AuthenticationError",
    "BlobPushResult",
    "Challenge",
    "ClientStats",
    "ConfigError",
    "ContentEncodingError",
    "CredentialStore",
    "Credentials",
    "Descriptor",
    "DigestMismatch",
    "Endpoint",
    "HostConfig",
    "ManifestError",
    "ManifestResult",
    "MirrorConfig",
    "NotFoundError",
    "Platform",
    "RangeError",
    "RangeNotHonoured",
    "Reference",
    "ReferenceError",
    "RegistryBlobSource",
    "RegistryClient",
    "RegistryError",
    "RegistryTimeout",
    "RegistryUnavailable",
    "ResolverConfig",
    "TokenCache",
    "TooLargeError",
    "build_index",
    "build_manifest",
    "default_auth_files",
    "digest_hasher",
    "is_local_host",
    "parse_challenge",
    "parse_manifest",
    "parse_resolver_config",
    "select_platform",
    "sha256_digest",
    "validate_digest",
]
