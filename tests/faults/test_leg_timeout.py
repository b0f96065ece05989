"""A dead mirror leg does not stall the writers: --leg-timeout on real processes.

A leg whose export node is killed is waited for at most --leg-timeout after the other leg
acked; then it is degraded and later writes skip it; when it is back, only what was
written meanwhile is copied.  A leg that answers within the timeout is never degraded.
A write given up on a degraded leg never lands over what its resync wrote.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.test_mirror import Mirror, qemu_io, wait_in_sync
from tests.integration.test_control import status
from tests.procs import Procs, dst_run, need_tool
from tests.proxy import FaultProxy

pytestmark = pytest.mark.integration

MiB = 1 << 20
LEG_TIMEOUT = 5.0  # the default
MARGIN = 4.0  # process start-up of qemu-io and scheduling on a loaded machine


def timed_write(uri: str, pattern: int, offset: int, length: str) -> float:
    t0 = time.monotonic()
    qemu_io(uri, f"write -P {pattern:#x} {offset} {length}")
    return time.monotonic() - t0


def leg_states(sock: Path) -> dict[str, str]:
    st = status(sock)
    return {m["uri"]: m["state"] for m in st["members"]}


def test_killed_leg_costs_one_leg_timeout_then_nothing(procs: Procs, sockdir: Path) -> None:
    """The defaults (--resends 10 --resend-timeout 5): without a leg timeout the first
    write after the kill would wait 55 s."""
    m = Mirror(procs, sockdir)
    ctl = sockdir / "ctl.sock"
    att, uri = m.attach("--control", str(ctl), bitmap=sockdir / "bm")
    wait_in_sync(att)
    timed_write(uri, 0x11, 0, "8M")
    m.kill(1)
    first = timed_write(uri, 0x22, 16 * MiB, "8M")
    assert first < LEG_TIMEOUT + MARGIN, f"the first write took {first:.1f} s"
    assert first > LEG_TIMEOUT - 1, f"{first:.1f} s: the leg was given up before its timeout"
    att.wait_for(r"b\.sock: degraded: no ack for a write within --leg-timeout 5 s", timeout=5)
    later = [timed_write(uri, 0x33 + i, (32 + 8 * i) * MiB, "8M") for i in range(3)]
    assert max(later) < MARGIN, f"later writes took {later} s: they waited for the dead leg"
    states = leg_states(ctl)
    assert states[m.members[1]] == "degraded", states
    assert states[m.members[0]] == "connected", states
    m.start(1)
    copied = wait_in_sync(att, 2)[1]
    # written while b was away: 8 MiB at 16M and 3 x 8 MiB from 32M
    assert 0 < copied <= 32 * MiB, f"resync copied {copied} bytes, more than the dirty 32 MiB"
    qemu_io(uri, "flush")
    assert m.identical()


def test_a_two_second_stop_of_a_leg_degrades_nothing(procs: Procs, sockdir: Path) -> None:
    """A leg that answers within --leg-timeout (its export node stopped for 2 s) only
    delays the writes it takes: it is never degraded and needs no resync."""
    m = Mirror(procs, sockdir)
    att, uri = m.attach(bitmap=sockdir / "bm")
    wait_in_sync(att)
    exp = m.exports[1]
    assert exp is not None
    writer = subprocess.Popen(
        [
            need_tool("qemu-io"),
            "-f",
            "raw",
            *[x for i in range(40) for x in ("-c", f"write -P {i + 1} {i * MiB} 1M")],
            uri,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(0.2)
    os.kill(exp.popen.pid, signal.SIGSTOP)
    time.sleep(2.0)
    os.kill(exp.popen.pid, signal.SIGCONT)
    out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and "failed" not in out.lower(), out
    qemu_io(uri, "flush")
    assert "degraded" not in att.output, att.output
    assert att.output.count("resync started") == 1  # only the first start's
    assert m.identical()


def test_a_write_given_up_on_a_leg_never_lands_over_its_resync(procs: Procs, sockdir: Path) -> None:
    """Leg b's copy of a write is held in the network past --leg-timeout, so b is
    degraded; the block is rewritten on a; b comes back and is resynced; then the held
    write is delivered on b's old connection.  It must not land: b's export node fenced
    that connection when b reconnected."""
    m = Mirror(procs, sockdir)
    proxy = FaultProxy(m.socks[1][5:], sockdir)
    proxy.keep_server_side = True
    try:
        att, uri = procs.attach(
            m.members[0],
            proxy.uri,
            "--mirror",
            "--bitmap",
            str(sockdir / "bm"),
            "--leg-timeout",
            "2",
        )
        wait_in_sync(att)
        proxy.hold_write_at = 4 * MiB
        took = timed_write(uri, 0xAA, 4 * MiB, "64k")
        assert took < 2 + MARGIN
        assert proxy.held_frames, "the proxy never held the write"
        att.wait_for(r"degraded: no ack for a write within --leg-timeout 2 s", timeout=5)
        qemu_io(uri, "write -P 0xbb 4M 64k", "flush")
        wait_in_sync(att, 2)  # b reconnected (a new connection) and was resynced
        proxy.release_held()  # the old write reaches b's export node on its old connection
        time.sleep(1.0)
        qemu_io(uri, "flush", "read -P 0xbb 4M 64k")
        for f in m.files:
            with open(f, "rb") as fh:
                fh.seek(4 * MiB)
                assert fh.read(64 << 10) == b"\xbb" * (64 << 10), f
        assert m.identical()
    finally:
        proxy.close()


def test_the_last_leg_keeps_the_transaction_budget(procs: Procs, sockdir: Path) -> None:
    """With one leg left, the leg timeout does not apply: a write waits for it within the
    transaction budget and succeeds when it comes back (a short outage never reaches the
    filesystem)."""
    m = Mirror(procs, sockdir)
    att, uri = m.attach(
        *("--leg-timeout", "1", "--resends", "10", "--resend-timeout", "1"),
        *("--reconnect-min", "0.05", "--reconnect-max", "0.3"),
        bitmap=sockdir / "bm",
    )
    wait_in_sync(att)
    m.kill(1)
    timed_write(uri, 0x44, 0, "1M")
    att.wait_for(r"b\.sock: degraded", timeout=5)
    m.kill(0)
    writer = subprocess.Popen(
        [need_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x55 2M 1M", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(3.0)  # longer than the leg timeout, inside the 11 s budget
    assert writer.poll() is None, "the write on the last leg ended before its budget"
    m.start(0)
    out, _ = writer.communicate(timeout=30)
    assert writer.returncode == 0 and "failed" not in out.lower(), out
    assert "a.sock: degraded" not in att.output


def test_the_leg_timeout_is_a_live_knob(procs: Procs, sockdir: Path) -> None:
    """`dst ctl set leg-timeout=S` changes it on a running mirror; a wrong value is refused."""
    m = Mirror(procs, sockdir)
    ctl = sockdir / "ctl.sock"
    att, _ = m.attach("--control", str(ctl), "--leg-timeout", "3")
    assert status(ctl)["device"]["leg_timeout"] == 3.0
    cp = dst_run("ctl", "--control", str(ctl), "set", "leg-timeout=1.5")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert status(ctl)["device"]["leg_timeout"] == 1.5
    att.wait_for(r"leg timeout 1.5 s", timeout=5)
    bad = dst_run("ctl", "--control", str(ctl), "set", "leg-timeout=0")
    assert bad.returncode != 0 and "leg-timeout" in bad.stderr, bad.stderr
    assert status(ctl)["device"]["leg_timeout"] == 1.5
