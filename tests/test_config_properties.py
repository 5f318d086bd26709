"""Any TOML-shaped table given to the store's config parser or the harness's scenario parser
gives a config/scenario or a worded error, never another exception (a crash with a traceback
is what a user's typo must not get)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.scenario import ScenarioError, parse_scenario
from store.config import ConfigError, parse_config

# Keys the parsers know, so that generated tables reach past the unknown-key check.
_STORE_KEYS = [
    "noprefetch",
    "prefetch_timeout_sec",
    "no_background_fetch",
    "max_concurrency",
    "resolve_result_entry_ttl_sec",
    "cache_max_bytes",
    "metrics_address",
    "access_trace_path",
    "timeline_path",
    "resolve_timeout_sec",
    "auth_file",
    "toc_max_bytes",
    "toc_max_entries",
    "chunk_max_bytes",
    "overlay_opaque_type",
    "blob",
    "fuse",
    "resolver",
    "host",
    "mirrors",
    "insecure",
    "request_timeout_sec",
    "header",
    "chunk_size",
    "valid_interval",
    "fetching_timeout_sec",
    "max_retries",
    "attr_timeout",
    "entry_timeout",
    "prefetch_size",
    "disable_verification",
    "metadata_store",
]
_SCENARIO_KEYS = [
    "name",
    "samples",
    "percentile",
    "modes",
    "runtime",
    "node",
    "seed",
    "network",
    "store",
    "stores",
    "workloads",
    "recipe",
    "image",
    "ready",
    "expect",
    "entrypoint",
    "env",
    "reference",
    "command",
    "profile",
    "estargz",
    "legacy",
    "zstd-chunked-lazy",
    "python",
]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.datetimes(max_value=dt.datetime(9999, 1, 1)),
    st.dates(),
)


def _tables(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    names = st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=6))
    values = st.recursive(
        _scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)
        ),
        max_leaves=12,
    )
    return st.dictionaries(names, values, max_size=6)


_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


_PARSERS = {
    "store config": (parse_config, ConfigError, _tables(_STORE_KEYS)),
    "scenario": (parse_scenario, ScenarioError, _tables(_SCENARIO_KEYS)),
}


@pytest.mark.parametrize("what", list(_PARSERS))
@_SETTINGS
@given(data=st.data())
def test_a_table_gives_a_result_or_a_worded_error(what: str, data: st.DataObject) -> None:
    parse, error, tables = _PARSERS[what]
    try:
        parse(data.draw(tables), "file.toml")
    except error as exc:
        assert "file.toml" in str(exc)
