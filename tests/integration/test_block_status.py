"""BLOCK_STATUS (base:allocation) through the whole stack, seen by the real tools.

Export nodes on sparse files, `dst attach` serving one member, a mirror or a stripe
over NBD; writes through the NBD front end, then `nbdinfo --map` and `qemu-img map`
must show exactly the written ranges as data and everything else as holes that read
as zeroes; a TRIM makes a hole; `qemu-img convert` and `nbdcopy` copies stay sparse.
An `nbd://` member passes its server's own map through, or reports data when the
server has none. The edges nbdkit got wrong (CVE-2025-47711, CVE-2025-47712) are
probed at 32-bit lengths on an export larger than 4 GiB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.test_nbd_member import nbdkit
from tests.procs import Procs, member_uri, nbdsh, need_tool, run

pytestmark = pytest.mark.integration

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 64 * MiB
HOLE_ZERO, DATA = 3, 0
# (offset, length) written through the front end, 64 KiB aligned so that every layout
# (a stripe chunk of 64 KiB, the filesystem's 4 KiB blocks) keeps them exact
WRITES = [
    (1 * MiB, 64 * KiB),
    (5 * MiB, 1 * MiB),
    (40 * MiB, 128 * KiB),
    (SIZE - 64 * KiB, 64 * KiB),
]

WRITE_SCRIPT = """
import os
for off, n in {writes!r}:
    h.pwrite(os.urandom(n), off)
h.flush()
"""


def expected_map(writes: list[tuple[int, int]], size: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of data where written, holes that read as zeroes between."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    for off, n in sorted(writes):
        if off > pos:
            out.append((pos, off - pos, HOLE_ZERO))
        if out and out[-1][2] == DATA and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, DATA)
        else:
            out.append((off, n, DATA))
        pos = off + n
    if pos < size:
        out.append((pos, size - pos, HOLE_ZERO))
    return out


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    cp = run([need_tool("nbdinfo"), "--map", "--json", uri])
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(cp.stdout)]


def qemu_img_map(uri: str) -> list[tuple[int, int, int]]:
    cp = run([need_tool("qemu-img"), "map", "-f", "raw", "--output=json", uri])
    out: list[tuple[int, int, int]] = []
    for e in json.loads(cp.stdout):
        flags = DATA if e["data"] else HOLE_ZERO
        assert e["zero"] == (flags == HOLE_ZERO), e
        if out and out[-1][2] == flags:  # qemu-img splits where it asked again
            out[-1] = (out[-1][0], out[-1][1] + e["length"], flags)
        else:
            out.append((e["start"], e["length"], flags))
    return out


def sparse_exports(procs: Procs, tmp: Path, n: int, size: int = SIZE) -> list[str]:
    """``n`` export nodes, each on a new sparse file; their member URIs."""
    uris = []
    for i in range(n):
        _, addr = procs.export(f"file:{tmp}/leg{i}.img", "--size", str(size))
        uris.append(member_uri(addr))
    return uris


def serve(procs: Procs, tmp: Path, layout: str) -> str:
    if layout == "single":
        members, extra = sparse_exports(procs, tmp, 1), []
    elif layout == "mirror":  # two blank legs: in sync from the start, no copy of holes
        members = sparse_exports(procs, tmp, 2)
        extra = ["--mirror", "--bitmap", f"{tmp}/m.bitmap", "--assume-clean"]
    else:
        members = sparse_exports(procs, tmp, 2, SIZE // 2)
        extra = ["--stripe", "64K"]
    _, uri = procs.attach(*members, *extra)
    return uri


def nbdsh_run(uri: str, script: str) -> str:
    return run([*nbdsh(), "-u", uri, "-c", script], timeout=60).stdout


@pytest.mark.parametrize("layout", ["single", "mirror", "stripe"])
def test_maps_show_written_data_and_holes(procs: Procs, sockdir: Path, layout: str) -> None:
    uri = serve(procs, sockdir, layout)
    assert nbdinfo_map(uri) == [(0, SIZE, HOLE_ZERO)]
    nbdsh_run(uri, WRITE_SCRIPT.format(writes=WRITES))
    want = expected_map(WRITES, SIZE)
    assert nbdinfo_map(uri) == want
    assert qemu_img_map(uri) == want

    # a trimmed range becomes a hole again (the file backend punches it)
    off, n = WRITES[1]
    nbdsh_run(uri, f"h.trim({n}, {off}); h.flush()")
    rest = [w for w in WRITES if w != (off, n)]
    assert nbdinfo_map(uri) == expected_map(rest, SIZE)
    assert nbdsh_run(uri, f"print(h.pread({n}, {off}) == bytes({n}))").strip() == "True"


@pytest.mark.parametrize("layout", ["single", "stripe"])
def test_copies_stay_sparse(procs: Procs, sockdir: Path, tmp_path: Path, layout: str) -> None:
    uri = serve(procs, sockdir, layout)
    nbdsh_run(uri, WRITE_SCRIPT.format(writes=WRITES))
    written = sum(n for _, n in WRITES)
    qemu_img = need_tool("qemu-img")
    copies = {
        "qemu-img": [qemu_img, "convert", "-f", "raw", "-O", "raw", uri],
        "nbdcopy": [need_tool("nbdcopy"), uri],
    }
    for tool, args in copies.items():
        out = tmp_path / f"{tool}.img"
        run([*args, str(out)], timeout=120)
        assert out.stat().st_size == SIZE
        allocated = out.stat().st_blocks * 512
        assert allocated <= written + 64 * KiB, f"{tool} wrote {allocated} bytes for {written}"
        run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(out), uri])

    # and into the device: the zeroes of a sparse source arrive as zeroes, not as data
    src = tmp_path / "source.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(3 * MiB)
        f.write(os.urandom(256 * KiB))
    run([need_tool("nbdcopy"), str(src), uri], timeout=120)
    assert nbdinfo_map(uri) == expected_map([(3 * MiB, 256 * KiB)], SIZE)
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri])


def test_nbd_member_passes_its_servers_map_through(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "nbdkit.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
        f.seek(7 * MiB)
        f.write(os.urandom(MiB))
    sock = sockdir / "kit.sock"
    nbdkit(procs, sock, "file", str(img))
    _, uri = procs.attach(f"nbd+unix:///?socket={sock}")
    assert nbdinfo_map(uri) == expected_map([(7 * MiB, MiB)], SIZE)

    # a server without base:allocation (here: no structured replies at all): all data
    sock2 = sockdir / "kit-nosr.sock"
    nbdkit(procs, sock2, "--no-sr", "file", str(img))
    _, uri2 = procs.attach(f"nbd+unix:///?socket={sock2}")
    assert nbdinfo_map(uri2) == [(0, SIZE, DATA)]
    run([need_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(img), uri2])


EDGE_SCRIPT = """
import json
h.set_strict_mode(0)  # send what the server must refuse, too
size = h.get_size()

