"""A manifest's and a config's shape, checked in one place (store/registry/manifest.py).

Every bad shape is a :class:`ManifestError` naming the manifest, the field path and the value
(cut short), never a ``KeyError``/``TypeError`` from a caller, and never a value coerced into
something else (``"491"`` served as a size). The rules are the OCI image spec's
(descriptor.md, manifest.md, config.md), which containers/image enforces by decoding into Go
structs: what is refused here, the runtime cannot pull either.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.registry import ManifestError, parse_manifest
from store.registry.manifest import (
    OCI_INDEX,
    OCI_MANIFEST,
    SHOWN_CHARS,
    SIZE_LIMIT,
    config_diff_ids,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _manifest() -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": D1,
            "size": 7,
        },
        "layers": [
            {"mediaType": LAYER, "digest": D2, "size": 10},
            {"mediaType": LAYER, "digest": D3, "size": 20, "annotations": {"a": "b"}},
            {"mediaType": LAYER, "digest": D2, "size": 0},
        ],
    }


def _parse(obj: Any) -> Any:
    return parse_manifest(json.dumps(obj).encode(), None, "sha256:" + "f" * 64)


def _layer(i: int, **fields: Any) -> Any:
    def change(m: dict[str, Any]) -> None:
        m["layers"][i].update(fields)

    return change


def _set(key: str, value: Any) -> Any:
    return lambda m: m.__setitem__(key, value)


BAD_MANIFESTS = {
    # (change to the good manifest, field path named, value shown)
    "layers an object": (_set("layers", {"a": 1}), "layers", '{"a": 1}'),
    "layers a string": (_set("layers", "x"), "layers", '"x"'),
    "a layer a string": (lambda m: m["layers"].append("junk"), "layers[3]", '"junk"'),
    "a layer a list": (lambda m: m["layers"].insert(1, [1]), "layers[1]", "[1]"),
    "size a word": (_layer(2, size="abc"), "layers[2].size", '"abc"'),
    "size a numeral": (_layer(2, size="491"), "layers[2].size", '"491"'),
    "size negative": (_layer(2, size=-1), "layers[2].size", "-1"),
    "size huge float": (_layer(2, size=1e30), "layers[2].size", "1e+30"),
    "size float": (_layer(0, size=10.0), "layers[0].size", "10.0"),
    "size a bool": (_layer(0, size=True), "layers[0].size", "true"),
    "size null": (_layer(0, size=None), "layers[0].size", "null"),
    "size 2^63": (_layer(0, size=SIZE_LIMIT), "layers[0].size", str(SIZE_LIMIT)),
    "size missing": (lambda m: m["layers"][1].pop("size"), "layers[1].size", "missing"),
    "digest missing": (lambda m: m["layers"][1].pop("digest"), "layers[1].digest", "missing"),
    "digest a number": (_layer(1, digest=5), "layers[1].digest", "5"),
    "digest a path": (
        _layer(1, digest="sha256:../../v2/x/blobs/sha256:" + "0" * 64),
        "layers[1].digest",
        '"sha256:../../v2/x',
    ),
    "digest short": (_layer(1, digest="sha256:abc"), "layers[1].digest", '"sha256:abc"'),
    "mediaType a number": (_layer(0, mediaType=3), "layers[0].mediaType", "3"),
    "annotations a list": (_layer(1, annotations=["a"]), "layers[1].annotations", '["a"]'),
    "annotation a number": (
        _layer(1, annotations={"containerd.io/snapshot/stargz/toc.digest": 5}),
        'layers[1].annotations["containerd.io/snapshot/stargz/toc.digest"]',
        "5",
    ),
    "annotation null": (_layer(1, annotations={"x": None}), 'layers[1].annotations["x"]', "null"),
    "platform a string": (_layer(0, platform="linux"), "layers[0].platform", '"linux"'),
    "config a string": (_set("config", "x"), "config", '"x"'),
    "config size a word": (
        lambda m: m["config"].update(size="7"),
        "config.size",
        '"7"',
    ),
    "config missing": (lambda m: m.pop("config"), "config", "missing"),
    "manifest annotations a list": (_set("annotations", [1]), "annotations", "[1]"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_bad_shape_is_a_manifest_error_naming_the_field_and_value(case: str) -> None:
    change, field, value = BAD_MANIFESTS[case]
    m = _manifest()
    change(m)
    with pytest.raises(ManifestError) as exc:
        _parse(m)
    text = str(exc.value)
    assert text.startswith(f"manifest sha256:{'f' * 64}: {field}: "), text
    assert value in text, text


def test_a_good_manifest_keeps_its_descriptors() -> None:
    parsed = _parse(_manifest())
    assert [(d.digest, d.size) for d in parsed.layers] == [(D2, 10), (D3, 20), (D2, 0)]
    assert parsed.layers[1].annotations == {"a": "b"}
    assert parsed.config.digest == D1
    big = _manifest()
    big["layers"][0]["size"] = SIZE_LIMIT - 1
    assert _parse(big).layers[0].size == SIZE_LIMIT - 1


def test_absent_or_null_layers_are_none() -> None:
    """As Go decodes a missing or null slice (the config's diff_ids then count the layers)."""
    m = _manifest()
    del m["layers"]
    assert _parse(m).layers == []
    m["layers"] = None
    assert _parse(m).layers == []


def test_a_long_bad_value_is_cut_short() -> None:
    m = _manifest()
    m["layers"][0]["size"] = "9" * 10_000
    with pytest.raises(ManifestError) as exc:
        _parse(m)
    assert len(str(exc.value)) < 200 + SHOWN_CHARS and str(exc.value).endswith("…")


def test_an_index_checks_its_manifest_descriptors() -> None:
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": D1, "size": 5, "platform": {"os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": D2, "size": "5"},
        ],
    }
    with pytest.raises(ManifestError, match=r": manifests\[1\]\.size: .*got \"5\""):
        _parse(index)
    index["manifests"] = {"x": 1}
    with pytest.raises(ManifestError, match=r": manifests: expected an array"):
        _parse(index)


