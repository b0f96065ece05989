"""Transactions that survive outages: real export and client nodes, a fault proxy, kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import Proc, Procs, member_uri, need_tool, run
from tests.proxy import FaultProxy

pytestmark = pytest.mark.integration

MiB = 1 << 20
FAST = ("--reconnect-min", "0.05", "--reconnect-max", "0.5")


def fio_writer(uri: str, size: str = "48M", rate: str = "16m", bs: str = "64k") -> list[str]:
    exe = need_tool("fio")
    return [
        exe,
        "--name=verified",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randwrite",
        f"--bs={bs}",
        f"--size={size}",
        "--iodepth=8",
        *([f"--rate={rate}"] if rate != "0" else []),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]


def fio_result(p: subprocess.Popen[str], timeout: float = 120) -> dict[str, object]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"fio failed ({p.returncode}):\n{out}\n{err}"
    data = json.loads(out[out.index("{") :])
    job = data["jobs"][0]
    assert job["error"] == 0, job
    return job


def qemu_io(uri: str, *cmds: str) -> subprocess.CompletedProcess[str]:
    exe = need_tool("qemu-io")
    args = [exe, "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return run([*args, uri], check=False, timeout=120)


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def export_args(img: Path) -> list[str]:
    return [f"file:{img}", "--size", "64M"]


def test_kill_9_export_node_mid_write_and_restart(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    listen = f"unix:{sockdir}/e.sock"
    exp, addr = procs.export(*export_args(img), listen=listen)
    att, uri = procs.attach(member_uri(addr), "--resend-timeout", "2", "--resends", "5", *FAST)
    fio = subprocess.Popen(
        fio_writer(uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)
    exp.kill()
    time.sleep(1.0)
    procs.export(*export_args(img), listen=listen)
    job = fio_result(fio)
    assert job["write"]["io_bytes"] >= 48 * MiB  # type: ignore[index]
    att.wait_for(r"reconnected", timeout=10)
    assert "failed:" not in att.output


def test_sigstop_export_node_for_3s_is_only_latency(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    exp, addr = procs.export(*export_args(img))
    att, uri = procs.attach(member_uri(addr))  # default knobs: resend 5 s, ping 5 s / 2 s
    fio = subprocess.Popen(
        fio_writer(uri, size="32M"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.7)
    exp.signal(signal.SIGSTOP)
    time.sleep(3.0)
    exp.signal(signal.SIGCONT)
    job = fio_result(fio)
    lat_max_ns = job["write"]["clat_ns"]["max"]  # type: ignore[index]
    assert lat_max_ns > 2.5e9, "the stall should show as latency"
    assert "failed:" not in att.output and "connection lost" not in att.output


def test_outage_longer_than_budget_gives_eio_then_recovers(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    listen = f"unix:{sockdir}/e.sock"
    exp, addr = procs.export(*export_args(img), listen=listen)
    att, uri = procs.attach(member_uri(addr), "--resend-timeout", "1", "--resends", "1", *FAST)
    assert qemu_io(uri, "write -P 0x10 0 64k").returncode == 0
    exp.kill()
    t0 = time.monotonic()
    cp = qemu_io(uri, "write -P 0x20 0 64k")
    elapsed = time.monotonic() - t0
    assert "Input/output error" in cp.stdout + cp.stderr, cp.stdout + cp.stderr
    assert elapsed < 2.0 + 3.0, f"the failure took {elapsed:.1f} s, budget is 2 s"
    att.wait_for(
        r"write at offset 0 length 65536 failed: no ack within 2\.\d s \(2 timeouts", timeout=5
    )
    assert att.popen.poll() is None  # the client node lives on
    procs.export(*export_args(img), listen=listen)
    deadline = time.monotonic() + 10
    while True:
        cp = qemu_io(uri, "write -P 0x30 0 64k", "read -P 0x30 0 64k", "flush")
        if cp.returncode == 0 and "failed" not in cp.stdout.lower():
            break
        assert time.monotonic() < deadline, cp.stdout + cp.stderr
        time.sleep(0.2)
    assert read_at(img, 0, 65536) == b"\x30" * 65536


def test_half_open_connection_is_detected_by_pings(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    _, addr = procs.export(*export_args(img))
    proxy = FaultProxy(addr[5:], sockdir)
    try:
        att, uri = procs.attach(
            proxy.uri,
            "--ping-interval",
            "1",
            "--ping-timeout",
            "1",
            "--resend-timeout",
            "10",
            *FAST,
        )
        assert qemu_io(uri, "write -P 0x41 0 64k").returncode == 0
        proxy.blackhole_all()  # the peer vanished without FIN or RST
        t0 = time.monotonic()
        cp = qemu_io(uri, "write -P 0x42 64k 64k", "read -P 0x42 64k 64k", "flush")
        elapsed = time.monotonic() - t0
        assert cp.returncode == 0 and "failed" not in cp.stdout.lower(), cp.stdout + cp.stderr
        att.wait_for(r"no answer to a ping within 1 s", timeout=5)
        att.wait_for(r"reconnected", timeout=5)
        assert elapsed < 1 + 1 + 3, f"half-open detection took {elapsed:.1f} s"
        assert proxy.connections >= 2
        assert read_at(img, 65536, 65536) == b"\x42" * 65536
    finally:
        proxy.close()


def test_stale_write_held_by_the_network_never_overwrites_newer_data(
    procs: Procs, sockdir: Path
) -> None:
    img = sockdir / "d.img"
    exp, addr = procs.export(*export_args(img))
    proxy = FaultProxy(addr[5:], sockdir, digest_size=4)
    try:
        att, uri = procs.attach(proxy.uri, "--checksum", "crc32c", "--resend-timeout", "30", *FAST)
        proxy.hold_write_at = 1 * MiB
        exe = need_tool("qemu-io")
        old = subprocess.Popen(
            [exe, "-f", "raw", "-c", "write -P 0x11 1M 4k", uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 10
        while not proxy.held_frames:
            assert time.monotonic() < deadline, "the proxy never saw the write"
            time.sleep(0.02)
        proxy.cut_client_side()  # the client's connection dies with the write in the network
        out, _ = old.communicate(timeout=30)
        assert old.returncode == 0 and "failed" not in out.lower(), out
        exp.wait_for(r"fencing connection", timeout=5)
        assert qemu_io(uri, "write -P 0x22 1M 4k", "flush").returncode == 0
        proxy.release_held()  # the stale write finally arrives on its old connection
        time.sleep(0.5)
        assert qemu_io(uri, "flush", "read -P 0x22 1M 4k").returncode == 0
        assert read_at(img, MiB, 4096) == b"\x22" * 4096
        assert att.popen.poll() is None
    finally:
        proxy.close()


def test_reset_and_stall_through_proxy_are_invisible(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    _, addr = procs.export(*export_args(img))
    proxy = FaultProxy(addr[5:], sockdir)
    try:
        att, uri = procs.attach(proxy.uri, "--resend-timeout", "2", "--resends", "5", *FAST)
        fio = subprocess.Popen(
            fio_writer(uri, size="32M"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(0.5)
        proxy.reset_all()
        time.sleep(0.5)
        proxy.set_mode("stall")
        time.sleep(1.0)
        proxy.set_mode("pass")
        time.sleep(0.3)
        proxy.cut_all()
        fio_result(fio)
        assert att.output.count("reconnected") >= 2
    finally:
        proxy.close()


def wait_exit(p: Proc, timeout: float = 10) -> int:
    return p.wait(timeout)
