"""`lazybench` command line: one sub-command module per area, each with `register(subparsers)`.

A sub-command module sets ``func`` on its parser; ``func(args) -> int`` is the exit status.
Errors meant for the user are raised as :class:`UserError` and printed as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import store

if TYPE_CHECKING:
    from rich.console import Console

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "harness.cleanup_cmd",
    "harness.convert_cmd",
    "harness.estargz_cmd",
    "harness.images_cmd",
    "harness.net_cmd",
    "harness.run_cmd",
    "harness.runtimes_cmd",
    "harness.stores_cmd",
]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status :attr:`status`
    (1; ``compare`` sets 2, so that a CI gate tells a regression from runs it could not
    compare)."""

    status = 1


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, with :class:`UserError`, a directory ``path`` that cannot be created or written
    to (an existing file, a path under a file, a read-only mount, ``/proc/x``), before a
    command makes or writes anything in it: ``lazybench: WHAT PATH: not a writable directory
    (REASON)``. Creates what is missing of it and a temporary file in it to find out, and
    removes both again: afterwards the file system is as it was."""
    made: list[Path] = []  # the directories created here, outermost first
    missing = []
    parent = path
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        for directory in reversed(missing):
            directory.mkdir()
            made.append(directory)
        fd, probe = tempfile.mkstemp(prefix=".lazybench-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"{what} {path}: not a writable directory ({reason})") from None
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()


class StdoutClosed(KeyboardInterrupt):
    """The reader of lazybench's output went away (``lazybench run … | head``): raised where a
    console print met the broken pipe, and handled as an interrupt is (the run's cleanup runs,
    and stderr says what was kept and how to resume)."""


def make_console(**options: Any) -> Console:
    """A rich Console as the harness uses them: ``emoji=False`` always, since rich would
    otherwise turn ``:x:`` in printed text (an image reference ``oci:x:latest``, a workload's
    output) into an emoji. Markup stays on unless ``markup=False`` is given: text from the
    user printed in markup must be escaped (``rich.markup.escape``), or printed with
    :func:`plain`. A print to a closed pipe raises :class:`StdoutClosed`: rich's own answer,
    ``SystemExit(1)``, ended a run part way with no word on stderr (exit 1, nothing said of
    the measurements kept or of resuming)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True  # nothing more is printed, as rich does
            with contextlib.suppress(OSError):  # and the interpreter's last flush is quiet
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise StdoutClosed("stdout closed")

    return _Console(emoji=False, **options)


def plain(console: Console) -> Callable[[str], None]:
    """A progress callback printing its messages on ``console`` as they are (paths, image
    references, tool output): no markup, no emoji."""
    return lambda message: console.print(message, markup=False, emoji=False, highlight=False)


def require_root(command: str, needs: str, euid: int | None = None) -> None:
    """Refuse, with :class:`UserError`, to run ``lazybench COMMAND`` as anyone but root
    (``euid``: the effective user id, default the process's): what it ``needs`` would fail
    later, with an error that blames something else (skopeo's "unshare failed" blamed the
    image)."""
    if (os.geteuid() if euid is None else euid) != 0:
        raise UserError(f"lazybench {command} needs root ({needs}): run it as root")


RUN_NEEDS = "rootful podman, network namespaces, FUSE"


