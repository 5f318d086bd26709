"""Bad input from a user's side: a one-line error naming the file and key, never a traceback,
a silently ignored key, nor a gate that passes what it cannot judge."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import UserError, main
from harness.gate import Gate, compare_runs, gate_failures, load_gate
from harness.scenario import ScenarioError, load_scenario, parse_scenario
from tests.harness.test_stats_gate import SCENARIO, write_run

# -- scenario: store command placeholders ----------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "problem"),
    [
        ("{mountpoint", "unbalanced"),  # str.format: expected '}' before end of string
        ("{mountpoint}}x}", "unbalanced"),  # Single '}' encountered
        ("{mountpoint}/{root:x}", "{root:x}"),  # a format spec: ValueError at store start
        ("{mountpoint}/{root!z}", "{root!z}"),  # a conversion: the same
    ],
)
def test_a_malformed_store_placeholder_is_a_scenario_error(arg: str, problem: str) -> None:
    data = {"store": {"command": ["x", arg]}, "workloads": [{"recipe": "python"}]}
    with pytest.raises(ScenarioError, match=r"s\.toml: store\.command: .*") as exc:
        parse_scenario(data, "s.toml")
    assert problem in str(exc.value)


def test_a_malformed_store_placeholder_exits_1_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[store]\ncommand = ["x", "{mountpoint"]\n[[workloads]]\nrecipe = "tiny"\n')
    assert main(["run", str(path), "--results-dir", str(tmp_path / "r")]) == 1
    assert "store.command" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_escaped_braces_stay_allowed() -> None:
    data = {
        "store": {"command": ["x", "--opt={{a}}", "{mountpoint}"]},
        "workloads": [{"recipe": "python"}],
    }
    assert parse_scenario(data, "s.toml").store.command[1] == "--opt={{a}}"


# -- scenario: a NUL character where a process or a path takes the string ----------------------


@pytest.mark.parametrize(
    ("lines", "where"),
    [
        ('recipe = "tiny"\ncommand = ["/bin/sh", "-c", "echo a\\u0000b"]', "command"),
        ('recipe = "tiny"\nentrypoint = ["/bin/sh\\u0000"]', "entrypoint"),
        ('recipe = "tiny"\nenv = { A = "x\\u0000" }', "env"),
        ('recipe = "tiny"\nenv = { "A\\u0000" = "x" }', "env"),
        ('name = "app"\nimage = "oci-archive:/tmp/a\\u0000b"', "image"),
        ('name = "app"\ncontainerfile = "/tmp/a\\u0000b"', "containerfile"),
    ],
)
def test_a_nul_character_in_a_command_environment_or_path_is_a_scenario_error(
    tmp_path: Path, lines: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Loaded, a command with a NUL ended the run with a ValueError traceback ("embedded null
    byte") when its container was created, after every image was pushed; a Containerfile
    path with one, when the scenario was read."""
    path = tmp_path / "s.toml"
    path.write_text(f"[[workloads]]\n{lines}\n")
    with pytest.raises(ScenarioError, match=rf"s\.toml: workloads\[0\]\.{where}: .*NUL"):
        load_scenario(path)
    assert main(["run", str(path), "--results-dir", str(tmp_path / "r")]) == 1
    assert "NUL character" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_nul_character_in_a_store_command_or_stdin() -> None:
    """A store command cannot carry one either; a workload's stdin is fed as bytes, and may."""
    workloads = [{"recipe": "tiny", "stdin": "a\0b"}]
    data = {"store": {"command": ["x", "{mountpoint}\0"]}, "workloads": workloads}
    with pytest.raises(ScenarioError, match=r"store\.command: .*NUL"):
        parse_scenario(data, "s.toml")
    assert parse_scenario({"workloads": workloads}, "s.toml").workloads[0].stdin == "a\0b"


