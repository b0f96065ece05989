"""A leg added to a mirror over a sparse file is copied sparse, on real processes.

Export nodes on files, `dst attach --mirror` over the first, data written through NBD,
then `dst ctl add` of a second export node whose file is full of old data: after the full
resync the new leg's file equals the source byte for byte, has the same map of data and
holes (SEEK_DATA/SEEK_HOLE) and about the same allocation, and `nbdinfo --map` through the
mirror still shows the holes. Writes, zeroes and trims made while the copy runs end the
same on both legs.
"""

from __future__ import annotations

import filecmp
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_block_status import (
    DATA,
    HOLE_ZERO,
    WRITE_SCRIPT,
    WRITES,
    expected_map,
    nbdinfo_map,
    nbdsh_run,
)
from tests.procs import Proc, Procs, dst_run, member_uri

pytestmark = pytest.mark.integration

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB


def file_map(path: Path) -> list[tuple[int, int, int]]:
    """A file's data and holes from SEEK_DATA/SEEK_HOLE, as (offset, length, flags)."""
    out: list[tuple[int, int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:  # each pass moves past one data run and one hole
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                data = size
            if data > pos:
                out.append((pos, data - pos, HOLE_ZERO))
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data, DATA))
            pos = hole
    finally:
        os.close(fd)
    return out


def old_data_file(path: Path) -> None:
    """A reused store: every byte allocated and non-zero."""
    with open(path, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(b"\xee" * MiB)


def start(procs: Procs, tmp: Path, *attach_args: str) -> tuple[Proc, str, str, Path]:
    """Export node a on a new sparse file and b on a file of old data; a mirror over a
    alone with a control socket. Returns the client node, its NBD URI, b's URI, the socket."""
    old_data_file(tmp / "b.img")
    _, a = procs.export(f"file:{tmp}/a.img", "--size", str(SIZE), listen=f"unix:{tmp}/a.sock")
    _, b = procs.export(f"file:{tmp}/b.img", "--size", str(SIZE), listen=f"unix:{tmp}/b.sock")
    ctl = tmp / "ctl.sock"
    att, uri = procs.attach(
        member_uri(a), "--mirror", "--bitmap", str(tmp / "m.bitmap"), "--control", str(ctl),
        "--debug=mirror", *attach_args,
    )  # fmt: skip
    return att, uri, member_uri(b), ctl


def resync_done(att: Proc, timeout: float = 60) -> dict[str, Any]:
    """The `resync-done` event of the --debug=mirror log (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in att.output.splitlines():
            if line.startswith("{") and '"resync-done"' in line:
                ev: dict[str, Any] = json.loads(line)
                return ev
        time.sleep(0.05)
    raise AssertionError(f"no resync-done within {timeout} s:\n{att.output}")


def add(ctl: Path, uri: str) -> None:
    cp = dst_run("ctl", "--control", str(ctl), "add", uri)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_an_added_leg_over_old_data_is_copied_sparse(procs: Procs, sockdir: Path) -> None:
    att, uri, b, ctl = start(procs, sockdir)
    nbdsh_run(uri, WRITE_SCRIPT.format(writes=WRITES))
    a_img, b_img = sockdir / "a.img", sockdir / "b.img"
    want = expected_map(WRITES, SIZE)
    assert file_map(a_img) == want and file_map(b_img) == [(0, SIZE, DATA)]
    add(ctl, b)
    done = resync_done(att)
    written = sum(n for _, n in WRITES)
    assert done["bytes"] == SIZE and done["zeroed"] == SIZE - written, done
    assert "copied, 62.8 MiB zeroed" in att.output, att.output
    assert filecmp.cmp(a_img, b_img, shallow=False)  # the old data is gone from the holes
    assert file_map(b_img) == want  # and the holes are holes again
    a_blocks, b_blocks = os.stat(a_img).st_blocks, os.stat(b_img).st_blocks
    assert b_blocks * 512 <= written + 64 * KiB and abs(a_blocks - b_blocks) * 512 <= 64 * KiB
    for _ in range(3):  # whichever leg answers, the mirror's map shows the holes
        assert nbdinfo_map(uri) == want


CHANGES = """
import os
for off, n in {extra!r}:
    h.pwrite(os.urandom(n), off)
h.zero({zero[1]}, {zero[0]})
h.trim({trim[1]}, {trim[0]})
h.flush()
"""


def test_changes_while_a_sparse_copy_runs_end_the_same_on_both_legs(
    procs: Procs, sockdir: Path
) -> None:
    # at 64 KiB/s the 1.25 MiB of data take 20 s: the changes below land while it runs
    att, uri, b, ctl = start(procs, sockdir, "--resync-rate", "64K")
    nbdsh_run(uri, WRITE_SCRIPT.format(writes=WRITES))
    add(ctl, b)
    att.wait_for(r"resync started", timeout=20)
    extra = [(2 * MiB, 64 * KiB), (20 * MiB, 256 * KiB), (50 * MiB, 64 * KiB)]
    zero, trim = WRITES[2], WRITES[0]  # a zeroed and a trimmed range read zeroes after
    nbdsh_run(uri, CHANGES.format(extra=extra, zero=zero, trim=trim))
    assert '"resync-done"' not in att.output  # the changes overlapped the copy
    cp = dst_run("ctl", "--control", str(ctl), "set", "resync-rate=0")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    resync_done(att)
    a_img, b_img = sockdir / "a.img", sockdir / "b.img"
    assert filecmp.cmp(a_img, b_img, shallow=False)
    left = [w for w in WRITES if w not in (zero, trim)] + extra
    assert file_map(a_img) == file_map(b_img) == expected_map(left, SIZE)
    assert nbdinfo_map(uri) == expected_map(left, SIZE)
