"""Scenario files: the shipped ones load, and every kind of mistake is named precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.scenario import LAZY_MODES, MODES, ScenarioError, load_scenario, parse_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

MINIMAL = {"workloads": [{"recipe": "python"}]}


@pytest.mark.parametrize("name", sorted(p.name for p in SCENARIOS.glob("*.toml")))
def test_shipped_scenarios_load(name: str) -> None:
    scenario = load_scenario(SCENARIOS / name)
    assert scenario.workloads and scenario.samples >= 2
    assert set(scenario.modes) <= set(MODES)
    # A lazy mode is measured once per store, a full pull once.
    per_sample = sum(
        len(scenario.stores) if m in LAZY_MODES else 1
        for w in scenario.workloads
        for m in scenario.modes_of(w)
    )
    assert len(scenario.keys()) == scenario.samples * per_sample


def test_default_scenario_is_the_published_style_set() -> None:
    scenario = load_scenario(SCENARIOS / "default.toml")
    assert set(scenario.modes) == set(MODES)
    assert scenario.network_profile not in ("loopback", "lan")
    assert len(scenario.workloads) >= 4 and scenario.samples == 5 and scenario.percentile == 95
    assert all(set(scenario.modes_of(w)) == set(MODES) for w in scenario.workloads)


def test_defaults() -> None:
    s = parse_scenario(MINIMAL, "x.toml")
    assert s.name == "x" and s.samples == 3 and s.percentile == 95 and s.modes == MODES
    assert s.workloads[0].name == "python" and s.workloads[0].command is None
    assert "{mountpoint}" in s.store.command
    assert set(MODES) >= LAZY_MODES


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"f.toml: workloads: missing"),
        ({"workloads": []}, r"f.toml: workloads: must be a non-empty array"),
        ({**MINIMAL, "samples": 0}, r"f.toml: samples: must be between 1 and 1000, got 0"),
        ({**MINIMAL, "samples": "3"}, r"f.toml: samples: must be an integer, got '3'"),
        ({**MINIMAL, "percentile": 101}, r"f.toml: percentile: must be between 1 and 100"),
        ({**MINIMAL, "modes": ["lazy"]}, r"f.toml: modes\[0\]: unknown mode 'lazy'"),
        ({**MINIMAL, "modes": ["legacy", "legacy"]}, r"f.toml: modes: lists a mode twice"),
        ({**MINIMAL, "runtime": "docker"}, r"f.toml: runtime: unknown runtime 'docker'"),
        ({**MINIMAL, "sampels": 3}, r"f.toml: sampels: unknown key"),
        ({**MINIMAL, "node": "bookworm"}, r"f.toml: node: unknown node 'bookworm' \(known: host"),
        ({**MINIMAL, "node": ["host", "jammy"]}, r"f.toml: node\[1\]: unknown node 'jammy'"),
        ({**MINIMAL, "node": []}, r"f.toml: node: must be a node name or a list"),
        ({**MINIMAL, "node": ["sid", "sid"]}, r"f.toml: node: lists a node twice"),
        ({**MINIMAL, "runtime": "crio", "node": "sid"}, r"f.toml: node: runtime nodes run podman"),
        ({**MINIMAL, "network": {"profile": "moon"}}, r"network.profile: unknown profile 'moon'"),
        ({**MINIMAL, "network": {"rate": 1}}, r"f.toml: network.rate: unknown key"),
        ({**MINIMAL, "store": {"command": ["x"]}}, r"store.command: must contain \{mountpoint\}"),
        ({**MINIMAL, "store": {"command": ["x", "{mnt}"]}}, r"unknown placeholder \{mnt\}"),
        ({"workloads": [{"name": "a"}]}, r"f.toml: workloads\[0\].recipe: missing"),
        ({"workloads": [{"recipe": "nope"}]}, r"workloads\[0\].recipe: unknown recipe 'nope'"),
        ({"workloads": [{"recipe": "python", "timeout": -1}]}, r"workloads\[0\].timeout: must be"),
        ({"workloads": [{"recipe": "python", "command": "ls"}]}, r"workloads\[0\].command: must"),
        ({"workloads": [{"recipe": "python"}, {"recipe": "python"}]}, r"workloads\[1\].name: dup"),
        ({"workloads": [{"recipe": "python", "stdn": "x"}]}, r"workloads\[0\].stdn: unknown key"),
        (
            {"modes": ["legacy"], "workloads": [{"recipe": "python", "modes": ["estargz"]}]},
            r"workloads\[0\].modes\[0\]: 'estargz' is not one of the scenario's modes",
        ),
        (
            {"workloads": [{"recipe": "python", "modes": ["legacy", "legacy"]}]},
            r"f.toml: workloads\[0\].modes: lists a mode twice",
        ),
    ],
)
def test_errors_name_file_key_and_problem(data: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(data, "f.toml", recipes={"python", "gcc"}, profiles={"loopback", "wan"})


def test_load_reports_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("samples = [\n")
    with pytest.raises(ScenarioError, match=r"bad.toml: not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match=r"nothere.toml: cannot read"):
        load_scenario(tmp_path / "nothere.toml")


def test_plan_keys_and_round_trip(tmp_path: Path) -> None:
    s = parse_scenario(
        {
            "samples": 2,
            "modes": ["legacy", "estargz"],
            "workloads": [{"recipe": "python", "stdin": "print(1)", "ready": "1", "timeout": 30}],
        },
        "f.toml",
    )
    assert s.keys() == [
        (0, "python", "legacy", ""),
        (0, "python", "estargz", "default"),
        (1, "python", "legacy", ""),
        (1, "python", "estargz", "default"),
    ]
    again = parse_scenario(s.to_dict(), "f.toml")
    assert again == s


def test_a_workload_can_narrow_the_modes() -> None:
    s = parse_scenario(
        {
            "samples": 1,
            "modes": ["legacy", "estargz", "zstd-chunked"],
            "workloads": [
                {"recipe": "python"},
                {"recipe": "gcc", "modes": ["zstd-chunked", "legacy"]},
            ],
        },
        "f.toml",
    )
    assert s.keys() == [
        (0, "python", "legacy", ""),
        (0, "python", "estargz", "default"),
        (0, "python", "zstd-chunked", ""),
        (0, "gcc", "legacy", ""),
        (0, "gcc", "zstd-chunked", ""),
    ]
    assert parse_scenario(s.to_dict(), "f.toml") == s


def test_workloads_from_images_and_containerfiles(tmp_path: Path) -> None:
    (tmp_path / "img.tar").write_bytes(b"")  # the sources must exist when the file loads
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Containerfile").write_text("FROM scratch\n")
    path = tmp_path / "s.toml"
    path.write_text(
        '[[workloads]]\nname = "a"\nimage = "docker-archive:img.tar"\nexpect = "hi"\n'
        'env = { X = "1" }\nplatform = "linux/arm64/v8"\n'
        '[[workloads]]\nname = "b"\ncontainerfile = "ctx/Containerfile"\ncontext = "ctx"\n'
    )
    s = load_scenario(path)
    a, b = s.workloads
    assert a.image == f"docker-archive:{tmp_path / 'img.tar'}" and a.recipe is None
    assert a.env == (("X", "1"),) and a.expect == "hi" and a.platform == "linux/arm64/v8"
    assert b.containerfile == str(tmp_path / "ctx" / "Containerfile")
    assert b.context == str(tmp_path / "ctx")
    # The stored copy (for --resume) reads back to the same scenario.
    again = parse_scenario(json.loads(json.dumps(s.to_dict())), "copy")
    assert again.workloads == s.workloads


@pytest.mark.parametrize(
    ("workload", "match"),
    [
        ({"name": "a", "image": "app:latest"}, r"workloads\[0\].image: 'app:latest' is not"),
        ({"image": "oci:/x"}, r"workloads\[0\].name: missing"),
        ({"name": "a", "recipe": "tiny", "image": "oci:/x"}, r"workloads\[0\]: name the image"),
        ({"name": "a", "image": "oci:/x", "platform": "amd64"}, r"platform: must be OS/ARCH"),
        ({"name": "a", "image": "oci:/x", "env": {"A": 1}}, r"env: must be a table"),
        ({"name": "a", "recipe": "tiny", "context": "."}, r"context: only goes with"),
    ],
)
def test_image_workload_errors(workload: dict, match: str) -> None:
    with pytest.raises(ScenarioError, match=match):
        parse_scenario({"workloads": [workload]}, "f.toml", recipes={"tiny"})


def test_node_defaults_to_the_host_and_a_list_splits_into_one_scenario_per_node() -> None:
    assert parse_scenario(MINIMAL, "x.toml").node == "host"
    s = parse_scenario({**MINIMAL, "node": ["host", "trixie", "sid"]}, "x.toml")
    assert s.nodes == ("host", "trixie", "sid")
    one = s.for_node("sid")
    assert one.node == "sid" and one.to_dict()["node"] == "sid"
    assert parse_scenario(one.to_dict(), "x.toml") == one
    assert parse_scenario(s.to_dict(), "x.toml") == s


def test_zstd_chunked_lazy_pulls_the_zstd_chunked_image_through_the_store() -> None:
    from harness.images import MODES as IMAGE_MODES
    from harness.scenario import ON_DEMAND_MODES, image_mode

    assert "zstd-chunked-lazy" in MODES and "zstd-chunked-lazy" in LAZY_MODES
    assert image_mode("zstd-chunked-lazy") == "zstd-chunked"
    assert "zstd-chunked-lazy" in ON_DEMAND_MODES  # on demand, as estargz-noopt
    assert all(image_mode(m) in IMAGE_MODES for m in MODES)


def test_several_stores_each_measure_every_lazy_mode() -> None:
    s = parse_scenario(
        {
            "samples": 1,
            "modes": ["legacy", "estargz-noopt"],
            "stores": [
                {"name": "ours"},
                {"name": "go", "command": ["go-store", "--root", "{root}", "{mountpoint}"]},
            ],
            "workloads": [{"recipe": "python"}],
        },
        "f.toml",
    )
    assert [st.name for st in s.stores] == ["ours", "go"] and s.store.name == "ours"
    assert s.keys() == [
        (0, "python", "legacy", ""),
        (0, "python", "estargz-noopt", "ours"),
        (0, "python", "estargz-noopt", "go"),
    ]
    assert s.store_named("go").command[0] == "go-store"
    assert parse_scenario(s.to_dict(), "f.toml") == s


@pytest.mark.parametrize("name", ["bb-", "b..b", "b___b", "b-.b", "x" * 250])
def test_a_workload_name_that_cannot_name_a_repository_is_refused_up_front(name: str) -> None:
    """These passed the character check and failed only when pushed (retried as transient)."""
    with pytest.raises(ScenarioError, match=r"f.toml: workloads\[0\].name: .* cannot name the"):
        parse_scenario({"workloads": [{"name": name, "image": "oci:/x"}]}, "f.toml")


@pytest.mark.parametrize("name", ["bb", "b.b", "b_b", "b__b", "b--b", "0x"])
def test_workload_names_the_registry_takes_pass(name: str) -> None:
    s = parse_scenario({"workloads": [{"name": name, "image": "oci:/x"}]}, "f.toml")
    assert s.workloads[0].name == name


@pytest.mark.parametrize(
    ("stores", "problem"),
    [
        ([{"command": ["x", "{mountpoint}"]}], r"stores\[0\].name: missing"),
        ([{"name": "a"}, {"name": "a"}], r"stores\[1\].name: duplicate store name 'a'"),
        ([{"name": "a", "command": ["x"]}], r"stores\[0\].command: must contain \{mountpoint\}"),
        ([{"name": "a", "mount_timeout": -1}], r"stores\[0\].mount_timeout: must be between"),
        ([{"name": "a", "colour": 1}], r"stores\[0\].colour: unknown key"),
        ([], r"stores: must be a non-empty array"),
    ],
)
def test_bad_stores_are_refused(stores: list[dict[str, object]], problem: str) -> None:
    with pytest.raises(ScenarioError, match=problem):
        parse_scenario({"stores": stores, "workloads": [{"recipe": "python"}]}, "f.toml")


def test_old_store_table_still_works_and_cannot_mix_with_stores() -> None:
    s = parse_scenario(
        {"store": {"mount_timeout": 5}, "workloads": [{"recipe": "python"}]}, "f.toml"
    )
    assert len(s.stores) == 1 and s.store.name == "default" and s.store.mount_timeout == 5
    with pytest.raises(ScenarioError, match="either a \\[store\\] table or"):
        parse_scenario(
            {"store": {}, "stores": [{"name": "a"}], "workloads": [{"recipe": "python"}]},
            "f.toml",
        )


def test_crio_takes_one_store_only() -> None:
    with pytest.raises(ScenarioError, match=r"stores: runtime 'crio' .*at most one store"):
        parse_scenario(
            {
                "runtime": "crio",
                "stores": [{"name": "a"}, {"name": "b"}],
                "workloads": [{"recipe": "python"}],
            },
            "f.toml",
        )


def _with(**workload: object) -> dict:
    return {"workloads": [{"name": "app", "image": "oci:/x", **workload}]}


def test_an_entrypoint_is_a_list_of_strings_or_empty_to_clear() -> None:
    """``entrypoint``: podman's --entrypoint; ``command`` stays the image's CMD after it."""
    (w,) = parse_scenario(_with(entrypoint=["/bin/sh", "-c"], command=["echo hi"]), "f").workloads
    assert w.entrypoint == ("/bin/sh", "-c") and w.command == ("echo hi",)
    (w,) = parse_scenario(_with(entrypoint="", command=["/bin/app"]), "f").workloads
    assert w.entrypoint == ()
    (w,) = parse_scenario(_with(), "f").workloads
    assert w.entrypoint is None


def test_an_entrypoint_survives_the_runs_own_copy_of_the_scenario() -> None:
    """A resumed run re-reads the scenario from its JSON copy: a cleared entrypoint is ``""``
    there, not an empty list (which is no entrypoint at all)."""
    for entrypoint in ("", ["/bin/sh", "-c"]):
        s = parse_scenario(_with(entrypoint=entrypoint, command=["x"]), "f")
        copy = json.loads(json.dumps(s.to_dict()))
        assert copy["workloads"][0]["entrypoint"] == entrypoint
        assert parse_scenario(copy, "scenario.json").to_dict() == s.to_dict()


@pytest.mark.parametrize(
    ("entrypoint", "message"),
    [
        ("/bin/sh", r'f: workloads\[0\].entrypoint: must be a non-empty list of strings, or ""'),
        ([], r"f: workloads\[0\].entrypoint: must be a non-empty list of strings"),
        (["/bin/sh", 1], r"f: workloads\[0\].entrypoint: must be a non-empty list of strings"),
        ([""], r"f: workloads\[0\].entrypoint: its first element \(the program\) must not be"),
        (5, r"f: workloads\[0\].entrypoint: must be"),
    ],
)
def test_a_malformed_entrypoint_is_named(entrypoint: object, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(_with(entrypoint=entrypoint, command=["x"]), "f")


def test_a_cleared_entrypoint_needs_a_command() -> None:
    with pytest.raises(ScenarioError, match=r'workloads\[0\].entrypoint: "" clears the image'):
        parse_scenario(_with(entrypoint=""), "f")


def test_the_readme_states_the_defaults_a_scenario_of_your_own_gets() -> None:
    """A newcomer's scenario has only [[workloads]]: README "Measure your own image" says what
    the rest defaults to (and that a limit needs a shaped link), as the code has it."""
    readme = (SCENARIOS.parent / "README.md").read_text()
    section = readme.split("## Measure your own image", 1)[1].split("\n## ", 1)[0]
    flat = " ".join(section.split())
    s = parse_scenario(MINIMAL, "x.toml")
    assert f"{s.samples} samples" in flat
    assert f"network profile `{s.network_profile}`" in flat
    assert ", ".join(f"`{m}`" for m in s.modes) in flat
    assert '`profile = "wan"`' in flat and "limit" in flat