@pytest.mark.parametrize("key", ["ready", "expect"])
def test_a_carriage_return_in_ready_or_expect_is_a_scenario_error(key: str) -> None:
    """The output is read as lines with universal newlines: text with a \\r in it never
    matched, and every run of the workload failed or timed out."""
    from harness.container import start_until_ready
    from tests.harness.test_runner_unit import _ShellEnv

    crlf = "listening\r\nready"
    outcome = start_until_ready(
        _ShellEnv("printf 'listening\\r\\nready\\n'"),  # type: ignore[arg-type]
        "cid",
        stdin=None,
        ready=crlf,
        timeout=10,
    )
    assert not outcome.ready and outcome.stdout == "listening\nready\n"
    data = {"workloads": [{"recipe": "tiny", key: crlf}]}
    with pytest.raises(ScenarioError, match=rf"s\.toml: workloads\[0\]\.{key}: .*carriage"):
        parse_scenario(data, "s.toml")
    data = {"workloads": [{"recipe": "tiny", key: "listening\nready"}]}
    assert parse_scenario(data, "s.toml").workloads[0]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('name = "{long}"\n[[workloads]]\nrecipe = "tiny"', "name"),
        ('[[workloads]]\nrecipe = "tiny"\nname = "{long}"', r"workloads\[0\]\.name"),
        ('[[workloads]]\nrecipe = "tiny"\n[[stores]]\nname = "{long}"', r"stores\[0\]\.name"),
    ],
)
def test_a_name_too_long_for_the_files_it_names_is_a_scenario_error(
    tmp_path: Path, text: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scenario name of 250 characters ended `run` with a traceback (OSError: File name too
    long) when it made the run directory; a long workload or store name, every lazy
    measurement, in its working directory."""
    path = tmp_path / "s.toml"
    path.write_text(text.format(long="a" * 120) + "\n")
    with pytest.raises(ScenarioError, match=rf"s\.toml: {where}: is 120 bytes long, at most"):
        load_scenario(path)
    assert main(["run", str(path), "--results-dir", str(tmp_path / "r")]) == 1
    assert "shorten it" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_run_id_too_long_for_a_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('[[workloads]]\nrecipe = "tiny"\n')
    runs = tmp_path / "runs"
    assert main(["run", str(scenario), "--results-dir", str(runs), "--run-id", "b" * 300]) == 1
    assert "--run-id: 300 bytes long, at most 200 fit" in capsys.readouterr().err
    assert not runs.exists()


def test_a_scenario_or_gate_file_that_is_not_utf8_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both ended with a UnicodeDecodeError traceback (a file saved as Latin-1)."""
    scenario = tmp_path / "s.toml"
    scenario.write_bytes(b'name = "caf\xe9"\n[[workloads]]\nrecipe = "tiny"\n')
    assert main(["run", str(scenario), "--results-dir", str(tmp_path / "r")]) == 1
    assert "s.toml: not UTF-8 text (byte 0xe9 at offset 11)" in capsys.readouterr().err
    gate = tmp_path / "gate.toml"
    gate.write_bytes(b"# r\xe9sum\xe9\nalpha = 0.05\n")
    with pytest.raises(UserError, match=r"gate\.toml: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_gate(gate)


def test_a_file_name_that_cannot_be_the_scenario_name_says_so() -> None:
    """Without ``name`` the file's name is the scenario's: an error about a ``name`` the user
    never wrote did not say where it came from."""
    with pytest.raises(ScenarioError, match=r"got 'my app' \(the file's name, as no name is"):
        parse_scenario({"workloads": [{"recipe": "tiny"}]}, "my app.toml")


# -- scenario: a local image source that does not exist ----------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        'image = "oci-archive:typo-app.tar"',
        'image = "docker-archive:/no/such/app.tar"',
        'image = "oci:missing-layout:latest"',
        'containerfile = "no/Containerfile"',
    ],
)
def test_a_missing_image_file_is_named_when_the_scenario_loads(tmp_path: Path, line: str) -> None:
    """Found at load time, not after the earlier workloads' images were built and pushed."""
    path = tmp_path / "s.toml"
    path.write_text(f'[[workloads]]\nrecipe = "tiny"\n[[workloads]]\nname = "app"\n{line}\n')
    with pytest.raises(ScenarioError, match=r"s\.toml: workloads\[1\]\.(image|containerfile): "):
        load_scenario(path)


def test_an_existing_image_file_loads(tmp_path: Path) -> None:
    (tmp_path / "app.tar").write_bytes(b"")
    path = tmp_path / "s.toml"
    path.write_text('[[workloads]]\nname = "app"\nimage = "oci-archive:app.tar"\n')
    assert load_scenario(path).workloads[0].image == f"oci-archive:{tmp_path / 'app.tar'}"