def status(offset, length, flags=0):
    got = []
    def cb(context, off, entries, err):
        got.extend(zip(entries[::2], entries[1::2]))
        return 0
    try:
        h.block_status(length, offset, cb, flags)
    except nbd.Error as e:
        return e.errno
    return got

out = {{}}
for name, offset, length, flags in {cases!r}:
    out[name] = status(offset, length, flags)
print(json.dumps(out))
"""


def edges(uri: str, cases: list[tuple[str, int, int, int]]) -> dict[str, object]:
    script = EDGE_SCRIPT.format(cases=cases)
    cp = run([*nbdsh(), "--base-allocation", "-u", uri, "-c", script], timeout=60)
    out = cp.stdout.strip().splitlines()[-1]
    result: dict[str, object] = json.loads(out)
    return result


def test_32_bit_edges_on_an_export_larger_than_4_gib(procs: Procs, sockdir: Path) -> None:
    size = 9 * GiB
    img = sockdir / "big.img"
    with open(img, "wb") as f:
        f.truncate(size)
        f.seek(4 * GiB - 4 * KiB)  # data across the 4 GiB line
        f.write(b"\x11" * 8 * KiB)
        f.seek(6 * GiB)
        f.write(b"\x22" * 4 * KiB)
    _, addr = procs.export(f"file:{img}")
    _, uri = procs.attach(member_uri(addr))
    top = 0xFFFFFFFF  # the largest length the request can carry
    got = edges(
        uri,
        [
            ("max-at-0", 0, top, 0),
            ("max-at-0-one", 0, top, 8),  # REQ_ONE: one extent, no longer than asked
            ("max-across", 4 * GiB - 4 * KiB, top, 0),
            ("max-to-the-end", size - top, top, 0),
            ("past-the-end", size - top + 1, top, 0),
            ("last-byte", size - 1, 1, 0),
            ("zero-length", 0, 0, 0),
        ],
    )
    assert got["max-at-0"] == [[4 * GiB - 4 * KiB, HOLE_ZERO], [4 * KiB - 1, DATA]]
    assert got["max-at-0-one"] == [[4 * GiB - 4 * KiB, HOLE_ZERO]]
    hole = 6 * GiB - (4 * GiB + 4 * KiB)
    assert got["max-across"] == [
        [8 * KiB, DATA],
        [hole, HOLE_ZERO],
        [4 * KiB, DATA],
        [top - 8 * KiB - hole - 4 * KiB, HOLE_ZERO],
    ]
    end_run = got["max-to-the-end"]
    assert isinstance(end_run, list) and sum(n for n, _ in end_run) == top
    assert all(0 < n <= top for n, _ in end_run)
    assert got["past-the-end"] == "EINVAL"
    assert got["last-byte"] == [[1, HOLE_ZERO]]
    assert got["zero-length"] == "EINVAL"


def test_32_bit_edges_with_a_minimum_block_size(procs: Procs, sockdir: Path) -> None:
    # nbdkit with 4 KiB blocks as the member: dst serves it with the same minimum block
    size = 5 * GiB
    img = sockdir / "big4k.img"
    with open(img, "wb") as f:
        f.truncate(size)
        f.seek(4 * GiB)
        f.write(b"\x33" * 4 * KiB)
    sock = sockdir / "kit4k.sock"
    nbdkit(procs, sock, "--filter=blocksize-policy", "file", str(img), "blocksize-minimum=4096")
    _, uri = procs.attach(f"nbd+unix:///?socket={sock}")
    aligned_top = 0xFFFFFFFF // 4096 * 4096
    got = edges(
        uri,
        [
            ("unaligned-max", 0, 0xFFFFFFFF, 0),
            ("aligned-max", 0, aligned_top, 0),
            ("aligned-max-one", 4 * KiB, aligned_top, 8),
            ("from-4g", 4 * GiB, GiB, 0),
        ],
    )
    assert got["unaligned-max"] == "EINVAL"
    assert got["aligned-max"] == [[aligned_top, HOLE_ZERO]]
    assert got["aligned-max-one"] == [[aligned_top, HOLE_ZERO]]
    assert got["from-4g"] == [[4 * KiB, DATA], [GiB - 4 * KiB, HOLE_ZERO]]
    for runs in got.values():
        if isinstance(runs, list):
            assert all(n % 4096 == 0 and n > 0 for n, _ in runs), runs