def default_cache_dir() -> Path:
    """``$LAZYBENCH_CACHE`` or ``~/.cache/lazybench``: the cache of images, traces, stores and
    runtime nodes (one for all of them)."""
    env = os.environ.get("LAZYBENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lazybench"


def check_cache_dir(cache_dir: Path | None) -> None:
    """``--cache-dir`` (or the default cache, :func:`default_cache_dir`) must be a directory
    lazybench can create and write to (:func:`check_writable_dir`)."""
    if cache_dir is not None:
        check_writable_dir(cache_dir, "--cache-dir")
    else:
        env = os.environ.get("LAZYBENCH_CACHE")
        what = "cache directory ($LAZYBENCH_CACHE)" if env else "cache directory"
        check_writable_dir(default_cache_dir(), what)


# Where --cache-dir defaults to (default_cache_dir), as every command's help says it.
CACHE_DIR_DEFAULT = "$LAZYBENCH_CACHE or ~/.cache/lazybench"


def existing_dir(text: str) -> Path:
    """An argparse ``type`` for a ``--cache-dir`` that is only read (``ls``, ``prune``): an
    existing directory, so a mistyped path is an error, not an empty listing."""
    path = Path(text)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise argparse.ArgumentTypeError(f"{what}: {text}")
    return path


LAYER_FORMATS = ("estargz", "zstd-chunked")


def layer_format(text: str) -> str:
    """An argparse ``type`` for ``--format``: ``estargz`` or ``zstd-chunked``, the latter also
    spelled as its media type names it, ``zstd:chunked`` (podman's --compression-format)."""
    return "zstd-chunked" if text == "zstd:chunked" else text


def positive_int(text: str) -> int:
    """An argparse ``type``: a positive integer, else a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def zstd_generation(fmt: str, given: str | None) -> str:
    """The zstd:chunked generation a convert command writes: ``--zstd-generation`` as
    ``given``, else the writer's default (podman 4.3's); :class:`UserError` when it is given
    with a format it does not apply to."""
    from store.estargz.zstdchunked import DEFAULT_GENERATION

    if given is not None and fmt != "zstd-chunked":
        raise UserError("--zstd-generation goes with --format zstd-chunked")
    return given or DEFAULT_GENERATION


def seconds_between(low: float, high: float):  # type: ignore[no-untyped-def]
    """An argparse ``type``: a number of seconds in ``[low, high]``, else a usage error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not low <= value <= high:  # NaN too
            raise argparse.ArgumentTypeError(f"must be {low:g} to {high:g} s, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazybench", description="Measure lazy pulling of container images."
    )
    parser.add_argument("--version", action="version", version=f"lazybench {store.version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C's KeyboardInterrupt is
    (:func:`terminated_as_interrupt`); its text names the signal."""


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop lazybench with its cleanup: SIGINT, SIGTERM and SIGHUP (the
    terminal or the ssh session that ran it went away), but not a SIGHUP this process was
    started ignoring (``nohup lazybench run …``: it must outlive the session). By default
    SIGHUP ended the process where it stood, like SIGKILL: no word said, and its store's
    and podman's mounts, the container, the link's namespace and the working directories
    left for the next run's sweep."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return tuple(signals)


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (``kill``, ``timeout``, ``systemctl stop``) and SIGHUP (a closed
    terminal; :func:`stop_signals`) raise :class:`Terminated`, so the cleanup a Ctrl-C runs
    (``finally`` blocks, context managers) runs for them too. By default they ended the
    process where it stood: a report's staging directory stayed in the run directory, an
    image build's or a runtime node's half-made directory in the cache. (``lazybench run``
    measures under its own handler, :func:`harness.measure.interruptible`.) Outside the main
    thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signal.Signals(signum).name)

    caught = [s for s in stop_signals() if s != signal.SIGINT]
    old = {s: signal.signal(s, handler) for s in caught}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    from harness.run_cmd import gate_before_runs

    parser = build_parser()
    args = parser.parse_args(gate_before_runs(sys.argv[1:] if argv is None else argv))
    try:
        with terminated_as_interrupt():
            return int(args.func(args) or 0)
    except UserError as exc:
        print(f"lazybench: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt as exc:
        signame = f" ({exc})" if isinstance(exc, Terminated) else ""
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone (EIO)
            print(f"lazybench: interrupted{signame}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`lazybench estargz ls … | head`): stop quietly, as
        # a process killed by SIGPIPE would (the Python docs' recipe: stdout to /dev/null, so
        # the interpreter's final flush does not fail again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
