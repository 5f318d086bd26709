"""A program's interpreter and libraries from its ELF headers (store.elfdeps), read sparsely."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.elfdeps import (
    FETCH_MAX,
    MAX_NEEDED,
    MAX_ROUNDS,
    READ_BUDGET,
    SparseFile,
    read_elf_deps,
    system_dirs,
)

LS = Path("/bin/ls")
LDCONFIG = Path("/sbin/ldconfig")  # statically linked on Debian


def deps_of(data: bytes, path: str, head: int = 4096):
    reads: list[tuple[int, int]] = []

    async def read(offset: int, size: int) -> bytes:
        reads.append((offset, size))
        return data[offset : offset + size]

    found = trio.run(read_elf_deps, read, len(data), path, data[:head])
    return found, reads


def test_a_program_names_its_interpreter_and_libraries_read_from_few_ranges():
    data = LS.read_bytes()
    deps, reads = deps_of(data, "usr/bin/ls")
    assert deps is not None
    assert deps.interpreter is not None and deps.interpreter.startswith("/lib")
    assert "libc.so.6" in deps.needed
    assert list(deps.search) == system_dirs(deps.machine)
    assert deps.candidates("libc.so.6")[0] == f"{deps.search[0]}/libc.so.6"
    assert deps.candidates("/abs/lib.so") == ["/abs/lib.so"] and deps.candidates("rel/x") == []
    assert len(reads) <= 3
    # ld.so's way: through the program headers, never the section table at the file's end
    # (a read may run into it: each asks for at least FETCH_MIN bytes).
    section_table = int.from_bytes(data[0x28:0x30], "little")
    assert all(off < section_table for off, _ in reads)


def test_what_is_not_a_dynamically_linked_elf_file_gives_no_hint():
    assert deps_of(b"#!/bin/sh\necho hello\n" * 10, "usr/bin/x")[0] is None
    assert deps_of(b"\x7fELF" + bytes(100), "usr/bin/x")[0] is None
    assert deps_of(LS.read_bytes()[:200], "usr/bin/ls", head=200)[0] is None  # truncated
    if LDCONFIG.exists():  # static (or static-pie: a dynamic segment, nothing to load)
        static = deps_of(LDCONFIG.read_bytes(), "sbin/ldconfig")[0]
        assert static is None or (static.interpreter is None and not static.needed)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to link a test program")
@pytest.mark.parametrize("tags", ["--enable-new-dtags", "--disable-new-dtags"])
def test_origin_in_the_runpath_is_the_programs_directory(tmp_path, tags):
    prog = tmp_path / "prog"
    link = [f"-Wl,{tags}", "-Wl,--no-as-needed", "-Wl,-rpath,$ORIGIN/../lib:/opt/shared"]
    subprocess.run(
        ["gcc", "-x", "c", "-", "-o", str(prog), "-lm", *link],
        input=b"#include <math.h>\nint main(int c, char **v) { return (int)sqrt(c); }\n",
        check=True,
    )
    deps, _ = deps_of(prog.read_bytes(), "opt/app/bin/prog")
    assert deps is not None and "libm.so.6" in deps.needed
    assert deps.search[:2] == ("/opt/app/lib", "/opt/shared")
    assert deps.candidates("libm.so.6")[0] == "/opt/app/lib/libm.so.6"


def test_the_sparse_file_says_which_bytes_are_missing():
    f = SparseFile(100)
    f.add(10, b"abcdef")
    f.seek(12)
    assert f.read(3) == b"cde" and f.tell() == 15
    f.seek(95)
    with pytest.raises(Exception) as raised:
        f.read(10)
    assert raised.value is f.need and (f.need.offset, f.need.size) == (95, 5)
    f.seek(0, 2)
    assert f.read(5) == b""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), max_size=40))
def test_a_damaged_program_gives_a_hint_or_none_never_an_error(flips):
    data = bytearray(LS.read_bytes())
    for at, value in flips:
        data[at] = value
    deps, reads = deps_of(bytes(data), "usr/bin/ls")
    assert deps is None or all(isinstance(n, str) for n in deps.needed)
    assert len(reads) <= MAX_ROUNDS and all(size <= FETCH_MAX for _, size in reads)


def test_a_huge_segment_in_the_header_fetches_little():
    """A dynamic segment claimed to be 1 TiB long costs at most MAX_ROUNDS reads of at most
    FETCH_MAX bytes each."""
    data = bytearray(LS.read_bytes())
    phoff, phentsize, phnum = (
        int.from_bytes(data[0x20:0x28], "little"),
        int.from_bytes(data[0x36:0x38], "little"),
        int.from_bytes(data[0x38:0x3A], "little"),
    )
    for i in range(phnum):
        ph = phoff + i * phentsize
        if int.from_bytes(data[ph : ph + 4], "little") == 2:  # PT_DYNAMIC
            data[ph + 0x20 : ph + 0x28] = (1 << 40).to_bytes(8, "little")  # p_filesz
    _, reads = deps_of(bytes(data), "usr/bin/ls")
    assert len(reads) <= MAX_ROUNDS and all(size <= FETCH_MAX for _, size in reads)


def _elf_naming_one_string(n_tags: int, string: bytes, tag: int) -> bytes:
    """A well-formed ELF64 (x86-64, ET_DYN): one PT_LOAD over the whole file and a PT_DYNAMIC
    of ``n_tags`` tags of type ``tag`` (1 DT_NEEDED, 15 DT_RPATH, 29 DT_RUNPATH), each
    naming the same ``string`` of its string table."""
    dyn_off = 0x1000
    body = struct.pack("<qQ", tag, 0) * n_tags + struct.pack("<qQ", 0, 0)  # ..., DT_NULL
    str_off = dyn_off + 16 + len(body)
    dyn = struct.pack("<qQ", 5, str_off) + body  # DT_STRTAB first
    size = str_off + len(string) + 1
    eh = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    eh += struct.pack("<HHIQQQIHHHHHH", 3, 0x3E, 1, 0, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, size, size, 0x1000)
    ph += struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, len(dyn), len(dyn), 8)
    data = eh + ph
    return data + bytes(dyn_off - len(data)) + dyn + string + b"\0"


@pytest.mark.parametrize(
    ("n_tags", "string", "tag"),
    [
        (1000, b"ab:" * 9000, 15),  # 9 million directories: was 750 MB
        (1000, b"ab:" * 9000, 29),
        (4000, b"a" * 60_000, 1),  # 4,000 names of 60 KB: was 4 s and 250 MB
    ],
    ids=["rpath", "runpath", "needed"],
)
def test_tags_naming_one_long_string_cost_a_bounded_read(n_tags, string, tag):
    """Each dynamic tag's name is read as the tag is: thousands of tags naming one long
    string made the parse read, and keep, their product. It reads READ_BUDGET bytes at
    most, and gives no hint past it."""
    data = _elf_naming_one_string(n_tags, string, tag)
    tracemalloc.start()
    try:
        deps, _ = deps_of(data, "usr/bin/prog", head=len(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert deps is None
    assert peak < 8 * READ_BUDGET + len(data), f"{peak} bytes at the peak"


def test_a_few_tags_naming_long_strings_still_give_the_hint():
    """Within the budget, the names and directories come through, cut to their bounds."""
    data = _elf_naming_one_string(2, b"/opt/lib:" * 2000, 29)  # 4,000 directories of 18 KB
    deps, _ = deps_of(data, "usr/bin/prog", head=len(data))
    assert deps is not None and deps.search[0] == "/opt/lib"
    assert deps.search[1:] == tuple(system_dirs("EM_X86_64"))  # one directory, kept once
    data = _elf_naming_one_string(MAX_NEEDED + 10, b"libx.so.1", 1)
    deps, _ = deps_of(data, "usr/bin/prog", head=len(data))
    assert deps is not None and deps.needed == ("libx.so.1",) * MAX_NEEDED
