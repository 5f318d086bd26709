"""Typed registry errors. Each message names the host, repository and digest involved.

Callers (the store's FUSE layer, the harness CLI) turn these into errno values or one-line
messages; they never need to look at httpx exceptions.
"""

from __future__ import annotations

import datetime
import email.utils
import ssl

# What a registry, the host it redirects to or its token server answers while busy or failing
# for a moment (RFC 9110 §15.5.9, §15.6; RFC 6585 §4): the request is sent again.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The longest wait a Retry-After (429, 503) gets before the next try; callers' deadlines bound
# the whole request anyway.
RETRY_AFTER_MAX = 10.0


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3: delay-seconds or an
    HTTP-date), None when absent or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


class RegistryError(Exception):
    """Base of every error the registry client raises."""

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        repository: str | None = None,
        digest: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.host = host
        self.repository = repository
        self.digest = digest
        self.status = status


class ReferenceError(RegistryError, ValueError):
    """An image reference that cannot be parsed."""


class AuthenticationError(RegistryError):
    """Credentials missing or refused (401/403 after answering the challenge)."""


class NotFoundError(RegistryError):
    """The manifest, blob or repository does not exist (404)."""


class RegistryUnavailable(RegistryError):
    """Could not talk to any endpoint: refused, reset, 5xx after retries. ``retry_after``:
    the seconds the registry asked to wait before the next try (``Retry-After``), if any."""

    retry_after: float | None = None


class RegistryTimeout(RegistryUnavailable):
    """An endpoint did not answer within the configured timeout."""


class DigestMismatch(RegistryError):
    """Bytes received do not hash to the digest that was asked for."""


class ManifestError(RegistryError):
    """A manifest or index is malformed, of an unknown type, or has no matching platform."""


class TooLargeError(RegistryError):
    """A blob body (an image config) larger than the limit the caller set for it (an
    oversized manifest raises :class:`ManifestError`)."""


class RangeError(RegistryError):
    """A range response that does not match what was asked (bad Content-Range, short body)."""


class RangeNotHonoured(RangeError):
    """A registry answered a Range request with the whole blob (200) where only part of it was
    asked: it cannot serve a blob lazily. Retried like any :class:`RangeError` (a cache that
    fills may answer 200 once), without reading the body."""


class ContentEncodingError(RegistryError):
    """A blob, blob range or manifest answered with a ``Content-Encoding`` other than
    ``identity``. The client asks for ``identity`` and never decodes such a body: the bytes it
    needs are the stored ones, which it verifies against their digest (a decoded body is not
    them, and decoding a hostile one can expand without bound). Not retried."""


class ConfigError(RegistryError):
    """Resolver or credentials configuration that cannot be used."""


def is_tls_failure(exc: BaseException) -> bool:
    """Whether an SSL error (a certificate not trusted, a client certificate refused) is
    along ``exc``'s cause chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "[SSL" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
