"""Refused NBD writes through libnbd: the error arrives after the payload, the connection lives.

libnbd (nbdinfo, nbdcopy, nbdfuse, nbdsh) only matches a reply to a request it has
finished sending; an error reply to a large write that arrives while the payload is
still going out makes it drop the connection ("no matching cookie found"). Each case
sends an 8 MiB write the front end refuses, then reads on the same connection.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_nbd_member import nbdkit
from tests.procs import Procs, member_uri, nbdsh, run

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 64 * MiB

# Runs inside nbdsh (Debian's python3 with libnbd): one refused write, then a read.
SCRIPT = """
import json
h.set_strict_mode(0)  # let libnbd send what the server must refuse
case, offset, flags = {case!r}, {offset}, {flags}
result = {{"case": case, "maximum": h.get_block_size(nbd.SIZE_MAXIMUM)}}
try:
    h.pwrite(b"w" * (8 << 20), offset, flags)
    result["write"] = "accepted"
except nbd.Error as e:
    result["write"] = e.errno  # the errno name, e.g. "EPERM"
result["read"] = h.pread(4096, 0).hex()
print(json.dumps(result))
"""


def refused(uri: str, case: str, offset: int, flags: int = 0) -> dict[str, object]:
    cp = run([*nbdsh(), "-u", uri, "-c", SCRIPT.format(case=case, offset=offset, flags=flags)])
    line = cp.stdout.strip().splitlines()[-1]
    out: dict[str, object] = json.loads(line)
    return out


def prepared_member(procs: Procs, sockdir: Path, *export_args: str) -> str:
    """An export node on a file whose first 4 KiB is known, attached over NBD."""
    img = sockdir / f"disk{procs.n}.img"
    img.write_bytes(b"\x5a" * 4096)
    with open(img, "r+b") as f:
        f.truncate(SIZE)
    _, addr = procs.export(f"file:{img}", *export_args)
    _, uri = procs.attach(member_uri(addr))
    return uri


def test_refused_large_writes_keep_the_libnbd_connection(procs: Procs, sockdir: Path) -> None:
    known = "5a" * 4096
    ro = prepared_member(procs, sockdir, "--read-only")
    rw = prepared_member(procs, sockdir)
    cases = [
        (ro, "read-only", 0, 0, "EPERM"),
        (rw, "past-the-end", SIZE - 4096, 0, "ENOSPC"),
        (rw, "unknown-flag", 0, 1 << 3, "EINVAL"),  # REQ_ONE means nothing on a write
    ]
    for uri, case, offset, flags, want in cases:
        r = refused(uri, case, offset, flags)
        assert r["write"] == want, r
        assert r["read"] == known, f"{case}: the read after the refused write failed: {r}"


def test_a_write_over_the_maximum_block_size(procs: Procs, sockdir: Path) -> None:
    # nbdkit advertises a 4 MiB maximum; dst serves the device with the same maximum
    sock = sockdir / "small-max.sock"
    nbdkit(
        procs,
        sock,
        "--filter=blocksize-policy",
        "data",
        "data=" + "0x5a " * 4096,
        f"size={SIZE}",
        "blocksize-maximum=4M",
    )
    _, uri = procs.attach(f"nbd+unix:///?socket={sock}")
    r = refused(uri, "over-the-maximum", 0)
    assert r["maximum"] == 4 * MiB, r
    assert r["write"] == "EINVAL", r
    assert r["read"] == "5a" * 4096, r