_STORES = """modes = ["legacy", "estargz-noopt"]
[[workloads]]
recipe = "tiny"
[[stores]]
name = "ours"
[[stores]]
name = "theirs"
command = [{command}, "{{mountpoint}}"]
"""


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ('"/nonexistent/store"', r"'/nonexistent/store' is not an executable file"),
        ('"no-such-store-xyz"', r"'no-such-store-xyz' not found on PATH"),
    ],
)
def test_a_missing_store_program_is_named_when_the_scenario_loads(
    tmp_path: Path, command: str, problem: str
) -> None:
    """Found at load time, not at the first lazy measurement after every image was pushed."""
    path = tmp_path / "s.toml"
    path.write_text(_STORES.format(command=command))
    with pytest.raises(
        ScenarioError, match=r"s\.toml: stores\[1\]\.command: store command " + problem
    ):
        load_scenario(path)


def test_store_programs_found_or_built_later_load(tmp_path: Path) -> None:
    """An executable file, the Go store (built by prepare_store, not at load) and a store no
    mode measures through (legacy only) all load."""
    program = tmp_path / "store.sh"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    path = tmp_path / "s.toml"
    for command in (f'"{program}"', '"{go-stargz-store}"'):
        path.write_text(_STORES.format(command=command))
        assert load_scenario(path).stores[1].command[0] in (str(program), "{go-stargz-store}")
    legacy_only = _STORES.replace(', "estargz-noopt"', "")
    path.write_text(legacy_only.format(command='"/nonexistent/store"'))
    assert load_scenario(path).modes == ("legacy",)


# -- gate files: typos inside tables ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[total]\nmax_increase_pc = 5\n", "total.max_increase_pc"),
        ("[fetched]\nmin_increase = 5\n", "fetched.min_increase"),
        ("[ratio]\nestargz_noopt = 0.5\n", "ratio.estargz_noopt"),
    ],
)
def test_a_typo_in_a_gate_file_is_an_error(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "gate.toml"
    path.write_text(text)
    with pytest.raises(Exception, match=rf"gate\.toml: {where}: unknown"):
        load_gate(path)


def test_the_packaged_gate_still_loads() -> None:
    assert load_gate().max_ratio


# -- gate: a regression it has too few samples to test -----------------------------------------


def test_the_gate_does_not_pass_a_regression_it_cannot_test(tmp_path: Path) -> None:
    """One sample on a side: Mann–Whitney cannot reach alpha, so a 3× slow-down used to
    pass ("gate … passed", exit 0)."""
    base = write_run(tmp_path / "a", {"": [30.0], "ours": [5.0]})
    slow = write_run(tmp_path / "b", {"": [30.0], "ours": [15.0]})
    problems = gate_failures(compare_runs(base, slow), Gate())
    assert len(problems) == 1
    assert "python/estargz-noopt [ours]" in problems[0] and "too few samples" in problems[0]
    # No change past the thresholds: nothing to report, however few the samples.
    same = write_run(tmp_path / "c", {"": [30.2], "ours": [5.1]})
    assert gate_failures(compare_runs(base, same), Gate()) == []
    # Enough samples for the test: an insignificant change still passes (as before).
    base3 = write_run(tmp_path / "d", {"": [30, 30, 30], "ours": [5, 9, 5.1]})
    new3 = write_run(tmp_path / "e", {"": [30, 30, 30], "ours": [9, 4.9, 9.2]})
    assert gate_failures(compare_runs(base3, new3), Gate()) == []


# -- merge: a shard missing from the inputs ----------------------------------------------------


def test_merging_without_every_shard_says_so_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a = write_run(tmp_path / "a", {"": [30, 31, 30]}, scenario=SCENARIO, shard="1/3")
    b = write_run(tmp_path / "b", {"ours": [5, 5, 6]}, scenario=SCENARIO, shard="2/3")
    assert main(["merge", str(tmp_path / "out"), str(a), str(b)]) == 1
    err = capsys.readouterr().err
    assert "shard 3/3" in err
    assert (tmp_path / "out" / "report.md").exists()  # written all the same, for a look


# -- scenario: a workload's published reference ------------------------------------------------


def test_a_reference_to_no_published_image_is_a_scenario_error(tmp_path: Path) -> None:
    """A typo in ``reference`` named nothing, and the report compared the workload with no
    published image, silently."""
    path = tmp_path / "s.toml"
    path.write_text('[[workloads]]\nrecipe = "tomcat"\nreference = "glasfish:4.1-jdk8"\n')
    with pytest.raises(ScenarioError, match=r"workloads\[0\]\.reference: 'glasfish:4.1-jdk8'"):
        load_scenario(path)
    path.write_text('[[workloads]]\nrecipe = "tomcat"\nreference = "glassfish"\n')
    assert load_scenario(path).workloads[0].reference == "glassfish"  # the repository alone


def test_a_reference_is_never_replaced_by_the_stand_in_match() -> None:
    """``python:3.8`` names no published image: no comparison, not python:3.7's by the
    workload's name."""
    from harness.report import match_published, read_published

    published = read_published()
    assert match_published("python", "python", "python:3.8", published) is None
    assert match_published("python", "python", None, published).image == "python:3.7"
    assert match_published("x", None, "python", published).image == "python:3.7"


# -- a resumed run keeps the failures it measured over ----------------------------------------


def test_a_failure_measured_again_on_resume_stays_in_the_report(tmp_path: Path) -> None:
    """``run --resume`` measures failed keys again and the last record wins; the failure the
    resume measured over vanished from every output, and a flaky cell read as a clean one."""
    from harness.records import Record, append_record, read_records, read_superseded
    from harness.report import write_report

    run = write_run(tmp_path / "r", {"": [10.0, 10.5, 9.5], "ours": [2.0, 2.1, 1.9]})
    failed = Record(1, "python", "estargz-noopt", store="ours", status="error", error="run: boom")
    lines = (run / "records.jsonl").read_text().splitlines(keepends=True)
    (run / "records.jsonl").write_text("".join(lines[:4]))  # sample 1 of "ours" not yet measured
    append_record(run, failed)
    for line in lines[4:]:  # the resume measures it (and the rest) again
        with (run / "records.jsonl").open("a") as f:
            f.write(line)
    assert [r.status for r in read_records(run)] == ["ok"] * 6
    ((old, new),) = read_superseded(run)
    assert (old.status, old.error, new.status) == ("error", "run: boom", "ok")
    report = write_report(run).report.read_text()
    assert "## Measured again on resume" in report
    assert "sample 1 python/estargz-noopt [ours]: error: run: boom — then ok" in report


# -- convert: a destination that cannot hold the converted layers ------------------------------


@pytest.mark.parametrize(
    "dest",
    ["docker-archive:{tmp}/out.tar", "containers-storage:[overlay@{tmp}/g+{tmp}/r]localhost/a:e"],
)
@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
def test_convert_refuses_a_destination_that_decompresses_the_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture, dest: str, fmt: str
) -> None:
    # Both transports keep only uncompressed tars: the run would "succeed" with an image that
    # is neither eStargz nor zstd:chunked. Refused before the source is read (an empty file
    # here), and so before --optimize would run the workload.
    dest = dest.format(tmp=tmp_path)
    (tmp_path / "src.tar").touch()
    src = f"oci-archive:{tmp_path}/src.tar"
    assert main(["convert", "--no-progress", "--format", fmt, src, dest]) == 1
    err = capsys.readouterr().err
    assert "stores layers uncompressed" in err and "oci-archive:" in err, err
    assert "Traceback" not in err and not (tmp_path / "out.tar").exists()


