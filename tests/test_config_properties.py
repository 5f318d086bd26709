"""Any TOML-shaped table given to the store's config parser or the harness's scenario parser
gives a config/scenario or a worded error, never another exception (a crash with a traceback
is what a user's typo must not get)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.scenario import SCENARIO_KEYS, WORKLOAD_KEYS, ScenarioError, parse_scenario
from store.config import _IGNORED, _KNOWN, _SECTIONS, ConfigError, parse_config

# Keys the parsers know (and a few values they take), so that generated tables reach past
# the unknown-key checks.
_STORE_KEYS = sorted(
    {part for key in (*_KNOWN, *_IGNORED) for part in key.split(".")}
    | {*_SECTIONS, "resolver", "host", "mirrors", "insecure", "header", "request_timeout_sec"}
)
_SCENARIO_KEYS = sorted(
    {*SCENARIO_KEYS, *WORKLOAD_KEYS, "profile", "command", "estargz", "legacy", "python"}
)

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
