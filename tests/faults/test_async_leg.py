"""An asynchronous mirror leg in another "datacenter", on real processes.

Two local export nodes are the synchronous legs; a third sits behind a WAN-emulating
proxy (tests/wan.py: 30 ms each way, optionally a bandwidth limit) and is the
asynchronous leg. The writer must see the local legs' latency, the lag must be reported
and drain, a dead remote node must not slow anything and must catch up when it returns,
the remote image must be crash-consistent when the client node is killed mid-stream
(tests/records.py checks it), and --async-max-lag must bound lag and memory with both
congestion policies.
"""

from __future__ import annotations

import filecmp
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dst.control.client import ControlClient
from tests.faults.test_mirror import qemu_io
from tests.procs import Proc, Procs, dst_run, member_uri, nbdsh, need_tool, run
from tests.records import check as check_records

pytestmark = pytest.mark.integration

MiB = 1 << 20
HERE = Path(__file__).resolve().parent.parent
WAN = HERE / "wan.py"
RECORDS = HERE / "records.py"
RTT = 0.06  # 30 ms each way


class Site:
    """Export nodes a and b (local) and c (remote, behind the WAN proxy), on files."""

    def __init__(
        self,
        procs: Procs,
        tmp: Path,
        *,
        rate: str | None = None,
        size: str = "64M",
        reorder: float = 0.0,
    ) -> None:
        self.procs, self.tmp, self.size = procs, tmp, size
        self.files = [tmp / f"{n}.img" for n in "abc"]
        self.socks = [f"unix:{tmp}/{n}.sock" for n in "abc"]
        self.exports: list[Proc | None] = [None, None, None]
        for i in range(3):
            self.start(i)
        args = ["--listen", str(tmp / "wan.sock"), "--target", self.socks[2][5:]]
        args += ["--delay", str(RTT / 2), *(["--rate", rate] if rate else [])]
        args += ["--reorder", str(reorder)]
        self.wan = procs.start([sys.executable, str(WAN), *args])
        self.wan.wait_for("listening on")
        self.ctl = tmp / "ctl.sock"
        self.bitmap = tmp / "m.bitmap"

    def start(self, i: int) -> None:
        p, _ = self.procs.export(f"file:{self.files[i]}", "--size", self.size, listen=self.socks[i])
        self.exports[i] = p

    def kill(self, i: int) -> None:
        p = self.exports[i]
        assert p is not None
        p.kill()

    def stop(self, i: int) -> None:
        p = self.exports[i]
        assert p is not None
        p.stop()

    @property
    def local(self) -> list[str]:
        return [member_uri(s) for s in self.socks[:2]]

    @property
    def far(self) -> str:
        return f"dst+unix:///default?socket={self.tmp}/wan.sock"

    def attach(self, *args: str) -> tuple[Proc, str]:
        """The mirror of a and b with c asynchronous; the files are new (all zeroes), so
        --assume-clean is true and no first copy crosses the WAN."""
        return self.procs.attach(
            *self.local,
            "--mirror",
            "--async-leg",
            self.far,
            "--bitmap",
            str(self.bitmap),
            "--control",
            str(self.ctl),
            "--assume-clean",
            *args,
        )

    def status(self) -> dict[str, Any]:
        with ControlClient(str(self.ctl)) as c:
            return c.call("status")

    def far_member(self) -> dict[str, Any]:
        return next(m for m in self.status()["members"] if m["uri"] == self.far)

    def wait_far(self, pred: Any, timeout: float = 30.0, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.far_member()
            if pred(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or pred}: {m}")
            time.sleep(0.05)

    def wait_caught_up(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_far(
            lambda m: m["consistent"] and m["lag_bytes"] == 0 and m["state"] == "connected",
            timeout,
            "the async leg to catch up",
        )

    def same(self, i: int, j: int) -> bool:
        return filecmp.cmp(self.files[i], self.files[j], shallow=False)


def qemu_io_args(uri: str, cmds: list[str]) -> list[str]:
    """qemu-io with a write-back cache: its writes carry no FUA, its flushes are barriers
    (qemu-io's default, writethrough, makes every write FUA: a barrier of its own)."""
    args = [need_tool("qemu-io"), "-f", "raw", "-t", "writeback"]
    for c in cmds:
        args += ["-c", c]
    return [*args, uri]


def small_writes(n: int, every: int, base: int = 0) -> list[str]:
    """``n`` 4 KiB writes with a flush after every ``every``: n + n // every waits."""
    cmds = []
    for i in range(n):
        cmds.append(f"write -P {i % 250 + 1} {base + i * 4096} 4k")
        if i % every == every - 1:
            cmds.append("flush")
    return cmds


def timed(uri: str, cmds: list[str]) -> float:
    t0 = time.monotonic()
    cp = run(qemu_io_args(uri, cmds), timeout=120, check=False)
    took = time.monotonic() - t0
    assert cp.returncode == 0 and "failed" not in cp.stdout.lower(), cp.stdout + cp.stderr
    return took


def rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert m, text
    return int(m.group(1)) * 1024


def test_the_writer_sees_local_latency_and_the_lag_is_reported_and_drains(
    procs: Procs, sockdir: Path
) -> None:
    site = Site(procs, sockdir, rate="16M")
    att, uri = site.attach("--metrics", "127.0.0.1:0")
    url = att.wait_for(r"serving metrics on (http://\S+)").group(1)
    first = site.wait_caught_up()
    assert first["mode"] == "async"
    # 300 writes and 30 flushes, one at a time: through a synchronous leg 60 ms away each
    # would wait a round trip (330 x 60 ms = 19.8 s)
    took = timed(uri, small_writes(300, 10))
    assert took < 330 * RTT / 3, f"{took:.1f} s: the writes waited for the far leg"
    # a burst larger than the link carries at once (16 MiB/s): the lag shows, then drains
    burst = subprocess.Popen(
        qemu_io_args(uri, [f"write -P 0x5a {8 * MiB + i * MiB} 1M" for i in range(24)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    most, most_seconds = 0, 0.0
    deadline = time.monotonic() + 30
    while burst.poll() is None and time.monotonic() < deadline:
        m = site.far_member()
        most = max(most, m["lag_bytes"])
        most_seconds = max(most_seconds, m["lag_seconds"])
        time.sleep(0.02)
    out, _ = burst.communicate(timeout=30)
    assert burst.returncode == 0, out
    while time.monotonic() < deadline:
        m = site.far_member()
        most = max(most, m["lag_bytes"])
        most_seconds = max(most_seconds, m["lag_seconds"])
        if m["lag_bytes"] == 0:
            break
        time.sleep(0.02)
    assert most > 0 and most_seconds > 0, "no lag was ever reported"
    done = site.wait_caught_up()
    assert done["async"]["pull_aheads"] == 0 and done["state"] == "connected"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    assert f'dst_async_lag_bytes{{member="{site.far}"}} 0.0' in body, body
    assert f'dst_async_lag_seconds{{member="{site.far}"}}' in body
    assert site.same(0, 2) and site.same(0, 1)


def test_a_killed_remote_node_does_not_slow_the_writer_and_catches_up(
    procs: Procs, sockdir: Path
) -> None:
    site = Site(procs, sockdir)
    cfg = sockdir / "attach.toml"
    cfg.write_text(
        f'members = {site.local!r}\nmirror = true\nasync-legs = ["{site.far}"]\n'
        f'bitmap = "{site.bitmap}"\ncontrol = "{site.ctl}"\nassume-clean = true\n'.replace("'", '"')
    )
    att, uri = procs.attach("--config", str(cfg))
    site.wait_caught_up()
    qemu_io(uri, "write -P 0x11 0 1M", "flush")
    site.kill(2)
    took = timed(uri, small_writes(200, 10, base=4 * MiB))
    assert took < 220 * RTT / 3, f"{took:.1f} s: the writer waited for the dead leg"
    m = site.wait_far(lambda m: m["state"] != "connected", 10, "the far leg to fall behind")
    assert m["consistent"] is False and m["dirty_bytes"] > 0, m
    cp = dst_run("status", "--control", str(site.ctl))
    assert cp.returncode == 1 and "asynchronous" in cp.stdout, cp.stdout
    site.start(2)
    site.wait_caught_up()
    copied = [
        float(n) * {"KiB": 1 << 10, "MiB": MiB}[u]
        for n, u in re.findall(r"resync finished: (\S+) (KiB|MiB) copied", att.output)
    ]
    # only the regions written while it was away (800 KiB in 64 KiB regions), not 64 MiB
    assert copied and copied[-1] <= 2 * MiB, att.output
    qemu_io(uri, "flush")
    site.wait_caught_up()
    assert site.same(0, 2)


@pytest.mark.parametrize("attempt", range(4))
def test_the_far_image_is_crash_consistent_when_the_client_node_is_killed(
    procs: Procs, sockdir: Path, attempt: int
) -> None:
    python = nbdsh()[0]  # Debian's python3, which has libnbd's module
    every = 32
    # requests in flight together reach c in any order, as a concurrent export node may
    # apply them: only the shipper's barriers keep the epochs apart
    site = Site(procs, sockdir, rate="8M", reorder=0.02)
    att, uri = site.attach()
    site.wait_caught_up()
    run_id = random.randrange(1, 1 << 62)
    args = ["--run", str(run_id), "--records", "8000", "--every", str(every), "--depth", "16"]
    writer = subprocess.Popen(
        [python, str(RECORDS), "write", uri, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # let a queue build over the 8 MiB/s link, then kill at a random moment
        site.wait_far(lambda m: m["lag_bytes"] > 2 * MiB, 30, "a queue for the far leg")
        time.sleep(random.uniform(0.0, 1.0))
        before = site.far_member()
        assert before["consistent"] and before["async"]["pull_aheads"] == 0, before
        att.kill()  # kill -9 of the client node, mid-stream
    finally:
        writer.kill()
        out, _ = writer.communicate(timeout=30)
    flushed = [int(n) for n in re.findall(r"flushed (\d+)", out)]
    assert flushed, out
    time.sleep(0.5)  # what was still on the wire reaches c
    site.stop(2)  # c finishes what it received, then the image is read
    ok, why = check_records(str(site.files[2]), run_id, every)
    checker = [sys.executable, str(RECORDS), "check", str(site.files[2])]
    cp = run([*checker, "--run", str(run_id), "--every", str(every)], check=False)
    assert ok and cp.returncode == 0, f"{why} / {cp.stdout}"
    assert "through barrier 0" not in why, f"nothing reached the far leg: {why}"
    # the synchronous legs hold every record acknowledged and flushed
    ok_a, why_a = check_records(str(site.files[0]), run_id, every)
    got = int(re.search(r"records 0\.\.(-?\d+) present", why_a).group(1)) + 1  # type: ignore[union-attr]
    assert ok_a and got >= flushed[-1], why_a
    if attempt == 0:
        # the restarted client node resyncs to c what the lost queue held (activity log)
        site.start(2)
        att2, _ = site.attach()
        att2.wait_for(r"activity log", timeout=10)
        site.wait_caught_up(60)
        assert site.same(0, 2)


@pytest.mark.parametrize("policy", ["pull-ahead", "block"])
def test_the_lag_and_the_memory_stay_under_async_max_lag(
    procs: Procs, sockdir: Path, policy: str
) -> None:
    rate = 8 * MiB
    site = Site(procs, sockdir, rate="8M")
    att, uri = site.attach("--async-max-lag", "4M", "--async-on-congestion", policy)
    site.wait_caught_up()
    qemu_io(uri, *[f"write -P 0x21 {i * MiB} 1M" for i in range(4)])  # warm the buffers
    site.wait_caught_up()
    base = rss(att.pid)
    total = 32 if policy == "pull-ahead" else 24
    writer = subprocess.Popen(
        qemu_io_args(uri, [f"write -P 0x42 {(8 + i) * MiB} 1M" for i in range(total)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    t0 = time.monotonic()
    lag = grown = 0
    states: set[str] = set()
    while writer.poll() is None and time.monotonic() - t0 < 60:
        m = site.far_member()
        lag = max(lag, m["lag_bytes"])
        grown = max(grown, rss(att.pid) - base)
        states.add(m["state"])
        time.sleep(0.02)
    took = time.monotonic() - t0
    out, _ = writer.communicate(timeout=30)
    assert writer.returncode == 0 and "failed" not in out.lower(), out
    assert lag <= 4 * MiB, f"lag reached {lag} bytes"
    # a queue without a bound would hold most of what was written
    assert grown < total * MiB // 2, f"the client node grew by {grown} bytes"
    m = site.far_member()
    if policy == "pull-ahead":
        assert m["async"]["pull_aheads"] >= 1 or "degraded" in states, (m, states)
        assert took < (total * MiB / rate) / 2, f"{took:.1f} s: the writer was held to the link"
    else:
        assert m["async"]["pull_aheads"] == 0 and states == {"connected"}, (m, states)
        least = (total * MiB - 4 * MiB) / rate
        assert took >= least * 0.6, f"{took:.1f} s: the writer did not wait for room"
    site.wait_caught_up(60)
    assert site.same(0, 2)


def test_an_async_leg_added_online_is_synced_then_follows(procs: Procs, sockdir: Path) -> None:
    site = Site(procs, sockdir, size="32M")
    _, uri = procs.attach(
        *site.local, "--mirror", "--bitmap", str(site.bitmap), "--control", str(site.ctl),
        "--assume-clean",
    )  # fmt: skip
    qemu_io(uri, "write -P 0x77 0 4M", "flush")
    cp = dst_run("ctl", "--control", str(site.ctl), "add", "--async", site.far)
    assert cp.returncode == 0 and "as an asynchronous leg" in cp.stdout, cp.stdout + cp.stderr
    site.wait_caught_up(60)  # a full copy first, through the queue
    qemu_io(uri, "write -P 0x78 8M 1M", "flush")
    site.wait_caught_up()
    assert site.same(0, 2)
    cp = dst_run("ctl", "--control", str(site.ctl), "add", "--async")
    assert cp.returncode == 2 and "dst: error:" in cp.stderr, cp.stderr