def test_a_docker_archive_of_several_images_says_how_to_name_one() -> None:
    from harness.images.source import _hint

    stderr = (
        'level=fatal msg="determining manifest MIME type for docker-archive:/x.tar: '
        'Unexpected tar manifest.json: expected 1 item, got 3"'
    )
    hint = _hint(stderr)
    assert "holds 3 images" in hint
    assert "docker-archive:FILE:NAME:TAG" in hint and "docker-archive:FILE:@N" in hint
    assert _hint('level=fatal msg="pinging container registry: connection refused"') == ""


@pytest.mark.parametrize(("transport", "where"), [("oci", "DIR"), ("oci-archive", "FILE")])
@pytest.mark.parametrize(
    "words",  # skopeo 1.9's, from `inspect --raw` and from `copy`
    ['Error parsing image name \\"{ref}\\": ', "initializing source {ref}:: "],
)
def test_an_oci_layout_of_several_images_says_how_to_name_one(
    transport: str, where: str, words: str
) -> None:
    from harness.images.source import _hint

    said = words.format(ref=f"{transport}:/tmp/x")
    stderr = f'level=fatal msg="{said}more than one image in oci, choose an image"'
    assert f"name one as {transport}:{where}:TAG" in _hint(stderr)


@pytest.mark.parametrize("command", [["report"], ["run", "--resume"], ["merge", "OUT"]])
def test_a_run_directory_that_is_missing_or_a_file_is_said_so(
    tmp_path: Path, capsys, command: list[str]
) -> None:
    argv = [str(tmp_path / c) if c == "OUT" else c for c in command]
    extra = [str(tmp_path / "other")] if command[0] == "merge" else []
    assert main([*argv, str(tmp_path / "nope"), *extra]) == 1
    assert f"{tmp_path / 'nope'}: no such run directory" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main([*argv, str(afile), *extra]) == 1
    assert f"{afile}: not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["images", "ls"], ["runtimes", "ls"], ["stores", "ls"]])
