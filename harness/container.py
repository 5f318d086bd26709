"""Running a container under an isolated podman until it is ready (shared by the measurement
and by the trace run that prepares ``estargz`` images)."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import locale
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.podman import PodmanEnv, PodmanError


class MeasurementError(RuntimeError):
    """One step of a measurement failed (recorded as an error, the run goes on)."""


def create_args(
    ref: str,
    command: Sequence[str],
    stdin: str | None,
    environment: Sequence[tuple[str, str]] = (),
    entrypoint: Sequence[str] | None = None,
) -> list[str]:
    """The arguments of ``podman create``: ``ref`` with no network, interactive when ``stdin``
    is given, the ``environment`` variables set, ``entrypoint`` (None: the image's own;
    empty: cleared) as ``--entrypoint``, and ``command`` as the image's CMD, the arguments
    after the entrypoint, as ``podman run IMAGE COMMAND`` takes them."""
    opts = ["--network=none"]
    if stdin is not None:
        opts.append("--interactive")
    opts += [f"--env={k}={v}" for k, v in environment]
    if entrypoint is not None:
        opts.append(f"--entrypoint={json.dumps(list(entrypoint)) if entrypoint else ''}")
    return ["create", *opts, ref, *command]


def create_container(
    env: PodmanEnv,
    ref: str,
    command: tuple[str, ...],
    stdin: str | None,
    timeout: float,
    environment: Sequence[tuple[str, str]] = (),
    entrypoint: Sequence[str] | None = None,
) -> str:
    """``podman create`` (:func:`create_args`); the container id."""
    args = create_args(ref, command, stdin, environment, entrypoint)
    return env.podman(*args, timeout=timeout).stdout.strip()


@dataclass
class RunOutcome:
    seconds: float
    first_output_s: float | None
    ready: bool
    exit_code: int | None
    stdout: str
    stderr: str


def start_until_ready(
    env: PodmanEnv,
    container: str,
    *,
    stdin: str | None,
    ready: str | None,
    timeout: float,
    on_first_output: Callable[[], None] = lambda: None,
    expected: str | None = None,
) -> RunOutcome:
    """``podman start --attach`` the container; return when ``ready`` shows on its stdout (then
    stop it; the same text on stderr, e.g. in an error message, is not ready, and a timeout
    says it appeared there) or, without a ready line, when it exits. A ``ready`` text of
    several lines (an image workload's multi-line ``expect`` stands in for it) is ready once
    stdout holds it, at the line that completes it. Times out after
    ``timeout`` seconds (:func:`timeout_message`).
    ``expected``: the workload's expected output: the run is ready only when its stdout holds
    it (by the ready line, or by the exit: every caller, the trace run's too, checks it so).
    ``on_first_output`` is called at the first stdout line; each line is timed when it is
    read, so the call's own time is never counted in the run."""
    args = ["start", "--attach"]
    if stdin is not None:
        args.append("--interactive")
    argv = env.argv(*args, container)  # inside the env's runtime node, if any
    # Each line with the time it was read: a slow consumer (``on_first_output``) never moves
    # a line's time, the ready line's included.
    lines: queue.Queue[tuple[str, str | None, float]] = queue.Queue()
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    # What a stream printed after its last newline, so far (shown when the run times out:
    # a ready text printed without a newline is no line yet).
    partial = {"stdout": "", "stderr": ""}
    encoding = locale.getpreferredencoding(False)  # what text=True would decode with
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env=env.env,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def pump(name: str, stream: Any) -> None:
        # Lines as text=True would give them (universal newlines, undecodable bytes
        # replaced), the last one even without a newline at the end of the stream.
        decode = io.IncrementalNewlineDecoder(
            codecs.getincrementaldecoder(encoding)(errors="replace"), translate=True
        ).decode
        while True:
            chunk = stream.read1(65536)
            now = time.monotonic()
            *whole, rest = (partial[name] + decode(chunk, final=not chunk)).split("\n")
            for line in whole:
                lines.put((name, line + "\n", now))
            partial[name] = rest
            if not chunk:
                break
        if partial[name]:
            lines.put((name, partial[name], now))
        lines.put((name, None, time.monotonic()))

    def feed() -> None:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.write((stdin or "").encode(encoding))
            proc.stdin.close()

    threads = [
        threading.Thread(target=pump, args=("stdout", proc.stdout), daemon=True),
        threading.Thread(target=pump, args=("stderr", proc.stderr), daemon=True),
    ]
    if stdin is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    for t in threads:
        t.start()
    first: float | None = None
    seen_ready = False
    open_streams = 2
    # The end of stdout before the line just read, as long as a ready text that ends in that
    # line can reach back (nothing for a ready text of one line).
    before = ""
    try:
        while open_streams:
            remaining = timeout - (time.monotonic() - start)
            if remaining <= 0:
                printed = {k: "".join(out[k]) + partial[k] for k in out}
                raise MeasurementError(
                    timeout_message(ready, expected, timeout, printed, bool(partial["stdout"]))
                )
            try:
                name, line, now = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                continue
            out[name].append(line)
            if first is None and name == "stdout":
                first = now - start
                on_first_output()
            if ready and name == "stdout":  # on stdout, as documented
                if ready in before + line:
                    seen_ready = True
                    elapsed = now - start
                    break
                if "\n" in ready and len(ready) > 1:
                    before = (before + line)[-(len(ready) - 1) :]
        if seen_ready:
            exit_code = None
        else:
            elapsed = time.monotonic() - start
            try:
                exit_code = proc.wait(timeout=max(1.0, timeout - elapsed))
            except subprocess.TimeoutExpired:
                raise MeasurementError(f"run: podman did not exit within {timeout:g}s") from None
            elapsed = time.monotonic() - start
    finally:
        # Never raise from here: that would replace the exception being handled.
        if proc.poll() is None:
            with contextlib.suppress(PodmanError):
                env.podman("stop", "--time", "0", container, timeout=30, check=False)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
    stdout = "".join(out["stdout"])
    ok = (seen_ready if ready else exit_code == 0) and (expected is None or expected in stdout)
    return RunOutcome(elapsed, first, ok, exit_code, stdout, "".join(out["stderr"]))


# What a run of a workload without a ready line that never exits fails with (a server
# without ``ready``): the runner stops measuring such a workload after two in a row.
NO_EXIT = "the workload did not exit within"


def is_no_exit(error: str | None) -> bool:
    """Whether a record's error is a run that never exited (:data:`NO_EXIT`)."""
    return bool(error) and error.startswith(f"run: {NO_EXIT} ")  # type: ignore[union-attr]


def timeout_message(
    ready: str | None,
    expected: str | None,
    timeout: float,
    printed: dict[str, str],
    unfinished_line: bool = False,
) -> str:
    """Why a run timed out, in the workload's terms, with the tail of what it printed on
    stdout and on stderr (many servers log to stderr). ``ready`` is read on stdout only (so
    an error message on stderr is never "ready"): ready text that appeared on stderr is named.
    A run without a ready line waited for the container to exit: a server never does, so the
    message says to set one."""
    stdout, stderr = printed.get("stdout", ""), printed.get("stderr", "")
    if not ready:
        head = (
            f"run: {NO_EXIT} {timeout:g}s; for a server, set ready = a line it prints when it is up"
        )
    else:
        head = f"run: no {_awaited(ready, expected)} within {timeout:g}s" + _on_stderr(
            ready, expected, stdout, stderr
        )
    return (
        f"{head}; output: {stdout[-300:]!r}"
        + (" (its last line has no newline yet)" if unfinished_line else "")
        + f"; stderr: {stderr.strip()[-300:]!r}"
    )


def _awaited(ready: str, expected: str | None) -> str:
    """What the run waits for, in the workload's terms: a workload without a ready line of its
    own is ready at its expected output."""
    return f"expected output {ready!r}" if ready == expected else f"ready line {ready!r}"


def _on_stderr(ready: str, expected: str | None, stdout: str, stderr: str) -> str:
    """What to add when the text awaited on stdout showed on stderr instead ("" otherwise)."""
    if ready not in stderr or ready in stdout:
        return ""
    what = "the expected output" if ready == expected else "ready"
    return f"; {ready!r} appeared on stderr; {what} must be printed on stdout"


def not_ready_reason(ready: str | None, expected: str | None, outcome: RunOutcome) -> str:
    """Why a run that ended is not a success, in the workload's terms."""
    if ready and ready not in outcome.stdout:
        what = f"the expected {ready!r}" if ready == expected else f"its ready line {ready!r}"
        return f"the workload exited ({outcome.exit_code}) without printing {what}" + _on_stderr(
            ready, expected, outcome.stdout, outcome.stderr
        )
    if expected is not None and expected not in outcome.stdout:
        return f"the output lacks the expected {expected!r} (exit {outcome.exit_code})"
    return f"the workload exited {outcome.exit_code}"
