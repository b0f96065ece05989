"""One writer per export, on real processes: a live client node is never robbed of its export
by accident; a dead, killed or detached one gives it up as the rules say."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Proc, Procs, dst_run, member_uri, need_tool, run

pytestmark = pytest.mark.integration

KiB = 1 << 10


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dst: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def qemu_io(uri: str, *cmds: str) -> tuple[bool, str]:
    """Run qemu-io commands on an NBD URI; (all succeeded, output)."""
    args = [need_tool("qemu-io"), "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    cp = run([*args, uri], check=False, timeout=90)
    out = cp.stdout + cp.stderr
    ok = cp.returncode == 0 and "failed" not in out.lower() and "error" not in out.lower()
    return ok, out


def written(img: Path, offset: int, length: int) -> bytes:
    with open(img, "rb") as f:
        f.seek(offset)
        return f.read(length)


def status(sock: Path) -> dict[str, Any]:
    cp = dst_run("status", "--control", str(sock), "--json", timeout=20)
    assert cp.stdout, cp.stderr
    return json.loads(cp.stdout)  # type: ignore[no-any-return]


def wait_session(sock: Path, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The first session of the export node's status that matches ``pred``; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(sock)
        for s in st["sessions"]:
            if pred(s):
                return s  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, json.dumps(st, indent=1)
        time.sleep(0.1)


def export(procs: Procs, tmp: Path, *args: str) -> tuple[Proc, str, Path]:
    img = tmp / "d.img"
    p, addr = procs.export(f"file:{img}", "--size", "8M", *args)
    return p, member_uri(addr), img


def second_attach(uri: str, tmp: Path, *args: str) -> Any:
    return dst_run("attach", uri, *args, "--nbd", f"unix:{tmp}/second.sock", timeout=60)


def test_same_client_id_is_refused_while_its_session_is_alive(procs: Procs, sockdir: Path) -> None:
    exp, member, img = export(procs, sockdir)
    first, uri1 = procs.attach(member, "--client-id", "alpha")
    cp = second_attach(member, sockdir, "--client-id", "alpha")
    assert cp.returncode == 1, cp.stderr
    line = error_line(cp.stderr)
    assert f"in use by client 'alpha' from unix (pid {first.pid}) since " in line and line.endswith(
        "stop that client node or pass --takeover"
    ), line
    # the first client node never noticed: its I/O and its final flush work
    ok, out = qemu_io(uri1, "write -P 0x61 0 64k", "flush")
    assert ok, out
    assert written(img, 0, 64 * KiB) == b"\x61" * (64 * KiB)
    assert "fencing" not in exp.output and "replaced" not in first.output
    assert first.stop() == 0
    assert "ERROR" not in first.output and "failed" not in first.output, first.output


def test_takeover_fences_the_live_session_for_good(procs: Procs, sockdir: Path) -> None:
    exp, member, img = export(procs, sockdir)
    old, uri1 = procs.attach(
        member, "--client-id", "alpha", "--reconnect-min", "0.05", "--reconnect-max", "0.2"
    )
    _, uri2 = procs.attach(member, "--client-id", "alpha", "--takeover")
    ok, out = qemu_io(uri2, "write -P 0x99 0 64k", "flush")
    assert ok, out
    assert written(img, 0, 64 * KiB) == b"\x99" * (64 * KiB)
    exp.wait_for(r"fencing connection .* asked for --takeover")
    old.wait_for(r"replaced by a newer session", timeout=30)
    ok, out = qemu_io(uri1, "write -P 0x11 0 64k")
    assert not ok, out  # the fenced node's writes fail; they never reach the export
    assert written(img, 0, 64 * KiB) == b"\x99" * (64 * KiB)


def test_client_node_restarted_after_kill_9_attaches_at_once(procs: Procs, sockdir: Path) -> None:
    exp, member, img = export(procs, sockdir)
    old, uri1 = procs.attach(member, "--client-id", "alpha")
    ok, out = qemu_io(uri1, "write -P 0x42 0 64k", "flush")
    assert ok, out
    old.kill()
    _, uri2 = procs.attach(member, "--client-id", "alpha")  # no --takeover
    ok, out = qemu_io(uri2, "read -P 0x42 0 64k", "write -P 0x43 64k 64k", "flush")
    assert ok, out
    assert written(img, 64 * KiB, 64 * KiB) == b"\x43" * (64 * KiB)
    assert "its connection was gone" in exp.output or "lost its connection" in exp.output


def test_clean_detach_releases_the_export_at_once(procs: Procs, sockdir: Path) -> None:
    exp, member, img = export(procs, sockdir)
    first, uri1 = procs.attach(member, "--client-id", "alpha")
    ok, out = qemu_io(uri1, "write -P 0x21 0 4k", "flush")
    assert ok, out
    assert first.stop() == 0
    exp.wait_for(r"client 'alpha' from .* detached from export 'default'")
    _, uri2 = procs.attach(member, "--client-id", "beta")  # another client id, at once
    ok, out = qemu_io(uri2, "read -P 0x21 0 4k", "write -P 0x22 0 4k", "flush")
    assert ok, out
    assert written(img, 0, 4 * KiB) == b"\x22" * (4 * KiB)


def test_silent_old_client_is_probed_and_replaced_within_the_ping_timeout(
    procs: Procs, sockdir: Path
) -> None:
    exp, member, img = export(procs, sockdir)
    old, _ = procs.attach(
        member, "--client-id", "alpha", "--reconnect-min", "0.05", "--reconnect-max", "0.2"
    )
    old.signal(signal.SIGSTOP)  # its host "died": the socket stays open, nothing answers
    try:
        started = time.monotonic()
        _, uri2 = procs.attach(member, "--client-id", "alpha", "--ping-timeout", "1")
        elapsed = time.monotonic() - started
        exp.wait_for(r"no answer to a probe ping in 1 s")
        # replaced by the probe, not by the 10 s handshake limit or the 120 s claim
        assert elapsed < 8, elapsed
        ok, out = qemu_io(uri2, "write -P 0x77 0 64k", "flush")
        assert ok, out
        assert written(img, 0, 64 * KiB) == b"\x77" * (64 * KiB)
    finally:
        old.signal(signal.SIGCONT)
    old.wait_for(r"replaced by a newer session", timeout=30)
    assert written(img, 0, 64 * KiB) == b"\x77" * (64 * KiB)


def test_live_old_client_answers_the_probe_even_when_idle_for_long(
    procs: Procs, sockdir: Path
) -> None:
    """An idle client node (pinging only every 30 s) still answers the probe at once."""
    exp, member, _ = export(procs, sockdir)
    first, _ = procs.attach(member, "--client-id", "alpha", "--ping-interval", "30")
    cp = second_attach(member, sockdir, "--client-id", "alpha")
    assert cp.returncode == 1 and "in use by client 'alpha'" in error_line(cp.stderr)
    assert "it answered a probe ping" in exp.output
    assert first.popen.poll() is None


def test_unclean_loss_keeps_the_claim_shown_by_status_until_it_expires(
    procs: Procs, sockdir: Path
) -> None:
    ctl = sockdir / "export.ctl"
    exp, member, img = export(procs, sockdir, "--control", str(ctl))
    old, _ = procs.attach(member, "--client-id", "alpha")
    killed = time.time()
    old.kill()
    s = wait_session(ctl, lambda s: s["client_id"] == "alpha" and not s["connected"])
    assert 100 < s["claim_expires_in"] <= 120, s
    assert abs(s["claim_expires_at"] - (s["disconnected_at"] + 120)) < 0.01, s
    assert killed - 1 < s["disconnected_at"] < time.time(), s
    cp = dst_run("status", "--control", str(ctl))
    assert cp.returncode == 0 and "claim expires in" in cp.stdout, cp.stdout
    exp.wait_for(r"lost its connection to export 'default' without detaching")

    cp = second_attach(member, sockdir, "--client-id", "beta")
    assert cp.returncode == 1, cp.stderr
    line = error_line(cp.stderr)
    assert "client 'alpha' lost its connection" in line and "claim expires in" in line, line
    assert "--takeover" in line

    _, uri = procs.attach(member, "--client-id", "beta", "--takeover")
    ok, out = qemu_io(uri, "write -P 0x55 0 4k", "flush")
    assert ok, out
    assert written(img, 0, 4 * KiB) == b"\x55" * (4 * KiB)
    st = status(ctl)
    assert [(x["client_id"], x["connected"]) for x in st["sessions"]] == [("beta", True)], st


def test_silent_holder_with_another_client_id_keeps_its_claim_until_taken_over(
    procs: Procs, sockdir: Path
) -> None:
    ctl = sockdir / "export.ctl"
    exp, member, img = export(procs, sockdir, "--control", str(ctl))
    old, _ = procs.attach(member, "--client-id", "alpha")
    old.signal(signal.SIGSTOP)
    try:
        cp = second_attach(member, sockdir, "--client-id", "beta", "--ping-timeout", "0.5")
        assert cp.returncode == 1, cp.stderr
        line = error_line(cp.stderr)
        assert "client 'alpha'" in line and "did not answer a probe ping" in line, line
        assert "claim expires in" in line and "--takeover" in line, line
        s = wait_session(ctl, lambda s: s["client_id"] == "alpha" and not s["connected"])
        assert 100 < s["claim_expires_in"] <= 120, s
        _, uri = procs.attach(member, "--client-id", "beta", "--ping-timeout", "0.5", "--takeover")
        ok, out = qemu_io(uri, "write -P 0x66 0 4k", "flush")
        assert ok, out
        assert written(img, 0, 4 * KiB) == b"\x66" * (4 * KiB)
    finally:
        old.signal(signal.SIGCONT)
    old.wait_for(r"replaced by a newer session", timeout=30)
    assert "asked for --takeover" in exp.output or "replaced by a new session" in exp.output
