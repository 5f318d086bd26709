"""Runner pieces that need no services: the plan, workload defaults, the CLI's refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.container import RunOutcome, start_until_ready
from harness.plan import plan
from harness.prepare import resolve
from harness.scenario import parse_scenario
from harness.store_proc import read_trace, store_config_text

SCENARIO = {
    "samples": 3,
    "modes": ["legacy", "estargz-noopt", "estargz"],
    "workloads": [{"recipe": "python"}, {"recipe": "gcc"}, {"recipe": "tiny"}],
}


def test_plan_shuffles_each_sample_and_is_reproducible() -> None:
    s = parse_scenario(SCENARIO, "s.toml")
    order = plan(s)
    assert sorted(order) == sorted(s.keys())
    assert plan(s) == order  # the same seed, the same order: a resume keeps it
    per_sample = [[k[1:] for k in order if k[0] == n] for n in range(3)]
    assert len({tuple(p) for p in per_sample}) > 1, "samples were not shuffled"
    other = parse_scenario({**SCENARIO, "seed": 7}, "s.toml")
    assert plan(other) != order


def test_workloads_take_the_recipes_defaults() -> None:
    s = parse_scenario(
        {"workloads": [{"recipe": "gcc"}, {"recipe": "postgres", "timeout": 5, "ready": "x"}]},
        "s.toml",
    )
    gcc, pg = (resolve(w) for w in s.workloads)
    assert gcc.stdin and "gcc" in " ".join(gcc.command) and gcc.ready == "hello"
    assert pg.ready == "x" and pg.timeout == 5 and pg.repo == "lazybench/postgres"


def test_store_config_marks_the_registry_insecure() -> None:
    import tomllib

    cfg = tomllib.loads(
        store_config_text(["10.1.2.3:5000"], noprefetch=True, metrics_address="127.0.0.1:9")
    )
    assert cfg["noprefetch"] is True and cfg["metrics_address"] == "127.0.0.1:9"
    mirror = cfg["resolver"]["host"]["10.1.2.3:5000"]["mirrors"][0]
    assert mirror == {"host": "10.1.2.3:5000", "insecure": True}


def test_read_trace_keeps_first_access_order(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"layer": "sha256:a", "path": "/usr/bin/python3"}\n'
        '{"layer": "sha256:b", "files": ["etc/hosts", "usr/bin/python3"]}\n'
        '{"layer": "sha256:a", "pa'
    )
    assert read_trace(trace) == ["usr/bin/python3", "etc/hosts"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('samples = 0\n[[workloads]]\nrecipe = "python"\n')
    assert main(["run", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"lazybench: {bad}: samples: must be between 1 and 1000, got 0"
    assert main(["report", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("crictl") is not None, reason="crictl is installed here")
def test_crio_runtime_is_skipped_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "crio.toml"
    scenario.write_text('runtime = "crio"\n[[workloads]]\nrecipe = "tiny"\n')
    assert main(["run", str(scenario), "--results-dir", str(tmp_path / "runs")]) == 1
    assert "runtime 'crio': crictl is not installed" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run directory of a run that never ran


@pytest.mark.parametrize("samples", ["0", "1001"])
def test_samples_override_keeps_the_scenario_bound(
    samples: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--samples 1001` was taken: the run went, and once interrupted, the `--resume` it
    offered refused its own scenario copy ("samples: must be between 1 and 1000")."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('[[workloads]]\nrecipe = "tiny"\n')
    runs = tmp_path / "runs"
    assert main(["run", str(scenario), "--results-dir", str(runs), "--samples", samples]) == 1
    err = capsys.readouterr().err
    assert f"--samples must be between 1 and 1000, got {samples}" in err
    assert not runs.exists()


def test_two_runs_cannot_share_a_run_directory(tmp_path: Path) -> None:
    import fcntl

    from harness.cli import UserError
    from harness.measure import Runner

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    s = parse_scenario({"samples": 1, "workloads": [{"recipe": "tiny"}]}, "s.toml")
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another `lazybench run` is writing"):
            Runner(s, run_dir, show_progress=False).run()
    assert run_dir.is_dir()  # not this run's to remove


def test_not_ready_reason_names_the_ready_line() -> None:
    from harness.container import RunOutcome, not_ready_reason

    ended = RunOutcome(1.0, 0.1, False, 0, "starting\n", "")
    assert "without printing its ready line 'listening'" in not_ready_reason(
        "listening", None, ended
    )
    assert "lacks the expected 'hello'" in not_ready_reason(None, "hello", ended)
    assert "exited 3" in not_ready_reason(None, None, RunOutcome(1.0, None, False, 3, "", ""))


def test_a_workload_with_only_expect_is_told_its_expected_output_is_missing() -> None:
    """`expect` without `ready`: the run is ready at the expected output (resolve() makes it
    the ready line), and the error names it as what the user wrote, not as a ready line."""
    from harness.container import RunOutcome, not_ready_reason
    from harness.prepare import resolve
    from harness.scenario import Workload

    w = resolve(Workload(name="x", image="oci:/x", expect="hello"))
    ended = RunOutcome(1.0, 0.1, False, 0, "starting\n", "")
    reason = not_ready_reason(w.ready, w.expected, ended)
    assert "without printing the expected 'hello'" in reason, reason
    assert "ready line" not in reason


def test_image_workloads_resolve_to_their_source(tmp_path) -> None:
    from harness.images import ContainerfileSource, ImageSource

    s = parse_scenario(
        {
            "workloads": [
                {"name": "a", "image": "oci:/x", "expect": "hi", "env": {"K": "v"}},
                {"name": "b", "containerfile": "/c/Containerfile", "ready": "up", "timeout": 5},
            ]
        },
        "s.toml",
    )
    a, b = (resolve(w) for w in s.workloads)
    assert a.recipe == ImageSource("oci:/x", None, "a") and a.command == ()
    assert a.ready == a.expected == "hi" and a.env == (("K", "v"),) and a.timeout == 300
    assert b.recipe == ContainerfileSource("/c/Containerfile", None, None, "b")
    assert b.ready == "up" and b.expected is None and b.timeout == 5


def test_settle_flushes_the_disk_and_gives_up_after_its_timeout(monkeypatch) -> None:
    """settle() runs sync(1) and waits for it; a disk slower than the timeout is reported
    (False) rather than waited for without end."""
    import subprocess

    from harness import measure

    assert measure.settle() is True
    calls = []

    def slow(cmd, **kw):  # type: ignore[no-untyped-def]
        calls.append((cmd, kw["timeout"]))
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(measure.subprocess, "run", slow)
    assert measure.settle(timeout=0.5) is False
    assert calls == [(["sync"], 0.5)]


def test_an_image_without_a_command_needs_the_workload_to_give_one() -> None:
    """An image with no Entrypoint/Cmd and a workload without `command`: refused when the
    image is imported, not once per measurement by `podman create`."""
    from harness.cli import UserError
    from harness.prepare import _check_has_command, resolve
    from harness.scenario import Workload

    bare = {"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]}}
    with pytest.raises(UserError, match=r"workload app: its image has no Entrypoint or Cmd"):
        _check_has_command(resolve(Workload(name="app", image="oci:/x")), bare)
    _check_has_command(resolve(Workload(name="app", image="oci:/x", command=("/bin/sh",))), bare)
    with_cmd = {"config": {"Cmd": ["/app/run.sh"]}}
    _check_has_command(resolve(Workload(name="app", image="oci:/x")), with_cmd)


def test_a_lazy_image_listing_one_layer_twice_is_named_before_measuring() -> None:
    """Identical layers (e.g. empty ones) in a lazy mode's image: said when it is pushed,
    since the store cannot serve them and the records will count as fallbacks."""
    from rich.console import Console

    from harness.prepare import ImagePreparer

    s = parse_scenario(SCENARIO, "s.toml")
    console = Console(record=True, width=200)
    prep = ImagePreparer(s, console)
    twice, once = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    for mode in ("legacy", "estargz"):
        prep.layer_digests[("app", mode)] = [twice, once, twice]
        prep._warn_repeated_layers("app", mode)
    text = console.export_text()
    assert f"app:estargz: layer {twice} is listed 2 times" in text
    assert "app:legacy" not in text and once not in text


class _ShellEnv:
    """What :func:`~harness.container.start_until_ready` needs of a PodmanEnv: a command line
    (here a shell script standing in for the container's output) and an environment."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.env = dict(os.environ)

    def argv(self, *args: str) -> list[str]:
        return ["sh", "-c", self.script]

    def podman(self, *args: str, **kwargs: object) -> None:  # `podman stop` on the way out
        return None


def test_the_run_ends_at_the_ready_line_whatever_the_first_output_call_takes() -> None:
    """The first-output call (the registry log's mark) once ran in the reading loop: a ready
    line right after the first line was timed when the call returned (0.15 s and more)."""
    outcome = start_until_ready(
        _ShellEnv("echo first; echo ready; sleep 5"),  # type: ignore[arg-type]
        "cid",
        stdin=None,
        ready="ready",
        timeout=10,
        on_first_output=lambda: time.sleep(1.0),
    )
    assert outcome.ready and outcome.first_output_s is not None
    assert outcome.seconds - outcome.first_output_s < 0.3


def test_the_ready_text_on_stderr_is_not_ready() -> None:
    """``ready`` is a line on stdout: an error message on stderr that happens to contain it
    (then a failed exit) once recorded the run as ready."""
    outcome = start_until_ready(
        _ShellEnv("echo 'fatal: server is not ready-now, giving up' >&2; exit 1"),  # type: ignore[arg-type]
        "cid",
        stdin=None,
        ready="ready-now",
        timeout=10,
    )
    assert not outcome.ready and outcome.exit_code == 1
    assert "ready-now" in outcome.stderr and outcome.stdout == ""
    # and the failure says where the text appeared
    from harness.container import not_ready_reason

    assert not_ready_reason("ready-now", None, outcome) == (
        "the workload exited (1) without printing its ready line 'ready-now'; "
        "'ready-now' appeared on stderr; ready must be printed on stdout"
    )


def test_an_expected_output_of_several_lines_is_ready_when_stdout_holds_it() -> None:
    """An image workload's ``expect`` stands in for its ready line; one of several lines was
    looked for in each line alone, so a run printing exactly it failed ("the workload
    exited 0: 'first\\nsecond\\n'")."""
    expected = "first\nsecond"

    def run(script: str) -> RunOutcome:
        return start_until_ready(
            _ShellEnv(script),  # type: ignore[arg-type]
            "cid",
            stdin=None,
            ready=expected,
            timeout=10,
            expected=expected,
        )

    outcome = run("echo zeroth; echo first; echo second; sleep 5")
    assert outcome.ready and outcome.seconds < 3
    assert outcome.stdout == "zeroth\nfirst\nsecond\n"
    # the lines must follow each other on stdout: not split by a line between them
    split = run("echo first; echo other; echo second")
    assert not split.ready and split.exit_code == 0


@pytest.mark.parametrize("run_id", [".", "..", "a/b", "../x", "/tmp/x", ""])
def test_a_run_id_must_be_one_path_component(
    run_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('[[workloads]]\nrecipe = "tiny"\n')
    runs = tmp_path / "runs"
    assert main(["run", str(scenario), "--results-dir", str(runs), "--run-id", run_id]) == 1
    assert "must be one path component" in capsys.readouterr().err
    assert not runs.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["s.toml"], "SCENARIO (s.toml)"),
        (["--samples", "5"], "--samples"),
        (["--run-id", "x"], "--run-id"),
        (["--results-dir", "elsewhere"], "--results-dir"),
    ],
)
def test_resume_refuses_what_it_would_ignore(
    extra: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--resume", str(tmp_path), *extra]) == 1
    assert f"not with {named}:" in capsys.readouterr().err


def test_resume_with_another_shard_says_to_leave_shard_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run --resume DIR --shard 2/2` of a shard 1/2 directory was told to "resume it with
    `lazybench run --resume RUN_DIR`", the command it had just given."""
    from harness.records import ENVIRONMENT, SCENARIO_COPY
    from tests.harness.test_results import make_run

    run = make_run(tmp_path / "run")
    env = json.loads((run / ENVIRONMENT).read_text())
    (run / SCENARIO_COPY).write_text(json.dumps(env["scenario"]))
    (run / ENVIRONMENT).write_text(json.dumps(env | {"shard": "1/2"}))
    assert main(["run", "--resume", str(run), "--shard", "2/2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "holds shard 1/2, not 2/2" in err and "without --shard (it keeps its own)" in err


def _timeout_error(script: str, ready: str | None) -> str:
    """The error of a run of ``script`` that times out after 1 s awaiting ``ready``."""
    from harness.container import MeasurementError

    with pytest.raises(MeasurementError) as exc:
        start_until_ready(
            _ShellEnv(f"{script}; sleep 5"),  # type: ignore[arg-type]
            "cid",
            stdin=None,
            ready=ready,
            timeout=1,
        )
    return str(exc.value)


def test_a_timeout_shows_what_was_printed_without_a_newline() -> None:
    """A ready text printed with no newline after it is no line yet; the timeout once said
    "output: ''", hiding it."""
    error = _timeout_error("echo first; printf 'server ready-now'", "ready-now")
    assert "output: 'first\\nserver ready-now' (its last line has no newline yet)" in error


def test_lines_read_as_text_mode_gave_them() -> None:
    """Universal newlines, undecodable bytes replaced, the stdin fed, and a last line
    without a newline still a line once the stream ends."""
    outcome = start_until_ready(
        _ShellEnv(r"cat; printf 'a\r\nb\rc\n\377\n'; printf 'done'"),  # type: ignore[arg-type]
        "cid",
        stdin="from stdin\n",
        ready="done",
        timeout=10,
    )
    assert outcome.ready
    assert outcome.stdout == "from stdin\na\nb\nc\n\ufffd\ndone"


def test_the_command_follows_the_entrypoint_as_in_podman_run() -> None:
    """``command`` is the image's CMD (after its ENTRYPOINT); ``entrypoint`` is podman's
    ``--entrypoint`` as JSON, ``""`` when cleared, absent when the image's own is kept."""
    from harness.container import create_args

    assert create_args("img", ("-v",), None) == ["create", "--network=none", "img", "-v"]
    args = create_args("img", ("echo hi",), "in", (("A", "1"),), ("/bin/sh", "-c"))
    assert args == [
        "create",
        "--network=none",
        "--interactive",
        "--env=A=1",
        '--entrypoint=["/bin/sh", "-c"]',
        "img",
        "echo hi",
    ]
    assert create_args("img", ("/bin/app",), None, (), ())[2] == "--entrypoint="


def test_an_entrypoint_alone_is_something_to_run() -> None:
    from harness.prepare import _check_has_command, resolve
    from harness.scenario import Workload

    bare = {"config": {}}
    w = resolve(Workload(name="app", image="oci:/x", entrypoint=("/bin/app",)))
    assert w.entrypoint == ("/bin/app",)
    _check_has_command(w, bare)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("option", ["--results-dir", "--cache-dir"])
@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("afile", "Not a directory"),
        ("afile/sub", "Not a directory"),
        ("/proc/x", "No such file or directory"),
    ],
)
def test_an_unwritable_results_or_cache_dir_is_refused_before_anything_is_made(
    option: str, where: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once a raw traceback after "run directory: …" (and an empty results directory left
    behind by a bad --cache-dir)."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('[[workloads]]\nrecipe = "tiny"\n')
    (tmp_path / "afile").write_text("")
    bad = where if where.startswith("/") else str(tmp_path / where)
    other = "--cache-dir" if option == "--results-dir" else "--results-dir"
    before = _tree(tmp_path)
    rc = main(["run", str(scenario), option, bad, other, str(tmp_path / "new" / "dir")])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"lazybench: {option} {bad}: not a writable directory ({reason})" in err, err
    assert _tree(tmp_path) == before  # nothing made, the other directory neither


def test_a_read_only_directory_is_refused_and_what_the_check_made_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only mount (root writes anywhere else): the probe file cannot be made."""
    import errno
    import tempfile

    from harness.cli import UserError, check_writable_dir

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match=r"^x (.*)/a/b: not a writable directory \(Read-only file"):
        check_writable_dir(tmp_path / "a" / "b", "x")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    check_writable_dir(tmp_path / "a" / "b", "x")  # writable: passes, and leaves nothing
    assert list(tmp_path.iterdir()) == []


def test_other_commands_check_the_cache_dir_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("")
    bad = str(tmp_path / "afile")
    for argv in (
        ["images", "prune", "--cache-dir", bad],
        ["images", "build", "tiny", "--cache-dir", bad],
        ["runtimes", "build", "sid", "--cache-dir", bad],
        ["convert", "--optimize", "oci:x", "oci:y", "--cache-dir", bad],
    ):
        assert main(argv) == 1, argv
        assert f"--cache-dir {bad}: not a writable directory" in capsys.readouterr().err, argv


def test_root_is_required_up_front_with_a_message_saying_so() -> None:
    """As another user, skopeo once failed later with "unshare failed", blaming the image."""
    from harness.cli import RUN_NEEDS, UserError, require_root

    require_root("run", RUN_NEEDS, euid=0)
    with pytest.raises(UserError) as exc:
        require_root("run", RUN_NEEDS, euid=1000)
    assert str(exc.value) == (
        "lazybench run needs root (rootful podman, network namespaces, FUSE): run it as root"
    )


def test_cleanup_of_a_dir_that_is_not_there_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped `cleanup --dir` answered "nothing to clean up"."""
    assert main(["cleanup", "--dir", str(tmp_path / "typo")]) == 1
    assert f"--dir {tmp_path / 'typo'}: no such directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["run", "{scenario}"], "run"),
        (["run", "--resume", "{run_dir}"], "run"),
        (["cleanup"], "cleanup"),
        (["net", "cleanup"], "net cleanup"),
        (["net", "measure", "loopback"], "net measure"),
        (["runtimes", "build", "sid"], "runtimes build"),
        (["convert", "--optimize", "oci:x", "oci:y"], "convert --optimize"),
    ],
)
def test_commands_that_need_root_say_so_as_another_user(
    argv: list[str],
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('[[workloads]]\nrecipe = "tiny"\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    copy = parse_scenario({"workloads": [{"recipe": "tiny"}]}, "s").to_dict()
    (run_dir / "scenario.json").write_text(json.dumps(copy))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    argv = [a.format(scenario=scenario, run_dir=run_dir) for a in argv]
    extra = ["--results-dir", str(tmp_path / "runs")] if argv[:2] == ["run", str(scenario)] else []
    assert main(argv + extra) == 1
    assert f"lazybench {command} needs root (" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_timeout_names_ready_text_seen_on_stderr_and_shows_stderr() -> None:
    """Many servers log to stderr; the ready line is read on stdout only. The timeout once
    showed only stdout ("output: ''")."""
    error = _timeout_error("echo starting; echo 'listening on :80' >&2", "listening on")
    assert error == (
        "run: no ready line 'listening on' within 1s; 'listening on' appeared on stderr; "
        "ready must be printed on stdout; output: 'starting\\n'; stderr: 'listening on :80'"
    )


def test_a_run_that_never_exits_without_a_ready_line_says_to_set_one() -> None:
    from harness.container import is_no_exit

    error = _timeout_error("echo serving >&2", None)
    assert error == (
        "run: the workload did not exit within 1s; for a server, set ready = a line it prints "
        "when it is up; output: ''; stderr: 'serving'"
    )
    assert is_no_exit(error) and not is_no_exit("run: no ready line 'x' within 1s")


def test_a_workload_that_never_exits_twice_in_a_row_is_given_up() -> None:
    """A server without `ready` waits out its timeout in every measurement; after two in a
    row (modes or samples) its other measurements are recorded as failed, not run."""
    from harness.measure import Runner
    from harness.prepare import ResolvedWorkload
    from harness.records import Record

    w = ResolvedWorkload("app", None, (), None, None, None, 5.0)
    no_exit = "run: the workload did not exit within 5s; for a server, set ready = …"

    def rec(sample: int, mode: str, error: str | None) -> Record:
        return Record(sample, "app", mode, status="error" if error else "ok", error=error)

    streaks: dict = {}
    assert Runner._give_up(streaks, rec(0, "legacy", no_exit), w, False) is None
    assert Runner._give_up(streaks, rec(0, "estargz", "pull: boom"), w, False) is None  # reset
    assert Runner._give_up(streaks, rec(1, "legacy", no_exit), w, False) is None
    reason = Runner._give_up(streaks, rec(1, "estargz", no_exit), w, False)
    assert reason == (
        "not measured: the workload did not exit within 5s twice in a row (sample 2 legacy "
        "and sample 2 estargz); for a server, set ready = a line it prints when it is up"
    )
    # With a full-pull mode in the scenario, a lazy mode's timeout may be a hung store's
    # fault: it neither counts nor breaks the streak; only full pulls convict the workload.
    streaks = {}
    assert Runner._give_up(streaks, rec(0, "estargz", no_exit), w, True) is None
    assert Runner._give_up(streaks, rec(0, "estargz-noopt", no_exit), w, True) is None
    assert Runner._give_up(streaks, rec(0, "legacy", no_exit), w, True) is None
    assert Runner._give_up(streaks, rec(1, "zstd-chunked-lazy", no_exit), w, True) is None
    assert "sample 1 legacy and sample 2 legacy" in Runner._give_up(
        streaks, rec(1, "legacy", no_exit), w, True
    )


# What podman 4.3 says when a Containerfile's FROM names an image of the host's storage
# that lazybench's private build storage does not have.
_LOCAL_FROM_ERROR = (
    "`podman build --file /x/Containerfile --tag localhost/lazybench-build:latest /x` exited "
    '125: Trying to pull localhost/app-base:latest...\ntime="…" level=warning msg="Failed, '
    "retrying in 2s ... (1/3). Error: initializing source docker://localhost/app-base:latest: "
    'pinging container registry localhost: Get \\"https://localhost/v2/\\": dial tcp '
    '127.0.0.1:443: connect: connection refused"\nError: creating build container: '
    "initializing source docker://localhost/app-base:latest: pinging container registry "
    'localhost: Get "https://localhost/v2/": dial tcp 127.0.0.1:443: connect: connection refused'
)


def test_a_local_base_image_the_build_cannot_see_is_named_with_what_to_do() -> None:
    from harness.images.source import local_base_problem

    problem = local_base_problem(_LOCAL_FROM_ERROR)
    assert problem is not None
    assert problem.startswith(
        "FROM localhost/app-base:latest is not in lazybench's build storage: the build runs "
        "in a private storage and cannot see your local images"
    )
    assert "podman save --format oci-archive -o /path/to/base.tar localhost/app-base:latest" in (
        problem
    )
    assert local_base_problem("Error: initializing source docker://docker.io/x:1: nope") is None
    assert local_base_problem("Error: COPY failed: no such file") is None


def test_printed_text_keeps_colons_and_brackets() -> None:
    """rich turned ``:x:`` into an emoji (``oci:x:latest`` → ``oci❌latest``), in workload
    output quoted in an error too, and read ``[bold]`` in user text as markup."""
    from rich.progress import Progress

    from harness.cli import make_console, plain
    from harness.measure import Runner
    from harness.records import Record

    console = make_console(record=True, width=300)
    plain(console)("image oci:x:latest from /srv/[bold]app[/bold]")
    s = parse_scenario(SCENARIO, "s.toml")
    runner = Runner(s, Path("/nonexistent"), console=console)
    failed = Record(0, "app", "legacy", status="error", error="run: 'config :x: [bold]bad[/]'")
    with Progress(console=console, disable=True) as progress:
        runner._say(progress, failed)
    text = console.export_text()
    assert "image oci:x:latest from /srv/[bold]app[/bold]" in text
    assert "sample 1 app/legacy failed: run: 'config :x: [bold]bad[/]'" in text
    assert Runner(s, Path("/nonexistent")).console._emoji is False


def test_every_console_the_harness_makes_has_no_emoji() -> None:
    """Consoles come from harness.cli.make_console (emoji=False) only."""
    import re

    import harness

    root = Path(harness.__file__).parent
    made = [
        f"{p.relative_to(root)}:{n}"
        for p in root.rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\bConsole\(", line) and p.name != "cli.py"
    ]
    assert made == []


def test_an_interrupt_before_any_measurement_says_nothing_is_kept(tmp_path: Path) -> None:
    """A SIGINT while images were prepared once said "finished measurements are kept"."""
    from harness.records import Record, append_record
    from harness.run_cmd import interrupted_message

    text = interrupted_message("SIGINT", tmp_path)
    assert text.startswith("lazybench: interrupted (SIGINT) before any measurement finished;")
    assert "nothing measured is kept" in text and f"--resume {tmp_path}" in text
    append_record(tmp_path, Record(0, "app", "legacy", total_s=1.0))
    assert interrupted_message("SIGTERM", tmp_path) == (
        f"lazybench: interrupted (SIGTERM); 1 finished measurements are kept in {tmp_path}; "
        f"resume with `lazybench run --resume {tmp_path}`"
    )


HANGUP_IN_A_RUN = """
import os, signal, time
from harness.measure import Interrupted, interruptible
try:
    with interruptible():
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)
except Interrupted as exc:
    print("interrupted", exc)
"""


def _python_from_a_terminal(script: str) -> subprocess.CompletedProcess[str]:
    """``python -c script`` as a terminal starts it (:func:`as_from_a_terminal`)."""
    import sys

    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=as_from_a_terminal,
    )


def as_from_a_terminal() -> None:
    """In a child before exec: SIGHUP at its default action, as in a process a terminal
    started. A test suite run under ``nohup`` (or a CI runner started so) passes SIGHUP on
    ignored, and lazybench then rightly leaves it ignored (``stop_signals``)."""
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_a_hangup_interrupts_a_run_as_sigterm_does() -> None:
    """SIGHUP (the terminal or ssh session went away) killed lazybench on the spot, cleanup
    skipped; it raises :class:`~harness.measure.Interrupted` now, naming it. (In a child: the
    old default killed the process it came to.)"""
    proc = _python_from_a_terminal(HANGUP_IN_A_RUN)
    assert proc.returncode == 0 and proc.stdout.strip() == "interrupted SIGHUP", proc


def test_a_hangup_ignored_at_start_stays_ignored() -> None:
    """``nohup lazybench run …`` must outlive the session: a SIGHUP ignored when lazybench
    started is not taken over by its handlers."""
    import signal

    from harness.cli import terminated_as_interrupt
    from harness.measure import interruptible

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with terminated_as_interrupt(), interruptible():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGHUP, old)


HANGUP_IN_A_COMMAND = """
import os, signal, sys, time
import harness.cleanup_cmd
from harness.cli import main

def hung_up(args):
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(5)
    return 0

harness.cleanup_cmd.cmd_cleanup = hung_up
sys.exit(main(["cleanup"]))
"""


def test_main_names_a_hangup_outside_a_run() -> None:
    """Outside a run's measurements (a report, an image build) SIGHUP is raised as SIGTERM
    is, so their cleanup runs and the exit says why."""
    proc = _python_from_a_terminal(HANGUP_IN_A_COMMAND)
    assert proc.returncode == 130, proc
    assert "lazybench: interrupted (SIGHUP)" in proc.stderr


@pytest.mark.parametrize(
    ("script", "ready"),
    [
        ("echo listening; echo other; sleep 5", "listening"),  # ready, expected output lacking
        ("echo other", None),  # exited 0 without it
    ],
)
def test_a_run_without_its_expected_output_is_not_ready(script: str, ready: str | None) -> None:
    """The expected output is checked where the run is judged, so the trace run that
    prepares ``estargz`` checks it too (it once optimized such an image, and only its
    measurements failed)."""
    from harness.container import not_ready_reason

    outcome = start_until_ready(
        _ShellEnv(script),  # type: ignore[arg-type]
        "cid",
        stdin=None,
        ready=ready,
        timeout=10,
        expected="hello",
    )
    assert not outcome.ready
    assert not_ready_reason(ready, "hello", outcome).startswith(
        "the output lacks the expected 'hello'"
    )


def test_a_shard_the_plan_gives_nothing_is_an_empty_run_merge_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """More shards than measurements: the empty shard once failed ("no records.jsonl here")
    and so did every merge of the shards."""
    from harness.records import read_environment, read_records

    scenario = tmp_path / "s.toml"
    scenario.write_text('samples = 1\nmodes = ["legacy"]\n[[workloads]]\nrecipe = "tiny"\n')
    runs = tmp_path / "runs"
    argv = ["run", str(scenario), "--results-dir", str(runs), "--no-progress", "--shard", "2/2"]
    assert main(argv) == 0
    (run_dir,) = runs.iterdir()
    assert read_environment(run_dir)["shard"] == "2/2" and read_records(run_dir) == []
    assert "shard 2/2: no report" in capsys.readouterr().out


def test_preparing_an_image_says_whether_it_was_built_or_reused(tmp_path: Path) -> None:
    """The first preparation shows the build's own steps; the second says the cache had
    it (the line once read "building or importing (cached)" either way)."""
    from rich.console import Console

    from harness.images import tiny_recipe
    from harness.prepare import ImagePreparer, ResolvedWorkload

    s = parse_scenario(SCENARIO, "s.toml")
    w = ResolvedWorkload("app", tiny_recipe(big_file_size=4096), ("true",), None, None, None, 5)
    texts = []
    for _ in range(2):
        console = Console(record=True, width=200)
        ImagePreparer(s, console, cache_dir=tmp_path)._prepare_image(w)
        texts.append(console.export_text())
    assert texts[0].startswith("image app: preparing\n") and "reused" not in texts[0]
    assert len(texts[0].splitlines()) > 1
    reused = texts[1].splitlines()
    assert reused[0] == "image app: preparing" and len(reused) == 2
    assert reused[1].startswith(f"  reused from the cache ({tmp_path / 'images'}/")


CONSOLE_TO_A_CLOSED_PIPE = """
import sys
from harness.cli import make_console

console = make_console()
try:
    for _ in range(10000):
        console.print("sample 1 tiny/legacy: pull 0.30s create 0.05s run 0.09s")
except KeyboardInterrupt as exc:  # handled as an interrupt: what was kept is said, and where
    print("interrupted:", exc, file=sys.stderr)
    sys.exit(3)
"""


def test_a_console_print_to_a_closed_pipe_is_an_interrupt() -> None:
    """`lazybench run … | head`: rich answers a broken pipe with ``SystemExit(1)``, which ended
    the run part way with exit 1 and not a word on stderr of the measurements kept or of
    resuming. It is raised as an interrupt now (harness.cli.StdoutClosed)."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", CONSOLE_TO_A_CLOSED_PIPE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader went away
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert err.strip() == "interrupted: stdout closed"
