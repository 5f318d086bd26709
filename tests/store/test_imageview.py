"""Paths through an image's stacked layers (store.imageview.MergedView), as overlayfs shows them."""

from __future__ import annotations

import json
import time

import pytest

from store.estargz import LayerIndex
from store.imageview import (
    DEFAULT_PATH,
    MAX_PATH_DIRS,
    MAX_SYMLINKS,
    PATH_MAX,
    DefaultProcess,
    MergedView,
    path_ok,
)
from store.tree import LayerTree


def layer(*specs: str) -> LayerTree:
    """``name/`` a directory, ``name -> target`` a symbolic link, else a regular file."""
    entries = []
    for s in specs:
        if " -> " in s:
            name, target = s.split(" -> ")
            entries.append({"name": name, "type": "symlink", "linkName": target})
        elif s.endswith("/"):
            entries.append({"name": s, "type": "dir"})
        else:
            entries.append({"name": s, "type": "reg"})
    return LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))


def where(view: MergedView, path: str) -> tuple[int, str] | None:
    found = view.resolve(path)
    return None if found is None else (found.layer, found.path)


BASE = layer(
    "usr/",
    "usr/lib/",
    "usr/lib/x86_64-linux-gnu/",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
    "usr/lib/x86_64-linux-gnu/libz.so.1 -> libz.so.1.2.13",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "lib -> usr/lib",
    "lib64/",
    "lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "opt/",
    "opt/old/",
    "opt/old/libold.so",
    "etc/",
    "etc/ld.so.cache",
)


def test_the_topmost_layer_wins_and_links_are_followed_across_layers():
    top = layer(
        "usr/", "usr/lib/", "usr/lib/x86_64-linux-gnu/", "usr/lib/x86_64-linux-gnu/libc.so.6"
    )
    view = MergedView([top, BASE])
    assert where(view, "/lib/x86_64-linux-gnu/libc.so.6") == (
        0,
        "usr/lib/x86_64-linux-gnu/libc.so.6",
    )
    assert where(view, "/lib/x86_64-linux-gnu/libz.so.1") == (
        1,
        "usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
    )
    assert where(view, "/lib64/ld-linux-x86-64.so.2") == (
        1,
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    )
    assert where(view, "etc/ld.so.cache") == (1, "etc/ld.so.cache")
    assert where(view, "/usr/lib/x86_64-linux-gnu/libnope.so") is None


def test_whiteouts_and_opaque_directories_hide_the_layers_below():
    top = layer(
        "usr/", "usr/lib/", "usr/lib/x86_64-linux-gnu/", "usr/lib/x86_64-linux-gnu/.wh.libc.so.6"
    )
    assert where(MergedView([top, BASE]), "/usr/lib/x86_64-linux-gnu/libc.so.6") is None
    opaque = layer("opt/", "opt/old/", "opt/old/.wh..wh..opq", "opt/old/libnew.so")
    view = MergedView([opaque, BASE])
    assert where(view, "/opt/old/libold.so") is None
    assert where(view, "/opt/old/libnew.so") == (0, "opt/old/libnew.so")
    gone = layer(".wh.opt")
    assert where(MergedView([gone, BASE]), "/opt/old/libold.so") is None
    replaced = layer("opt")  # a regular file where the directory was
    assert where(MergedView([replaced, BASE]), "/opt/old/libold.so") is None


def test_dot_dot_loops_and_links_out_of_the_root():
    view = MergedView([layer("a/", "a/b/", "a/f", "loop -> loop", "up -> ../../../a/f"), BASE])
    assert where(view, "/a/b/../f") == (0, "a/f")
    assert where(view, "/../../a/f") == (0, "a/f")
    assert where(view, "up") == (0, "a/f")  # .. stops at the root, as the kernel's does
    assert where(view, "loop") is None
    chain = [f"l{i} -> l{i + 1}" for i in range(MAX_SYMLINKS + 1)] + [f"l{MAX_SYMLINKS + 1}"]
    assert where(MergedView([layer(*chain)]), "l0") is None  # ELOOP
    assert where(MergedView([layer(*chain[1:])]), "l1") is not None
    assert where(view, "/a/f/x") is None  # through a file


def config(**fields: object) -> bytes:
    return json.dumps({"architecture": "amd64", "config": fields}).encode()