def test_a_media_type_that_is_not_a_string_is_unsupported() -> None:
    m = _manifest()
    m["mediaType"] = ["x"]
    with pytest.raises(ManifestError, match=r"unsupported media type \[\"x\"\]"):
        _parse(m)


# -- the config's rootfs.diff_ids ----------------------------------------------------------

BAD_CONFIGS = {
    "rootfs a string": ({"rootfs": "x"}, "rootfs", '"x"'),
    "rootfs a list": ({"rootfs": [D1]}, "rootfs", "["),
    "diff_ids an object": ({"rootfs": {"diff_ids": {"a": 1}}}, "rootfs.diff_ids", '{"a": 1}'),
    "diff_ids a string": ({"rootfs": {"diff_ids": D1}}, "rootfs.diff_ids", '"sha256:111'),
    "a diff_id a number": ({"rootfs": {"diff_ids": [D1, 5]}}, "rootfs.diff_ids[1]", "5"),
    "a diff_id not a digest": ({"rootfs": {"diff_ids": ["abc"]}}, "rootfs.diff_ids[0]", '"abc"'),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_names_the_field_and_value(case: str) -> None:
    config, field, value = BAD_CONFIGS[case]
    with pytest.raises(ManifestError) as exc:
        config_diff_ids(config)
    assert str(exc.value).startswith(f"{field}: "), exc.value
    assert value in str(exc.value)


def test_good_and_absent_diff_ids() -> None:
    assert config_diff_ids({"rootfs": {"type": "layers", "diff_ids": [D1, D2]}}) == [D1, D2]
    assert config_diff_ids({}) == [] == config_diff_ids({"rootfs": {"type": "layers"}})


# -- any JSON value in a descriptor field ---------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(["mediaType", "digest", "size", "annotations", "platform"])


@given(field=FIELDS, value=JSON, index=st.integers(0, 2))
def test_any_value_in_a_layer_field_is_kept_as_is_or_refused_by_name(field, value, index) -> None:
    m = _manifest()
    m["layers"][index][field] = value
    try:
        layers = _parse(m).layers
    except ManifestError as exc:
        assert f": layers[{index}].{field}" in str(exc)
        return
    kept = layers[index]
    got = {
        "mediaType": kept.media_type,
        "digest": kept.digest,
        "size": kept.size,
        "annotations": kept.annotations,
        "platform": kept.platform,
    }[field]
    assert got == value and type(got) is type(value)
    if field == "size":
        assert type(value) is int and 0 <= value < SIZE_LIMIT


@given(layers=JSON)
def test_any_layers_value_is_a_list_of_descriptors_or_refused(layers) -> None:
    m = _manifest()
    m["layers"] = layers
    try:
        parsed = _parse(m).layers
    except ManifestError as exc:
        assert ": layers" in str(exc)
        return
    assert parsed == [] and layers in (None, [])