def test_a_mistyped_cache_dir_to_read_is_an_error_not_an_empty_listing(
    tmp_path: Path, capsys, command: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--cache-dir", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert f"no such directory: {tmp_path / 'nope'}" in capsys.readouterr().err


# -- the command line itself ------------------------------------------------------------------


def test_version_is_the_installed_distribution_s(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lazybench {version('lazybench')}"


def test_a_closed_pipe_on_stdout_ends_quietly(tmp_path: Path) -> None:
    """`lazybench estargz ls BLOB | head -1` once ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    from tests.conftest import VECTORS

    blob = VECTORS / "chunked-default-level1.blob"
    proc = subprocess.run(
        f"'{sys.executable}' -m harness estargz ls '{blob}' | head -1 >/dev/null",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
        executable="/bin/bash",
    )
    assert proc.returncode == 0 and proc.stderr == ""


def test_runtime_crio_without_crio_is_refused_saying_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """This machine has no CRI-O (DESIGN.md §6): the run stops before anything starts, and
    says so as a refusal, not as a "skipped" driver."""
    import shutil

    if shutil.which("crictl") is not None:
        pytest.skip("crictl is installed here")
    path = tmp_path / "s.toml"
    path.write_text('runtime = "crio"\n[[workloads]]\nrecipe = "tiny"\n')
    assert main(["run", str(path), "--results-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "runtime 'crio': crictl is not installed" in err and "skipped" not in err
    assert 'runtime = "podman"' in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# -- signals outside the measurement loop --------------------------------------------------------


def test_sigterm_while_a_report_is_written_cleans_up_like_ctrl_c(tmp_path: Path) -> None:
    """SIGTERM (``kill``, ``timeout``, ``systemctl stop``) ended lazybench where it stood
    outside ``run``'s measurements: ``report`` left its staging directory in the run
    directory, with no word said (exit -15). It is raised as Ctrl-C is now."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.harness.test_results import make_run

    run_dir = make_run(tmp_path / "run", samples=40)
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "report", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LAZYBENCH_CACHE": str(tmp_path / "cache")},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if list(run_dir.glob(".report-*")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "lazybench: interrupted (SIGTERM)" in err
    assert list(run_dir.glob(".report-*")) == []


@pytest.mark.parametrize("where", ["preparing", "reporting"])
def test_a_run_interrupted_outside_its_measurements_says_what_is_kept(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before measuring began (a runtime node's build, the runtime's versions), a signal left
    the run directory with its scenario and said only "interrupted"; while the report was
    written, that every measurement was kept and `lazybench report` writes it went unsaid."""
    import harness.measure
    import harness.report
    from harness.cli import Terminated

    def interrupted(*args: object, **kwargs: object) -> None:
        raise Terminated("SIGTERM")

    def measured_all(self: harness.measure.Runner) -> list[object]:
        self.run_dir.mkdir(parents=True)
        return []

    if where == "preparing":
        monkeypatch.setattr(harness.measure.Runner, "_runtime_node", interrupted)
    else:
        monkeypatch.setattr(harness.measure.Runner, "run", measured_all)
        monkeypatch.setattr(harness.report, "write_report", interrupted)
    scenario = tmp_path / "s.toml"
    scenario.write_text('modes = ["legacy"]\n[[workloads]]\nrecipe = "tiny"\n')
    runs = tmp_path / "runs"
    args = ["run", str(scenario), "--results-dir", str(runs), "--run-id", "r"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 130
    err = capsys.readouterr().err
    if where == "preparing":
        assert "interrupted (SIGTERM) before any measurement finished" in err
        assert f"lazybench run --resume {runs / 'r'}" in err
    else:
        assert "interrupted (SIGTERM) while writing the report; every measurement is " in err
        assert f"`lazybench report {runs / 'r'}` writes it" in err


@pytest.mark.parametrize("command", ["net", "images", "runtimes", "stores"])
def test_list_is_an_alias_of_ls_as_in_podman(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`podman image list` is `podman image ls`; the same spelling lists here too."""
    from harness.cli import build_parser

    parser = build_parser()
    ls, alias = parser.parse_args([command, "ls"]), parser.parse_args([command, "list"])
    assert alias.func is ls.func