def test_the_default_process_is_entrypoint_then_cmd_through_the_image_path():
    p = DefaultProcess.from_config(
        config(Entrypoint=["redis-server"], Cmd=["--save", ""], Env=["A=1", "PATH=/opt/x:/bin"])
    )
    assert p == DefaultProcess("redis-server", ("/opt/x", "/bin"), "/")
    assert p.candidates(p.program) == ["/opt/x/redis-server", "/bin/redis-server"]
    p = DefaultProcess.from_config(config(Cmd=["python3", "-c", "1"]))
    assert p is not None and p.path == tuple(DEFAULT_PATH.split(":"))
    assert p.candidates("/usr/bin/python3") == ["/usr/bin/python3"]
    # A relative path with a slash runs from the working directory, as execvp(3) does.
    p = DefaultProcess.from_config(config(Cmd=["./bin/start", "x"], WorkingDir="/srv/app"))
    assert p is not None and p.candidates(p.program) == ["/srv/app/bin/start"]
    assert p.candidates("../../etc/../bin/sh") == ["/bin/sh"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        json.dumps({"config": None}).encode(),
        config(),
        config(Cmd=[]),
        config(Cmd="python3"),  # a string, not the spec's array
        config(Entrypoint=[3], Cmd=["sh"]),
        config(Cmd=[""]),
    ],
    ids=["empty", "garbage", "array", "null", "none", "cmd-empty", "cmd-str", "non-str", "blank"],
)
def test_a_config_naming_no_program_gives_no_default_process(raw):
    assert DefaultProcess.from_config(raw) is None


def test_odd_env_and_working_dir_fall_back_to_the_defaults():
    p = DefaultProcess.from_config(config(Cmd=["sh"], Env="PATH=/x", WorkingDir="rel"))
    assert p == DefaultProcess("sh", tuple(DEFAULT_PATH.split(":")), "/")
    p = DefaultProcess.from_config(config(Cmd=["sh"], Env=[7, "PATH=bin::/usr/bin"]))
    assert p is not None and p.path == ("/usr/bin",)  # relative PATH entries are skipped
    # A hostile PATH costs at most MAX_PATH_DIRS lookups per name.
    path = ":".join(["/usr/bin"] * 1000 + [f"/d{i}" for i in range(1000)])
    p = DefaultProcess.from_config(config(Cmd=["sh"], Env=[f"PATH={path}"]))
    assert p is not None and p.path == ("/usr/bin", *(f"/d{i}" for i in range(MAX_PATH_DIRS - 1)))


ENV = ["/usr/bin/env"]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"#!/bin/sh\nexec foo\n", [["/bin/sh"]]),
        (b"#! /bin/bash -e\n", [["/bin/bash"]]),
        (b"#!/bin/sh\t-e \n", [["/bin/sh"]]),
        (b"#!/usr/bin/env python3\n", [ENV, ["/usr/bin/python3", "/bin/python3"]]),
        (b"#!/usr/bin/env -S VAR=1 -u X node --x\n", [ENV, ["/usr/bin/node", "/bin/node"]]),
        # Without -S the rest of the line is one argument: env looks for "python3 -u".
        (b"#!/usr/bin/env python3 -u\n", [ENV]),
        (b"#!/usr/bin/env -i sh\n", [ENV]),
        (b"#!/usr/bin/env\n", [ENV]),
        (b"#!/bin/sh\r\n", [["/bin/sh\r"]]),  # a CRLF script: the kernel looks for "sh\r"
        (b"#!bin/sh\n", []),  # not absolute: execve(2) would resolve it from the caller's cwd
        (b"#!\n", []),
        (b"\x7fELF\x02\x01", []),
        # The kernel reads 256 bytes: a path cut off there is not run, its arguments may be.
        (b"#!/" + b"a" * 400, []),
        (b"#!/bin/sh " + b"a" * 400, [["/bin/sh"]]),
        (b"#!/" + b"a" * 252 + b" " + b"b" * 100, [["/" + "a" * 252]]),  # ended by byte 255
        (b"#!/bin/sh", [["/bin/sh"]]),  # the whole file
        (b"#!/bin/sh\0junk\n", [["/bin/sh"]]),
    ],
)
def test_a_script_names_its_interpreter(head, expected):
    p = DefaultProcess("entry.sh", ("/usr/bin", "/bin"))
    assert p.interpreter(head) == expected


def test_a_hostile_tree_costs_a_resolution_little():
    """A 2,000-deep directory whose bottom links back to its own absolute path: each step
    looks the whole path up again, so the walk stops at MAX_DEPTH / MAX_STEPS."""
    deep = "/".join(["a"] * 2000)
    specs = [f"{'/'.join(['a'] * i)}/" for i in range(1, 2001)]
    view = MergedView([layer(*specs, f"{deep}/loop -> /{deep}/loop")])
    start = time.monotonic()
    assert view.resolve(f"/{deep}/loop/x") is None
    assert time.monotonic() - start < 1.0
    assert view.resolve("/" + "a/" * 10) is not None  # a sane depth still resolves


def test_names_the_kernel_could_not_look_up_are_refused():
    view = MergedView([BASE])
    assert view.resolve("/" + "x" * PATH_MAX) is None
    assert not path_ok("/\ud800") and not path_ok("") and path_ok("/usr/\udcff")
    p = DefaultProcess.from_config(config(Cmd=["sh"], Env=["PATH=/\ud800:/bin"]))
    assert p is not None and p.path == ("/bin",)
    assert DefaultProcess.from_config(config(Cmd=["x" * PATH_MAX])) is None
