"""The control socket, `dst status` and `dst ctl` against running export and client nodes."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Proc, Procs, dst_run, member_uri, nbdsh, run

pytestmark = pytest.mark.integration

KiB = 1 << 10
WRITES, WRITE_LEN = 12, 4 * KiB
READS, READ_LEN = 5, 8 * KiB
FAST = ("--reconnect-min", "0.05", "--reconnect-max", "0.3")


def status(sock: Path) -> dict[str, Any]:
    cp = dst_run("status", "--control", str(sock), "--json", timeout=20)
    assert cp.stdout, cp.stderr
    return json.loads(cp.stdout)  # type: ignore[no-any-return]


def wait_status(sock: Path, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Poll `dst status --json` until ``pred(status)``; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(sock)
        if pred(st):
            return st
        assert time.monotonic() < deadline, json.dumps(st, indent=1)
        time.sleep(0.1)


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dst: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def workload(uri: str) -> None:
    """WRITES writes and READS reads, nothing else: libnbd sends no flush on close."""
    script = (
        f"for i in range({WRITES}): h.pwrite(bytes([i + 1]) * {WRITE_LEN}, i * {WRITE_LEN})\n"
        f"for i in range({READS}): h.pread({READ_LEN}, i * {READ_LEN})\n"
    )
    run([*nbdsh(), "-u", uri, "-c", script], timeout=30)


def start_nodes(
    procs: Procs, tmp: Path, *attach_args: str, export_args: tuple[str, ...] = ()
) -> tuple[Proc, Proc, str, Path, Path]:
    """Export + client node, both with a control socket; returns procs, NBD URI, sockets."""
    ectl, actl = tmp / "e.ctl", tmp / "a.ctl"
    exp, addr = procs.export(
        f"file:{tmp}/d.img",
        "--size",
        "16M",
        "--control",
        str(ectl),
        *export_args,
        listen=f"unix:{tmp}/e.sock",
    )
    att, uri = procs.attach(
        member_uri(addr), "--client-id", "ops-test", "--control", str(actl), *attach_args
    )
    return exp, att, uri, ectl, actl


def test_status_reflects_a_known_workload(procs: Procs, sockdir: Path) -> None:
    exp, _, uri, ectl, actl = start_nodes(procs, sockdir)
    workload(uri)

    a = status(actl)
    assert a["role"] == "attach"
    (m,) = a["members"]
    assert m["state"] == "connected" and m["uri"].startswith("dst+unix:///default")
    assert m["requests"]["write"] == WRITES and m["requests"]["read"] == READS
    assert m["requests"]["flush"] == 0
    assert m["bytes_written"] == WRITES * WRITE_LEN and m["bytes_read"] == READS * READ_LEN
    assert m["completed"] == WRITES + READS and m["in_flight"] == 0
    assert m["resends"] == 0 and m["failed"] == 0 and m["checksum_errors"] == 0
    assert m["generation"] == 1
    assert m["latency"]["write"]["count"] == WRITES
    assert 0 < m["latency"]["write"]["p50"] <= m["latency"]["write"]["p99"]
    assert a["device"]["size"] == 16 << 20 and a["device"]["layout"] == "single"
    assert a["settings"]["client_id"] == "ops-test" and a["settings"]["resends"] == 10
    (nbd,) = a["frontends"]
    assert nbd["kind"] == "nbd" and nbd["requests"]["write"] == WRITES

    e = status(ectl)
    assert e["role"] == "export" and e["enospc"] == 0 and e["warnings"] == []
    (x,) = e["exports"]
    identity = exp.wait_for(r"identity ([0-9a-f-]{36})").group(1)
    assert x["name"] == "default" and x["identity"] == identity and x["size"] == 16 << 20
    assert x["statistics"]["writes"] == WRITES and x["statistics"]["reads"] == READS
    assert x["statistics"]["bytes_written"] == WRITES * WRITE_LEN
    assert x["statistics"]["bytes_read"] == READS * READ_LEN
    assert x["filesystem"]["size"] > 0 and 0 <= x["filesystem"]["used_percent"] <= 100
    (s,) = e["sessions"]
    assert s["client_id"] == "ops-test" and s["connected"] and s["export"] == "default"
    assert s["requests"] == WRITES + READS and s["bytes_written"] == WRITES * WRITE_LEN
    assert s["since"] <= time.time()


def test_status_tables_and_exit_codes(procs: Procs, sockdir: Path) -> None:
    # a short budget, so the final flush of the orphaned client node fails fast
    exp, att, uri, ectl, actl = start_nodes(
        procs, sockdir, *FAST, "--resends", "1", "--resend-timeout", "0.5"
    )
    workload(uri)
    cp = dst_run("status", "--control", str(actl))
    assert cp.returncode == 0, cp.stderr
    for needle in ("client node", "members", "connected", "requests", "latency", "e.sock"):
        assert needle in cp.stdout, cp.stdout
    cp = dst_run("status", "--control", str(ectl))
    assert cp.returncode == 0, cp.stderr
    identity = exp.wait_for(r"identity ([0-9a-f-]{36})").group(1)
    for needle in ("export node", "exports", "sessions", "ops-test", identity, "fs used"):
        assert needle in cp.stdout, cp.stdout

    exp.kill()  # the member is no longer connected: exit 1, the JSON says why
    st = wait_status(actl, lambda s: s["members"][0]["state"] != "connected")
    assert st["members"][0]["state"] in ("reconnecting", "connecting")
    cp = dst_run("status", "--control", str(actl), "--json")
    assert cp.returncode == 1 and json.loads(cp.stdout)["members"][0]["state"] != "connected"

    cp = dst_run("status", "--control", str(sockdir / "nothing.sock"))
    assert cp.returncode == 1
    assert "cannot reach the control socket" in error_line(cp.stderr)
    cp = dst_run("status", "--control", str(actl), "--watch=0")
    assert cp.returncode == 2 and "--watch" in error_line(cp.stderr)
    cp = dst_run("status")  # these nodes have their sockets elsewhere: none runs by default
    assert cp.returncode == 1 and "no dst node is running" in error_line(cp.stderr)
    assert att.stop() == 0


def test_watch_refreshes_until_interrupted(procs: Procs, sockdir: Path) -> None:
    _, _, _, _, actl = start_nodes(procs, sockdir)
    w = procs.dst("status", "--control", str(actl), "--json", "--watch=0.2")
    deadline = time.monotonic() + 10
    while w.output.count('"role": "attach"') < 3:
        assert time.monotonic() < deadline and w.popen.poll() is None, w.output
        time.sleep(0.05)
    w.signal(2)
    assert w.wait(10) == 0
    docs = [json.loads(ln) for ln in w.output.splitlines() if ln.startswith("{")]
    assert len(docs) >= 3 and all(d["members"][0]["state"] == "connected" for d in docs)


def test_control_socket_is_private_reused_when_stale_and_removed_at_stop(
    procs: Procs, sockdir: Path
) -> None:
    ctl = sockdir / "a.ctl"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(ctl))  # what a killed node leaves: a socket file nobody answers on
    stale.close()
    exp, att, _, _, actl = start_nodes(procs, sockdir)
    assert actl == ctl
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
    assert status(ctl)["role"] == "attach"

    other = procs.dst(
        "export", "--listen", f"unix:{sockdir}/e2.sock", "memory:1M", "--control", str(ctl)
    )
    assert other.wait(20) == 1
    assert "address in use" in error_line(other.output)

    assert att.stop() == 0 and exp.stop() == 0
    assert not ctl.exists() and not (sockdir / "e.ctl").exists()


def test_protocol_messages(procs: Procs, sockdir: Path) -> None:
    _, _, _, _, actl = start_nodes(procs, sockdir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(actl))
        f = s.makefile("rwb")

        def ask(line: bytes) -> dict[str, Any]:
            f.write(line + b"\n")
            f.flush()
            return json.loads(f.readline())  # type: ignore[no-any-return]

        assert ask(b'{"cmd": "help"}')["result"]["commands"] == [
            "add",
            "checkpoint",
            "detach",
            "help",
            "set",
            "status",
            "verify",
        ]
        r = ask(b'{"cmd": "status", "id": 7}')
        assert r["ok"] and r["id"] == 7 and r["result"]["role"] == "attach"
        r = ask(b'{"cmd": "frobnicate"}')
        assert not r["ok"] and "unknown command 'frobnicate'" in r["error"]
        r = ask(b"not json")
        assert not r["ok"] and "not JSON" in r["error"]
        r = ask(b'["status"]')
        assert not r["ok"] and '"cmd"' in r["error"]
        r = ask(b'{"cmd": "set", "key": "resends", "value": -1}')
        assert not r["ok"] and "invalid resends" in r["error"]
        r = ask(b'{"cmd": "set", "key": "ping-interval", "value": "0.5"}')
        assert r["ok"] and r["result"]["value"] == 0.5


def test_ctl_set_changes_the_budget_of_the_next_outage(procs: Procs, sockdir: Path) -> None:
    exp, att, uri, _, actl = start_nodes(procs, sockdir, *FAST)
    workload(uri)
    cp = dst_run("ctl", "--control", str(actl), "set", "resend-timeout=0.4", "resends=1")
    assert cp.returncode == 0, cp.stderr
    assert "resend-timeout = 0.4" in cp.stdout and "resends = 1" in cp.stdout
    st = status(actl)
    assert st["settings"]["resend_timeout"] == 0.4 and st["settings"]["resends"] == 1

    exp.kill()  # with the defaults (10 resends x 5 s) this write would wait 55 s
    t0 = time.monotonic()
    cp = run([*nbdsh(), "-u", uri, "-c", "h.pwrite(b'x' * 4096, 0)"], check=False, timeout=30)
    elapsed = time.monotonic() - t0
    assert cp.returncode != 0 and "Input/output error" in cp.stderr, cp.stderr
    assert elapsed < 4.0, f"the write failed after {elapsed:.1f} s; the new budget is 0.8 s"
    att.wait_for(r"no ack within 0\.8 s \(2 timeouts of --resend-timeout 0\.4 with --resends 1", 5)
    st = status(actl)
    assert st["members"][0]["failed"] == 1 and st["members"][0]["timeouts"] >= 2


def test_ctl_usage_and_refusals(procs: Procs, sockdir: Path) -> None:
    _, _, _, ectl, actl = start_nodes(procs, sockdir)
    ctl = ["ctl", "--control", str(actl)]
    for words, code, needle in [
        (["set", "frob=1"], 2, "unknown setting 'frob'; live settings are: resends,"),
        (["set", "resends=many"], 2, "invalid resends 'many'"),
        (["set", "resend-timeout=0"], 2, "greater than 0"),
        (["set", "resend-timeout"], 2, "write KEY=VALUE"),
        (["frobnicate"], 2, "unknown ctl command 'frobnicate'"),
        (["detach"], 2, "takes one member URI"),
        (["add", "http://x/y"], 2, "invalid member"),
        (["set", "resync-rate=10M"], 1, "resync-rate needs a mirror"),
        (["verify"], 1, "verify needs a mirror"),
        (["detach", "dst://node9/default"], 1, "detach needs a mirror"),
        (["add", "dst://node9/default"], 1, "add needs a mirror"),
    ]:
        cp = dst_run(*ctl, *words)
        assert cp.returncode == code, (words, cp.returncode, cp.stderr)
        assert needle in error_line(cp.stderr), (words, cp.stderr)
    cp = dst_run("ctl", "--control", str(ectl), "set", "resends=3")
    assert cp.returncode == 1 and "export node" in error_line(cp.stderr)
    cp = dst_run("ctl", "--control", str(sockdir / "none.sock"), "set", "resends=3")
    assert cp.returncode == 1 and "cannot reach the control socket" in error_line(cp.stderr)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    cp = run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False)
    return cp.returncode == 0


def test_enospc_from_a_thin_file_reaches_the_writer_and_is_counted(
    procs: Procs, sockdir: Path
) -> None:
    mnt = sockdir / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "2M"):
        pytest.skip("needs root to mount a 2 MiB tmpfs (a filesystem smaller than the export)")
    try:
        (mnt / "filler").write_bytes(b"\xff" * (1900 << 10))  # 93% used before the export starts
        ectl, actl = sockdir / "e.ctl", sockdir / "a.ctl"
        exp, addr = procs.export(f"file:{mnt}/thin.img", "--size", "16M", "--control", str(ectl))
        exp.wait_for(
            r"WARNING export 'default': the filesystem under \S+thin.img is 9\d(\.\d)?% full"
        )
        _, uri = procs.attach(member_uri(addr), "--control", str(actl))
        script = (
            "import errno\n"
            "try:\n"
            "    for i in range(16): h.pwrite(b'\\xab' * 262144, i * 262144)\n"
            "except nbd.Error as e:\n"
            "    print('errno', e.errno)\n"
        )
        cp = run([*nbdsh(), "-u", uri, "-c", script], timeout=30)
        assert cp.stdout.strip() == "errno ENOSPC", cp.stdout + cp.stderr  # not EIO
        e = status(ectl)
        assert e["enospc"] >= 1
        assert e["exports"][0]["filesystem"]["used_percent"] >= 90
        assert any("ENOSPC" in w and "full" in w for w in e["warnings"]), e["warnings"]
        a = status(actl)
        assert a["members"][0]["errors"] >= 1 and a["members"][0]["state"] == "connected"
        cp = dst_run("status", "--control", str(ectl))
        assert "warning:" in cp.stdout and cp.returncode == 0
    finally:
        procs.stop_all()
        run(["umount", "-l", str(mnt)], check=False)


def test_mirror_commands_through_the_control_socket(sockdir: Path) -> None:
    """`dst attach --mirror` wiring aside: the handlers against a real mirror, over the socket."""
    import asyncio

    from dst.backends import open_device
    from dst.control.client import ControlError, request
    from dst.control.handlers import AttachControl
    from dst.control.render import render
    from dst.control.server import ControlServer
    from dst.layers import FaultDevice, MirrorDevice
    from dst.metrics import render as metrics_text
    from tests.model import until

    path = str(sockdir / "m.ctl")

    async def main() -> None:
        async def make_member(uri: str) -> FaultDevice:
            return FaultDevice(open_device("memory:2M"), name=uri)

        legs = [FaultDevice(open_device("memory:2M"), name=n) for n in ("a", "b")]
        mirror = MirrorDevice(legs, granularity=4096, assume_clean=True)
        await mirror.start()
        control = AttachControl({"layout": "mirror", "members": ["a", "b"]}, make_member)
        control.device = mirror
        server = ControlServer(path, control.handlers())
        await server.start()

        def ask(cmd: str, **args: Any) -> dict[str, Any]:
            return request(path, cmd, **args)

        try:
            await mirror.write(0, b"\x5a" * 65536)
            st = await asyncio.to_thread(ask, "status")
            assert [m["uri"] for m in st["members"]] == ["a", "b"]
            assert {m["state"] for m in st["members"]} == {"connected"}
            assert st["device"]["mode"] == "mirror" and st["device"]["layout"] == "mirror"
            assert st["device"]["bytes_written"] == 65536

            r = await asyncio.to_thread(ask, "set", key="resync-rate", value="1M")
            assert r["value"] == 1 << 20 and mirror.limiter.rate == 1 << 20
            assert control.status()["settings"]["resync_rate"] == 1 << 20
            with pytest.raises(ControlError, match="applies to dst:// members"):
                await asyncio.to_thread(ask, "set", key="resends", value=3)

            report = await asyncio.to_thread(ask, "verify", rate="64M", repair=False)
            assert report["regions"] == [] and report["repair"] is False

            r = await asyncio.to_thread(ask, "detach", uri="b")
            assert r == {"detached": "b", "members": ["a"]}
            with pytest.raises(ControlError, match="not a leg of this mirror"):
                await asyncio.to_thread(ask, "detach", uri="zz")

            await mirror.set_resync_rate(None)
            r = await asyncio.to_thread(ask, "add", uri="c")
            assert r["added"] == "c" and r["members"] == ["a", "c"]
            await until(lambda: member_state(control, "c") == "connected", 10)
            st = control.status()
            assert [m["uri"] for m in st["members"]] == ["a", "c"]
            text = metrics_text(control.status).decode()
            assert 'dst_member_connected{member="c"} 1.0' in text
            assert 'dst_device_state{state="connected"} 1.0' in text
            render(st)  # the table view of a mirror builds
        finally:
            await server.aclose()
            await mirror.aclose()
        assert not os.path.exists(path)

    asyncio.run(main())


def member_state(control: Any, uri: str) -> str:
    return str(next(m["state"] for m in control.status()["members"] if m["uri"] == uri))
