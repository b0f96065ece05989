"""What the operator sees, on real nodes: `dst status` (every node by default, link states,
dirty bytes, last errors, redundancy), `dst ctl verify` (progress, summary, exit codes),
`--help`, `--watch` into a pipe, and one unit style in logs and status."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from tests.procs import DST, Proc, Procs, dst_run, member_uri, nbdsh, run

pytestmark = pytest.mark.integration

KiB, MiB = 1 << 10, 1 << 20
FAST = ("--reconnect-min", "0.05", "--reconnect-max", "0.3")
# Python reprs: {'a': 1}, ['a', 'b'], <Foo object at 0x...>
REPR = re.compile(r"\{'[^']*': |\['[^']*'[,\]]|<[A-Za-z_.]+ object at")


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dst: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def no_reprs(*texts: str) -> None:
    for t in texts:
        assert not REPR.search(t), t


def nodes() -> dict[str, dict[str, Any]]:
    """`dst status --json` without --control: every node by name."""
    cp = dst_run("status", "--json", timeout=30)
    assert cp.stdout, cp.stderr
    doc = json.loads(cp.stdout)
    return {n["name"]: n for n in doc["nodes"]}


def the_client() -> dict[str, Any]:
    """The status document of the one client node running."""
    found = [n["status"] for n in nodes().values() if n.get("status", {}).get("role") == "attach"]
    assert len(found) == 1, found
    return found[0]


def wait_client(pred: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = the_client()
        if pred(st):
            return st
        assert time.monotonic() < deadline, json.dumps(st, indent=1)
        time.sleep(0.1)


def member_row(text: str, needle: str) -> str:
    """The members-table row of the member whose URI contains ``needle``."""
    rows = [ln for ln in text.splitlines() if needle in ln and "│" in ln]
    assert rows, text
    return rows[0]


def nbd_write(uri: str, offsets: list[int], length: int = 64 * KiB, byte: int = 0x5A) -> None:
    script = "".join(f"h.pwrite(b'\\x{byte:02x}' * {length}, {o})\n" for o in offsets)
    run([*nbdsh(), "-u", uri, "-c", script], timeout=60)


def mirror(
    procs: Procs, tmp: Path, size: str, *args: str
) -> tuple[list[Proc], list[str], Proc, str]:
    """Two file-backed export nodes and a client node mirroring them (default sockets)."""
    exps, members = [], []
    for name in ("a", "b"):
        p, addr = procs.export(
            f"file:{tmp}/{name}.img", "--size", size, listen=f"unix:{tmp}/{name}.sock"
        )
        exps.append(p)
        members.append(member_uri(addr))
    att, uri = procs.attach(*members, "--mirror", *FAST, *args, nbd=f"unix:{tmp}/vm.sock")
    return exps, members, att, uri


def in_sync(st: dict[str, Any]) -> bool:
    return st["device"].get("sync") == "in-sync" and not st["device"].get("resync")


# ---- every node has a control socket; `dst status` shows them all ----------------------
def test_status_without_control_shows_every_running_node(
    procs: Procs, sockdir: Path, runtime_dir: Path
) -> None:
    cp = dst_run("status")
    assert cp.returncode == 1
    line = error_line(cp.stderr)
    assert "no dst node is running" in line and str(runtime_dir) in line

    e1, a1 = procs.export(
        f"file:{sockdir}/a.img", "--size", "8M", listen=f"unix:{sockdir}/leg1.sock"
    )
    e2, a2 = procs.export("memory:8M", listen="127.0.0.1:0")  # a picked port: named by pid
    att, _ = procs.attach(member_uri(a1), nbd=f"unix:{sockdir}/vm1.sock")
    (sockdir / "other").mkdir()
    att2, _ = procs.attach(
        member_uri(a2), "--client-id", "two", nbd=f"unix:{sockdir}/other/vm1.sock"
    )
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(runtime_dir / "export-gone.sock"))  # what a killed node leaves behind
    stale.close()
    explicit = sockdir / "own.ctl"
    e3, _ = procs.export("memory:1M", "--control", str(explicit), listen=f"unix:{sockdir}/e3.sock")

    want = {
        "export-leg1": e1.pid,
        f"export-pid{e2.pid}": e2.pid,
        "attach-vm1": att.pid,
        f"attach-vm1-pid{att2.pid}": att2.pid,  # the name was taken by a live node
    }
    sockets = {p.name for p in runtime_dir.iterdir()}
    assert sockets == {f"{n}.sock" for n in want} | {"export-gone.sock"}
    assert all(
        os.stat(runtime_dir / s).st_mode & 0o777 == 0o600 for s in sockets - {"export-gone.sock"}
    )
    assert os.stat(runtime_dir).st_mode & 0o777 == 0o700

    found = nodes()
    assert set(found) == set(want), found.keys()  # the stale socket is skipped, not an error
    for name, pid in want.items():
        st = found[name]["status"]
        assert st["pid"] == pid and found[name]["control"] == str(runtime_dir / f"{name}.sock")
        assert st["role"] == ("attach" if name.startswith("attach-") else "export")
    cp = dst_run("status")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    for name in want:
        assert name in cp.stdout
    assert "export-gone" not in cp.stdout
    assert cp.stdout.count("client node (pid") == 2 and cp.stdout.count("export node (pid") == 2
    no_reprs(cp.stdout, cp.stderr)

    cp = dst_run("status", "--control", str(explicit), "--json")  # --control still wins
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["role"] == "export" and doc["pid"] == e3.pid and "nodes" not in doc

    cp = dst_run("ctl", "set", "resends=3")  # two client nodes: which one is meant?
    assert cp.returncode == 2 and "choose one with --control" in error_line(cp.stderr)
    assert att2.stop() == 0
    cp = dst_run("ctl", "set", "resends=3")  # one client node: that one
    assert cp.returncode == 0 and "resends = 3" in cp.stdout, cp.stderr
    assert the_client()["settings"]["resends"] == 3

    for p in (att, e1, e2, e3):  # att2 stopped above, before e2
        assert p.stop() == 0
    assert {p.name for p in runtime_dir.iterdir()} == {"export-gone.sock"}
    cp = dst_run("status", "--json")
    assert cp.returncode == 1 and "no dst node is running" in error_line(cp.stderr)


# ---- link state: stalled and reconnecting links are not "connected" ---------------------
def test_a_link_whose_requests_wait_or_that_reconnects_is_not_shown_connected(
    procs: Procs, sockdir: Path
) -> None:
    exp, addr = procs.export(
        f"file:{sockdir}/d.img", "--size", "8M", listen=f"unix:{sockdir}/e.sock"
    )
    att, uri = procs.attach(
        member_uri(addr),
        "--resend-timeout",
        "0.5",
        "--resends",
        "100",
        "--ping-interval",
        "60",
        *FAST,
    )
    assert dst_run("status").returncode == 0
    exp.signal(signal.SIGSTOP)  # the connection stays up, nothing is answered
    writer = subprocess.Popen(
        [*nbdsh(), "-u", uri, "-c", "h.pwrite(b'w' * 65536, 0)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        st = wait_client(lambda s: s["members"][0]["link_state"] == "stalled")
        m = st["members"][0]
        assert m["state"] == "connected"  # the contract's state; the link says why it is not well
        assert m["waiting"] >= 1 and m["waiting_seconds"] > 0.5 and m["in_flight"] >= 1
        cp = dst_run("status")
        assert cp.returncode == 1, cp.stdout
        row = member_row(cp.stdout, "e.sock")
        assert "stalled" in row and "connected" not in row, row
        assert re.search(r"\d+ waiting \d", row), row
        assert "export-e  " in cp.stdout and "does not answer" in cp.stdout  # it is stopped
        cp = dst_run("status", "--json")
        assert cp.returncode == 1
        assert "did not answer within" in {n["name"]: n for n in json.loads(cp.stdout)["nodes"]}[
            "export-e"
        ].get("error", "")
    finally:
        exp.signal(signal.SIGCONT)
    out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, out + err
    wait_client(lambda s: s["members"][0]["link_state"] == "connected")
    assert dst_run("status").returncode == 0

    exp.kill()
    st = wait_client(lambda s: s["members"][0]["state"] == "reconnecting")
    m = st["members"][0]
    assert m["last_error"] and time.time() - 30 < m["last_error_at"] <= time.time()
    assert m["state_since"] <= time.time()
    cp = dst_run("status")
    assert cp.returncode == 1
    row = member_row(cp.stdout, "e.sock")
    assert "reconnecting for" in row and " connected" not in row, row
    assert re.search(r"member 1 last error at \d\d:\d\d:\d\d \([^)]+ ago\): \S", cp.stdout), (
        cp.stdout
    )
    no_reprs(cp.stdout, cp.stderr, att.output)
    assert dst_run("ctl", "set", "resends=0").returncode == 0  # a short budget for the last flush
    assert att.stop() == 0


# ---- a mirror: dirty bytes, why degraded, last error; no redundancy ---------------------
def test_mirror_status_shows_dirty_bytes_why_degraded_and_redundancy(
    procs: Procs, sockdir: Path
) -> None:
    exps, members, att, uri = mirror(
        procs, sockdir, "16M", "--resends", "1", "--resend-timeout", "0.5", "--leg-timeout", "1"
    )
    st = wait_client(in_sync, 30)
    assert st["device"]["legs"] == 2 and st["device"]["redundancy"] == 1
    cp = dst_run("status")
    assert cp.returncode == 0 and "redundancy: 2 of 2 legs in sync" in cp.stdout, cp.stdout

    exps[1].kill()
    nbd_write(uri, [0, 4 * MiB, 8 * MiB])  # waits out leg b's budget, then goes on without it
    st = wait_client(lambda s: s["members"][1]["state"] == "degraded")
    b = st["members"][1]
    assert b["dirty_bytes"] == 3 * 64 * KiB  # three writes, each one 64 KiB bitmap region
    assert b["sync"] == "degraded" and b["reason"] and b["sync_since"] <= time.time()
    assert b["last_error"] and b["last_error_at"] <= time.time()
    assert b["link_state"] in ("reconnecting", "connecting")
    assert st["device"]["legs_in_sync"] == 1 and st["device"]["redundancy"] == 0
    cp = dst_run("status")
    assert cp.returncode == 1
    row = member_row(cp.stdout, "b.sock")
    assert "degraded" in row and "192 KiB" in row and "connected" not in row, row
    assert "0 B" in member_row(cp.stdout, "a.sock")
    assert re.search(r"member 2 degraded since \d\d:\d\d:\d\d \(.* ago\): \S", cp.stdout), cp.stdout
    assert re.search(r"member 2 last error at \d\d:\d\d:\d\d \(.* ago\): \S", cp.stdout)
    assert "no redundancy: 1 of 2 legs in sync" in cp.stdout
    no_reprs(cp.stdout, cp.stderr)

    cp = dst_run("ctl", "verify")  # one in-sync leg: nothing to compare it with
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "nothing compared" in cp.stdout and "1 in-sync leg" in cp.stdout

    cp = dst_run("ctl", "detach", members[1])
    assert cp.returncode == 0 and cp.stdout.startswith(f"detached {members[1]}"), cp.stdout
    st = the_client()
    assert [m["uri"] for m in st["members"]] == [members[0]] and st["device"]["legs"] == 1
    cp = dst_run("status")
    assert cp.returncode == 0 and "no redundancy: a one-leg mirror" in cp.stdout, cp.stdout
    cp = dst_run("ctl", "verify", "--json")
    assert cp.returncode == 1 and json.loads(cp.stdout)["legs"] == [members[0]]
    no_reprs(cp.stdout, cp.stderr, att.output)


# ---- dst ctl verify: progress, summary, exit codes ------------------------------------
def on_a_terminal(args: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run ``dst ARGS`` with a 120-column pseudo-terminal as stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([*DST, *args], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal's other side closed: the process ended
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    return rc, out.decode(errors="replace")


def test_ctl_verify_shows_progress_and_a_summary_and_exits_1_when_legs_differ(
    procs: Procs, sockdir: Path
) -> None:
    _, members, att, uri = mirror(procs, sockdir, "32M")
    wait_client(in_sync, 60)
    nbd_write(uri, [0, 5 * MiB, 20 * MiB], length=256 * KiB)

    cp = dst_run("ctl", "verify")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert re.search(r"verify: compared 32 MiB of 2 legs in \d", cp.stdout), cp.stdout
    assert "the legs are identical" in cp.stdout
    assert f"leg 1: {members[0]}" in cp.stdout and f"leg 2: {members[1]}" in cp.stdout

    rc, out = on_a_terminal(["ctl", "verify", "--rate", "12M"])  # about 3 s: progress shows
    assert rc == 0, out
    percents = {int(p) for p in re.findall(r"(\d+)%", out)}
    assert percents & set(range(1, 100)), out  # a bar that moved, not only 0% and 100%
    assert "━" in out and re.search(r"\d+(\.\d)? MiB of 32 MiB", out), out
    assert "the legs are identical" in out

    with open(sockdir / "b.img", "r+b") as f:  # silent damage on leg b behind the mirror
        f.seek(5 * MiB + 100)
        f.write(b"rot" * 100)
    cp = dst_run("ctl", "verify")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "the legs DIFFER: 64 KiB in 1 region(s)" in cp.stdout, cp.stdout
    assert f"at 5 MiB (5242880), 64 KiB: {members[1]}" in cp.stdout
    assert f"reference: {members[0]}" in cp.stdout and "verify --repair" in cp.stdout
    cp = dst_run("ctl", "verify", "--json")
    assert cp.returncode == 1
    report = json.loads(cp.stdout)
    assert report["differing_bytes"] == 64 * KiB
    assert report["regions"] == [{"offset": 5 * MiB, "length": 64 * KiB, "legs": [members[1]]}]
    cp = dst_run("ctl", "verify", "--rate", "fast")
    assert cp.returncode == 2 and "--rate" in error_line(cp.stderr)
    no_reprs(cp.stdout, att.output)


# ---- --help ------------------------------------------------------------------------------
def test_help_lists_commands_defaults_and_algorithm_names() -> None:
    ctl = dst_run("ctl", "--help")
    assert ctl.returncode == 0, ctl.stderr
    for cmd in (
        "set KEY=VALUE",
        "verify [--rate RATE] [--repair] [--json]",
        "detach URI",
        "add URI",
    ):
        assert cmd in ctl.stdout, ctl.stdout
    for sub in ("set", "verify", "detach", "add"):
        cp = dst_run("ctl", sub, "--help")
        assert cp.returncode == 0 and f"usage: dst ctl {sub}" in cp.stdout, cp.stdout + cp.stderr

    ciphers = "aes-256-gcm, chacha20-poly1305, none"
    checksums = "crc32c, xxh3, blake2b, sha256, none"
    for role, defaults in [
        ("attach", ["(default: 10)", "(default: 5)", "(default: 64K)", "default: unlimited"]),
        ("export", ["(default: 0.0.0.0:10810)", "default: aes-256-gcm with --key-file"]),
    ]:
        cp = dst_run(role, "--help")
        text = " ".join(cp.stdout.split())  # argparse wraps lines
        assert cp.returncode == 0 and ciphers in text and checksums in text, text
        for d in defaults:
            assert d in text, (role, d, text)
        assert f"{role}-" in text and "default: one per CPU" in text
    demo = " ".join(dst_run("demo", "--help").stdout.split())
    assert "--debug [LIST] log everything" in demo and "(default: 64M)" in demo, demo
    status = " ".join(dst_run("status", "--help").stdout.split())
    assert "default: every node in" in status and "default: 2" in status, status
    top = dst_run("--help").stdout
    for cmd in ("export", "attach", "demo", "status", "ctl", "keygen", "bench"):
        assert cmd in top


# ---- --watch into a pipe -------------------------------------------------------------------
def test_watch_into_a_pipe_prints_one_snapshot_per_interval(procs: Procs, sockdir: Path) -> None:
    _, addr = procs.export("memory:4M", listen=f"unix:{sockdir}/e.sock")
    procs.attach(member_uri(addr))
    w = procs.dst("status", "--watch=0.3")  # its output goes to a file: no terminal
    deadline = time.monotonic() + 20
    while w.output.count("client node (pid") < 4:
        assert time.monotonic() < deadline and w.popen.poll() is None, w.output
        time.sleep(0.05)
    w.signal(signal.SIGINT)
    assert w.wait(10) == 0
    snapshots = w.output.count("client node (pid")
    stamps = re.findall(r"^─* ?(\d\d:\d\d:\d\d) ─", w.output, re.M)
    assert snapshots >= 4 and len(stamps) >= snapshots, w.output  # whole snapshots, each stamped
    assert w.output.count("export node (pid") == snapshots
    assert "\x1b[" not in w.output  # no cursor movement or colour into a file


# ---- one unit style in logs and status -------------------------------------------------------
UNIT = re.compile(r"(\d+(?:\.\d+)?) ?([KMGT]i?B|B|[kKMG]B)/s")


def rates(text: str) -> list[tuple[str, str]]:
    return UNIT.findall(text)


def test_one_unit_style_in_the_log_and_in_status(procs: Procs, sockdir: Path) -> None:
    """A rate-limited resync long enough to log its progress (every 5 s): every rate the
    log and `dst status` print is binary units, the largest unit below 1024, one decimal."""
    (sockdir / "a.img").write_bytes(os.urandom(16 << 20))  # data: zeroes are not rate-limited
    _, _, att, _ = mirror(procs, sockdir, "16M", "--resync-rate", "1700K")
    st = wait_client(lambda s: (s["device"].get("resync") or {}).get("bytes_done", 0) > 0, 20)
    cp = dst_run("status")
    assert "device resync" in cp.stdout and "resync-rate 1.7 MiB/s" in cp.stdout, cp.stdout
    att.wait_for(r"resync finished: 16 MiB copied", timeout=40)
    log = att.output
    assert re.search(r"resync started \(.*\): 16 MiB to copy from .* at up to 1\.7 MiB/s", log), log
    progress = re.findall(r"resync \d+\.\d% \((.*?)\), (.*?), (.*?) left", log)
    assert progress, log  # at least one progress line: 16 MiB at 1.7 MiB/s takes 9 s
    found = rates(log) + rates(cp.stdout)
    assert len(found) >= 3, (log, cp.stdout)
    for number, unit in found:
        assert unit in ("B", "KiB", "MiB", "GiB", "TiB"), (number, unit)
        assert float(number) < 1024 and re.fullmatch(r"\d+(\.\d)?", number), (number, unit)
    assert st["settings"]["resync_rate"] == 1700 * KiB  # bytes per second in the JSON
    no_reprs(log, cp.stdout)
