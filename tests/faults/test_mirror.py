"""Network RAID on real processes: mirror legs that die, come back, are replaced; stripe and
linear over three export nodes (one of them an nbdkit server)."""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.test_resilience import fio_result, fio_writer
from tests.procs import Proc, Procs, dst_run, kill_tree, member_uri, nbdsh, need_tool, run

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = "128M"
SHORT_BUDGET = (
    "--resends",
    "1",
    "--resend-timeout",
    "1",
    "--reconnect-min",
    "0.05",
    "--reconnect-max",
    "0.3",
)


def qemu_io(uri: str, *cmds: str) -> None:
    exe = need_tool("qemu-io")
    args = [exe, "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    cp = run([*args, uri], check=False, timeout=120)
    assert cp.returncode == 0 and "failed" not in cp.stdout.lower(), cp.stdout + cp.stderr


class Mirror:
    """Two export nodes on files, restartable on the same file and socket."""

    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.procs = procs
        self.tmp = tmp
        self.files = [tmp / "a.img", tmp / "b.img"]
        self.socks = [f"unix:{tmp}/a.sock", f"unix:{tmp}/b.sock"]
        self.exports: list[Proc | None] = [None, None]
        for i in range(2):
            self.start(i)

    def start(self, i: int) -> None:
        p, _ = self.procs.export(f"file:{self.files[i]}", "--size", SIZE, listen=self.socks[i])
        self.exports[i] = p

    def kill(self, i: int) -> None:
        p = self.exports[i]
        assert p is not None
        p.kill()

    @property
    def members(self) -> list[str]:
        return [member_uri(s) for s in self.socks]

    def attach(self, *args: str, bitmap: Path | None = None) -> tuple[Proc, str]:
        extra = ["--bitmap", str(bitmap)] if bitmap is not None else []
        p, uri = self.procs.attach(*self.members, "--mirror", *extra, *args)
        return p, uri

    def identical(self) -> bool:
        return filecmp.cmp(self.files[0], self.files[1], shallow=False)


def wait_in_sync(att: Proc, count: int = 1, timeout: float = 60) -> list[int]:
    """Wait for ``count`` finished resyncs; returns the bytes each copied."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(r"resync finished: (\S+) (\S+) copied", att.output)
        if len(found) >= count:
            return [_bytes(n, u) for n, u in found]
        time.sleep(0.05)
    raise AssertionError(f"no {count} finished resync(s):\n{att.output}")


def _bytes(number: str, unit: str) -> int:
    factor = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
    return int(float(number) * factor)


def test_leg_down_past_the_budget_degrades_then_resyncs_only_dirty(
    procs: Procs, sockdir: Path
) -> None:
    m = Mirror(procs, sockdir)
    att, uri = m.attach(*SHORT_BUDGET, bitmap=sockdir / "bm")
    wait_in_sync(att)  # the first start copies leg a to leg b (a new bitmap proves nothing)
    fio = subprocess.Popen(
        fio_writer(uri, size="16M", rate="6m"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    m.kill(1)
    time.sleep(4.0)  # longer than the 2 s budget: leg b degrades, writes go on to leg a
    att.wait_for(r"b\.sock: degraded", timeout=5)
    m.start(1)
    job = fio_result(fio)
    assert job["write"]["io_bytes"] >= 16 * MiB  # type: ignore[index]
    copied = wait_in_sync(att, 2)[1]
    assert 0 < copied <= 16 * MiB, (
        f"resync copied {copied} bytes; only the 16 MiB region was written"
    )
    qemu_io(uri, "flush")
    assert m.identical()


def test_short_outage_of_a_leg_needs_no_resync(procs: Procs, sockdir: Path) -> None:
    m = Mirror(procs, sockdir)
    att, uri = m.attach(
        "--resends",
        "5",
        "--resend-timeout",
        "2",
        "--reconnect-min",
        "0.05",
        "--reconnect-max",
        "0.3",
    )
    wait_in_sync(att)
    fio = subprocess.Popen(
        fio_writer(uri, size="8M", rate="4m"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    m.kill(1)
    time.sleep(0.8)
    m.start(1)
    fio_result(fio)
    qemu_io(uri, "flush")
    assert "degraded" not in att.output
    assert att.output.count("resync started") == 1  # only the first start's
    assert m.identical()


def test_client_node_killed_with_a_leg_down_resumes_from_the_bitmap(
    procs: Procs, sockdir: Path
) -> None:
    m = Mirror(procs, sockdir)
    bm = sockdir / "bm"
    att, uri = m.attach(*SHORT_BUDGET, bitmap=bm)
    wait_in_sync(att)
    m.kill(1)
    qemu_io(uri, "write -P 0x51 1M 2M", "write -P 0x52 9M 1M", "flush")
    att.wait_for(r"b\.sock: degraded")
    att.kill()  # the client node dies with leg b stale
    m.start(1)
    att2, uri2 = m.attach(*SHORT_BUDGET, bitmap=bm)
    copied = wait_in_sync(att2)[0]
    assert "only its dirty regions are resynced" in att2.output
    # the dirty 64 KiB regions, plus the 4 MiB activity-log extents still open at the crash
    assert copied <= 12 * MiB, copied
    qemu_io(uri2, "flush")
    assert m.identical()


def test_client_node_killed_mid_write_with_both_legs_up(procs: Procs, sockdir: Path) -> None:
    m = Mirror(procs, sockdir)
    bm = sockdir / "bm"
    att, uri = m.attach(bitmap=bm)
    wait_in_sync(att)
    fio = subprocess.Popen(
        fio_writer(uri, size="32M", rate="20m"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    att.kill()  # writes in flight on both legs: the activity log knows where
    kill_tree(fio.pid)  # fio and its job process: their NBD server is gone
    fio.communicate(timeout=30)
    att2, uri2 = m.attach(bitmap=bm)
    att2.wait_for(r"activity log", timeout=10)
    wait_in_sync(att2)
    qemu_io(uri2, "flush")
    assert m.identical()


def test_blank_replacement_leg_is_fully_synced(procs: Procs, sockdir: Path) -> None:
    m = Mirror(procs, sockdir)
    bm = sockdir / "bm"
    att, uri = m.attach(bitmap=bm)
    wait_in_sync(att)
    qemu_io(uri, "write -P 0x61 0 4M", "flush")
    assert att.stop() == 0
    m.kill(1)
    # a new, blank backing store of the same size where leg b was
    for p in sockdir.glob("b.img*"):
        p.unlink()
    m.start(1)
    att2, uri2 = m.attach(bitmap=bm)
    att2.wait_for(r"b\.sock: full resync: .*identity", timeout=10)
    copied = wait_in_sync(att2)[0]
    # the 4 MiB of data are copied, the rest of the 128 MiB reads as zeroes on leg a:
    # zeroed on the new leg, not read
    assert copied == 4 * MiB and "4 MiB copied, 124 MiB zeroed" in att2.output, att2.output
    qemu_io(uri2, "flush")
    assert m.identical()


@pytest.mark.parametrize("mode", [("--stripe", "64K"), ("--linear",)])
def test_stripe_and_linear_over_three_nodes_with_an_nbdkit_member(
    procs: Procs, sockdir: Path, mode: tuple[str, ...]
) -> None:
    nbdkit = need_tool("nbdkit")
    qemu_img = need_tool("qemu-img")
    members = []
    for name in ("a", "b"):
        _, addr = procs.export(f"file:{sockdir}/{name}.img", "--size", "32M")
        members.append(member_uri(addr))
    nbd_sock = sockdir / "kit.sock"
    kit = procs.start([nbdkit, "-f", "-U", str(nbd_sock), "memory", "32M"])
    deadline = time.monotonic() + 10
    while not nbd_sock.exists():
        assert time.monotonic() < deadline and kit.popen.poll() is None, kit.output
        time.sleep(0.05)
    members.append(f"nbd+unix:///?socket={nbd_sock}")
    att, uri = procs.attach(*members, *mode)
    ref = sockdir / "ref.img"
    ref.write_bytes(os.urandom(40 * MiB) + bytes(56 * MiB))
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(ref), uri])
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(ref), uri])
    fio = subprocess.Popen(
        fio_writer(uri, size="96M", rate="0", bs="16k"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job = fio_result(fio)
    assert job["write"]["io_bytes"] >= 96 * MiB  # type: ignore[index]
    assert "96 MiB" in att.output or "100663296" in att.output


def test_ctl_verify_detach_and_add_on_a_running_mirror(procs: Procs, sockdir: Path) -> None:
    """`dst ctl` end to end on `dst attach --mirror`: verify finds no difference, a leg is
    detached and a blank replacement is added and fully synced in the background."""
    m = Mirror(procs, sockdir)
    ctl = str(sockdir / "ctl.sock")
    att, uri = m.attach("--control", ctl, bitmap=sockdir / "bm")
    wait_in_sync(att)
    qemu_io(uri, "write -P 0x71 0 8M", "flush")
    cp = dst_run("ctl", "--control", ctl, "verify", "--json")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    report = json.loads(cp.stdout)
    assert report["differing_bytes"] == 0 and report["bytes_checked"] == 128 * MiB, report
    with open(m.files[1], "r+b") as f:  # silent damage on leg b, behind the mirror's back
        f.seek(3 * MiB)
        f.write(b"rot" * 100)
    cp = dst_run("ctl", "--control", ctl, "verify", "--repair", "--json")
    assert cp.returncode == 1, cp.stdout + cp.stderr  # they differed (and are being repaired)
    report = json.loads(cp.stdout)
    assert report["differing_bytes"] > 0 and report["regions"][0]["offset"] <= 3 * MiB, report
    wait_in_sync(att, 2)  # the repair resyncs the marked region
    assert m.identical()
    cp = dst_run("ctl", "--control", ctl, "detach", m.members[1])
    assert cp.returncode == 0, cp.stdout + cp.stderr
    status = json.loads(dst_run("status", "--control", ctl, "--json").stdout)
    assert [x["uri"] for x in status["members"]] == [m.members[0]]
    _, fresh = procs.export(
        f"file:{sockdir}/c.img", "--size", SIZE, listen=f"unix:{sockdir}/c.sock"
    )
    cp = dst_run("ctl", "--control", ctl, "add", member_uri(fresh))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    wait_in_sync(att, 3)
    status = json.loads(dst_run("status", "--control", ctl, "--json").stdout)
    assert {x["state"] for x in status["members"]} == {"connected"}, status["members"]
    qemu_io(uri, "flush")
    assert filecmp.cmp(m.files[0], sockdir / "c.img", shallow=False)


def test_assume_clean_skips_the_first_sync_and_verify_checks_it(
    procs: Procs, sockdir: Path
) -> None:
    """Two legs just created (both zero): --assume-clean with a new bitmap file serves at
    once with both legs in sync; `dst ctl verify` then finds them identical.  A later
    start with the same bitmap file ignores the flag (the file knows better)."""
    m = Mirror(procs, sockdir)
    ctl = sockdir / "ctl.sock"
    att, uri = m.attach("--assume-clean", "--control", str(ctl), bitmap=sockdir / "bm")
    att.wait_for(r"--assume-clean: the legs are taken as identical", timeout=10)
    qemu_io(uri, "write -P 0x5a 1M 1M", "flush")
    cp = dst_run("ctl", "--control", str(ctl), "verify", "--json", timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert json.loads(cp.stdout)["differing_bytes"] == 0
    assert "resync started" not in att.output
    assert att.stop() == 0
    att2, _ = m.attach("--assume-clean", bitmap=sockdir / "bm")
    att2.wait_for(r"--assume-clean has no effect", timeout=10)
    assert m.identical()


MULTI_CONN = """
import nbd
uri = {uri!r}
hs = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_multi_conn(), "the front end must advertise CAN_MULTI_CONN"
    hs.append(h)
for rnd in range(20):
    data = bytes([rnd + 1]) * 65536
    off = (rnd * 7 % 32) * 65536
    hs[0].pwrite(data, off)          # written on connection 1
    hs[1].flush()                    # flushed on connection 2
    assert hs[2].pread(65536, off) == data, f"round {{rnd}}: connection 3 read stale data"
for h in hs:
    h.shutdown()
print("coherent")
"""


def test_multi_conn_write_flush_read_on_three_connections(procs: Procs, sockdir: Path) -> None:
    """qemu's multi-conn pattern through a mirror: a write acked on one NBD connection,
    a FLUSH on a second, then a read on a third sees the write (and the flush made it
    durable on both legs' files)."""
    m = Mirror(procs, sockdir)
    att, uri = m.attach(bitmap=sockdir / "bm")
    wait_in_sync(att)
    cp = run([*nbdsh(), "-c", MULTI_CONN.format(uri=uri)], check=False, timeout=120)
    assert cp.returncode == 0 and "coherent" in cp.stdout, cp.stdout + cp.stderr
    for f in m.files:  # after the last flush the legs' files hold the last round
        with open(f, "rb") as fh:
            fh.seek((19 * 7 % 32) * 65536)
            assert fh.read(65536) == bytes([20]) * 65536, f
